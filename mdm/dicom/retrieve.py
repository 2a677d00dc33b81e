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
from pynetdicom.presentation import PresentationContext, build_context

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
    BridgeAE,
    ProgressQueue,
    Watchdog,
    abort_association,
    accepted,
    close_association,
    contexts_for,
    new_ae,
    open_association,
    status_category,
    status_code,
    status_name,
)
from mdm.dicom.query import c_find
from mdm.dicom.receiver import Expectation, StorageSCP
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
GET_SYNTAXES: tuple[str, ...] = tuple(TRANSFER_SYNTAXES)
"""Transfer syntaxes offered for each storage class on a C-GET association, each in its own
presentation context: an SCP picks a context that carries the syntax it holds the object in
and sends it as stored. One context listing several syntaxes lets the SCP choose the first
it can produce, and it transcodes the object into that one."""
CLASSES_PER_GET = max(1, _MAX_GET_STORAGE // len(GET_SYNTAXES))
"""Storage SOP classes one C-GET association covers (126 contexts / one per syntax)."""


def get_contexts(classes: Iterable[str]) -> list[PresentationContext]:
    """One SCP-role storage context per (SOP class, transfer syntax), for a C-GET."""
    return [build_context(c, ts) for c in classes for ts in GET_SYNTAXES]


def class_groups(classes: Iterable[str]) -> list[list[str]]:
    """``classes`` in groups that each fit one C-GET association (sorted, deterministic)."""
    ordered = sorted(set(classes))
    return [ordered[i : i + CLASSES_PER_GET] for i in range(0, len(ordered), CLASSES_PER_GET)]


IDLE_TIMEOUT = 20.0
"""Seconds an unused pooled association stays open (PACS often drop theirs after ~30 s)."""
VALIDATE_AFTER = 5.0
"""A pooled association idle longer than this is checked with a C-ECHO before reuse."""
BATCH_SIZE = 200
"""SOP Instance UIDs per IMAGE-level request: :meth:`Retriever.retrieve` splits a longer list."""


@dataclass
class RetrieveOutcome:
    """What one retrieval delivered."""

    received: set[str]
    missing: set[str]
    status: str
    """The final DIMSE status, named (e.g. ``Success 0x0000``)."""
    elapsed: float
    code: int = 0
    """The final DIMSE status code."""


class GetUnavailable(RetrieveError):
    """The PACS does not serve this C-GET: it refused the service, or answered with a status
    that says it cannot perform the sub-operations (a C-MOVE may still work)."""


class IncompleteRetrieve(RetrieveError):
    """The PACS finished but fewer objects than expected arrived (those that did were delivered)."""

    def __init__(self, message: str, outcome: RetrieveOutcome) -> None:
        super().__init__(message)
        self.outcome = outcome


# Final C-GET statuses after which a C-MOVE may still deliver: the SCP does not support the
# request, or cannot perform (all of) the sub-operations on our association (for instance it
# cannot send an object in any syntax we offered; over C-MOVE it proposes its own contexts).
GET_NOT_PERFORMED = frozenset(
    {
        0x0122,  # Refused: SOP Class not supported
        0xA701,  # Refused: Out of Resources - Unable to calculate number of matches
        0xA702,  # Refused: Out of Resources - Unable to perform sub-operations
        0xB000,  # Warning: Sub-operations complete - One or more Failures or Warnings
        0xC000,  # Failure: Unable to process (Orthanc, when it cannot send an object as asked)
    }
)


def move_may_help(e: RetrieveError) -> bool:
    """True if a failed C-GET should be followed by a C-MOVE: decided on the association
    result (no Study Root C-GET context accepted) and the final DIMSE status, never on
    timeouts, aborts or other failures (a C-MOVE would meet the same PACS state)."""
    if isinstance(e, GetUnavailable):
        return True
    return isinstance(e, IncompleteRetrieve) and e.outcome.code in GET_NOT_PERFORMED


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
    deadline: float = 0.0
    """When the request this connection was acquired for must have seen its first answer:
    validating a stale pooled association and opening another count against it."""

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
        self.ae = new_ae(
            retriever.bridge.ae_title,
            site.timeout,
            retriever.bridge.max_pdu,
            fast_path=retriever.bridge.fast_dicom,
        )

    def acquire(
        self,
        mode: str,
        need: frozenset[str],
        *,
        warming: bool = False,
        deadline: float | None = None,
    ) -> tuple[_Conn, bool]:
        """A connection for ``mode`` covering the storage classes ``need``; (conn, reused).

        ``warming``: this is an association opened ahead of time, which retrievals that
        start meanwhile wait for instead of opening their own. ``deadline`` (monotonic):
        checking a pooled association and opening a new one end by then (default: one site
        timeout from when a connection slot is had); it is kept as ``conn.deadline``.
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
            if deadline is None:
                # Waiting for a free slot is not a network wait; from here on, everything is.
                deadline = time.monotonic() + self.site.timeout
            if victim is not None:
                self._close(victim)
            if conn is None:
                if warming:
                    with self.cond:
                        self.warming[mode] = self.warming.get(mode, 0) + 1
                try:
                    opened = self._open(mode, need, deadline)
                except BaseException:
                    if warming:
                        self._warmed(mode)
                    self._release_slot()
                    raise
                opened.warming = warming  # counted until released into the pool
                opened.deadline = deadline
                return opened, False
            if self._usable(conn, deadline):
                with self.cond:
                    self.stats.reused += 1
                conn.deadline = deadline
                return conn, True
            # Dead or silent: abort (a polite release would wait for the silent peer again).
            self._abort(conn)
            self._release_slot()

    def _usable(self, conn: _Conn, deadline: float) -> bool:
        if not conn.alive():
            return False
        if time.monotonic() - conn.last_used < VALIDATE_AFTER:
            return True
        # The peer may have dropped it silently (firewall, PACS idle timeout): an echo is
        # one round trip, cheaper than a failed C-MOVE. It waits only for what is left of
        # the request's deadline.
        try:
            with Watchdog(conn.assoc, max(0.0, deadline - time.monotonic())) as wd:
                status = conn.assoc.send_c_echo()
            return not wd.tripped and status_code(status) == 0
        except Exception:
            return False

    def _open(self, mode: str, need: frozenset[str], deadline: float) -> _Conn:
        bridge = self.retriever.bridge
        ae, site = self.ae, self.site
        left = deadline - time.monotonic()
        if left <= 0:
            raise RetrieveTimeout(
                f"site {site.name}: no answer within {site.timeout:g}s (a pooled association "
                "went silent)"
            )
        if left < site.timeout:
            # What is left of the request's deadline bounds the connection and negotiation
            # (a stall timeout of the whole site timeout stays with the association).
            ae = new_ae(bridge.ae_title, site.timeout, bridge.max_pdu, fast_path=bridge.fast_dicom)
            ae.connection_timeout = ae.acse_timeout = left
            site = dataclasses.replace(site, timeout=left)
        try:
            return self._open_with(mode, need, ae, site)
        except RetrieveTimeout:
            if site is self.site:
                raise
            raise RetrieveTimeout(
                f"site {site.name}: no answer within {self.site.timeout:g}s (a pooled "
                "association went silent, then a new association request got no answer)"
            ) from None

    def _open_with(
        self, mode: str, need: frozenset[str], ae: BridgeAE, site: SiteSettings
    ) -> _Conn:
        bridge = self.retriever.bridge
        if mode == "move":
            mcxs = contexts_for([STUDY_ROOT_MOVE, VERIFICATION], QUERY_SYNTAXES)
            assoc = open_association(ae, site, mcxs, max_pdu=bridge.max_pdu)
            if not accepted(assoc, STUDY_ROOT_MOVE):
                close_association(assoc)
                raise RetrieveError(f"site {self.site.name}: the PACS refused Study Root C-MOVE")
            conn = _Conn(assoc, mode)
        else:
            if len(need) > CLASSES_PER_GET:
                raise RetrieveError(
                    f"site {self.site.name}: {len(need)} storage classes in one C-GET "
                    f"(at most {CLASSES_PER_GET} fit in one association)"
                )
            # The caller's classes, then common ones (an association warmed ahead of time
            # serves the first read of a CT or MR series without another handshake).
            classes = list(dict.fromkeys([*sorted(need), *DEFAULT_GET_CLASSES]))
            classes = classes[:CLASSES_PER_GET]
            cxs: list[PresentationContext] = contexts_for(
                [STUDY_ROOT_GET, VERIFICATION], QUERY_SYNTAXES
            ) + get_contexts(classes)
            roles = [build_role(c, scp_role=True) for c in classes]
            assoc = open_association(
                ae,
                site,
                cxs,
                max_pdu=bridge.max_pdu,
                ext_neg=roles,
                evt_handlers=[(evt.EVT_C_STORE, self.retriever.scp.handle_store)],
            )
            if not accepted(assoc, STUDY_ROOT_GET):
                close_association(assoc)
                raise GetUnavailable(f"site {self.site.name}: the PACS refused Study Root C-GET")
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
        classes_of: Mapping[str, str] | None = None,
        store_spec: Mapping[str, Any] | None = None,
        mode: str | None = None,
    ) -> RetrieveOutcome:
        """Retrieve a study, a series or a list of instances from ``site`` into ``sink``.

        ``mode``: "get" or "move" for this call (default: from ``site.retrieve``, where
        "auto" means C-MOVE).

        ``expected`` holds the SOP Instance UIDs that must arrive (from C-FIND); only these
        and ``sop_uids`` are accepted by the storage SCP, and only from ``site``. ``sink``
        runs in a pynetdicom thread for each object as it arrives. ``sop_classes`` (or
        ``classes_of``, SOP Instance UID -> SOP Class UID) says which storage classes a C-GET
        must offer; a C-GET that needs more classes than one association holds is split by
        class (the classes are asked for with a C-FIND when the caller does not know them).
        An IMAGE-level list of more than ``BATCH_SIZE`` UIDs goes out in bounded requests.
        Raises RetrieveTimeout if the PACS goes silent for ``site.timeout`` seconds,
        IncompleteRetrieve (a RetrieveError) if it finishes with objects missing,
        GetUnavailable if the PACS does not serve this C-GET (a C-MOVE may), RetrieveError
        for other refusals, failures and aborts.
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
        started = time.monotonic()
        requests = self._plan(
            site, mode, level, study_uid, series_uid, sop_uids, expected, sop_classes, classes_of
        )
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
            source=site,
        )
        codes: list[int] = []
        try:
            for identifier, need in requests:
                codes.append(self._exchange(site, mode, need, identifier, watch, expectation))
                if status_category(codes[-1]) in (FAILURE, CANCEL):
                    break
        finally:
            try:
                # A receiver process reports stored objects asynchronously: wait for them.
                self.scp.sync(expectation)
            finally:
                expectation.cancel()
        # The final status of the whole: the first that is not a success, else success.
        code = next((c for c in codes if status_category(c) != SUCCESS), codes[-1])
        received = expectation.received
        missing = set(expected) - received
        elapsed = time.monotonic() - started
        name = status_name(mode, code)
        outcome = RetrieveOutcome(received, missing, name, elapsed, code)
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
        hint = ""
        if mode == "get" and not received & set(expected) and classes_of:
            # Every transfer syntax the bridge knows was offered on its own context: a PACS
            # that sends nothing holds the objects in another one (or cannot send them).
            classes = sorted({classes_of[u] for u in missing if u in classes_of})
            hint = (
                f"; SOP class {', '.join(classes)}: not sent on any of the "
                f"{len(GET_SYNTAXES)} transfer syntaxes offered (the PACS may hold it in a "
                "syntax the bridge does not accept; it never asks for a transcoding)"
            )
        if cat in (SUCCESS, WARNING):
            raise IncompleteRetrieve(
                f"site {site.name}: delivered {got} of {len(expected)} ({name}){hint}", outcome
            )
        what = "cancelled" if cat == CANCEL else "failed"
        assert cat in (CANCEL, FAILURE)
        raise IncompleteRetrieve(
            f"site {site.name}: C-{mode.upper()} {what}: {name}; delivered {got} of "
            f"{len(expected)}{hint}",
            outcome,
        )

    def _plan(
        self,
        site: SiteSettings,
        mode: str,
        level: str,
        study_uid: str,
        series_uid: str | None,
        sop_uids: list[str] | None,
        expected: set[str],
        sop_classes: set[str] | None,
        classes_of: Mapping[str, str] | None,
    ) -> list[tuple[Dataset, frozenset[str]]]:
        """The requests of one retrieval: (identifier, storage classes a C-GET needs)."""

        def ident(lvl: str, series: str | None, uids: list[str] | None) -> Dataset:
            ds = Dataset()
            ds.QueryRetrieveLevel = lvl
            ds.StudyInstanceUID = study_uid
            if lvl in ("SERIES", "IMAGE"):
                ds.SeriesInstanceUID = series
            if lvl == "IMAGE":
                assert uids
                ds.SOPInstanceUID = list(uids) if len(uids) > 1 else uids[0]
            return ds

        def images(series: str | None, uids: list[str], need: frozenset[str]) -> list[Any]:
            return [
                (ident("IMAGE", series, uids[i : i + BATCH_SIZE]), need)
                for i in range(0, len(uids), BATCH_SIZE)
            ]

        wanted = list(dict.fromkeys(sop_uids or sorted(expected)))
        known = dict(classes_of or {})
        classes = set(sop_classes or ()) | {known[u] for u in wanted if u in known}
        if mode == "move" or (classes and len(classes) <= CLASSES_PER_GET):
            need = frozenset(classes) if mode == "get" else frozenset()
            if level == "IMAGE":
                return images(series_uid, wanted, need)
            return [(ident(level, series_uid, None), need)]
        # A C-GET whose classes do not fit one association (or are unknown): one request per
        # group of classes, naming its instances.
        series_of: dict[str, str] = {}
        if not wanted or any(u not in known for u in wanted) or (level == "STUDY"):
            for ds in self._classes(site, level, study_uid, series_uid):
                uid = str(ds.get("SOPInstanceUID", ""))
                if uid and (not wanted or uid in set(wanted)):
                    known.setdefault(uid, str(ds.get("SOPClassUID", "")))
                    series_of[uid] = str(ds.get("SeriesInstanceUID", "") or series_uid or "")
            if not wanted:
                wanted = sorted(series_of)
        unknown = [u for u in wanted if not known.get(u)]
        if unknown:
            raise RetrieveError(
                f"site {site.name}: the SOP class of {len(unknown)} object(s) is unknown "
                "(C-FIND gave none): cannot offer C-GET storage contexts for them"
            )
        requests: list[tuple[Dataset, frozenset[str]]] = []
        for group in class_groups(known[u] for u in wanted):
            members = [u for u in wanted if known[u] in group]
            by_series: dict[str, list[str]] = {}
            for u in members:
                by_series.setdefault(series_of.get(u) or series_uid or "", []).append(u)
            for se, uids in by_series.items():
                if not se:
                    raise RetrieveError(
                        f"site {site.name}: no series known for {len(uids)} object(s)"
                    )
                requests += images(se, uids, frozenset(group))
        if not requests:
            raise RetrieveError(f"site {site.name}: C-FIND lists no instance to retrieve")
        if len(requests) == 1 and level != "IMAGE":
            requests = [(ident(level, series_uid, None), requests[0][1])]
        return requests

    def _classes(
        self, site: SiteSettings, level: str, study_uid: str, series_uid: str | None
    ) -> list[Dataset]:
        """The instances (SOP Instance, Class and Series UIDs) of a study or series."""
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = series_uid if level != "STUDY" and series_uid else ""
        q.SOPInstanceUID = ""
        q.SOPClassUID = ""
        return c_find(site, self.bridge, "IMAGE", q)

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
        deadline: float | None = None
        for attempt in (1, 2):
            # One deadline for the first answer, whatever stale associations cost before it.
            conn, reused = pool.acquire(mode, need, deadline=deadline)
            deadline = conn.deadline
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
                wd = Watchdog(conn.assoc, site.timeout, since=deadline - site.timeout)
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
