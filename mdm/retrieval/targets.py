"""Retrieval targets: what to retrieve for an object a principal may read, and prefetch.

:class:`Targets` turns catalog records and a view into :class:`~mdm.retrieval.fetcher.Target`
values (which sites hold the object, in which store view it is wanted, how to de-identify it)
and hands them to the :class:`~mdm.retrieval.fetcher.Fetcher` (single-flight per object and
view, fail-over, per-site limits). It decides when a reader wants a whole series: the second
distinct object of a series opened cold within ``PREFETCH_WINDOW`` seconds starts the
background prefetch of the rest, unless the series would take more than half the cache.

``targets_for`` serves ``mdm fetch`` (and a gateway's retrieve): a study, series or instance
UID, for the principal named in the call, NotFound for what it may not see.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict

import trio

from mdm.access.gate import Gate
from mdm.access.identity import Principal
from mdm.access.views import View
from mdm.catalog.attrs import IMAGE_KEYS, SERIES_KEYS, query_dataset
from mdm.catalog.records import Record
from mdm.catalog.sync import CatalogSync
from mdm.config import Config
from mdm.errors import AccessDenied, MdmError, NotFound, RetrieveTimeout
from mdm.namespace.naming import Names
from mdm.retrieval.fetcher import Fetcher, Target
from mdm.store.objects import ObjectStore
from mdm.store.records import ObjectInfo, ObjectRef

log = logging.getLogger(__name__)

PREFETCH_WINDOW = 60.0
"""A second object of a series opened cold within this many seconds starts its prefetch."""
COLD_OPENS_MAX = 1000


class Targets:
    """Retrieval targets, cold-open retrievals and series prefetch (module docstring)."""

    def __init__(
        self,
        config: Config,
        sync: CatalogSync,
        gate: Gate,
        names: Names,
        store: ObjectStore,
        fetcher: Fetcher,
    ) -> None:
        self.config = config
        self.sync = sync
        self.gate = gate
        self.names = names
        self.store = store
        self.fetcher = fetcher
        # (series, store view) -> (first cold open, objects opened cold): the prefetch signal.
        self._cold_opens: OrderedDict[tuple[str, str], tuple[float, set[str]]] = OrderedDict()

    def target(
        self,
        study: Record,
        series: Record,
        inst: Record,
        prefer: str | None,
        view: View | None = None,
    ) -> Target:
        """The retrieval of ``inst`` in ``view`` (identified if None), ``prefer`` site first."""
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
            resource=dataclasses.replace(self.gate.resource(study, series), sop_uid=inst.uid),
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
        readers never need (nor unwrap) the key of an identified original. The caller has
        decided that the principal may read ``inst`` in ``view``."""
        target = self.target(study, series, inst, prefer, view)
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
            if len(self._cold_opens) > COLD_OPENS_MAX:
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
            await self.sync.ensure_instances(study, series)
            # The object being read first: its first byte matters more than the series'.
            store_view = view.store_view if view else "identified"
            with trio.move_on_after(5):
                await self.fetcher.wait(first, store_view)
            members = [i for i in self.sync.children("IMAGE", series.uid) if i.sites]
            # With the series' size, a DICOMweb site is asked for the series in one
            # request rather than one request per object (mdm.dicomweb.wado.per_instance).
            rest = [
                dataclasses.replace(
                    self.target(study, series, i, prefer, view), series_size=len(members)
                )
                for i in members
                if i.uid != first
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

    async def targets_for(self, principal: Principal, uid: str) -> list[Target]:
        """What to retrieve for a study, series or instance UID ``principal`` may see
        (NotFound for a hidden UID as for a missing one; AccessDenied for metadata-only)."""
        study: Record | None
        try:
            study = await self.sync.study(uid)
        except NotFound:
            study = None
        if study is not None:
            if not self.gate.visible(self.gate.decide(principal, study)):
                raise NotFound(uid)
            await self.sync.ensure_series(study)
            out: list[Target] = []
            for se in self.sync.children("SERIES", study.uid):
                if se.sites:
                    out += await self.series_targets(principal, study, se)
            return out
        # A series or an instance: find it by a targeted query at any site.
        for level, key in (("SERIES", "SeriesInstanceUID"), ("IMAGE", "SOPInstanceUID")):
            keys = SERIES_KEYS if level == "SERIES" else IMAGE_KEYS
            for site, dss in await self.sync.find(level, query_dataset(level, keys, **{key: uid})):
                for ds in dss or []:
                    st_uid = str(ds.get("StudyInstanceUID", ""))
                    if not st_uid:
                        continue
                    st = await self.sync.study(st_uid)
                    if not self.gate.visible(self.gate.decide(principal, st)):
                        raise NotFound(uid)
                    if level == "SERIES":
                        se = await self.sync.series(st, uid)
                        return await self.series_targets(principal, st, se)
                    se = await self.sync.series(st, str(ds.get("SeriesInstanceUID", "")))
                    inst = await self.sync.instance(st, se, uid)
                    view = self.readable_view(principal, st, se)
                    return [self.target(st, se, inst, site, view)]
        raise NotFound(uid)

    def readable_view(self, principal: Principal, study: Record, series: Record) -> View:
        """The view ``principal`` reads a series in (never identified copies for a
        de-identified principal); metadata-only access is AccessDenied (caches nothing)."""
        v = self.names.view(self.gate.decide(principal, study, series))
        if v.kind == "metadata":
            raise AccessDenied(f"{principal.label()} may not read series {series.uid}")
        return v

    async def series_targets(
        self, principal: Principal, study: Record, series: Record
    ) -> list[Target]:
        """Every listed instance of ``series``, in ``principal``'s view: one SERIES-level
        request can fetch them all."""
        await self.sync.ensure_instances(study, series)
        v = self.readable_view(principal, study, series)
        members = [i for i in self.sync.children("IMAGE", series.uid) if i.sites]
        return [
            dataclasses.replace(self.target(study, series, i, None, v), series_size=len(members))
            for i in members
        ]

    async def fetch_series(self, principal: Principal, study: Record, series: Record) -> None:
        """Retrieve every object of ``series`` not cached yet in ``principal``'s view."""
        await self.fetcher.fetch_many(await self.series_targets(principal, study, series))
