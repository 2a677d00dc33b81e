"""The bridge's direct reading of per-object DIMSE command sets gives what pynetdicom gives.

Every command set here is encoded by pynetdicom itself from a primitive; each is then read
both by pynetdicom (``DIMSEMessage.decode_msg`` + ``message_to_primitive``) and by
``mdm.dicom.command`` / ``FastDIMSE``, and the primitives are compared parameter by
parameter. Messages the direct reader must decline are checked to reach pynetdicom's path.
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

import pytest
from pynetdicom import dimse_messages
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import (
    C_FIND_RSP,
    C_GET_RSP,
    C_MOVE_RSP,
    C_STORE_RQ,
    DIMSEMessage,
)
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.pdu_primitives import P_DATA

import mdm.dicom.net  # noqa: F401  (the bridge's pynetdicom settings: no per-PDU log handlers)
from mdm.dicom.command import decode_command, read_command
from mdm.dicom.fast import FastDIMSE

CT = "1.2.840.10008.5.1.4.1.1.2"
MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
GET = "1.2.840.10008.5.1.4.1.2.2.3"

PARAMS = (
    "MessageID",
    "MessageIDBeingRespondedTo",
    "AffectedSOPClassUID",
    "AffectedSOPInstanceUID",
    "Priority",
    "MoveOriginatorApplicationEntityTitle",
    "MoveOriginatorMessageID",
    "Status",
    "NumberOfRemainingSuboperations",
    "NumberOfCompletedSuboperations",
    "NumberOfFailedSuboperations",
    "NumberOfWarningSuboperations",
    "ErrorComment",
    "OffendingElement",
)


def _store_rq(sop_uid: str = "1.2.3.4.5", originator: bool = True, priority: int = 2) -> C_STORE:
    p = C_STORE()
    p.MessageID = 7
    p.AffectedSOPClassUID = CT
    p.AffectedSOPInstanceUID = sop_uid
    p.Priority = priority
    if originator:
        p.MoveOriginatorApplicationEntityTitle = "MDMBRIDGE"
        p.MoveOriginatorMessageID = 3
    p.DataSet = BytesIO(b"\x08\x00\x18\x00\x04\x00\x00\x001.2\x00")
    return p


def _rsp(cls: type[Any], status: int, counts: tuple[int, ...] | None, comment: str = "") -> Any:
    p = cls()
    p.MessageIDBeingRespondedTo = 5
    p.AffectedSOPClassUID = MOVE if cls is C_MOVE else GET
    p.Status = status
    if counts is not None:
        (
            p.NumberOfRemainingSuboperations,
            p.NumberOfCompletedSuboperations,
            p.NumberOfFailedSuboperations,
            p.NumberOfWarningSuboperations,
        ) = counts
    if comment:
        p.ErrorComment = comment
    return p


def _pdatas(message: DIMSEMessage, primitive: Any, max_pdu: int = 0) -> list[P_DATA]:
    message.primitive_to_message(primitive)
    return list(message.encode_msg(1, max_pdu))


def _command_bytes(message: DIMSEMessage, primitive: Any) -> bytes:
    out = b""
    for pdata in _pdatas(message, primitive):
        for _cx, data in pdata.presentation_data_value_list:
            if data[0] & 1:
                out += data[1:]
    return out


def _params(p: Any) -> dict[str, Any]:
    return {k: getattr(p, k, None) for k in PARAMS}


def _by_pynetdicom(pdatas: list[P_DATA]) -> Any:
    msg = DIMSEMessage()
    done = False
    for pdata in pdatas:
        done = msg.decode_msg(pdata)
    assert done
    return msg.message_to_primitive()


def _assoc() -> Association:
    return Association(ApplicationEntity("MDMTEST"), "requestor")


def _received(provider: DIMSEServiceProvider, pdatas: list[P_DATA]) -> Any:
    for pdata in pdatas:
        provider.receive_primitive(pdata)
    cx, primitive = provider.msg_queue.get_nowait()
    assert provider.msg_queue.empty()
    assert cx == primitive._context_id == 1
    return primitive


MESSAGES = [
    pytest.param(C_STORE_RQ, _store_rq(), id="store-with-originator"),
    pytest.param(C_STORE_RQ, _store_rq("1.2.3.4", originator=False, priority=0), id="store-even"),
    pytest.param(C_MOVE_RSP, _rsp(C_MOVE, 0xFF00, (299, 1, 0, 0)), id="move-pending"),
    pytest.param(C_MOVE_RSP, _rsp(C_MOVE, 0x0000, (0, 300, 0, 0)), id="move-success"),
    pytest.param(C_MOVE_RSP, _rsp(C_MOVE, 0x0000, None), id="move-success-no-counts"),
    pytest.param(C_GET_RSP, _rsp(C_GET, 0xFF00, (10, 2, 1, 1)), id="get-pending"),
]


@pytest.mark.parametrize("message_cls,primitive", MESSAGES)
def test_direct_reading_equals_pynetdicom(message_cls: type[Any], primitive: Any) -> None:
    raw = _command_bytes(message_cls(), primitive)
    fast = read_command(raw)
    assert fast is not None
    got, has_data_set, _keyword = fast
    ref = _by_pynetdicom(_pdatas(message_cls(), primitive))
    assert type(got) is type(ref)
    assert _params(got) == _params(ref)
    assert has_data_set == (message_cls is C_STORE_RQ)


@pytest.mark.parametrize("max_pdu", [0, 64, 16384])
def test_fast_provider_delivers_what_pynetdicom_delivers(
    max_pdu: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whole messages through FastDIMSE (fragmented command and data set, several PDVs):
    the per-object ones without pydicom's decoder, the others through it."""
    decoded: list[int] = []
    real_decode = dimse_messages.decode

    def counting_decode(*args: Any) -> Any:
        decoded.append(1)
        return real_decode(*args)

    fast = [(p.values[0], p.values[1], True) for p in MESSAGES]
    slow = [
        (C_FIND_RSP, _find_rsp(), False),
        (C_MOVE_RSP, _rsp(C_MOVE, 0xA701, (0, 0, 3, 0), comment="out of resources"), False),
    ]
    for message_cls, primitive, direct in fast + slow:
        pdatas = _pdatas(message_cls(), primitive, max_pdu)
        ref = _received(DIMSEServiceProvider(_assoc()), pdatas)
        monkeypatch.setattr(dimse_messages, "decode", counting_decode)
        got = _received(FastDIMSE(_assoc()), pdatas)
        monkeypatch.setattr(dimse_messages, "decode", real_decode)
        assert decoded == ([] if direct else [1])
        decoded.clear()
        assert type(got) is type(ref)
        assert _params(got) == _params(ref)
        for keyword in ("DataSet", "Identifier"):
            a, b = getattr(ref, keyword, None), getattr(got, keyword, None)
            assert (a.getvalue() if a else None) == (b.getvalue() if b else None)


def test_command_and_data_set_in_one_pdata() -> None:
    """A peer may put the command and the first data fragments in one P-DATA-TF."""
    pdatas = _pdatas(C_STORE_RQ(), _store_rq(), 0)
    merged = P_DATA()
    for p in pdatas:
        merged.presentation_data_value_list.extend(p.presentation_data_value_list)
    got = _received(FastDIMSE(_assoc()), [merged])
    ref = _received(DIMSEServiceProvider(_assoc()), pdatas)
    assert _params(got) == _params(ref)
    assert got.DataSet.getvalue() == ref.DataSet.getvalue()


def _find_rsp() -> C_FIND:
    p = C_FIND()
    p.MessageIDBeingRespondedTo = 1
    p.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.1"
    p.Status = 0x0000
    return p


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, element, len(value)) + value


def test_declines_what_it_does_not_know() -> None:
    good = _command_bytes(C_STORE_RQ(), _store_rq())
    assert read_command(good) is not None
    # an element outside the per-object set (an error comment on a failed response)
    failed = _command_bytes(
        C_MOVE_RSP(), _rsp(C_MOVE, 0xA701, (0, 0, 3, 0), comment="out of resources")
    )
    assert read_command(failed) is None
    # another message
    assert read_command(_command_bytes(C_FIND_RSP(), _find_rsp())) is None
    # truncated anywhere
    for cut in (1, 7, 9, len(good) - 1):
        assert read_command(good[:cut]) is None
    # a US of the wrong length, a zero-length value, a group other than 0000
    assert decode_command(_element(0x0110, b"\x01\x00\x00\x00")) is None
    assert decode_command(_element(0x0110, b"")) is None
    assert decode_command(struct.pack("<HHI", 8, 0x0110, 2) + b"\x01\x00") is None
    # the same element twice, bytes that are not ASCII, an unprintable UID
    assert decode_command(_element(0x0110, b"\x01\x00") * 2) is None
    assert decode_command(_element(0x1000, b"1.2.\xe93\x00")) is None
    assert decode_command(_element(0x1000, b"1.2\n3\x00")) is None
    # no CommandDataSetType: cannot tell whether a data set follows
    no_type = b"".join(
        _element(e, v)
        for e, v in ((0x0100, b"\x01\x00"), (0x0110, b"\x01\x00"), (0x1000, b"1.2\x00"))
    )
    assert read_command(no_type) is None
    # a value pynetdicom's setter refuses (a UID of 65 characters)
    long_uid = _command_bytes(C_STORE_RQ(), _store_rq("1." + "2" * 62)).replace(
        b"1." + b"2" * 62, b"1." + b"2" * 63
    )
    assert read_command(long_uid) is None


def test_pdv_items_cut_what_pynetdicom_decodes() -> None:
    """P-DATA-TF bodies (one and several PDVs) cut by the DUL's fast path, against
    pynetdicom's own PDU decoding; malformed item lists are declined."""
    from pynetdicom.pdu import P_DATA_TF

    from mdm.dicom.fast import pdv_items

    single = _pdatas(C_STORE_RQ(), _store_rq(), 0)
    merged = P_DATA()
    for p in single:
        merged.presentation_data_value_list.extend(p.presentation_data_value_list)
    for primitive in [*single, merged]:
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        encoded = pdu.encode()
        body = memoryview(encoded)[6:]
        ref = P_DATA_TF()
        ref.decode(encoded)
        want = [(cx, bytes(v)) for cx, v in ref.to_primitive().presentation_data_value_list]
        got = pdv_items(body)
        assert got is not None
        assert [(cx, bytes(v)) for cx, v in got] == want
        # an item that runs past the end, a short tail, an empty item, nothing at all
        assert pdv_items(body[:-1]) is None
        assert pdv_items(memoryview(bytes(body) + b"\x00\x00\x00")) is None
        assert pdv_items(memoryview(bytes(body) + b"\x00\x00\x00\x01\x01\x00")) is None
    assert pdv_items(memoryview(b"")) is None


def test_pdata_tf_encoding_is_byte_identical_to_pynetdicoms() -> None:
    from pynetdicom.pdu import P_DATA_TF

    from mdm.dicom.fast import encode_pdata_tf, encode_store_response

    for cx, pdv in [
        (1, b"\x03" + encode_store_response(CT, "1.2.3.4.5", 7, 0)),
        (255, b"\x02" + bytes(range(256)) * 3),
        (3, b"\x03"),
    ]:
        primitive = P_DATA()
        primitive.presentation_data_value_list.append((cx, pdv))
        ref = P_DATA_TF()
        ref.from_primitive(primitive)
        assert encode_pdata_tf(cx, pdv) == ref.encode()


# ------------------------------------------------------- the compiled receive loop, alike
def _pdu_bytes(pdatas: list[P_DATA]) -> bytes:
    from pynetdicom.pdu import P_DATA_TF

    out = b""
    for p in pdatas:
        pdu = P_DATA_TF()
        pdu.from_primitive(p)
        out += pdu.encode()
    return out


@pytest.mark.parametrize("max_pdu", [0, 16384])
@pytest.mark.parametrize("message_cls,primitive", MESSAGES)
def test_compiled_loop_reads_what_the_python_path_reads(
    message_cls: type[Any], primitive: Any, max_pdu: int
) -> None:
    """The same messages through ``mdm.dicom.fast._pdata``: a C-STORE-RQ is read whole (the
    fields pynetdicom decodes, the data set byte for byte); a pending retrieve response with
    nothing but its counts is read as PENDING with pynetdicom's message ID; the other
    per-object messages are handed back untouched to the Python path."""
    from tests.pdatadrive import drive

    pdatas = _pdatas(message_cls(), primitive, max_pdu)
    events = drive(_pdu_bytes(pdatas))
    if message_cls is not C_STORE_RQ:
        ref = _by_pynetdicom(_pdatas(message_cls(), primitive, max_pdu))
        reportable = (
            getattr(ref, "Status", None) in (0xFF00, 0xFF01)
            and isinstance(ref, C_MOVE | C_GET)
            and ref.ErrorComment is None
            and ref.OffendingElement is None
            and (ref.Identifier is None or not ref.Identifier.getvalue())
        )
        if reportable:
            assert [e[:3] for e in events[:-1]] == [
                ("pending", 1, ref.MessageIDBeingRespondedTo)
            ], events
        else:
            assert all(e[0] == "fallback" for e in events[:-1]), events
        return
    ref = _by_pynetdicom(_pdatas(message_cls(), primitive, max_pdu))
    (message,) = [e for e in events if e[0] == "message"]
    _, cx, fields, data = message
    assert cx == 1
    assert fields == (
        ref.AffectedSOPClassUID,
        ref.AffectedSOPInstanceUID,
        ref.MessageID,
        ref.Priority,
        ref.MoveOriginatorApplicationEntityTitle,
        ref.MoveOriginatorMessageID,
    )
    assert data == ref.DataSet.getvalue()


def test_compiled_loop_declines_what_the_python_path_declines() -> None:
    from tests.pdatadrive import drive

    def one_pdu(raw: bytes) -> bytes:
        return struct.pack(">BBLLBB", 4, 0, len(raw) + 6, len(raw) + 2, 1, 3) + raw

    good = _command_bytes(C_STORE_RQ(), _store_rq())
    assert drive(one_pdu(good))[0][0] == "command"
    declined = [
        _command_bytes(C_MOVE_RSP(), _rsp(C_MOVE, 0xA701, (0, 0, 3, 0), comment="x")),
        _command_bytes(C_FIND_RSP(), _find_rsp()),
        *(good[:cut] for cut in (1, 7, 9, len(good) - 1)),
        _element(0x0110, b"\x01\x00\x00\x00"),
        _element(0x0110, b"\x01\x00") * 2,
        _element(0x1000, b"1.2.\xe93\x00"),
        _element(0x1000, b"1.2\n3\x00"),
    ]
    for raw in declined:
        assert drive(one_pdu(raw))[0] == ("fallback", one_pdu(raw)[6:]), raw
