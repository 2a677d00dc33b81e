"""The encrypted, chunked object store: blobs are files, LMDB indexes them.

Layout under ``root``::

    objects/ab/<name>   one blob per object (see mdm.store.crypto), name = hex SHA-256 of identity
    tmp/                blobs being written; anything here at start-up is a crash leftover
    store.lock          flock: shared while a store is open, exclusive while recover() runs

LMDB named databases (in the shared ``index.lmdb`` environment):

    b"objects"     blob name -> JSON record (UID, view, scope, sizes, sealed DEK, times, meta)
    b"lru"         u64 access time (µs) || blob name -> b""   (eviction order)
    b"store-meta"  b"stored_bytes" -> u64 sum of the blob sizes of all records

Write order (crash-safe): encrypt into ``tmp/`` (fsync only with ``[cache] fsync``), rename
into ``objects/``, and only then commit the record. Eviction runs the other way round: drop the
record, commit, then unlink the blob. A kill -9 at any point therefore leaves at worst a blob
without a record (an orphan, removed by :meth:`ObjectStore.recover`) and never a record without
its blob. A power cut may leave a record whose blob is short (dropped by ``recover``) or, on a
filesystem that does not order data before metadata, one whose chunks fail authentication:
the read that meets it fails (EIO) and drops the object (:meth:`ObjectStore.corrupt`), so the
next open retrieves it again. See docs/STORE.md for the whole protocol.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import lmdb

from mdm.access.decide import Resource
from mdm.access.identity import Principal
from mdm.errors import IntegrityError, NotFound, StoreFull
from mdm.store.crypto import (
    DEFAULT_CHUNK_SIZE,
    BlobHeader,
    ChunkCipher,
    decrypt_range,
    new_key,
    read_header,
)
from mdm.store.index import StoreIndex
from mdm.store.keys import KeyProvider, Scope
from mdm.store.records import ObjectInfo, ObjectRef
from mdm.store.recovery import RecoveryReport, VerifyProblem, sweep, verify
from mdm.store.spans import BufferPool, SpanBuffers, decrypt_span

log = logging.getLogger(__name__)

_NAME_LEN = 64
# Access times live in memory and reach LMDB in batches, so that a read of a cached file does
# not pay for an LMDB commit (an fsync). Losing them in a crash only blurs the LRU order. A
# long-lived user (the mount) calls flush_access_times() from a worker thread every few
# seconds; open() flushes by itself only past a count or an age, as a bound.
_TOUCH_FLUSH_COUNT = 4096
_TOUCH_FLUSH_SECONDS = 60.0


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
        self._bufs: SpanBuffers | None = None
        self._tspan = (0, 0)  # plaintext [start, end) now in self._bufs.plain

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
                raise self._store.corrupt(self.info, str(e)) from None
            self._span = start_c, data_c = (a, span)
        return memoryview(data_c)[offset - start_c : end - start_c]

    def read_transient(self, offset: int, length: int) -> memoryview:
        """Like :meth:`read_view`, for a caller that is done with the view before its next
        call on this reader (the FUSE adapter: pyfuse3 copies a reply into the kernel at once).

        Whole chunks up to :data:`~mdm.store.spans.SPAN_BYTES` ahead are decrypted at once
        into buffers this reader reuses (taken from, and given back to, the store's pool), so
        a sequential reader costs one ``preadv`` and no allocation per span. One caller at a
        time: the view is overwritten by the next call.
        """
        if self._closed:
            raise ValueError("read from a closed ObjectReader")
        h = self._header
        size = h.size
        if offset >= size or length <= 0:
            return memoryview(b"")
        end = min(offset + length, size)
        start_t, end_t = self._tspan
        bufs = self._bufs
        if bufs is None:
            bufs = self._bufs = self._store.buffers.take(h.chunk_size)
        if not (start_t <= offset and end <= end_t):
            cs = h.chunk_size
            first = offset // cs
            last = min(max((end - 1) // cs, first + bufs.chunks - 1), h.n_chunks - 1)
            if last - first + 1 > bufs.chunks:  # a read larger than a span: serve it
                return self.read_view(offset, length)
            if self._cipher is None:
                self._cipher = ChunkCipher(self._dek, self._identity, h)
            self._tspan = (0, 0)
            try:
                n = decrypt_span(self._cipher, self._fd, h, first, last, bufs)
            except IntegrityError as e:
                raise self._store.corrupt(self.info, str(e)) from None
            self._tspan = start_t, end_t = (first * cs, first * cs + n)
        return memoryview(bufs.plain)[offset - start_t : end - start_t].toreadonly()

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
        bufs, self._bufs, self._tspan = self._bufs, None, (0, 0)
        if bufs is not None:
            self._store.buffers.give(bufs)
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
        *,
        fsync: bool = False,
    ) -> None:
        BlobHeader.for_plaintext(0, chunk_size)  # validates chunk_size
        if max_bytes <= 0:
            raise ValueError("max_bytes must be > 0")
        self.root = Path(root)
        self.env = env
        self.keys = keys
        self.max_bytes = max_bytes
        self.chunk_size = chunk_size
        self.fsync = fsync
        """fsync each blob before placing it (``[cache] fsync``; docs/STORE.md)."""
        self.objects_dir = self.root / "objects"
        self._objects_str = str(self.objects_dir)
        self.tmp_dir = self.root / "tmp"
        for d in (self.root, self.objects_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.index = StoreIndex(env)
        # One lock for all in-process bookkeeping and every LMDB write of this store. It is
        # held for short metadata work only (LMDB txns, unlinks), never while encrypting.
        self._lock = threading.Lock()
        self._pins: dict[str, int] = {}
        self.buffers = BufferPool()
        """Span buffers of transient reads, passed from one open file to the next."""
        self._inflight: dict[str, threading.Event] = {}
        self._reserved = 0
        self._lock_fd: int | None = os.open(
            self.root / "store.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        fcntl.flock(self._lock_fd, fcntl.LOCK_SH)

    # -- paths and small helpers ----------------------------------------------------------
    def blob_path(self, name: str) -> Path:
        """Where the blob of the object named ``name`` lives."""
        return self.objects_dir / name[:2] / name

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
                os.unlink(self.blob_path(name))
            except FileNotFoundError:
                pass

    def _make_room(self, need: int, exclude: set[str]) -> None:
        """Evict LRU objects so that committed + reserved + need <= max_bytes (lock held)."""
        with self.env.begin() as txn:
            if self.index.committed(txn) + self._reserved + need <= self.max_bytes:
                # Room enough: no write transaction (a commit per object received). The cap
                # is checked again in the transaction that commits the record (_commit).
                return
        with self.env.begin(write=True) as txn:
            self.index.flush_touched(txn)
            over = self.index.committed(txn) + self._reserved + need - self.max_bytes
            victims = self.index.lru_victims(
                txn, over, lambda n: n in exclude or bool(self._pins.get(n))
            )
            if victims is None:
                raise StoreFull(
                    f"cache is full: {need} bytes needed, max_bytes={self.max_bytes}, "
                    "and every other object is in use"
                )
            for name, info in victims:
                self.index.delete(txn, name, info)
            if victims:
                self.index.count_evicted(txn, len(victims))
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
                report = sweep(self, exclusive)
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
                    existing = self.index.get(txn, name)
                    room = self.index.committed(txn) + self._reserved + need <= self.max_bytes
                if existing is not None:
                    return existing
                waiting = self._inflight.get(name)
                if waiting is None:
                    if need > self.max_bytes:
                        raise StoreFull(
                            f"object of {need} bytes is larger than the cache "
                            f"(max_bytes={self.max_bytes})"
                        )
                    if not room:  # (one read transaction per object when there is room)
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
        """Encrypt into tmp/ (and fsync if :attr:`fsync`); the caller places it (``_commit``)."""
        tmp = self.tmp_dir / f"{name}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                for piece in cipher.iter_blob(data):
                    _write_all(fd, piece)
                if self.fsync:
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
        final = self.blob_path(name)
        placed = False
        try:
            with self.env.begin(write=True) as txn:
                existing = self.index.get(txn, name)
                if existing is not None:
                    os.unlink(tmp)
                    return existing
                # Another process may have committed since we made room: check again here,
                # inside the write txn, so the committed total never exceeds max_bytes.
                over = self.index.committed(txn) + info.stored_bytes - self.max_bytes
                victims = self.index.lru_victims(
                    txn, over, lambda n: n == name or bool(self._pins.get(n))
                )
                if victims is None:
                    raise StoreFull(f"cache filled up by another process (max={self.max_bytes})")
                for vname, vinfo in victims:
                    self.index.delete(txn, vname, vinfo)
                if not final.parent.is_dir():
                    final.parent.mkdir(mode=0o700, exist_ok=True)
                    _fsync_dir(self.objects_dir)
                os.rename(tmp, final)
                placed = True
                # No fsync of the directory: the index commits without one too (sync=False), and
                # recovery drops a record whose blob is missing or short, so a rename lost to a
                # power cut costs a re-fetch. The blob's own bytes were fsynced before the
                # rename: a blob that is there is whole. (0.3-0.4 ms per object, under the lock.)
                self.index.add(txn, name, info)
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
            return self.index.get(txn, ref.blob_name())

    def open(self, ref: ObjectRef, principal: Principal) -> ObjectReader:
        """Open a cached object for reading: unwrap its key, pin it, mark it recently used.

        The caller has checked policy for ``principal``. Raises NotFound if it is not cached,
        KeyUnavailable if its key is not released, IntegrityError if the blob is damaged.
        """
        reader = self.open_untouched(ref, principal)
        name = ref.blob_name()
        with self._lock:
            self.index.touched[name] = time.time()
            due = (
                len(self.index.touched) >= _TOUCH_FLUSH_COUNT
                or time.monotonic() - self.index.last_flush > _TOUCH_FLUSH_SECONDS
            )
            if due:
                with self.env.begin(write=True) as txn:
                    self.index.flush_touched(txn)
        return reader

    def flush_access_times(self) -> int:
        """Write the access times of recently opened objects into the index; how many.

        A write transaction over every object opened since the last flush: call it off any
        latency-sensitive thread.
        """
        with self._lock:
            n = len(self.index.touched)
            if n:
                with self.env.begin(write=True) as txn:
                    self.index.flush_touched(txn)
            else:
                self.index.last_flush = time.monotonic()
        return n

    def open_untouched(self, ref: ObjectRef, principal: Principal) -> ObjectReader:
        """Like :meth:`open`, without counting as an access for the LRU order."""
        name = ref.blob_name()
        with self._lock:
            with self.env.begin() as txn:
                info = self.index.get(txn, name)
            if info is None:
                raise NotFound(f"object {ref.sop_uid} ({ref.view}) is not cached")
            # Pin under the same lock as the lookup, so eviction cannot slip in between.
            self._pins[name] = self._pins.get(name, 0) + 1
        fd = -1
        try:
            dek = self.keys.open(principal, ref.identity(), info.scope, info.sealed_key)
            try:
                # A string, not blob_path's Path: pathlib costs more than the open itself.
                fd = os.open(f"{self._objects_str}/{name[:2]}/{name}", os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise self.corrupt(info, "its blob is missing") from None
            try:
                header = read_header(fd)
            except IntegrityError as e:
                raise self.corrupt(info, str(e)) from None
            on_disk = os.fstat(fd).st_size
            if header.size != info.size or not on_disk == header.blob_size == info.stored_bytes:
                raise self.corrupt(
                    info,
                    f"its blob has the wrong size ({on_disk} bytes on disk, "
                    f"{info.stored_bytes} recorded)",
                )
            return ObjectReader(self, info, fd, header, dek)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            self._unpin(name)
            raise

    def corrupt(self, info: ObjectInfo, reason: str) -> IntegrityError:
        """``info``'s blob is missing, of the wrong size, or a chunk of it failed
        authentication (torn by a power cut, or altered on disk): drop its record and blob, so
        that the next open retrieves the object again, and return the error to raise (this
        open or read fails: EIO, no byte of it served)."""
        name = info.ref.blob_name()
        dropped = False
        with self._lock:
            with self.env.begin(write=True) as txn:
                current = self.index.get(txn, name)
                # Only the record this reader opened: a re-fetched copy stored since is kept.
                if current is not None and current.sealed_key == info.sealed_key:
                    self.index.delete(txn, name, current)
                    dropped = True
            if dropped:
                self._unlink_blobs((name,))
        if dropped:
            log.error(
                "cached object %s is damaged (%s): dropped; the next open retrieves it again",
                info.ref.sop_uid,
                reason,
            )
        else:  # evicted or stored again meanwhile (another process): nothing damaged is left
            log.info("cached object %s changed while opened (%s)", info.ref.sop_uid, reason)
        return IntegrityError(f"cached object {info.ref.sop_uid}: {reason}")

    def evict(
        self, refs: Iterable[ObjectRef] | None = None, *, target_bytes: int | None = None
    ) -> int:
        """Evict objects; return how many. Pinned objects are never evicted.

        ``refs``: evict these. ``target_bytes``: evict least recently used objects until the
        store holds at most that much. Neither: evict every unpinned object.
        """
        with self._lock:
            with self.env.begin(write=True) as txn:
                self.index.flush_touched(txn)
                chosen: dict[str, ObjectInfo] = {}
                if refs is not None:
                    for ref in refs:
                        name = ref.blob_name()
                        info = self.index.get(txn, name)
                        if info is not None and not self._pins.get(name):
                            chosen[name] = info
                if target_bytes is not None or refs is None:
                    target = 0 if target_bytes is None else target_bytes
                    remaining = self.index.committed(txn) - sum(
                        i.stored_bytes for i in chosen.values()
                    )
                    for name in self.index.lru_order(txn):
                        if remaining <= target and target_bytes is not None:
                            break
                        if name in chosen or self._pins.get(name):
                            continue
                        info = self.index.get(txn, name)
                        if info is not None and not self.index.kept(txn, info):
                            chosen[name] = info
                            remaining -= info.stored_bytes
                for name, info in chosen.items():
                    self.index.delete(txn, name, info)
            self._unlink_blobs(chosen)
        if chosen:
            log.info("evicted %d objects", len(chosen))
        return len(chosen)

    def stats(self) -> StoreStats:
        """Number of objects, stored bytes, the cap, and how many objects are pinned."""
        with self._lock, self.env.begin() as txn:
            return StoreStats(
                objects=self.index.entries(txn),
                bytes=self.index.committed(txn),
                max_bytes=self.max_bytes,
                pinned=len(self._pins),
                evicted=self.index.evicted(txn),
                pinned_bytes=sum(
                    info.stored_bytes
                    for name in self._pins
                    if (info := self.index.get(txn, name)) is not None
                ),
            )

    # -- collections kept out of eviction ---------------------------------------------------
    def keep(self, sop_uids: Iterable[str], tag: str) -> int:
        """Keep the objects of ``sop_uids`` (every view, cached now or later) out of eviction,
        on behalf of ``tag`` (a pinned collection); return how many UIDs were new to it.
        Held in the index, so every process sharing the cache honours it."""
        with self._lock, self.env.begin(write=True) as txn:
            return self.index.keep(txn, sop_uids, tag)

    def release(self, tag: str) -> int:
        """Stop keeping what ``tag`` kept (a collection no longer pinned); return how many."""
        with self._lock, self.env.begin(write=True) as txn:
            return self.index.release(txn, tag)

    def kept_stats(self) -> tuple[int, int]:
        """(objects, stored bytes) of the cached objects a pinned collection keeps."""
        objects = size = 0
        with self.env.begin() as txn:
            for info in self.index.infos(txn):
                if self.index.kept(txn, info):
                    objects += 1
                    size += info.stored_bytes
        return objects, size

    def list_refs(self) -> list[ObjectRef]:
        """Every cached object."""
        with self.env.begin() as txn:
            return [info.ref for info in self.index.infos(txn)]

    def verify(self, principal: Principal) -> list[VerifyProblem]:
        """Authenticate every chunk of every object and check its sizes; list the failures
        (:func:`mdm.store.recovery.verify`). Does not count as an access for the LRU order."""
        return verify(self, principal)

    def close(self) -> None:
        """Persist pending access times and release the store lock (idempotent)."""
        with self._lock:
            if self._lock_fd is None:
                return
            if self.index.touched:
                with self.env.begin(write=True) as txn:
                    self.index.flush_touched(txn)
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
