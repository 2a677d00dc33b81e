"""Retrieval orchestration: single-flight per object, fail-over, series prefetch.

Its thread hand-offs (one of several modules that leave the trio thread: docs/CONCURRENCY.md
lists them all, with what bounds each): blocking DICOM and DICOMweb calls run in
``trio.to_thread.run_sync`` under a per-site ``CapacityLimiter``, after the site's pace
(:mod:`mdm.retrieval.pacing`); objects arriving in the storage SCP's threads are queued to the
writer threads (:mod:`mdm.retrieval.writer`), stored there, then reported back to trio with
the captured trio token (``run_sync_soon``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from mdm.access.decide import Resource
from mdm.config import Config, SiteSettings
from mdm.dicom.receiver import ReceivedObject, StoredNotice
from mdm.dicom.retrieve import IncompleteRetrieve, Retriever, move_may_help
from mdm.errors import MdmError, RetrieveError, RetrieveTimeout
from mdm.ops import metrics
from mdm.retrieval.pacing import pacer_for
from mdm.retrieval.writer import Writer, store_spec
from mdm.store.keys import Scope
from mdm.store.objects import ObjectStore
from mdm.store.records import ObjectInfo, ObjectRef

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """One instance to retrieve, with where it may be found."""

    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str = ""
    sites: tuple[str, ...] = ()
    view: str = "identified"
    """The store view the object is wanted in (``identified`` or a de-identified view)."""
    program: str = ""
    """Pseudonym scope of a de-identified view (part of the store scope)."""
    deid: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    """De-identification secret and options, for a de-identified view."""
    resource: Resource | None = field(default=None, compare=False, repr=False)
    """The policy attributes of the object (a key service seals them with its key)."""
    series_size: int = field(default=0, compare=False)
    """How many instances the catalog lists in the series (0: unknown)."""

    @property
    def key(self) -> str:
        """Single-flight key: one retrieval per object and view."""
        return pending_key(self.sop_uid, self.view)


def pending_key(sop_uid: str, view: str = "identified") -> str:
    """The single-flight key of an object in a view."""
    return f"{view}\0{sop_uid}"


class _Batch:
    """Counts the objects of one retrieval still queued for writing."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._outstanding = 0

    def add(self) -> None:
        with self._cv:
            self._outstanding += 1

    def done(self) -> None:
        with self._cv:
            self._outstanding -= 1
            self._cv.notify_all()

    def wait(self, timeout: float = 300.0) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._outstanding == 0, timeout)


@dataclass
class _Pending:
    done: trio.Event = field(default_factory=trio.Event)
    error: MdmError | None = None
    urgent: bool = False
    """A reader waits for it: bulk work holding it is served first (mdm.retrieval.pacing)."""


@dataclass
class FetchStats:
    """Counters for tests and ``mdm cache stats``."""

    retrievals: int = 0
    objects_received: int = 0
    objects_failed: int = 0
    by_site: dict[str, int] = field(default_factory=dict)


class Fetcher:
    """Gets objects into the store, once each, from whichever site can deliver them."""

    def __init__(
        self,
        config: Config,
        store: ObjectStore,
        retriever: Retriever,
        nursery: trio.Nursery,
        on_stored: Callable[[ObjectInfo], None] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.retriever = retriever
        self.nursery = nursery
        self.on_stored = on_stored
        self.audit: Callable[..., None] | None = None
        self.stats = FetchStats()
        self._pending: dict[str, _Pending] = {}
        self._limiters = {s.name: trio.CapacityLimiter(s.max_associations) for s in config.sites}
        self.pacer = pacer_for(config.sites)
        self._token = trio.lowlevel.current_trio_token()
        self._writer = Writer(store)

    def limiter(self, site: str) -> trio.CapacityLimiter:
        """The concurrency limit of ``site`` (shared with queries)."""
        return self._limiters[site]

    def pending_objects(self) -> int:
        """How many objects readers or prefetches wait for now (``mdm status``)."""
        return len(self._pending)

    async def fetch(self, target: Target) -> ObjectInfo:
        """Return the stored object for ``target``, retrieving it if needed (single-flight)."""
        ref = ObjectRef(target.sop_uid, target.view)
        info = self.store.info(ref)
        if info is not None:
            return info
        pend = self._pending.get(target.key)
        if pend is None:
            pend = self._start([target], level="IMAGE", bulk=False)[target.key]
        pend.urgent = True
        await pend.done.wait()
        if pend.error is not None:
            raise pend.error
        info = self.store.info(ref)
        if info is None:
            raise RetrieveError(f"object {target.sop_uid} was retrieved but is not in the cache")
        return info

    async def wait(self, sop_uid: str, view: str = "identified") -> None:
        """Wait until a pending retrieval of ``sop_uid`` has ended (at once if none)."""
        p = self._pending.get(pending_key(sop_uid, view))
        if p is not None:
            p.urgent = True
            await p.done.wait()

    def prefetch(self, targets: Sequence[Target]) -> int:
        """Start retrieving those of ``targets`` not cached nor in flight; return how many."""
        rest = [t for t in targets if self._needed(t)]
        if rest:
            self._start(rest, level="SERIES", bulk=True)
        return len(rest)

    async def fetch_many(
        self, targets: Sequence[Target], *, level: str = "SERIES", bulk: bool = False
    ) -> None:
        """Retrieve all ``targets`` (grouped per series) and wait; raise the first error.
        ``bulk``: nobody reads them yet (``mdm fetch``): they wait for the sites' bulk
        windows and give way to readers."""
        todo = [t for t in targets if self._needed(t)]
        if todo:
            self._start(todo, level=level, bulk=bulk)
        first: MdmError | None = None
        for t in targets:
            p = self._pending.get(t.key)
            if p is None:
                continue
            await p.done.wait()
            if p.error is not None and first is None:
                first = p.error
        if first is not None:
            raise first

    # ------------------------------------------------------------------------------------
    def _needed(self, t: Target) -> bool:
        return t.key not in self._pending and self.store.info(ObjectRef(t.sop_uid, t.view)) is None

    def _start(self, targets: Sequence[Target], *, level: str, bulk: bool) -> dict[str, _Pending]:
        pend = {t.key: _Pending(urgent=not bulk) for t in targets}
        self._pending.update(pend)
        # Group by series (and view): one retrieval per series, as PACS store and move them.
        groups: dict[tuple[str, str, str], list[Target]] = {}
        for t in targets:
            groups.setdefault((t.study_uid, t.series_uid, t.view), []).append(t)
        for group in groups.values():
            self.nursery.start_soon(self._run, group, level, pend, bulk)
        return pend

    async def _run(
        self, group: list[Target], level: str, pend: dict[str, _Pending], bulk: bool = False
    ) -> None:
        wanted = {t.key for t in group}
        first = group[0]
        site_order = list(first.sites) or [s.name for s in self.config.sites]
        errors: list[str] = []
        last: MdmError | None = None
        try:
            for name in site_order:
                remaining = {u for u in wanted if not pend[u].done.is_set()}
                if not remaining:
                    break
                try:
                    site = self.config.site(name)
                except KeyError:
                    continue
                # The PACS's pace first (retrievals per minute, bulk windows; readers first),
                # holding no association meanwhile.
                await self.pacer.admit(
                    name,
                    bulk=self.pacer.is_bulk(name, len(remaining), bulk),
                    promoted=lambda r=remaining: any(pend[u].urgent for u in r),  # type: ignore[misc]
                )
                started = time.monotonic()
                try:
                    await self._retrieve_from(site, group, remaining, level, pend)
                except MdmError as e:
                    result = "timeout" if isinstance(e, RetrieveTimeout) else "error"
                    metrics.retrieval(name, result, time.monotonic() - started)
                    last = e
                    errors.append(str(e))
                    log.warning("retrieval from site %s failed: %s", name, e)
                    left = sum(1 for u in wanted if not pend[u].done.is_set())
                    self._audit_retrieval(
                        name, first, len(wanted) - left, len(wanted), type(e).__name__
                    )
                    continue
                done = all(pend[u].done.is_set() for u in remaining)
                metrics.retrieval(name, "ok" if done else "incomplete", time.monotonic() - started)
        except BaseException as e:  # cancellation or a bug: never leave waiters hanging
            aborted = MdmError(f"retrieval aborted: {type(e).__name__}")
            for u in wanted:
                self._finish(u, aborted)
            raise
        for u in wanted:
            p = pend[u]
            if not p.done.is_set():
                if isinstance(last, RetrieveTimeout):
                    err: MdmError = RetrieveTimeout("; ".join(errors))
                elif last is not None:
                    # One error naming every site tried, of the kind that decides the errno.
                    kind = type(last).errno
                    err = RetrieveError("; ".join(errors)) if kind == errno.EIO else last
                else:
                    err = RetrieveError(f"no site could deliver object {u}")
                self._finish(u, err, site_order[-1] if site_order else "")

    async def _retrieve_from(
        self,
        site: SiteSettings,
        group: list[Target],
        remaining: set[str],
        level: str,
        pend: dict[str, _Pending],
    ) -> None:
        first = group[0]
        deid = first.deid
        scope = Scope(
            site=site.name,
            level="deidentified" if deid else "identified",
            program=first.program,
        )
        view = first.view
        batch = _Batch()
        meta = {
            "study_uid": first.study_uid,
            "series_uid": first.series_uid,
            "site": site.name,
        }
        spec = store_spec(
            site=site.name,
            level=scope.level,
            program=scope.program,
            view=view,
            deid=deid,
            meta=meta,
            resource=first.resource,
        )
        sop_of = {t.key: t.sop_uid for t in group}
        remaining_sops = {sop_of[k] for k in remaining}

        def sink(obj: ReceivedObject | StoredNotice) -> None:
            # Runs in a pynetdicom thread. Encrypting and writing happen in the writer
            # threads so the association keeps receiving (the queue is bounded: if the disk
            # falls behind, the sender is slowed down, memory is not blown). A receiver
            # process has stored the object already and only reports it.
            key = pending_key(obj.sop_uid, view)
            if key not in pend:
                return
            if isinstance(obj, StoredNotice):
                if obj.error is not None:
                    err = obj.error if isinstance(obj.error, MdmError) else MdmError(str(obj.error))
                    self._to_trio(self._finish, key, err, site.name)
                else:
                    self._to_trio(self._stored, key, obj.info, site.name)
                return
            batch.add()
            self._writer.submit(obj, spec, stored)

        def stored(obj: ReceivedObject, info: ObjectInfo | None, error: MdmError | None) -> None:
            # Runs in a writer thread.
            try:
                key = pending_key(obj.sop_uid, view)
                if error is not None:
                    self._to_trio(self._finish, key, error, site.name)
                else:
                    self._to_trio(self._stored, key, info, site.name)
            finally:
                batch.done()

        started = time.monotonic()
        self.stats.retrievals += 1
        # The whole series, as the catalog lists it: one SERIES-level request (short, and what
        # every PACS serves). Otherwise the exact UIDs at IMAGE level (PS3.4 C.4.2.2.1), in
        # bounded batches (Retriever.BATCH_SIZE): a SERIES-level move would resend objects
        # already cached or in another flight, which the storage SCP refuses.
        sop_uids = sorted(remaining_sops)
        whole = level == "SERIES" and first.series_size == len(group) == len(remaining)
        lvl = "SERIES" if whole else "IMAGE"
        classes_of = {t.sop_uid: t.sop_class_uid for t in group if t.sop_class_uid}
        sop_classes = set(classes_of.values()) or None
        log.info(
            "retrieving %d object(s) of series %s from site %s (%s, %s)",
            len(remaining),
            first.series_uid,
            site.name,
            site.retrieve,
            lvl,
        )
        if site.dicomweb:
            # A DICOMweb site: WADO-RS into the same sink (checks, writers, store).
            from mdm.dicomweb.wado import per_instance, wado_retrieve

            try:
                arrived = await trio.to_thread.run_sync(
                    functools.partial(
                        wado_retrieve,
                        site,
                        study_uid=first.study_uid,
                        series_uid=first.series_uid,
                        sop_uids=None if whole else per_instance(sop_uids, first.series_size),
                        expected=remaining_sops,
                        sink=sink,
                        classes_of=classes_of,
                    ),
                    limiter=self._limiters[site.name],
                )
            finally:
                await trio.to_thread.run_sync(batch.wait)
            self._audit_retrieval(site.name, first, len(arrived & remaining_sops), len(remaining))
            return
        # "auto": a single object (a reader waiting for its first byte) by C-GET on an open
        # association, ~7 ms; a series by C-MOVE into the receiver process, for throughput.
        # A C-GET that the PACS does not serve (association result, DIMSE status) is followed
        # by a C-MOVE of what it did not deliver.
        modes = [site.retrieve]
        if site.retrieve == "auto":
            modes = ["get", "move"] if len(remaining) == 1 else ["move"]
        got_before: set[str] = set()
        for i, mode in enumerate(modes):
            todo = sorted(set(sop_uids) - got_before)
            try:
                outcome = await trio.to_thread.run_sync(
                    lambda mode=mode, todo=todo, lvl=lvl: self.retriever.retrieve(  # type: ignore[misc]
                        site,
                        level=lvl,
                        study_uid=first.study_uid,
                        series_uid=first.series_uid,
                        sop_uids=todo if lvl == "IMAGE" else None,
                        expected=set(todo),
                        sink=sink,
                        sop_classes=sop_classes,
                        classes_of=classes_of,
                        store_spec=spec,
                        mode=mode,
                    ),
                    limiter=self._limiters[site.name],
                )
                outcome.received |= got_before
                break
            except RetrieveError as e:
                if i + 1 < len(modes) and move_may_help(e):
                    log.info("site %s: %s; using C-MOVE", site.name, e)
                    if isinstance(e, IncompleteRetrieve):
                        got_before |= e.outcome.received
                    lvl = "IMAGE"
                    continue
                raise
            finally:
                # Whatever the outcome, what arrived is stored before fail-over decides what
                # is still missing.
                await trio.to_thread.run_sync(batch.wait)
        log.info(
            "site %s delivered %d of %d object(s) in %.3fs",
            site.name,
            len(outcome.received & remaining_sops),
            len(remaining),
            time.monotonic() - started,
        )
        got = len(outcome.received & remaining_sops)
        self._audit_retrieval(site.name, first, got, len(remaining))

    def _audit_retrieval(
        self, site: str, first: Target, got: int, wanted: int, error: str = ""
    ) -> None:
        if self.audit is None:
            return
        with contextlib.suppress(MdmError):
            # Logged by the recorder; the opens this retrieval serves are audited (and fail
            # closed) on their own.
            self._audit_retrieve(site, first, got, wanted, error)

    def _audit_retrieve(self, site: str, first: Target, got: int, wanted: int, error: str) -> None:
        assert self.audit is not None
        self.audit(
            "retrieve",
            "ok" if got == wanted else "incomplete",
            {"site": site, "study_uid": first.study_uid, "series_uid": first.series_uid},
            objects=got,
            expected=wanted,
            outcome=error or "success",
        )

    def _to_trio(self, fn: Callable[..., None], *args: object) -> None:
        """Run ``fn(*args)`` in the trio thread, without waiting for it (any thread).

        Callbacks run in the order they were queued, before the result of any ``to_thread``
        call that finishes after they were queued, so a retrieval's own results are handled
        before it is seen to end. A receiving thread does not wait for the event loop.
        """

        def call() -> None:
            try:
                fn(*args)
            except Exception:  # a bug here must not stop the event loop
                log.exception("handling a retrieved object failed")

        try:
            self._token.run_sync_soon(call)
        except trio.RunFinishedError:
            pass  # shutting down: nobody waits any more

    def close(self) -> None:
        """Stop the writer threads after they have stored what is queued."""
        self._writer.close()

    def _stored(self, sop_uid: str, info: ObjectInfo, site: str) -> None:
        self.stats.objects_received += 1
        self.stats.by_site[site] = self.stats.by_site.get(site, 0) + 1
        metrics.OBJECTS.labels(site, "stored").inc()
        metrics.BYTES_RECEIVED.labels(site).inc(info.size)
        if self.on_stored is not None:
            self.on_stored(info)
        self._finish(sop_uid, None)

    def _finish(self, sop_uid: str, error: MdmError | None, site: str = "") -> None:
        p = self._pending.pop(sop_uid, None)
        if p is None or p.done.is_set():
            return
        if error is not None:
            self.stats.objects_failed += 1
            metrics.OBJECTS.labels(site or "none", "failed").inc()
        p.error = error
        p.done.set()
