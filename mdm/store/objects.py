"""The encrypted, chunked object store: blobs are files, LMDB indexes them.

Layout under ``root``::

    objects/ab/<name>   one blob per object (see mdm.store.crypto), name = hex SHA-256 of identity
    tmp/                blobs being written; anything here at start-up is a crash leftover
    store.lock          flock: shared while a store is open, exclusive while recover() runs

LMDB named databases (in the shared ``index.lmdb`` environment):

    b"objects"     blob name -> JSON record (UID, view, scope, sizes, sealed DEK, times, meta)
    b"lru"         u64 access time (µs) || blob name -> b""   (eviction order)
    b"store-meta"  b"stored_bytes" -> u64 sum of the blob sizes of all records

Write order (crash-safe): encrypt into ``tmp/``, fsync, rename into ``objects/``, fsync the
directory, and only then commit the record. Eviction runs the other way round: drop the record,
commit, then unlink the blob. A kill -9 at any point therefore leaves at worst a blob without a
record (an orphan, removed by :meth:`ObjectStore.recover`) and never a record without its blob.
See docs/STORE.md for the whole protocol.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import lmdb

from mdm.access.decide import Resource
from mdm.access.identity import Principal
from mdm.errors import IntegrityError, KeyUnavailable, NotFound, StoreFull
from mdm.store.crypto import (
    DEFAULT_CHUNK_SIZE,
    BlobHeader,
    ChunkCipher,
    decrypt_range,
    new_key,
    read_header,
)
from mdm.store.keys import KeyProvider, Scope

log = logging.getLogger(__name__)

VIEWS = ("identified", "deidentified")
# A de-identified view of one pseudonym scope and one set of options (mdm.access.views.View).
_DEID_VIEW = re.compile(r"^deid/[A-Za-z0-9._-]{1,64}/[0-9a-f]{12}$")
OBJECTS_DB = b"objects"
LRU_DB = b"lru"
META_DB = b"store-meta"
KEEP_DB = b"keep"
"""SOP Instance UID -> the names of the pinned collections that keep it (any view)."""
_BYTES_KEY = b"stored_bytes"
_EVICTED_KEY = b"evicted_objects"
_U64 = struct.Struct(">Q")
_NAME_LEN = 64
# Access times live in memory and reach LMDB in batches, so that a read of a cached file does
# not pay for an LMDB commit (an fsync). Losing them in a crash only blurs the LRU order. A
# long-lived user (the mount) calls flush_access_times() from a worker thread every few
# seconds; open() flushes by itself only past a count or an age, as a bound.
_TOUCH_FLUSH_COUNT = 4096
_TOUCH_FLUSH_SECONDS = 60.0


@dataclass(frozen=True)
class ObjectRef:
    """One cached object: a SOP instance in one view."""

    sop_uid: str
    view: str = "identified"

    def __post_init__(self) -> None:
        if self.view not in VIEWS and not _DEID_VIEW.match(self.view):
            raise ValueError(
                f"view must be one of {VIEWS} or deid/SCOPE/OPTIONS, got {self.view!r}"
            )
        if not self.sop_uid or "\0" in self.sop_uid:
            raise ValueError("sop_uid must be non-empty and hold no NUL")

    def identity(self) -> bytes:
        """The bytes bound into every chunk and into the sealed key of this object."""
        return b"mdm-object-v1\0" + self.view.encode() + b"\0" + self.sop_uid.encode()

    def blob_name(self) -> str:
        """Hex SHA-256 of the identity: deterministic, uniform, reveals nothing about the UID."""
        return hashlib.sha256(self.identity()).hexdigest()


@dataclass
class ObjectInfo:
    """The index record of one cached object (UIDs, sizes, sealed key, times; never PHI)."""

    ref: ObjectRef
    scope: Scope
    size: int
    """Plaintext size."""
    stored_bytes: int
    """Size of the blob on disk."""
    sealed_key: bytes
    created: float
    last_access: float
    meta: dict[str, str] = field(default_factory=dict)

    def to_record(self) -> bytes:
        """The LMDB value."""
        return json.dumps(
            {
                "v": 1,
                "uid": self.ref.sop_uid,
                "view": self.ref.view,
                "site": self.scope.site,
                "level": self.scope.level,
                "program": self.scope.program,
                "size": self.size,
                "stored": self.stored_bytes,
                "key": base64.b64encode(self.sealed_key).decode(),
                "created": self.created,
                "access": self.last_access,
                "meta": self.meta,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_record(cls, raw: bytes) -> ObjectInfo:
        """Parse an LMDB value; IntegrityError if it is malformed."""
        try:
            d = json.loads(raw)
            return cls(
                ref=ObjectRef(d["uid"], d["view"]),
                scope=Scope(d["site"], d["level"], d["program"]),
                size=int(d["size"]),
                stored_bytes=int(d["stored"]),
                sealed_key=base64.b64decode(d["key"], validate=True),
                created=float(d["created"]),
                last_access=float(d["access"]),
                meta={str(k): str(v) for k, v in d["meta"].items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise IntegrityError(f"malformed object record ({type(e).__name__})") from None


@dataclass(frozen=True)
class RecoveryReport:
    """What :meth:`ObjectStore.recover` cleaned up."""

    tmp_removed: int
    orphans_removed: int
    records_dropped: int
    objects: int
    bytes: int
    exclusive: bool
    """False if another process had the store open, so tmp/ and orphans were left alone."""


@dataclass(frozen=True)
class StoreStats:
    """Occupancy of the store."""

    objects: int
    bytes: int
    max_bytes: int
    pinned: int
    evicted: int = 0
    """Objects evicted to keep within max_bytes since the cache was made (all processes)."""
    pinned_bytes: int = 0
    """Stored bytes of the objects this process holds open (never evicted)."""


@dataclass(frozen=True)
class VerifyProblem:
    """One object that failed :meth:`ObjectStore.verify`."""

    ref: ObjectRef
    reason: str


class ObjectReader:
    """An open, pinned cached object; ``read`` decrypts only the chunks it needs.

    Thread-safe: reads use ``os.pread`` on one fd and share no file position. ``close`` must
    not race with reads on the same reader (FUSE releases a handle only after its reads).
    """

    def __init__(
        self, store: ObjectStore, info: ObjectInfo, fd: int, header: BlobHeader, dek: bytes
    ) -> None:
        self.info = info
        self._store = store
        self._fd = fd
        self._header = header
        self._span: tuple[int, bytes] = (0, b"")
        self._cipher: ChunkCipher | None = None
        self._dek = dek
        self._identity = info.ref.identity()
        self._closed = False
        self._close_lock = threading.Lock()

    @property
    def size(self) -> int:
        """Plaintext size of the object."""
        return self.info.size

    @property
    def chunk_size(self) -> int:
        """Chunk size of this blob: reads aligned to it decrypt each chunk once."""
        return self._header.chunk_size

    def read(self, offset: int, length: int) -> bytes:
        """Plaintext ``[offset, offset+length)``; b"" past EOF; IntegrityError on tampering."""
        return bytes(self.read_view(offset, length))

    def read_view(self, offset: int, length: int) -> memoryview:
        """Like :meth:`read`, as a view of the decrypted chunk (no copy; read-only)."""
        if self._closed:
            raise ValueError("read from a closed ObjectReader")
        size = self._header.size
        if offset >= size or length <= 0:
            return memoryview(b"")
        end = min(offset + length, size)
        # Readers ask for less than a chunk at a time (the kernel's 128 KiB): keep the last
        # decrypted span (memory only) so each chunk is authenticated and decrypted once.
        start_c, data_c = self._span
        if not (start_c <= offset and end <= start_c + len(data_c)):
            cs = self._header.chunk_size
            a = offset // cs * cs
            b = min(-(-end // cs) * cs, size)
            try:
                if self._cipher is None:
                    self._cipher = ChunkCipher(self._dek, self._identity, self._header)
                span = decrypt_range(
                    self._dek, self._identity, self._fd, self._header, a, b - a, self._cipher
                )
            except IntegrityError as e:
                raise IntegrityError(f"cached object {self.info.ref.sop_uid}: {e}") from None
            self._span = start_c, data_c = (a, span)
        return memoryview(data_c)[offset - start_c : end - start_c]

    def close(self) -> None:
        """Close the blob and unpin the object (idempotent)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        os.close(self._fd)
        self._dek = b""
        self._span = (0, b"")
        self._cipher = None
        self._store._unpin(self.info.ref.blob_name())

    def __enter__(self) -> ObjectReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ObjectStore:
    """Encrypted objects under ``root``, indexed in ``env``, within ``max_bytes`` (hard cap).

    Thread-safe. Pins (open readers) are per process: eviction in this process never removes a
    pinned object; another process sharing the cache may unlink its blob, which an open fd
    still reads (POSIX keeps an unlinked file alive while it is open).
    """

    def __init__(
        self,
        root: Path,
        env: lmdb.Environment,
        keys: KeyProvider,
        max_bytes: int,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        BlobHeader.for_plaintext(0, chunk_size)  # validates chunk_size
        if max_bytes <= 0:
            raise ValueError("max_bytes must be > 0")
        self.root = Path(root)
        self.env = env
        self.keys = keys
        self.max_bytes = max_bytes
        self.chunk_size = chunk_size
        self._objects_dir = self.root / "objects"
        self._tmp_dir = self.root / "tmp"
        for d in (self.root, self._objects_dir, self._tmp_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._db = env.open_db(OBJECTS_DB)
        self._lru = env.open_db(LRU_DB)
        self._meta = env.open_db(META_DB)
        self._keep = env.open_db(KEEP_DB)
        # One lock for all in-process bookkeeping and every LMDB write of this store. It is
        # held for short metadata work only (LMDB txns, unlinks), never while encrypting.
        self._lock = threading.Lock()
        self._pins: dict[str, int] = {}
        self._inflight: dict[str, threading.Event] = {}
        self._reserved = 0
        self._touched: dict[str, float] = {}
        self._last_flush = time.monotonic()
        self._lock_fd: int | None = os.open(
            self.root / "store.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        fcntl.flock(self._lock_fd, fcntl.LOCK_SH)

    # -- paths and small helpers ----------------------------------------------------------
    def _blob_path(self, name: str) -> Path:
        return self._objects_dir / name[:2] / name

    @staticmethod
    def _lru_key(name: str, t: float) -> bytes:
        return _U64.pack(max(0, int(t * 1_000_000))) + name.encode()

    def _committed_bytes(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(_BYTES_KEY, db=self._meta)
        return _U64.unpack(raw)[0] if raw else 0

    def _set_committed_bytes(self, txn: lmdb.Transaction, value: int) -> None:
        txn.put(_BYTES_KEY, _U64.pack(max(0, value)), db=self._meta)

    def _get(self, txn: lmdb.Transaction, name: str) -> ObjectInfo | None:
        raw = txn.get(name.encode(), db=self._db)
        if raw is None:
            return None
        info = ObjectInfo.from_record(bytes(raw))
        touched = self._touched.get(name)
        if touched is not None and touched > info.last_access:
            info.last_access = touched
        return info

    def _delete_record(self, txn: lmdb.Transaction, name: str, info: ObjectInfo) -> None:
        txn.delete(name.encode(), db=self._db)
        txn.delete(self._lru_key(name, info.last_access), db=self._lru)
        self._set_committed_bytes(txn, self._committed_bytes(txn) - info.stored_bytes)

    def _flush_touched(self, txn: lmdb.Transaction) -> None:
        """Write pending access times into records and the LRU order (lock held)."""
        for name, t in self._touched.items():
            raw = txn.get(name.encode(), db=self._db)
            if raw is None:
                continue
            info = ObjectInfo.from_record(bytes(raw))
            if t <= info.last_access:
                continue
            txn.delete(self._lru_key(name, info.last_access), db=self._lru)
            info.last_access = t
            txn.put(name.encode(), info.to_record(), db=self._db)
            txn.put(self._lru_key(name, t), b"", db=self._lru)
        self._touched.clear()
        self._last_flush = time.monotonic()

    def _unpin(self, name: str) -> None:
        with self._lock:
            n = self._pins.get(name, 0) - 1
            if n > 0:
                self._pins[name] = n
            else:
                self._pins.pop(name, None)

    def _unlink_blobs(self, names: Iterable[str]) -> None:
        for name in names:
            try:
                os.unlink(self._blob_path(name))
            except FileNotFoundError:
                pass

    def _lru_victims(
        self, txn: lmdb.Transaction, free: int, exclude: set[str]
    ) -> list[tuple[str, ObjectInfo]] | None:
        """Least recently used unpinned objects freeing at least ``free`` bytes, or None."""
        victims: list[tuple[str, ObjectInfo]] = []
        freed = 0
        if free <= 0:
            return victims
        with txn.cursor(db=self._lru) as cur:
            for key in cur.iternext(keys=True, values=False):
                name = bytes(key[_U64.size :]).decode()
                if name in exclude or self._pins.get(name):
                    continue
                info = self._get(txn, name)
                if info is None or self._kept(txn, info):
                    continue
                victims.append((name, info))
                freed += info.stored_bytes
                if freed >= free:
                    return victims
        return None

    def _make_room(self, need: int, exclude: set[str]) -> None:
        """Evict LRU objects so that committed + reserved + need <= max_bytes (lock held)."""
        with self.env.begin(write=True) as txn:
            self._flush_touched(txn)
            over = self._committed_bytes(txn) + self._reserved + need - self.max_bytes
            victims = self._lru_victims(txn, over, exclude)
            if victims is None:
                raise StoreFull(
                    f"cache is full: {need} bytes needed, max_bytes={self.max_bytes}, "
                    "and every other object is in use"
                )
            for name, info in victims:
                self._delete_record(txn, name, info)
            if victims:
                raw = txn.get(_EVICTED_KEY, db=self._meta)
                done = _U64.unpack(raw)[0] if raw else 0
                txn.put(_EVICTED_KEY, _U64.pack(done + len(victims)), db=self._meta)
        # Records are gone (committed) before the blobs: a crash here leaves only orphans.
        self._unlink_blobs(name for name, _ in victims)
        if victims:
            log.info("evicted %d objects to make room for %d bytes", len(victims), need)

    # -- public API -----------------------------------------------------------------------
    def recover(self) -> RecoveryReport:
        """Clean up after a crash: tmp leftovers, orphan blobs, records whose blob is bad.

        Run at start-up. If another process has the store open, only records without a valid
        blob are dropped: its in-flight temporaries and just-renamed blobs are left alone.
        """
        assert self._lock_fd is not None
        with self._lock:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                exclusive = True
            except BlockingIOError:
                exclusive = False
            try:
                report = self._recover(exclusive)
            finally:
                # Converting back may drop the lock first (flock is not atomic here); re-take.
                fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
        log.info(
            "store recovery: %d tmp files, %d orphan blobs removed, %d records dropped; "
            "%d objects, %d bytes",
            report.tmp_removed,
            report.orphans_removed,
            report.records_dropped,
            report.objects,
            report.bytes,
        )
        return report

    def _recover(self, exclusive: bool) -> RecoveryReport:
        tmp_removed = orphans_removed = 0
        if exclusive:
            for entry in os.scandir(self._tmp_dir):
                if entry.is_file(follow_symlinks=False) or entry.is_symlink():
                    os.unlink(entry.path)
                    tmp_removed += 1
        with self.env.begin(write=True) as txn:
            self._flush_touched(txn)
            records: dict[str, ObjectInfo | None] = {}
            with txn.cursor(db=self._db) as cur:
                for k, v in cur:
                    try:
                        records[bytes(k).decode()] = ObjectInfo.from_record(bytes(v))
                    except IntegrityError:
                        records[bytes(k).decode()] = None
            dropped = 0
            total = 0
            for name, info in records.items():
                path = self._blob_path(name)
                try:
                    size: int | None = path.stat().st_size
                except FileNotFoundError:
                    size = None
                if info is not None and size == info.stored_bytes:
                    total += info.stored_bytes
                    continue
                txn.delete(name.encode(), db=self._db)
                if info is not None:
                    txn.delete(self._lru_key(name, info.last_access), db=self._lru)
                if size is not None:
                    path.unlink(missing_ok=True)
                dropped += 1
            # Recompute the sum (and drop stray LRU entries) so accounting cannot drift.
            self._set_committed_bytes(txn, total)
            with txn.cursor(db=self._lru) as cur:
                stray = [
                    bytes(k)
                    for k in cur.iternext(keys=True, values=False)
                    if bytes(k[_U64.size :]).decode() not in records
                ]
            for k in stray:
                txn.delete(k, db=self._lru)
            kept = {n for n, i in records.items() if i is not None} if exclusive else set()
        if exclusive:
            for sub in os.scandir(self._objects_dir):
                if not sub.is_dir(follow_symlinks=False):
                    os.unlink(sub.path)
                    orphans_removed += 1
                    continue
                for entry in os.scandir(sub.path):
                    if entry.name not in kept or entry.name[:2] != sub.name:
                        if entry.is_dir(follow_symlinks=False):
                            log.warning("unexpected directory in the store: %s", entry.path)
                            continue
                        os.unlink(entry.path)
                        orphans_removed += 1
        return RecoveryReport(
            tmp_removed=tmp_removed,
            orphans_removed=orphans_removed,
            records_dropped=dropped,
            objects=len(records) - dropped,
            bytes=total,
            exclusive=exclusive,
        )

    def put(
        self,
        ref: ObjectRef,
        scope: Scope,
        data: bytes | memoryview,
        meta: dict[str, str] | None = None,
        *,
        resource: Resource | None = None,
    ) -> ObjectInfo:
        """Encrypt and store ``data`` as ``ref`` (idempotent: an existing object is kept).

        ``meta`` holds UIDs and codes only (sop_class_uid, transfer_syntax, study_uid, ...),
        never PHI: it is stored in clear in the index. Raises StoreFull if room cannot be made
        within max_bytes or the disk is full; a failed put leaves nothing behind.
        """
        meta = dict(meta or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise TypeError("meta must map str to str")
        name = ref.blob_name()
        header = BlobHeader.for_plaintext(len(data), self.chunk_size)
        need = header.blob_size
        while True:
            with self._lock:
                with self.env.begin() as txn:
                    existing = self._get(txn, name)
                if existing is not None:
                    return existing
                waiting = self._inflight.get(name)
                if waiting is None:
                    if need > self.max_bytes:
                        raise StoreFull(
                            f"object of {need} bytes is larger than the cache "
                            f"(max_bytes={self.max_bytes})"
                        )
                    self._make_room(need, exclude=set())
                    self._reserved += need
                    mine = threading.Event()
                    self._inflight[name] = mine
                    break
            # Another thread is storing the same object: wait for it, then return its record.
            waiting.wait()
        try:
            identity = ref.identity()
            dek = new_key()
            # A key service binds the policy attributes of the object to its sealed key.
            sealed = self.keys.seal(identity, scope, dek, resource=resource)
            tmp = self._write_blob(name, ChunkCipher(dek, identity, header), data)
            now = time.time()
            info = ObjectInfo(
                ref=ref,
                scope=scope,
                size=len(data),
                stored_bytes=need,
                sealed_key=sealed,
                created=now,
                last_access=now,
                meta=meta,
            )
            with self._lock:
                stored = self._commit(name, info, tmp)
            if stored is info:
                log.debug("stored object %s (%d bytes)", name[:16], need)
            return stored
        finally:
            with self._lock:
                self._reserved -= need
                del self._inflight[name]
            mine.set()

    def _write_blob(self, name: str, cipher: ChunkCipher, data: bytes | memoryview) -> Path:
        """Encrypt into tmp/ and fsync; the caller places it (``_commit``)."""
        tmp = self._tmp_dir / f"{name}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                for piece in cipher.iter_blob(data):
                    _write_all(fd, piece)
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as e:
            self._discard((tmp,), e)
            raise
        return tmp

    def _commit(self, name: str, info: ObjectInfo, tmp: Path) -> ObjectInfo:
        """Place the blob written at ``tmp`` and commit its record, in one LMDB write
        transaction (lock held); returns the record in force.

        LMDB serialises write transactions across processes, so placing the blob inside one
        pairs each record with its own blob: two processes storing the same object (a mount
        and ``mdm fetch``, or two jobs' mounts sharing a cache) cannot leave one's record over
        the other's blob. The later one finds the earlier's record and discards its own blob.
        Evicted blobs are unlinked inside the transaction too, so an unlink can never hit a
        blob placed after it under the same name.
        """
        final = self._blob_path(name)
        placed = False
        try:
            with self.env.begin(write=True) as txn:
                existing = self._get(txn, name)
                if existing is not None:
                    os.unlink(tmp)
                    return existing
                # Another process may have committed since we made room: check again here,
                # inside the write txn, so the committed total never exceeds max_bytes.
                over = self._committed_bytes(txn) + info.stored_bytes - self.max_bytes
                victims = self._lru_victims(txn, over, exclude={name})
                if victims is None:
                    raise StoreFull(f"cache filled up by another process (max={self.max_bytes})")
                for vname, vinfo in victims:
                    self._delete_record(txn, vname, vinfo)
                if not final.parent.is_dir():
                    final.parent.mkdir(mode=0o700, exist_ok=True)
                    _fsync_dir(self._objects_dir)
                os.rename(tmp, final)
                placed = True
                # No fsync of the directory: the index commits without one too (sync=False), and
                # recovery drops a record whose blob is missing or short, so a rename lost to a
                # power cut costs a re-fetch. The blob's own bytes were fsynced before the
                # rename: a blob that is there is whole. (0.3-0.4 ms per object, under the lock.)
                txn.put(name.encode(), info.to_record(), db=self._db)
                txn.put(self._lru_key(name, info.last_access), b"", db=self._lru)
                self._set_committed_bytes(txn, self._committed_bytes(txn) + info.stored_bytes)
                self._unlink_blobs(vname for vname, _ in victims)
        except BaseException as e:
            self._discard((tmp, final) if placed else (tmp,), e)
            raise
        return info

    def _discard(self, paths: Iterable[Path], error: BaseException) -> None:
        """Remove what a failed put wrote; a full disk becomes StoreFull (nothing stored)."""
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreFull(
                f"no space left on the cache disk under {self.root} "
                f"({os.strerror(error.errno)}); nothing was stored"
            ) from None

    def info(self, ref: ObjectRef) -> ObjectInfo | None:
        """The record of ``ref``, or None if it is not cached."""
        with self._lock, self.env.begin() as txn:
            return self._get(txn, ref.blob_name())

    def open(self, ref: ObjectRef, principal: Principal) -> ObjectReader:
        """Open a cached object for reading: unwrap its key, pin it, mark it recently used.

        The caller has checked policy for ``principal``. Raises NotFound if it is not cached,
        KeyUnavailable if its key is not released, IntegrityError if the blob is damaged.
        """
        reader = self._open(ref, principal)
        name = ref.blob_name()
        with self._lock:
            self._touched[name] = time.time()
            due = (
                len(self._touched) >= _TOUCH_FLUSH_COUNT
                or time.monotonic() - self._last_flush > _TOUCH_FLUSH_SECONDS
            )
            if due:
                with self.env.begin(write=True) as txn:
                    self._flush_touched(txn)
        return reader

    def flush_access_times(self) -> int:
        """Write the access times of recently opened objects into the index; how many.

        A write transaction over every object opened since the last flush: call it off any
        latency-sensitive thread.
        """
        with self._lock:
            n = len(self._touched)
            if n:
                with self.env.begin(write=True) as txn:
                    self._flush_touched(txn)
            else:
                self._last_flush = time.monotonic()
        return n

    def _open(self, ref: ObjectRef, principal: Principal) -> ObjectReader:
        name = ref.blob_name()
        with self._lock:
            with self.env.begin() as txn:
                info = self._get(txn, name)
            if info is None:
                raise NotFound(f"object {ref.sop_uid} ({ref.view}) is not cached")
            # Pin under the same lock as the lookup, so eviction cannot slip in between.
            self._pins[name] = self._pins.get(name, 0) + 1
        fd = -1
        try:
            dek = self.keys.open(principal, ref.identity(), info.scope, info.sealed_key)
            try:
                fd = os.open(self._blob_path(name), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise IntegrityError(f"blob of cached object {ref.sop_uid} is missing") from None
            header = read_header(fd)
            on_disk = os.fstat(fd).st_size
            if header.size != info.size or not on_disk == header.blob_size == info.stored_bytes:
                raise IntegrityError(
                    f"blob of cached object {ref.sop_uid} has the wrong size "
                    f"({on_disk} bytes on disk, {info.stored_bytes} recorded)"
                )
            return ObjectReader(self, info, fd, header, dek)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            self._unpin(name)
            raise

    def evict(
        self, refs: Iterable[ObjectRef] | None = None, *, target_bytes: int | None = None
    ) -> int:
        """Evict objects; return how many. Pinned objects are never evicted.

        ``refs``: evict these. ``target_bytes``: evict least recently used objects until the
        store holds at most that much. Neither: evict every unpinned object.
        """
        with self._lock:
            with self.env.begin(write=True) as txn:
                self._flush_touched(txn)
                chosen: dict[str, ObjectInfo] = {}
                if refs is not None:
                    for ref in refs:
                        name = ref.blob_name()
                        info = self._get(txn, name)
                        if info is not None and not self._pins.get(name):
                            chosen[name] = info
                if target_bytes is not None or refs is None:
                    target = 0 if target_bytes is None else target_bytes
                    remaining = self._committed_bytes(txn) - sum(
                        i.stored_bytes for i in chosen.values()
                    )
                    with txn.cursor(db=self._lru) as cur:
                        for key in cur.iternext(keys=True, values=False):
                            if remaining <= target and target_bytes is not None:
                                break
                            name = bytes(key[_U64.size :]).decode()
                            if name in chosen or self._pins.get(name):
                                continue
                            info = self._get(txn, name)
                            if info is not None and not self._kept(txn, info):
                                chosen[name] = info
                                remaining -= info.stored_bytes
                for name, info in chosen.items():
                    self._delete_record(txn, name, info)
            self._unlink_blobs(chosen)
        if chosen:
            log.info("evicted %d objects", len(chosen))
        return len(chosen)

    def stats(self) -> StoreStats:
        """Number of objects, stored bytes, the cap, and how many objects are pinned."""
        with self._lock, self.env.begin() as txn:
            return StoreStats(
                objects=txn.stat(self._db)["entries"],
                bytes=self._committed_bytes(txn),
                max_bytes=self.max_bytes,
                pinned=len(self._pins),
                evicted=_U64.unpack(raw)[0] if (raw := txn.get(_EVICTED_KEY, db=self._meta)) else 0,
                pinned_bytes=sum(
                    info.stored_bytes
                    for name in self._pins
                    if (info := self._get(txn, name)) is not None
                ),
            )

    # -- collections kept out of eviction ---------------------------------------------------
    def _kept(self, txn: lmdb.Transaction, info: ObjectInfo) -> bool:
        return txn.get(info.ref.sop_uid.encode(), db=self._keep) is not None

    def keep(self, sop_uids: Iterable[str], tag: str) -> int:
        """Keep the objects of ``sop_uids`` (every view, cached now or later) out of eviction,
        on behalf of ``tag`` (a pinned collection); return how many UIDs were new to it.
        Held in the index, so every process sharing the cache honours it."""
        n = 0
        with self._lock, self.env.begin(write=True) as txn:
            for uid in sop_uids:
                k = uid.encode()
                raw = txn.get(k, db=self._keep)
                tags = set(bytes(raw).decode().split("\n")) if raw else set()
                if tag not in tags:
                    tags.add(tag)
                    txn.put(k, "\n".join(sorted(tags)).encode(), db=self._keep)
                    n += 1
        return n

    def release(self, tag: str) -> int:
        """Stop keeping what ``tag`` kept (a collection no longer pinned); return how many."""
        n = 0
        with self._lock, self.env.begin(write=True) as txn:
            with txn.cursor(db=self._keep) as cur:
                rows = [(bytes(k), bytes(v).decode()) for k, v in cur]
            for k, v in rows:
                tags = set(v.split("\n"))
                if tag in tags:
                    tags.discard(tag)
                    n += 1
                    if tags:
                        txn.put(k, "\n".join(sorted(tags)).encode(), db=self._keep)
                    else:
                        txn.delete(k, db=self._keep)
        return n

    def kept_stats(self) -> tuple[int, int]:
        """(objects, stored bytes) of the cached objects a pinned collection keeps."""
        objects = size = 0
        with self.env.begin() as txn, txn.cursor(db=self._db) as cur:
            for _, v in cur:
                try:
                    info = ObjectInfo.from_record(bytes(v))
                except IntegrityError:
                    continue
                if self._kept(txn, info):
                    objects += 1
                    size += info.stored_bytes
        return objects, size

    def list_refs(self) -> list[ObjectRef]:
        """Every cached object."""
        refs: list[ObjectRef] = []
        with self.env.begin() as txn, txn.cursor(db=self._db) as cur:
            for _, v in cur:
                try:
                    refs.append(ObjectInfo.from_record(bytes(v)).ref)
                except IntegrityError:
                    continue
        return refs

    def verify(self, principal: Principal) -> list[VerifyProblem]:
        """Authenticate every chunk of every object and check its sizes; list the failures.

        Does not count as an access for the LRU order.
        """
        problems: list[VerifyProblem] = []
        for ref in self.list_refs():
            try:
                reader = self._open(ref, principal)
            except NotFound:
                continue  # evicted meanwhile
            except (IntegrityError, KeyUnavailable) as e:
                problems.append(VerifyProblem(ref, str(e)))
                continue
            with reader:
                try:
                    # Chunk by chunk, so memory stays bounded by the chunk size.
                    step = reader.chunk_size
                    if reader.size == 0:
                        reader.read(0, 0)
                    for off in range(0, reader.size, step):
                        reader.read(off, step)
                except IntegrityError as e:
                    problems.append(VerifyProblem(ref, str(e)))
        return problems

    def close(self) -> None:
        """Persist pending access times and release the store lock (idempotent)."""
        with self._lock:
            if self._lock_fd is None:
                return
            if self._touched:
                with self.env.begin(write=True) as txn:
                    self._flush_touched(txn)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
