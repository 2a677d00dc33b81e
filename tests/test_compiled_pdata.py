"""The compiled receive loop (``mdm/dicom/fast/_pdata.pyx``) against pynetdicom's encoding and
the Python fast path, its limits, and a fuzz run of generated and mutated PDU streams.

The loop is driven in-process over a socket pair (``tests/pdatadrive.py``). The fuzz run
(``MDM_FUZZ_PDATA`` streams, default 100,000; seed ``MDM_FUZZ_PDATA_SEED``) checks that no
stream crashes it or makes it return something malformed, and that every stream left
unmutated is read exactly as it was built; command sets are also compared with
``mdm.dicom.command`` (the Python fast path's reader) on mutated bytes.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import sys
import time
from io import BytesIO
from typing import Any

import pytest
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from mdm.dicom.command import decode_command, read_command
from mdm.dicom.fast import compiled, encode_pdata_tf, encode_store_response
from tests.pdatadrive import drive

CT = "1.2.840.10008.5.1.4.1.1.2"
LIMIT = 16384 + 64


def _store_rq(sop: str = "1.2.3.4.5", originator: bool = True, priority: int = 2) -> C_STORE:
    p = C_STORE()
    p.MessageID = 7
    p.AffectedSOPClassUID = CT
    p.AffectedSOPInstanceUID = sop
    p.Priority = priority
    if originator:
        p.MoveOriginatorApplicationEntityTitle = "MDMBRIDGE"
        p.MoveOriginatorMessageID = 3
    p.DataSet = BytesIO(bytes(range(256)) * 40 + b"\x01\x02")
    return p


def _pdus(primitive: Any, max_pdu: int, message: Any = None) -> bytes:
    """The P-DATA-TF PDUs pynetdicom sends for a message, encoded."""
    msg = message or C_STORE_RQ()
    msg.primitive_to_message(primitive)
    out = b""
    for pdata in msg.encode_msg(1, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(pdata)
        out += pdu.encode()
    return out


def _fields(p: C_STORE) -> tuple[Any, ...]:
    return (
        str(p.AffectedSOPClassUID),
        str(p.AffectedSOPInstanceUID),
        p.MessageID,
        p.Priority,
        p.MoveOriginatorApplicationEntityTitle or None,
        p.MoveOriginatorMessageID,
    )


def test_the_compiled_loop_is_built() -> None:
    """scripts/setup builds it; CI runs this, so a build that silently failed is caught."""
    assert compiled.available()


@pytest.mark.parametrize("max_pdu", [0, 200, 1000, 16384])
@pytest.mark.parametrize("originator", [True, False])
def test_reads_what_pynetdicom_sends(max_pdu: int, originator: bool) -> None:
    """Command set and data set as pynetdicom fragments them, two objects in a row: the
    fields its own decoder gives, and the data set byte for byte."""
    first = _store_rq("1.2.3.4.5", originator)
    second = _store_rq("1.2.3.4", originator, priority=0)
    stream = _pdus(first, max_pdu) + _pdus(second, max_pdu)
    events = drive(stream, max_pdu=(max_pdu or 1 << 20) + 64)
    want = [_fields(first), _fields(second)]
    got = [e for e in events if e[0] == "message"]
    assert [e[2] for e in got] == want
    assert [e[3] for e in got] == [first.DataSet.getvalue(), second.DataSet.getvalue()]
    assert [e[1] for e in got] == [1, 1]
    assert events[-1] == ("closed", "")  # then the peer closed, at a PDU boundary
    # Each field is what the Python fast path reads from the same command set.
    for p, fields in zip((first, second), want, strict=True):
        msg = C_STORE_RQ()
        msg.primitive_to_message(p)
        raw = b"".join(
            bytes(data[1:])
            for pdata in msg.encode_msg(1, 0)
            for _cx, data in pdata.presentation_data_value_list
            if data[0] & 1
        )
        read = read_command(raw)
        assert read is not None
        assert _fields(read[0]) == fields


def test_command_and_data_in_one_pdu() -> None:
    p = _store_rq()
    msg = C_STORE_RQ()
    msg.primitive_to_message(p)
    merged = P_DATA()
    for pdata in msg.encode_msg(1, 0):
        merged.presentation_data_value_list.extend(pdata.presentation_data_value_list)
    pdu = P_DATA_TF()
    pdu.from_primitive(merged)
    events = drive(pdu.encode())
    assert events[1][0] == "message"
    assert events[1][3] == p.DataSet.getvalue()


def test_leaves_everything_else_to_the_python_path() -> None:
    """Other messages, C-STOREs it does not read, and other PDUs go back untouched."""
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    stream = _pdus(echo, 0, C_ECHO_RQ())
    events = drive(stream)
    assert events[0] == ("fallback", stream[6:])
    # a C-STORE-RQ declined (the DUL declines one on a context it did not accept)
    stream = _pdus(_store_rq(), 0)
    events = drive(stream, accept=False)
    assert events[0][0] == "command"
    assert events[1][0] == "fallback"
    # a command set split over two PDUs (max PDU 64): the first fragment is the Python path's
    events = drive(_pdus(_store_rq(), 64))
    assert events[0][0] == "fallback"
    # a release request: its header is handed back, its body unread
    assert drive(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00") == [
        ("other", b"\x05\x00\x00\x00\x00\x04")
    ]
    # an element outside the usual set, a C-STORE without a data set, another US length
    p = _store_rq()
    good = _pdus(p, 0)
    odd = good.replace(
        b"\x00\x00\x00\x07\x02\x00\x00\x00\x02\x00", b"\x00\x00\x01\x07\x02\x00\x00\x00\x02\x00"
    )
    assert odd != good
    assert drive(odd)[0][0] == "fallback"


def _move_rsp(status: int, **fields: Any) -> Any:
    from pynetdicom.dimse_primitives import C_GET, C_MOVE

    p = C_GET() if fields.pop("get", False) else C_MOVE()
    p.MessageIDBeingRespondedTo = 5
    p.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.2"
    p.Status = status
    for k, v in fields.items():
        setattr(p, k, v)
    return p


def test_pending_retrieve_responses_are_read_and_nothing_else() -> None:
    """A pending C-MOVE/C-GET response with nothing but its counts is read here (PENDING,
    with its message ID); a final one, or one with an error comment, an offending element
    or an identifier, goes to the Python path."""
    from pynetdicom.dimse_messages import C_GET_RSP, C_MOVE_RSP

    counts = dict(
        NumberOfRemainingSuboperations=3,
        NumberOfCompletedSuboperations=1,
        NumberOfFailedSuboperations=0,
        NumberOfWarningSuboperations=0,
    )
    for status in (0xFF00, 0xFF01):
        for get in (False, True):
            stream = _pdus(
                _move_rsp(status, get=get, **counts), 0, (C_GET_RSP if get else C_MOVE_RSP)()
            )
            assert drive(stream)[0] == ("pending", 1, 5, stream[6:])
    bare = _pdus(_move_rsp(0xFF00), 0, C_MOVE_RSP())
    assert drive(bare)[0][:3] == ("pending", 1, 5)
    for p in (
        _move_rsp(0x0000, **counts),
        _move_rsp(0xA702, **counts),
        _move_rsp(0xFF00, ErrorComment="odd", **counts),
        _move_rsp(0xFF00, OffendingElement=[0x00100010]),
    ):
        stream = _pdus(p, 0, C_MOVE_RSP())
        assert drive(stream)[0] == ("fallback", stream[6:]), p.Status
    with_identifier = _move_rsp(0xFF00, **counts)
    with_identifier.Identifier = BytesIO(b"\x08\x00\x58\x00\x00\x00\x00\x00")
    events = drive(_pdus(with_identifier, 0, C_MOVE_RSP()))
    assert events[0][0] == "fallback"


def _item(cx: int, control: int, data: bytes) -> bytes:
    return struct.pack(">LBB", len(data) + 2, cx, control) + data


def _pdu(*items: bytes) -> bytes:
    body = b"".join(items)
    return struct.pack(">BBL", 4, 0, len(body)) + body


def _command(sop: str = "1.2.3.4.5") -> bytes:
    msg = C_STORE_RQ()
    msg.primitive_to_message(_store_rq(sop))
    return b"".join(
        bytes(data[1:])
        for pdata in msg.encode_msg(1, 0)
        for _cx, data in pdata.presentation_data_value_list
        if data[0] & 1
    )


def test_limits() -> None:
    """The fast path's limits (docs/DICOM.md, Limits), enforced by the compiled loop."""
    cmd = _item(1, 3, _command())
    # a P-DATA-TF over our maximum (+ slack): refused from its header
    big = _pdu(cmd, _item(1, 0, b"\x00" * 300))
    assert drive(big, max_pdu=200)[-1][0] == "violation"
    assert "over the maximum" in drive(big, max_pdu=200)[-1][1]
    # items that do not fill the PDU, an item of fewer than 2 bytes, an empty P-DATA-TF
    for body in (cmd + b"\x00", cmd[:-1], struct.pack(">L", 1) + b"\x01", b""):
        events = drive(struct.pack(">BBL", 4, 0, len(body)) + body)
        assert events[-1] == ("violation", "P-DATA-TF with malformed presentation data value items")
    # a command set where a data set was expected
    events = drive(_pdu(cmd, _item(1, 0, b"ab")) + _pdu(cmd))
    assert events[-1] == ("violation", "a command set where a data set was expected")
    # data after the last fragment of a message
    events = drive(_pdu(cmd, _item(1, 2, b"ab"), _item(1, 0, b"cd")))
    assert events[-1][0] == "violation"
    # the message cap (1 GiB on the bridge; smaller here)
    stream = _pdu(cmd) + b"".join(_pdu(_item(1, 0, b"x" * 1000)) for _ in range(5))
    events = drive(stream, max_message=3000)
    assert events[-1][0] == "violation" and "DIMSE message over" in events[-1][1]
    # a connection that ends inside a PDU, and inside an object
    assert drive(_pdu(cmd)[:-3])[-1] == ("closed", "connection closed mid-PDU")
    events = drive(_pdu(cmd) + _pdu(_item(1, 0, b"ab")))
    assert events[-1] == ("closed", "")


def test_a_stalled_pdu_and_a_waiting_reactor() -> None:
    """A PDU begun and never finished ends after the stall timeout; at a PDU boundary the
    loop waits at most ``wait`` and wakes for the reactor's pipe."""
    m = compiled.module()
    r = m.Reader(LIMIT)
    a, b = socket.socketpair()
    wake_r, wake_w = os.pipe()
    try:
        b.setblocking(False)
        a.sendall(_pdu(_item(1, 3, _command()))[:20])
        t0 = time.monotonic()
        assert r.pump(b.fileno(), wake_r, 0.0, 0.2) == m.CLOSED
        assert 0.15 < time.monotonic() - t0 < 2
        assert r.problem == "stalled mid-PDU"
        r = m.Reader(LIMIT)
        t0 = time.monotonic()
        assert r.pump(b.fileno(), wake_r, 0.1, 5) == m.IDLE
        assert time.monotonic() - t0 < 2
        os.write(wake_w, b"\0")
        assert r.pump(b.fileno(), wake_r, 5, 5) == m.WAKE
    finally:
        a.close()
        b.close()
        os.close(wake_r)
        os.close(wake_w)


def test_store_response_is_byte_identical() -> None:
    m = compiled.module()
    for cx, cls, sop, mid, status in [
        (1, CT, "1.2.3.4.5", 7, 0),
        (255, CT, "1.2.3.4", 65535, 0xA700),
        (3, "1.2.840.10008.5.1.4.1.1.4", "1." + "2" * 62, 0, 0xC000),
    ]:
        want = encode_pdata_tf(cx, b"\x03" + encode_store_response(cls, sop, mid, status))
        assert m.store_response_pdu(cx, cls, sop, mid, status) == want
    for bad in [(256, CT, "1.2", 1, 0), (1, CT, "1.2\xe9", 1, 0), (1, CT, "1.2", 70000, 0)]:
        with pytest.raises(ValueError):
            m.store_response_pdu(*bad)


def test_the_bridge_runs_without_the_extension() -> None:
    """Not built: the Python fast path serves, and one INFO line says so."""
    code = (
        "import logging, sys; sys.modules['mdm.dicom.fast._pdata'] = None; "
        "logging.basicConfig(level=logging.INFO, stream=sys.stdout); "
        "from mdm.dicom.fast import compiled; "
        "print(compiled.available(), compiled.enabled(), compiled.enabled())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.count("compiled DICOM receive loop not built") == 1
    assert out.strip().endswith("False False False")


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(compiled.COMPILED_DICOM_ENV, "0")
    assert not compiled.enabled()
    monkeypatch.setenv(compiled.COMPILED_DICOM_ENV, "1")
    assert compiled.enabled() == compiled.available()


# ---------------------------------------------------------------------------- fuzz
UIDS = ["1.2.3.4.5", "1.2.3.4", CT, "1.2." + "9" * 60, "1.2 ", " 1", "1.2\x00\x00", ""]


def _scramble(rng: random.Random, parts: list[bytes]) -> None:
    """Now and then the elements of a command set out of order, or one of them twice."""
    if rng.random() < 0.05:
        rng.shuffle(parts)
    if rng.random() < 0.05:
        parts.append(rng.choice(parts))


def _random_command(rng: random.Random) -> bytes:
    """A C-STORE-RQ command set, most often well formed, sometimes with odd elements."""

    def el(e: int, v: bytes) -> bytes:
        return struct.pack("<HHI", 0, e, len(v)) + v

    parts = [
        el(0x0002, rng.choice(UIDS).encode() if rng.random() < 0.1 else CT.encode() + b"\x00"),
        el(0x0100, struct.pack("<H", 1 if rng.random() < 0.9 else rng.choice([0x30, 0x8001]))),
        el(0x0110, struct.pack("<H", rng.randrange(65536))),
        el(0x0700, struct.pack("<H", rng.choice([0, 1, 2, 2, 2, 7]))),
        el(0x0800, struct.pack("<H", 0x0001 if rng.random() < 0.9 else 0x0101)),
        el(
            0x1000,
            (rng.choice(UIDS) if rng.random() < 0.2 else f"1.2.3.{rng.randrange(10**6)}").encode(),
        ),
    ]
    if rng.random() < 0.5:
        parts.append(el(0x1030, rng.choice([b"MDMBRIDGE ", b"  A  ", b"\x00\x01", b"AE"])))
        parts.append(el(0x1031, struct.pack("<H", rng.randrange(65536))))
    if rng.random() < 0.05:
        parts.append(el(rng.choice([0x0900, 0x0902, 0x1020]), b"\x00\x00"))
    _scramble(rng, parts)
    body = b"".join(parts)
    return el(0x0000, struct.pack("<I", len(body))) + body


def _random_pending(rng: random.Random) -> bytes:
    """A pending C-MOVE/C-GET response command set, most often as PACS send it."""

    def el(e: int, v: bytes) -> bytes:
        return struct.pack("<HHI", 0, e, len(v)) + v

    def us(v: int) -> bytes:
        return struct.pack("<H", v)

    parts = [
        el(0x0002, rng.choice(UIDS).encode() if rng.random() < 0.1 else CT.encode() + b"\x00"),
        el(0x0100, us(rng.choice([0x8021, 0x8010]) if rng.random() < 0.9 else 0x8001)),
        el(0x0120, us(rng.randrange(65536))),
        el(0x0800, us(0x0101 if rng.random() < 0.9 else 0x0001)),
        el(0x0900, us(rng.choice([0xFF00, 0xFF01]) if rng.random() < 0.9 else 0xA702)),
    ]
    for e in range(0x1020, 0x1024):
        if rng.random() < 0.8:
            parts.append(el(e, us(rng.randrange(65536))))
    if rng.random() < 0.05:
        parts.append(el(rng.choice([0x0902, 0x0901, 0x1000]), b"ab"))
    _scramble(rng, parts)
    if rng.random() < 0.1:
        parts = [p for p in parts if rng.random() < 0.8]
    body = b"".join(parts)
    return el(0x0000, struct.pack("<I", len(body))) + body


def _python_pending(raw: bytes) -> int | None:
    """The message ID if the Python path would take ``raw`` for a pending response that
    ProgressQueue reports without queueing it, else None."""
    d = decode_command(raw)
    allowed = {
        "CommandGroupLength", "AffectedSOPClassUID", "CommandField", "Status",
        "MessageIDBeingRespondedTo", "CommandDataSetType", "NumberOfRemainingSuboperations",
        "NumberOfCompletedSuboperations", "NumberOfFailedSuboperations",
        "NumberOfWarningSuboperations",
    }  # fmt: skip
    if (
        d is None
        or not d.keys() <= allowed
        or d.get("CommandField") not in (0x8021, 0x8010)
        or d.get("Status") not in (0xFF00, 0xFF01)
        or d.get("CommandDataSetType") != 0x0101
        or "MessageIDBeingRespondedTo" not in d
    ):
        return None
    return int(d["MessageIDBeingRespondedTo"])


def _random_stream(rng: random.Random) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """PDUs of 1-3 C-STOREs fragmented at random, and what each should read as."""
    out = b""
    built = []
    for _ in range(rng.randint(1, 3)):
        cmd = _random_command(rng)
        data = rng.randbytes(rng.choice([1, 2, 100, 1000, 5000]))
        frag = rng.choice(
            [1, 7, 64, 500, 4000, 16000] if len(data) <= 100 else [64, 500, 4000, 16000]
        )
        items = [_item(1, 3, cmd)]
        for i in range(0, len(data), frag):
            last = i + frag >= len(data)
            items.append(_item(1, 2 if last else 0, data[i : i + frag]))
        per = rng.choice([1, 2, 3, 50])
        for i in range(0, len(items), per):
            out += _pdu(*items[i : i + per])
        built.append((cmd, data))
        if rng.random() < 0.05:
            out += rng.choice(
                [
                    b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00",
                    b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00",
                ]
            )
            break
    return out, built


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not b:
            b += rng.randbytes(rng.randint(1, 12))
            continue
        i = rng.randrange(len(b))
        op = rng.randrange(7)
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i] = rng.randrange(256)
        elif op == 2:
            del b[i:]
        elif op == 3:
            b[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 4:
            del b[i : i + rng.randint(1, 16)]
        elif op == 5:
            j = rng.randrange(len(b))
            b[i:i] = b[j : j + rng.randint(1, 64)]
        else:  # a length field (PDU, item or element) set to a boundary value
            v = rng.choice(
                [0, 1, 2, 5, 6, 0x7FFFFFFF, 0xFFFFFFFF, len(b), len(b) - i, 16448, 16449]
            )
            b[i : i + 4] = struct.pack(rng.choice([">L", "<L"]), v)
    return bytes(b)


def _python_reads(raw: bytes) -> tuple[Any, ...] | None:
    """What the Python fast path would accept as a C-STORE-RQ with a data set (the fields
    the compiled loop must then give), or None (the compiled loop must decline)."""
    d = decode_command(raw)
    allowed = {
        "CommandGroupLength", "AffectedSOPClassUID", "CommandField", "MessageID", "Priority",
        "CommandDataSetType", "AffectedSOPInstanceUID", "MoveOriginatorApplicationEntityTitle",
        "MoveOriginatorMessageID",
    }  # fmt: skip
    if (
        d is None
        or d.get("CommandField") != 1
        or d.get("CommandDataSetType", 0x0101) == 0x0101
        or not d.keys() <= allowed
        or not {"MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID"} <= d.keys()
        or ("CommandGroupLength" in d and len(raw) < 12)
    ):
        return None
    return (
        d["AffectedSOPClassUID"],
        d["AffectedSOPInstanceUID"],
        d["MessageID"],
        d.get("Priority"),
        d.get("MoveOriginatorApplicationEntityTitle"),
        d.get("MoveOriginatorMessageID"),
    )


def test_fuzz_generated_and_mutated_streams() -> None:
    """MDM_FUZZ_PDATA streams (default 100,000): none crashes the loop; unmutated streams
    read exactly as built; every command set it reads is read alike by the Python path."""
    cases = int(os.environ.get("MDM_FUZZ_PDATA", "100000"))
    seed = int(os.environ.get("MDM_FUZZ_PDATA_SEED", "17"))
    rng = random.Random(seed)
    kinds: dict[str, int] = {}
    t0 = time.monotonic()
    for n in range(cases):
        stream, built = _random_stream(rng)
        mutated = rng.random() < 0.75
        if mutated:
            stream = _mutate(rng, stream)
        limit = rng.choice([LIMIT, 300, 1 << 20])
        try:
            events = drive(
                stream, max_pdu=limit, max_message=rng.choice([1 << 30, 4000]), stall=0.002
            )
        except Exception as exc:  # pragma: no cover - the report of a failure
            raise AssertionError(f"case {n} (seed {seed}) raised {exc!r}: {stream.hex()}") from exc
        for e in events:
            kinds[e[0]] = kinds.get(e[0], 0) + 1
            if e[0] == "command":
                body_cmd = e  # checked against the Python reader below
                assert isinstance(body_cmd[2], tuple) and len(body_cmd[2]) == 6
            if e[0] == "message":
                assert len(e[3]) <= len(stream)
        if not mutated and limit >= LIMIT:
            want = [(raw, data) for raw, data in built]
            got = [e for e in events if e[0] in ("message", "fallback")]
            for (raw, data), ev in zip(want, got, strict=False):
                fields = _python_reads(raw)
                if fields is None:
                    assert ev[0] == "fallback", n
                    break
                assert ev[0] == "message", n
                assert ev[2] == fields, n
                assert ev[3] == data, n
    # command sets alone, mutated: read alike by both paths
    for n in range(cases // 5):
        raw = _random_command(rng)
        if rng.random() < 0.7:
            raw = _mutate(rng, raw)
        events = drive(_pdu(_item(1, 3, raw)))
        fields = _python_reads(raw)
        if fields is None:
            assert events[0][0] in ("fallback", "violation"), (n, raw.hex())
        else:
            assert events[0] == ("command", 1, fields), (n, raw.hex())
    # pending responses alone, mutated: read here only if the Python path would report them
    pending = 0
    for n in range(cases // 10):
        raw = _random_pending(rng)
        mutated = rng.random() < 0.7
        if mutated:
            raw = _mutate(rng, raw)
        events = drive(_pdu(_item(1, 3, raw)))
        want = _python_pending(raw)
        if events[0][0] == "pending":
            pending += 1
            assert want is not None and events[0][2] == want, (n, raw.hex())
        elif not mutated and want is not None:
            d = decode_command(raw) or {}
            uid = d.get("AffectedSOPClassUID", "1")
            assert not uid.strip() or not uid.isprintable(), (n, raw.hex())
    took = time.monotonic() - t0
    print(
        f"compiled loop fuzz: {cases} streams + {cases // 5} command sets + {cases // 10} "
        f"pending responses ({pending} read as such) in {took:.1f}s: {kinds}"
    )
    assert pending > cases // 100
    assert kinds.get("message", 0) > cases // 20
    assert kinds.get("violation", 0) > cases // 20


def test_a_received_data_set_is_the_loops_buffer_and_reads_as_a_file() -> None:
    """``ReceivedDataSet`` hands the store the compiled loop's own buffer (read-only, no copy)
    and still behaves as the BytesIO pynetdicom's decoders expect once used as a file."""
    from mdm.dicom.fast.dul import ReceivedDataSet

    payload = bytes(range(256)) * 300
    p = _store_rq()
    p.DataSet = BytesIO(payload)
    m = compiled.module()
    r = m.Reader(LIMIT)
    a, b = socket.socketpair()
    try:
        b.setblocking(False)
        a.sendall(_pdus(p, 16384))
        code = r.pump(b.fileno(), -1, 1.0, 1.0)
        assert code == m.COMMAND
        code = r.begin(b"P10")
        while code == m.CONTINUE:
            code = r.pump(b.fileno(), -1, 1.0, 1.0)
        assert code == m.MESSAGE
        message = r.take()[2]
    finally:
        a.close()
        b.close()
    assert len(message) == 3 + len(payload)
    ds = ReceivedDataSet(message)
    view = ds.getbuffer()
    assert view.readonly and bytes(view) == b"P10" + payload
    with pytest.raises(TypeError):
        view[0] = 0
    assert ds.getvalue() == b"P10" + payload
    assert ds.read(3) == b"P10" and ds.tell() == 3  # now a file: a copy, read from 0
    ds.seek(0)
    assert ds.read() == b"P10" + payload
    assert ds.getvalue() == b"P10" + payload and bytes(ds.getbuffer()) == b"P10" + payload
