"""The append-only, hash-chained audit log (``[audit] log`` of ``mdm.toml``).

One JSON object per line::

    {"seq":7,"time":"2025-01-31T12:00:00.123Z","sub":"alice","iss":"https://idp",
     "action":"open","decision":"allow","rule":"r-1","policy":"3f2a...","resource":{...},
     ...extra...,"prev":"<sha256 of line 6>","hash":"<sha256 of this line up to ,"hash">"}

- ``prev`` is the SHA-256 (hex) of the previous line's bytes, without its newline; the first
  line's ``prev`` is 64 zeros. Editing, removing or reordering a line breaks the chain there.
- ``hash`` is the SHA-256 of this line's own bytes up to (not including) ``,"hash":"``: an
  edited line is named exactly, including the last one, which has no successor.
- ``<log>.head`` (0600) holds the seq and line hash of the last record, rewritten after every
  append, so removing lines at the end is detected too.

Writers serialise on ``fcntl.flock`` of the log (across processes) and a thread lock (within
one), re-reading the last line whenever another writer appended since. Each record is written
with one ``write`` on an ``O_APPEND`` descriptor (visible to readers at once) and ``fsync``ed at
most every ``fsync_interval`` seconds (a timer catches the last one of a burst): a power cut
loses at most that much. No PHI: resources carry UIDs only, and :func:`check_resource` refuses
anything else.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mdm.access.identity import Principal
from mdm.errors import MdmError

log = logging.getLogger(__name__)

GENESIS = "0" * 64
HASH_SEP = b',"hash":"'
# Fixed width, so rewriting it in place with pwrite always covers the previous content.
_HEAD_FMT = '{"seq":%20d,"sha256":"%s"}\n'
_HEX64 = re.compile(rb"^[0-9a-f]{64}$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_EXTRA_KEY = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
CORE_FIELDS = (
    "seq",
    "time",
    "sub",
    "iss",
    "action",
    "decision",
    "rule",
    "policy",
    "resource",
    "prev",
    "hash",
)
RESOURCE_KEYS = frozenset({"site", "sites", "level", "view", "kind", "modality", "trial"})
"""Keys a resource may carry besides ``*_uid`` (which must hold DICOM UIDs)."""
PHI_MARKERS = ("patient", "name", "birth", "path", "address", "phone", "accession", "physician")
"""Substrings refused in extra field names: such a field would likely carry PHI."""
MAX_VALUE = 256
# Field names come from the code, a few dozen in all: each is checked once per process (its
# value every time).
_SEEN_MAX = 256
_EXTRA_KEYS_SEEN: set[str] = set()


class AuditError(MdmError):
    """The audit log cannot be written safely (damaged, truncated, not writable)."""


@dataclass(frozen=True)
class AuditProblem:
    """One defect found by :func:`verify` (``line_no`` 1-based; 0 means the file as a whole)."""

    line_no: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line_no}: {self.reason}" if self.line_no else self.reason


def check_resource(resource: Mapping[str, str]) -> None:
    """Refuse a resource that could carry PHI: only UIDs, site, level and the like."""
    for k, v in resource.items():
        if not isinstance(v, str):
            raise ValueError(f"audit resource {k!r}: expected a string")
        if k.endswith("_uid"):
            if len(v) > 64 or not _UID.match(v):
                raise ValueError(f"audit resource {k!r}: not a DICOM UID")
        elif k not in RESOURCE_KEYS:
            raise ValueError(
                f"audit resource key {k!r} refused (no PHI in the audit log; allowed: *_uid, "
                f"{', '.join(sorted(RESOURCE_KEYS))})"
            )
        elif len(v) > MAX_VALUE:
            raise ValueError(f"audit resource {k!r}: longer than {MAX_VALUE} characters")


def check_extra(extra: Mapping[str, Any]) -> None:
    """Refuse extra fields that clash with the core ones or look like they carry PHI."""
    for k, v in extra.items():
        if k not in _EXTRA_KEYS_SEEN:
            if k in CORE_FIELDS or not _EXTRA_KEY.match(k):
                raise ValueError(f"audit field {k!r} refused (reserved or not a simple name)")
            if any(m in k for m in PHI_MARKERS):
                raise ValueError(f"audit field {k!r} refused (no PHI in the audit log)")
            if len(_EXTRA_KEYS_SEEN) < _SEEN_MAX:
                _EXTRA_KEYS_SEEN.add(k)
        if v is not None and not isinstance(v, str | int | float | bool):
            raise ValueError(f"audit field {k!r}: only strings, numbers, booleans or null")
        if isinstance(v, str) and len(v) > MAX_VALUE:
            raise ValueError(f"audit field {k!r}: longer than {MAX_VALUE} characters")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_record(rec: Mapping[str, Any]) -> bytes:
    """The line of a record (without newline), its self ``hash`` appended last."""
    body = json.dumps(rec, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    prefix = body[:-1]  # without the closing brace
    return prefix + HASH_SEP + _sha(prefix).encode() + b'"}'


def _self_hash_ok(line: bytes) -> bool:
    i = line.rfind(HASH_SEP)
    if i < 0:
        return False
    tail = line[i + len(HASH_SEP) :]
    return (
        tail.endswith(b'"}')
        and _HEX64.match(tail[:-2]) is not None
        and (_sha(line[:i]).encode() == tail[:-2])
    )


def line_digest(line: bytes) -> str:
    """SHA-256 (hex) of a line without its newline: what ``prev``, ``.head`` and anchors hold."""
    return _sha(line)


def self_hash_ok(line: bytes) -> bool:
    """True if the line's ``hash`` field is the SHA-256 of the line before it."""
    return _self_hash_ok(line)


def record_seq(line: bytes) -> int | None:
    """The ``seq`` of a line, or None if it is not a record."""
    return _parse_seq(line)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_seq(line: bytes) -> int | None:
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    seq = rec.get("seq") if isinstance(rec, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def _last_lines(fd: int, size: int, count: int) -> list[bytes]:
    """Up to ``count`` last lines ending at ``size`` (the last one possibly unterminated)."""
    end = size
    if end and os.pread(fd, 1, end - 1) == b"\n":
        end -= 1
    buf = b""
    pos = end
    while pos > 0 and buf.count(b"\n") < count:
        n = min(65536, pos)
        pos -= n
        buf = os.pread(fd, n, pos) + buf
    lines = buf.split(b"\n")
    if pos > 0:
        lines = lines[1:]  # the first piece may be the tail of an earlier line
    return lines[-count:]


def head_path(path: Path) -> Path:
    """The head anchor beside a log: ``audit.jsonl`` -> ``audit.jsonl.head``."""
    return path.with_name(path.name + ".head")


def _read_head(path: Path) -> tuple[int, str] | None:
    try:
        raw = head_path(path).read_bytes()
        if not raw:  # created with the log, before its first record
            return 0, ""
        data = json.loads(raw)
        return int(data["seq"]), str(data["sha256"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return (-1, "")


def _mkdir_private(d: Path) -> None:
    missing = []
    while not d.exists():
        missing.append(d)
        d = d.parent
    for m in reversed(missing):
        try:
            m.mkdir(mode=0o700)
        except FileExistsError:
            pass


class AuditLog:
    """Appends hash-chained records to the audit log; safe across threads and processes."""

    def __init__(
        self,
        path: str | Path,
        fsync_interval: float = 0.2,
        sink: Callable[[bytes], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.fsync_interval = fsync_interval
        self.sink = sink
        """Called with each line (no newline) once it is appended, e.g. a SyslogSink."""
        self._lock = threading.RLock()  # re-entered when a rotated log is reopened
        self._timer: threading.Timer | None = None
        self._last_fsync = 0.0
        self._fd = -1
        self._head_fd = -1
        self._ino = 0  # inode of the file self._fd is open on (a rotation makes a new one)
        self._end = -1  # file size after our last append; -1: unknown, read the tail
        self._seq = 0
        self._prev = GENESIS
        _mkdir_private(self.path.parent)
        self._open()

    def _open(self) -> None:
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as e:
            raise AuditError(f"cannot open audit log {self.path}: {e.strerror}") from None
        st = os.fstat(fd)
        if st.st_mode & 0o022:
            os.close(fd)
            raise AuditError(
                f"audit log {self.path} is writable by group/other "
                f"(mode {st.st_mode & 0o777:04o}; chmod 600 {self.path})"
            )
        hfd = os.open(head_path(self.path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._fd, self._head_fd, self._end = fd, hfd, -1
        self._ino = st.st_ino
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            self._sync_tail()
            head = _read_head(self.path)
            if head is not None and head[0] > self._seq:
                self.close()
                raise AuditError(
                    f"audit log {self.path} ends at record {self._seq} but its head anchor "
                    f"says {head[0]} were written: records were removed. Keep the damaged "
                    "log as evidence and move it and its .head aside to start a new one."
                )
        finally:
            if self._fd >= 0:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _sync_tail(self) -> None:
        """Pick up (seq, prev) from the file's last line if someone else appended."""
        size = os.fstat(self._fd).st_size
        if size == self._end:
            return
        if size == 0:
            self._seq, self._prev, self._end = 0, GENESIS, 0
            return
        lines = _last_lines(self._fd, size, 2)
        if os.pread(self._fd, 1, size - 1) != b"\n":
            # A torn write (crash mid-line): end it so the next record starts on its own line;
            # verify reports the damaged line, and the chain continues after it.
            log.error("audit log %s: last line is incomplete; continuing after it", self.path)
            os.write(self._fd, b"\n")
            size += 1
        last = lines[-1]
        seq = _parse_seq(last)
        if seq is None:
            before = _parse_seq(lines[0]) if len(lines) > 1 else None
            if before is None and len(lines) > 1:
                raise AuditError(f"audit log {self.path}: the last two lines are damaged")
            seq = (before or 0) + 1
        self._seq, self._prev, self._end = seq, _sha(last), size

    def record(
        self,
        *,
        principal: Principal,
        action: str,
        decision: str,
        resource: Mapping[str, str],
        rule: str = "",
        policy: str = "",
        **extra: Any,
    ) -> int:
        """Append one record; returns its seq. ``resource`` holds UIDs only (ValueError else)."""
        check_resource(resource)
        check_extra(extra)
        with self._lock:
            if self._fd < 0:
                raise AuditError(f"audit log {self.path} is closed")
            self._reopen_if_rotated()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                self._sync_tail()
                rec: dict[str, Any] = {
                    "seq": self._seq + 1,
                    "time": _now_iso(),
                    "sub": principal.sub,
                    "iss": principal.issuer,
                    "action": action,
                    "decision": decision,
                    "rule": rule,
                    "policy": policy,
                    "resource": dict(resource),
                    **extra,
                    "prev": self._prev,
                }
                line = encode_record(rec)
                data = line + b"\n"
                try:
                    n = os.write(self._fd, data)
                except OSError as e:
                    self._end = -1
                    raise AuditError(f"cannot write audit log {self.path}: {e.strerror}") from None
                if n != len(data):
                    self._end = -1
                    raise AuditError(f"short write to audit log {self.path} (disk full?)")
                self._seq, self._prev = rec["seq"], _sha(line)
                self._end += n  # _sync_tail left it at the size before; we hold the flock
                os.pwrite(self._head_fd, (_HEAD_FMT % (self._seq, self._prev)).encode(), 0)
                seq: int = self._seq
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            if self.sink is not None:
                try:
                    self.sink(line)
                except Exception:  # a copy that fails must not lose the record itself
                    log.exception("audit log %s: copying record %d failed", self.path, seq)
            self._maybe_fsync()
            return seq

    def checkpoint(self) -> tuple[str, int, str] | None:
        """``(chain, seq, head)`` of the file now: the SHA-256 of its first line, the seq of
        its last record and that line's SHA-256 (None if it is empty or the log closed)."""
        with self._lock:
            if self._fd < 0:
                return None
            self._reopen_if_rotated()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                self._sync_tail()
                if self._seq == 0:
                    return None
                first = os.pread(self._fd, 65536, 0).split(b"\n", 1)[0]
                return _sha(first), self._seq, self._prev
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _reopen_if_rotated(self) -> None:
        try:
            same = os.stat(self.path).st_ino == self._ino
        except FileNotFoundError:
            same = False
        if not same:
            log.info("audit log %s was moved away; starting a new file", self.path)
            self._close_fds()
            self._open()

    def _maybe_fsync(self) -> None:
        # On a timer thread, never the caller's: a reader's open does not wait for the disk.
        if self._timer is None:
            wait = max(0.0, self._last_fsync + self.fsync_interval - time.monotonic())
            self._timer = threading.Timer(wait, self._timed_fsync)
            self._timer.daemon = True
            self._timer.start()

    def _timed_fsync(self) -> None:
        with self._lock:
            self._timer = None
            self._last_fsync = time.monotonic()
            # Copies of the descriptors, synced outside the lock: appends go on meanwhile,
            # and a rotation closing the originals cannot make us sync another file.
            fds = [os.dup(fd) for fd in (self._fd, self._head_fd) if fd >= 0]
        try:
            for fd in fds:
                try:
                    os.fsync(fd)
                except OSError as e:
                    log.error("fsync of audit log %s failed: %s", self.path, e.strerror)
        finally:
            for fd in fds:
                os.close(fd)

    def _fsync(self) -> None:
        for fd in (self._fd, self._head_fd):
            if fd >= 0:
                try:
                    os.fsync(fd)
                except OSError as e:
                    log.error("fsync of audit log %s failed: %s", self.path, e.strerror)

    def _close_fds(self) -> None:
        self._fsync()
        for fd in (self._fd, self._head_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._head_fd = -1

    def close(self) -> None:
        """Flush to disk and close (idempotent)."""
        with self._lock:
            timer = self._timer
            if timer is not None:
                timer.cancel()
            self._timer = None
            self._close_fds()
            close_sink = getattr(self.sink, "close", None)
            if close_sink is not None:
                close_sink()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def verify(path: str | Path) -> list[AuditProblem]:
    """Check the whole chain; each problem names the line (1-based) where it is."""
    return verify_report(path)[1]


def verify_report(path: str | Path) -> tuple[int, list[AuditProblem]]:
    """``(number of lines, problems)`` for ``mdm audit verify``."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return 0, [AuditProblem(0, f"{p}: no such file")]
    except OSError as e:
        return 0, [AuditProblem(0, f"{p}: cannot read: {e.strerror}")]
    problems: list[AuditProblem] = []
    if not data:
        lines: list[bytes] = []
    else:
        lines = data.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        else:
            problems.append(
                AuditProblem(len(lines), "truncated: the last line has no newline (torn write)")
            )
    prev_line: bytes | None = None
    prev_edited = False
    seq_before = 0
    for i, line in enumerate(lines, 1):
        expected = seq_before + 1
        expected_prev = GENESIS if prev_line is None else _sha(prev_line)
        rec: Any = None
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
        if not isinstance(rec, dict):
            problems.append(AuditProblem(i, "not a valid record (garbled or edited)"))
            prev_line, prev_edited, seq_before = line, True, expected
            continue
        edited = not _self_hash_ok(line)
        if edited:
            problems.append(AuditProblem(i, "edited: the line does not match its own hash"))
        seq = rec.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            problems.append(AuditProblem(i, "no valid seq"))
            seq = expected
        elif seq != expected:
            if seq > expected:
                why = f"{seq - expected} record(s) missing before this line (removed?)"
            else:
                why = "out of order (reordered or duplicated)"
            problems.append(AuditProblem(i, f"seq {seq} where {expected} was expected: {why}"))
        if rec.get("prev") != expected_prev and not edited and not prev_edited:
            where = "the previous line" if i > 1 else "the start of the log"
            problems.append(
                AuditProblem(
                    i,
                    f"chain broken: prev does not match {where} "
                    "(a line was removed, inserted or reordered here)",
                )
            )
        prev_line, prev_edited, seq_before = line, edited, seq
    problems.extend(_check_head(p, lines, seq_before))
    return len(lines), problems


def _check_head(p: Path, lines: list[bytes], last_seq: int) -> list[AuditProblem]:
    head = _read_head(p)
    n = len(lines)
    if head is None:
        if not lines:
            return []
        return [
            AuditProblem(
                0, f"{head_path(p)} is missing: cannot tell whether the last records were removed"
            )
        ]
    hseq, hsha = head
    if hseq < 0:
        return [AuditProblem(0, f"{head_path(p)} is damaged")]
    if hseq > last_seq:
        return [
            AuditProblem(
                n + 1,
                f"{hseq - last_seq} record(s) removed from the end "
                f"(the head anchor records seq {hseq}, the log ends at {last_seq})",
            )
        ]
    if hseq == 0:
        return [] if n == 0 else [AuditProblem(0, f"{head_path(p)} does not match the log")]
    # The head is rewritten just after each append: it may lag by one after a crash.
    idx = n - (last_seq - hseq)
    if last_seq - hseq > 1 or not 1 <= idx <= n:
        return [AuditProblem(0, f"{head_path(p)} records seq {hseq}, the log ends at {last_seq}")]
    if _sha(lines[idx - 1]) != hsha:
        return [AuditProblem(idx, "edited: does not match the head anchor")]
    return []


def read_tail(path: str | Path, n: int) -> list[str]:
    """The last ``n`` lines of the log (text, without newline)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        lines = _last_lines(f.fileno(), size, n) if size else []
    return [ln.decode("utf-8", "replace") for ln in lines if ln]


def follow(path: str | Path, stop: threading.Event, poll: float = 0.25) -> Iterator[str]:
    """Yield lines appended to the log from now on (follows a rotated log) until ``stop``."""
    p = Path(path)
    f = open(p, "rb")
    f.seek(0, os.SEEK_END)
    partial = b""
    try:
        while not stop.is_set():
            chunk = f.read()
            if chunk:
                partial += chunk
                *done, partial = partial.split(b"\n")
                for ln in done:
                    yield ln.decode("utf-8", "replace")
                continue
            try:
                rotated = os.stat(p).st_ino != os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                rotated = False
            if rotated:
                f.close()
                f = open(p, "rb")
                partial = b""
                continue
            stop.wait(poll)
    finally:
        f.close()


def summarize(line: str) -> str:
    """One human line for ``mdm audit tail``."""
    try:
        r = json.loads(line)
    except json.JSONDecodeError:
        return f"(damaged line) {line[:80]}"
    if not isinstance(r, dict):
        return f"(damaged line) {line[:80]}"
    res = " ".join(f"{k}={v}" for k, v in (r.get("resource") or {}).items())
    extra = " ".join(f"{k}={r[k]}" for k in r if k not in CORE_FIELDS)
    rule = f" rule={r.get('rule')}" if r.get("rule") else ""
    return (
        f"{r.get('time')} #{r.get('seq')} {r.get('sub')}@{r.get('iss')} {r.get('action')} "
        f"{r.get('decision')}{rule} {res} {extra}".rstrip()
    )
