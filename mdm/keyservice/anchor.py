"""Audit anchors: a key server's signed checkpoints of the audit logs of the mounts.

A process that writes an audit log (a mount, ``mdm fetch``) sends each key server, every few
seconds while its log grows, a checkpoint ``(log, chain, seq, head)``: ``log`` names the log
(a hash of host and path, no PHI), ``chain`` is the SHA-256 of the file's first line (a
rotated log starts a new chain), ``seq`` and ``head`` its last record and that record's
SHA-256. The server appends the checkpoint with its own time to its anchor book
(``server-K-anchors.jsonl`` beside its key store, append-only, fsynced), records it in its own
audit log, and returns its Ed25519 signature over :func:`anchor_message` with the anchor key
of its key store, whose public half ``mdm keys init`` publishes in ``public-keys.json``.

Because each record's line holds the hash of the line before it, ``head`` commits to every
record up to ``seq``: ``mdm audit verify`` finds any record before an anchor that was edited,
removed or re-chained, and a log shorter than an anchor, by checking the file against every
anchor of its log -- the ones in ``<log>.anchors`` beside it and the ones the servers keep.

The book refuses a second, different head for a ``(log, chain, seq)`` it has anchored (a
rewrite being re-anchored); the same checkpoint again returns the anchor already signed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mdm.keyservice.wire import b64d, b64e

log = logging.getLogger(__name__)

ANCHOR_CONTEXT = b"mdm-audit-anchor-v1\0"
MAX_PAGE = 2000
"""Anchors per ``/v1/anchor/list`` answer."""
_LOG_ID = re.compile(r"^[0-9a-f]{32}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class AnchorRequestError(ValueError):
    """A malformed checkpoint or listing request (HTTP 400)."""


class AnchorConflict(Exception):
    """A checkpoint that contradicts an anchor already signed (HTTP 409)."""


@dataclass(frozen=True)
class Anchor:
    """One checkpoint signed by one key server."""

    log: str
    chain: str
    seq: int
    head: str
    server: int
    time: str
    sig: bytes

    def message(self) -> bytes:
        """The bytes the server signed."""
        return anchor_message(self.log, self.chain, self.seq, self.head, self.server, self.time)

    def verify(self, public: Ed25519PublicKey) -> bool:
        """True if ``public`` (server ``server``'s anchor key) signed this anchor."""
        try:
            public.verify(self.sig, self.message())
        except InvalidSignature:
            return False
        return True

    def to_dict(self) -> dict[str, Any]:
        """JSON form (wire and files)."""
        return {
            "log": self.log,
            "chain": self.chain,
            "seq": self.seq,
            "head": self.head,
            "server": self.server,
            "time": self.time,
            "sig": b64e(self.sig),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Anchor:
        """Parse the JSON form; ValueError if malformed."""
        try:
            a = cls(
                log=str(d["log"]),
                chain=str(d["chain"]),
                seq=d["seq"],
                head=str(d["head"]),
                server=d["server"],
                time=str(d["time"]),
                sig=b64d(d["sig"]),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed anchor ({type(e).__name__})") from None
        check_checkpoint(a.log, a.chain, a.seq, a.head)
        if isinstance(a.server, bool) or not isinstance(a.server, int) or not len(a.sig) == 64:
            raise ValueError("malformed anchor (server or signature)")
        return a


def anchor_message(log_id: str, chain: str, seq: int, head: str, server: int, time: str) -> bytes:
    """What a key server signs: context, then the fields NUL-separated (none may hold NUL)."""
    fields = (log_id, chain, str(seq), head, str(server), time)
    return ANCHOR_CONTEXT + "\0".join(fields).encode()


def check_checkpoint(log_id: object, chain: object, seq: object, head: object) -> None:
    """Refuse anything but 32 hex, 64 hex, a positive int and 64 hex (AnchorRequestError)."""
    if not isinstance(log_id, str) or not _LOG_ID.match(log_id):
        raise AnchorRequestError("'log' must be 32 lowercase hex digits")
    for name, v in (("chain", chain), ("head", head)):
        if not isinstance(v, str) or not _HEX64.match(v):
            raise AnchorRequestError(f"{name!r} must be a SHA-256 in lowercase hex")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 1 <= seq < 2**63:
        raise AnchorRequestError("'seq' must be a positive integer")


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AnchorBook:
    """A key server's anchors, one JSON line each in an append-only file. Thread-safe."""

    def __init__(self, path: Path, server: int, key: Ed25519PrivateKey) -> None:
        self.path = path
        self.server = server
        self._key = key
        self._lock = threading.Lock()
        self._by_log: dict[str, list[Anchor]] = {}
        self._by_seq: dict[tuple[str, str, int], Anchor] = {}
        self._load()
        self._fd = os.open(
            path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        public = self._key.public_key()
        for n, line in enumerate(data.splitlines(), 1):
            try:
                a = Anchor.from_dict(json.loads(line))
            except ValueError:
                log.error("anchor book %s line %d: damaged; ignored", self.path, n)
                continue
            if a.server != self.server or not a.verify(public):
                log.error("anchor book %s line %d: not signed here; ignored", self.path, n)
                continue
            self._add(a)

    def _add(self, a: Anchor) -> None:
        self._by_log.setdefault(a.log, []).append(a)
        self._by_seq.setdefault((a.log, a.chain, a.seq), a)

    def checkpoint(self, log_id: str, chain: str, seq: int, head: str) -> tuple[Anchor, bool]:
        """Sign and keep a checkpoint; ``(anchor, new)``. AnchorConflict if it contradicts one."""
        check_checkpoint(log_id, chain, seq, head)
        with self._lock:
            old = self._by_seq.get((log_id, chain, seq))
            if old is not None:
                if old.head != head:
                    raise AnchorConflict(
                        f"seq {seq} of this log was anchored at {old.time} with another hash "
                        "(the log was rewritten)"
                    )
                return old, False
            t = _now_iso()
            sig = self._key.sign(anchor_message(log_id, chain, seq, head, self.server, t))
            a = Anchor(log_id, chain, seq, head, self.server, t, sig)
            data = json.dumps(a.to_dict(), separators=(",", ":")).encode() + b"\n"
            if os.write(self._fd, data) != len(data):
                raise OSError("short write to the anchor book (disk full?)")
            os.fsync(self._fd)
            self._add(a)
            return a, True

    def list(self, log_id: str, after: int) -> tuple[list[Anchor], int | None]:
        """The anchors of a log from position ``after``; ``(page, next position or None)``."""
        if not isinstance(log_id, str) or not _LOG_ID.match(log_id):
            raise AnchorRequestError("'log' must be 32 lowercase hex digits")
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise AnchorRequestError("'after' must be a non-negative integer")
        with self._lock:
            all_ = self._by_log.get(log_id, [])
            page = all_[after : after + MAX_PAGE]
            nxt = after + len(page) if after + len(page) < len(all_) else None
        return page, nxt

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def book_path(keystore: Path, server: int) -> Path:
    """Where server ``server`` keeps its anchor book: beside its key store."""
    return keystore.with_name(f"server-{server}-anchors.jsonl")
