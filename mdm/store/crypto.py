"""Chunked AEAD for cached objects, and key wrapping.

Blob layout (all integers big-endian)::

    header  (24 bytes)  magic b"MDMOBJ1\\0" | version u8 | algorithm u8 | reserved u16 (0)
                        | chunk_size u32 | plaintext size u64
    chunk 0 .. n-1      AES-256-GCM ciphertext || 16-byte tag

Every chunk holds ``chunk_size`` plaintext bytes except the last, which holds the rest (an empty
object is a single empty last chunk), so the blob size follows from the header alone:
``HEADER_LEN + size + TAG_LEN * n_chunks``. The associated data of chunk ``i`` is
``header || identity || i (u64) || last-chunk flag (u8)``: a flipped bit, a dropped or
duplicated final chunk, two swapped chunks, a forged header and a blob moved under another
object's name all fail authentication. A reader can decrypt any byte range by reading only the
chunks that cover it.

Only primitives from ``cryptography`` are used; nothing here is hand-rolled.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mdm.errors import IntegrityError

MAGIC = b"MDMOBJ1\0"
VERSION = 1
ALG_AES_256_GCM = 1
KEY_LEN = 32
TAG_LEN = 16
NONCE_LEN = 12
MIN_CHUNK_SIZE = 16
MAX_CHUNK_SIZE = 64 * 2**20
DEFAULT_CHUNK_SIZE = 256 * 1024

_HEADER = struct.Struct(">8sBBHIQ")
HEADER_LEN = _HEADER.size

Source = int | BinaryIO | bytes | bytearray | memoryview
"""Where a blob is read from: an fd (read with ``os.pread``), a binary file, or bytes."""


def new_key() -> bytes:
    """A fresh random 32-byte key (a DEK or a scope key)."""
    return os.urandom(KEY_LEN)


def _check_key(key: bytes, what: str) -> None:
    if len(key) != KEY_LEN:
        raise ValueError(f"{what} must be {KEY_LEN} bytes, got {len(key)}")


def _check_chunk_size(chunk_size: int) -> None:
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]")


@dataclass(frozen=True)
class BlobHeader:
    """The parsed header of a blob. ``raw`` is authenticated as part of every chunk."""

    size: int
    chunk_size: int
    version: int = VERSION
    algorithm: int = ALG_AES_256_GCM

    @classmethod
    def for_plaintext(cls, size: int, chunk_size: int) -> BlobHeader:
        """The header of a new blob holding ``size`` plaintext bytes."""
        _check_chunk_size(chunk_size)
        if size < 0:
            raise ValueError("size must be >= 0")
        return cls(size=size, chunk_size=chunk_size)

    @property
    def raw(self) -> bytes:
        """The 24 header bytes as stored."""
        return _HEADER.pack(MAGIC, self.version, self.algorithm, 0, self.chunk_size, self.size)

    @property
    def n_chunks(self) -> int:
        """Number of chunks (at least one: an empty object is one empty last chunk)."""
        return max(1, -(-self.size // self.chunk_size))

    @property
    def blob_size(self) -> int:
        """Exact size in bytes of the whole blob."""
        return HEADER_LEN + self.size + TAG_LEN * self.n_chunks

    def chunk_offset(self, index: int) -> int:
        """Byte offset of chunk ``index`` in the blob."""
        return HEADER_LEN + index * (self.chunk_size + TAG_LEN)

    def chunk_plain_len(self, index: int) -> int:
        """Plaintext length of chunk ``index``."""
        if index == self.n_chunks - 1:
            return self.size - index * self.chunk_size
        return self.chunk_size


def read_header(src: Source) -> BlobHeader:
    """Parse and sanity-check the header of a blob (authenticated later, with each chunk)."""
    raw = _pread(src, HEADER_LEN, 0)
    if len(raw) != HEADER_LEN:
        raise IntegrityError("blob is shorter than its header")
    magic, version, algorithm, reserved, chunk_size, size = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise IntegrityError("blob does not start with the MDMOBJ1 magic")
    if version != VERSION or algorithm != ALG_AES_256_GCM or reserved != 0:
        raise IntegrityError(f"unsupported blob version {version} / algorithm {algorithm}")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise IntegrityError(f"blob header has an invalid chunk size {chunk_size}")
    return BlobHeader(size=size, chunk_size=chunk_size, version=version, algorithm=algorithm)


class ChunkCipher:
    """Encrypts and decrypts the chunks of one object (one DEK, one identity, one header)."""

    def __init__(self, dek: bytes, identity: bytes, header: BlobHeader) -> None:
        _check_key(dek, "data key")
        self._aead = AESGCM(dek)
        self._prefix = header.raw + identity
        self.header = header

    def _aad(self, index: int) -> bytes:
        last = index == self.header.n_chunks - 1
        return self._prefix + struct.pack(">QB", index, 1 if last else 0)

    @staticmethod
    def _nonce(index: int) -> bytes:
        # Each object has its own random DEK, so the chunk index alone is a unique nonce under
        # that key: no (key, nonce) pair is ever used twice, which is all GCM requires.
        return index.to_bytes(NONCE_LEN, "big")

    def encrypt_chunk(self, index: int, plaintext: bytes | memoryview) -> bytes:
        """Ciphertext || tag of chunk ``index``."""
        if len(plaintext) != self.header.chunk_plain_len(index):
            raise ValueError(f"chunk {index} has the wrong length")
        # AESGCM reads any buffer: no copy of the chunk first.
        return self._aead.encrypt(self._nonce(index), plaintext, self._aad(index))

    def decrypt_chunk(self, index: int, sealed: bytes) -> bytes:
        """Authenticate and decrypt chunk ``index``; IntegrityError names the chunk."""
        expected = self.header.chunk_plain_len(index) + TAG_LEN
        if len(sealed) != expected:
            raise IntegrityError(
                f"chunk {index} of {self.header.n_chunks} is truncated "
                f"({len(sealed)} of {expected} bytes)"
            )
        try:
            return self._aead.decrypt(self._nonce(index), sealed, self._aad(index))
        except InvalidTag:
            raise IntegrityError(
                f"chunk {index} of {self.header.n_chunks} failed authentication"
            ) from None

    def decrypt_chunk_into(self, index: int, sealed: memoryview, out: memoryview) -> None:
        """:meth:`decrypt_chunk` writing the plaintext into ``out`` (exactly its length);
        ``out`` is zeroed when authentication fails."""
        expected = self.header.chunk_plain_len(index) + TAG_LEN
        if len(sealed) != expected or len(out) != expected - TAG_LEN:
            raise IntegrityError(
                f"chunk {index} of {self.header.n_chunks} is truncated "
                f"({len(sealed)} of {expected} bytes)"
            )
        try:
            self._aead.decrypt_into(self._nonce(index), sealed, self._aad(index), out)
        except InvalidTag:
            out[:] = bytes(len(out))  # whatever GCM wrote before the tag check failed
            raise IntegrityError(
                f"chunk {index} of {self.header.n_chunks} failed authentication"
            ) from None

    def iter_blob(self, data: bytes | memoryview) -> Iterator[bytes]:
        """The header, then each encrypted chunk of ``data`` (for streaming to a file)."""
        if len(data) != self.header.size:
            raise ValueError("data length does not match the header")
        view = memoryview(data)
        yield self.header.raw
        cs = self.header.chunk_size
        for i in range(self.header.n_chunks):
            yield self.encrypt_chunk(i, view[i * cs : i * cs + self.header.chunk_plain_len(i)])


def encrypt_object(
    dek: bytes, identity: bytes, data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> bytes:
    """The whole blob of ``data`` encrypted under ``dek`` for ``identity``."""
    header = BlobHeader.for_plaintext(len(data), chunk_size)
    return b"".join(ChunkCipher(dek, identity, header).iter_blob(data))


def _pread(src: Source, n: int, offset: int) -> bytes:
    """Read up to ``n`` bytes at ``offset`` without moving any shared file position."""
    if isinstance(src, int):
        # os.pread may return short reads only at EOF for regular files; loop to be safe.
        parts: list[bytes] = []
        while n > 0:
            got = os.pread(src, n, offset)
            if not got:
                break
            parts.append(got)
            n -= len(got)
            offset += len(got)
        return b"".join(parts)
    if isinstance(src, bytes | bytearray | memoryview):
        return bytes(src[offset : offset + n])
    return _pread(src.fileno(), n, offset)


def decrypt_range(
    dek: bytes,
    identity: bytes,
    src: Source,
    header: BlobHeader,
    offset: int,
    length: int,
    cipher: ChunkCipher | None = None,
) -> bytes:
    """Plaintext bytes ``[offset, offset+length)``, clipped to the object's size.

    Only the chunks covering the range are read (one ``pread``) and authenticated; any
    authentication failure raises IntegrityError naming the chunk.
    """
    if offset < 0 or length < 0:
        raise ValueError("offset and length must be >= 0")
    end = min(offset + length, header.size)
    if header.size == 0 and offset == 0:
        # An empty object still has its one (empty, last) chunk to authenticate; checking it
        # means a forged "size 0" header cannot pass silently.
        end = 0
        first, last = 0, 0
    elif offset >= end:
        return b""
    else:
        first = offset // header.chunk_size
        last = (end - 1) // header.chunk_size
    # A reader that decrypts many ranges of one object passes its cipher in (building the
    # AEAD context and the associated-data prefix costs more than a small chunk).
    cipher = cipher or ChunkCipher(dek, identity, header)
    start = header.chunk_offset(first)
    stop = header.chunk_offset(last) + header.chunk_plain_len(last) + TAG_LEN
    raw = _pread(src, stop - start, start)
    out: list[bytes] = []
    pos = 0
    for i in range(first, last + 1):
        n = header.chunk_plain_len(i) + TAG_LEN
        out.append(cipher.decrypt_chunk(i, raw[pos : pos + n]))
        pos += n
    plain = b"".join(out)
    base = first * header.chunk_size
    return plain[offset - base : end - base]


def decrypt_object(dek: bytes, identity: bytes, src: Source) -> bytes:
    """Authenticate the whole blob (every chunk, and no trailing bytes) and return it."""
    header = read_header(src)
    data = decrypt_range(dek, identity, src, header, 0, header.size)
    if _pread(src, 1, header.blob_size):
        raise IntegrityError("blob has trailing bytes after its last chunk")
    return data


def wrap_key(kek: bytes, key: bytes, aad: bytes) -> bytes:
    """``key`` sealed under ``kek`` with AES-256-GCM: random 12-byte nonce || ciphertext."""
    _check_key(kek, "key-encryption key")
    nonce = os.urandom(NONCE_LEN)
    return nonce + AESGCM(kek).encrypt(nonce, key, aad)


def unwrap_key(kek: bytes, wrapped: bytes, aad: bytes) -> bytes:
    """Inverse of :func:`wrap_key`; IntegrityError if the kek, aad or material do not match."""
    _check_key(kek, "key-encryption key")
    if len(wrapped) < NONCE_LEN + TAG_LEN:
        raise IntegrityError("wrapped key is too short")
    try:
        return AESGCM(kek).decrypt(wrapped[:NONCE_LEN], wrapped[NONCE_LEN:], aad)
    except InvalidTag:
        raise IntegrityError("wrapped key failed authentication") from None
