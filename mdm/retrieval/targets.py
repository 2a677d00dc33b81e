"""Retrieval targets: what to retrieve for an object a principal may read, and prefetch.

:class:`Targets` turns catalog records and a view into :class:`~mdm.retrieval.fetcher.Target`
values (which sites hold the object, in which store view it is wanted, how to de-identify it)
and hands them to the :class:`~mdm.retrieval.fetcher.Fetcher` (single-flight per object and
view, fail-over, per-site limits). It decides when a reader wants a whole series: the second
distinct object of a series opened cold within ``PREFETCH_WINDOW`` seconds starts the
background prefetch of the rest.

A series that would take more than half the cache is not prefetched whole (its objects would
evict each other before the reader gets to them): it is read ahead instead, in a window of
``max_bytes / 4`` that moves with a reader going through it in order (a training job streaming
a series far larger than the cache). A reader is in order when each object it opens follows
the one before, at most ``READ_AHEAD_SKIP`` files on, in the order of either listing
(``studies/``: by file name; ``browse/``: by InstanceNumber), forwards or backwards; once it
has passed the middle of what was asked for, the next half window is asked for, in one
retrieval. A reader starting over (a job's next epoch) starts a new window; a reader jumping
about asks for nothing ahead.

``targets_for`` serves ``mdm fetch`` (and a gateway's retrieve): a study, series or instance
UID, for the principal named in the call, NotFound for what it may not see.
"""

from __future__ import annotations

import dataclasses
import itertools
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
from mdm.namespace.naming import Names, instance_number_head
from mdm.retrieval.fetcher import Fetcher, Target
from mdm.store.objects import ObjectStore
from mdm.store.records import ObjectInfo, ObjectRef

log = logging.getLogger(__name__)

PREFETCH_WINDOW = 60.0
"""A second object of a series opened cold within this many seconds starts its prefetch."""
COLD_OPENS_MAX = 1000
READ_AHEAD_SHARE = 4
"""A read-ahead window holds at most ``max_bytes / READ_AHEAD_SHARE`` (module docstring)."""
READ_AHEAD_MAX = 1024
"""... and at most this many objects."""
READ_AHEAD_SKIP = 2
"""An open at most this many files after the previous one (in a listing's order) is in order."""
READ_AHEADS_MAX = 8
"""Read-ahead windows remembered (the series read most recently; about 200 bytes per
object of the series each)."""
SIZE_PROBES = 64
"""Objects of a series looked up in the cache for its size (:meth:`Targets.warm_series`)."""


@dataclasses.dataclass
class _ReadAhead:
    """The read-ahead window of one series in one store view (module docstring)."""

    study: Record
    series: Record
    prefer: str | None
    view: View | None
    orders: tuple[list[Record], ...]
    """The series' objects in each listing's order."""
    positions: tuple[dict[str, int], ...]
    size: int
    """Objects in a window."""
    last: str
    """The object opened last."""
    ahead: dict[tuple[int, int], int] = dataclasses.field(default_factory=dict)
    """Per (order, direction): how far, counted in that direction, was asked for."""
    way: tuple[int, int] = (-1, 0)
    """The (order, direction) the reader followed last ((-1, 0): none yet)."""


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
        # (series, store view) -> (first cold open, objects opened cold in order): the
        # prefetch signal.
        self._cold_opens: OrderedDict[tuple[str, str], tuple[float, dict[str, None]]] = (
            OrderedDict()
        )
        # (series, store view) -> its read-ahead window, for series too large to prefetch.
        self._read_aheads: OrderedDict[tuple[str, str], _ReadAhead] = OrderedDict()

    def opened(self, series_uid: str, store_view: str, sop_uid: str) -> None:
        """A reader opened ``sop_uid`` (cached or not): move its series' read-ahead window
        if it has one and the reader goes through it in order. Called on every open: one
        dictionary test when no series is read ahead."""
        if not self._read_aheads:
            return
        w = self._read_aheads.get((series_uid, store_view))
        if w is not None:
            self._advance(w, sop_uid)

    def _advance(self, w: _ReadAhead, sop_uid: str) -> None:
        last, w.last = w.last, sop_uid
        # (order, direction, position counted in that direction) of each way it is in order
        in_order = []
        for n, pos in enumerate(w.positions):
            i, j = pos.get(sop_uid), pos.get(last)
            if i is None or j is None:
                continue
            if 0 < i - j <= READ_AHEAD_SKIP:
                in_order.append((n, 1, i))
            elif 0 < j - i <= READ_AHEAD_SKIP:  # backwards: from the other end
                in_order.append((n, -1, len(w.orders[n]) - 1 - i))
        if len(in_order) > 1:
            # In order several ways: the one the reader followed so far, else wait and see.
            in_order = [x for x in in_order if x[:2] == w.way]
        if len(in_order) != 1:
            return
        n, d, i = in_order[0]
        w.way = (n, d)
        order = w.orders[n]
        done = w.ahead.get(w.way, 0)
        if done - i > w.size:
            done = 0  # far behind what was asked for: a new pass (the next epoch of a job)
        if i + w.size // 2 < done:
            return  # still well inside what was asked for
        start, end = max(done, i + 1), min(len(order), i + 1 + w.size)
        w.ahead[w.way] = end
        if start < end:
            last_index = len(order) - 1
            wanted = [
                self.target(
                    w.study, w.series, order[k if d > 0 else last_index - k], w.prefer, w.view
                )
                for k in range(start, end)
            ]
            asked = self.fetcher.prefetch(wanted)
            log.debug(
                "read-ahead of series %s: %d object(s) asked for, %d already there",
                w.series.uid,
                asked,
                len(wanted) - asked,
            )

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
            seen = (now, {})
            self._cold_opens[key] = seen
            if len(self._cold_opens) > COLD_OPENS_MAX:
                self._cold_opens.popitem(last=False)
        seen[1][sop_uid] = None
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
            # Within half the cap, what a prefetch evicts is older than the series. Beyond,
            # a reader going through it in order is read ahead (module docstring).
            one = self.store.info(ObjectRef(first, store_view))
            need = (one.stored_bytes if one is not None else 0) * len(rest)
            if one is None or need > self.store.max_bytes // 2:
                size = min(
                    READ_AHEAD_MAX,
                    len(rest),
                    self.store.max_bytes // READ_AHEAD_SHARE // max(one.stored_bytes, 1)
                    if one is not None
                    else 16,  # its size unknown yet (the first object is slow): a few
                )
                if size < 2:
                    log.info(
                        "prefetch of series %s skipped: about %d bytes for %d object(s), "
                        "cache.max_bytes is %d",
                        series.uid,
                        need,
                        len(rest),
                        self.store.max_bytes,
                    )
                    return
                self._start_read_ahead(study, series, members, first, prefer, view, size)
                return
            self.fetcher.prefetch(rest)
        except MdmError as e:
            log.info("prefetch of series %s not started: %s", series.uid, e)

    def _start_read_ahead(
        self,
        study: Record,
        series: Record,
        members: list[Record],
        first: str,
        prefer: str | None,
        view: View | None,
        size: int,
    ) -> None:
        v = view or View("identified")
        names = {r.uid: v.uid_name(r.uid) for r in members}  # (a keyed hash each, when remapped)
        by_name = sorted(members, key=lambda r: names[r.uid])
        by_number = sorted(members, key=lambda r: (instance_number_head(r), names[r.uid]))
        # Either listing's order, forwards or backwards (_advance: slices read from the end).
        orders = (by_name, by_number)
        key = (series.uid, v.store_view)
        # The cold open before ``first`` (the reader may have opened more since).
        opened = list(self._cold_opens.get(key, (0.0, {}))[1])
        at = opened.index(first) if first in opened else 0
        w = _ReadAhead(
            study,
            series,
            prefer,
            view,
            orders,
            tuple({r.uid: n for n, r in enumerate(o)} for o in orders),
            size,
            last=opened[at - 1] if at > 0 else first,
        )
        self._read_aheads[key] = w
        self._read_aheads.move_to_end(key)
        if len(self._read_aheads) > READ_AHEADS_MAX:
            self._read_aheads.popitem(last=False)
        log.info(
            "series %s is read ahead, %d object(s) at a time: %d object(s) would not fit in "
            "half of cache.max_bytes (%d)",
            series.uid,
            size,
            len(members),
            self.store.max_bytes,
        )
        # The two cold opens that started it: the second follows the first in order or not.
        self._advance(w, first)

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

    async def warm_series(self, targets: list[Target]) -> None:
        """Start retrieving the whole series of ``targets`` (a gateway's series retrieval,
        before its objects are streamed one by one), unless it would take more than half the
        cache: then its reader, going through it in order, is read ahead as from a mount
        (module docstring) instead of the series evicting itself. Its size is estimated from
        an object of it already cached, else from its first object, retrieved first."""
        if not targets:
            return
        one = next(
            (
                info
                for t in itertools.islice(targets, SIZE_PROBES)
                if (info := self.store.info(ObjectRef(t.sop_uid, t.view))) is not None
            ),
            None,
        )
        if one is None and len(targets) > 1:
            try:
                await self.fetcher.fetch(targets[0])
            except MdmError:  # said to its reader when it is streamed; retrieve the rest
                pass
            one = self.store.info(ObjectRef(targets[0].sop_uid, targets[0].view))
        if one is not None and one.stored_bytes * len(targets) > self.store.max_bytes // 2:
            log.info(
                "series %s not retrieved whole: about %d bytes for %d object(s), "
                "cache.max_bytes is %d",
                targets[0].series_uid,
                one.stored_bytes * len(targets),
                len(targets),
                self.store.max_bytes,
            )
            return
        self.fetcher.prefetch(targets)

    async def fetch_series(self, principal: Principal, study: Record, series: Record) -> None:
        """Retrieve every object of ``series`` not cached yet in ``principal``'s view."""
        await self.fetcher.fetch_many(await self.series_targets(principal, study, series))
