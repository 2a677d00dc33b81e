"""Chunked AEAD and key wrapping (mdm.store.crypto): round trips, ranges, and every tampering."""

from __future__ import annotations

import io
import os
import random

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mdm.errors import IntegrityError
from mdm.store import crypto
from mdm.store.crypto import (
    HEADER_LEN,
    TAG_LEN,
    BlobHeader,
    decrypt_object,
    decrypt_range,
    encrypt_object,
    new_key,
    read_header,
    unwrap_key,
    wrap_key,
)

CS = 64
ID_A = b"mdm-object-v1\0identified\0" + b"1.2.3.4"
ID_B = b"mdm-object-v1\0identified\0" + b"1.2.3.5"
SIZES = [0, 1, CS - 1, CS, CS + 1, int(3.5 * CS)]


def _chunks(blob: bytes) -> tuple[BlobHeader, list[bytes]]:
    h = read_header(blob)
    out = []
    for i in range(h.n_chunks):
        off = h.chunk_offset(i)
        out.append(blob[off : off + h.chunk_plain_len(i) + TAG_LEN])
    return h, out


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_and_layout(size: int) -> None:
    dek = new_key()
    data = os.urandom(size)
    blob = encrypt_object(dek, ID_A, data, CS)
    h = read_header(blob)
    assert blob.startswith(b"MDMOBJ1\0")
    assert (h.size, h.chunk_size) == (size, CS)
    assert h.n_chunks == max(1, -(-size // CS))
    assert len(blob) == h.blob_size == HEADER_LEN + size + TAG_LEN * h.n_chunks
    assert decrypt_object(dek, ID_A, blob) == data
    # A random run of 16+ bytes cannot appear in the ciphertext by chance.
    assert size < 16 or data not in blob


@pytest.mark.parametrize("size", SIZES)
def test_random_ranges_from_fd_file_and_bytes(size: int, tmp_path: object) -> None:
    dek = new_key()
    data = os.urandom(size)
    blob = encrypt_object(dek, ID_A, data, CS)
    path = os.path.join(str(tmp_path), "blob")
    with open(path, "wb") as f:
        f.write(blob)
    rng = random.Random(size)
    with open(path, "rb") as f:
        h = read_header(f.fileno())
        for _ in range(200):
            off = rng.randrange(0, size + 10)
            n = rng.randrange(0, 3 * CS)
            want = data[off : off + n]
            assert decrypt_range(dek, ID_A, f.fileno(), h, off, n) == want
            assert decrypt_range(dek, ID_A, f, h, off, n) == want
            assert decrypt_range(dek, ID_A, blob, h, off, n) == want
    assert decrypt_range(dek, ID_A, io.BytesIO(blob).getvalue(), h, size + 100, 5) == b""


def test_blob_format_matches_the_documented_layout() -> None:
    # Decrypt with AESGCM directly from the spec in docs/STORE.md, so the format is pinned:
    # nonce = u96 chunk index, AAD = header || identity || u64 index || u8 last-chunk flag.
    dek = new_key()
    data = os.urandom(int(2.5 * CS))
    blob = encrypt_object(dek, ID_A, data, CS)
    header = blob[:HEADER_LEN]
    assert header == b"MDMOBJ1\0" + bytes([1, 1, 0, 0]) + CS.to_bytes(4, "big") + len(
        data
    ).to_bytes(8, "big")
    h, chunks = _chunks(blob)
    plain = b""
    for i, chunk in enumerate(chunks):
        aad = header + ID_A + i.to_bytes(8, "big") + bytes([i == h.n_chunks - 1])
        plain += AESGCM(dek).decrypt(i.to_bytes(12, "big"), chunk, aad)
    assert plain == data


def test_range_reads_only_the_covering_chunks() -> None:
    dek = new_key()
    data = os.urandom(4 * CS)
    blob = bytearray(encrypt_object(dek, ID_A, data, CS))
    h = read_header(bytes(blob))
    blob[h.chunk_offset(0) + 3] ^= 1  # damage chunk 0 only
    assert decrypt_range(dek, ID_A, bytes(blob), h, 2 * CS + 5, 10) == data[2 * CS + 5 :][:10]
    with pytest.raises(IntegrityError, match="chunk 0 of 4"):
        decrypt_range(dek, ID_A, bytes(blob), h, 0, 1)


def test_flipping_any_byte_is_detected() -> None:
    dek = new_key()
    blob = encrypt_object(dek, ID_A, os.urandom(int(2.5 * 32)), 32)
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x40
        with pytest.raises(IntegrityError):
            decrypt_object(dek, ID_A, bytes(bad))


def test_truncation_is_detected() -> None:
    dek = new_key()
    blob = encrypt_object(dek, ID_A, os.urandom(3 * CS), CS)
    _, chunks = _chunks(blob)
    for cut in (1, TAG_LEN, len(chunks[-1]), len(chunks[-1]) + 1, len(blob) - HEADER_LEN):
        with pytest.raises(IntegrityError):
            decrypt_object(dek, ID_A, blob[:-cut])
    with pytest.raises(IntegrityError):
        decrypt_object(dek, ID_A, blob[: HEADER_LEN - 1])
    with pytest.raises(IntegrityError, match="trailing"):
        decrypt_object(dek, ID_A, blob + b"\0")


def test_dropped_final_chunk_with_forged_header_is_detected() -> None:
    # A truncating attacker also rewrites the size so that the blob looks complete: the header
    # is authenticated with every chunk, and the new last chunk lacks the last-chunk flag.
    dek = new_key()
    data = os.urandom(3 * CS)
    blob = encrypt_object(dek, ID_A, data, CS)
    _, chunks = _chunks(blob)
    forged = BlobHeader.for_plaintext(2 * CS, CS).raw + chunks[0] + chunks[1]
    with pytest.raises(IntegrityError):
        decrypt_object(dek, ID_A, forged)


def test_swapped_chunks_are_detected() -> None:
    dek = new_key()
    blob = encrypt_object(dek, ID_A, os.urandom(3 * CS), CS)
    h, chunks = _chunks(blob)
    swapped = h.raw + chunks[1] + chunks[0] + chunks[2]
    with pytest.raises(IntegrityError, match="chunk 0 of 3"):
        decrypt_object(dek, ID_A, swapped)


def test_blob_of_another_object_is_rejected() -> None:
    dek = new_key()
    blob = encrypt_object(dek, ID_A, b"x" * 100, CS)
    with pytest.raises(IntegrityError):
        decrypt_object(dek, ID_B, blob)
    with pytest.raises(IntegrityError):
        decrypt_object(new_key(), ID_A, blob)


def test_empty_object_is_authenticated() -> None:
    dek = new_key()
    blob = encrypt_object(dek, ID_A, b"", CS)
    h = read_header(blob)
    assert decrypt_range(dek, ID_A, blob, h, 0, 10) == b""
    with pytest.raises(IntegrityError):
        decrypt_range(dek, ID_B, blob, h, 0, 10)


def test_bad_header_and_arguments() -> None:
    with pytest.raises(IntegrityError, match="magic"):
        read_header(b"NOTMDM!!" + bytes(16))
    with pytest.raises(ValueError):
        encrypt_object(new_key(), ID_A, b"x", chunk_size=8)
    with pytest.raises(ValueError):
        encrypt_object(b"short", ID_A, b"x", CS)


def test_wrap_unwrap() -> None:
    kek, key = new_key(), new_key()
    w = wrap_key(kek, key, b"aad-1")
    assert len(w) == crypto.NONCE_LEN + len(key) + TAG_LEN
    assert wrap_key(kek, key, b"aad-1") != w  # random nonce
    assert unwrap_key(kek, w, b"aad-1") == key
    for args in ((kek, w, b"aad-2"), (new_key(), w, b"aad-1"), (kek, w[:-1], b"aad-1")):
        with pytest.raises(IntegrityError) as ei:
            unwrap_key(*args)
        assert kek.hex() not in str(ei.value) and key.hex() not in str(ei.value)
    bad = bytearray(w)
    bad[0] ^= 1
    with pytest.raises(IntegrityError):
        unwrap_key(kek, bytes(bad), b"aad-1")
