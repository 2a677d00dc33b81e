"""The application entity of the fast path: its associations get the fast layers, and its
server accepts through :class:`~mdm.dicom.fast.transport.GatedServer`."""

from __future__ import annotations

import threading
from typing import Any

from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AddressInformation, AssociationSocket, ThreadedAssociationServer

from mdm.dicom.ae import BridgeAE
from mdm.dicom.fast.association import (
    FastRequestorAssociation,
    install_fast_layers,
    new_acceptor,
)
from mdm.dicom.fast.transport import (
    FastAssociationSocket,
    GatedServer,
    TunedRequestHandler,
    tune_socket,
)


class FastAE(BridgeAE):
    """A :class:`BridgeAE` whose associations use the fast transport, DUL and DIMSE."""

    fast = True

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


def start_server(
    ae: FastAE,
    address: tuple[str, int],
    contexts: list[PresentationContext],
    evt_handlers: list[Any],
) -> ThreadedAssociationServer:
    """Start a non-blocking association server on the fast layers, its accepted sockets
    tuned and its unassociated connections counted."""
    server = ae.make_server(
        address,
        contexts=contexts,
        evt_handlers=evt_handlers,
        server_class=GatedServer,
        request_handler=TunedRequestHandler,
    )
    assert isinstance(server, GatedServer)
    server.new_acceptor = new_acceptor
    thread = threading.Thread(
        target=server.serve_forever, name=f"mdm-scp-{address[1]}", daemon=True
    )
    thread.start()
    # AssociationServer.shutdown() removes itself from this list.
    ae._servers.append(server)
    return server
