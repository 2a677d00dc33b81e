"""The check of a received object before anything is stored: it must parse, completely, and
be exactly the instance asked for.

A hostile or broken PACS can answer a retrieval with bytes that are not the object asked for:
garbage, a truncated data set, another instance under the requested UID, a second SOP
Instance UID after the right one, elements that never end, sequences nested thousands deep,
or a deflate bomb. pydicom decodes lazily and forgives much of this (and recurses once per
nesting level), so the data set is walked here instead, element header by element header,
without decoding values and without recursion:

* every element lies within its container, and each defined-length sequence and item ends
  exactly where its length says; every undefined-length one is closed by its delimiter;
* tags strictly ascend within each data set (no duplicate element, hence one SOP Instance UID
  at the top level), no file-meta (0002) or command (0000) group in the data set;
* explicit VRs are known VRs, fixed-size values have a length that is a multiple of their
  size, undefined lengths only where PS3.5 allows them (sequences, UN, encapsulated pixel
  data), nesting at most :data:`MAX_DEPTH` items deep;
* the top-level SOP Instance UID is the one requested (byte for byte, trailing padding
  aside), the SOP Class UID the one of the C-STORE, and native pixel data is as long as
  Rows x Columns x Samples x Frames x Bits Allocated says;
* a deflated data set is inflated at most to :data:`MAX_INFLATE_RATIO` times its compressed
  size and never beyond :data:`MAX_INFLATED` bytes, one at a time per process.

Values are not decoded (the object is served as the PACS encoded it). The cost is about a
microsecond per element: ~0.1 ms for a CT slice (docs/DICOM.md, Validation).
"""

from __future__ import annotations

import re
import struct
import threading
import zlib
from typing import Literal

from pydicom._dicom_dict import DicomDictionary

from mdm.errors import IntegrityError

MAX_DEPTH = 64
"""Deepest item nesting accepted (real objects rarely pass 6)."""
MAX_INFLATE_RATIO = 100
"""A deflated data set may inflate to at most this many times its compressed size..."""
MAX_INFLATED = 128 << 20
"""... and never beyond this many bytes."""

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1")

_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
_SOP_CLASS = 0x00080016
_SOP_UID = 0x00080018
_PIXEL_DATA = 0x7FE00010
_SAMPLES = 0x00280002
_FRAMES = 0x00280008
_ROWS = 0x00280010
_COLUMNS = 0x00280011
_BITS = 0x00280100
_CAPTURED = frozenset((_SOP_CLASS, _SOP_UID, _SAMPLES, _FRAMES, _ROWS, _COLUMNS, _BITS))

_LONG_VRS = frozenset(
    (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
)
_SHORT_VRS = frozenset(
    (
        *(b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO"),
        *(b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"),
    )
)
_SIZES = {
    b"AT": 4,
    b"FL": 4,
    b"FD": 8,
    b"SL": 4,
    b"SS": 2,
    b"UL": 4,
    b"US": 2,
    b"SV": 8,
    b"UV": 8,
    b"OD": 8,
    b"OF": 4,
    b"OL": 4,
    b"OV": 8,
    b"OW": 2,
}
# Implicit VR: which tags hold sequences (the only VR the walk needs to know).
_SQ_TAGS = frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")

_UID_RE = re.compile(rb"[0-9]+(\.[0-9]+)*")
_INFLATE_LOCK = threading.Lock()

# Frame kinds of the walk.
_DATASET, _SEQUENCE, _FRAGMENTS = 0, 1, 2


class _Bad(Exception):
    """The reason an object is refused (no PACS bytes in it)."""


class _Head:
    """The top-level values the checks need."""

    __slots__ = ("pixel_length", "values")

    def __init__(self) -> None:
        self.values: dict[int, bytes] = {}
        self.pixel_length = -1


def printable_uid(raw: bytes | str) -> str:
    """A PACS-supplied UID as it may appear in a log line: itself if it is a well-formed UID,
    otherwise a placeholder (it could carry anything)."""
    b = raw.encode("ascii", "replace") if isinstance(raw, str) else bytes(raw)
    return b.decode("ascii") if len(b) <= 64 and _UID_RE.fullmatch(b) else "an invalid UID"


def check_object(
    data: bytes | bytearray | memoryview,
    sop_uid: str,
    site: str,
    *,
    dataset_offset: int = 0,
    transfer_syntax: str = "",
    sop_class_uid: str = "",
) -> None:
    """Raise IntegrityError unless ``data`` is a well-formed Part-10 object of instance
    ``sop_uid`` (and, if given, of class ``sop_class_uid``).

    ``dataset_offset`` and ``transfer_syntax``: where the data set starts and how it is
    encoded, when the caller wrote the file meta itself (the receiver does, from the C-STORE
    request); otherwise both are read from the file meta. The message names the site, the
    UID and the reason, never a value sent by the PACS other than a well-formed UID.
    """
    try:
        _check(memoryview(data), sop_uid, dataset_offset, transfer_syntax, sop_class_uid)
    except _Bad as e:
        raise IntegrityError(f"site {site} sent a malformed object for {sop_uid}: {e}") from None
    except _Other as e:
        raise IntegrityError(f"site {site} sent another object ({e}) for {sop_uid}") from None


class _Other(Exception):
    """The object parses but is another instance (the argument says which, printable)."""


def _check(buf: memoryview, sop_uid: str, offset: int, syntax: str, sop_class_uid: str) -> None:
    if buf.nbytes < 132 or bytes(buf[128:132]) != b"DICM":
        raise _Bad("no DICM header")
    if offset < 132 or not syntax:
        offset, syntax, meta_uid = _file_meta(buf)
        if meta_uid is not None and _uid_value(meta_uid) != sop_uid.encode():
            raise _Other(f"file meta names {printable_uid(_uid_value(meta_uid))}")
    if offset > buf.nbytes:
        raise _Bad("data set offset past the end")
    body = buf[offset:]
    little, implicit = True, False
    if syntax == IMPLICIT_VR_LE:
        implicit = True
    elif syntax == EXPLICIT_VR_BE:
        little = False
    elif syntax in DEFLATED:
        body = memoryview(_inflate(body))
    elif not _UID_RE.fullmatch(syntax.encode("ascii", "replace")):
        raise _Bad("no usable transfer syntax")
    head = _walk(body, implicit, little)
    _check_head(head, sop_uid, sop_class_uid, little)


def _file_meta(buf: memoryview) -> tuple[int, str, bytes | None]:
    """(end of the file meta, its transfer syntax, its Media Storage SOP Instance UID)."""
    pos, end = 132, buf.nbytes
    syntax = b""
    meta_uid: bytes | None = None
    last = -1
    while pos + 8 <= end:
        group, elem, vr = struct.unpack_from("<HH2s", buf, pos)
        if group != 0x0002:
            break
        tag = elem
        if tag <= last:
            raise _Bad("file meta elements out of order")
        last = tag
        if vr in _LONG_VRS:
            if pos + 12 > end:
                raise _Bad("file meta truncated")
            (length,) = struct.unpack_from("<L", buf, pos + 8)
            start = pos + 12
        elif vr in _SHORT_VRS:
            (length,) = struct.unpack_from("<H", buf, pos + 6)
            start = pos + 8
        else:
            raise _Bad("file meta element with an unknown VR")
        if length == _UNDEFINED or start + length > end:
            raise _Bad("file meta element runs past the end")
        if elem == 0x0010:
            syntax = bytes(buf[start : start + length])
        elif elem == 0x0003:
            meta_uid = bytes(buf[start : start + length])
        pos = start + length
    ts = _uid_value(syntax)
    if not ts or not _UID_RE.fullmatch(ts):
        raise _Bad("file meta without a transfer syntax")
    return pos, ts.decode("ascii"), meta_uid


def _inflate(body: memoryview) -> bytes:
    limit = min(MAX_INFLATED, max(1 << 20, body.nbytes * MAX_INFLATE_RATIO))
    with _INFLATE_LOCK:  # at most one inflated data set in memory per process
        d = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            out = d.decompress(body, limit + 1)
        except zlib.error:
            raise _Bad("deflated data set does not inflate") from None
        if len(out) > limit:
            raise _Bad(
                f"deflated data set inflates past {limit} bytes "
                f"(more than {MAX_INFLATE_RATIO}x, or over {MAX_INFLATED >> 20} MiB)"
            )
        if not d.eof or d.unconsumed_tail:
            raise _Bad("deflated data set truncated")
        if len(d.unused_data) > 1:  # one padding byte keeps the value length even
            raise _Bad("bytes after the deflated data set")
        return out


def _uid_value(raw: bytes) -> bytes:
    """A UI value without its trailing padding (NUL or space), as pydicom reads it."""
    return bytes(raw).rstrip(b"\0 ")


def _walk(buf: memoryview, implicit: bool, little: bool) -> _Head:
    """Walk the data set in ``buf``; return its top-level values of interest."""
    head = _Head()
    end = buf.nbytes
    e = "<" if little else ">"
    unpack_tl = struct.Struct(e + "HHL").unpack_from  # tag, 32-bit length (implicit, items)
    unpack_tv = struct.Struct(e + "HH2s").unpack_from  # tag, explicit VR
    unpack_short = struct.Struct(e + "H").unpack_from
    unpack_long = struct.Struct(e + "L").unpack_from
    # Each frame: [kind, end, bound, implicit, last tag, items]. ``end`` is -1 for an
    # undefined length (closed by a delimiter); ``bound`` is where it must end at the latest.
    stack: list[list[int]] = [[_DATASET, end, end, int(implicit), -1, 0]]
    depth = 0
    pos = 0
    while stack:
        frame = stack[-1]
        kind, fend, bound = frame[0], frame[1], frame[2]
        if pos == fend:
            stack.pop()
            if kind == _DATASET:
                depth -= 1
            continue
        if pos + 8 > bound:
            raise _Bad("truncated element" if fend >= 0 else "sequence or item never closed")
        if kind != _DATASET:
            group, elem, length = unpack_tl(buf, pos)
            tag = group << 16 | elem
            pos += 8
            if tag == _SEQ_END and fend < 0:
                if length:
                    raise _Bad("sequence delimiter with a length")
                if kind == _FRAGMENTS and not frame[5]:
                    raise _Bad("encapsulated pixel data without items")
                stack.pop()
                continue
            if tag != _ITEM:
                raise _Bad("sequence holding something other than items")
            frame[5] += 1
            if kind == _FRAGMENTS:
                if length == _UNDEFINED or pos + length > bound:
                    raise _Bad("pixel data fragment runs past the data set")
                pos += length
                continue
            depth += 1
            if depth > MAX_DEPTH:
                raise _Bad(f"sequences nested deeper than {MAX_DEPTH}")
            if length == _UNDEFINED:
                stack.append([_DATASET, -1, bound, frame[3], -1, 0])
            else:
                if pos + length > bound:
                    raise _Bad("item runs past its sequence")
                stack.append([_DATASET, pos + length, pos + length, frame[3], -1, 0])
            continue
        # A data element of a data set.
        imp = frame[3]
        if imp:
            group, elem, length = unpack_tl(buf, pos)
            tag = group << 16 | elem
            vr = b"SQ" if tag in _SQ_TAGS else b""
            start = pos + 8
        else:
            group, elem, vr = unpack_tv(buf, pos)
            tag = group << 16 | elem
            if vr in _SHORT_VRS:
                (length,) = unpack_short(buf, pos + 6)
                start = pos + 8
            elif vr in _LONG_VRS:
                if pos + 12 > bound:
                    raise _Bad("truncated element")
                (length,) = unpack_long(buf, pos + 8)
                start = pos + 12
            elif tag == _ITEM_END:
                (length,) = unpack_long(buf, pos + 4)
                start = pos + 8
            else:
                raise _Bad(f"element ({group:04X},{elem:04X}) with an unknown VR")
        if tag == _ITEM_END:
            if fend >= 0:
                raise _Bad("item delimiter in a defined-length item")
            if length:
                raise _Bad("item delimiter with a length")
            pos += 8
            stack.pop()
            depth -= 1
            continue
        last = frame[4]
        if tag <= last:
            raise _Bad(
                f"duplicate element ({group:04X},{elem:04X})"
                if tag == last
                else f"elements out of order at ({group:04X},{elem:04X})"
            )
        frame[4] = tag
        if group < 0x0008 or group >= 0xFFFE:
            raise _Bad(f"element ({group:04X},{elem:04X}) not allowed in a data set")
        if length == _UNDEFINED:
            if tag == _PIXEL_DATA and vr in (b"OB", b"OW", b""):
                if depth == 0:
                    head.pixel_length = -2  # encapsulated
                stack.append([_FRAGMENTS, -1, bound, imp, -1, 0])
            elif vr in (b"SQ", b"UN") or imp:
                # PS3.5 6.2.2: an undefined-length UN holds an implicit VR sequence.
                stack.append([_SEQUENCE, -1, bound, int(imp or vr == b"UN"), -1, 0])
            else:
                raise _Bad(f"undefined length on element ({group:04X},{elem:04X})")
            pos = start
            continue
        stop = start + length
        if stop > bound:
            raise _Bad(f"element ({group:04X},{elem:04X}) runs past its container")
        if vr == b"SQ":
            stack.append([_SEQUENCE, stop, stop, imp, -1, 0])
            pos = start
            continue
        size = _SIZES.get(vr)
        if size is not None and length % size:
            raise _Bad(f"element ({group:04X},{elem:04X}) of a length its VR cannot have")
        if depth == 0:
            if tag in _CAPTURED:
                head.values[tag] = bytes(buf[start:stop])
            elif tag == _PIXEL_DATA:
                head.pixel_length = length
        pos = stop
    return head


def _check_head(head: _Head, sop_uid: str, sop_class_uid: str, little: bool) -> None:
    values = head.values
    raw_uid = values.get(_SOP_UID)
    if raw_uid is None:
        raise _Bad("no SOP Instance UID")
    got = _uid_value(raw_uid)
    if got != sop_uid.encode("ascii", "replace"):
        raise _Other(printable_uid(got))
    raw_class = values.get(_SOP_CLASS)
    if raw_class is None:
        raise _Bad("no SOP Class UID")
    if sop_class_uid and _uid_value(raw_class) != sop_class_uid.encode("ascii", "replace"):
        raise _Bad("SOP Class UID differs from the C-STORE's")
    if head.pixel_length < 0:
        return
    order: Literal["little", "big"] = "little" if little else "big"

    def us(tag: int, default: int | None = None) -> int:
        raw = values.get(tag)
        if raw is None or len(raw) != 2:
            if default is not None and raw is None:
                return default
            raise _Bad("pixel data without a valid Rows, Columns or Bits Allocated")
        return int.from_bytes(raw, order)

    rows, cols, bits = us(_ROWS), us(_COLUMNS), us(_BITS)
    samples = us(_SAMPLES, 1)
    frames = 1
    raw_frames = values.get(_FRAMES)
    if raw_frames is not None:
        text = raw_frames.strip(b" \0")
        if not text.isdigit():
            raise _Bad("Number of Frames is not a number")
        frames = int(text)
    expected = rows * cols * samples * frames
    expected = (expected + 7) // 8 if bits == 1 else expected * (bits // 8)
    if head.pixel_length not in (expected, expected + (expected & 1)):
        raise _Bad(f"pixel data of {head.pixel_length} bytes where the image needs {expected}")
