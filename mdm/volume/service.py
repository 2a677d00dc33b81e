"""NIfTI views: ``<series>.nii.gz`` and its ``<series>.json`` sidecar beside each series
directory that forms a volume (docs/SEMANTICS.md, "Volumes"; developer note docs/VOLUMES.md).

:class:`Volumes` answers, for a series in a principal's view: whether its volume files are
listed (:meth:`Volumes.reason`, from the catalog and a stored verdict, never a retrieval),
their attributes, the ``"volume"`` part of the series' ``.metadata.json``, and opens them. An
open of a volume not cached in the view retrieves the series through the ordinary retrieval
path (:meth:`~mdm.retrieval.targets.Targets.series_targets` then
:meth:`~mdm.retrieval.fetcher.Fetcher.fetch_many`), reads its instances back through the
store's decrypting readers, builds the volume in memory (:mod:`mdm.volume.build`, in a worker
thread) and stores it encrypted as objects of its own in the same view:

=========  =============================================================
kind       object
=========  =============================================================
volume     the ``.nii.gz``
sidecar    the BIDS ``.json``
verdict    an empty object whose index ``meta`` says why there is no volume
=========  =============================================================

each under :func:`derived_uid` (a ``2.25.`` UID from the kind, the series UID, the store view
and :data:`~mdm.volume.build.BUILDER_VERSION`). One build per series and view at a time,
however many readers wait for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pydicom
import trio
from prometheus_client import Counter

from mdm.access.gate import Gate, Who, audit_principal
from mdm.access.identity import Principal
from mdm.access.views import View
from mdm.audit.log import AuditError
from mdm.catalog.records import Record
from mdm.catalog.sync import CatalogSync
from mdm.config import Config
from mdm.errors import AccessDenied, NotFound
from mdm.namespace.naming import METADATA, Names
from mdm.namespace.opening import open_audited, revocation_check
from mdm.ops import metrics
from mdm.retrieval.targets import Targets
from mdm.store.keys import Scope
from mdm.store.objects import ObjectReader, ObjectStore
from mdm.store.records import ObjectRef
from mdm.volume.build import BUILDER_VERSION, NotAVolume, build_volume, catalog_reason

if TYPE_CHECKING:
    from mdm.namespace.tree import Entry, Node

log = logging.getLogger(__name__)

SUFFIXES = {"volume": ".nii.gz", "sidecar": ".json"}
"""Node kind -> file name suffix of the files beside a series directory."""

VOLUME_BUILDS = Counter(
    "mdm_volume_builds",
    "NIfTI volumes built from cached instances (built) or found not to form one (unavailable).",
    ["result"],
    registry=metrics.REGISTRY,
)


def split_name(name: str) -> tuple[str, str] | None:
    """``(series name, kind)`` if ``name`` names a volume file, else None."""
    if name == METADATA:
        return None
    for kind, suffix in SUFFIXES.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], kind
    return None


def derived_uid(kind: str, series_uid: str, store_view: str) -> str:
    """The stable UID of a series' volume object of ``kind`` in ``store_view``: ``2.25.`` and
    the integer of the first 16 bytes of SHA-256 over a label, the builder version, the view
    and the series UID (a UID no PACS issues; a new builder gives new objects)."""
    label = f"mdm-volume-v{BUILDER_VERSION}\0{kind}\0{store_view}\0{series_uid}"
    return "2.25." + str(int.from_bytes(hashlib.sha256(label.encode()).digest()[:16], "big"))


class Volumes:
    """Volume files of series, per principal and view (module docstring)."""

    def __init__(
        self,
        config: Config,
        sync: CatalogSync,
        gate: Gate,
        names: Names,
        store: ObjectStore,
        targets: Targets,
    ) -> None:
        self.config = config
        self.sync = sync
        self.gate = gate
        self.names = names
        self.store = store
        self.targets = targets
        self._building: dict[tuple[str, str], trio.Event] = {}

    # ------------------------------------------------------------------ listing
    def ref(self, kind: str, series_uid: str, v: View) -> ObjectRef:
        """The store reference of a series' volume object of ``kind`` in view ``v``."""
        return ObjectRef(derived_uid(kind, series_uid, v.store_view), v.store_view)

    def reason(self, series: Record, v: View) -> str | None:
        """Why ``series`` shows no volume files in view ``v`` (None: they are listed). From
        the catalog (modality, instance count, SOP classes of listed instances) and from a
        verdict stored by an earlier build; never a retrieval."""
        classes = [
            i.attrs.get("SOPClassUID", "")
            for i in self.sync.children("IMAGE", series.uid)
            if i.sites
        ]
        why = catalog_reason(series.attrs, classes)
        if why is not None:
            return why
        verdict = self.store.info(self.ref("verdict", series.uid, v))
        if verdict is not None:
            return verdict.meta.get("reason", "not a volume")
        return None

    def entries(self, series: Record, v: View, name: str, mtime: float) -> list[Entry]:
        """The volume files listed beside series directory ``name`` (none if no volume)."""
        if self.reason(series, v) is not None:
            return []
        return [self._entry(kind, name + sfx, series, v, mtime) for kind, sfx in SUFFIXES.items()]

    def _entry(self, kind: str, name: str, series: Record, v: View, mtime: float) -> Entry:
        from mdm.namespace.tree import Entry

        info = self.store.info(self.ref(kind, series.uid, v))
        if info is not None:
            return Entry(name=name, is_dir=False, size=info.size, exact=True, mtime=mtime)
        # Unknown until built: 0 with direct I/O, as for an uncached instance.
        return Entry(name=name, is_dir=False, size=0, exact=False, mtime=mtime)

    def check(self, node: Node) -> None:
        """NotFound unless the volume file ``node`` names is listed in its view."""
        assert node.series is not None and node.view is not None
        why = self.reason(node.series, node.view)
        if why is not None:
            raise NotFound(f"series {node.series.uid} has no volume: {why}")

    async def entry(self, who: Who, node: Node, name: str, mtime: float) -> Entry:
        """Attributes of a volume file (no build, unless ``bridge.exact_sizes``)."""
        assert node.series is not None and node.study is not None and node.view is not None
        e = self._entry(node.kind, name, node.series, node.view, mtime)
        if not e.exact and self.config.bridge.exact_sizes and node.view.kind != "metadata":
            await self._ensure(who(), node.study, node.series, node.view)
            self.check(node)
            e = self._entry(node.kind, name, node.series, node.view, mtime)
        return e

    def status(self, series: Record, v: View) -> dict[str, Any]:
        """The ``"volume"`` member of a series' ``.metadata.json``."""
        why = self.reason(series, v)
        if why is not None:
            return {"available": False, "reason": why}
        built = self.store.info(self.ref("volume", series.uid, v)) is not None
        return {"available": True, "built": built}

    # ------------------------------------------------------------------ open
    async def open(self, who: Who, node: Node) -> tuple[ObjectReader, bool, Callable[[], None]]:
        """Open a volume file for reading as ``who``: ``(reader, cached before, recheck)``.
        Builds the volume first if it is not cached in the view. Audited like an instance
        open (allow, deny or error)."""
        assert node.study and node.series and node.view and node.decision
        v = node.view
        if v.kind == "metadata":
            with contextlib.suppress(AuditError):  # denied either way (and logged)
                self._audit(audit_principal(who), node, "deny")
            raise AccessDenied(f"{who().label()} may see but not read series {node.series.uid}")
        principal = who()
        ref = self.ref(node.kind, node.series.uid, v)
        study, series = node.study, node.series

        async def get() -> tuple[ObjectReader, bool]:
            try:
                reader = await trio.to_thread.run_sync(self.store.open, ref, principal)
                metrics.CACHE_LOOKUPS.labels("hit").inc()
                return reader, True
            except NotFound:
                metrics.CACHE_LOOKUPS.labels("miss").inc()
                await self._ensure(principal, study, series, v)
                self.check(node)
                return await trio.to_thread.run_sync(self.store.open, ref, principal), False

        reader, cached = await open_audited(
            get, lambda d, **kw: self._audit(principal, node, d, **kw), v
        )
        # As for instances: revocation reaches open volume files.
        recheck = revocation_check(self.gate, self.names, who, study, series, v)
        return reader, cached, recheck

    def _audit(self, principal: Principal, node: Node, decision: str, **extra: Any) -> None:
        assert node.study and node.series and node.decision and node.view
        d = node.decision
        self.gate.record(
            principal,
            "open",
            decision,
            {
                "study_uid": node.study.uid,
                "series_uid": node.series.uid,
                "volume_uid": derived_uid(node.kind, node.series.uid, node.view.store_view),
                "kind": node.kind,
            },
            rule=d.rule,
            policy=d.version,
            level=d.level.label,
            **extra,
        )

    # ------------------------------------------------------------------ build
    async def _ensure(self, principal: Principal, study: Record, series: Record, v: View) -> None:
        """Build the volume of ``series`` in ``v`` unless it (or its verdict) is stored; one
        build per series and view at a time."""
        key = (series.uid, v.store_view)
        while (ev := self._building.get(key)) is not None:
            await ev.wait()
        if self._done(series, v):
            return
        ev = self._building[key] = trio.Event()
        try:
            targets = await self.targets.series_targets(principal, study, series)
            await self.targets.fetcher.fetch_many(targets)
            refs = [ObjectRef(t.sop_uid, t.view) for t in targets]
            resource = self.gate.resource(study, series)
            await trio.to_thread.run_sync(self._build, principal, series, v, refs, resource)
        finally:
            del self._building[key]
            ev.set()

    def _done(self, series: Record, v: View) -> bool:
        info = self.store.info
        if info(self.ref("verdict", series.uid, v)) is not None:
            return True
        return all(info(self.ref(k, series.uid, v)) is not None for k in SUFFIXES)

    def _build(
        self,
        principal: Principal,
        series: Record,
        v: View,
        refs: list[ObjectRef],
        resource: Any,
    ) -> None:
        """In a worker thread: decrypt the instances into memory, build, store encrypted."""
        t0 = time.monotonic()
        datasets = []
        scope: Scope | None = None
        for ref in refs:
            with self.store.open(ref, principal) as reader:
                scope = scope or reader.info.scope
                data = reader.read(0, reader.size)
            datasets.append(pydicom.dcmread(io.BytesIO(data)))
            del data
        if scope is None:
            raise NotFound(f"series {series.uid} has no instances")
        meta = {"series_uid": series.uid, "builder": str(BUILDER_VERSION)}
        try:
            vol = build_volume(datasets)
        except NotAVolume as e:
            VOLUME_BUILDS.labels("unavailable").inc()
            log.info("series %s (%s view) forms no volume: %s", series.uid, v.kind, e.reason)
            ref = self.ref("verdict", series.uid, v)
            self.store.put(ref, scope, b"", {**meta, "reason": e.reason})
            return
        del datasets
        for kind, data in (("sidecar", vol.sidecar), ("volume", vol.nifti)):
            ref = self.ref(kind, series.uid, v)
            self.store.put(
                ref,
                scope,
                data,
                {**meta, "kind": kind},
                resource=dataclasses.replace(resource, sop_uid=ref.sop_uid),
            )
        VOLUME_BUILDS.labels("built").inc()
        log.info(
            "series %s (%s view): volume %s built from %d instances in %.2fs",
            series.uid,
            v.kind,
            "x".join(map(str, vol.shape)),
            len(refs),
            time.monotonic() - t0,
        )
