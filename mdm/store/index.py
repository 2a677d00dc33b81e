"""The store's LMDB index: object records, the LRU order, byte accounting, evictions counted,
collections kept out of eviction, and access times not yet written.

No locking here: :class:`mdm.store.objects.ObjectStore` calls every method under its own lock
and inside its own transactions (LMDB serialises write transactions across processes). No
file is touched here either: blobs are the store's.
"""

from __future__ import annotations

import copy
import struct
import time
from collections.abc import Callable, Iterable, Iterator

import lmdb

from mdm.errors import IntegrityError
from mdm.store.records import ObjectInfo

OBJECTS_DB = b"objects"
LRU_DB = b"lru"
META_DB = b"store-meta"
KEEP_DB = b"keep"
"""SOP Instance UID -> the names of the pinned collections that keep it (any view)."""
_BYTES_KEY = b"stored_bytes"
_EVICTED_KEY = b"evicted_objects"
_U64 = struct.Struct(">Q")
_PARSED_MAX = 4096


class StoreIndex:
    """The index databases of one store (see the module docstring)."""

    def __init__(self, env: lmdb.Environment) -> None:
        self.env = env
        self.db = env.open_db(OBJECTS_DB)
        self.lru = env.open_db(LRU_DB)
        self.meta = env.open_db(META_DB)
        self.keeps = env.open_db(KEEP_DB)
        self.touched: dict[str, float] = {}
        """Access times not yet written (object name -> time), newest wins."""
        self.last_flush = time.monotonic()
        self._parsed: dict[bytes, ObjectInfo] = {}

    @staticmethod
    def lru_key(name: str, t: float) -> bytes:
        """The LRU database's key: access time (µs, big-endian) then the object's name."""
        return _U64.pack(max(0, int(t * 1_000_000))) + name.encode()

    # -- bytes and counters ---------------------------------------------------------------
    def committed(self, txn: lmdb.Transaction) -> int:
        """Stored bytes of every committed object."""
        raw = txn.get(_BYTES_KEY, db=self.meta)
        return _U64.unpack(raw)[0] if raw else 0

    def set_committed(self, txn: lmdb.Transaction, value: int) -> None:
        """Set the stored-bytes total (recovery recomputes it)."""
        txn.put(_BYTES_KEY, _U64.pack(max(0, value)), db=self.meta)

    def evicted(self, txn: lmdb.Transaction) -> int:
        """Objects evicted to make room, ever."""
        raw = txn.get(_EVICTED_KEY, db=self.meta)
        return _U64.unpack(raw)[0] if raw else 0

    def count_evicted(self, txn: lmdb.Transaction, n: int) -> None:
        """Add ``n`` to the evictions counter."""
        txn.put(_EVICTED_KEY, _U64.pack(self.evicted(txn) + n), db=self.meta)

    def entries(self, txn: lmdb.Transaction) -> int:
        """How many object records there are."""
        return int(txn.stat(self.db)["entries"])

    # -- records --------------------------------------------------------------------------
    def get(self, txn: lmdb.Transaction, name: str) -> ObjectInfo | None:
        """The record of ``name`` with its latest access time, or None."""
        raw = txn.get(name.encode(), db=self.db)
        if raw is None:
            return None
        # Parsed records by their exact bytes: a record that changes is a new key, so this
        # can never give a stale one; a copy, since callers set its access time.
        key = bytes(raw)
        parsed = self._parsed.get(key)
        if parsed is None:
            parsed = ObjectInfo.from_record(key)
            if len(self._parsed) >= _PARSED_MAX:
                self._parsed.clear()
            self._parsed[key] = parsed
        info = copy.copy(parsed)
        touched = self.touched.get(name)
        if touched is not None and touched > info.last_access:
            info.last_access = touched
        return info

    def add(self, txn: lmdb.Transaction, name: str, info: ObjectInfo) -> None:
        """Commit a new record: the record, its LRU entry and its bytes."""
        txn.put(name.encode(), info.to_record(), db=self.db)
        txn.put(self.lru_key(name, info.last_access), b"", db=self.lru)
        self.set_committed(txn, self.committed(txn) + info.stored_bytes)

    def delete(self, txn: lmdb.Transaction, name: str, info: ObjectInfo) -> None:
        """Remove a record, its LRU entry and its bytes."""
        txn.delete(name.encode(), db=self.db)
        txn.delete(self.lru_key(name, info.last_access), db=self.lru)
        self.set_committed(txn, self.committed(txn) - info.stored_bytes)

    def records(self, txn: lmdb.Transaction) -> dict[str, ObjectInfo | None]:
        """Every record by name (None for one that does not decode), for recovery."""
        out: dict[str, ObjectInfo | None] = {}
        with txn.cursor(db=self.db) as cur:
            for k, v in cur:
                try:
                    out[bytes(k).decode()] = ObjectInfo.from_record(bytes(v))
                except IntegrityError:
                    out[bytes(k).decode()] = None
        return out

    def drop(self, txn: lmdb.Transaction, name: str, info: ObjectInfo | None) -> None:
        """Remove a record recovery found bad (the byte total is recomputed after)."""
        txn.delete(name.encode(), db=self.db)
        if info is not None:
            txn.delete(self.lru_key(name, info.last_access), db=self.lru)

    def drop_stray_lru(self, txn: lmdb.Transaction, names: Iterable[str]) -> None:
        """Remove LRU entries of objects not in ``names``."""
        keep = set(names)
        with txn.cursor(db=self.lru) as cur:
            stray = [
                bytes(k)
                for k in cur.iternext(keys=True, values=False)
                if bytes(k[_U64.size :]).decode() not in keep
            ]
        for k in stray:
            txn.delete(k, db=self.lru)

    def infos(self, txn: lmdb.Transaction) -> Iterator[ObjectInfo]:
        """Every record that decodes."""
        with txn.cursor(db=self.db) as cur:
            for _, v in cur:
                try:
                    yield ObjectInfo.from_record(bytes(v))
                except IntegrityError:
                    continue

    # -- access times and the LRU order ----------------------------------------------------
    def flush_touched(self, txn: lmdb.Transaction) -> None:
        """Write pending access times into records and the LRU order."""
        for name, t in self.touched.items():
            raw = txn.get(name.encode(), db=self.db)
            if raw is None:
                continue
            info = ObjectInfo.from_record(bytes(raw))
            if t <= info.last_access:
                continue
            txn.delete(self.lru_key(name, info.last_access), db=self.lru)
            info.last_access = t
            txn.put(name.encode(), info.to_record(), db=self.db)
            txn.put(self.lru_key(name, t), b"", db=self.lru)
        self.touched.clear()
        self.last_flush = time.monotonic()

    def lru_order(self, txn: lmdb.Transaction) -> Iterator[str]:
        """Object names, least recently used first."""
        with txn.cursor(db=self.lru) as cur:
            for key in cur.iternext(keys=True, values=False):
                yield bytes(key[_U64.size :]).decode()

    def lru_victims(
        self, txn: lmdb.Transaction, free: int, spare: Callable[[str], bool]
    ) -> list[tuple[str, ObjectInfo]] | None:
        """Least recently used objects freeing at least ``free`` bytes, or None; never one
        that ``spare(name)`` protects (open, or being stored) nor one a collection keeps."""
        victims: list[tuple[str, ObjectInfo]] = []
        freed = 0
        if free <= 0:
            return victims
        for name in self.lru_order(txn):
            if spare(name):
                continue
            info = self.get(txn, name)
            if info is None or self.kept(txn, info):
                continue
            victims.append((name, info))
            freed += info.stored_bytes
            if freed >= free:
                return victims
        return None

    # -- collections kept out of eviction ---------------------------------------------------
    def kept(self, txn: lmdb.Transaction, info: ObjectInfo) -> bool:
        """Whether a pinned collection keeps this object."""
        return txn.get(info.ref.sop_uid.encode(), db=self.keeps) is not None

    def keep(self, txn: lmdb.Transaction, sop_uids: Iterable[str], tag: str) -> int:
        """Keep ``sop_uids`` for ``tag``; how many were new to it."""
        n = 0
        for uid in sop_uids:
            k = uid.encode()
            raw = txn.get(k, db=self.keeps)
            tags = set(bytes(raw).decode().split("\n")) if raw else set()
            if tag not in tags:
                tags.add(tag)
                txn.put(k, "\n".join(sorted(tags)).encode(), db=self.keeps)
                n += 1
        return n

    def release(self, txn: lmdb.Transaction, tag: str) -> int:
        """Stop keeping what ``tag`` kept; how many."""
        n = 0
        with txn.cursor(db=self.keeps) as cur:
            rows = [(bytes(k), bytes(v).decode()) for k, v in cur]
        for k, v in rows:
            tags = set(v.split("\n"))
            if tag in tags:
                tags.discard(tag)
                n += 1
                if tags:
                    txn.put(k, "\n".join(sorted(tags)).encode(), db=self.keeps)
                else:
                    txn.delete(k, db=self.keeps)
        return n
