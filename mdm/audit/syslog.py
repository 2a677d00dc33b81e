"""A copy of every audit record off the writing host: syslog (RFC 5424), and checking against it.

``[audit] syslog = "tcp://HOST:PORT"`` (or ``udp://``, or ``unix:/dev/log`` for the local
rsyslog/journald, which can forward over TLS, RFC 5425) makes :class:`SyslogSink` send each
line the moment it is appended, as the MSG of one RFC 5424 message (facility authpriv,
severity info, APP-NAME ``mdm-audit``, MSGID ``audit``), through the standard library's
:class:`logging.handlers.SysLogHandler`. A receiver that keeps what it gets where the writing
host cannot write holds a copy nobody there can take back.

``mdm audit verify --against COPY`` (:func:`check_copy`) reads the records out of such a copy
(any file whose lines end in the JSON record: the receiver's own log format does not matter)
and reports every copied record that no log file holds at its seq with the same hash: a record
rewritten, removed, or cut off with the tail, or a log emptied or replaced.

A syslog outage never stops the writer: one log line, records meanwhile are not copied (their
absence in the copy shows as a seq gap there), the connection is re-made at most every 5 s.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import queue
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from mdm.audit.anchor import read_chain, rotated_files
from mdm.audit.log import AuditProblem, line_digest, record_seq, self_hash_ok

log = logging.getLogger(__name__)

APP_NAME = "mdm-audit"
RETRY = 5.0
TIMEOUT = 2.0
"""Deadline of connecting and of each send."""


class _Handler(logging.handlers.SysLogHandler):
    """SysLogHandler that connects with a deadline and tells its sink when sending failed."""

    failed = False

    def createSocket(self) -> None:
        if self.socktype == socket.SOCK_STREAM and not isinstance(self.address, str):
            host, port = self.address
            self.socket = socket.create_connection((host, port), timeout=TIMEOUT)
            self.unixsocket = False
            return
        super().createSocket()
        if self.socket is not None:
            self.socket.settimeout(TIMEOUT)

    def handleError(self, record: logging.LogRecord) -> None:
        self.failed = True


def _target(text: str) -> tuple[str | tuple[str, int], socket.SocketKind]:
    if text.startswith("unix:"):
        return text[5:], socket.SOCK_DGRAM
    scheme, rest = text.split("://", 1)
    host, port = rest.rsplit(":", 1)
    kind = socket.SOCK_STREAM if scheme == "tcp" else socket.SOCK_DGRAM
    return (host.strip("[]"), int(port)), kind


class SyslogSink:
    """Sends each audit line to a syslog receiver as an RFC 5424 message.

    Calls only queue the line; a thread sends, so a slow or unreachable receiver never holds
    up the writer (a full queue drops lines, with one log line, and the copy shows the gap).
    """

    def __init__(self, target: str, queue_size: int = 10000) -> None:
        self.target = target
        self._address, self._kind = _target(target)
        self._host = socket.gethostname() or "-"
        self._queue: queue.Queue[bytes | None] = queue.Queue(queue_size)
        self._handler: _Handler | None = None
        self._next_try = 0.0
        self._down = False
        self._dropped = 0
        self._thread = threading.Thread(target=self._run, name="mdm-audit-syslog", daemon=True)
        self._thread.start()

    def __call__(self, line: bytes) -> None:
        """Queue one record line (no newline) to be sent."""
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            if self._dropped == 0:
                log.warning("audit syslog %s: queue full; records are not copied", self.target)
            self._dropped += 1

    def _run(self) -> None:
        while True:
            line = self._queue.get()
            if line is None:
                return
            try:
                self._send(line)
            except Exception:
                log.exception("audit syslog %s: unexpected error", self.target)

    def _connect(self) -> _Handler | None:
        now = time.monotonic()
        if now < self._next_try:
            return None
        self._next_try = now + RETRY
        try:
            h = _Handler(address=self._address, facility=_Handler.LOG_AUTHPRIV, socktype=self._kind)
        except OSError as e:
            self._outage(str(e))
            return None
        h.append_nul = False
        return h

    def _outage(self, why: str) -> None:
        if not self._down:
            log.warning(
                "audit syslog %s: cannot send (%s); records are not copied until it answers "
                "(retrying every %.0f s)",
                self.target,
                why,
                RETRY,
            )
            self._down = True

    def _send(self, line: bytes) -> None:
        ts = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        msg = f"1 {ts} {self._host} {APP_NAME} {os.getpid()} audit - {line.decode('ascii')}"
        if self._kind == socket.SOCK_STREAM:
            msg += "\n"  # RFC 6587 non-transparent framing
        rec = logging.LogRecord("mdm.audit", logging.INFO, "", 0, msg, None, None)
        if self._handler is None:
            self._handler = self._connect()
            if self._handler is None:
                return
        self._handler.emit(rec)
        if self._handler.failed:
            self._handler.close()
            self._handler = None
            self._outage("send failed")
        elif self._down:
            log.info("audit syslog %s: sending again", self.target)
            self._down = False

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for up to ``timeout`` seconds), then close (idempotent)."""
        if not self._thread.is_alive():
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        if self._handler is not None:
            self._handler.close()
            self._handler = None


def copied_records(copy: Path) -> tuple[list[tuple[int, str, str, int]], list[str]]:
    """``[(seq, line hash, time, line number in the copy)]`` of the copy, and notes."""
    notes: list[str] = []
    out: list[tuple[int, str, str, int]] = []
    bad = 0
    with open(copy, "rb") as f:
        for n, raw in enumerate(f, 1):
            i = raw.find(b'{"seq":')
            if i < 0:
                continue
            line = raw[i:].rstrip(b"\r\n\x00 ")
            seq = record_seq(line)
            if seq is None or not self_hash_ok(line):
                bad += 1
                continue
            t = json.loads(line).get("time")
            out.append((seq, line_digest(line), t if isinstance(t, str) else "", n))
    if bad:
        notes.append(f"{copy}: {bad} line(s) that are not intact records were ignored")
    return out, notes


def check_copy(
    path: Path, copy: Path, since: datetime | None = None
) -> tuple[list[tuple[Path, AuditProblem]], list[str]]:
    """Every record of ``copy`` must be in the log or a rotated file, at its seq, unchanged."""
    try:
        recs, notes = copied_records(copy)
    except OSError as e:
        return [(copy, AuditProblem(0, f"cannot read the copy: {e.strerror}"))], []
    held: set[tuple[int, str]] = set()
    live = read_chain(path)
    last = 0
    for fc in [live, *(read_chain(p) for p in rotated_files(path))]:
        if fc is not None:
            held.update((seq, h) for seq, (_, h) in fc.hashes.items())
    if live is not None:
        last = live.last_seq
    missing = []
    for seq, h, t, n in recs:
        if since is not None and t and t < since.strftime("%Y-%m-%dT"):
            continue
        if (seq, h) not in held:
            missing.append((seq, t, n))
    problems: list[tuple[Path, AuditProblem]] = []
    if missing:
        seq, t, n = missing[0]
        state = "missing" if live is None else "empty" if live.count == 0 else ""
        what = f"the log is {state}, and " if state else ""
        problems.append(
            (
                path,
                AuditProblem(
                    0,
                    f"{what}{len(missing)} record(s) of the copy {copy.name} are in no log file "
                    f"(the first: seq {seq} of {t}, line {n} of the copy): rewritten, removed "
                    "or cut off",
                ),
            )
        )
    if recs:
        newest = max(s for s, _, _, _ in recs)
        beyond = max(last - newest, 0)
        notes.append(
            f"copy {copy.name}: {len(recs)} record(s) checked, up to seq {newest}; "
            f"{beyond} record(s) of the log after it are not in the copy"
        )
    return problems, notes
