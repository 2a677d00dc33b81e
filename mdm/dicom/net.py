"""Shared DICOM plumbing: tuned application entities and sockets, deadlines, status names.

Everything here exists because of a pynetdicom default that does not suit a bridge:

* its sockets leave Nagle's algorithm on and read a PDU in 4 KiB ``recv`` calls; we set
  ``TCP_NODELAY`` (and ``TCP_QUICKACK`` on Linux) and read each PDU with ``recv_into``;
* after connecting it clears the socket timeout, so a peer that stops halfway through a PDU
  blocks the reader thread forever; our sockets keep a stall timeout;
* a C-FIND/C-MOVE/C-GET waiting with ``dimse_timeout=None`` is never woken when the
  association dies, and a finite ``dimse_timeout`` cannot express "a deadline that resets
  while the peer makes progress"; :class:`Watchdog` provides both;
* it logs request and response identifiers (patient names and IDs) at INFO, and pydicom logs
  invalid values it decodes: both switched off here, process-wide, because no log line of
  the bridge may carry PHI.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from types import TracebackType
from typing import Any, cast

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
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

    def connect(self, primitive: T_CONNECT) -> None:
        """Connect as pynetdicom does, then tune the socket and restore a stall timeout."""
        super().connect(primitive)
        if self.socket is not None and self._is_connected:
            tune_socket(self.socket)
            # pynetdicom clears the timeout after connect(); the reader thread only calls
            # recv() once select() saw data, so this bounds a peer that stops mid-PDU.
            self.socket.settimeout(self.stall_timeout)

    def recv(self, nr_bytes: int) -> bytearray:
        """Read exactly ``nr_bytes`` (fewer only if the peer closed), in as few calls as can be."""
        sock = self.socket
        assert sock is not None
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        try:
            while got < nr_bytes:
                n = sock.recv_into(view[got:], nr_bytes - got)
                if n == 0:
                    break
                got += n
        finally:
            view.release()
        if _HAS_QUICKACK:
            # Linux leaves quick-ack mode on its own; re-arm it so our C-STORE-RSP/C-FIND
            # requests are not held behind a delayed ACK.
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:
                pass
        if got < nr_bytes:
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
        self.maximum_pdu_size = max_pdu

    def _create_socket(
        self,
        assoc: Association,
        address: AddressInformation,
        tls_args: Any,
    ) -> AssociationSocket:
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
    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = super().get_request()
        tune_socket(client)
        stall = getattr(self.ae, "stall_timeout", None)
        client.settimeout(stall)
        return client, address


class FastAssociation(Association):
    """An acceptor association whose reactor waits on its message queue instead of polling.

    pynetdicom's reactor sleeps 1 ms between polls of the DIMSE message queue; a C-MOVE sends
    its C-STOREs one after another, each waiting for our response, so that sleep is paid on
    every object. This reactor blocks on the queue (with a short timeout, so the release,
    abort and network-timeout checks still run), and is otherwise pynetdicom's own loop.
    Used only for inbound (acceptor) associations, where nothing pauses the reactor to send.
    """

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
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                log.warning("inbound association: network timeout reached; aborting")
                self.abort()
                self.kill()
                return


class _TunedRequestHandler(RequestHandler):
    """pynetdicom's handler, with a FastAssociationSocket and without a deepcopy.

    pynetdicom deep-copies the server's presentation contexts for every inbound association:
    with every storage class times every transfer syntax that is ~60 ms, paid before the first
    C-STORE of every C-MOVE. Negotiation only reads the acceptor's contexts (it builds new
    result contexts), so the association can share the server's list.
    """

    def _create_association(self) -> Association:
        assoc = FastAssociation(self.ae, MODE_ACCEPTOR)
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
    """pynetdicom's value for our maximum receive PDU (0 = unlimited, as in PS3.8)."""
    return max(0, int(max_pdu))


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
    if assoc.is_established:
        return assoc
    elapsed = time.monotonic() - started
    if assoc.is_rejected:
        raise RetrieveError(f"site {site.name}: association rejected ({_reject_reason(assoc)})")
    if elapsed >= 0.9 * site.timeout:
        raise RetrieveTimeout(
            f"site {site.name}: no answer to the association request within {site.timeout:g}s"
        )
    if assoc.is_aborted:
        raise RetrieveError(
            f"site {site.name}: association aborted during negotiation "
            "(malformed answer or abort by the peer)"
        )
    raise RetrieveError(
        f"site {site.name}: cannot connect to {site.host}:{site.port} "
        "(connection refused or closed)"
    )


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

    def __init__(self, assoc: Association, timeout: float) -> None:
        self.assoc = assoc
        self.timeout = timeout
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
        self._last = time.monotonic()
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
