"""The key interface: seal an object's data key to its scope, open it again for a reader.

``KeyProvider`` is what the store and the bridge use. The embedded ``LocalKeyring`` keeps one
random key per scope in a 0600 JSON file; a key service (M-of-N shares held by key servers)
will implement the same protocol later. Sealed material is bound by AEAD associated data to the
object's identity and to the scope, so it cannot be replayed for another object or scope.

Policy is NOT checked here: the bridge decides whether a principal may read an object in a
view before it asks the store (and so the keyring) to open it. ``open`` takes the principal so
that a key service, which must check the token and policy itself, has the same signature.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import logging
import os
import struct
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mdm.access.decide import Resource
from mdm.access.identity import Principal
from mdm.errors import ConfigError, IntegrityError, KeyUnavailable
from mdm.store.crypto import KEY_LEN, new_key, unwrap_key, wrap_key

log = logging.getLogger(__name__)

LEVELS = ("identified", "deidentified")
_SEALED_VERSION = b"\x01"
_FILE_VERSION = 1


@dataclass(frozen=True)
class Scope:
    """What a scope key protects: one site's objects in one view (optionally one trial)."""

    site: str
    level: str
    program: str = ""

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"scope level must be one of {LEVELS}, got {self.level!r}")
        if not self.site or "/" in self.site or "/" in self.program:
            raise ValueError("scope site must be non-empty and site/program must not hold '/'")

    def label(self) -> str:
        """``site/level`` or ``site/level/program``: the scope's name in files and logs."""
        base = f"{self.site}/{self.level}"
        return f"{base}/{self.program}" if self.program else base


class KeyProvider(Protocol):
    """Seals object keys to scopes and opens them for readers."""

    remote: bool
    """True when :meth:`open` waits on the network (callers run it off the event loop)."""

    def seal(
        self,
        identity: bytes,
        scope: Scope,
        object_key: bytes,
        *,
        resource: Resource | None = None,
    ) -> bytes:
        """``object_key`` wrapped for ``scope``, bound to ``identity`` and ``scope``.

        ``resource``: the attributes a policy matches on (a key service seals them with the
        key and decides on them at ``open``; the local keyring ignores them).
        """
        ...

    def open(
        self,
        principal: Principal,
        identity: bytes,
        scope: Scope,
        sealed: bytes,
        *,
        resource: Resource | None = None,
    ) -> bytes:
        """The object key, or KeyUnavailable if it cannot be released or does not open."""
        ...

    def secret(self, name: str) -> bytes:
        """A stable 32-byte secret for ``name`` (catalog encryption, pseudonym HMAC keys)."""
        ...


def _seal_aad(identity: bytes, scope: Scope) -> bytes:
    # Length-prefixed so that no (identity, scope) pair can be re-split into another.
    label = scope.label().encode()
    return (
        b"mdm-seal-v1\0"
        + struct.pack(">I", len(identity))
        + identity
        + struct.pack(">I", len(label))
        + label
    )


def check_secret_file(path: Path, st: os.stat_result) -> None:
    """Refuse a secrets file that group/other may access or that someone else owns."""
    if st.st_mode & 0o077:
        raise ConfigError(
            path,
            None,
            f"mode {st.st_mode & 0o777:04o} lets group/other access this secrets file; "
            f"run 'chmod 600 {path}'",
        )
    if st.st_uid != os.geteuid():
        raise ConfigError(
            path, None, f"owned by uid {st.st_uid}, not by the current user ({os.geteuid()})"
        )


class LocalKeyring:
    """Scope keys in a local JSON file (mode 0600), for a single workstation.

    The file holds a random master secret (for :meth:`secret`) and one random key per scope,
    created on demand. Updates are atomic (temp file in the same directory, fsync, rename) and
    serialised across processes by an flock on ``<file>.lock``, re-reading the file under the
    lock so that two processes adding scopes never lose each other's keys. Thread-safe.
    """

    remote = False

    def __init__(self, path: Path, master: bytes, scopes: dict[str, bytes]) -> None:
        self.path = path
        self._master = master
        self._scopes = scopes
        self._lock = threading.Lock()

    # -- loading and saving ---------------------------------------------------------------
    @classmethod
    def load(cls, path: Path, create: bool = True) -> LocalKeyring:
        """Open the keyring at ``path``; create it (0600) if absent and ``create`` is true."""
        path = Path(path).resolve()
        with _file_lock(path):
            if not path.exists():
                if not create:
                    raise ConfigError(path, None, "keyring file does not exist")
                master = new_key()
                _write_atomic(path, master, {})
                log.info("created keyring %s", path)
                return cls(path, master, {})
            master, scopes = _read(path)
        return cls(path, master, scopes)

    def _scope_key(self, scope: Scope, *, create: bool) -> bytes | None:
        label = scope.label()
        with self._lock:
            key = self._scopes.get(label)
            if key is not None:
                return key
            # Another process may have added it since we loaded: re-read under the file lock.
            with _file_lock(self.path):
                master, scopes = _read(self.path)
                if master != self._master:
                    raise ConfigError(self.path, None, "keyring master changed while in use")
                if label not in scopes and create:
                    scopes[label] = new_key()
                    _write_atomic(self.path, master, scopes)
                    log.info("created scope key %s in %s", label, self.path)
                self._scopes.update(scopes)
            return self._scopes.get(label)

    # -- KeyProvider ----------------------------------------------------------------------
    def seal(
        self,
        identity: bytes,
        scope: Scope,
        object_key: bytes,
        *,
        resource: Resource | None = None,
    ) -> bytes:
        """Wrap ``object_key`` under the scope key (created on first use); ignores ``resource``."""
        kek = self._scope_key(scope, create=True)
        assert kek is not None
        return _SEALED_VERSION + wrap_key(kek, object_key, _seal_aad(identity, scope))

    def open(
        self,
        principal: Principal,
        identity: bytes,
        scope: Scope,
        sealed: bytes,
        *,
        resource: Resource | None = None,
    ) -> bytes:
        """Unwrap a sealed object key. The caller has already checked policy for ``principal``."""
        kek = self._scope_key(scope, create=False)
        if kek is None:
            raise KeyUnavailable(f"no key for scope {scope.label()} in {self.path}")
        if sealed[:1] != _SEALED_VERSION:
            raise KeyUnavailable("sealed key has an unknown format")
        try:
            return unwrap_key(kek, sealed[1:], _seal_aad(identity, scope))
        except IntegrityError:
            raise KeyUnavailable(
                f"sealed key does not open for this object in scope {scope.label()}"
            ) from None

    def secret(self, name: str) -> bytes:
        """HKDF-SHA256 of the keyring master for ``name``: stable across restarts."""
        hkdf = HKDF(
            algorithm=hashes.SHA256(),
            length=KEY_LEN,
            salt=b"mdm-keyring-v1",
            info=b"mdm-secret\0" + name.encode(),
        )
        return hkdf.derive(self._master)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive flock on ``<path>.lock``, serialising keyring updates between processes."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _read(path: Path) -> tuple[bytes, dict[str, bytes]]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(path, None, f"cannot open keyring: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        # fstat the open file, not the path, so the file checked is the file read.
        check_secret_file(path, os.fstat(f.fileno()))
        raw = f.read()
    try:
        doc = json.loads(raw)
        if doc.get("version") != _FILE_VERSION:
            raise ConfigError(path, "version", f"unsupported keyring version {doc.get('version')}")
        master = base64.b64decode(doc["master"], validate=True)
        scopes = {str(k): base64.b64decode(v, validate=True) for k, v in doc["scopes"].items()}
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as e:
        raise ConfigError(path, None, f"malformed keyring file ({type(e).__name__})") from None
    if len(master) != KEY_LEN or any(len(k) != KEY_LEN for k in scopes.values()):
        raise ConfigError(path, None, "keyring holds a key of the wrong length")
    return master, scopes


def _write_atomic(path: Path, master: bytes, scopes: dict[str, bytes]) -> None:
    doc = {
        "version": _FILE_VERSION,
        "master": base64.b64encode(master).decode(),
        "scopes": {k: base64.b64encode(v).decode() for k, v in sorted(scopes.items())},
    }
    data = json.dumps(doc, indent=1).encode() + b"\n"
    # mkstemp creates the file with mode 0600, so the keys are never readable by others.
    fd, tmp = tempfile.mkstemp(prefix=".keyring-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
