"""The DUL (upper layer) of the fast path: pynetdicom's reactor, waiting in ``select``
instead of a 1 ms polling loop, with the PDU limits of docs/DICOM.md enforced as PDUs are
read, and P-DATA-TF PDUs handed straight to DIMSE in the data-transfer state.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import queue
import select
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from pynetdicom import _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_P_ABORT, P_DATA
from pynetdicom.transport import AssociationSocket

from mdm.dicom.fast import compiled
from mdm.dicom.fast.transport import FastAssociationSocket
from mdm.dicom.limits import (
    ASSOCIATE_DEADLINE,
    DEFAULT_MAX_PDU,
    MAX_ASSOCIATE_PDU,
    MAX_MESSAGE_BYTES,
    PART10_PREFIX,
    PDU_SLACK,
    PeerViolation,
)
from mdm.dicom.part10 import PREAMBLE, file_meta

if TYPE_CHECKING:
    from mdm.dicom.fast._pdata import Reader

log = logging.getLogger(__name__)


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue whose ``put`` from another thread wakes the DUL reactor out of ``select``."""

    def __init__(self, dul: FastDUL) -> None:
        super().__init__()
        self._dul = dul

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        if threading.current_thread() is not self._dul:
            self._dul.wake()


class ReceivedDataSet(io.BytesIO):
    """The data set of a C-STORE-RQ the compiled loop received whole (its Part-10 header
    first), as pynetdicom's ``C_STORE.DataSet`` must be a BytesIO.

    ``getbuffer()`` is a read-only view of the loop's own buffer: the object is never copied
    on its way to the store. The first use as a file (read, seek, ...) copies it into this
    BytesIO once, so pynetdicom's decoders see an ordinary stream."""

    def __init__(self, message: Any) -> None:
        super().__init__()
        self._message: Any = message

    def _as_file(self) -> None:
        message, self._message = self._message, None
        if message is not None:
            super().write(memoryview(message))
            super().seek(0)

    def getbuffer(self) -> memoryview:
        if self._message is not None:
            return memoryview(self._message)
        return super().getbuffer()

    def getvalue(self) -> bytes:
        if self._message is not None:
            return bytes(memoryview(self._message))
        return super().getvalue()

    def read(self, size: int | None = -1) -> bytes:
        self._as_file()
        return super().read(size)

    def read1(self, size: int | None = -1) -> bytes:
        self._as_file()
        return super().read1(size)

    def readinto(self, buffer: Any) -> int:
        self._as_file()
        return super().readinto(buffer)

    def readline(self, size: int | None = -1) -> bytes:
        self._as_file()
        return super().readline(size)

    def seek(self, pos: int, whence: int = 0) -> int:
        self._as_file()
        return super().seek(pos, whence)

    def tell(self) -> int:
        self._as_file()
        return super().tell()

    def write(self, data: Any) -> int:
        self._as_file()
        return super().write(data)


_PDU_TYPES = frozenset(range(0x01, 0x08))
_PDV_LENGTH = struct.Struct(">L")


def pdv_items(body: memoryview) -> list[tuple[int, memoryview]] | None:
    """The (context ID, presentation data value) items of a P-DATA-TF body (PS3.8 9.3.5.1),
    as views of ``body``; None if the items do not exactly fill it or one holds no data."""
    items: list[tuple[int, memoryview]] = []
    off, end = 0, len(body)
    while off < end:
        if off + 6 > end:
            return None
        (length,) = _PDV_LENGTH.unpack_from(body, off)
        if length < 2 or off + 4 + length > end:
            return None
        items.append((body[off + 4], body[off + 5 : off + 4 + length]))
        off += 4 + length
    return items or None


class FastDUL(DULServiceProvider):
    """pynetdicom's DUL reactor, sleeping in ``select`` instead of a 1 ms polling loop.

    The loop is pynetdicom's own (``DULServiceProvider.run_reactor``, 3.0) except for the
    wait between idle rounds: it blocks until the socket has data, another thread queued a
    primitive or an event (``_WakingQueue``), the reactor is stopped, or ``IDLE_WAIT``
    passed (so the ARTIM and idle timers are still checked). A PDU is therefore read the
    moment it arrives, and an idle association costs nothing.
    """

    IDLE_WAIT = 0.05

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self.event_queue = _WakingQueue(self)
        self.to_provider_queue = _WakingQueue(self)
        self._wake_r = -1
        self._wake_w = -1
        self.gate: Callable[[], None] | None = None
        """Called once when an inbound connection is associated or ends (the server's
        count of unassociated connections)."""
        self._associate_by = 0.0
        """Monotonic deadline for an inbound peer to get associated (0: none, or done)."""
        self.compiled = compiled.enabled()
        """P-DATA-TF PDUs of C-STORE requests (from a PACS delivering a C-MOVE to the storage
        SCP, or answering our C-GET) are read by the compiled loop (``_pdata``)."""
        self._reader: Reader | None = None
        self._store: tuple[C_STORE, int] | None = None
        self._nothing_read = False

    def peer(self) -> str:
        """The peer, as log lines name it (site if known, AE title, address)."""
        a = self.assoc
        site = getattr(a, "mdm_site", "")
        other = a.requestor if a.is_acceptor else a.acceptor
        try:
            ae = str(other.ae_title or "").strip()
        except Exception:
            ae = ""
        ae = "".join(c if " " <= c < "\x7f" else "?" for c in ae)
        try:
            where = f"{other.address}:{other.port}" if other.address_info else "?"
        except Exception:
            where = "?"
        label = f"AE {ae!r} at {where}" if ae else f"peer at {where}"
        return f"site {site} ({label})" if site else label

    def _pdu_problem(self, pdu_type: int, length: int) -> str | None:
        """Why a PDU announced by its header is refused before its body is read, or None."""
        if pdu_type not in _PDU_TYPES:
            return f"unknown PDU type 0x{pdu_type:02X}"
        if pdu_type in (0x03, 0x05, 0x06, 0x07):
            return None if length == 4 else f"PDU type 0x{pdu_type:02X} of length {length}"
        if pdu_type in (0x01, 0x02) or self._associate_by:
            if length > MAX_ASSOCIATE_PDU:
                return f"PDU of {length} bytes before association (limit {MAX_ASSOCIATE_PDU})"
            return None
        mine = self.assoc.acceptor if self.assoc.is_acceptor else self.assoc.requestor
        limit = int(mine.maximum_length or 0) or DEFAULT_MAX_PDU
        limit += PDU_SLACK
        if length > limit:
            return f"P-DATA-TF of {length} bytes, over the maximum of {limit}"
        return None

    _last_pdu = 0.0

    def _stall_limit(self) -> float:
        sock = self.socket
        stall = sock.stall_timeout if isinstance(sock, FastAssociationSocket) else None
        return float(stall or 0)

    def _stalled(self) -> bool:
        """A message was begun and nothing has come for the stall timeout: a peer that
        announced a data set and never sends it would otherwise hold the association (and
        its retrieval) until the idle timeout."""
        limit = self._stall_limit()
        return bool(limit) and time.monotonic() - self._last_pdu > limit

    def _message_begun(self) -> bool:
        reader = self._reader
        return self.assoc.dimse.message is not None or (reader is not None and reader.in_progress)

    def _release_gate(self) -> None:
        gate, self.gate = self.gate, None
        self._associate_by = 0.0
        if gate is not None:
            gate()

    def wake(self) -> None:
        """Interrupt the reactor's wait (any thread)."""
        w = self._wake_w
        if w >= 0:
            try:
                os.write(w, b"\0")
            except OSError:  # full (already woken) or closed (reactor ended)
                pass

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def stop_dul(self) -> bool:
        stopped = super().stop_dul()
        self.wake()
        return stopped

    def _wait(self) -> None:
        if not self.event_queue.empty() or not self.to_provider_queue.empty():
            return
        fds = [self._wake_r]
        sock = self.socket
        raw = sock.socket if sock is not None and sock._is_connected else None
        if raw is not None:
            if isinstance(raw, ssl.SSLSocket) and raw.pending():
                return
            try:
                fd = raw.fileno()
            except OSError:
                fd = -1
            if fd >= 0:
                fds.append(fd)
        try:
            ready, _, _ = select.select(fds, [], [], self.IDLE_WAIT)
        except (OSError, ValueError):  # the socket was closed under us: next round sees it
            time.sleep(0.001)
            return
        if len(fds) > 1 and fds[1] in ready and isinstance(sock, FastAssociationSocket):
            sock.readable = True
        if self._wake_r in ready:
            try:
                os.read(self._wake_r, 4096)
            except OSError:
                pass

    def _read_pdu_data(self) -> None:
        """Read one PDU, as pynetdicom does; a P-DATA-TF in the data-transfer state goes
        straight to the DIMSE provider.

        For a P-DATA-TF received in Sta6 pynetdicom's state machine has a single action
        (DT-2: pass a P-DATA indication to DIMSE, stay in Sta6); getting there costs a
        decode into PDU objects, two copies of the data and two queue hand-offs, for each
        of the several PDUs of every object received. Here the PDV items are cut from the
        received buffer (views, no copy) and handed to DIMSE in this thread, when nothing
        is queued before them and nothing is bound to the PDU events. Every other PDU,
        state, or malformed item list takes pynetdicom's path (``_decode_pdu``), which
        raises the events it always raised.
        """
        sock = cast(AssociationSocket, self.socket)
        deadline = self._associate_by or None
        head = bytearray()
        if self.compiled and self._can_pump(sock):
            head = bytearray(self._pump(cast(FastAssociationSocket, sock)))
            if not head:
                return
        body = bytearray()
        try:
            if head:
                pass  # read by the compiled loop: a PDU that is not a P-DATA-TF
            elif isinstance(sock, FastAssociationSocket):
                head = sock.recv(6, quickack=False, deadline=deadline)
            else:
                head = sock.recv(6)
            if len(head) == 6:
                pdu_type, _, length = struct.unpack(">BBL", head)
                problem = self._pdu_problem(pdu_type, length)
                if problem is not None:
                    raise PeerViolation(problem)
                if isinstance(sock, FastAssociationSocket):
                    body = sock.recv(length, deadline=deadline)
                else:
                    body = sock.recv(length)
        except (OSError, TimeoutError) as exc:
            if deadline is not None and time.monotonic() >= deadline:
                raise PeerViolation(
                    f"no association within {ASSOCIATE_DEADLINE:g}s of connecting"
                ) from None
            log.warning("%s: connection lost mid-PDU (%s)", self.peer(), type(exc).__name__)
            self.event_queue.put("Evt17")
            return
        if len(head) != 6 or len(body) != length:
            self.event_queue.put("Evt17")
            return
        if pdu_type == 0x04:
            items = pdv_items(memoryview(body))
            if items is None:
                raise PeerViolation("P-DATA-TF with malformed presentation data value items")
        if (
            pdu_type == 0x04
            and self.state_machine.current_state == "Sta6"
            and self.event_queue.empty()
            and not self.assoc.get_handlers(evt.EVT_DATA_RECV)
            and not self.assoc.get_handlers(evt.EVT_PDU_RECV)
        ):
            primitive = P_DATA()
            # Views, not bytes: DIMSE only indexes, slices and copies them out.
            primitive.presentation_data_value_list.extend(cast(Any, items))
            self.assoc.dimse.receive_primitive(primitive)
            return
        head += body
        try:
            pdu, event = self._decode_pdu(head)
        except Exception as exc:
            raise PeerViolation(
                f"undecodable PDU type 0x{pdu_type:02X} ({type(exc).__name__})"
            ) from None
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    PUMP_WAIT = 0.05
    """Seconds the compiled loop waits at a PDU boundary inside an object before it returns
    to the reactor loop (for its timers; another thread's request wakes it at once)."""

    def _can_pump(self, sock: AssociationSocket) -> bool:
        """The compiled loop may read the next PDUs: data transfer, nothing queued, nothing
        bound to the events it skips, no message part-read by the Python path, plain TCP."""
        raw = sock.socket
        return (
            self.state_machine.current_state == "Sta6"
            and self.event_queue.empty()
            and isinstance(sock, FastAssociationSocket)
            and raw is not None
            and not isinstance(raw, ssl.SSLSocket)
            and self.assoc.dimse.message is None
            and not _config.STORE_RECV_CHUNKED_DATASET
            and not self.assoc.get_handlers(evt.EVT_DATA_RECV)
            and not self.assoc.get_handlers(evt.EVT_PDU_RECV)
            and not self.assoc.get_handlers(evt.EVT_DIMSE_RECV)
        )

    def _pump(self, sock: FastAssociationSocket) -> bytes:
        """Let the compiled loop read P-DATA-TF PDUs until an object is complete (served at
        once) or something needs this path: returns the header of a PDU that is not a
        P-DATA-TF (its body unread), else b"" (nothing left to do for this round)."""
        pdata = compiled.module()
        reader = self._reader
        if reader is None:
            mine = self.assoc.acceptor if self.assoc.is_acceptor else self.assoc.requestor
            limit = (int(mine.maximum_length or 0) or DEFAULT_MAX_PDU) + PDU_SLACK
            reader = self._reader = pdata.Reader(limit, MAX_MESSAGE_BYTES)
        raw = sock.socket
        assert raw is not None
        sock.readable = False
        fd = raw.fileno()
        stall = self._stall_limit()
        pdus = reader.pdus
        code = reader.pump(fd, self._wake_r, self.PUMP_WAIT, stall)
        while True:
            if code == pdata.COMMAND:
                prefix = self._start_store(reader)
                if prefix is None:
                    self._python_pdata(reader.decline())
                    return b""
                code = reader.begin(prefix)
                if code == pdata.CONTINUE:
                    code = reader.pump(fd, self._wake_r, self.PUMP_WAIT, stall)
                continue
            if code == pdata.PENDING:
                body = reader.decline()
                report = getattr(self.assoc.dimse.msg_queue, "on_pending", None)
                if report is None or not self.assoc.is_requestor:
                    self._python_pdata(body)
                    return b""
                # What ProgressQueue does with it, without decoding it in Python first.
                report()
                code = reader.pump(fd, self._wake_r, self.PUMP_WAIT, stall)
                continue
            if code == pdata.MESSAGE:
                self._deliver(reader)
            elif code == pdata.OTHER:
                return reader.head
            elif code == pdata.FALLBACK:
                self._python_pdata(reader.body)
            elif code == pdata.CLOSED:
                if reader.problem:
                    log.warning("%s: connection lost (%s)", self.peer(), reader.problem)
                self.event_queue.put("Evt17")
            elif code == pdata.VIOLATION:
                raise PeerViolation(reader.problem)
            else:  # IDLE or WAKE: back to the reactor loop, the object (if any) kept
                self._nothing_read = reader.pdus == pdus
            return b""

    def _start_store(self, reader: Reader) -> bytes | None:
        """The C-STORE-RQ whose command set the compiled loop read, as pynetdicom's primitive
        (through its validating setters), and its Part-10 header; None: the Python path."""
        fields = reader.command
        assert fields is not None
        sop_class, sop_instance, message_id, priority, move_ae, move_id = fields
        cx = self.assoc._accepted_cx.get(reader.context_id)
        if cx is None:
            return None
        req = C_STORE()
        try:
            req.MessageID = message_id
            req.AffectedSOPClassUID = sop_class
            req.AffectedSOPInstanceUID = sop_instance
            if priority is not None:
                req.Priority = priority
            if move_ae is not None:
                req.MoveOriginatorApplicationEntityTitle = move_ae
            if move_id is not None:
                req.MoveOriginatorMessageID = move_id
            head = PREAMBLE + file_meta(sop_class, sop_instance, str(cx.transfer_syntax[0]))
        except (ValueError, TypeError):
            return None
        setattr(req, PART10_PREFIX, len(head))
        self._store = (req, reader.context_id)
        return head

    def _deliver(self, reader: Reader) -> None:
        """A C-STORE-RQ the compiled loop received whole: to DIMSE's message queue, as
        pynetdicom's DIMSE does with a complete message (EVT_DIMSE_RECV has no handler)."""
        context_id, _fields, data = reader.take()
        store, self._store = self._store, None
        assert store is not None
        req = store[0]
        req.DataSet = ReceivedDataSet(data)
        req._context_id = context_id
        req._dataset_path = None
        req._dataset_file = None
        self.assoc.dimse.msg_queue.put((context_id, req))

    def _python_pdata(self, body: bytes) -> None:
        """A P-DATA-TF body the compiled loop left to the Python fast path."""
        items = pdv_items(memoryview(body))
        if items is None:
            raise PeerViolation("P-DATA-TF with malformed presentation data value items")
        primitive = P_DATA()
        primitive.presentation_data_value_list.extend(cast(Any, items))
        self.assoc.dimse.receive_primitive(primitive)

    def run_reactor(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        if self.assoc.is_acceptor:
            wait = min(ASSOCIATE_DEADLINE, self.assoc.acse_timeout or ASSOCIATE_DEADLINE)
            self._associate_by = time.monotonic() + wait
        try:
            self._reactor_loop()
        finally:
            self._release_gate()
            r, w = self._wake_r, self._wake_w
            self._wake_r = self._wake_w = -1
            os.close(w)
            os.close(r)

    def _reactor_loop(self) -> None:
        self._idle_timer.start()
        wait = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                wait = True
            if wait:
                self._wait()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._associate_by:
                    if self.state_machine.current_state == "Sta6":
                        self._release_gate()
                    elif time.monotonic() > self._associate_by:
                        raise PeerViolation(
                            f"no association within {ASSOCIATE_DEADLINE:g}s of connecting"
                        )
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    if self._nothing_read:  # the compiled loop waited, and nothing came
                        self._nothing_read = False
                    else:
                        self._idle_timer.restart()
                        self._last_pdu = time.monotonic()
                elif self._message_begun() and self._stalled():
                    raise PeerViolation(
                        f"a DIMSE message left incomplete for {self._stall_limit():g}s"
                    )
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    wait = True
                    continue
                self.state_machine.do_action(event)
                wait = False
            except Exception as exc:
                # As pynetdicom does: bypass the state machine and send an A-ABORT.
                if isinstance(exc, PeerViolation):
                    log.error("%s: %s; association aborted", self.peer(), exc)
                else:  # its text may quote the peer's bytes: the type only
                    log.error(
                        "%s: DICOM upper layer failed (%s); association aborted",
                        self.peer(),
                        type(exc).__name__,
                    )
                self.abort_now()
                return

    def abort_now(self) -> None:
        """Send an A-ABORT (service provider) and end the association, on the DUL thread."""
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = 0x00
        sock = self.socket
        if sock is not None:
            with contextlib.suppress(Exception):  # the connection may be gone already
                sock.send(abort_pdu.encode())
            with contextlib.suppress(Exception):
                sock.close()
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True
        # Wake whoever waits on this association (ACSE negotiation, DIMSE responses), as
        # pynetdicom's own abort actions do.
        indication = A_P_ABORT()
        indication.provider_reason = 0x00
        self.to_user_queue.put(indication)
        self.assoc.dimse.msg_queue.put((None, None))
