"""A threshold PRF for the pseudonym keys: no key server, and no mount, holds the PRF key.

The pseudonym key of a scope is ``F(k, label) = HKDF(label, k·H(label))`` on edwards25519
(the "2HashDH" PRF), where ``k`` is a scalar that ``mdm keys init`` draws, splits M-of-N with
Shamir over the group order and then forgets. Key server ``i`` holds ``k_i`` only and answers an
entitled principal with ``k_i·H(label)`` and a Chaum-Pedersen proof that it used the same
``k_i`` as its published commitment ``K_i = k_i·B`` (``public-keys.json``); the mount checks
each proof and combines M partials by Lagrange interpolation in the exponent. So:

- a scope's key is released per label, to principals the servers' policy entitles to that
  label, and says nothing about any other label's key (PRF under the CDH assumption);
- fewer than M colluding servers learn nothing of ``k``;
- a server that answers with a wrong partial is caught by its proof, not silently combined.

``H`` is a hash onto the prime-order subgroup: SHA-512 of the label, each half mapped with
libsodium's Elligator 2 map (``crypto_core_ed25519_from_uniform``), the two points added (the
random-oracle construction of RFC 9380). Group arithmetic is libsodium's, through PyNaCl.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl import bindings as nb

L = 2**252 + 27742317777372353535851937790883648493
"""The order of edwards25519's prime-order subgroup."""
SCALAR_LEN = 32
POINT_LEN = 32
PROOF_LEN = 64


def _s(x: int) -> bytes:
    return (x % L).to_bytes(SCALAR_LEN, "little")


def _int(b: bytes) -> int:
    return int.from_bytes(b, "little")


def hash_to_point(label: bytes) -> bytes:
    """``H(label)``: a point of the prime-order subgroup that nobody knows the log of."""
    h = hashlib.sha512(b"mdm-prf-h2c-v1\0" + label).digest()
    return bytes(
        nb.crypto_core_ed25519_add(
            nb.crypto_core_ed25519_from_uniform(h[:32]),
            nb.crypto_core_ed25519_from_uniform(h[32:]),
        )
    )


def random_scalar() -> int:
    """A uniformly random non-zero scalar."""
    return 1 + secrets.randbelow(L - 1)


def split(k: int, threshold: int, n: int) -> dict[int, int]:
    """Shamir shares ``{i: k_i}`` (i = 1..n) of ``k`` over Z_L, any ``threshold`` of which
    give ``k``."""
    if not 2 <= threshold <= n:
        raise ValueError("need 2 <= threshold <= n")
    coeffs = [k % L] + [secrets.randbelow(L) for _ in range(threshold - 1)]
    return {i: sum(c * pow(i, e, L) for e, c in enumerate(coeffs)) % L for i in range(1, n + 1)}


def commitment(k_i: int) -> bytes:
    """``K_i = k_i·B``, published so partials can be checked."""
    return bytes(nb.crypto_scalarmult_ed25519_base_noclamp(_s(k_i)))


def _challenge(*parts: bytes) -> int:
    return _int(hashlib.sha512(b"mdm-prf-dleq-v1\0" + b"".join(parts)).digest()) % L


def partial(k_i: int, label: bytes) -> tuple[bytes, bytes]:
    """Server side: ``(k_i·H(label), proof)``; the proof shows log_B(K_i) = log_H(partial)."""
    h = hash_to_point(label)
    big_k = commitment(k_i)
    p = bytes(nb.crypto_scalarmult_ed25519_noclamp(_s(k_i), h))
    r = random_scalar()
    a1 = bytes(nb.crypto_scalarmult_ed25519_base_noclamp(_s(r)))
    a2 = bytes(nb.crypto_scalarmult_ed25519_noclamp(_s(r), h))
    c = _challenge(h, big_k, p, a1, a2)
    z = (r + c * k_i) % L
    return p, _s(c) + _s(z)


def verify(big_k: bytes, label: bytes, p: bytes, proof: bytes) -> bool:
    """Client side: whether ``p`` is ``k_i·H(label)`` for the ``k_i`` behind ``big_k``."""
    if len(p) != POINT_LEN or len(proof) != PROOF_LEN or len(big_k) != POINT_LEN:
        return False
    try:
        if not nb.crypto_core_ed25519_is_valid_point(p):
            return False
        h = hash_to_point(label)
        c, z = proof[:32], proof[32:]
        if _int(c) >= L or _int(z) >= L:
            return False
        # a1 = z·B - c·K_i, a2 = z·H - c·P; the proof holds if they hash back to c.
        a1 = nb.crypto_core_ed25519_sub(
            nb.crypto_scalarmult_ed25519_base_noclamp(z),
            nb.crypto_scalarmult_ed25519_noclamp(c, big_k),
        )
        a2 = nb.crypto_core_ed25519_sub(
            nb.crypto_scalarmult_ed25519_noclamp(z, h),
            nb.crypto_scalarmult_ed25519_noclamp(c, p),
        )
    except Exception:  # libsodium refuses small-order or invalid points: not a valid partial
        return False
    return _challenge(h, big_k, p, bytes(a1), bytes(a2)) == _int(c)


def combine(partials: Mapping[int, bytes]) -> bytes:
    """``k·H(label)`` from ``threshold`` verified partials ``{i: k_i·H(label)}``."""
    idx = sorted(partials)
    acc: bytes | None = None
    for i in idx:
        lam = 1
        for j in idx:
            if j != i:
                lam = lam * j * pow(j - i, -1, L) % L
        term = bytes(nb.crypto_scalarmult_ed25519_noclamp(_s(lam), partials[i]))
        acc = term if acc is None else bytes(nb.crypto_core_ed25519_add(acc, term))
    if acc is None:
        raise ValueError("no partials")
    return acc


def derive(label: bytes, point: bytes) -> bytes:
    """The 32-byte key of ``label`` from the combined ``k·H(label)``."""
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=b"mdm-prf-v1", info=b"mdm-pseudonym\0" + label
    ).derive(point)


def evaluate(k: int, label: bytes) -> bytes:
    """``F(k, label)`` computed whole (for tests and ``keys init`` self-checks only)."""
    return derive(label, bytes(nb.crypto_scalarmult_ed25519_noclamp(_s(k), hash_to_point(label))))
