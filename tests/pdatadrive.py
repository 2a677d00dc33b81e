"""Drive the compiled receive loop (``mdm.dicom.fast._pdata``) in-process: a byte stream is
written into one end of a socket pair and the loop reads the other, as the DUL thread of an
inbound association does; each result is recorded as an event the tests compare with what
the Python fast path and pynetdicom make of the same bytes."""

from __future__ import annotations

import socket
from typing import Any

from mdm.dicom.fast import compiled

PREFIX = b"P10"
"""Stands for the Part-10 header the DUL writes ahead of the data set."""


def reader(max_pdu: int = 16384 + 64, max_message: int = 1 << 30) -> Any:
    """A compiled Reader (skips the calling test if the extension was not built)."""
    import pytest

    if not compiled.available():
        pytest.fail("the compiled receive loop is not built (scripts/setup builds it)")
    return compiled.module().Reader(max_pdu, max_message)


def drive(
    stream: bytes,
    max_pdu: int = 16384 + 64,
    max_message: int = 1 << 30,
    accept: bool = True,
    stall: float = 0.005,
) -> list[tuple[Any, ...]]:
    """Feed ``stream`` (then end of file) to a Reader until it stops; the events, in order:
    ("command", context, fields), ("message", context, fields, data), ("fallback", body),
    ("other", head), ("closed", problem), ("violation", problem), ("idle",), ("wake",),
    ("pending", context, message ID, body).
    ``accept=False``: decline every command set (the Python path takes the message)."""
    m = compiled.module()
    r = reader(max_pdu, max_message)
    a, b = socket.socketpair()
    events: list[tuple[Any, ...]] = []
    try:
        b.setblocking(False)
        a.sendall(stream)
        a.shutdown(socket.SHUT_WR)
        fd = b.fileno()
        for _ in range(len(stream) + 4):
            code = r.pump(fd, -1, 0.0, stall)
            while code == m.COMMAND:
                events.append(("command", r.context_id, r.command))
                if not accept:
                    events.append(("fallback", r.decline()))
                    code = None
                    break
                code = r.begin(PREFIX)
                if code == m.CONTINUE:
                    code = r.pump(fd, -1, 0.0, stall)
            if code is None:
                continue
            if code == m.MESSAGE:
                cx, fields, data = r.take()
                value = bytes(memoryview(data))
                assert memoryview(data).readonly and len(data) == len(value)
                assert value.startswith(PREFIX)
                events.append(("message", cx, fields, value[len(PREFIX) :]))
                continue
            if code == m.FALLBACK:
                events.append(("fallback", r.body))
                continue
            if code == m.PENDING:
                events.append(("pending", r.context_id, r.pending_id, r.decline()))
                continue
            if code == m.OTHER:
                assert len(r.head) == 6
                events.append(("other", r.head))
            elif code == m.CLOSED:
                events.append(("closed", r.problem))
            elif code == m.VIOLATION:
                assert r.problem and isinstance(r.problem, str)
                events.append(("violation", r.problem))
            elif code == m.IDLE:
                events.append(("idle",))
            elif code == m.WAKE:
                events.append(("wake",))
            else:
                raise AssertionError(f"unknown result {code}")
            return events
        raise AssertionError("the reader did not stop")
    finally:
        a.close()
        b.close()
