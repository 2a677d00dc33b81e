"""WADO-RS (PS3.18 10.4): objects as ``multipart/related``, metadata, bulk data and frames.

Objects are streamed part by part as the PACS delivers them: the series is asked for in one
retrieval (:meth:`Federation.warm`), then each instance is opened in the order of the listing,
waits for its own object only, and goes out chunk by chunk from the encrypted store (one
chunk of plaintext in memory at a time). An object that must be converted to the transfer
syntax asked for is held whole while it is converted, one object at a time.

Transfer syntaxes: ``transfer-syntax=*`` returns every object as stored. Without it (or with
Explicit VR Little Endian) objects stored in a native syntax are re-encoded by pydicom;
a compressed object is not decompressed (406 for a single instance; for a study or series
the response, already under way, is aborted). Any other syntax asked for is served when it is
the stored one, and 406 otherwise.
"""

from __future__ import annotations

import io
import logging
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from mdm.errors import MdmError
from mdm.namespace.bridge import OpenFile

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
NATIVE = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, "1.2.840.10008.1.2.2"}
_PARAM = re.compile(r';\s*([A-Za-z0-9_-]+)\s*=\s*("([^"]*)"|[^;,\s]*)')


class NotAcceptable(ValueError):
    """No representation the client accepts can be produced (406)."""


@dataclass(frozen=True)
class Wanted:
    """What a client accepts: a media type of the parts and a transfer syntax (``*``: as
    stored)."""

    part_type: str
    syntax: str


def parse_accept(header: str | None, part_type: str, default_syntax: str) -> Wanted:
    """The first acceptable choice of an ``Accept`` header for a multipart answer whose parts
    are ``part_type``; ``type=`` may be quoted or not. NotAcceptable when none is."""
    if not header or not header.strip():
        return Wanted(part_type, default_syntax)
    for item in header.split(","):
        item = item.strip()
        media = item.split(";", 1)[0].strip().lower()
        params = {m.group(1).lower(): (m.group(3) or m.group(2)) for m in _PARAM.finditer(item)}
        if params.get("q") in ("0", "0.0", "0.00", "0.000"):
            continue
        if media in ("*/*", "multipart/*"):
            return Wanted(part_type, default_syntax)
        if media != "multipart/related":
            continue
        t = params.get("type", part_type).strip('"').lower()
        if t not in (part_type, "*/*"):
            continue
        return Wanted(part_type, params.get("transfer-syntax", default_syntax).strip('"'))
    raise NotAcceptable(f"none of {header!r} can be served: multipart/related; type={part_type}")


class OpenFileIO(io.RawIOBase):
    """A seekable, read-only file over an :class:`OpenFile` (for pydicom)."""

    def __init__(self, f: OpenFile) -> None:
        self.f = f
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.f.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.f.read_view(self.pos, len(buf))
        n = len(data)
        memoryview(buf)[:n] = data
        self.pos += n
        return n


def stored_syntax(f: OpenFile) -> str:
    """The transfer syntax in the object's Part-10 header."""
    ds = dcmread(OpenFileIO(f), stop_before_pixels=True, specific_tags=[(0x0008, 0x0016)])
    return str(ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian))


def chunks(f: OpenFile) -> Iterator[memoryview]:
    """The object's bytes, one store chunk at a time."""
    off = 0
    while off < f.size:
        part = f.read_view(off, min(CHUNK, f.size - off))
        if not part:
            raise OSError("object ended early")
        off += len(part)
        yield part


def converted(f: OpenFile, syntax: str) -> bytes:
    """The object re-encoded in the native ``syntax`` (NotAcceptable when it cannot be)."""
    ds = dcmread(OpenFileIO(f))
    have = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if have not in NATIVE or syntax not in NATIVE:
        raise NotAcceptable(f"an object stored as {have} cannot be served as {syntax}")
    uid = UID(syntax)
    ds.file_meta.TransferSyntaxUID = uid
    out = io.BytesIO()
    ds.save_as(out, implicit_vr=uid.is_implicit_VR, little_endian=uid.is_little_endian)
    return out.getvalue()


def boundary() -> str:
    """A fresh multipart boundary."""
    return "mdm-" + secrets.token_hex(16)


def part_header(bnd: str, content_type: str, extra: str = "") -> bytes:
    """The delimiter and headers of one part."""
    return f"--{bnd}\r\nContent-Type: {content_type}\r\n{extra}\r\n".encode()


def closing(bnd: str) -> bytes:
    """The close delimiter."""
    return f"\r\n--{bnd}--\r\n".encode()


async def dicom_parts(
    opened: AsyncIterator[OpenFile], wanted: Wanted, bnd: str
) -> AsyncIterator[bytes]:
    """The body of a multipart/related application/dicom answer, object after object."""
    first = True
    try:
        async for part in _parts(opened, wanted, bnd):
            first = False
            yield part
    except MdmError as e:
        # The status line is long gone: the connection is aborted (the server sees the
        # exception), so a client never takes a cut answer for a whole one.
        log.warning("dicomweb: a streamed answer was aborted: %s", e)
        raise StreamAborted(str(e)) from None
    if first:
        yield b""
    yield closing(bnd)


class StreamAborted(Exception):
    """A streamed answer that cannot be finished (its connection is aborted)."""


async def _parts(opened: AsyncIterator[OpenFile], wanted: Wanted, bnd: str) -> AsyncIterator[bytes]:
    first = True
    async for f in opened:
        try:
            have = stored_syntax(f)
            if wanted.syntax in ("*", have):
                body: Iterator[memoryview] | None = chunks(f)
                ts, whole = have, b""
            else:
                body, ts, whole = None, wanted.syntax, converted(f, wanted.syntax)
            yield (b"" if first else b"\r\n") + part_header(
                bnd, f"application/dicom; transfer-syntax={ts}"
            )
            first = False
            if body is None:
                yield whole
            else:
                for piece in body:
                    yield bytes(piece)
        finally:
            f.release()


def frames_of(ds: Dataset, numbers: list[int]) -> tuple[list[bytes], str]:
    """Frames ``numbers`` (1-based) of an image, as stored; (frames, transfer syntax)."""
    if "PixelData" not in ds:
        raise LookupError("the instance has no pixel data")
    ts = UID(str(ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian)))
    n = int(ds.get("NumberOfFrames", 1) or 1)
    for k in numbers:
        if not 1 <= k <= n:
            raise LookupError(f"frame {k} out of range (1-{n})")
    data: bytes = ds.PixelData
    if ts.is_encapsulated:
        frames = list(generate_frames(data, number_of_frames=n))
        return [frames[k - 1] for k in numbers], str(ts)
    rows, cols = int(ds.Rows), int(ds.Columns)
    spp, bits = int(ds.get("SamplesPerPixel", 1)), int(ds.BitsAllocated)
    size = rows * cols * spp * bits // 8
    return [data[(k - 1) * size : k * size] for k in numbers], str(ts)
