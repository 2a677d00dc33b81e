"""Shared DICOM plumbing: tuned application entities and sockets, deadlines, status names.

Everything here exists because of a pynetdicom default that does not suit a bridge:

* its sockets leave Nagle's algorithm on and read a PDU in 4 KiB ``recv`` calls; we set
  ``TCP_NODELAY`` (and ``TCP_QUICKACK`` on Linux) and read each PDU with ``recv_into``;
* after connecting it clears the socket timeout, so a peer that stops halfway through a PDU
  blocks the reader thread forever; our sockets keep a stall timeout;
* a C-FIND/C-MOVE/C-GET waiting with ``dimse_timeout=None`` is never woken when the
  association dies, and a finite ``dimse_timeout`` cannot express "a deadline that resets
  while the peer makes progress"; :class:`Watchdog` provides both;
* its reactor threads poll every millisecond (a ``time.sleep(0.001)`` loop in both the DUL
  and the association thread): an idle pooled association costs two thousand wake-ups a
  second, each taking the GIL from the thread serving readers, and a PDU that arrives while
  the DUL sleeps waits for the end of that sleep. :class:`FastDUL` waits in ``select`` on
  the socket and a wake-up pipe instead, and the association reactors block;
* it logs request and response identifiers (patient names and IDs) at INFO, and pydicom logs
  invalid values it decodes: both switched off here, process-wide, because no log line of
  the bridge may carry PHI.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
import warnings
from collections.abc import Callable
from io import BytesIO
from types import TracebackType
from typing import Any, cast

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_P_ABORT, P_DATA
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.status import (
    GENERAL_STATUS,
    QR_FIND_SERVICE_CLASS_STATUS,
    QR_GET_SERVICE_CLASS_STATUS,
    QR_MOVE_SERVICE_CLASS_STATUS,
    STORAGE_SERVICE_CLASS_STATUS,
    code_to_category,
)
from pynetdicom.transport import (
    T_CONNECT,
    AddressInformation,
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from mdm.config import SiteSettings
from mdm.dicom.command import read_command
from mdm.dicom.part10 import PREAMBLE, file_meta, ui_value
from mdm.errors import RetrieveError, RetrieveTimeout

log = logging.getLogger(__name__)

# No PHI in any log line (pynetdicom would print whole identifiers at INFO), and no per-PDU
# debug handlers, which cost CPU on every PDU even when DEBUG is off.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
_config.LOG_HANDLER_LEVEL = "none"
# pydicom validates values as it decodes them and logs an invalid value verbatim (a malformed
# PatientName would land in the log): PACS answers are checked by our own code instead.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
# pydicom also warns (``warnings.warn``) with the offending value in the message, e.g. an
# unknown Specific Character Set as the PACS sent it; printed warnings end up in the logs.
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


class _NoPeerTracebacks(logging.Filter):
    """pynetdicom logs ``LOGGER.exception(exc)`` when a peer's message fails to decode: the
    traceback and the exception's text (which can quote the peer's bytes) become one line
    naming the exception type."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            exc = record.exc_info[1]
            record.msg = "%s (details withheld: they come from the peer)"
            record.args = (type(exc).__name__,)
            record.exc_info = None
            record.exc_text = None
        return True


class _NoPydicomValues(logging.Filter):
    """pydicom logs the values it cannot decode or validate word for word (``Unknown encoding
    'ISO_IR 1^A2'``), whatever level the application sets (its ``config.debug`` resets the
    level). Its warnings are dropped; an error keeps its level and loses its text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return False
        record.msg = "pydicom reported an error (details withheld: they quote DICOM values)"
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        return True


for _name in [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "pydicom"]:
    logging.getLogger(_name).addFilter(_NoPydicomValues())
logging.getLogger("pydicom").addFilter(_NoPydicomValues())

# A logger's filters see only the records logged on it, not its children's: every module
# logger of pynetdicom (all created by the imports above) gets one.
for _name in [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "pynetdicom"]:
    logging.getLogger(_name).addFilter(_NoPeerTracebacks())

# --- limits on what a peer can make us hold (docs/DICOM.md, Limits) -----------------------
MAX_ASSOCIATE_PDU = 1 << 20
"""Largest A-ASSOCIATE-RQ/AC accepted (one with 128 contexts x 30 syntaxes is ~100 KB)."""
DEFAULT_MAX_PDU = 4 << 20
"""The largest PDU we announce when ``bridge.max_pdu`` is 0 (no explicit choice): never
"unlimited", so that a peer cannot make us read a PDU of any length."""
PART10_PREFIX = "_mdm_part10_prefix"
"""Attribute of a received C-STORE request primitive: the length of the Part-10 header
written ahead of its data set in ``DataSet`` (absent: the data set alone)."""
PDU_SLACK = 64
"""Bytes over the announced maximum tolerated (peers differ on what the maximum counts)."""
MAX_MESSAGE_BYTES = 1 << 30
"""Largest DIMSE message (command set and data set) received; the association is aborted."""
ASSOCIATE_DEADLINE = 10.0
"""Seconds an inbound connection has to present its A-ASSOCIATE-RQ."""
MAX_UNAUTHENTICATED = 8
"""Inbound connections that have not yet been associated, at most, per listener."""
_READ_CHUNK = 1 << 20


class PeerViolation(Exception):
    """A peer broke the protocol or a limit: the association is aborted at once. The message
    carries no byte sent by the peer."""


VERIFICATION = "1.2.840.10008.1.1"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
# Uncompressed first: an SCP that picks the first syntax it supports should not be led into
# transcoding plain pixel data into a compressed syntax.
TRANSFER_SYNTAXES: list[str] = [EXPLICIT_VR_LE, IMPLICIT_VR_LE] + [
    ts for ts in ALL_TRANSFER_SYNTAXES if ts not in (EXPLICIT_VR_LE, IMPLICIT_VR_LE)
]
QUERY_SYNTAXES: list[str] = [EXPLICIT_VR_LE, IMPLICIT_VR_LE]

# pynetdicom refuses to request more than 128 presentation contexts (PS3.8: context IDs are
# odd numbers 1..255).
MAX_REQUESTED_CONTEXTS = 128

_HAS_QUICKACK = hasattr(socket, "TCP_QUICKACK")


def tune_socket(sock: socket.socket | None) -> None:
    """Switch Nagle off (and delayed ACKs, where the OS allows) on a TCP socket.

    DIMSE is request/response with small messages (a C-STORE-RSP is ~200 bytes): Nagle plus
    the peer's delayed ACK would add up to 40 ms to every exchange.
    """
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if _HAS_QUICKACK:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    except OSError:  # not TCP (a test socketpair) or already closed: nothing to tune
        pass


class FastAssociationSocket(AssociationSocket):
    """An :class:`AssociationSocket` with TCP tuning, a stall timeout and a faster ``recv``."""

    stall_timeout: float | None = None
    """Seconds a started PDU may stall before the connection counts as broken."""

    connect_failed = False
    """The TCP connection could not be made (pynetdicom only logs why)."""

    def connect(self, primitive: T_CONNECT) -> None:
        """Connect as pynetdicom does, then tune the socket and restore a stall timeout."""
        super().connect(primitive)
        self.connect_failed = not self._is_connected
        if self.socket is not None and self._is_connected:
            tune_socket(self.socket)
            # pynetdicom clears the timeout after connect(); the reader thread only calls
            # recv() once select() saw data, so this bounds a peer that stops mid-PDU.
            self.socket.settimeout(self.stall_timeout)

    readable = False
    """Set by FastDUL when its ``select`` just saw data: the next ``ready`` needs no second
    ``select``. Only the DUL thread reads the socket, so the data is still there."""

    @property
    def ready(self) -> bool:
        if self.readable:
            self.readable = False
            return True
        return super().ready

    def recv(
        self, nr_bytes: int, quickack: bool = True, deadline: float | None = None
    ) -> bytearray:
        """Read exactly ``nr_bytes`` (fewer only if the peer closed), in as few calls as can be.
        ``quickack=False``: leave quick-ack mode alone (a PDU header, its body follows).

        Memory follows what arrives, not what the peer announced: past the first MiB the
        buffer grows (doubling) as data comes in. ``deadline`` (monotonic): raise
        TimeoutError when it passes, however slowly the peer keeps sending.
        """
        sock = self.socket
        assert sock is not None
        buf = bytearray(min(nr_bytes, _READ_CHUNK))
        got = 0
        try:
            while got < nr_bytes:
                if got == len(buf):
                    buf.extend(bytes(min(nr_bytes - got, len(buf))))
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError("deadline passed")
                    stall = self.stall_timeout
                    sock.settimeout(left if stall is None else min(stall, left))
                with memoryview(buf) as view:
                    n = sock.recv_into(view[got:], len(buf) - got)
                if n == 0:
                    break
                got += n
        finally:
            if deadline is not None:
                sock.settimeout(self.stall_timeout)
        if _HAS_QUICKACK and quickack:
            # Linux leaves quick-ack mode on its own; re-arm it so our C-STORE-RSP/C-FIND
            # requests are not held behind a delayed ACK.
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:
                pass
        if got < len(buf):
            del buf[got:]
        return buf


class TunedAE(ApplicationEntity):
    """An :class:`ApplicationEntity` whose associations use :class:`FastAssociationSocket`."""

    def __init__(self, ae_title: str, timeout: float, max_pdu: int = 0) -> None:
        super().__init__(ae_title)
        self.stall_timeout = timeout
        self.acse_timeout = timeout
        self.connection_timeout = timeout
        # Waits for DIMSE messages are bounded by a Watchdog (progress-based), and idle pooled
        # associations are closed by their pool: neither pynetdicom timer fits those rules.
        self.dimse_timeout = None
        self.network_timeout = None
        self.maximum_pdu_size = max_pdu_of(max_pdu)

    def _create_socket(
        self,
        assoc: Association,
        address: AddressInformation,
        tls_args: Any,
    ) -> AssociationSocket:
        # Called by ``associate`` on the new association before it starts.
        if type(assoc) is Association:
            assoc.__class__ = FastRequestorAssociation
        install_fast_layers(assoc)
        sock = FastAssociationSocket(assoc, address=address)
        sock.stall_timeout = self.stall_timeout
        sock.tls_args = tls_args
        tune_socket(sock.socket)
        return sock

    def start_tuned_server(
        self,
        address: tuple[str, int],
        contexts: list[PresentationContext],
        evt_handlers: list[Any],
    ) -> ThreadedAssociationServer:
        """Start a non-blocking association server whose accepted sockets are tuned."""
        server = self.make_server(
            address,
            contexts=contexts,
            evt_handlers=evt_handlers,
            server_class=_TunedServer,
            request_handler=_TunedRequestHandler,
        )
        thread = threading.Thread(
            target=server.serve_forever, name=f"mdm-scp-{address[1]}", daemon=True
        )
        thread.start()
        # AssociationServer.shutdown() removes itself from this list.
        self._servers.append(server)
        return server


class _TunedServer(ThreadedAssociationServer):
    _gate_lock = threading.Lock()
    _unassociated = 0
    """Accepted connections that have not yet been associated (or ended)."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = super().get_request()
        tune_socket(client)
        stall = getattr(self.ae, "stall_timeout", None)
        client.settimeout(stall)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Refuse a connection while MAX_UNAUTHENTICATED others have not yet associated."""
        with self._gate_lock:
            if self._unassociated >= MAX_UNAUTHENTICATED:
                refuse = True
            else:
                refuse = False
                self._unassociated += 1
        if refuse:
            log.warning(
                "refused a connection from %s: %d connections have not presented an "
                "association yet",
                client_address[0] if isinstance(client_address, tuple) else "?",
                MAX_UNAUTHENTICATED,
            )
        return not refuse

    def associated(self) -> None:
        """One connection counted by :meth:`verify_request` associated or ended."""
        with self._gate_lock:
            self._unassociated -= 1


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue whose ``put`` from another thread wakes the DUL reactor out of ``select``."""

    def __init__(self, dul: FastDUL) -> None:
        super().__init__()
        self._dul = dul

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        if threading.current_thread() is not self._dul:
            self._dul.wake()


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
        try:
            if isinstance(sock, FastAssociationSocket):
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
                    self._idle_timer.restart()
                    self._last_pdu = time.monotonic()
                elif self.assoc.dimse.message is not None and self._stalled():
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


def install_fast_layers(assoc: Association) -> None:
    """Give a not-yet-started association a :class:`FastDUL` (before ``set_socket``) and a
    :class:`FastDIMSE` whose message queue fits its role: :class:`ProgressQueue` for ours,
    :class:`_InlineStoreQueue` for a PACS's (inbound C-STOREs)."""
    assoc.dul = FastDUL(assoc)
    assoc.dimse = FastDIMSE(assoc)
    assoc.dimse.msg_queue = ProgressQueue() if assoc.is_requestor else _InlineStoreQueue(assoc)


_IMPLICIT_ELEMENT = struct.Struct("<HHI")  # group, element, 32-bit length


def _implicit(element: int, value: bytes) -> bytes:
    return _IMPLICIT_ELEMENT.pack(0x0000, element, len(value)) + value


def encode_store_response(sop_class: str, sop_instance: str, message_id: int, status: int) -> bytes:
    """The command set of a C-STORE-RSP without a data set (PS3.7 9.3.1.2), Implicit VR LE."""
    body = b"".join(
        (
            _implicit(0x0002, ui_value(sop_class)),
            _implicit(0x0100, struct.pack("<H", 0x8001)),
            _implicit(0x0120, struct.pack("<H", message_id)),
            _implicit(0x0800, struct.pack("<H", 0x0101)),
            _implicit(0x0900, struct.pack("<H", status)),
            _implicit(0x1000, ui_value(sop_instance)),
        )
    )
    return _implicit(0x0000, struct.pack("<I", len(body))) + body


_NO_COMMAND_SET = Dataset()


class _FastMessage(DIMSEMessage):
    """A DIMSE message being received whose command set, when it is one of the per-object
    messages, is read by :func:`mdm.dicom.command.read_command` instead of pydicom.

    pynetdicom's own ``decode_msg`` loop, except at the end of the command set: a message
    ``read_command`` declines is handed back to pynetdicom whole (the message becomes a
    plain ``DIMSEMessage`` and decodes its command set and what follows itself).
    """

    def __init__(self) -> None:  # pynetdicom's, without a subclass's command-set template
        self.context_id = None
        self.encoded_command_set = BytesIO()
        self.data_set = BytesIO()
        # Never read on this path (EVT_DIMSE_RECV has no handler); a fallback decodes its own.
        self.command_set = _NO_COMMAND_SET
        self._data_set_path = None
        self._data_set_file = None
        self._primitive: Any = None
        self._dataset_keyword = ""

    def decode_msg(self, primitive: P_DATA, assoc: Association | None = None) -> bool:
        if primitive.__class__ != P_DATA:
            return False
        pdvs = primitive.presentation_data_value_list
        for index, (context_id, data) in enumerate(pdvs):
            control = data[0]
            if control & 1:
                self.encoded_command_set.write(data[1:])
                if not control & 2:
                    continue
                raw = self.encoded_command_set.getvalue()
                fast = None
                if (
                    assoc is not None
                    and not assoc.get_handlers(evt.EVT_DIMSE_RECV)
                    and not _config.STORE_RECV_CHUNKED_DATASET
                ):
                    fast = read_command(raw)
                if fast is None:
                    rest = P_DATA()
                    rest.presentation_data_value_list.append((context_id, b"\x03" + raw))
                    rest.presentation_data_value_list.extend(pdvs[index + 1 :])
                    self.encoded_command_set = BytesIO()
                    self.__class__ = DIMSEMessage  # type: ignore[assignment]
                    return DIMSEMessage.decode_msg(self, rest, assoc)
                self.context_id = context_id
                self._primitive, has_data_set, self._dataset_keyword = fast
                if not has_data_set:
                    return True
                if type(self._primitive) is C_STORE and assoc is not None:
                    self._write_part10_header(assoc, context_id)
            else:
                cast(BytesIO, self.data_set).write(data[1:])
                if control & 2:
                    return True
        return False

    def _write_part10_header(self, assoc: Association, context_id: int) -> None:
        """Start the data set buffer of a C-STORE request with the Part-10 header of its
        object, so that the received buffer is the whole file and the receiver does not
        copy the data set behind a header (one copy of a 200 MB object, not two). The
        primitive carries the header's length as :data:`PART10_PREFIX`."""
        req = self._primitive
        cx = assoc._accepted_cx.get(context_id)
        if cx is None or not req.AffectedSOPClassUID or not req.AffectedSOPInstanceUID:
            return
        try:
            head = PREAMBLE + file_meta(
                str(req.AffectedSOPClassUID),
                str(req.AffectedSOPInstanceUID),
                str(cx.transfer_syntax[0]),
            )
        except ValueError:  # a UID that is not ASCII: the receiver refuses it
            return
        cast(BytesIO, self.data_set).write(head)
        setattr(req, PART10_PREFIX, len(head))

    def message_to_primitive(self) -> Any:
        primitive = self._primitive
        if self._dataset_keyword:
            setattr(primitive, self._dataset_keyword, self.data_set)
        primitive._context_id = self.context_id
        primitive._dataset_path = None
        primitive._dataset_file = None
        return primitive


def encode_pdata_tf(context_id: int, pdv: bytes) -> bytes:
    """A P-DATA-TF PDU of one presentation data value item (PS3.8 9.3.5)."""
    return _PDATA_HEAD.pack(0x04, 0, len(pdv) + 5, len(pdv) + 1, context_id) + pdv


_PDATA_HEAD = struct.Struct(">BBLLB")  # PDU type, reserved, PDU length, item length, context


class FastDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, with direct encoding and decoding of the per-object
    command sets.

    pynetdicom encodes every response command set through a pydicom ``Dataset`` twice (once
    for the group length): about 1 ms of CPU per received object. A C-STORE-RSP that carries
    only the mandatory fields is packed directly (:func:`encode_store_response`, checked
    byte for byte against pynetdicom's encoding in ``tests/test_dicom_net.py``); anything
    else (an error comment, offending elements, other messages) takes pynetdicom's path.
    ``EVT_DIMSE_SENT`` is not triggered for the packed responses (nothing here binds it).
    Incoming C-STORE-RQ and C-MOVE/C-GET responses are read by :class:`_FastMessage` while
    nothing is bound to ``EVT_DIMSE_RECV``.
    """

    _message_bytes = 0
    _command_done = False

    def receive_primitive(self, primitive: P_DATA) -> None:
        if self.message is None:
            self.message = _FastMessage()
            self._message_bytes = 0
            self._command_done = False
        for _cx, data in primitive.presentation_data_value_list:
            self._message_bytes += len(data)
            # PS3.7 E.2 / PS3.8 E.2: the command set's fragments, then the data set's.
            if data[0] & 1:
                if self._command_done:
                    raise PeerViolation("a command set where a data set was expected")
                if data[0] & 2:
                    self._command_done = True
            elif not self._command_done:
                raise PeerViolation("a data set before its command set")
        if self._message_bytes > MAX_MESSAGE_BYTES:
            raise PeerViolation(f"DIMSE message over {MAX_MESSAGE_BYTES >> 20} MiB")
        super().receive_primitive(primitive)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        if (
            type(primitive) is C_STORE
            and primitive.MessageIDBeingRespondedTo is not None
            and primitive.Status is not None
            and primitive.ErrorComment is None
            and primitive.OffendingElement is None
            and primitive.AffectedSOPClassUID
            and primitive.AffectedSOPInstanceUID
        ):
            try:
                cmd = encode_store_response(
                    str(primitive.AffectedSOPClassUID),
                    str(primitive.AffectedSOPInstanceUID),
                    int(primitive.MessageIDBeingRespondedTo),
                    int(primitive.Status),
                )
            except (ValueError, struct.error):
                cmd = b""
            if cmd and (not self.maximum_pdu_size or len(cmd) + 6 <= self.maximum_pdu_size):
                pdv = b"\x03" + cmd  # last fragment of a command set
                if not self._send_now(context_id, pdv):
                    pdata = P_DATA()
                    pdata.presentation_data_value_list.append((context_id, pdv))
                    self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)

    def _send_now(self, context_id: int, pdv: bytes) -> bool:
        """Write a one-PDV P-DATA-TF straight to the socket when called on the DUL thread
        (an inbound C-STORE served inline) in the data-transfer state with nothing queued
        before it: what the state machine would do (Sta6 + Evt9: DT-1, stay in Sta6), without
        the queue round and pynetdicom's PDU encoder. False: send the usual way."""
        dul = self.dul
        if (
            threading.current_thread() is not dul
            or dul.state_machine.current_state != "Sta6"
            or not dul.to_provider_queue.empty()
            or dul.socket is None
            or self.assoc.get_handlers(evt.EVT_PDU_SENT)
        ):
            return False
        dul.socket.send(encode_pdata_tf(context_id, pdv))
        return True


def _reactor_should_stop(assoc: Association) -> bool:
    """pynetdicom's end-of-round checks of its association reactor (release requested by the
    peer, abort, DUL gone, network idle timeout); True once the association is finished."""
    if assoc.is_established and assoc.acse.is_release_requested():
        assoc.acse.send_release(is_response=True)
        assoc.is_released = True
        return _ended(assoc, evt.EVT_RELEASED)
    if assoc.acse.is_aborted():
        assoc.dul.receive_pdu(wait=False)
        assoc.is_aborted = True
        return _ended(assoc, evt.EVT_ABORTED)
    if not assoc.dul.is_alive():
        assoc.kill()
        return True
    if assoc.dul.idle_timer_expired():
        log.warning("association with %s: network timeout reached; aborting", assoc.name)
        assoc.abort()
        assoc.kill()
        return True
    return False


def _ended(assoc: Association, event: Any) -> bool:
    assoc.is_established = False
    evt.trigger(assoc, event, {})
    assoc.kill()
    return True


class FastRequestorAssociation(Association):
    """A requestor association whose idle reactor sleeps instead of polling every 1 ms.

    pynetdicom's ``send_c_*`` methods pause the reactor (clear ``_reactor_checkpoint`` and
    spin until ``_is_paused``) before they read responses; here the reactor counts as paused
    while it sleeps, so a request never waits for the sleep to end. What the reactor checks
    between sleeps (unsolicited requests, peer release or abort, DUL death) is noticed within
    ``IDLE_WAIT``. Installed on an association built by ``ApplicationEntity.associate`` by
    re-classing it (no state is added).
    """

    IDLE_WAIT = 0.02

    def _run_reactor(self) -> None:
        self._is_paused = False
        while not self._kill:
            self._is_paused = True
            time.sleep(self.IDLE_WAIT)
            self._reactor_checkpoint.wait()
            if self._kill:
                return
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
            if _reactor_should_stop(self):
                return


_PENDING = (0xFF00, 0xFF01)


class ProgressQueue(queue.Queue):  # type: ignore[type-arg]
    """The DIMSE message queue of an outbound association. While a retrieval has set
    :attr:`on_pending`, a pending C-MOVE/C-GET response that carries nothing but its
    sub-operation counts is reported to it on the DUL thread, and not queued for the thread
    that reads the responses: that thread then wakes for C-STOREs (C-GET) and for the final
    response only, not once more per object. pynetdicom does nothing with a pending
    response but count and log it (its response generator; there is no DIMSE timeout to
    reset here, the Watchdog is the deadline and ``on_pending`` touches it).
    """

    on_pending: Callable[[], None] | None = None

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        report = self.on_pending
        msg = item[1]
        if (
            report is not None
            and type(msg) in (C_MOVE, C_GET)
            and msg.MessageIDBeingRespondedTo is not None
            and msg.Status in _PENDING
            and msg.ErrorComment is None
            and msg.OffendingElement is None
            and (msg.Identifier is None or not msg.Identifier.getvalue())
        ):
            report()
            return
        super().put(item, block, timeout)


class _InlineStoreQueue(queue.Queue):  # type: ignore[type-arg]
    """The DIMSE message queue of an inbound association: a C-STORE request on an accepted
    context is served as it is put, on the DUL thread that decoded it, instead of waking the
    association thread for it (one thread hand-off less per object received).

    Only once the association thread has marked the association established (the first
    P-DATA can arrive before it has: pynetdicom's service class then answers nothing),
    when nothing is queued before it (order kept), and when nothing can make pynetdicom's
    ``_serve_request`` abort (a rejected context, a release under way, an invalid
    request): an abort waits for the DUL thread to end, which this thread cannot do.
    The handler's response goes straight to the socket (``FastDIMSE._send_now``).
    """

    def __init__(self, assoc: Association) -> None:
        super().__init__()
        self._assoc = assoc

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        context_id, msg = item
        assoc = self._assoc
        if (
            type(msg) is C_STORE
            and assoc.is_established
            and (msg.is_valid_request or msg.MessageID is not None)
            and context_id in assoc._accepted_cx
            and not assoc._sent_release
            and self.empty()
        ):
            assoc._serve_request(msg, context_id)
            return
        super().put(item, block, timeout)


class FastAssociation(Association):
    """An acceptor association whose reactor waits on its message queue instead of polling.

    pynetdicom's reactor sleeps 1 ms between polls of the DIMSE message queue; a C-MOVE sends
    its C-STOREs one after another, each waiting for our response, so that sleep is paid on
    every object. This reactor blocks on the queue (with a short timeout, so the release,
    abort and network-timeout checks still run), and is otherwise pynetdicom's own loop.
    Used only for inbound (acceptor) associations, where nothing pauses the reactor to send.
    """

    def _serve_request(self, msg: Any, context_id: int) -> None:
        """pynetdicom's, except that a C-STORE lacking its data set (or another mandatory
        field) is answered with a failure, or the association aborted if it cannot be
        answered: pynetdicom drops it silently and the PACS waits for a response until
        its own timeout, holding up the rest of the retrieval."""
        if type(msg) is C_STORE and not msg.is_valid_request and not self._sent_release:
            peer = cast(FastDUL, self.dul).peer()
            if msg.MessageID is None or context_id not in self._accepted_cx:
                log.error("%s: C-STORE without a message ID or context; aborting", peer)
                self.abort()
                return
            log.warning("%s: C-STORE without a data set (or a mandatory field) refused", peer)
            rsp = C_STORE()
            rsp.MessageIDBeingRespondedTo = msg.MessageID
            if msg.AffectedSOPClassUID is not None:
                rsp.AffectedSOPClassUID = msg.AffectedSOPClassUID
            if msg.AffectedSOPInstanceUID is not None:
                rsp.AffectedSOPInstanceUID = msg.AffectedSOPInstanceUID
            rsp.Status = STORE_CANNOT_UNDERSTAND
            self.dimse.send_msg(rsp, context_id)
            return
        super()._serve_request(msg, context_id)

    def _run_reactor(self) -> None:
        self._is_paused = False
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            try:
                context_id, msg = self.dimse.msg_queue.get(timeout=0.02)
            except queue.Empty:
                context_id, msg = None, None
            if msg:
                self._serve_request(msg, cast(int, context_id))
            if _reactor_should_stop(self):
                return


class _TunedRequestHandler(RequestHandler):
    """pynetdicom's handler, with a FastAssociationSocket and without a deepcopy.

    pynetdicom deep-copies the server's presentation contexts for every inbound association:
    with every storage class times every transfer syntax that is ~60 ms, paid before the first
    C-STORE of every C-MOVE. Negotiation only reads the acceptor's contexts (it builds new
    result contexts), so the association can share the server's list.
    """

    def handle(self) -> None:
        try:
            super().handle()
        except Exception:
            # The association never started: its DUL will not release the gate.
            server = self.server
            if isinstance(server, _TunedServer):
                server.associated()
            raise

    def _create_association(self) -> Association:
        assoc = FastAssociation(self.ae, MODE_ACCEPTOR)
        install_fast_layers(assoc)
        if isinstance(self.server, _TunedServer):
            cast(FastDUL, assoc.dul).gate = self.server.associated
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{time.strftime('%Y%m%d%H%M%S')}"
        sock = FastAssociationSocket(assoc, client_socket=self.request)
        sock.stall_timeout = getattr(self.ae, "stall_timeout", None)
        assoc.set_socket(sock)
        acceptor = assoc.acceptor
        acceptor.maximum_length = self.ae.maximum_pdu_size
        acceptor.ae_title = self.server.ae_title
        acceptor.address_info = self.local
        acceptor.implementation_class_uid = self.ae.implementation_class_uid
        acceptor.implementation_version_name = self.ae.implementation_version_name
        acceptor.supported_contexts = self.server.contexts
        assoc.requestor.address_info = self.remote
        handlers = self.server._handlers
        for event, bound in handlers.items():
            if event.is_intervention and bound:
                assoc.bind(event, *bound)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in cast(list[tuple[Any, Any]], bound):
                    assoc.bind(event, handler, args)
        return assoc


def max_pdu_of(max_pdu: int) -> int:
    """The maximum receive PDU we announce: ``bridge.max_pdu``, or DEFAULT_MAX_PDU for 0
    (PS3.8's "unlimited" would let a peer send a PDU of any length)."""
    return int(max_pdu) if int(max_pdu) > 0 else DEFAULT_MAX_PDU


# --- associations ------------------------------------------------------------------------


def open_association(
    ae: TunedAE,
    site: SiteSettings,
    contexts: list[PresentationContext],
    *,
    max_pdu: int,
    ext_neg: list[Any] | None = None,
    evt_handlers: list[Any] | None = None,
) -> Association:
    """Open an association with ``site``; raise RetrieveTimeout/RetrieveError naming the site."""
    started = time.monotonic()
    try:
        assoc = ae.associate(
            site.host,
            site.port,
            contexts=contexts,
            ae_title=site.ae_title,
            max_pdu=max_pdu_of(max_pdu),
            ext_neg=ext_neg,
            evt_handlers=evt_handlers,
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise RetrieveError(f"site {site.name}: cannot open an association: {e}") from None
    assoc.mdm_site = site.name  # type: ignore[attr-defined]  # for the DUL's log lines
    if assoc.is_established:
        return assoc
    elapsed = time.monotonic() - started
    # Say what happened: refused (nothing listens), timed out, rejected (with the reason),
    # or aborted by the peer during negotiation.
    where = f"{site.host}:{site.port}"
    if getattr(getattr(assoc, "dul", None), "socket", None) is not None and getattr(
        assoc.dul.socket, "connect_failed", False
    ):
        if elapsed >= 0.9 * site.timeout:
            raise RetrieveTimeout(
                f"site {site.name}: cannot connect to {where}: timed out after {site.timeout:g}s"
            )
        raise RetrieveError(
            f"site {site.name}: cannot connect to {where}: connection refused or unreachable"
        )
    if assoc.is_rejected:
        raise RetrieveError(f"site {site.name}: association rejected ({_reject_reason(assoc)})")
    if elapsed >= 0.9 * site.timeout:
        raise RetrieveTimeout(
            f"site {site.name}: no answer to the association request within {site.timeout:g}s"
        )
    if assoc.is_aborted:
        raise RetrieveError(
            f"site {site.name}: association aborted by the peer during negotiation "
            "(an A-ABORT, a malformed answer, or the connection closed)"
        )
    raise RetrieveError(f"site {site.name}: the connection to {where} closed during negotiation")


def _reject_reason(assoc: Association) -> str:
    prim = assoc.acceptor.primitive
    if prim is None:
        return "no reason given"
    parts = [
        str(getattr(prim, name, "") or "") for name in ("result_str", "source_str", "reason_str")
    ]
    return ", ".join(p for p in parts if p) or "no reason given"


def close_association(assoc: Association | None) -> None:
    """Release an association politely if it is still up, else make sure it is gone."""
    if assoc is None:
        return
    try:
        if assoc.is_established:
            assoc.release()
        if assoc.is_established or assoc.is_alive():
            assoc.abort()
    except Exception:  # closing must never raise: the caller is already cleaning up
        log.debug("error while closing an association", exc_info=True)


def abort_association(assoc: Association | None) -> None:
    """Abort an association whose state we no longer trust (never raises)."""
    if assoc is None:
        return
    try:
        assoc.abort()
    except Exception:
        log.debug("error while aborting an association", exc_info=True)


def accepted(assoc: Association, abstract_syntax: str, *, as_scp: bool = False) -> bool:
    """True if a presentation context for ``abstract_syntax`` was accepted (in that role)."""
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax == abstract_syntax and (not as_scp or cx.as_scp):
            return True
    return False


def contexts_for(abstract_syntaxes: list[str], syntaxes: list[str]) -> list[PresentationContext]:
    """One requested presentation context per abstract syntax."""
    return [build_context(a, syntaxes) for a in abstract_syntaxes]


# --- deadlines -----------------------------------------------------------------------------


class Watchdog:
    """A progress deadline for one DIMSE exchange on one association.

    pynetdicom's response generators block on the association's message queue. The watchdog
    thread wakes such a wait (by queueing pynetdicom's own "no message" marker, which makes
    the generator yield an empty status) when either ``timeout`` seconds pass without
    :meth:`touch`, or the association dies underneath (peer abort, closed connection), which
    pynetdicom would otherwise never report to a waiter without a DIMSE timeout.
    """

    def __init__(self, assoc: Association, timeout: float, since: float | None = None) -> None:
        self.assoc = assoc
        self.timeout = timeout
        self._since = since
        """When the wait began (monotonic), if before entering: the first deadline counts
        from then (a request that first validated or opened an association)."""
        self.fired = False
        """The deadline passed: the peer went silent."""
        self.died = False
        """The association ended while we were waiting."""
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def touch(self) -> None:
        """Record progress: the deadline starts again from now."""
        self._last = time.monotonic()

    @property
    def tripped(self) -> bool:
        """True if the watchdog woke the waiter (the association must not be reused)."""
        return self.fired or self.died

    def __enter__(self) -> Watchdog:
        self._last = time.monotonic() if self._since is None else self._since
        self._thread = threading.Thread(target=self._run, name="mdm-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._lock:
            self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        poll = min(0.05, self.timeout / 10)
        while not self._stop.wait(poll):
            died = not self.assoc.is_established
            fired = time.monotonic() - self._last > self.timeout
            if not (died or fired):
                continue
            with self._lock:
                if self._stop.is_set():
                    return
                self.died = died and not fired
                self.fired = fired
                # pynetdicom's marker for "no message": the generator aborts the association
                # (if still up) and yields an empty status.
                self.assoc.dimse.msg_queue.put((None, None))
            return


# --- statuses ----------------------------------------------------------------------------

_TABLES: dict[str, dict[int, tuple[str, str]]] = {
    "echo": GENERAL_STATUS,
    "find": {**GENERAL_STATUS, **QR_FIND_SERVICE_CLASS_STATUS},
    "move": {**GENERAL_STATUS, **QR_MOVE_SERVICE_CLASS_STATUS},
    "get": {**GENERAL_STATUS, **QR_GET_SERVICE_CLASS_STATUS},
    "store": {**GENERAL_STATUS, **STORAGE_SERVICE_CLASS_STATUS},
}

PENDING = "Pending"
SUCCESS = "Success"
WARNING = "Warning"
FAILURE = "Failure"
CANCEL = "Cancel"


def status_code(status: Dataset) -> int | None:
    """The (0000,0900) Status of a response, or None for pynetdicom's empty status dataset
    (timeout, abort, invalid response)."""
    code = status.get("Status", None)
    return int(code) if isinstance(code, int) else None


def status_category(code: int) -> str:
    """Pending, Success, Warning, Failure or Cancel (unknown codes count as Failure)."""
    cat = str(code_to_category(code))
    return cat if cat in (PENDING, SUCCESS, WARNING, CANCEL) else FAILURE


def status_name(service: str, code: int) -> str:
    """A readable name for a DIMSE status, e.g. ``Failure 0xA701 (Refused: Out of Resources)``.

    ``service`` is one of ``echo``, ``find``, ``move``, ``get``, ``store``.
    """
    table = _TABLES.get(service, GENERAL_STATUS)
    cat = status_category(code)
    desc = table.get(code, ("", ""))[1]
    return f"{cat} 0x{code:04X}" + (f" ({desc})" if desc else "")


# Status codes the bridge's storage SCP answers with.
STORE_SUCCESS = 0x0000
STORE_NOT_AUTHORISED = 0x0124  # PS3.7 C.5: "Refused: Not Authorized" - nobody asked for it
STORE_NOT_SUPPORTED = 0x0122  # "Refused: SOP Class not supported" - not on its context
STORE_CANNOT_UNDERSTAND = 0xC000  # PS3.4 B.2.3: no data set, or not a well-formed copy
STORE_OUT_OF_RESOURCES = 0xA700  # the cache is full
STORE_PROCESSING_FAILURE = 0x0110  # the sink failed for another reason

__all__ = [
    "CANCEL",
    "FAILURE",
    "PENDING",
    "SUCCESS",
    "WARNING",
    "FastAssociationSocket",
    "TunedAE",
    "Watchdog",
    "abort_association",
    "accepted",
    "close_association",
    "contexts_for",
    "open_association",
    "status_category",
    "status_code",
    "status_name",
    "tune_socket",
]
