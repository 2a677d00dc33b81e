"""DIMSE of the fast path: per-object command sets read and written directly, the message
size and fragment-order limits, and the message queues that serve inbound C-STOREs on the
DUL thread and report pending C-MOVE/C-GET responses without waking the reader.
"""

from __future__ import annotations

import queue
import struct
import threading
from collections.abc import Callable
from io import BytesIO
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.pdu_primitives import P_DATA

from mdm.dicom.command import read_command
from mdm.dicom.fast import compiled
from mdm.dicom.limits import MAX_MESSAGE_BYTES, PART10_PREFIX, PeerViolation
from mdm.dicom.part10 import PREAMBLE, file_meta, ui_value

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


class FastMessage(DIMSEMessage):
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
    Incoming C-STORE-RQ and C-MOVE/C-GET responses are read by :class:`FastMessage` while
    nothing is bound to ``EVT_DIMSE_RECV``.
    """

    _message_bytes = 0
    _command_done = False

    def receive_primitive(self, primitive: P_DATA) -> None:
        if self.message is None:
            self.message = FastMessage()
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
            and self.send_store_response(
                context_id,
                str(primitive.AffectedSOPClassUID),
                str(primitive.AffectedSOPInstanceUID),
                int(primitive.MessageIDBeingRespondedTo),
                int(primitive.Status),
            )
        ):
            return
        super().send_msg(primitive, context_id)

    def send_store_response(
        self, context_id: int, sop_class: str, sop_instance: str, message_id: int, status: int
    ) -> bool:
        """Send a C-STORE-RSP carrying only its mandatory fields, packed directly; False if it
        cannot be (a value out of range, a PDU over the peer's maximum): nothing was sent."""
        try:
            if compiled.available() and getattr(self.dul, "compiled", False):
                pdu = compiled.module().store_response_pdu(
                    context_id, sop_class, sop_instance, message_id, status
                )
            else:
                cmd = encode_store_response(sop_class, sop_instance, message_id, status)
                pdu = encode_pdata_tf(context_id, b"\x03" + cmd)  # last command fragment
        except (ValueError, struct.error):
            return False
        if self.maximum_pdu_size and len(pdu) - 6 > self.maximum_pdu_size:
            return False
        if not self._send_now(pdu):
            pdata = P_DATA()
            pdata.presentation_data_value_list.append((context_id, pdu[11:]))
            self.dul.send_pdu(pdata)
        return True

    def _send_now(self, pdu: bytes) -> bool:
        """Write a one-PDV P-DATA-TF PDU straight to the socket when called on the DUL thread
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
        dul.socket.send(pdu)
        return True


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

    def __init__(self, assoc: Association | None = None) -> None:
        super().__init__()
        self._assoc = assoc

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        report = self.on_pending
        msg = item[1]
        # A C-STORE of a C-GET: served here, on the DUL thread, as an inbound one is
        # (InlineStoreQueue), not by the thread that waits for the C-GET's responses.
        if (
            type(msg) is C_STORE
            and self._assoc is not None
            and msg.is_valid_request
            and _can_serve_inline(self._assoc, self, item[0])
        ):
            self._assoc.serve_store(msg, item[0])  # type: ignore[attr-defined]
            return
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


class InlineStoreQueue(queue.Queue):  # type: ignore[type-arg]
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
            and (msg.is_valid_request or msg.MessageID is not None)
            and _can_serve_inline(assoc, self, context_id)
        ):
            serve = getattr(assoc, "serve_store", None)
            if serve is not None and msg.is_valid_request:
                serve(msg, context_id)
            else:
                assoc._serve_request(msg, context_id)
            return
        super().put(item, block, timeout)


def _can_serve_inline(assoc: Association, q: queue.Queue, context_id: int) -> bool:  # type: ignore[type-arg]
    """A C-STORE can be served on the thread putting it: the association established, its
    context accepted, no release under way, nothing queued before it."""
    return (
        assoc.is_established
        and context_id in assoc._accepted_cx
        and not assoc._sent_release
        and q.empty()
    )
