"""The namespace: the virtual tree of the federation, as one principal may see it.

Paths are tuples of names::

    ("studies", StudyUID, SeriesUID, "<SOPInstanceUID>.dcm")
    ("patients", PatientID, StudyUID, SeriesUID, "<SOPInstanceUID>.dcm")
    ("sites", SiteName, PatientID, StudyUID, SeriesUID, "<SOPInstanceUID>.dcm")
    ("browse", PatientID, "<StudyDate>_<Description>_<StudyUID>",
        "<SeriesNumber>_<Modality>_<Description>_<SeriesUID>", "<InstanceNumber>_<SOP>.dcm")
    <any directory> + (".metadata.json",)

:class:`Namespace` answers ``resolve``, ``lookup``, ``listdir`` and ``metadata`` for the
principal each call names (a :data:`~mdm.access.gate.Who`): what it may not see does not exist
(NotFound); names follow its view (:mod:`mdm.namespace.naming`). It is protocol-neutral: the
FUSE adapter and a DICOMweb gateway walk the same tree. Opening files is
:mod:`mdm.namespace.reads`; retrieving them, :mod:`mdm.retrieval.targets`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mdm.access.decide import Decision
from mdm.access.gate import Gate, Who
from mdm.access.identity import Principal
from mdm.access.views import NON_PHI, View
from mdm.catalog.cohorts import Cohorts
from mdm.catalog.records import ROOT, Record
from mdm.catalog.sync import CatalogSync
from mdm.config import Config
from mdm.errors import NotFound
from mdm.namespace.collections import CollectionTree
from mdm.namespace.naming import METADATA, Names, uid_of_readable
from mdm.retrieval.targets import Targets
from mdm.store.objects import ObjectStore
from mdm.store.records import ObjectRef
from mdm.volume.service import SUFFIXES as VOLUME_SUFFIXES
from mdm.volume.service import split_name as volume_name

if TYPE_CHECKING:
    from mdm.volume.service import Volumes

TOP = ("studies", "patients", "sites", "browse")
RESOLVED_TTL = 1.0
"""Seconds an instance file's resolution is given again (Namespace.resolve)."""
_RESOLVED_MAX = 16384


@dataclass(frozen=True)
class Entry:
    """A name in the virtual tree."""

    name: str
    is_dir: bool
    size: int = 0
    exact: bool = True
    """False while a file's size is not yet known (not cached): serve it with direct I/O."""
    mtime: float = 0.0


@dataclass
class Node:
    """A resolved path: which records it designates."""

    kind: str  # root, top, site, patient, study, series, instance, metadata, volume, sidecar
    path: tuple[str, ...]
    site: str | None = None
    patient: Record | None = None
    study: Record | None = None
    series: Record | None = None
    instance: Record | None = None
    decision: Decision | None = None
    view: View | None = None
    of: Node | None = None  # for metadata: the directory it describes
    collection: str | None = None  # under /collections/<name>


_Resolved = tuple[float, Principal, str, Node]


class Namespace:
    """resolve / lookup / listdir / metadata for a given principal (module docstring)."""

    def __init__(
        self,
        config: Config,
        sync: CatalogSync,
        gate: Gate,
        names: Names,
        store: ObjectStore,
        targets: Targets,
        *,
        volumes: Volumes | None = None,
    ) -> None:
        self.config = config
        self.volumes = volumes
        """The NIfTI files beside series directories (mdm.volume); None: no such files."""
        self.sync = sync
        self.gate = gate
        self.names = names
        self.store = store
        self.targets = targets
        self.started = time.time()
        """The mtime of every entry: when this process started."""
        self.cohorts = Cohorts(config, sync)
        self.collections = CollectionTree(self)
        self.tops = (*TOP, "collections") if config.collections else TOP
        """The top directories: ``/collections`` when collections are configured."""
        self._resolved: dict[tuple[int, tuple[str, ...]], _Resolved] = {}

    # ------------------------------------------------------------------ resolve
    async def resolve(self, who: Who, path: tuple[str, ...]) -> Node:
        """The node at ``path`` if ``who`` may see it; NotFound otherwise.

        An instance file resolved (or listed, :meth:`listdir`) less than
        :data:`RESOLVED_TTL` seconds ago for the very same principal under the same policy
        version is given again without walking its path: the decision in it is as fresh as
        the gate's own (``Gate.decide`` gives a decision again for as long)."""
        if path and path[-1].endswith(".dcm"):
            principal = who()
            hit = self._resolved.get((id(principal), path))
            if (
                hit is not None
                and time.monotonic() - hit[0] < RESOLVED_TTL
                and hit[1] is principal
                and hit[2] == self.gate.resolver.version()
                and time.time() < principal.expires
            ):
                return dataclasses.replace(hit[3])
            node = await self._resolve(who, path)
            if node.kind == "instance":
                self._remember(principal, node)
            return node
        return await self._resolve(who, path)

    def _remember(self, principal: Principal, node: Node) -> None:
        if len(self._resolved) >= _RESOLVED_MAX:
            self._resolved.clear()
        version = self.gate.resolver.version()
        key = (id(principal), node.path)
        self._resolved[key] = (time.monotonic(), principal, version, dataclasses.replace(node))

    async def _resolve(self, who: Who, path: tuple[str, ...]) -> Node:
        if path and path[-1] == METADATA:
            parent = await self.resolve(who, path[:-1])
            if parent.kind in VOLUME_SUFFIXES or parent.kind in ("instance", "metadata"):
                raise NotFound(METADATA)  # a file, not a directory
            return Node(kind="metadata", path=path, of=parent)
        n = len(path)
        if n == 0:
            return Node(kind="root", path=path)
        top = path[0]
        if top not in self.tops:
            raise NotFound(top)
        if n == 1:
            return Node(kind="top", path=path)
        if top == "collections":
            return await self.collections.resolve(who, path)
        if top == "browse":
            return await self._resolve_browse(who, path)
        principal = who()
        names = self.names
        rest = list(path[1:])
        site: str | None = None
        patient: Record | None = None
        pview: View | None = None
        if top == "sites":
            site = rest.pop(0)
            if site not in {s.name for s in self.config.sites}:
                raise NotFound(site)
            if not rest:
                return Node(kind="site", path=path, site=site)
        if top in ("patients", "sites"):
            patient, pview = await names.patient(principal, rest.pop(0), site)
            if not rest:
                return Node(kind="patient", path=path, site=site, patient=patient, view=pview)
        study, d = await names.study_named(principal, rest.pop(0))
        if patient is not None and study.parent != patient.uid:
            raise NotFound(study.uid)
        if pview is not None and names.view(d).patient_name(study.parent) != path[-len(rest) - 2]:
            raise NotFound(study.uid)
        if site is not None and site not in study.sites:
            raise NotFound(study.uid)
        node = Node(kind="study", path=path, site=site, patient=patient, study=study)
        if not rest:
            node.decision, node.view = d, names.view(d)
            return node
        vol = volume_name(rest[0]) if len(rest) == 1 and self.volumes is not None else None
        sname = rest.pop(0)
        series, d = await names.series_named(principal, study, vol[0] if vol else sname)
        if site is not None and site not in series.sites:
            raise NotFound(series.uid)
        node.kind, node.series, node.decision, node.view = "series", series, d, names.view(d)
        if vol is not None and self.volumes is not None:
            node.kind = vol[1]  # <series>.nii.gz or <series>.json beside the series directory
            self.volumes.check(node)
            return node
        if not rest:
            return node
        fname = rest.pop(0)
        if rest or not fname.endswith(".dcm"):
            raise NotFound(fname)
        assert node.view is not None
        inst = await names.instance_named(study, series, fname, node.view)
        if site is not None and site not in inst.sites:
            raise NotFound(inst.uid)
        node.kind, node.instance = "instance", inst
        return node

    async def _resolve_browse(self, who: Who, path: tuple[str, ...]) -> Node:
        """``/browse/...``: the ``/patients`` node of the same UIDs, if every component is
        exactly the readable name the principal's view gives it."""
        plain = [uid_of_readable(x) for x in path[2:]]
        node = await self.resolve(who, ("patients", *path[1:2], *plain))
        if node.kind == "metadata":
            node.path = path
            return node
        for kind, rec, given in zip(
            ("study", "series", "instance"),
            (node.study, node.series, node.instance),
            path[2:],
            strict=False,
        ):
            assert rec is not None and node.view is not None
            if kind == "series" and node.kind in VOLUME_SUFFIXES:
                given = given.removesuffix(VOLUME_SUFFIXES[node.kind])
            if self.names.readable_name(kind, rec, node.view) != given:
                raise NotFound(given)
        node.path = path
        return node

    # ------------------------------------------------------------------ lookup
    def _exact_sizes(self, v: View) -> bool:
        return self.config.bridge.exact_sizes and v.kind != "metadata"

    def _file_entry(self, name: str, inst: Record, v: View) -> Entry:
        info = self.store.info(ObjectRef(inst.uid, v.store_view))
        if info is not None:
            return Entry(name=name, is_dir=False, size=info.size, exact=True, mtime=self.started)
        return Entry(name=name, is_dir=False, size=0, exact=False, mtime=self.started)

    async def lookup(self, who: Who, path: tuple[str, ...]) -> Entry:
        """Attributes of ``path`` (no retrieval, unless ``bridge.exact_sizes``)."""
        node = await self.resolve(who, path)
        name = path[-1] if path else ""
        if node.kind == "instance":
            assert node.instance is not None and node.view is not None
            entry = self._file_entry(name, node.instance, node.view)
            if not entry.exact and self._exact_sizes(node.view):
                assert node.study is not None and node.series is not None
                await self.targets.fetch_instance(
                    node.study, node.series, node.instance, prefer=node.site, view=node.view
                )
                entry = self._file_entry(name, node.instance, node.view)
            return entry
        if node.kind == "metadata":
            size = len(self.metadata(who, node))
            return Entry(name=name, is_dir=False, size=size, mtime=self.started)
        if node.kind in VOLUME_SUFFIXES and self.volumes is not None:
            return await self.volumes.entry(who, node, name, self.started)
        return Entry(name=name, is_dir=True, mtime=self.started)

    # ------------------------------------------------------------------ listdir
    async def listdir(self, who: Who, path: tuple[str, ...]) -> list[Entry]:
        """The entries of the directory at ``path`` that ``who`` may see."""
        if len(path) >= 2 and path[0] == "browse":
            return await self._listdir_browse(who, path)
        if path and path[0] == "collections":
            inner = sorted(await self.collections.listdir(who, path), key=lambda e: e.name)
            return [await self.lookup(who, (*path, METADATA)), *inner]
        node = await self.resolve(who, path)
        if node.kind in ("instance", "metadata", *VOLUME_SUFFIXES):
            raise NotFound("not a directory")
        t, gate, names = self.started, self.gate, self.names
        out: list[Entry] = []
        if node.kind == "root":
            out = [Entry(n, True, mtime=t) for n in self.tops]
        elif node.kind == "top" and path[0] == "sites":
            who()
            out = [Entry(s.name, True, mtime=t) for s in self.config.sites]
        elif (node.kind == "top" and path[0] in ("patients", "browse")) or node.kind == "site":
            rows = await names.patients(who(), node.site)
            out = [Entry(n, True, mtime=t) for n, _, _ in rows]
        elif node.kind == "top":  # studies
            p = who()
            await self.sync.ensure_studies(gate.narrowing(p))
            for s in self.sync.children("STUDY", ROOT):
                d = gate.decide(p, s)
                if s.sites and gate.visible(d):
                    out.append(Entry(names.name(names.view(d), s.uid), True, mtime=t))
        elif node.kind == "patient":
            assert node.patient is not None and node.view is not None
            p, pname = who(), path[-1]
            for s in self.sync.studies_of(node.patient.uid, node.site):
                d = gate.decide(p, s)
                if gate.visible(d) and names.view(d).patient_name(s.parent) == pname:
                    out.append(Entry(names.name(names.view(d), s.uid), True, mtime=t))
        elif node.kind == "study":
            assert node.study is not None
            p = who()
            await self.sync.ensure_series(node.study)
            for se in self.sync.children("SERIES", node.study.uid):
                if not se.sites or (node.site is not None and node.site not in se.sites):
                    continue
                d = gate.decide(p, node.study, se)
                if gate.visible(d):
                    out.append(Entry(names.name(names.view(d), se.uid), True, mtime=t))
                    if self.volumes is not None:
                        out += self.volumes.entries(se, names.view(d), out[-1].name, t)
        elif node.kind == "series":
            assert node.study is not None and node.series is not None and node.view is not None
            await self.sync.ensure_instances(node.study, node.series)
            v = node.view
            if self._exact_sizes(v):
                # Sizes exact in the listing too (ls -l, tar): the series, retrieved once.
                await self.targets.fetch_series(who(), node.study, node.series)
            p = who()
            for i in self.sync.children("IMAGE", node.series.uid):
                if i.sites and (node.site is None or node.site in i.sites):
                    out.append(self._file_entry(names.name(v, i.uid) + ".dcm", i, v))
                    # What an open of it right after would resolve to (see resolve).
                    fpath = (*path, out[-1].name)
                    inode = dataclasses.replace(node, kind="instance", instance=i, path=fpath)
                    self._remember(p, inode)
        out.sort(key=lambda e: e.name)
        meta = await self.lookup(who, (*path, METADATA))
        return [meta, *out]

    async def _listdir_browse(self, who: Who, path: tuple[str, ...]) -> list[Entry]:
        node = await self.resolve(who, path)
        plain = ("patients", path[1], *(uid_of_readable(x) for x in path[2:]))
        entries = await self.listdir(who, plain)
        if node.kind == "patient":
            kind, parent = "study", None
        elif node.kind == "study":
            kind, parent = "series", node.study
        else:
            kind, parent = "instance", node.series
        out: list[Entry] = []
        for e in entries:
            if e.name == METADATA:
                out.append(e)
                continue
            try:
                sub = await self.resolve(who, (*plain, e.name))
            except NotFound:
                continue
            rec = {"study": sub.study, "series": sub.series, "instance": sub.instance}[kind]
            if rec is None or sub.view is None or (parent is not None and rec.parent != parent.uid):
                continue
            name = self.names.readable_name(kind, rec, sub.view)
            name += VOLUME_SUFFIXES.get(sub.kind, "")
            out.append(dataclasses.replace(e, name=name))
        out.sort(key=lambda x: (x.name != METADATA, x.name))
        return out

    # ------------------------------------------------------------------ xattrs
    async def xattrs(self, who: Who, path: tuple[str, ...]) -> dict[str, str]:
        """The key C-FIND attributes of a patient, study, series or instance at ``path`` as
        its view shows them (``user.dicom.<Keyword>``: the ``.metadata.json`` attributes,
        without a second query); none for other nodes."""
        node = await self.resolve(who, path)
        v = node.view
        if v is None or node.kind not in ("patient", "study", "series", "instance"):
            return {}
        if node.kind == "instance":
            assert node.instance is not None
            attrs = {
                k: (v.uid_name(x) if k.endswith("UID") else x)
                for k, x in node.instance.attrs.items()
                if k in ("SOPInstanceUID", "SOPClassUID", "InstanceNumber")
            }
            attrs["SOPInstanceUID"] = v.uid_name(node.instance.uid)
            if "SOPClassUID" in node.instance.attrs:
                attrs["SOPClassUID"] = node.instance.attrs["SOPClassUID"]
        else:
            rec = node.series or node.study or node.patient
            assert rec is not None
            raw = dict(rec.attrs)
            if node.kind == "patient":
                raw.setdefault("PatientID", rec.uid)
            level = {"patient": "PATIENT", "study": "STUDY", "series": "SERIES"}[node.kind]
            attrs = v.attrs(level, raw, NON_PHI)
        return {f"user.dicom.{k}": str(x) for k, x in sorted(attrs.items()) if str(x) != ""}

    # ------------------------------------------------------------------ metadata
    def metadata(self, who: Who, node: Node) -> bytes:
        """The ``.metadata.json`` document of a directory node, as its view allows."""
        of = node.of
        assert of is not None
        doc: dict[str, Any] = {"level": of.kind.upper()}
        rec = of.instance or of.series or of.study or of.patient
        if of.kind == "root":
            doc["sites"] = [s.name for s in self.config.sites]
            doc["principal"] = who().sub
        elif of.kind == "site":
            doc["site"] = of.site
        elif rec is not None and of.view is not None:
            attrs = dict(rec.attrs)
            if of.kind == "patient":
                attrs.setdefault("PatientID", rec.uid)
            level = {"patient": "PATIENT", "study": "STUDY", "series": "SERIES"}[of.kind]
            doc["attributes"] = dict(sorted(of.view.attrs(level, attrs, NON_PHI).items()))
            doc["sites"] = sorted(rec.sites)
            doc["access"] = of.view.kind
            if of.kind == "series" and of.series is not None and self.volumes is not None:
                doc["volume"] = self.volumes.status(of.series, of.view)
        self.collections.annotate(who, of, doc)
        return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()
