"""The encrypted object store (mdm.store.objects) on real files and a real LMDB environment."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from mdm.access.identity import LOCAL_ADMIN
from mdm.errors import IntegrityError, KeyUnavailable, NotFound, StoreFull
from mdm.store.crypto import HEADER_LEN, TAG_LEN, BlobHeader, encrypt_object, new_key
from mdm.store.db import open_env
from mdm.store.index import OBJECTS_DB
from mdm.store.keys import LocalKeyring, Scope
from mdm.store.objects import ObjectStore
from mdm.store.records import ObjectInfo, ObjectRef

CS = 64
SCOPE = Scope("CHLA", "identified")
META = {"sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "study_uid": "1.2.3", "site": "CHLA"}


def blob_size(n: int) -> int:
    return BlobHeader.for_plaintext(n, CS).blob_size


class Env:
    """A cache dir with its LMDB env, keyring and store; reopenable like a restart."""

    def __init__(self, tmp: Path, max_bytes: int = 10**9, root: Path | None = None) -> None:
        self.dir = tmp / "cache"
        self.root = root or self.dir
        self.keyring_path = tmp / "keyring.json"
        self.max_bytes = max_bytes
        self.env: lmdb.Environment | None = None
        self.store = self.open()

    def open(self) -> ObjectStore:
        self.env = open_env(self.dir)
        self.keys = LocalKeyring.load(self.keyring_path)
        self.store = ObjectStore(self.root, self.env, self.keys, self.max_bytes, chunk_size=CS)
        return self.store

    def close(self) -> None:
        if self.env is not None:
            self.store.close()
            self.env.close()
            self.env = None

    def reopen(self) -> ObjectStore:
        self.close()
        return self.open()


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.close()


def data_for(uid: str, n: int) -> bytes:
    seed = hashlib.sha256(uid.encode()).digest()
    return (seed * (n // 32 + 1))[:n]


def read_all(store: ObjectStore, ref: ObjectRef) -> bytes:
    with store.open(ref, LOCAL_ADMIN) as r:
        return r.read(0, r.size + 1)


# -- round trips ----------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, CS - 1, CS, CS + 1, int(3.5 * CS)])
def test_round_trip_and_ranges(cache: Env, size: int) -> None:
    ref = ObjectRef(f"1.2.3.{size}")
    data = os.urandom(size)
    info = cache.store.put(ref, SCOPE, data, META)
    assert (info.size, info.stored_bytes, info.meta) == (size, blob_size(size), META)
    name = ref.blob_name()
    path = cache.root / "objects" / name[:2] / name
    assert path.stat().st_size == info.stored_bytes
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    rng = random.Random(size)
    with cache.store.open(ref, LOCAL_ADMIN) as r:
        assert r.size == size
        assert r.read(0, size) == data
        for _ in range(100):
            off, n = rng.randrange(0, size + 5), rng.randrange(0, 3 * CS)
            assert r.read(off, n) == data[off : off + n]
        assert r.read(size + 1000, 10) == b""
    # survives a restart
    store = cache.reopen()
    assert read_all(store, ref) == data
    got = store.info(ref)
    assert got is not None and got.scope == SCOPE and got.meta == META


def test_blob_name_is_deterministic_and_uniform() -> None:
    a, b = ObjectRef("1.2.3"), ObjectRef("1.2.3", "deidentified")
    assert a.blob_name() == ObjectRef("1.2.3").blob_name() != b.blob_name()
    assert len(a.blob_name()) == 64 and "1.2.3" not in a.blob_name()
    with pytest.raises(ValueError):
        ObjectRef("1.2.3", "raw")


def test_put_is_idempotent(cache: Env) -> None:
    ref = ObjectRef("1.2.3.9")
    first = cache.store.put(ref, SCOPE, b"a" * 100)
    second = cache.store.put(ref, SCOPE, b"a" * 100)
    assert second.sealed_key == first.sealed_key
    st = cache.store.stats()
    assert (st.objects, st.bytes) == (1, blob_size(100))


def test_not_found(cache: Env) -> None:
    with pytest.raises(NotFound):
        cache.store.open(ObjectRef("9.9.9"), LOCAL_ADMIN)
    assert cache.store.info(ObjectRef("9.9.9")) is None


def test_concurrent_puts_and_reads(cache: Env) -> None:
    errors: list[BaseException] = []
    refs = [ObjectRef(f"1.2.7.{i}") for i in range(12)]

    def work(k: int) -> None:
        try:
            for i, ref in enumerate(refs):
                # every thread stores every object: one must win, the others reuse it
                cache.store.put(ref, SCOPE, data_for(ref.sop_uid, 50 * i))
                assert read_all(cache.store, ref) == data_for(ref.sop_uid, 50 * i)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    st = cache.store.stats()
    assert st.objects == 12 and st.pinned == 0
    files = [p for p in (cache.root / "objects").rglob("*") if p.is_file()]
    assert len(files) == 12 and st.bytes == sum(p.stat().st_size for p in files)
    assert not list((cache.root / "tmp").iterdir())


# -- tampering ------------------------------------------------------------------------------
def _blob(cache: Env, ref: ObjectRef) -> Path:
    n = ref.blob_name()
    return cache.root / "objects" / n[:2] / n


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1
    path.write_bytes(bytes(raw))


def test_flipped_byte_detected_in_read_and_verify(cache: Env) -> None:
    ref = ObjectRef("1.2.4.1")
    data = os.urandom(3 * CS)
    cache.store.put(ref, SCOPE, data)
    _flip(_blob(cache, ref), HEADER_LEN + (CS + TAG_LEN) + 5)  # inside chunk 1
    with cache.store.open(ref, LOCAL_ADMIN) as r:
        assert r.read(0, CS) == data[:CS]  # chunk 0 is intact and readable
        with pytest.raises(IntegrityError, match="chunk 1 of 3"):
            r.read(CS, 10)
    # The read that met the damage dropped the object: the next open retrieves it again.
    assert cache.store.info(ref) is None and not _blob(cache, ref).exists()
    assert cache.store.verify(LOCAL_ADMIN) == []

    other = ObjectRef("1.2.4.11")
    cache.store.put(other, SCOPE, data)
    _flip(_blob(cache, other), HEADER_LEN + 2 * (CS + TAG_LEN) + 1)  # inside chunk 2
    problems = cache.store.verify(LOCAL_ADMIN)
    assert [p.ref for p in problems] == [other] and "chunk 2" in problems[0].reason
    assert cache.store.info(other) is None  # verify drops what it finds damaged, too


@pytest.mark.parametrize("transient", [False, True])
def test_a_torn_blob_is_never_served_and_is_fetched_again(cache: Env, transient: bool) -> None:
    """A power cut without fsync may leave a blob of the right size whose last bytes never
    reached the disk (zeros, on a filesystem that does not order data before metadata):
    no byte of a damaged chunk is served, and the object is dropped so it is stored again."""
    ref = ObjectRef("1.2.4.12")
    data = os.urandom(4 * CS)
    cache.store.put(ref, SCOPE, data)
    path = _blob(cache, ref)
    raw = bytearray(path.read_bytes())
    start = HEADER_LEN + 2 * (CS + TAG_LEN)
    raw[start:] = bytes(len(raw) - start)  # chunks 2 and 3 lost
    path.write_bytes(bytes(raw))
    with cache.store.open(ref, LOCAL_ADMIN) as r:
        read = r.read_transient if transient else r.read_view
        with pytest.raises(IntegrityError, match="chunk 2 of 4"):
            bytes(read(0, 4 * CS))
        assert cache.store.info(ref) is None
        with pytest.raises(IntegrityError):  # still refused on the handle already open
            bytes(read(3 * CS, CS))
    assert cache.store.stats().pinned == 0
    with pytest.raises(NotFound):
        cache.store.open(ref, LOCAL_ADMIN)
    cache.store.put(ref, SCOPE, data)  # the re-fetch
    assert read_all(cache.store, ref) == data


def test_a_damaged_copy_replaced_meanwhile_is_kept(cache: Env) -> None:
    """Only the record a reader opened is dropped: a copy stored again since stays."""
    ref = ObjectRef("1.2.4.13")
    data = os.urandom(2 * CS)
    old = cache.store.put(ref, SCOPE, data)
    assert cache.store.evict([ref]) == 1
    new = cache.store.put(ref, SCOPE, data)
    assert new.sealed_key != old.sealed_key
    err = cache.store.corrupt(old, "chunk 1 of 2 failed authentication")
    assert isinstance(err, IntegrityError) and ref.sop_uid in str(err)
    assert cache.store.info(ref) == new
    assert read_all(cache.store, ref) == data


@pytest.mark.parametrize("fsync", [False, True])
def test_blobs_are_fsynced_only_when_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: bool
) -> None:
    env = open_env(tmp_path / "cache")
    store = ObjectStore(
        tmp_path / "cache",
        env,
        LocalKeyring.load(tmp_path / "k.json", create=True),
        10**9,
        chunk_size=CS,
        fsync=fsync,
    )
    synced: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        # A blob being written (not the keyring, on a scope's first use, nor a directory).
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path / "cache" / "tmp")):
            synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    try:
        for i in range(3):
            store.put(ObjectRef(f"1.2.4.2{i}"), SCOPE, os.urandom(CS + 1))
    finally:
        store.close()
        env.close()
    assert len(synced) == (3 if fsync else 0)


def test_truncated_blob_detected(cache: Env) -> None:
    ref = ObjectRef("1.2.4.2")
    cache.store.put(ref, SCOPE, os.urandom(3 * CS))
    path = _blob(cache, ref)
    path.write_bytes(path.read_bytes()[: -(CS + TAG_LEN)])
    assert [p.ref for p in cache.store.verify(LOCAL_ADMIN)] == [ref]
    cache.store.put(ref, SCOPE, os.urandom(3 * CS))
    path.write_bytes(path.read_bytes()[: -(CS + TAG_LEN)])
    with pytest.raises(IntegrityError, match="wrong size"):
        cache.store.open(ref, LOCAL_ADMIN)
    assert cache.store.stats().pinned == 0
    assert cache.store.info(ref) is None  # dropped: the next open retrieves it again


def test_swapped_chunks_detected(cache: Env) -> None:
    ref = ObjectRef("1.2.4.3")
    cache.store.put(ref, SCOPE, os.urandom(3 * CS))
    path = _blob(cache, ref)
    raw = path.read_bytes()
    c = CS + TAG_LEN
    c0, c1 = raw[HEADER_LEN : HEADER_LEN + c], raw[HEADER_LEN + c : HEADER_LEN + 2 * c]
    path.write_bytes(raw[:HEADER_LEN] + c1 + c0 + raw[HEADER_LEN + 2 * c :])
    with cache.store.open(ref, LOCAL_ADMIN) as r, pytest.raises(IntegrityError):
        r.read(0, 3 * CS)


def test_blob_moved_to_another_objects_name(cache: Env) -> None:
    a, b = ObjectRef("1.2.4.4"), ObjectRef("1.2.4.5")
    cache.store.put(a, SCOPE, os.urandom(100))
    cache.store.put(b, SCOPE, os.urandom(100))
    _blob(cache, b).write_bytes(_blob(cache, a).read_bytes())
    with cache.store.open(b, LOCAL_ADMIN) as r, pytest.raises(IntegrityError):
        r.read(0, 100)


def test_sealed_key_replayed_for_another_ref(cache: Env) -> None:
    a, b = ObjectRef("1.2.4.6"), ObjectRef("1.2.4.7")
    ia = cache.store.put(a, SCOPE, os.urandom(100))
    ib = cache.store.put(b, SCOPE, os.urandom(100))
    ib.sealed_key = ia.sealed_key
    assert cache.env is not None
    db = cache.env.open_db(OBJECTS_DB)
    with cache.env.begin(write=True) as txn:
        txn.put(b.blob_name().encode(), ib.to_record(), db=db)
    with pytest.raises(KeyUnavailable):
        cache.store.open(b, LOCAL_ADMIN)
    # and a record moved to another scope does not open either
    ia.scope = Scope("CHLA", "deidentified")
    with cache.env.begin(write=True) as txn:
        txn.put(a.blob_name().encode(), ia.to_record(), db=db)
    cache.keys.seal(b"x", ia.scope, new_key())  # that scope has a key
    with pytest.raises(KeyUnavailable):
        cache.store.open(a, LOCAL_ADMIN)
    assert {p.ref for p in cache.store.verify(LOCAL_ADMIN)} == {a, b}


# -- hard cap, LRU and pins -----------------------------------------------------------------
def test_cap_evicts_least_recently_used(tmp_path: Path) -> None:
    e = Env(tmp_path, max_bytes=3 * blob_size(200))
    try:
        s = e.store
        a, b, c, d = (ObjectRef(f"1.2.5.{i}") for i in range(4))
        for ref in (a, b, c):
            s.put(ref, SCOPE, data_for(ref.sop_uid, 200))
            time.sleep(0.002)
        read_all(s, a)  # a is now more recent than b and c
        s.put(d, SCOPE, data_for(d.sop_uid, 200))
        assert s.info(b) is None and not _blob(e, b).exists()
        assert {r.sop_uid for r in s.list_refs()} == {a.sop_uid, c.sop_uid, d.sop_uid}
        assert s.stats().bytes == 3 * blob_size(200) <= s.max_bytes
        # access times persist across a restart and still drive the order
        s = e.reopen()
        s.put(b, SCOPE, data_for(b.sop_uid, 200))
        assert s.info(c) is None and s.info(a) is not None
    finally:
        e.close()


def test_access_times_reach_the_index_when_flushed(cache: Env) -> None:
    """Opens only mark objects in memory; flush_access_times() (the mount's periodic task)
    writes them, and another store on the same index then sees the new LRU order."""
    s = cache.store
    refs = [ObjectRef(f"1.2.6.{i}") for i in range(3)]
    for ref in refs:
        s.put(ref, SCOPE, data_for(ref.sop_uid, 100))
        time.sleep(0.002)
    before = {r.sop_uid: s.info(r).last_access for r in refs}  # type: ignore[union-attr]
    read_all(s, refs[0])
    assert cache.env is not None  # a second store on the same index: another reader
    other = ObjectStore(cache.root, cache.env, cache.keys, cache.max_bytes, CS)
    try:
        # Not yet in the index: the other store still sees the put time.
        assert other.info(refs[0]).last_access == before[refs[0].sop_uid]  # type: ignore[union-attr]
        assert s.flush_access_times() == 1
        assert s.flush_access_times() == 0
        after = other.info(refs[0]).last_access  # type: ignore[union-attr]
        assert after > max(before.values())
    finally:
        other.close()


def test_pinned_object_is_never_evicted(tmp_path: Path) -> None:
    e = Env(tmp_path, max_bytes=2 * blob_size(200))
    try:
        s = e.store
        refs = [ObjectRef(f"1.2.6.{i}") for i in range(6)]
        s.put(refs[0], SCOPE, data_for(refs[0].sop_uid, 200))
        reader = s.open(refs[0], LOCAL_ADMIN)
        for ref in refs[1:4]:
            s.put(ref, SCOPE, data_for(ref.sop_uid, 200))
            assert s.info(refs[0]) is not None
        assert s.evict([refs[0]]) == 0
        assert s.evict() == 1  # only the unpinned one
        assert reader.read(0, 200) == data_for(refs[0].sop_uid, 200)
        second = s.open(s.put(refs[4], SCOPE, data_for(refs[4].sop_uid, 200)).ref, LOCAL_ADMIN)
        assert s.stats().pinned == 2
        with pytest.raises(StoreFull, match="in use"):
            s.put(refs[5], SCOPE, data_for(refs[5].sop_uid, 200))
        assert s.info(refs[5]) is None
        assert not list((e.root / "tmp").iterdir())
        reader.close()
        reader.close()  # idempotent
        s.put(refs[5], SCOPE, data_for(refs[5].sop_uid, 200))
        assert s.info(refs[0]) is None and s.info(refs[4]) is not None
        second.close()
        assert s.stats().pinned == 0
    finally:
        e.close()


def test_object_larger_than_cache(tmp_path: Path) -> None:
    e = Env(tmp_path, max_bytes=1000)
    try:
        with pytest.raises(StoreFull, match="larger than the cache"):
            e.store.put(ObjectRef("1.2.8"), SCOPE, bytes(1000))
        assert e.store.stats().objects == 0
    finally:
        e.close()


def test_evict_by_ref_and_target(cache: Env) -> None:
    s = cache.store
    refs = [ObjectRef(f"1.2.9.{i}") for i in range(5)]
    for ref in refs:
        s.put(ref, SCOPE, bytes(100))
        time.sleep(0.002)
    assert s.evict([refs[4], ObjectRef("7.7.7")]) == 1
    assert s.evict(target_bytes=2 * blob_size(100)) == 2
    assert {r.sop_uid for r in s.list_refs()} == {refs[2].sop_uid, refs[3].sop_uid}
    assert s.evict() == 2
    assert s.stats().objects == 0 and s.stats().bytes == 0
    assert not [p for p in (cache.root / "objects").rglob("*") if p.is_file()]


# -- crash recovery -------------------------------------------------------------------------
def test_recover_cleans_tmp_orphans_and_bad_records(cache: Env) -> None:
    s = cache.store
    keep, gone, short = ObjectRef("1.3.1"), ObjectRef("1.3.2"), ObjectRef("1.3.3")
    for ref in (keep, gone, short):
        s.put(ref, SCOPE, data_for(ref.sop_uid, 300))
    _blob(cache, gone).unlink()
    p = _blob(cache, short)
    p.write_bytes(p.read_bytes()[:-1])
    (cache.root / "tmp" / "deadbeef.1234.tmp").write_bytes(b"partial")
    # a crash between rename and commit: the blob is in place, its record never committed
    crashed = ObjectRef("1.3.4")
    n = crashed.blob_name()
    (cache.root / "objects" / n[:2]).mkdir(exist_ok=True)
    (cache.root / "objects" / n[:2] / n).write_bytes(
        encrypt_object(new_key(), crashed.identity(), b"x" * 50, CS)
    )
    s = cache.reopen()
    report = s.recover()
    assert report.exclusive
    assert (report.tmp_removed, report.orphans_removed, report.records_dropped) == (1, 1, 2)
    assert (report.objects, report.bytes) == (1, blob_size(300))
    assert s.list_refs() == [keep]
    assert s.stats().bytes == blob_size(300)
    assert read_all(s, keep) == data_for(keep.sop_uid, 300)
    files = [p for p in (cache.root / "objects").rglob("*") if p.is_file()]
    assert files == [_blob(cache, keep)]
    assert not list((cache.root / "tmp").iterdir())
    # the crashed object can be stored again
    s.put(crashed, SCOPE, b"y" * 50)
    assert read_all(s, crashed) == b"y" * 50


def test_recover_leaves_another_process_alone(cache: Env, tmp_path: Path) -> None:
    other = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(cache.root / "store.lock")],
        stdout=subprocess.PIPE,
    )
    try:
        assert other.stdout is not None and other.stdout.readline() == b"locked\n"
        (cache.root / "tmp" / "inflight.tmp").write_bytes(b"partial")
        report = cache.store.recover()
        assert not report.exclusive and report.tmp_removed == 0
        assert (cache.root / "tmp" / "inflight.tmp").exists()
    finally:
        other.kill()
        other.wait()


_HOLD_LOCK = textwrap.dedent(
    """
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH)
    print("locked", flush=True)
    time.sleep(60)
    """
)

_WRITER = textwrap.dedent(
    """
    import hashlib, sys
    from pathlib import Path
    from mdm.store.db import open_env
    from mdm.store.keys import LocalKeyring, Scope
    from mdm.store.objects import ObjectStore
    from mdm.store.records import ObjectRef
    cache, keyring = Path(sys.argv[1]), Path(sys.argv[2])
    store = ObjectStore(cache, open_env(cache), LocalKeyring.load(keyring), 10**9, chunk_size=64)
    for i in range(100000):
        uid = f"1.4.{i}"
        seed = hashlib.sha256(uid.encode()).digest()
        n = (i * 37) % 3000
        store.put(ObjectRef(uid), Scope("CHLA", "identified"), (seed * (n // 32 + 1))[:n])
        if i == 20:
            print("running", flush=True)
    """
)


def test_kill_9_during_puts_loses_nothing_committed(cache: Env) -> None:
    cache.close()
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(cache.dir), str(cache.keyring_path)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"running\n"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    s = cache.open()
    report = s.recover()
    refs = s.list_refs()
    assert len(refs) > 20 and report.records_dropped == 0
    assert s.verify(LOCAL_ADMIN) == []
    for ref in refs:
        i = int(ref.sop_uid.rsplit(".", 1)[1])
        assert read_all(s, ref) == data_for(ref.sop_uid, (i * 37) % 3000)
    files = [p for p in (cache.root / "objects").rglob("*") if p.is_file()]
    assert len(files) == len(refs)
    assert s.stats().bytes == sum(p.stat().st_size for p in files)


# -- disk full ------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_is_store_full_and_loses_nothing(tmp_path: Path, small_disk: Path) -> None:
    e = Env(tmp_path, max_bytes=10**8, root=small_disk / "store")
    try:
        stored = []
        with pytest.raises(StoreFull, match="no space left"):
            for i in range(100):
                ref = ObjectRef(f"1.5.{i}")
                e.store.put(ref, SCOPE, data_for(ref.sop_uid, 30_000))
                stored.append(ref)
        assert stored
        assert not list((e.root / "tmp").iterdir())
        assert e.store.list_refs() == stored or set(e.store.list_refs()) == set(stored)
        for ref in stored:
            assert read_all(e.store, ref) == data_for(ref.sop_uid, 30_000)
        assert e.store.verify(LOCAL_ADMIN) == []
    finally:
        e.close()


# -- nothing in clear at rest ---------------------------------------------------------------
def test_no_plaintext_anywhere_under_root(cache: Env) -> None:
    marker = b"DOE^JANE^PATIENT-ID-4711^"
    data = marker * 50
    refs = [ObjectRef("1.6.1"), ObjectRef("1.6.1", "deidentified"), ObjectRef("1.6.2")]
    for ref in refs:
        cache.store.put(ref, Scope("CHLA", ref.view), data, META)
        assert read_all(cache.store, ref) == data
    cache.close()  # flush everything LMDB holds
    scanned = 0
    for path in cache.dir.rglob("*"):
        if path.is_file():
            raw = path.read_bytes()
            scanned += 1
            assert marker not in raw, path
            assert marker[:12] not in raw, path
    assert scanned >= 5  # blobs, data.mdb, lock.mdb, store.lock
    assert b"1.6.2" in (cache.dir / "index.lmdb" / "data.mdb").read_bytes()  # the scan is real


def test_records_hold_no_key_material(cache: Env) -> None:
    ref = ObjectRef("1.6.3")
    info = cache.store.put(ref, SCOPE, b"z" * 10)
    assert cache.env is not None
    with cache.env.begin() as txn:
        raw = txn.get(ref.blob_name().encode(), db=cache.env.open_db(OBJECTS_DB))
    assert raw is not None
    assert ObjectInfo.from_record(bytes(raw)).sealed_key == info.sealed_key
    dek = cache.keys.open(LOCAL_ADMIN, ref.identity(), SCOPE, info.sealed_key)
    assert dek not in bytes(raw) and dek not in (cache.dir / "index.lmdb" / "data.mdb").read_bytes()


def test_index_directory_is_searchable_by_its_owner_only(tmp_path: Path) -> None:
    """LMDB creates its directory with the file mode (0600): only root could open the index
    then, and the bridge runs as an unprivileged service user (packaging/)."""
    cache = tmp_path / "cache"
    open_env(cache).close()
    assert (cache / "index.lmdb").stat().st_mode & 0o777 == 0o700
    os.chmod(cache / "index.lmdb", 0o600)  # a cache made before the fix is repaired
    open_env(cache).close()
    assert (cache / "index.lmdb").stat().st_mode & 0o777 == 0o700
    assert cache.stat().st_mode & 0o777 == 0o700


def test_kept_objects_survive_eviction_in_every_process(tmp_path: Path) -> None:
    """Objects a pinned collection keeps (by SOP UID, in the index) are passed over by LRU
    eviction and evict-all, also by another store on the same index, until released."""
    e = Env(tmp_path, max_bytes=3 * blob_size(200))
    try:
        s = e.store
        refs = [ObjectRef(f"1.2.8.{i}") for i in range(6)]
        assert s.keep([refs[0].sop_uid, refs[1].sop_uid], "cohort") == 2
        assert s.keep([refs[0].sop_uid], "cohort") == 0
        for ref in refs:
            s.put(ref, SCOPE, data_for(ref.sop_uid, 200))
            time.sleep(0.002)
        assert s.info(refs[0]) is not None and s.info(refs[1]) is not None
        assert s.kept_stats() == (2, 2 * blob_size(200))
        s = e.reopen()  # another process: the keep is in the index
        assert s.evict() == 1
        assert {r.sop_uid for r in s.list_refs()} == {refs[0].sop_uid, refs[1].sop_uid}
        assert s.release("cohort") == 2
        assert s.kept_stats() == (0, 0)
        assert s.evict() == 2
    finally:
        e.close()
