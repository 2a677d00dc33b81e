"""The received-object check (mdm.dicom.validate): well-formed copies of the requested
instance pass; everything a hostile PACS sent in the field is refused, cheaply, without a
traceback or a PACS byte in the message."""

from __future__ import annotations

import copy
import io
import random
import struct
import time
import warnings
import zlib

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from mdm.dicom.part10 import part10
from mdm.dicom.validate import MAX_DEPTH, check_object
from mdm.errors import IntegrityError
from mdm_demo.synth import generate

pytestmark = pytest.mark.timeout(120)

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
BIG = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"

GEN = generate(None, patients=1, seed=18, ct_slices=2, mr_slices=1, rows=32, cols=32)
CT = pydicom.dcmread(io.BytesIO(GEN[0].read()))
UID = GEN[0].sop_uid
CLASS = GEN[0].sop_class_uid


def encode(ds: Dataset, syntax: str = EXPLICIT) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian = syntax != BIG
    buf.is_implicit_VR = syntax == IMPLICIT
    write_dataset(buf, ds)
    body = buf.getvalue()
    if syntax == DEFLATED:
        c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = c.compress(body) + c.flush()
        body += b"\0" * (len(body) & 1)
    return body


def obj_of(body: bytes, syntax: str = EXPLICIT, uid: str = UID) -> tuple[bytes, int]:
    data = part10(CLASS, uid, syntax, body)
    return data, len(data) - len(body)


def check(body: bytes, syntax: str = EXPLICIT, uid: str = UID) -> None:
    data, off = obj_of(body, syntax, uid)
    check_object(data, uid, "EVIL", dataset_offset=off, transfer_syntax=syntax, sop_class_uid=CLASS)


def refused(body: bytes, match: str, syntax: str = EXPLICIT) -> str:
    with pytest.raises(IntegrityError, match=match) as ei:
        check(body, syntax)
    msg = str(ei.value)
    assert msg.startswith("site EVIL sent") and UID in msg
    return msg


@pytest.mark.parametrize("syntax", [EXPLICIT, IMPLICIT, BIG, DEFLATED])
def test_well_formed_objects_pass_in_every_syntax(syntax: str) -> None:
    for g in GEN:
        ds = pydicom.dcmread(io.BytesIO(g.read()))
        body = encode(ds, syntax)
        data, off = obj_of(body, syntax, g.sop_uid)
        check_object(data, g.sop_uid, "S", dataset_offset=off, transfer_syntax=syntax)
        check_object(data, g.sop_uid, "S")  # transfer syntax and offset from the file meta
    # Sequences: defined and undefined lengths, nested, both VR modes.
    ds = copy.deepcopy(CT)
    inner = Dataset()
    inner.CodeValue = "1"
    inner.ConceptNameCodeSequence = Sequence([Dataset()])
    ds.ProcedureCodeSequence = Sequence([inner, Dataset()])
    check(encode(ds, syntax), syntax)


def test_a_second_sop_instance_uid_is_refused() -> None:
    body = encode(CT)
    elem = struct.pack("<HH2sH", 0x0008, 0x0018, b"UI", 8) + b"1.2.666\0"
    at = body.index(struct.pack("<HH", 0x0008, 0x0018))
    length = struct.unpack_from("<H", body, at + 6)[0]
    after = at + 8 + length
    refused(body[:after] + elem + body[after:], "duplicate element \\(0008,0018\\)")


def test_another_instance_or_a_padded_uid_is_refused() -> None:
    other = copy.deepcopy(CT)
    forged = UID[:-1] + ("2" if UID[-1] == "1" else "1")
    other.SOPInstanceUID = forged
    msg = refused(encode(other), "another object")
    assert f"({forged})" in msg
    nul = copy.deepcopy(CT)
    body = encode(nul)
    at = body.index(UID.encode())
    # A leading NUL: pydicom would read b"\0" + UID, another value.
    forged = body[: at - 2] + struct.pack("<H", len(UID) + 1 + (len(UID) + 1) % 2)
    value = b"\0" + UID.encode()
    value += b"\0" * (len(value) & 1)
    forged += value + body[at + len(UID) + (len(UID) & 1) :]
    msg = refused(forged, "another object")
    assert "an invalid UID" in msg


def nested(depth: int) -> Dataset:
    ds = copy.deepcopy(CT)
    cur = ds
    for _ in range(depth):
        item = Dataset()
        cur.ReferencedImageSequence = Sequence([item])
        cur = item
    return ds


def test_nesting_is_bounded_without_recursion() -> None:
    check(encode(nested(MAX_DEPTH)))
    refused(encode(nested(MAX_DEPTH + 1)), "nested deeper than 64")
    # Thousands deep, undefined lengths, never closed (pydicom would recurse into each
    # level): refused at once.
    level = struct.pack("<HH2s2xL", 0xFFFA, 0xFFFA, b"SQ", 0xFFFFFFFF)
    level += struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    t0 = time.perf_counter()
    refused(encode(CT) + level * 3000, "nested deeper than 64")
    assert time.perf_counter() - t0 < 0.5


def test_structural_damage_is_refused() -> None:
    body = encode(CT)
    # Truncated anywhere: refused (the pixel data, the last element, is cut).
    for cut in (1, 2, 7, 100, len(body) // 2):
        with pytest.raises(IntegrityError):
            check(body[:-cut])
    # A sequence that never closes.
    never = struct.pack("<HH2s2xL", 0xFFFA, 0xFFFA, b"SQ", 0xFFFFFFFF)
    never += struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    at = body.index(struct.pack("<HH", 0x7FE0, 0x0010))
    refused(body + never, "never closed")
    # A file-meta element inside the data set.
    meta = struct.pack("<HH2sH", 0x0002, 0x0010, b"UI", 20) + EXPLICIT.encode() + b"\0"
    refused(meta + body, "not allowed in a data set")
    # An unknown VR, and a length that runs past the end.
    refused(body[:at] + struct.pack("<HH2sH", 0x7FE0, 0x0008, b"ZZ", 0), "unknown VR")
    refused(body[:at] + struct.pack("<HH2s2xL", 0x7FE0, 0x0010, b"OW", 1 << 30), "runs past")
    # Pixel data that does not fit Rows x Columns.
    small = copy.deepcopy(CT)
    small.PixelData = small.PixelData[:-64]
    refused(encode(small), "pixel data of")
    # A US value of an impossible length.
    rows = body.index(struct.pack("<HH2sH", 0x0028, 0x0010, b"US", 2))
    odd = body[:rows] + struct.pack("<HH2sH", 0x0028, 0x0010, b"US", 3) + b"\0\0\0"
    refused(odd + body[rows + 10 :], "length its VR cannot have")
    # Duplicate and out-of-order elements.
    refused(body[:rows] + body[rows : rows + 10] + body[rows:], "duplicate element")
    # Garbage instead of a data set.
    refused(bytes(range(256)) * 4, "malformed|another")


def test_a_deflate_bomb_is_refused_within_its_bound() -> None:
    big = copy.deepcopy(CT)
    big.Rows, big.Columns = 8192, 8192
    big.PixelData = b"\0" * (8192 * 8192 * 2)  # 128 MiB of zeros: ~130 kB deflated
    body = encode(big, DEFLATED)
    assert len(body) < 1 << 20
    t0 = time.perf_counter()
    refused(body, "inflates past", DEFLATED)
    assert time.perf_counter() - t0 < 2
    refused(body[: len(body) // 2], "truncated|inflate", DEFLATED)
    refused(b"\xff" * 1000, "does not inflate|truncated", DEFLATED)


def pydicom_reads_it_all(data: bytes, uid: str) -> bool:
    """pydicom reads the whole object back, every element at every depth, as ``uid``."""

    def walk(ds: Dataset) -> None:
        for elem in ds:
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item)
            else:
                _ = elem.value

    with warnings.catch_warnings():  # mutated values: pydicom rightly warns
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data))
        walk(ds)
    return str(ds.SOPInstanceUID) == uid


def test_seeded_mutations_never_pass_unless_pydicom_reads_them_whole() -> None:
    """Byte flips, truncations, insertions: whatever the check accepts, pydicom reads back
    completely as the requested instance; nothing raises but IntegrityError."""
    rng = random.Random(18)
    ds = copy.deepcopy(CT)
    ds.ProcedureCodeSequence = Sequence([Dataset(), Dataset()])
    ds.ProcedureCodeSequence[0].CodeValue = "X1"
    bodies = {s: encode(ds, s) for s in (EXPLICIT, IMPLICIT)}
    accepted = refused_n = 0
    for _ in range(3000):
        syntax = rng.choice((EXPLICIT, IMPLICIT))
        body = bytearray(bodies[syntax])
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            i = rng.randrange(len(body) - 1024)  # mutate the header, not the pixels
            if op < 0.5:
                body[i] ^= 1 << rng.randrange(8)
            elif op < 0.7:
                del body[i : i + rng.randint(1, 8)]
            elif op < 0.85:
                body[i:i] = rng.randbytes(rng.randint(1, 8))
            else:
                body[i : i + 4] = b"\xff\xff\xff\xff"
        data, off = obj_of(bytes(body), syntax)
        try:
            check_object(data, UID, "S", dataset_offset=off, transfer_syntax=syntax)
        except IntegrityError:
            refused_n += 1
            continue
        accepted += 1
        assert pydicom_reads_it_all(data, UID)
    assert refused_n > 1500 and accepted > 100, (refused_n, accepted)


def test_the_check_is_cheap() -> None:
    g = generate(None, patients=1, seed=5, ct_slices=1, mr_slices=0, rows=512, cols=512)[0]
    ds = pydicom.dcmread(io.BytesIO(g.read()))
    body = encode(ds)
    data = part10(g.sop_class_uid, g.sop_uid, EXPLICIT, body)
    off = len(data) - len(body)
    n = 500
    t0 = time.perf_counter()
    for _ in range(n):
        check_object(data, g.sop_uid, "S", dataset_offset=off, transfer_syntax=EXPLICIT)
    per = (time.perf_counter() - t0) / n
    assert per < 0.001  # ~30 us measured on the 2-core CI machine
