"""Formats shared by the key-service client and servers: sealed material, AAD, share payloads.

Sealed material (what the store keeps as an object's ``sealed_key``)::

    0x02 || JSON {"v": 1, "m": M, "check": b64, "shares": [{"i", "kid", "c", "s"}, ...]}

``check`` commits to the object key, ``c`` to share ``i`` (see mdm.keyservice.shares.commit),
``s`` is the share sealed to server ``i``'s scope key ``kid`` (mdm.keyservice.seal). The sealed
plaintext is JSON ``{"share": b64, "res": {...}}``: the share and the resource attributes the
policy matches on (patient ID included), readable only by server ``i``. Its AAD binds object
identity, scope, server index and key id, so material cannot be replayed for another object,
scope, server or key. The first byte tells it apart from the local keyring's format (0x01).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import struct
from dataclasses import dataclass
from typing import Any

from mdm.access.decide import Resource
from mdm.errors import IntegrityError
from mdm.store.keys import Scope

SEALED_VERSION = b"\x02"
INFO_SHARE = b"mdm-ks-share-v1"
INFO_REPLY = b"mdm-ks-reply-v1"
INFO_PRF = b"mdm-ks-prf-v1"
_OBJ_PREFIX = b"mdm-object-v1\0"


def b64e(data: bytes) -> str:
    """Standard base64 text."""
    return base64.b64encode(data).decode()


def b64d(text: object) -> bytes:
    """Strict base64 decoding; ValueError on anything else."""
    if not isinstance(text, str):
        raise ValueError("expected base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise ValueError("invalid base64") from None


def lp(*parts: bytes) -> bytes:
    """Length-prefixed concatenation: no two part lists encode to the same bytes."""
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def kid_of(public: bytes) -> str:
    """Key id of a public scope key: 16 hex digits of its SHA-256."""
    return hashlib.sha256(public).hexdigest()[:16]


def share_aad(identity: bytes, scope: str, index: int, kid: str) -> bytes:
    """AAD of a share sealed to server ``index``'s key ``kid`` for one object in one scope."""
    return b"mdm-ks-share-aad-v1\0" + lp(
        identity, scope.encode(), str(index).encode(), kid.encode()
    )


def reply_aad(identity: bytes, scope: str, index: int) -> bytes:
    """AAD of a share a server returns to the client's ephemeral key."""
    return b"mdm-ks-reply-aad-v1\0" + lp(identity, scope.encode(), str(index).encode())


def prf_aad(label: str, index: int) -> bytes:
    """AAD of a pseudonym-PRF partial a server returns to the client's ephemeral key."""
    return b"mdm-ks-prf-aad-v1\0" + lp(label.encode(), str(index).encode())


PSEUDONYM_LABEL = re.compile(r"^(deid|metadata):[^\x00-\x1f\x7f]{1,256}$")
"""``deid:SCOPE`` (a de-identified view's pseudonym scope) or ``metadata:RULE``."""


def dek_context(identity: bytes, scope: str) -> bytes:
    """The commitment context of an object's key and shares."""
    return lp(b"object", identity, scope.encode())


def parse_scope(label: object) -> Scope:
    """``site/level[/program]`` -> Scope; ValueError if malformed."""
    if not isinstance(label, str):
        raise ValueError("scope must be a string")
    parts = label.split("/")
    if len(parts) not in (2, 3):
        raise ValueError("scope must be site/level or site/level/program")
    scope = Scope(parts[0], parts[1], parts[2] if len(parts) == 3 else "")
    if scope.label() != label:
        raise ValueError("scope label is not canonical")
    return scope


def parse_identity(identity: bytes) -> tuple[str, str]:
    """``(view, sop_uid)`` of an object identity (mdm.store.objects.ObjectRef.identity)."""
    if not identity.startswith(_OBJ_PREFIX):
        raise ValueError("not an object identity")
    rest = identity[len(_OBJ_PREFIX) :].split(b"\0")
    if len(rest) != 2 or not rest[0] or not rest[1]:
        raise ValueError("malformed object identity")
    return rest[0].decode(), rest[1].decode()


def resource_to_dict(resource: Resource | None, scope: Scope) -> dict[str, Any]:
    """The attributes a policy matches on, as sealed inside each share (never stored in clear)."""
    if resource is None:
        return {"sites": [scope.site]}
    d: dict[str, Any] = {"sites": sorted(resource.sites or {scope.site})}
    for k in ("patient_id", "study_uid", "series_uid", "trial", "study_date"):
        v = getattr(resource, k)
        if v is not None:
            d[k] = v
    if resource.modalities:
        d["modalities"] = sorted(resource.modalities)
    return d


def resource_from_dict(d: object, sop_uid: str) -> Resource:
    """Inverse of :func:`resource_to_dict` (``sop_uid`` comes from the authenticated identity)."""
    if not isinstance(d, dict):
        raise ValueError("resource must be an object")

    def opt(k: str) -> str | None:
        v = d.get(k)
        if v is not None and not isinstance(v, str):
            raise ValueError(f"resource {k} must be a string")
        return v

    def strs(k: str) -> frozenset[str]:
        v = d.get(k, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ValueError(f"resource {k} must be a list of strings")
        return frozenset(v)

    return Resource(
        sites=strs("sites"),
        patient_id=opt("patient_id"),
        study_uid=opt("study_uid"),
        series_uid=opt("series_uid"),
        sop_uid=sop_uid,
        trial=opt("trial"),
        modalities=strs("modalities"),
        study_date=opt("study_date"),
    )


def share_plaintext(share: bytes, res: dict[str, Any]) -> bytes:
    """What is sealed to a server: the share and the resource attributes."""
    return json.dumps({"share": b64e(share), "res": res}, separators=(",", ":")).encode()


def parse_share_plaintext(raw: bytes) -> tuple[bytes, dict[str, Any]]:
    """Inverse of :func:`share_plaintext`; ValueError if malformed."""
    d = json.loads(raw)
    if not isinstance(d, dict) or not isinstance(d.get("res"), dict):
        raise ValueError("malformed share payload")
    share = b64d(d.get("share"))
    return share, d["res"]


@dataclass(frozen=True)
class SealedShare:
    """Share ``index`` sealed to that server's scope key ``kid``, with its commitment."""

    index: int
    kid: str
    commitment: bytes
    sealed: bytes


@dataclass(frozen=True)
class SealedKey:
    """An object key as M-of-N sealed shares."""

    threshold: int
    check: bytes
    shares: tuple[SealedShare, ...]

    def encode(self) -> bytes:
        """The bytes stored as the object's sealed key."""
        doc = {
            "v": 1,
            "m": self.threshold,
            "check": b64e(self.check),
            "shares": [
                {"i": s.index, "kid": s.kid, "c": b64e(s.commitment), "s": b64e(s.sealed)}
                for s in self.shares
            ],
        }
        return SEALED_VERSION + json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> SealedKey:
        """Parse sealed material; IntegrityError if it is not key-service material."""
        if raw[:1] != SEALED_VERSION:
            raise IntegrityError("sealed key is not key-service material (wrong format byte)")
        try:
            d = json.loads(raw[1:])
            if d["v"] != 1:
                raise ValueError("version")
            shares = tuple(
                SealedShare(int(s["i"]), str(s["kid"]), b64d(s["c"]), b64d(s["s"]))
                for s in d["shares"]
            )
            m = int(d["m"])
            if not 2 <= m <= len(shares) or len({s.index for s in shares}) != len(shares):
                raise ValueError("threshold")
            return cls(m, b64d(d["check"]), shares)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise IntegrityError(f"malformed sealed key ({type(e).__name__})") from None

    def replace(self, share: SealedShare) -> SealedKey:
        """A copy with the share of the same index replaced."""
        return SealedKey(
            self.threshold,
            self.check,
            tuple(share if s.index == share.index else s for s in self.shares),
        )
