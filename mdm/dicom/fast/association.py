"""Associations of the fast path: reactors that block instead of polling, inbound C-STOREs
without a data set answered, and :func:`install_fast_layers`, which gives an association
the fast DUL and DIMSE before it starts.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from typing import Any, cast

from pynetdicom import _config, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from mdm.dicom.fast.dimse import FastDIMSE, InlineStoreQueue, ProgressQueue
from mdm.dicom.fast.dul import FastDUL
from mdm.dicom.status import STORE_CANNOT_UNDERSTAND, STORE_HANDLER_FAILED

log = logging.getLogger(__name__)


def install_fast_layers(assoc: Association) -> None:
    """Give a not-yet-started association a :class:`FastDUL` (before ``set_socket``) and a
    :class:`FastDIMSE` whose message queue fits its role: :class:`ProgressQueue` for ours,
    :class:`InlineStoreQueue` for a PACS's (inbound C-STOREs)."""
    assoc.dul = FastDUL(assoc)
    assoc.dimse = FastDIMSE(assoc)
    assoc.dimse.msg_queue = ProgressQueue(assoc) if assoc.is_requestor else InlineStoreQueue(assoc)


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


class _StoreServer:
    """``serve_store`` for both kinds of association (inbound C-STOREs, and those of our
    C-GETs)."""

    def serve_store(self: Any, req: C_STORE, context_id: int) -> None:
        """A valid C-STORE-RQ on an accepted context, served as pynetdicom's
        ``_serve_request`` and ``StorageServiceClass.SCP`` would (the EVT_C_STORE handler's
        status answers it; 0xC211 if the handler raises; nothing if it aborted), without
        their per-object lookups and validated response primitive: the response is packed
        directly. Anything unusual takes pynetdicom's path."""
        class_uid = req.AffectedSOPClassUID
        cx = self._accepted_cx[context_id]
        if (
            _config.UNRESTRICTED_STORAGE_SERVICE
            or str(cx.abstract_syntax) != class_uid  # refused by the handler, as pynetdicom's
            or class_uid in self.acceptor.accepted_common_extended
            or _service_class(str(class_uid)) is not StorageServiceClass
        ):
            self._serve_request(req, context_id)
            return
        self.dimse.cancel_req = {}
        # Paused while the handler runs (it may send), as pynetdicom's _serve_request does;
        # then as it was: a requestor's reactor, parked on its checkpoint during our C-GET,
        # must still count as paused for the next request (send_c_* waits for that).
        paused, self._is_paused = self._is_paused, True
        status: Any
        try:
            status = evt.trigger(self, evt.EVT_C_STORE, {"request": req, "context": cx.as_tuple})
        except Exception:
            log.exception("the C-STORE handler failed; answering 0x%04X", STORE_HANDLER_FAILED)
            status = STORE_HANDLER_FAILED
        finally:
            self._is_paused = paused
            self.dimse.cancel_req = {}
        if not self.is_established:  # the handler aborted or released
            return
        if (
            type(status) is int
            and req.MessageID is not None
            and cast(FastDIMSE, self.dimse).send_store_response(
                context_id,
                str(class_uid),
                str(req.AffectedSOPInstanceUID),
                int(req.MessageID),
                status,
            )
        ):
            return
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = req.MessageID
        rsp.AffectedSOPInstanceUID = req.AffectedSOPInstanceUID
        rsp.AffectedSOPClassUID = class_uid
        rsp = StorageServiceClass(self).validate_status(status, rsp)
        self.dimse.send_msg(rsp, context_id)


class FastRequestorAssociation(_StoreServer, Association):
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


class FastAssociation(_StoreServer, Association):
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


_SERVICE_CLASSES: dict[str, type] = {}


def _service_class(uid: str) -> type:
    """pynetdicom's service class for the SOP class UID of an accepted context (memoised: the
    classes we accept are a fixed list)."""
    cls = _SERVICE_CLASSES.get(uid)
    if cls is None:
        cls = _SERVICE_CLASSES[uid] = uid_to_service_class(uid)
    return cls


def new_acceptor(ae: ApplicationEntity, gate: Callable[[], None]) -> Association:
    """A not-yet-started acceptor association on the fast layers; ``gate`` is called once
    it is associated or ends (the server's count of unassociated connections)."""
    assoc = FastAssociation(ae, MODE_ACCEPTOR)
    install_fast_layers(assoc)
    cast(FastDUL, assoc.dul).gate = gate
    return assoc


def accepted_context(assoc: Association, primitive: Any) -> Any:
    """The accepted presentation context a received DIMSE primitive came on, or None (the
    association's and the primitive's private fields, read here, where pynetdicom's internals
    are kept)."""
    return assoc._accepted_cx.get(getattr(primitive, "_context_id", None) or 0)
