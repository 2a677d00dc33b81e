"""Seeded generator of hostile C-STORE payloads for the receiver fuzz test.

Every object is built from one realistic synthetic CT slice (small, so that ten thousand of them
fit in a CI minute), re-labelled with the UID a retrieval asked for, then, case by case, left
intact (a control), mutated (flips, truncations, insertions, huge or undefined lengths, deep or
never-closed sequences, wrong VRs, a second or another SOP Instance UID, a leading NUL, file
meta inside the data set, pixel data that does not fit the image, an empty data set, another
transfer syntax than the context's, a deflate bomb), or turned into protocol abuse (a 1-byte
PDV item, PDUs of absurd lengths or unknown types, an abort or a stall in the middle of an
object, a C-STORE with no data set, one on a context never accepted).
"""

from __future__ import annotations

import copy
import io
import random
import struct
import zlib
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from mdm_demo.synth import generate

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
UID_ROOT = "1.2.826.0.1.3680043.10.1818."
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"


def uid_of(n: int) -> str:
    """The n-th fuzz UID (all of one length, so a template's bytes can be patched)."""
    return f"{UID_ROOT}{10**8 + n}"


PLACEHOLDER = uid_of(0)

# Kinds of payload and their weights. Protocol abuse is rarer: it ends an association.
DATA_KINDS: dict[str, int] = {
    "valid": 30,
    "flip": 10,
    "truncate": 6,
    "insert": 4,
    "dup_uid": 5,
    "other_uid": 4,
    "nul_uid": 4,
    "deep": 3,
    "never_closed": 3,
    "bad_vr": 3,
    "pixels": 3,
    "meta_in_ds": 3,
    "empty": 2,
    "wrong_ts": 3,
    "huge_len": 3,
    "undefined_len": 2,
    "no_dataset": 1,
}
PROTOCOL_KINDS: dict[str, int] = {
    "pdv1": 3,
    "pdu_huge": 3,
    "pdu_unknown": 2,
    "abort_mid": 2,
    "garbage_pdu": 2,
}
BOMB_KIND = "bomb"
STALL_KIND = "stall"
NO_DATA_SENT_KIND = "no_data_sent"
"""A C-STORE that announces a data set and never sends it (the bridge cannot answer it:
it must abort at the stall timeout)."""


def _encode(ds: Dataset, syntax: str) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = syntax == IMPLICIT
    write_dataset(buf, ds)
    return buf.getvalue()


def deflate(body: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = c.compress(body) + c.flush()
    return out + b"\0" * (len(out) & 1)


@dataclass(frozen=True)
class Payload:
    kind: str
    syntax: str
    """The transfer syntax of the presentation context to send it on."""
    body: bytes | None
    """The data set bytes (None: a C-STORE without a data set, or protocol abuse)."""

    @property
    def protocol(self) -> bool:
        return self.kind in PROTOCOL_KINDS or self.kind == STALL_KIND


class Corpus:
    """Templates of one realistic CT slice, in the syntaxes the fuzz test sends."""

    def __init__(self) -> None:
        g = generate(None, patients=1, seed=1818, ct_slices=1, mr_slices=0, rows=16, cols=16)[0]
        ds = pydicom.dcmread(io.BytesIO(g.read()))
        del ds.file_meta
        ds.SOPInstanceUID = PLACEHOLDER
        item = Dataset()
        item.CodeValue = "FUZZ1"
        item.CodingSchemeDesignator = "99MDM"
        ds.ProcedureCodeSequence = Sequence([item])
        self.dataset = ds
        self.explicit = _encode(ds, EXPLICIT)
        self.implicit = _encode(ds, IMPLICIT)
        self._bomb: bytes | None = None

    def body(self, uid: str, syntax: str) -> bytes:
        raw = self.implicit if syntax == IMPLICIT else self.explicit
        out = raw.replace(PLACEHOLDER.encode(), uid.encode())
        return deflate(out) if syntax == DEFLATED else out

    def bomb(self) -> bytes:
        """About 1 MB that inflates to about 1 GB (a data set whose pixel data is zeros)."""
        if self._bomb is None:
            ds = copy.deepcopy(self.dataset)
            ds.Rows = ds.Columns = 16384
            ds.BitsAllocated = ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelData = b""
            head = _encode(ds, EXPLICIT)
            pix = struct.pack("<HH2s2xL", 0x7FE0, 0x0010, b"OW", 16384 * 16384 * 2)
            head = head[: head.rindex(struct.pack("<HH", 0x7FE0, 0x0010))] + pix
            c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
            parts = [c.compress(head)]
            zeros = bytes(1 << 24)
            for _ in range(16384 * 16384 * 2 >> 24):
                parts.append(c.compress(zeros))
            parts.append(c.flush())
            self._bomb = b"".join(parts)
        return self._bomb


def _pick(rng: random.Random, table: dict[str, int]) -> str:
    return rng.choices(list(table), weights=list(table.values()))[0]


def payload(
    corpus: Corpus,
    rng: random.Random,
    uid: str,
    *,
    syntaxes: tuple[str, ...],
    protocol_rate: float,
    kind: str | None = None,
) -> Payload:
    """One payload for a C-STORE of ``uid``, on a context of one of ``syntaxes`` (of
    ``kind`` if given, else drawn)."""
    if kind in PROTOCOL_KINDS or (kind is None and rng.random() < protocol_rate):
        return Payload(kind or _pick(rng, PROTOCOL_KINDS), EXPLICIT, None)
    kind = kind or _pick(rng, DATA_KINDS)
    syntax = rng.choice(syntaxes)
    if kind == "no_dataset":
        return Payload(kind, EXPLICIT, None)
    if kind == "valid":
        return Payload(kind, syntax, corpus.body(uid, syntax))
    base = syntax if syntax != DEFLATED else EXPLICIT
    body = bytearray(corpus.body(uid, base))
    implicit = base == IMPLICIT
    uid_at = bytes(body).index(uid.encode())
    pix_at = bytes(body).rindex(struct.pack("<HH", 0x7FE0, 0x0010))
    if kind == "flip":
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(pix_at)
            body[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del body[rng.randrange(1, len(body)) :]
    elif kind == "insert":
        i = rng.randrange(pix_at)
        body[i:i] = rng.randbytes(rng.randint(1, 12))
    elif kind == "dup_uid":
        other = uid_of(rng.randrange(10**7, 2 * 10**7)).encode()
        elem = (
            struct.pack("<HHL", 0x0008, 0x0018, len(other))
            if implicit
            else struct.pack("<HH2sH", 0x0008, 0x0018, b"UI", len(other))
        )
        end = uid_at + len(uid)
        body[end:end] = elem + other
    elif kind == "other_uid":
        body[uid_at : uid_at + len(uid)] = uid_of(rng.randrange(10**7, 2 * 10**7)).encode()
    elif kind == "nul_uid":
        body[uid_at : uid_at + 1] = b"\0"
    elif kind in ("deep", "never_closed"):
        depth = rng.randint(1000, 3000) if kind == "deep" else rng.randint(1, 5)
        level = (
            struct.pack("<HHL", 0xFFFA, 0xFFFA, 0xFFFFFFFF)
            if implicit
            else struct.pack("<HH2s2xL", 0xFFFA, 0xFFFA, b"SQ", 0xFFFFFFFF)
        )
        level += struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
        close = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
        tail = level * depth + (close * depth if kind == "deep" and rng.random() < 0.5 else b"")
        body += tail
    elif kind == "bad_vr":
        if implicit:
            body[pix_at + 4 : pix_at + 8] = struct.pack("<L", 0xFFFFFFF0)
        else:
            body[pix_at + 4 : pix_at + 6] = rng.choice((b"ZZ", b"\0\0", b"sq", b"UI"))
    elif kind == "pixels":
        del body[-rng.randint(1, 64) :]
        if not implicit:  # keep the lengths consistent: only the image size lies
            n = len(body) - pix_at - 12
            body[pix_at + 8 : pix_at + 12] = struct.pack("<L", n)
        else:
            n = len(body) - pix_at - 8
            body[pix_at + 4 : pix_at + 8] = struct.pack("<L", n)
    elif kind == "meta_in_ds":
        ts = EXPLICIT.encode() + b"\0"
        elem = (
            struct.pack("<HHL", 0x0002, 0x0010, len(ts))
            if implicit
            else struct.pack("<HH2sH", 0x0002, 0x0010, b"UI", len(ts))
        )
        body[0:0] = elem + ts
    elif kind == "empty":  # nothing but trailing padding: no SOP Instance UID
        body = bytearray(
            struct.pack("<HHL", 0xFFFC, 0xFFFC, 0)
            if implicit
            else struct.pack("<HH2s2xL", 0xFFFC, 0xFFFC, b"OB", 0)
        )
    elif kind == "wrong_ts":
        # The other VR encoding than the context says.
        return Payload(kind, syntax, corpus.body(uid, EXPLICIT if implicit else IMPLICIT))
    elif kind == "huge_len":
        i = uid_at - (4 if implicit else 2)
        if implicit:
            body[i : i + 4] = struct.pack("<L", 0x7FFFFFF0)
        else:
            body[pix_at + 8 : pix_at + 12] = struct.pack("<L", 0x7FFFFFF0)
    elif kind == "undefined_len":
        if implicit:
            body[uid_at - 4 : uid_at] = b"\xff\xff\xff\xff"
        else:
            body[pix_at + 8 : pix_at + 12] = b"\xff\xff\xff\xff"
    out = bytes(body)
    if syntax == DEFLATED:
        out = deflate(out)
    return Payload(kind, syntax, out)
