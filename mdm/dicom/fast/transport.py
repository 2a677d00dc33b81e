"""Transport of the fast path: tuned sockets, and the server that accepts inbound
associations (pynetdicom's ``transport`` module, overridden where it costs time or lets a
peer hold us).

* sockets switch Nagle off (and re-arm quick ACKs on Linux) and read a PDU with
  ``recv_into`` into one buffer instead of pynetdicom's 4 KiB loop;
* after connecting pynetdicom clears the socket timeout, so a peer that stops halfway
  through a PDU blocks the reader thread forever: ours keep a stall timeout;
* the server refuses connections while :data:`~mdm.dicom.limits.MAX_UNAUTHENTICATED` others
  have not yet associated, and its request handler does not deep-copy the presentation
  contexts for every association.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.transport import (
    T_CONNECT,
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from mdm.dicom.limits import MAX_UNAUTHENTICATED

log = logging.getLogger(__name__)

_READ_CHUNK = 1 << 20
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


class GatedServer(ThreadedAssociationServer):
    """An association server that tunes accepted sockets and counts connections that have
    not yet associated (:meth:`verify_request`)."""

    new_acceptor: Callable[[Any, Callable[[], None]], Association]
    """Builds the acceptor association of a connection, given the AE and the callback that
    releases its place among the unassociated (set by :func:`mdm.dicom.fast.start_server`)."""
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


class TunedRequestHandler(RequestHandler):
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
            if isinstance(server, GatedServer):
                server.associated()
            raise

    def _create_association(self) -> Association:
        server = self.server
        assert isinstance(server, GatedServer)
        assoc = server.new_acceptor(self.ae, server.associated)
        assoc._server = server
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
