"""A key server's key store: its X25519 scope keys, its pseudonym-PRF share, the admin hash.

One JSON file, mode 0600, refused if group/other may access it or another user owns it::

    {"version": 1, "index": K, "admin": "<sha256 hex of the admin credential>",
     "prf_share": b64 (32-byte little-endian scalar: this server's share of the PRF key),
     "anchor_key": b64 raw Ed25519 private key (signs audit anchors),
     "scopes": {"SiteA/identified": {"current": kid, "pending": kid | null,
                                      "keys": {kid: b64 raw X25519 private key}}}}

Updates are atomic (temp file in the same directory, fsync, rename, fsync the directory) and
serialised by a thread lock (one server process owns its store). Rotation is a small state
machine per scope, persisted in the file itself, so it survives a crash: ``begin_rotation``
adds a ``pending`` key (or returns the one already there), shares are re-sealed to it, and
``finish_rotation`` makes it ``current`` and deletes every other key of the scope.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from mdm.errors import ConfigError
from mdm.keyservice.seal import private_bytes, public_bytes
from mdm.keyservice.wire import b64d, b64e, kid_of, parse_scope
from mdm.store.keys import check_secret_file

log = logging.getLogger(__name__)

_VERSION = 1


@dataclass
class ScopeKeys:
    """The keys of one scope on one server."""

    current: str
    pending: str | None = None
    keys: dict[str, X25519PrivateKey] = field(default_factory=dict)


def admin_hash(credential: str) -> str:
    """What the key store keeps of the admin credential."""
    return hashlib.sha256(b"mdm-ks-admin\0" + credential.strip().encode()).hexdigest()


def _new_key() -> tuple[str, X25519PrivateKey]:
    k = X25519PrivateKey.generate()
    return kid_of(public_bytes(k)), k


class KeyStore:
    """The key store file of one key server. Thread-safe."""

    def __init__(
        self,
        path: Path,
        index: int,
        admin: str,
        prf_share: int,
        scopes: dict[str, ScopeKeys],
        anchor_key: Ed25519PrivateKey | None = None,
    ) -> None:
        self.path = path
        self.index = index
        self._admin = admin
        self.prf_share = prf_share
        self._scopes = scopes
        self._lock = threading.Lock()
        self.anchor_key = anchor_key or Ed25519PrivateKey.generate()
        """Signs audit anchors (mdm.keyservice.anchor); its public half is in public-keys.json."""

    @classmethod
    def create(
        cls, path: Path, index: int, admin: str, prf_share: int, scopes: list[str]
    ) -> KeyStore:
        """A new key store with a key for each scope label; refuses to overwrite a file."""
        if path.exists():
            raise ConfigError(path, None, "key store already exists; refusing to overwrite it")
        ks = cls(path, index, admin, prf_share, {})
        for label in scopes:
            parse_scope(label)
            kid, k = _new_key()
            ks._scopes[label] = ScopeKeys(kid, None, {kid: k})
        ks._save()
        return ks

    @classmethod
    def load(cls, path: Path) -> KeyStore:
        """Read and check the key store at ``path`` (ConfigError naming the file)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(path, None, f"cannot open key store: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            check_secret_file(path, os.fstat(f.fileno()))
            raw = f.read()
        try:
            d = json.loads(raw)
            if d.get("version") != _VERSION:
                raise ConfigError(path, "version", "unsupported key store version")
            scopes: dict[str, ScopeKeys] = {}
            for label, s in d["scopes"].items():
                parse_scope(label)
                keys = {
                    str(kid): X25519PrivateKey.from_private_bytes(b64d(v))
                    for kid, v in s["keys"].items()
                }
                sk = ScopeKeys(str(s["current"]), s.get("pending"), keys)
                if sk.current not in keys or (sk.pending is not None and sk.pending not in keys):
                    raise ValueError("scope names a key it does not hold")
                scopes[label] = sk
            if "prf_share" not in d:
                raise ConfigError(
                    path,
                    "prf_share",
                    "this key store predates scoped pseudonym keys (it held a master-secret "
                    "share released to any token); make new key servers with 'mdm keys init'",
                )
            share = int.from_bytes(b64d(d["prf_share"]), "little")
            anchor = d.get("anchor_key")
            anchor_key = Ed25519PrivateKey.from_private_bytes(b64d(anchor)) if anchor else None
            ks = cls(path, int(d["index"]), str(d["admin"]), share, scopes, anchor_key)
        except ConfigError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(path, None, f"malformed key store ({type(e).__name__})") from None
        if anchor_key is None:  # a key store made before audit anchors: give it its key
            ks._save()
            log.info("key store %s: made its audit anchor key", path)
        return ks

    def anchor_public(self) -> bytes:
        """The raw public key of the audit anchor key."""
        return self.anchor_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def _save(self) -> None:
        doc = {
            "version": _VERSION,
            "index": self.index,
            "admin": self._admin,
            "prf_share": b64e(self.prf_share.to_bytes(32, "little")),
            "anchor_key": b64e(
                self.anchor_key.private_bytes(
                    serialization.Encoding.Raw,
                    serialization.PrivateFormat.Raw,
                    serialization.NoEncryption(),
                )
            ),
            "scopes": {
                label: {
                    "current": s.current,
                    "pending": s.pending,
                    "keys": {kid: b64e(private_bytes(k)) for kid, k in s.keys.items()},
                }
                for label, s in sorted(self._scopes.items())
            },
        }
        data = json.dumps(doc, indent=1).encode() + b"\n"
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # mkstemp creates the file 0600: the keys are never readable by anyone else.
        fd, tmp = tempfile.mkstemp(prefix=".keystore-", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def check_admin(self, credential: str) -> bool:
        """True if ``credential`` is the admin credential made by ``mdm keys init``."""
        return hmac.compare_digest(admin_hash(credential), self._admin)

    def public(self, label: str, create: bool = False) -> tuple[str, bytes] | None:
        """``(kid, public key)`` of the scope's newest key (pending if rotating), or None."""
        with self._lock:
            s = self._scopes.get(label)
            if s is None:
                if not create:
                    return None
                parse_scope(label)
                kid, k = _new_key()
                s = self._scopes[label] = ScopeKeys(kid, None, {kid: k})
                self._save()
                log.info("created scope key %s (%s)", label, kid)
            kid = s.pending or s.current
            return kid, public_bytes(s.keys[kid])

    def private(self, label: str, kid: str) -> X25519PrivateKey | None:
        """The private key ``kid`` of a scope, or None (unknown, or destroyed by rotation)."""
        with self._lock:
            s = self._scopes.get(label)
            return None if s is None else s.keys.get(kid)

    def rotation(self, label: str) -> tuple[str, str | None] | None:
        """``(current kid, pending kid or None)`` of a scope, or None if it has no keys."""
        with self._lock:
            s = self._scopes.get(label)
            return None if s is None else (s.current, s.pending)

    def begin_rotation(self, label: str) -> tuple[str, str, bytes]:
        """Add a pending key to the scope (idempotent); ``(old kid, new kid, new public)``."""
        with self._lock:
            s = self._scopes.get(label)
            if s is None:
                raise KeyError(label)
            if s.pending is None:
                kid, k = _new_key()
                s.keys[kid] = k
                s.pending = kid
                self._save()
                log.info("rotation of %s started: %s -> %s", label, s.current, kid)
            return s.current, s.pending, public_bytes(s.keys[s.pending])

    def finish_rotation(self, label: str) -> tuple[str, bytes]:
        """Make the pending key current and destroy every other key of the scope (idempotent)."""
        with self._lock:
            s = self._scopes.get(label)
            if s is None:
                raise KeyError(label)
            if s.pending is not None:
                old = [k for k in s.keys if k != s.pending]
                s.current, s.pending = s.pending, None
                s.keys = {s.current: s.keys[s.current]}
                self._save()
                log.info("rotation of %s finished: %s destroyed", label, ", ".join(old))
            return s.current, public_bytes(s.keys[s.current])
