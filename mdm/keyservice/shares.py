"""Shamir M-of-N secret sharing of 32-byte keys (pycryptodome), and share commitments.

pycryptodome's ``Crypto.Protocol.SecretSharing.Shamir`` shares 16-byte secrets over
GF(2^128). A 32-byte key is split as two independent 16-byte halves with the same share
indices; share ``i`` is ``half1_share_i || half2_share_i`` (32 bytes). Fewer than M shares of
each half reveal nothing about that half, so fewer than M shares reveal nothing about the key.
Shamir shares carry no integrity: a wrong share silently gives a wrong key. Callers therefore
check every share against a commitment (:func:`commit`) before combining.
"""

from __future__ import annotations

import hashlib
import struct

from Crypto.Protocol.SecretSharing import Shamir

SECRET_LEN = 32
HALF = 16
MAX_SHARES = 16


def split(secret: bytes, threshold: int, shares: int) -> list[tuple[int, bytes]]:
    """``shares`` shares (index 1..N, 32 bytes each) of which any ``threshold`` rebuild it."""
    if len(secret) != SECRET_LEN:
        raise ValueError(f"secret must be {SECRET_LEN} bytes")
    if not 2 <= threshold <= shares <= MAX_SHARES:
        raise ValueError(f"need 2 <= threshold <= shares <= {MAX_SHARES}")
    lo = Shamir.split(threshold, shares, secret[:HALF])
    hi = Shamir.split(threshold, shares, secret[HALF:])
    out: list[tuple[int, bytes]] = []
    for (i, a), (j, b) in zip(lo, hi, strict=True):
        assert i == j
        out.append((int(i), bytes(a) + bytes(b)))
    return out


def combine(shares: list[tuple[int, bytes]], threshold: int) -> bytes:
    """The secret from ``threshold`` distinct shares (extra shares are ignored)."""
    chosen = shares[:threshold]
    if len(chosen) < threshold or len({i for i, _ in chosen}) != threshold:
        raise ValueError(f"need {threshold} distinct shares, got {len(chosen)}")
    if any(len(s) != SECRET_LEN for _, s in chosen):
        raise ValueError("a share has the wrong length")
    # pycryptodome wants exactly k shares: more would raise the interpolation degree.
    lo = Shamir.combine([(i, s[:HALF]) for i, s in chosen])
    hi = Shamir.combine([(i, s[HALF:]) for i, s in chosen])
    return bytes(lo) + bytes(hi)


def commit(context: bytes, index: int, share: bytes) -> bytes:
    """SHA-256 commitment to share ``index`` in ``context`` (stored in clear beside the share).

    A share is 32 uniformly random bytes, so its hash reveals nothing useful; the commitment
    lets a client reject a garbage or wrong-server share before combining.
    """
    h = hashlib.sha256(b"mdm-ks-commit-v1\0")
    h.update(struct.pack(">I", len(context)) + context)
    h.update(struct.pack(">I", index) + share)
    return h.digest()
