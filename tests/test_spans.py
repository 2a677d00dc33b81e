"""Transient span reads (ObjectReader.read_transient, mdm.store.spans) on a real store in tmp_path:
byte-exact ranges, fail-closed tampering, the buffer pool, and zeroed output on a bad tag."""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from mdm.access.identity import LOCAL_ADMIN
from mdm.errors import IntegrityError
from mdm.store import spans
from mdm.store.crypto import HEADER_LEN, TAG_LEN, BlobHeader, ChunkCipher, new_key
from mdm.store.db import open_env
from mdm.store.keys import LocalKeyring, Scope
from mdm.store.objects import ObjectStore
from mdm.store.records import ObjectRef

SCOPE = Scope("CHLA", "identified")
SMALL = 4096
BIG = 256 * 1024


class Cache:
    """A store with its own LMDB env and keyring under a tmp dir."""

    def __init__(self, tmp: Path, chunk_size: int) -> None:
        self.env: lmdb.Environment = open_env(tmp / "cache")
        self.keys = LocalKeyring.load(tmp / "keyring.json")
        self.store = ObjectStore(tmp / "cache", self.env, self.keys, 10**9, chunk_size=chunk_size)
        self.chunk_size = chunk_size

    def put(self, uid: str, data: bytes) -> ObjectRef:
        ref = ObjectRef(uid)
        self.store.put(ref, SCOPE, data)
        return ref

    def close(self) -> None:
        self.store.close()
        self.env.close()


@pytest.fixture(
    params=[(SMALL, 4 * SMALL), (SMALL, None), (BIG, None)],
    ids=["4k-chunks-5-per-span", "4k-chunks-real-span", "256k-chunks-real-span"],
)
def cache(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Cache]:
    """A store of ``chunk_size`` chunks; SPAN_BYTES shrunk (when given) so spans hold 5 chunks."""
    chunk_size, span_bytes = request.param
    if span_bytes is not None:
        monkeypatch.setattr(spans, "SPAN_BYTES", span_bytes)
    c = Cache(tmp_path, chunk_size)
    yield c
    c.close()


def _sizes(cs: int) -> list[int]:
    return [0, 1, cs - 1, cs, cs + 1, int(3.5 * cs), 10 * cs]


def test_read_transient_matches_plaintext(cache: Cache) -> None:
    """Random ranges, sequential reads and reads larger than a span give exactly the
    plaintext, and the same bytes as ``read``."""
    cs = cache.chunk_size
    span = spans.span_chunks(cs) * cs
    rng = random.Random(cs)
    for size in _sizes(cs):
        data = rng.randbytes(size)
        ref = cache.put(f"1.2.840.99.{size}", data)
        with cache.store.open(ref, LOCAL_ADMIN) as r:
            for _ in range(150):
                off = rng.randrange(0, size + 8)
                n = rng.choice([0, 1, rng.randrange(1, cs + 2), rng.randrange(1, 2 * span + 2)])
                got = bytes(r.read_transient(off, n))
                assert got == data[off : off + n], (size, off, n)
                assert got == r.read(off, n), (size, off, n)
            # whole object at once (larger than a span when the object is)
            assert bytes(r.read_transient(0, size + 1)) == data
            assert bytes(r.read_transient(size, 10)) == b""
            # sequential readers: the kernel's 128 KiB, odd steps straddling chunks, one chunk
            for step in (128 * 1024, 3 * cs + 7, cs, span + 1):
                out = bytearray()
                for off in range(0, size, step):
                    out += r.read_transient(off, step)
                assert out == data, (size, step)


def test_read_larger_than_span_falls_back(cache: Cache) -> None:
    """A read covering more chunks than a span holds is served whole, and a following
    transient read is still right."""
    cs = cache.chunk_size
    per_span = spans.span_chunks(cs)
    size = (per_span + 3) * cs + 5
    data = random.Random(7).randbytes(size)
    ref = cache.put("1.2.840.99.777", data)
    with cache.store.open(ref, LOCAL_ADMIN) as r:
        assert bytes(r.read_transient(cs // 2, size)) == data[cs // 2 :]
        assert bytes(r.read_transient(3, 10)) == data[3:13]
        assert bytes(r.read_transient(1, size - 2)) == data[1:-1]
        assert bytes(r.read_transient(size - 4, 100)) == data[-4:]


def _flip(cache: Cache, ref: ObjectRef, chunk: int) -> None:
    """Flip one ciphertext byte of ``chunk`` in the blob on disk."""
    path = cache.store.blob_path(ref.blob_name())
    pos = HEADER_LEN + chunk * (cache.chunk_size + TAG_LEN) + cache.chunk_size // 3
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x40]))


def test_damaged_chunk_is_never_served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flipped byte: IntegrityError naming the object and the chunk, again on every read
    of it; the buffer the failed span was decrypted into is never served for an older span."""
    monkeypatch.setattr(spans, "SPAN_BYTES", 4 * SMALL)  # spans of 5 chunks
    cache = Cache(tmp_path, SMALL)
    try:
        cs = SMALL
        uid = "1.2.840.99.4242"
        data = random.Random(1).randbytes(20 * cs)
        ref = cache.put(uid, data)
        bad = 13
        _flip(cache, ref, bad)
        with cache.store.open(ref, LOCAL_ADMIN) as r:
            # a good span first: chunks 0..4 now in the reader's buffers
            assert bytes(r.read_transient(100, 1000)) == data[100:1100]
            # a span 12..16: chunk 12 decrypts into the buffers, then 13 fails
            msg = rf"{re.escape(uid)}.*chunk {bad} of 20"
            with pytest.raises(IntegrityError, match=msg):
                r.read_transient(12 * cs, 2 * cs)
            # the old span is not served from the overwritten buffers
            assert bytes(r.read_transient(100, 1000)) == data[100:1100]
            for off, n in [(bad * cs, 10), (bad * cs + cs // 2, 100), (bad * cs - 5, 10)]:
                for _ in range(3):
                    with pytest.raises(IntegrityError, match=msg):
                        r.read_transient(off, n)
            # chunks after the damage are still readable (a span starting past it)
            assert bytes(r.read_transient(15 * cs, 3 * cs)) == data[15 * cs : 18 * cs]
            with pytest.raises(IntegrityError, match=msg):
                r.read_transient(bad * cs, 1)
            with pytest.raises(IntegrityError, match=msg):
                r.read(bad * cs, 1)
    finally:
        cache.close()


def test_buffers_return_to_pool_and_are_reused(tmp_path: Path) -> None:
    """Closing a reader gives its span buffers to the store's pool (once, however often it is
    closed); the next reader decrypts into that same object; a closed reader refuses reads."""
    cache = Cache(tmp_path, SMALL)
    try:
        pool = cache.store.buffers
        a = random.Random(2).randbytes(5 * SMALL)
        b = random.Random(3).randbytes(3 * SMALL)
        ref_a, ref_b = cache.put("1.2.840.99.1", a), cache.put("1.2.840.99.2", b)

        r1 = cache.store.open(ref_a, LOCAL_ADMIN)
        assert bytes(r1.read_transient(0, 100)) == a[:100]
        r1.close()
        r1.close()  # idempotent: the buffers must not enter the pool twice
        for read in (r1.read_transient, r1.read_view, r1.read):
            with pytest.raises(ValueError, match="closed"):
                read(0, 10)

        bufs = pool.take(SMALL)
        assert bytes(bufs.plain[: len(a)]) == a  # r1's buffers, with r1's plaintext
        other = pool.take(SMALL)
        assert other is not bufs  # given back once only
        pool.give(bufs)  # only bufs is free now

        with cache.store.open(ref_b, LOCAL_ADMIN) as r2:
            assert bytes(r2.read_transient(10, 50)) == b[10:60]
            assert bytes(bufs.plain[: len(b)]) == b  # r2 decrypted into the very same buffers
            assert pool.take(SMALL) is not bufs  # held by r2, not in the pool
        assert pool.take(SMALL) is bufs  # back after r2's close
    finally:
        cache.close()


def test_decrypt_chunk_into_zeroes_output_on_bad_tag() -> None:
    """A wrong tag (or ciphertext, or chunk index) raises IntegrityError and leaves the
    output buffer all zeros: no unauthenticated plaintext survives in a reused buffer."""
    cs = 64
    data = os.urandom(3 * cs)
    header = BlobHeader.for_plaintext(len(data), cs)
    cipher = ChunkCipher(new_key(), b"identity", header)
    sealed = [cipher.encrypt_chunk(i, data[i * cs : (i + 1) * cs]) for i in range(3)]

    out = bytearray(b"\xaa" * cs)
    cipher.decrypt_chunk_into(1, memoryview(sealed[1]), memoryview(out))
    assert out == data[cs : 2 * cs]

    bad_tag = bytearray(sealed[1])
    bad_tag[-1] ^= 1
    bad_ct = bytearray(sealed[1])
    bad_ct[0] ^= 1
    for index, blob in [(1, bad_tag), (1, bad_ct), (0, bytearray(sealed[1]))]:
        out = bytearray(b"\xaa" * cs)
        with pytest.raises(IntegrityError, match=rf"chunk {index} of 3 failed authentication"):
            cipher.decrypt_chunk_into(index, memoryview(blob), memoryview(out))
        assert out == bytes(cs)
