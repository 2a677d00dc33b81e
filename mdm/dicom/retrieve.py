"""C-MOVE / C-GET retrieval over pooled associations, with counting.

A retrieval registers the SOP Instance UIDs it expects with the storage SCP, sends one
C-MOVE (objects arrive on the PACS's own association to our SCP) or C-GET (objects arrive on
ours), waits for the final response under a progress deadline, then counts: a PACS that
reports success but delivered fewer objects than expected is an error, never a silent gap.

Associations are pooled per site (at most ``site.max_associations``): opening one costs a
TCP handshake plus an A-ASSOCIATE round trip, which would dominate the first byte of a cold
read. See docs/DICOM.md for the protocol details.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import build_role, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from mdm.config import BridgeSettings, SiteSettings
from mdm.dicom.net import (
    CANCEL,
    FAILURE,
    MAX_REQUESTED_CONTEXTS,
    PENDING,
    QUERY_SYNTAXES,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
    SUCCESS,
    TRANSFER_SYNTAXES,
    VERIFICATION,
    WARNING,
    ProgressQueue,
    TunedAE,
    Watchdog,
    abort_association,
    accepted,
    close_association,
    contexts_for,
    open_association,
    status_category,
    status_code,
    status_name,
)
from mdm.dicom.receiver import Expectation, ReceivedObject, StorageSCP
from mdm.errors import RetrieveError, RetrieveTimeout

log = logging.getLogger(__name__)

LEVELS = ("STUDY", "SERIES", "IMAGE")

# Storage SOP classes requested (SCP role) on C-GET associations when the caller names none:
# the common image, presentation-state, SR and RT objects. The classes the caller passes come
# first; pynetdicom requests at most 128 contexts in all.
DEFAULT_GET_CLASSES: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image - For Processing
    "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography X-Ray Image - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray Image - For Processing
    "1.2.840.10008.5.1.4.1.1.13.1.3",  # Breast Tomosynthesis Image
    "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image
    "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit SC
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
    "1.2.840.10008.5.1.4.1.1.20",  # Nuclear Medicine Image
    "1.2.840.10008.5.1.4.1.1.128",  # PET Image
    "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET Image
    "1.2.840.10008.5.1.4.1.1.12.1",  # X-Ray Angiographic Image
    "1.2.840.10008.5.1.4.1.1.12.2",  # X-Ray Radiofluoroscopic Image
    "1.2.840.10008.5.1.4.1.1.481.1",  # RT Image
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set
    "1.2.840.10008.5.1.4.1.1.481.5",  # RT Plan
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.66.1",  # Spatial Registration
    "1.2.840.10008.5.1.4.1.1.66",  # Raw Data
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection Document
    "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
    "1.2.840.10008.5.1.4.1.1.4.2",  # MR Spectroscopy
    "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL Photographic Image
    "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map
)
# Contexts besides storage on a C-GET association: Study Root GET and Verification.
_MAX_GET_STORAGE = MAX_REQUESTED_CONTEXTS - 2

IDLE_TIMEOUT = 20.0
"""Seconds an unused pooled association stays open (PACS often drop theirs after ~30 s)."""
VALIDATE_AFTER = 5.0
"""A pooled association idle longer than this is checked with a C-ECHO before reuse."""
BATCH_SIZE = 200
"""SOP Instance UIDs per IMAGE-level request in :meth:`Retriever.retrieve_batch`."""


@dataclass
class RetrieveOutcome:
    """What one retrieval delivered."""

    received: set[str]
    missing: set[str]
    status: str
    """The final DIMSE status, named (e.g. ``Success 0x0000``)."""
    elapsed: float


class IncompleteRetrieve(RetrieveError):
    """The PACS finished but fewer objects than expected arrived (those that did were delivered)."""

    def __init__(self, message: str, outcome: RetrieveOutcome) -> None:
        super().__init__(message)
        self.outcome = outcome


@dataclass
class PoolStats:
    """Counters of one site's association pool."""

    opened: int = 0
    reused: int = 0
    closed: int = 0
    idle: int = 0
    in_use: int = 0


@dataclass
class _Conn:
    assoc: Association
    mode: str
    storage_classes: frozenset[str] = frozenset()
    last_used: float = field(default_factory=time.monotonic)
    warming: bool = False

    def alive(self) -> bool:
        a = self.assoc
        return bool(a.is_established and not a.is_aborted and not a.is_released and a.is_alive())


class _Pool:
    """At most ``site.max_associations`` associations with one site, reused."""

    def __init__(self, retriever: Retriever, site: SiteSettings) -> None:
        self.retriever = retriever
        self.site = site
        self.cond = threading.Condition()
        self.idle: list[_Conn] = []
        self.in_use = 0
        # Associations being opened ahead of time (Retriever.warm), by mode: a retrieval
        # that finds none idle waits for one of these rather than opening another.
        self.warming: dict[str, int] = {}
        self.stats = PoolStats()
        self.retired = False
        self.ae = TunedAE(retriever.bridge.ae_title, site.timeout, retriever.bridge.max_pdu)

    def acquire(
        self, mode: str, need: frozenset[str], *, warming: bool = False
    ) -> tuple[_Conn, bool]:
        """A connection for ``mode`` covering the storage classes ``need``; (conn, reused).

        ``warming``: this is an association opened ahead of time, which retrievals that
        start meanwhile wait for instead of opening their own.
        """
        while True:
            victim: _Conn | None = None
            conn: _Conn | None = None
            with self.cond:
                while True:
                    for i, c in enumerate(self.idle):
                        if c.mode == mode and need <= c.storage_classes:
                            conn = self.idle.pop(i)
                            break
                    if conn is not None:
                        self.in_use += 1
                        break
                    if not warming and self.warming.get(mode, 0) > 0:
                        self.cond.wait()  # released (or failed) soon: see release()
                        continue
                    total = len(self.idle) + self.in_use
                    if total < self.site.max_associations:
                        self.in_use += 1
                        break
                    if self.idle:  # full, but of the wrong kind: replace the oldest
                        victim = self.idle.pop(0)
                        self.in_use += 1
                        break
                    self.cond.wait()
            if victim is not None:
                self._close(victim)
            if conn is None:
                if warming:
                    with self.cond:
                        self.warming[mode] = self.warming.get(mode, 0) + 1
                try:
                    opened = self._open(mode, need)
                except BaseException:
                    if warming:
                        self._warmed(mode)
                    self._release_slot()
                    raise
                opened.warming = warming  # counted until released into the pool
                return opened, False
            if self._usable(conn):
                with self.cond:
                    self.stats.reused += 1
                return conn, True
            self._close(conn)
            self._release_slot()

    def _usable(self, conn: _Conn) -> bool:
        if not conn.alive():
            return False
        if time.monotonic() - conn.last_used < VALIDATE_AFTER:
            return True
        # The peer may have dropped it silently (firewall, PACS idle timeout): an echo is
        # one round trip, cheaper than a failed C-MOVE.
        try:
            with Watchdog(conn.assoc, self.site.timeout) as wd:
                status = conn.assoc.send_c_echo()
            return not wd.tripped and status_code(status) == 0
        except Exception:
            return False

    def _open(self, mode: str, need: frozenset[str]) -> _Conn:
        bridge = self.retriever.bridge
        if mode == "move":
            mcxs = contexts_for([STUDY_ROOT_MOVE, VERIFICATION], QUERY_SYNTAXES)
            assoc = open_association(self.ae, self.site, mcxs, max_pdu=bridge.max_pdu)
            if not accepted(assoc, STUDY_ROOT_MOVE):
                close_association(assoc)
                raise RetrieveError(f"site {self.site.name}: the PACS refused Study Root C-MOVE")
            conn = _Conn(assoc, mode)
        else:
            classes = list(dict.fromkeys([*sorted(need), *DEFAULT_GET_CLASSES]))
            if len(need) > _MAX_GET_STORAGE:
                raise RetrieveError(
                    f"site {self.site.name}: {len(need)} storage classes in one C-GET "
                    f"(at most {_MAX_GET_STORAGE} fit in one association)"
                )
            classes = classes[:_MAX_GET_STORAGE]
            cxs: list[PresentationContext] = contexts_for(
                [STUDY_ROOT_GET, VERIFICATION], QUERY_SYNTAXES
            ) + contexts_for(classes, TRANSFER_SYNTAXES)
            roles = [build_role(c, scp_role=True) for c in classes]
            assoc = open_association(
                self.ae,
                self.site,
                cxs,
                max_pdu=bridge.max_pdu,
                ext_neg=roles,
                evt_handlers=[(evt.EVT_C_STORE, self.retriever.scp.handle_store)],
            )
            if not accepted(assoc, STUDY_ROOT_GET):
                close_association(assoc)
                raise RetrieveError(f"site {self.site.name}: the PACS refused Study Root C-GET")
            got = frozenset(str(cx.abstract_syntax) for cx in assoc.accepted_contexts if cx.as_scp)
            conn = _Conn(assoc, mode, got)
        with self.cond:
            self.stats.opened += 1
        log.debug("site %s: opened a %s association", self.site.name, mode)
        return conn

    def release(self, conn: _Conn, healthy: bool) -> None:
        """Give a connection back: pooled if healthy, closed otherwise."""
        warmed, conn.warming = conn.warming, False
        if healthy and conn.alive() and not (self.retired or self.retriever.closed):
            conn.last_used = time.monotonic()
            with self.cond:
                self.in_use -= 1
                self.idle.append(conn)
                if warmed:
                    self.warming[conn.mode] -= 1
                self.cond.notify_all()
            return
        if healthy:
            self._close(conn)
        else:
            self._abort(conn)
        if warmed:
            self._warmed(conn.mode)
        self._release_slot()

    def _warmed(self, mode: str) -> None:
        with self.cond:
            self.warming[mode] -= 1
            self.cond.notify_all()

    def _release_slot(self) -> None:
        with self.cond:
            self.in_use -= 1
            self.cond.notify()

    def _close(self, conn: _Conn) -> None:
        close_association(conn.assoc)
        with self.cond:
            self.stats.closed += 1

    def _abort(self, conn: _Conn) -> None:
        abort_association(conn.assoc)
        with self.cond:
            self.stats.closed += 1

    def reap(self, now: float, everything: bool = False) -> None:
        """Close idle connections that are dead or unused for IDLE_TIMEOUT."""
        with self.cond:
            old = [
                c
                for c in self.idle
                if everything or not c.alive() or now - c.last_used > IDLE_TIMEOUT
            ]
            self.idle = [c for c in self.idle if c not in old]
        for c in old:
            self._close(c)

    def snapshot(self) -> PoolStats:
        with self.cond:
            s = self.stats
            return PoolStats(s.opened, s.reused, s.closed, len(self.idle), self.in_use)


class Retriever:
    """C-MOVE/C-GET retrievals from the federation's sites (thread-safe, blocking calls)."""

    def __init__(self, bridge: BridgeSettings, scp: StorageSCP) -> None:
        self.bridge = bridge
        self.scp = scp
        self.closed = False
        self._lock = threading.Lock()
        self._pools: dict[str, _Pool] = {}
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    def _pool(self, site: SiteSettings) -> _Pool:
        with self._lock:
            if self.closed:
                raise RetrieveError("the retriever is closed")
            pool = self._pools.get(site.name)
            # The retrieve mode is chosen per call (``auto`` alternates C-GET and C-MOVE on the
            # same site) and each connection records its own: it does not make a new pool.
            if pool is None or dataclasses.replace(pool.site, retrieve=site.retrieve) != site:
                if pool is not None:  # settings changed (reload): retire the old pool
                    pool.retired = True
                    pool.reap(time.monotonic(), everything=True)
                pool = self._pools[site.name] = _Pool(self, site)
            if self._reaper is None:
                self._reaper = threading.Thread(
                    target=self._reap_loop, name="mdm-pool-reaper", daemon=True
                )
                self._reaper.start()
            return pool

    def _reap_loop(self) -> None:
        while not self._stop.wait(min(5.0, IDLE_TIMEOUT / 4)):
            with self._lock:
                pools = list(self._pools.values())
            for p in pools:
                try:
                    p.reap(time.monotonic())
                except Exception:
                    log.exception("error while closing idle associations")

    def warm(self, site: SiteSettings) -> bool:
        """Open one association with ``site`` ahead of its first retrieval, so the first
        read does not pay for it. Failures are only logged (the site may be down now)."""
        pool = self._pool(site)
        modes = {"get": ["get"], "move": ["move"]}.get(site.retrieve, ["get", "move"])
        for mode in modes:
            try:
                conn, _ = pool.acquire(mode, frozenset(), warming=True)
            except Exception as e:  # a down site is normal here; the retrieval will say so
                log.info("site %s: no %s association opened ahead of time: %s", site.name, mode, e)
                return False
            pool.release(conn, True)
        return True

    def pool_stats(self, site_name: str) -> PoolStats:
        """Counters of the association pool of ``site_name`` (zeros if never used)."""
        with self._lock:
            pool = self._pools.get(site_name)
        return pool.snapshot() if pool is not None else PoolStats()

    def close(self) -> None:
        """Close every pooled association and stop the reaper. Idempotent."""
        with self._lock:
            self.closed = True
            pools = list(self._pools.values())
            self._stop.set()
        for p in pools:
            p.reap(time.monotonic(), everything=True)
        if self._reaper is not None:
            self._reaper.join()

    # --- retrieval --------------------------------------------------------------------------

    def retrieve(
        self,
        site: SiteSettings,
        *,
        level: str,
        study_uid: str,
        series_uid: str | None = None,
        sop_uids: list[str] | None = None,
        expected: set[str],
        sink: Callable[[Any], None],
        sop_classes: set[str] | None = None,
        store_spec: Mapping[str, Any] | None = None,
        mode: str | None = None,
    ) -> RetrieveOutcome:
        """Retrieve a study, a series or a list of instances from ``site`` into ``sink``.

        ``mode``: "get" or "move" for this call (default: from ``site.retrieve``, where
        "auto" means C-MOVE).

        ``expected`` holds the SOP Instance UIDs that must arrive (from C-FIND); only these
        and ``sop_uids`` are accepted by the storage SCP. ``sink`` runs in a pynetdicom thread
        for each object as it arrives. Raises RetrieveTimeout if the PACS goes silent for
        ``site.timeout`` seconds, IncompleteRetrieve (a RetrieveError) if it finishes with
        objects missing, RetrieveError for refusals, failures and aborts.
        """
        if level not in LEVELS:
            raise ValueError(f"unknown retrieve level {level!r}")
        if level in ("SERIES", "IMAGE") and not series_uid:
            raise ValueError(f"a {level}-level retrieval needs series_uid")
        if level == "IMAGE" and not sop_uids:
            raise ValueError("an IMAGE-level retrieval needs sop_uids")
        mode = mode or ("get" if site.retrieve == "get" else "move")
        if mode == "move" and not self.scp.running:
            raise RetrieveError("the storage SCP is not running: C-MOVE has no destination")
        identifier = Dataset()
        identifier.QueryRetrieveLevel = level
        identifier.StudyInstanceUID = study_uid
        if level in ("SERIES", "IMAGE"):
            identifier.SeriesInstanceUID = series_uid
        if level == "IMAGE":
            assert sop_uids is not None
            identifier.SOPInstanceUID = list(sop_uids) if len(sop_uids) > 1 else sop_uids[0]
        need = frozenset(sop_classes or ())
        started = time.monotonic()
        watch: list[Watchdog] = []

        def tracked(obj: Any) -> None:
            sink(obj)
            if watch:  # an arriving object is progress, whatever the PACS's pending responses
                watch[0].touch()

        expectation = self.scp.expect(
            set(expected) | set(sop_uids or ()),
            tracked,
            {"site": site.name, **(store_spec or {})},
            inbound=mode == "move",
        )
        try:
            code = self._exchange(site, mode, need, identifier, watch, expectation)
        finally:
            try:
                # A receiver process reports stored objects asynchronously: wait for them.
                self.scp.sync(expectation)
            finally:
                expectation.cancel()
        received = expectation.received
        missing = set(expected) - received
        elapsed = time.monotonic() - started
        name = status_name(mode, code)
        outcome = RetrieveOutcome(received, missing, name, elapsed)
        cat = status_category(code)
        if not missing:
            if cat not in (SUCCESS, PENDING):
                log.warning(
                    "site %s: C-%s ended with %s, but everything expected arrived",
                    site.name,
                    mode.upper(),
                    name,
                )
            return outcome
        got = len(set(expected) & received)
        if cat in (SUCCESS, WARNING):
            raise IncompleteRetrieve(
                f"site {site.name}: delivered {got} of {len(expected)} ({name})", outcome
            )
        what = "cancelled" if cat == CANCEL else "failed"
        assert cat in (CANCEL, FAILURE)
        raise IncompleteRetrieve(
            f"site {site.name}: C-{mode.upper()} {what}: {name}; delivered {got} of "
            f"{len(expected)}",
            outcome,
        )

    def _exchange(
        self,
        site: SiteSettings,
        mode: str,
        need: frozenset[str],
        identifier: Dataset,
        watch: list[Watchdog],
        expectation: Expectation,
    ) -> int:
        """Send the C-MOVE/C-GET and wait for its final status code (retry once on a stale
        pooled association that died before answering anything)."""
        pool = self._pool(site)
        for attempt in (1, 2):
            conn, reused = pool.acquire(mode, need)
            if mode == "get" and need and not need <= conn.storage_classes:
                pool.release(conn, True)
                missing_cx = len(need - conn.storage_classes)
                raise RetrieveError(
                    f"site {site.name}: the PACS accepted no C-GET storage context for "
                    f"{missing_cx} SOP class(es)"
                )
            healthy = False
            answered = False
            pending: list[int] = []
            progress = conn.assoc.dimse.msg_queue
            try:
                wd = Watchdog(conn.assoc, site.timeout)
                watch[:] = [wd]
                if isinstance(progress, ProgressQueue):
                    # Pending responses touch the deadline on the DUL thread, unqueued.
                    def on_pending(wd: Watchdog = wd, seen: list[int] = pending) -> None:
                        wd.touch()
                        seen.append(1)

                    progress.on_pending = on_pending
                with wd:
                    if mode == "move":
                        responses = conn.assoc.send_c_move(
                            identifier, self.bridge.ae_title, STUDY_ROOT_MOVE
                        )
                    else:
                        responses = conn.assoc.send_c_get(identifier, STUDY_ROOT_GET)
                    final: int | None = None
                    for status, _ident in responses:
                        code = status_code(status)
                        if code is None:
                            break
                        answered = True
                        wd.touch()
                        if status_category(code) != PENDING:
                            final = code
                            break
                watch.clear()
                answered = answered or bool(pending)
                if final is not None:
                    healthy = not wd.tripped
                    return final
                if wd.fired:
                    raise RetrieveTimeout(
                        f"site {site.name}: no progress of C-{mode.upper()} for {site.timeout:g}s"
                    )
                if attempt == 1 and reused and not answered and not expectation.received:
                    log.info(
                        "site %s: pooled association was closed by the peer; retrying",
                        site.name,
                    )
                    continue
                raise RetrieveError(
                    f"site {site.name}: association aborted during C-{mode.upper()} "
                    "(closed, aborted by the peer, or a malformed message)"
                )
            except ValueError as e:  # pynetdicom: no accepted context / cannot encode
                raise RetrieveError(f"site {site.name}: C-{mode.upper()} not sent: {e}") from None
            finally:
                if isinstance(progress, ProgressQueue):
                    progress.on_pending = None
                watch.clear()
                pool.release(conn, healthy)
        raise AssertionError("unreachable")  # pragma: no cover

    def retrieve_batch(
        self,
        site: SiteSettings,
        *,
        study_uid: str,
        series_uid: str,
        sop_uids: Iterable[str],
        sink: Callable[[ReceivedObject], None],
        sop_classes: set[str] | None = None,
        batch_size: int = BATCH_SIZE,
    ) -> RetrieveOutcome:
        """Retrieve many instances of one series with IMAGE-level requests of up to
        ``batch_size`` UIDs each (for series prefetch); every UID is expected.

        Stops at the first failing batch (raising as :meth:`retrieve` does); the objects
        of earlier batches have been delivered to ``sink`` by then.
        """
        uids = list(dict.fromkeys(sop_uids))
        started = time.monotonic()
        received: set[str] = set()
        status = status_name("move" if site.retrieve == "move" else "get", 0)
        for i in range(0, len(uids), max(1, batch_size)):
            chunk = uids[i : i + batch_size]
            out = self.retrieve(
                site,
                level="IMAGE",
                study_uid=study_uid,
                series_uid=series_uid,
                sop_uids=chunk,
                expected=set(chunk),
                sink=sink,
                sop_classes=sop_classes,
            )
            received |= out.received
            status = out.status
        return RetrieveOutcome(received, set(uids) - received, status, time.monotonic() - started)
