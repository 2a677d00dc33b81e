"""The protocol-neutral core: a virtual tree of the federation, read on demand.

The FUSE adapter (``mdm_fuse``) is a thin layer over :class:`Bridge`; another front end (a
gateway, WebDAV) could use it the same way. Paths are tuples of names::

    ("studies", StudyUID, SeriesUID, "<SOPInstanceUID>.dcm")
    ("patients", PatientID, StudyUID, SeriesUID, "<SOPInstanceUID>.dcm")
    ("sites", SiteName, PatientID, StudyUID, SeriesUID, "<SOPInstanceUID>.dcm")
    ("browse", PatientID, "<StudyDate>_<Description>_<StudyUID>",
        "<SeriesNumber>_<Modality>_<Description>_<SeriesUID>", "<InstanceNumber>_<SOP>.dcm")
    <any directory> + (".metadata.json",)

Every name, listing and open goes through the principal's access decision: what the principal
may not see does not exist (NotFound); what it may see but not read is AccessDenied.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn

import trio
from pydicom.dataset import Dataset

from mdm.access.decide import AccessLevel, Decision, Resource, resource_of
from mdm.access.identity import InvalidToken, Principal
from mdm.access.session import Session
from mdm.access.views import View, view_of
from mdm.audit.log import AuditError
from mdm.catalog.flight import SingleFlight
from mdm.catalog.records import ROOT, Catalog, Level, Record
from mdm.config import Config, SiteSettings
from mdm.dicom.procscp import ProcessStorageSCP, StoreParams
from mdm.dicom.query import SiteResult, find_at
from mdm.dicom.receiver import StorageSCP
from mdm.dicom.retrieve import Retriever
from mdm.errors import (
    AccessDenied,
    MdmError,
    NotFound,
    RetrieveError,
    RetrieveTimeout,
    UserError,
)
from mdm.namespace.names import is_uid, safe_name
from mdm.ops import metrics
from mdm.ops.status import AuditState
from mdm.retrieval.fetcher import Fetcher, Target
from mdm.store.db import open_env
from mdm.store.keys import KeyProvider, LocalKeyring
from mdm.store.objects import ObjectInfo, ObjectReader, ObjectRef, ObjectStore

log = logging.getLogger(__name__)

ACCESS_FLUSH_SECONDS = 5.0
MAX_ALIASES = 200_000
"""Remapped UIDs remembered by a mount (about 250 bytes each)."""

METADATA = ".metadata.json"
TOP = ("studies", "patients", "sites", "browse")
READABLE_DESC = 40
"""Longest description kept in a readable (``/browse``) name."""

STUDY_KEYS = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "StudyDescription",
    "AccessionNumber",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
    "ClinicalTrialProtocolID",
)
SERIES_KEYS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "NumberOfSeriesRelatedInstances",
)
IMAGE_KEYS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
)
UNIQUE = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
# Attributes that are not PHI: shown in .metadata.json below the identified level.
NON_PHI = {
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "Modality",
    "ModalitiesInStudy",
    "SeriesNumber",
    "InstanceNumber",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
    "NumberOfSeriesRelatedInstances",
    "BodyPartExamined",
    "ClinicalTrialProtocolID",
}
NEGATIVE_TTL = 30.0
PREFETCH_WINDOW = 60.0
"""A second object of a series opened cold within this many seconds starts its prefetch."""


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

    kind: str  # root, top, site, patient, study, series, instance, metadata
    path: tuple[str, ...]
    site: str | None = None
    patient: Record | None = None
    study: Record | None = None
    series: Record | None = None
    instance: Record | None = None
    decision: Decision | None = None
    view: View | None = None
    of: Node | None = None  # for metadata: the directory it describes


@dataclass
class OpenFile:
    """An open file: a pinned, decrypting reader, or a small in-memory document."""

    reader: ObjectReader | None = None
    data: bytes | None = None
    size: int = 0
    exact_before: bool = True
    released: bool = field(default=False)
    recheck: Callable[[], None] | None = None

    def read(self, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset+length)`` (fewer at EOF)."""
        return bytes(self.read_view(offset, length))

    def read_view(self, offset: int, length: int) -> memoryview:
        """Like :meth:`read`, without copying what is already in memory."""
        if self.recheck is not None:
            self.recheck()
        if self.data is not None:
            return memoryview(self.data)[offset : offset + length]
        assert self.reader is not None
        return self.reader.read_view(offset, length)

    def release(self) -> None:
        """Unpin the object; idempotent."""
        if not self.released and self.reader is not None:
            self.reader.close()
        self.released = True


def dataset_attrs(ds: Dataset, keys: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k in keys:
        v = ds.get(k)
        if v is None or v == "":
            continue
        if isinstance(v, list | tuple) or type(v).__name__ == "MultiValue":
            out[k] = "\\".join(str(x) for x in v)
        else:
            out[k] = str(v)
    return out


def query_dataset(level: str, keys: Sequence[str], **filters: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k in keys:
        setattr(ds, k, filters.get(k, ""))
    for k, v in filters.items():
        if k not in keys:
            setattr(ds, k, v)
    return ds


class Bridge:
    """The federation as seen by one principal."""

    def __init__(
        self,
        config: Config,
        session: Session,
        *,
        catalog: Catalog,
        store: ObjectStore,
        fetcher: Fetcher,
        keys: KeyProvider,
    ) -> None:
        self.config = config
        self.session = session
        self.keys = keys
        self._views: dict[tuple[Any, ...], View] = {}
        # Remapped (de-identified) UID -> original, learnt from listings; bounded, oldest
        # first out: a name no longer here is found again by listing its parent.
        self._aliases: OrderedDict[str, str] = OrderedDict()
        self.audit = session.audit
        self.audit_state = AuditState()
        self.catalog = catalog
        self.store = store
        self.fetcher = fetcher
        self.resolver = session.resolver
        self._token_error = ""
        self.started = time.time()
        self._listings: SingleFlight[None] = SingleFlight()
        self._negative: dict[tuple[str, str], float] = {}
        self._negative_version = ""
        # (series, view) -> (first cold open, objects opened cold): the prefetch signal.
        self._cold_opens: OrderedDict[tuple[str, str], tuple[float, set[str]]] = OrderedDict()

    # ------------------------------------------------------------------ decisions
    @property
    def principal(self) -> Principal:
        """The mount's principal now; AccessDenied (EACCES) once its token is not valid."""
        try:
            p = self.session.principal()
        except InvalidToken as e:
            if str(e) != self._token_error:
                self._token_error = str(e)
                log.warning("access refused: %s", e)
            raise AccessDenied(f"no valid token: {e}") from None
        self._token_error = ""
        return p

    def record(
        self,
        action: str,
        decision: str,
        resource: dict[str, str],
        *,
        rule: str = "",
        policy: str = "",
        principal: Principal | None = None,
        **extra: Any,
    ) -> None:
        """One audit record (no-op without [audit]); UIDs only, never PHI.

        Fails closed: a record that cannot be written raises AuditError (EIO) after one log
        line, unless ``[audit] fail_open = true`` (then the log line only)."""
        if self.audit is None:
            return
        if principal is None:
            try:
                principal = self.session.principal()
            except InvalidToken:
                principal = Principal(sub="(invalid token)", issuer="")
        try:
            self.audit.record(
                principal=principal,
                action=action,
                decision=decision,
                resource={k: v for k, v in resource.items() if v},
                rule=rule,
                policy=policy or self.resolver.version(),
                **extra,
            )
            self.audit_state.written()
        except (OSError, MdmError) as e:
            self.audit_state.failed(str(e))
            if self.config.audit is not None and self.config.audit.fail_open:
                log.error("audit record could not be written (audit.fail_open: going on): %s", e)
                return
            log.error("audit record could not be written; %s refused: %s", action, e)
            raise AuditError(f"audit record could not be written: {e}") from None

    def decide(
        self, study: Record, series: Record | None = None, principal: Principal | None = None
    ) -> Decision:
        """The principal's access decision on a study (or one of its series)."""
        d = self.resolver.decide(principal or self.principal, self.resource(study, series))
        metrics.POLICY_DECISIONS.labels(
            "study" if series is None else "series", d.level.label
        ).inc()
        return d

    def resource(self, study: Record, series: Record | None = None) -> Resource:
        """The policy attributes of a study (or one of its series)."""
        sattrs = None
        if series is not None:
            sattrs = {**series.attrs, "SeriesInstanceUID": series.uid}
        return resource_of(
            series.sites if series is not None else study.sites,
            study.attrs,
            sattrs,
            patient_id=study.parent or None,
            study_uid=study.uid,
        )

    def _visible(self, d: Decision) -> bool:
        return d.level >= AccessLevel.METADATA

    # ------------------------------------------------------------------ queries
    async def _find(
        self, level: str, identifier: Dataset, sites: Sequence[str] | None = None
    ) -> list[tuple[str, list[Dataset] | None]]:
        """Fan a C-FIND out to ``sites`` (all by default); (site, datasets or None on error)."""
        chosen = [s for s in self.config.sites if sites is None or s.name in sites]
        if not chosen:
            return []
        got: dict[str, SiteResult] = {}

        async def one(site: SiteSettings) -> None:
            # Under the site's association limit, the same one its retrievals take: a burst
            # of listings never opens more than max_associations to one PACS.
            got[site.name] = await trio.to_thread.run_sync(
                find_at,
                site,
                self.config.bridge,
                level,
                identifier,
                limiter=self.fetcher.limiter(site.name),
            )

        async with trio.open_nursery() as nursery:
            for site in chosen:
                nursery.start_soon(one, site)
        results = [got[s.name] for s in chosen]
        out: list[tuple[str, list[Dataset] | None]] = []
        for r in results:
            if r.error is not None:
                # INFO: the caller reports what it could not do (EIO, a CLI error line).
                log.info("C-FIND %s at site %s failed: %s", level, r.site.name, r.error)
                out.append((r.site.name, None))
            else:
                out.append((r.site.name, list(r.datasets)))
        return out

    def _to_records(self, level: Level, site: str, dss: list[Dataset]) -> list[Record]:
        recs: list[Record] = []
        for ds in dss:
            if level == "STUDY":
                a = dataset_attrs(ds, STUDY_KEYS)
                uid, parent = a.get("StudyInstanceUID", ""), a.get("PatientID", "")
            elif level == "SERIES":
                a = dataset_attrs(ds, SERIES_KEYS)
                uid, parent = a.get("SeriesInstanceUID", ""), a.get("StudyInstanceUID", "")
            else:
                a = dataset_attrs(ds, IMAGE_KEYS)
                uid, parent = a.get("SOPInstanceUID", ""), a.get("SeriesInstanceUID", "")
            if not uid:
                log.warning("site %s returned a %s answer without its UID; skipped", site, level)
                continue
            recs.append(Record(level=level, uid=uid, parent=parent, attrs=a, sites={site: 0.0}))
        return recs

    def _patients_of(self, studies: list[Record], site: str) -> list[Record]:
        seen: dict[str, Record] = {}
        for s in studies:
            pid = s.parent
            if pid not in seen:
                pa: dict[str, str] = {
                    k: s.attrs[k]
                    for k in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex")
                    if k in s.attrs
                }
                seen[pid] = Record(
                    level="PATIENT", uid=pid, parent=ROOT, attrs=pa, sites={site: 0.0}
                )
        return list(seen.values())

    async def _ensure_studies(self) -> None:
        """The federated study listing (all sites), refreshed after the catalog TTL."""
        if self.catalog.fresh("studies"):
            return

        async def run() -> None:
            answered = 0
            for site, dss in await self._find("STUDY", query_dataset("STUDY", STUDY_KEYS)):
                if dss is None:
                    continue
                answered += 1
                recs = self._to_records("STUDY", site, dss)
                self.catalog.merge(
                    self._patients_of(recs, site),
                    replace_site=site,
                    replace_scope=("PATIENT", ROOT),
                )
                self.catalog.merge(recs, replace_site=site, replace_scope=("STUDY", ROOT))
            if answered:
                self.catalog.merge([], listed="studies")
            elif not self.catalog.listed_at("studies"):
                raise RetrieveError("no site answered the study listing")

        await self._refresh("studies", run)

    async def _ensure_series(self, study: Record) -> None:
        q = query_dataset("SERIES", SERIES_KEYS, StudyInstanceUID=study.uid)
        await self._ensure_children("SERIES", study, q, f"series of study {study.uid}")

    async def _ensure_instances(self, study: Record, series: Record) -> None:
        q = query_dataset(
            "IMAGE", IMAGE_KEYS, StudyInstanceUID=study.uid, SeriesInstanceUID=series.uid
        )
        await self._ensure_children("IMAGE", series, q, f"instances of series {series.uid}")

    async def _ensure_children(self, level: Level, parent: Record, q: Dataset, what: str) -> None:
        """List the children of ``parent`` at ``level`` at the sites that hold it (TTL)."""
        key = f"{level}:{parent.uid}"
        if self.catalog.fresh(key):
            return

        async def run() -> None:
            answered = 0
            for site, dss in await self._find(level, q, list(parent.sites) or None):
                if dss is None:
                    continue
                answered += 1
                recs = [
                    r for r in self._to_records(level, site, dss) if r.parent in ("", parent.uid)
                ]
                for r in recs:
                    r.parent = parent.uid
                self.catalog.merge(recs, replace_site=site, replace_scope=(level, parent.uid))
            if answered:
                self.catalog.merge([], listed=key)
            elif not self.catalog.listed_at(key):
                raise RetrieveError(f"no site answered the listing of the {what}")

        await self._refresh(key, run)

    async def _refresh(self, key: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run a listing; once one exists, a stale one is served while it refreshes.

        ``ls`` never waits for a slow or dead site when the catalog has any answer: the
        listing refreshes in the background and the next ``ls`` shows the result.
        """
        if self.catalog.listed_at(key) > 0:
            if not self._listings.in_flight(key):
                self.fetcher.nursery.start_soon(self._refresh_in_background, key, run)
            return
        await self._listings.run(key, run)

    async def _refresh_in_background(self, key: str, run: Callable[[], Awaitable[None]]) -> None:
        try:
            await self._listings.run(key, run)
        except MdmError as e:
            log.info("background refresh of a listing failed: %s", e)

    def _negative_hit(self, kind: str, name: str) -> bool:
        version = self.resolver.version()
        if version != self._negative_version:
            # A policy edit may show what was hidden: forget hidden and missing names alike.
            self._negative.clear()
            self._negative_version = version
        t = self._negative.get((kind, name))
        return t is not None and t > time.monotonic()

    def _remember_missing(self, kind: str, name: str) -> None:
        if len(self._negative) > 10000:
            self._negative.clear()
        self._negative[(kind, name)] = time.monotonic() + NEGATIVE_TTL

    async def _query_study(self, uid: str) -> list[tuple[str, list[Dataset] | None]]:
        """The targeted C-FIND of one study at every site; RetrieveError if none answered
        (unreachable is not "missing", for hidden and missing UIDs alike)."""
        answers = await self._find(
            "STUDY", query_dataset("STUDY", STUDY_KEYS, StudyInstanceUID=uid)
        )
        if answers and all(dss is None for _, dss in answers):
            raise RetrieveError("no site answered the study query")
        return answers

    async def study(self, uid: str) -> Record:
        """The study ``uid``: from the catalog, or a targeted C-FIND if never listed."""
        rec = self.catalog.get("STUDY", uid)
        if rec is not None and rec.sites:
            return rec
        if not is_uid(uid) or self._negative_hit("study", uid):
            raise NotFound(uid)

        async def run() -> None:
            for site, dss in await self._query_study(uid):
                if dss:
                    recs = [r for r in self._to_records("STUDY", site, dss) if r.uid == uid]
                    self.catalog.merge(self._patients_of(recs, site) + recs)

        await self._listings.run("study:" + uid, run)
        rec = self.catalog.get("STUDY", uid)
        if rec is None or not rec.sites:
            self._remember_missing("study", uid)
            raise NotFound(uid)
        return rec

    async def series(self, study: Record, uid: str) -> Record:
        """Series ``uid`` of ``study`` (lists the study's series if needed)."""
        rec = self.catalog.get("SERIES", uid)
        if rec is None or not rec.sites:
            if not is_uid(uid) or self._negative_hit("series", uid):
                raise NotFound(uid)
            await self._ensure_series(study)
            rec = self.catalog.get("SERIES", uid)
        if rec is None or rec.parent != study.uid or not rec.sites:
            self._remember_missing("series", uid)
            raise NotFound(uid)
        return rec

    async def instance(self, study: Record, series: Record, uid: str) -> Record:
        """Instance ``uid`` of ``series``: catalog, or a targeted IMAGE-level C-FIND."""
        rec = self.catalog.get("IMAGE", uid)
        if rec is None or not rec.sites:
            if not is_uid(uid) or self._negative_hit("image", uid):
                raise NotFound(uid)
            q = query_dataset(
                "IMAGE",
                IMAGE_KEYS,
                StudyInstanceUID=study.uid,
                SeriesInstanceUID=series.uid,
                SOPInstanceUID=uid,
            )

            async def run() -> None:
                for site, dss in await self._find("IMAGE", q, list(series.sites) or None):
                    if dss:
                        recs = [r for r in self._to_records("IMAGE", site, dss) if r.uid == uid]
                        for r in recs:
                            r.parent = series.uid
                        self.catalog.merge(recs)

            await self._listings.run("image:" + uid, run)
            rec = self.catalog.get("IMAGE", uid)
        if rec is None or rec.parent != series.uid or not rec.sites:
            self._remember_missing("image", uid)
            raise NotFound(uid)
        return rec

    # ------------------------------------------------------------------ views and names
    def view(self, d: Decision) -> View:
        """The view a decision grants (names, metadata and content follow it)."""
        key = (d.level, d.rule, getattr(d, "version", ""))
        v = self._views.get(key)
        if v is not None:
            return v
        v = view_of(d, self.resolver, self.keys.secret)
        if len(self._views) > 1000:
            self._views.clear()
        self._views[key] = v
        return v

    def _name(self, v: View, uid: str) -> str:
        name = v.uid_name(uid)
        if name != uid and name not in self._aliases:
            self._aliases[name] = uid
            if len(self._aliases) > MAX_ALIASES:
                for _ in range(MAX_ALIASES // 10):
                    self._aliases.popitem(last=False)
        return name

    def _original(self, name: str) -> str:
        return self._aliases.get(name, name)

    # ------------------------------------------------------------------ namespace
    async def _patients(self, site: str | None) -> list[tuple[str, Record, View]]:
        """(directory name, patient, view) of every visible patient; a patient whose studies
        are seen in two views (e.g. identified here, de-identified there) appears twice."""
        await self._ensure_studies()
        p = self.principal
        out: dict[str, tuple[str, Record, View]] = {}
        for rec in self.catalog.children("PATIENT", ROOT):
            if not rec.sites or (site is not None and site not in rec.sites):
                continue
            for s in self._studies_of(rec.uid, site):
                d = self.decide(s, principal=p)
                if self._visible(d):
                    v = self.view(d)
                    name = v.patient_name(rec.uid)
                    out.setdefault(name, (name, rec, v))
        return list(out.values())

    def _studies_of(self, pid: str, site: str | None) -> list[Record]:
        return [
            s
            for s in self.catalog.children("STUDY", pid)
            if s.sites and (site is None or site in s.sites)
        ]

    async def _patient(self, name: str, site: str | None) -> tuple[Record, View]:
        if safe_name(name) == name:
            rec = self.catalog.get("PATIENT", name)
            if rec is not None and rec.sites and (site is None or site in rec.sites):
                for s in self._studies_of(rec.uid, site):
                    d = self.decide(s)
                    if self._visible(d) and self.view(d).patient_name(rec.uid) == name:
                        return rec, self.view(d)
        for n, rec, v in await self._patients(site):
            if n == name:
                return rec, v
        raise NotFound(name)

    async def _conceal(self, kind: str, name: str, work: Callable[[], Awaitable[Any]]) -> NoReturn:
        """NotFound for a name that exists but is hidden, after the same ``work`` a name that
        exists nowhere costs (then the negative cache, as for a missing name): timing tells
        the two apart no better than the answer does."""
        if not self._negative_hit(kind, name):
            # Its errors too: with every site down a missing name is EIO, so a hidden one is.
            await work()
            self._remember_missing(kind, name)
        raise NotFound(name)

    async def _study_named(self, name: str, principal: Principal) -> tuple[Record, Decision]:
        if self._negative_hit("study", name):
            raise NotFound(name)
        if name not in self._aliases and name.startswith("2.25."):
            # Perhaps a remapped UID never listed here: the listing teaches the aliases.
            await self.listdir(("studies",))
        known = self.catalog.get("STUDY", self._original(name)) is not None
        study = await self.study(self._original(name))
        d = self.decide(study, principal=principal)
        if not self._visible(d) or self._name(self.view(d), study.uid) != name:
            # A study never listed was just looked up by the same C-FIND a missing one costs.
            work = (lambda: self._query_study(study.uid)) if known else _none
            await self._conceal("study", name, work)
        return study, d

    async def _series_named(
        self, study: Record, name: str, principal: Principal
    ) -> tuple[Record, Decision]:
        if self._negative_hit("series", name):
            raise NotFound(name)
        if name not in self._aliases and name.startswith("2.25."):
            await self._ensure_series(study)
            for se in self.catalog.children("SERIES", study.uid):
                self._name(self.view(self.decide(study, se, principal)), se.uid)
        series = await self.series(study, self._original(name))
        d = self.decide(study, series, principal)
        if not self._visible(d) or self._name(self.view(d), series.uid) != name:
            await self._conceal("series", name, lambda: self._ensure_series(study))
        return series, d

    async def _instance_named(self, study: Record, series: Record, name: str, v: View) -> Record:
        stem = name[: -len(".dcm")]
        if stem not in self._aliases and stem.startswith("2.25.") and v.kind == "deidentified":
            await self._ensure_instances(study, series)
            for i in self.catalog.children("IMAGE", series.uid):
                self._name(v, i.uid)
        inst = await self.instance(study, series, self._original(stem))
        if self._name(v, inst.uid) != stem:
            raise NotFound(name)
        return inst

    # ------------------------------------------------------------------ readable names
    def readable_name(self, kind: str, rec: Record, v: View) -> str:
        """The ``/browse`` name of a study, series or instance: what its view shows of its
        date, number and description, then its (view's) UID, which is always the last
        ``_``-separated part (UIDs hold digits and dots only), so it is recoverable."""
        uid = self._name(v, rec.uid)
        if kind == "instance":
            num = rec.attrs.get("InstanceNumber", "")
            head = f"{int(num):05d}" if num.strip().lstrip("-").isdigit() else "00000"
            return f"{head}_{uid}.dcm"
        level = "STUDY" if kind == "study" else "SERIES"
        shown = v.attrs(level, rec.attrs, NON_PHI)
        if kind == "study":
            parts = [shown.get("StudyDate") or "nodate", shown.get("StudyDescription", "")]
        else:
            num = shown.get("SeriesNumber", "")
            head = f"{int(num):04d}" if num.strip().lstrip("-").isdigit() else "0000"
            parts = [head, shown.get("Modality", ""), shown.get("SeriesDescription", "")]
        words = [_readable_part(x) for x in parts]
        return "_".join([w for w in words if w] + [uid])

    @staticmethod
    def _uid_of_readable(name: str) -> str:
        if name == METADATA:
            return name
        if name.endswith(".dcm"):
            return name[:-4].rsplit("_", 1)[-1] + ".dcm"
        return name.rsplit("_", 1)[-1]

    async def _resolve_browse(self, path: tuple[str, ...]) -> Node:
        """``/browse/...``: the ``/patients`` node of the same UIDs, if every component is
        exactly the readable name the principal's view gives it."""
        names = [self._uid_of_readable(x) for x in path[2:]]
        node = await self.resolve(("patients", *path[1:2], *names))
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
            if self.readable_name(kind, rec, node.view) != given:
                raise NotFound(given)
        node.path = path
        return node

    async def resolve(self, path: tuple[str, ...]) -> Node:
        """The node at ``path`` if this principal may see it; NotFound otherwise."""
        if path and path[-1] == METADATA:
            parent = await self.resolve(path[:-1])
            return Node(kind="metadata", path=path, of=parent)
        n = len(path)
        if n == 0:
            return Node(kind="root", path=path)
        top = path[0]
        if top not in TOP:
            raise NotFound(top)
        if n == 1:
            return Node(kind="top", path=path)
        if top == "browse":
            return await self._resolve_browse(path)
        principal = self.principal
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
            patient, pview = await self._patient(rest.pop(0), site)
            if not rest:
                return Node(kind="patient", path=path, site=site, patient=patient, view=pview)
        study, d = await self._study_named(rest.pop(0), principal)
        if patient is not None and study.parent != patient.uid:
            raise NotFound(study.uid)
        if pview is not None and self.view(d).patient_name(study.parent) != path[-len(rest) - 2]:
            raise NotFound(study.uid)
        if site is not None and site not in study.sites:
            raise NotFound(study.uid)
        if not rest:
            return Node(
                kind="study",
                path=path,
                site=site,
                patient=patient,
                study=study,
                decision=d,
                view=self.view(d),
            )
        series, d = await self._series_named(study, rest.pop(0), principal)
        if site is not None and site not in series.sites:
            raise NotFound(series.uid)
        v = self.view(d)
        if not rest:
            return Node(
                kind="series",
                path=path,
                site=site,
                patient=patient,
                study=study,
                series=series,
                decision=d,
                view=v,
            )
        fname = rest.pop(0)
        if rest or not fname.endswith(".dcm"):
            raise NotFound(fname)
        inst = await self._instance_named(study, series, fname, v)
        if site is not None and site not in inst.sites:
            raise NotFound(inst.uid)
        return Node(
            kind="instance",
            path=path,
            site=site,
            patient=patient,
            study=study,
            series=series,
            instance=inst,
            decision=d,
            view=v,
        )

    def _exact_sizes(self, v: View) -> bool:
        return self.config.bridge.exact_sizes and v.kind != "metadata"

    def _file_entry(self, name: str, inst: Record, v: View) -> Entry:
        info = self.store.info(ObjectRef(inst.uid, v.store_view))
        if info is not None:
            return Entry(name=name, is_dir=False, size=info.size, exact=True, mtime=self.started)
        return Entry(name=name, is_dir=False, size=0, exact=False, mtime=self.started)

    async def lookup(self, path: tuple[str, ...]) -> Entry:
        """Attributes of ``path`` (no retrieval, unless ``bridge.exact_sizes``)."""
        node = await self.resolve(path)
        name = path[-1] if path else ""
        if node.kind == "instance":
            assert node.instance is not None and node.view is not None
            entry = self._file_entry(name, node.instance, node.view)
            if not entry.exact and self._exact_sizes(node.view):
                assert node.study is not None and node.series is not None
                await self.fetch_instance(
                    node.study, node.series, node.instance, prefer=node.site, view=node.view
                )
                entry = self._file_entry(name, node.instance, node.view)
            return entry
        if node.kind == "metadata":
            return Entry(name=name, is_dir=False, size=len(self.metadata(node)), mtime=self.started)
        return Entry(name=name, is_dir=True, mtime=self.started)

    async def listdir(self, path: tuple[str, ...]) -> list[Entry]:
        """The visible entries of the directory at ``path``."""
        if len(path) >= 2 and path[0] == "browse":
            return await self._listdir_browse(path)
        node = await self.resolve(path)
        t = self.started
        out: list[Entry] = []
        if node.kind in ("instance", "metadata"):
            raise NotFound("not a directory")
        p = self.principal if node.kind != "root" else None
        if node.kind == "root":
            out = [Entry(n, True, mtime=t) for n in TOP]
        elif node.kind == "top" and path[0] == "sites":
            out = [Entry(s.name, True, mtime=t) for s in self.config.sites]
        elif (node.kind == "top" and path[0] in ("patients", "browse")) or node.kind == "site":
            out = [Entry(n, True, mtime=t) for n, _, _ in await self._patients(node.site)]
        elif node.kind == "top":  # studies
            await self._ensure_studies()
            for s in self.catalog.children("STUDY", ROOT):
                d = self.decide(s, principal=p)
                if s.sites and self._visible(d):
                    out.append(Entry(self._name(self.view(d), s.uid), True, mtime=t))
        elif node.kind == "patient":
            assert node.patient is not None and node.view is not None
            pname = path[-1]
            for s in self._studies_of(node.patient.uid, node.site):
                d = self.decide(s, principal=p)
                if self._visible(d) and self.view(d).patient_name(s.parent) == pname:
                    out.append(Entry(self._name(self.view(d), s.uid), True, mtime=t))
        elif node.kind == "study":
            assert node.study is not None
            await self._ensure_series(node.study)
            for se in self.catalog.children("SERIES", node.study.uid):
                if not se.sites or (node.site is not None and node.site not in se.sites):
                    continue
                d = self.decide(node.study, se, p)
                if self._visible(d):
                    out.append(Entry(self._name(self.view(d), se.uid), True, mtime=t))
        elif node.kind == "series":
            assert node.study is not None and node.series is not None and node.view is not None
            await self._ensure_instances(node.study, node.series)
            v = node.view
            if self._exact_sizes(v):
                # Sizes exact in the listing too (ls -l, tar): the series, retrieved once.
                await self.fetcher.fetch_many(await self._series_targets(node.study, node.series))
            out = [
                self._file_entry(self._name(v, i.uid) + ".dcm", i, v)
                for i in self.catalog.children("IMAGE", node.series.uid)
                if i.sites and (node.site is None or node.site in i.sites)
            ]
        out.sort(key=lambda e: e.name)
        meta = await self.lookup((*path, METADATA))
        return [meta, *out]

    async def _listdir_browse(self, path: tuple[str, ...]) -> list[Entry]:
        node = await self.resolve(path)
        plain = ("patients", path[1], *(self._uid_of_readable(x) for x in path[2:]))
        entries = await self.listdir(plain)
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
                sub = await self.resolve((*plain, e.name))
            except NotFound:
                continue
            rec = {"study": sub.study, "series": sub.series, "instance": sub.instance}[kind]
            if rec is None or sub.view is None or (parent is not None and rec.parent != parent.uid):
                continue
            out.append(dataclasses.replace(e, name=self.readable_name(kind, rec, sub.view)))
        out.sort(key=lambda x: (x.name != METADATA, x.name))
        return out

    def metadata(self, node: Node) -> bytes:
        """The ``.metadata.json`` document of a directory node, as its view allows."""
        of = node.of
        assert of is not None
        doc: dict[str, Any] = {"level": of.kind.upper()}
        rec = of.instance or of.series or of.study or of.patient
        if of.kind == "root":
            doc["sites"] = [s.name for s in self.config.sites]
            doc["principal"] = self.principal.sub
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
        return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()

    async def open(self, path: tuple[str, ...]) -> OpenFile:
        """Open a file for reading; retrieves the object first if it is not cached."""
        try:
            node = await self.resolve(path)
        except (NotFound, AccessDenied) as e:
            # Audited too, with what the path names that is not PHI (a UID, never a name).
            stem = path[-1].removesuffix(".dcm") if path else ""
            res = {"sop_uid": stem} if path and path[-1].endswith(".dcm") and is_uid(stem) else {}
            with contextlib.suppress(AuditError):  # denied either way (and logged)
                self.record("open", "deny", res, reason=type(e).__name__)
            raise
        if node.kind == "metadata":
            data = self.metadata(node)
            return OpenFile(data=data, size=len(data))
        if node.kind != "instance":
            raise NotFound("not a file")
        assert node.decision and node.instance and node.series and node.study and node.view
        v = node.view
        if v.kind == "metadata":
            with contextlib.suppress(AuditError):  # denied either way (and logged)
                self._audit_open(node, "deny")
            raise AccessDenied(f"{self.principal.label()} may see but not read {node.instance.uid}")
        principal = self.principal
        # One index lookup when the object is cached (the open itself); retrieve otherwise.
        try:
            try:
                ref = ObjectRef(node.instance.uid, v.store_view)
                reader = await self._open_cached(ref, principal)
                exact_before = True
                metrics.CACHE_LOOKUPS.labels("hit").inc()
            except NotFound:
                exact_before = False
                metrics.CACHE_LOOKUPS.labels("miss").inc()
                info = await self.fetch_instance(
                    node.study, node.series, node.instance, prefer=node.site, view=v
                )
                reader = await self._open_cached(info.ref, principal)
        except MdmError as e:
            with contextlib.suppress(AuditError):  # failed either way (and logged)
                self._audit_open(node, "error", view=v.kind, reason=type(e).__name__)
            raise
        # One record per open: the decision, and the key use that serves it (fail closed:
        # no byte is served without it).
        scope = reader.info.scope
        try:
            self._audit_open(
                node,
                "allow",
                view=v.kind,
                key_site=scope.site,
                key_level=scope.level,
                cached=exact_before,
            )
        except AuditError:
            reader.close()
            raise
        study, series = node.study, node.series
        last = [time.monotonic()]

        def recheck() -> None:
            # A revoked grant or an expired token stops reads of open files too (at most
            # one check a second: decisions are cheap, but reads are many).
            now = time.monotonic()
            if now - last[0] < 1.0:
                return
            last[0] = now
            d = self.decide(study, series)
            nv = self.view(d)
            if d.level < AccessLevel.DEIDENTIFIED or (nv.kind, nv.store_view) != (
                v.kind,
                v.store_view,
            ):
                raise AccessDenied("access revoked")

        return OpenFile(reader=reader, size=reader.size, exact_before=exact_before, recheck=recheck)

    async def _open_cached(self, ref: ObjectRef, principal: Principal) -> ObjectReader:
        """Open a cached object (NotFound if it is not cached)."""
        if self.store.keys.remote:
            # Key servers answer over the network: keep the trio thread free meanwhile.
            return await trio.to_thread.run_sync(self.store.open, ref, principal)
        # A local unwrap is one AES-GCM on a 32-byte key and an LMDB read (tens of µs); a
        # thread hand-off would cost more than that and delay the reader's open.
        return self.store.open(ref, principal)

    def _audit_open(self, node: Node, decision: str, **extra: Any) -> None:
        assert node.instance and node.series and node.study and node.decision
        d = node.decision
        self.record(
            "open",
            decision,
            {
                "study_uid": node.study.uid,
                "series_uid": node.series.uid,
                "sop_uid": node.instance.uid,
            },
            rule=d.rule,
            policy=getattr(d, "version", ""),
            level=d.level.label,
            **extra,
        )

    def _target(
        self,
        study: Record,
        series: Record,
        inst: Record,
        prefer: str | None,
        view: View | None = None,
    ) -> Target:
        sites = sorted(inst.sites, key=lambda s: (s != prefer, -inst.sites[s], s))
        deid = view is not None and view.kind == "deidentified"
        return Target(
            sop_uid=inst.uid,
            study_uid=study.uid,
            series_uid=series.uid,
            sop_class_uid=inst.attrs.get("SOPClassUID", ""),
            sites=tuple(sites),
            view=view.store_view if view is not None else "identified",
            program=view.scope if deid and view is not None else "",
            deid=view.deid_spec() if deid and view is not None else None,
            resource=dataclasses.replace(self.resource(study, series), sop_uid=inst.uid),
        )

    async def fetch_instance(
        self,
        study: Record,
        series: Record,
        inst: Record,
        prefer: str | None = None,
        view: View | None = None,
    ) -> ObjectInfo:
        """The cached object of ``inst`` in ``view``, retrieved (with its series prefetched)
        if needed. A de-identified view's objects are de-identified as they arrive, so its
        readers never need (nor unwrap) the key of an identified original."""
        target = self._target(study, series, inst, prefer, view)
        info = self.store.info(ObjectRef(inst.uid, target.view))
        if info is not None:
            return info
        if self.config.bridge.prefetch and self._wants_series(series.uid, target.view, inst.uid):
            # List the series (if needed) and fetch the rest of it in the background, while
            # this object is retrieved on its own: the first byte does not wait for either.
            self.fetcher.nursery.start_soon(
                self._prefetch_series, study, series, inst.uid, prefer, view
            )
        # The retrieval has its own per-site deadlines; this bound covers fail-over over all
        # sites so a reader is never stuck.
        known = {x.name for x in self.config.sites}
        limit = sum(self.config.site(s).timeout for s in target.sites if s in known) * 2 + 10
        with trio.move_on_after(limit) as scope:
            return await self.fetcher.fetch(target)
        assert scope.cancelled_caught
        raise RetrieveTimeout(f"object {inst.uid}: no site delivered it within {limit:.0f}s")

    def _wants_series(self, series_uid: str, view: str, sop_uid: str) -> bool:
        """Whether a cold open signals a reader of the whole series: the second distinct
        object of a series opened cold (within PREFETCH_WINDOW seconds). One header scan
        (``dcmread(stop_before_pixels=True)`` of each series' first file) fetches one object
        per series, not every series whole."""
        now = time.monotonic()
        key = (series_uid, view)
        seen = self._cold_opens.get(key)
        if seen is None or now - seen[0] > PREFETCH_WINDOW:
            seen = (now, set())
            self._cold_opens[key] = seen
            if len(self._cold_opens) > 1000:
                self._cold_opens.popitem(last=False)
        seen[1].add(sop_uid)
        return len(seen[1]) == 2

    async def _prefetch_series(
        self,
        study: Record,
        series: Record,
        first: str,
        prefer: str | None,
        view: View | None = None,
    ) -> None:
        try:
            await self._ensure_instances(study, series)
            # The object being read first: its first byte matters more than the series'.
            store_view = view.store_view if view else "identified"
            with trio.move_on_after(5):
                await self.fetcher.wait(first, store_view)
            rest = [
                self._target(study, series, i, prefer, view)
                for i in self.catalog.children("IMAGE", series.uid)
                if i.uid != first and i.sites
            ]
            # A series the cache cannot hold comfortably is not prefetched: its objects would
            # evict each other (LRU) before the reader gets to them, and be fetched again.
            # Within half the cap, what a prefetch evicts is older than the series.
            one = self.store.info(ObjectRef(first, store_view))
            need = (one.stored_bytes if one is not None else 0) * len(rest)
            if one is not None and need > self.store.max_bytes // 2:
                log.info(
                    "prefetch of series %s skipped: about %d bytes for %d object(s), "
                    "cache.max_bytes is %d",
                    series.uid,
                    need,
                    len(rest),
                    self.store.max_bytes,
                )
                return
            self.fetcher.prefetch(rest)
        except MdmError as e:
            log.info("prefetch of series %s not started: %s", series.uid, e)

    async def targets_for(self, uid: str) -> list[Target]:
        """What to retrieve for a study, series or instance UID the principal may see
        (NotFound for a hidden UID as for a missing one)."""
        study: Record | None
        try:
            study = await self.study(uid)
        except NotFound:
            study = None
        if study is not None:
            d = self.decide(study)
            if not self._visible(d):
                raise NotFound(uid)
            await self._ensure_series(study)
            out: list[Target] = []
            for se in self.catalog.children("SERIES", study.uid):
                if se.sites:
                    out += await self._series_targets(study, se)
            return out
        # A series or an instance: find it by a targeted query at any site.
        for level, key in (("SERIES", "SeriesInstanceUID"), ("IMAGE", "SOPInstanceUID")):
            keys = SERIES_KEYS if level == "SERIES" else IMAGE_KEYS
            for site, dss in await self._find(level, query_dataset(level, keys, **{key: uid})):
                for ds in dss or []:
                    st_uid = str(ds.get("StudyInstanceUID", ""))
                    if not st_uid:
                        continue
                    st = await self.study(st_uid)
                    if not self._visible(self.decide(st)):
                        raise NotFound(uid)
                    if level == "SERIES":
                        se = await self.series(st, uid)
                        return await self._series_targets(st, se)
                    se = await self.series(st, str(ds.get("SeriesInstanceUID", "")))
                    inst = await self.instance(st, se, uid)
                    return [self._target(st, se, inst, site, self._readable_view(st, se))]
        raise NotFound(uid)

    async def series_targets(self, study: Record, series: Record) -> list[Target]:
        """What retrieving a whole series means in the principal's view (AccessDenied at
        the metadata level): one target per listed instance."""
        return await self._series_targets(study, series)

    def _readable_view(self, study: Record, series: Record) -> View:
        """The view ``fetch`` caches a series in: the principal's own (never identified
        copies for a de-identified principal); metadata-only access caches nothing."""
        v = self.view(self.decide(study, series))
        if v.kind == "metadata":
            raise AccessDenied(f"{self.principal.label()} may not read series {series.uid}")
        return v

    async def _series_targets(self, study: Record, series: Record) -> list[Target]:
        await self._ensure_instances(study, series)
        v = self._readable_view(study, series)
        members = [i for i in self.catalog.children("IMAGE", series.uid) if i.sites]
        # The whole series as listed: a single SERIES-level request can fetch it.
        return [
            dataclasses.replace(self._target(study, series, i, None, v), series_size=len(members))
            for i in members
        ]


@asynccontextmanager
async def open_bridge(
    config: Config,
    session: Session,
    *,
    keys: KeyProvider | None = None,
    get_if_port_busy: bool = False,
) -> AsyncIterator[Bridge]:
    """Start the store, the storage SCP and the fetcher; yield a :class:`Bridge`; stop them.

    ``get_if_port_busy``: if the storage SCP's port is taken (a mount of the same
    configuration is running), go on without a listener and retrieve everything by C-GET,
    which needs none (``mdm fetch`` beside a running mount).
    """
    if keys is None:
        from mdm.keyservice.client import provider_for

        keys = provider_for(config.keys, session.token_file) or LocalKeyring.load(
            config.keys.keyring, create=True
        )
    env = open_env(config.cache.dir)
    try:
        store = ObjectStore(
            config.cache.dir, env, keys, config.cache.max_bytes, config.cache.chunk_size
        )
        report = store.recover()
        log.info("cache recovered: %s", report)
        if getattr(keys, "remote", False):
            # Shared nodes: no key that opens the catalog outlives this process.
            catalog = Catalog.private(config.cache.dir, config.cache.catalog_ttl)
        else:
            catalog = Catalog(env, keys.secret("catalog"), config.cache.catalog_ttl)
        scp: StorageSCP
        allowed = {s.ae_title for s in config.sites}
        if config.bridge.receiver == "process":
            scp = ProcessStorageSCP(
                config.bridge,
                allowed,
                StoreParams(
                    config.cache.dir,
                    config.keys.keyring,
                    config.cache.max_bytes,
                    config.cache.chunk_size,
                    config.keys,
                    session.token_file,
                ),
                log_level=logging.getLogger().getEffectiveLevel(),
            )
        else:
            scp = StorageSCP(config.bridge, allowed)
        try:
            scp.start()
        except OSError as e:
            if not (get_if_port_busy and e.errno == errno.EADDRINUSE):
                raise UserError(
                    f"{config.path}: bridge.port: cannot listen on "
                    f"{config.bridge.host}:{config.bridge.port}: {e.strerror} "
                    "(is a mount or fetch with this configuration already running?)"
                ) from None
            log.info(
                "%s:%d is in use (a mount of this configuration is running?): retrieving by "
                "C-GET, which needs no listener",
                config.bridge.host,
                config.bridge.port,
            )
            config = dataclasses.replace(
                config,
                sites=tuple(dataclasses.replace(s, retrieve="get") for s in config.sites),
            )
            scp = StorageSCP(config.bridge, allowed)  # routes our C-GETs' objects; no listener
        retriever = Retriever(config.bridge, scp)
        try:
            async with trio.open_nursery() as nursery:
                fetcher = Fetcher(config, store, retriever, nursery)
                bridge = Bridge(
                    config, session, catalog=catalog, store=store, fetcher=fetcher, keys=keys
                )
                fetcher.audit = bridge.record
                for site in config.sites:
                    if not site.dicomweb:  # no association to open ahead of time
                        nursery.start_soon(_warm, fetcher, retriever, site)
                nursery.start_soon(_flush_access_times, store)
                refresh = getattr(session.resolver, "refresh", None)
                if refresh is not None:
                    nursery.start_soon(_refresh_policy, refresh)
                yield bridge
                nursery.cancel_scope.cancel()
            await trio.to_thread.run_sync(fetcher.close)
        finally:
            await trio.to_thread.run_sync(retriever.close)
            await trio.to_thread.run_sync(scp.stop)
            store.close()
            catalog.close()
    finally:
        env.close()


def _readable_part(text: str) -> str:
    """A description as a name part: letters, digits, '-' and '.', spaces as '-', no '_'
    (it separates the parts), bounded."""
    out = "".join(c if c.isalnum() or c in "-." else "-" for c in text.strip())
    while "--" in out:
        out = out.replace("--", "-")
    return safe_name(out.strip("-.")[:READABLE_DESC]) if out.strip("-.") else ""


async def _none() -> None:
    return None


async def _warm(fetcher: Fetcher, retriever: Retriever, site: SiteSettings) -> None:
    """Open an association with each site in the background at start."""
    await trio.to_thread.run_sync(retriever.warm, site, limiter=fetcher.limiter(site.name))


async def _flush_access_times(store: ObjectStore) -> None:
    """Move the cache's access times (LRU order) to the index every few seconds, in a worker
    thread: a write transaction over a few hundred records takes milliseconds, which the
    thread serving the filesystem should not spend."""
    while True:
        await trio.sleep(ACCESS_FLUSH_SECONDS)
        try:
            await trio.to_thread.run_sync(store.flush_access_times)
        except Exception:
            log.exception("writing access times to the cache index failed")


async def _refresh_policy(refresh: Callable[[], object]) -> None:
    """Reload an edited policy off the FUSE thread, so decisions never wait for file I/O."""
    while True:
        await trio.sleep(1.0)
        try:
            await trio.to_thread.run_sync(refresh)
        except Exception:
            log.exception("policy reload check failed")


__all__ = ["Bridge", "Entry", "MdmError", "Node", "OpenFile", "open_bridge"]
