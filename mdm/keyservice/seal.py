"""Sealing to an X25519 public key: ephemeral X25519, HKDF-SHA256, AES-256-GCM.

``seal_to(public, plaintext, aad)`` = ``eph_pub (32) || nonce (12) || ciphertext || tag (16)``.
The AES key is HKDF(ECDH(eph, public), salt = eph_pub || public, info = ``info``), so it is new
for every seal; ``aad`` binds the material to its object, scope, server and key id. Used both
for shares sealed to a key server's scope key and for shares a server returns to a client's
ephemeral reply key. Only primitives from ``cryptography``.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mdm.errors import IntegrityError

PUB_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16
OVERHEAD = PUB_LEN + NONCE_LEN + TAG_LEN


def public_bytes(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    """The raw 32-byte public key."""
    pub = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte private key (for the server's 0600 key store only)."""
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def _derive(shared: bytes, eph_pub: bytes, recipient: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=eph_pub + recipient, info=info).derive(
        shared
    )


def seal_to(public: bytes, plaintext: bytes, aad: bytes, info: bytes) -> bytes:
    """``plaintext`` sealed to the X25519 ``public`` key (raw 32 bytes), bound to ``aad``."""
    if len(public) != PUB_LEN:
        raise ValueError("an X25519 public key is 32 bytes")
    eph = X25519PrivateKey.generate()
    eph_pub = public_bytes(eph)
    key = _derive(eph.exchange(X25519PublicKey.from_public_bytes(public)), eph_pub, public, info)
    nonce = os.urandom(NONCE_LEN)
    return eph_pub + nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_from(private: X25519PrivateKey, sealed: bytes, aad: bytes, info: bytes) -> bytes:
    """Inverse of :func:`seal_to`; IntegrityError if key, ``aad`` or material do not match."""
    if len(sealed) < OVERHEAD:
        raise IntegrityError("sealed material is too short")
    eph_pub, nonce, body = sealed[:PUB_LEN], sealed[PUB_LEN : PUB_LEN + NONCE_LEN], sealed[44:]
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(eph_pub))
    except ValueError:
        raise IntegrityError("sealed material has an invalid ephemeral key") from None
    key = _derive(shared, eph_pub, public_bytes(private), info)
    try:
        return AESGCM(key).decrypt(nonce, body, aad)
    except InvalidTag:
        raise IntegrityError("sealed material failed authentication") from None
