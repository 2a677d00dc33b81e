"""The storage SCP in a worker process: receiving off the mount's GIL.

pynetdicom receives in Python at roughly 4 ms of CPU per 0.5 MB instance; in the mount's own
process that competes with the FUSE loop serving readers for the one GIL. Here the listener,
and the encryption and writing of what it receives, run in a child process (started with
``spawn``: the parent has threads). The parent keeps the same routing API as
:class:`~mdm.dicom.receiver.StorageSCP`: an expectation registered in the parent is mirrored in
the child before the C-MOVE goes out (a synchronous round trip), the child stores each expected
object itself and reports ``StoredNotice``s back, and :meth:`ProcessStorageSCP.sync` waits
until everything the child received for an expectation has been reported.

C-GET is unchanged: its objects arrive on the parent's own association (``handle_store``).
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mdm.config import BridgeSettings
from mdm.deid import DeidMalformed, DeidRefused
from mdm.dicom.receiver import (
    Expectation,
    ReceivedObject,
    RetrievalEnded,
    Sink,
    StorageSCP,
    StoredNotice,
)
from mdm.errors import IntegrityError, MdmError, StoreFull

log = logging.getLogger(__name__)

_ERRORS: dict[str, type[MdmError]] = {
    "StoreFull": StoreFull,
    "IntegrityError": IntegrityError,
    "DeidRefused": DeidRefused,
    "DeidMalformed": DeidMalformed,
}
START_TIMEOUT = 60.0
SYNC_TIMEOUT = 300.0


@dataclass(frozen=True)
class StoreParams:
    """What the child needs to open the object store (picklable)."""

    cache_dir: Path
    keyring: Path
    max_bytes: int
    chunk_size: int
    keys: Any = None
    """The ``[keys]`` settings (a key service seals without a server; see mdm.keyservice)."""
    token_file: Path | None = None
    fsync: bool = False
    """``[cache] fsync``."""


class ProcessStorageSCP(StorageSCP):
    """A :class:`StorageSCP` whose listener and object writing run in a child process."""

    def __init__(
        self,
        bridge: BridgeSettings,
        allowed_aets: set[str],
        store: StoreParams,
        *,
        log_level: int = logging.INFO,
    ) -> None:
        super().__init__(bridge, allowed_aets)
        self._fixed_allowed = set(allowed_aets)
        self._store_params = store
        self._log_level = log_level
        self._proc: Any = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._exp_ids: dict[int, Expectation] = {}
        self._acks: dict[tuple[str, int], threading.Event] = {}
        self._reader: threading.Thread | None = None
        self._port = 0
        self._fast = False

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the child and wait until it listens (raises OSError if it cannot)."""
        if self._proc is not None:
            return
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_child_main,
            args=(
                self.bridge,
                self._fixed_allowed,
                self._store_params,
                child,
                self._log_level,
                os.getpid(),
            ),
            name="mdm-receiver",
            daemon=True,
        )
        proc.start()
        child.close()
        if not parent.poll(START_TIMEOUT):
            proc.kill()
            raise OSError(0, "the receiver process did not start")
        try:
            msg = parent.recv()
        except EOFError:
            proc.join(5)
            raise OSError(0, "the receiver process exited at start") from None
        if msg[0] == "error":
            proc.join(5)
            raise OSError(msg[1], msg[2])
        self._port = int(msg[1])
        self._fast = bool(msg[2])
        self._proc, self._conn = proc, parent
        self._reader = threading.Thread(target=self._read_loop, name="mdm-receiver-rx", daemon=True)
        self._reader.start()
        log.info(
            "storage SCP %s listening on %s:%d (receiver process %d)",
            self.bridge.ae_title,
            self.bridge.host,
            self._port,
            proc.pid,
        )

    def stop(self) -> None:
        """Stop the child (it finishes storing what it has received). Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            self._send(("stop",))
        except OSError:
            pass
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        if self._reader is not None:
            self._reader.join(5)
        if self._conn is not None:
            self._conn.close()
        for ev in list(self._acks.values()):
            ev.set()
        log.info("storage SCP %s stopped", self.bridge.ae_title)

    @property
    def port(self) -> int:
        if self._proc is None:
            raise RuntimeError("the storage SCP is not running")
        return self._port

    @property
    def fast_path(self) -> bool:
        """True if the receiver process's listener runs on the DICOM fast path."""
        return self._fast

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    @property
    def pid(self) -> int | None:
        """The receiver process's id (None when not running)."""
        return None if self._proc is None else int(self._proc.pid)

    # --- routing -----------------------------------------------------------------------
    def expect(
        self,
        sop_uids: Iterable[str],
        sink: Sink,
        spec: Mapping[str, Any] | None = None,
        *,
        inbound: bool = True,
        source: Any = None,
    ) -> Expectation:
        """Register in the parent, then (for objects that come to the listener) in the child,
        acknowledged before returning. A C-GET's objects arrive on the parent's association:
        no round trip to the child for those."""
        exp = super().expect(sop_uids, sink, spec, inbound=inbound, source=source)
        if self._proc is None or not inbound:
            return exp
        eid = next(self._ids)
        exp.proc_id = eid  # type: ignore[attr-defined]
        self._exp_ids[eid] = exp
        self._request(
            ("expect", eid, sorted(exp.sop_uids), dict(spec or {}), exp.source), ("expected", eid)
        )
        return exp

    def unregister(self, exp: Expectation) -> None:
        super().unregister(exp)
        eid = getattr(exp, "proc_id", None)
        if eid is not None and self._proc is not None:
            self._exp_ids.pop(eid, None)
            try:
                self._send(("cancel", eid))
            except OSError:
                pass

    def sync(self, exp: Expectation) -> None:
        """End ``exp`` in the child and wait until the child reported every object it
        accepted for it. An object of ``exp`` that reaches the child after this is refused
        with 0x0124 (as after a cancellation): none is answered as stored and then not
        reported. Call it once the retrieval is over."""
        eid = getattr(exp, "proc_id", None)
        if eid is None or self._proc is None:
            return
        self._request(("flush", eid), ("flushed", eid), timeout=SYNC_TIMEOUT)

    # --- plumbing ----------------------------------------------------------------------
    def _send(self, msg: tuple[Any, ...]) -> None:
        if self._conn is None:
            raise OSError(0, "receiver process not running")
        with self._send_lock:
            self._conn.send(msg)

    def _request(self, msg: tuple[Any, ...], ack: tuple[str, int], timeout: float = 30.0) -> None:
        ev = threading.Event()
        self._acks[ack] = ev
        try:
            self._send(msg)
            if not ev.wait(timeout):
                raise MdmError(f"the receiver process did not answer {msg[0]!r} in {timeout:.0f}s")
            if not self.running:
                raise MdmError("the receiver process died")
        finally:
            self._acks.pop(ack, None)

    def _read_loop(self) -> None:
        conn = self._conn
        assert conn is not None
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            kind = msg[0]
            if kind in ("expected", "flushed"):
                ev = self._acks.get((kind, msg[1]))
                if ev is not None:
                    ev.set()
            elif kind in ("stored", "failed"):
                self._deliver(msg)
        if self._proc is not None:
            log.error("the receiver process exited unexpectedly")
        for ev in list(self._acks.values()):
            ev.set()

    def _deliver(self, msg: tuple[Any, ...]) -> None:
        from mdm.store.records import ObjectInfo

        kind, eid, sop_uid = msg[0], msg[1], msg[2]
        exp = self._exp_ids.get(eid)
        if exp is None:
            return
        if kind == "stored":
            notice = StoredNotice(sop_uid, ObjectInfo.from_record(msg[3]), None)
            exp.mark_delivered(sop_uid)
            self.count("stored")
        else:
            err_type = _ERRORS.get(msg[3], MdmError)
            # Logged by the receiver process's writer.
            notice = StoredNotice(sop_uid, None, err_type(msg[4]))
            exp.refused += 1
            self.count("refused_sink_error")
        try:
            exp.sink(notice)
        except Exception:
            log.exception("handling a stored object failed")


# ------------------------------------------------------------------------------- child
PARENT_POLL = 0.2
"""Seconds between checks that the parent (the mount) is alive."""


MMAP_THRESHOLD = 1 << 20
"""Allocations of at least this many bytes get their own mapping in the receiver process."""


def _map_large_objects() -> None:
    """Give each allocation of MMAP_THRESHOLD bytes or more (a received object over 1 MiB, its
    receive buffer) its own mapping, returned to the kernel when freed. glibc otherwise raises
    its mmap threshold to the largest block freed (up to 32 MiB), and objects of a few MB then
    come from the heaps of the threads that receive and write them, which fragment: streaming
    2.1 MB objects, the receiver's peak RSS was 144 MB with the default and 114 MB with this
    (README, memory while streaming). Objects under 1 MiB (a 512x512 CT) are unaffected."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (fixed: no dynamic threshold)
    except (OSError, AttributeError):  # not glibc: its own policy stands
        log.debug("mallopt unavailable: the allocator's mmap threshold stands")


def _watch_parent(parent_pid: int) -> None:
    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                # Orphaned: stop at once. Objects being written are lost, as in any crash
                # (the store is crash-safe); the listening socket closes with the process.
                os._exit(0)
            threading.Event().wait(PARENT_POLL)

    threading.Thread(target=watch, name="mdm-parent-watch", daemon=True).start()


def _child_main(
    bridge: BridgeSettings,
    allowed: set[str],
    params: StoreParams,
    conn: multiprocessing.connection.Connection,
    log_level: int,
    parent_pid: int = 0,
) -> None:
    """The receiver process: a storage SCP whose sink encrypts and stores in place.

    It lives no longer than its parent: a watcher thread ends it within ``PARENT_POLL``
    seconds of the parent's death (a kill -9 closes no pipe that a blocked thread would
    notice), so the listening port is free for the next mount at once.
    """
    _watch_parent(parent_pid or os.getppid())
    _map_large_objects()
    from mdm.ops import logs

    # The command's format ($MDM_LOG_FORMAT, inherited); pydicom's warnings quote patient data.
    logs.configure(log_level, logging.StreamHandler(sys.stderr), logs.current_format(), "receiver")
    # Same GIL trade-off as the mount: hand over often between receiving and writing threads.
    sys.setswitchinterval(0.0005)

    from mdm.retrieval.writer import Report, Writer
    from mdm.store.db import open_env
    from mdm.store.keys import LocalKeyring
    from mdm.store.objects import ObjectStore
    from mdm.store.records import ObjectInfo

    send_lock = threading.Lock()

    def send(msg: tuple[Any, ...]) -> None:
        try:
            with send_lock:
                conn.send(msg)
        except OSError:  # the parent is gone (BrokenPipeError): nobody to report to
            os._exit(0)

    try:
        from mdm.keyservice.client import provider_for

        keys: Any = params.keys is not None and provider_for(params.keys, params.token_file)
        keys = keys or LocalKeyring.load(params.keyring, create=True)
        store = ObjectStore(
            params.cache_dir,
            open_env(params.cache_dir),
            keys,
            params.max_bytes,
            params.chunk_size,
            fsync=params.fsync,
        )
        scp = StorageSCP(bridge, allowed)
        scp.start()
    except OSError as e:
        send(("error", e.errno or 0, e.strerror or str(e)))
        return
    except Exception as e:
        send(("error", 0, f"{type(e).__name__}: {e}"))
        return

    # Objects of each expectation still being stored; the expectations whose flush waits
    # for them (answered by the writer that stores the last one, so the main loop never
    # blocks and keeps answering other retrievals' requests); those cancelled meanwhile;
    # those still accepting objects (not flushed or cancelled: their sink refuses what comes
    # after, under the same lock as the count, so no object is answered as stored and then
    # not reported to a retrieval that has ended).
    outstanding: dict[int, int] = {}
    flushing: set[int] = set()
    cancelled: set[int] = set()
    accepting: set[int] = set()
    cv = threading.Condition()
    writer = Writer(store)

    def reporter(eid: int) -> Report:
        def report(obj: ReceivedObject, info: ObjectInfo | None, error: MdmError | None) -> None:
            try:
                if info is not None:
                    send(("stored", eid, obj.sop_uid, info.to_record()))
                else:
                    e = error or MdmError("not stored")
                    send(("failed", eid, obj.sop_uid, type(e).__name__, str(e)))
            finally:
                with cv:
                    outstanding[eid] -= 1
                    drained = outstanding[eid] == 0
                    flush = drained and eid in flushing
                    if flush:
                        flushing.discard(eid)
                    if drained and eid in cancelled and not flush:
                        del outstanding[eid]
                        cancelled.discard(eid)
                if flush:
                    send(("flushed", eid))

        return report

    exps: dict[int, Expectation] = {}

    def make_sink(eid: int, spec: dict[str, Any]) -> Callable[[Any], None]:
        report = reporter(eid)

        def sink(obj: Any) -> None:
            with cv:
                if eid not in accepting:
                    raise RetrievalEnded(obj.sop_uid)
                outstanding[eid] = outstanding.get(eid, 0) + 1
            writer.submit(obj, spec, report)

        return sink

    send(("ready", scp.port, scp.fast_path))
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break  # the mount died: stop with it
            kind = msg[0]
            if kind == "expect":
                _, eid, uids, spec, source = msg
                with cv:
                    outstanding.setdefault(eid, 0)
                    accepting.add(eid)
                exps[eid] = scp.expect(uids, make_sink(eid, spec), spec, source=source)
                send(("expected", eid))
            elif kind == "cancel":
                exp = exps.pop(msg[1], None)
                if exp is not None:
                    exp.cancel()
                with cv:  # forget its count once nothing of it is being stored
                    accepting.discard(msg[1])
                    if outstanding.get(msg[1], 0) == 0 and msg[1] not in flushing:
                        outstanding.pop(msg[1], None)
                    else:
                        cancelled.add(msg[1])
            elif kind == "flush":
                eid = msg[1]
                with cv:
                    accepting.discard(eid)
                    now = outstanding.get(eid, 0) == 0
                    if not now:
                        flushing.add(eid)
                if now:
                    send(("flushed", eid))
            elif kind == "stop":
                break
    finally:
        scp.stop()
        writer.close()
        store.close()
