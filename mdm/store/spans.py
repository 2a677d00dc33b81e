"""Decrypting a span of a blob into reused buffers: the serving path's reads allocate nothing.

A FUSE read answers from a buffer and forgets it: pyfuse3 copies the reply into the kernel
before the next request of the file is handled. Decrypting each span into fresh ``bytes``
costs a new allocation per span; past glibc's mmap threshold that is a fresh mapping, so every
page of it is faulted in and zeroed, then unmapped (1 MiB spans: ~125,000 page faults for a
300-file series, twice the read's time). :class:`SpanBuffers` hold one span's ciphertext and
plaintext; :class:`BufferPool` hands them from one open file to the next.
"""

from __future__ import annotations

import os
import threading

from mdm.errors import IntegrityError
from mdm.store.crypto import TAG_LEN, BlobHeader, ChunkCipher

SPAN_BYTES = 1 << 20
"""How far ahead a transient read decrypts (whole chunks): the kernel's largest FUSE read."""


class SpanBuffers:
    """Room for ``chunks`` chunks of ``chunk_size``: ciphertext as read, plaintext as served."""

    __slots__ = ("chunk_size", "chunks", "plain", "raw")

    def __init__(self, chunk_size: int, chunks: int) -> None:
        self.chunk_size = chunk_size
        self.chunks = chunks
        self.raw = bytearray(chunks * (chunk_size + TAG_LEN))
        self.plain = bytearray(chunks * chunk_size)


def span_chunks(chunk_size: int) -> int:
    """Chunks a span holds for blobs of ``chunk_size``: a read of up to SPAN_BYTES at any
    offset fits (it may straddle one more chunk than SPAN_BYTES holds)."""
    return max(1, SPAN_BYTES // chunk_size) + 1


class BufferPool:
    """A bounded free list of :class:`SpanBuffers`, by chunk size. Thread-safe."""

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self._free: list[SpanBuffers] = []
        self._lock = threading.Lock()

    def take(self, chunk_size: int) -> SpanBuffers:
        """Buffers for spans of blobs with ``chunk_size`` (reused when one is free)."""
        with self._lock:
            for i, b in enumerate(self._free):
                if b.chunk_size == chunk_size:
                    return self._free.pop(i)
        return SpanBuffers(chunk_size, span_chunks(chunk_size))

    def give(self, bufs: SpanBuffers) -> None:
        """Return buffers nobody reads from any more (kept if there is room)."""
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(bufs)


def decrypt_span(
    cipher: ChunkCipher, fd: int, header: BlobHeader, first: int, last: int, bufs: SpanBuffers
) -> int:
    """Read chunks ``first..last`` of the blob on ``fd`` (one ``preadv``) and decrypt them into
    ``bufs.plain`` from its start; returns the plaintext length. Every chunk is authenticated;
    IntegrityError names the one that fails or is cut short."""
    if last - first + 1 > bufs.chunks or header.chunk_size != bufs.chunk_size:
        raise ValueError("span larger than its buffers")
    start = header.chunk_offset(first)
    stop = header.chunk_offset(last) + header.chunk_plain_len(last) + TAG_LEN
    raw = memoryview(bufs.raw)
    want = stop - start
    got = 0
    while got < want:
        n = os.preadv(fd, [raw[got:want]], start + got)
        if n <= 0:
            break
        got += n
    plain = memoryview(bufs.plain)
    pos = out = 0
    for i in range(first, last + 1):
        n = header.chunk_plain_len(i)
        sealed = raw[pos : min(pos + n + TAG_LEN, got)]
        cipher.decrypt_chunk_into(i, sealed, plain[out : out + n])
        pos += n + TAG_LEN
        out += n
    if got < want:  # decrypt_chunk_into named the short chunk; this is only a backstop
        raise IntegrityError(f"chunk {last} of {header.n_chunks} is truncated")
    return out


__all__ = ["SPAN_BYTES", "BufferPool", "SpanBuffers", "decrypt_span", "span_chunks"]
