"""WADO-RS: objects of a DICOMweb site, streamed part by part into the bridge's receive path.

A series (or each wanted instance) is asked for as
``multipart/related; type="application/dicom"; transfer-syntax=*``: the objects as the
archive stores them, not re-encoded, so the bytes stored are the archive's bytes. The answer
is read incrementally (``httpx`` response streaming) and split into parts by
``python_multipart.MultipartParser`` (the streaming multipart parser Starlette uses; its
boundary handling is tested there): each complete part is checked and handed to the sink at
once, so at most one object (bounded by :data:`MAX_OBJECT`) is held here whatever the size
of the series. ``dicomweb-client`` was not used for this: it decodes every part into a pydicom
Dataset (object fidelity lost) and reads with ``requests`` without a timeout per read.

Each part must be ``application/dicom``, a Part-10 object whose file meta names an instance
we asked for, and pass :func:`mdm.dicom.validate.check_object` (complete, well-formed, the
instance its meta names) before it reaches the sink, exactly as a C-STORE'd object. A part
the stream ends in the middle of is dropped. The answer is then counted against what was
asked for: a 200 that delivers fewer objects, or a stream cut before its closing boundary, is
an error for what is missing (what did arrive is stored).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Collection, Mapping, Sequence
from email.message import EmailMessage
from urllib.parse import quote

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser

from mdm.config import SiteSettings
from mdm.dicom.receiver import ReceivedObject
from mdm.dicom.validate import check_object, printable_uid
from mdm.dicomweb.transport import client_for, request_error, status_error
from mdm.errors import IntegrityError, MdmError, RetrieveError

log = logging.getLogger(__name__)

ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
MAX_OBJECT = 2 << 30
"""Largest single object (part) accepted; a larger one aborts the retrieval."""
CHUNK = 256 << 10
MAX_PART_HEADERS = 16
MAX_HEADER_LINE = 4096


class IncompleteWado(RetrieveError):
    """The site answered, but not every object asked for arrived (``received`` did)."""

    def __init__(self, message: str, received: set[str]) -> None:
        super().__init__(message)
        self.received = received


def file_meta_uids(data: bytes | bytearray | memoryview) -> tuple[str, str, str]:
    """(SOP Class UID, SOP Instance UID, transfer syntax) from a Part-10 file meta group.

    Only what is needed to route the object is read; :func:`check_object` then checks the
    whole object. Raises IntegrityError without quoting the bytes.
    """
    buf = memoryview(data)
    if buf.nbytes < 144 or bytes(buf[128:132]) != b"DICM":
        raise IntegrityError("not a Part-10 object (no DICM header)")
    pos, end = 132, buf.nbytes
    found: dict[int, str] = {}
    while pos + 8 <= end:
        group, elem, vr = struct.unpack_from("<HH2s", buf, pos)
        if group != 0x0002:
            break
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            if pos + 12 > end:
                break
            (length,) = struct.unpack_from("<L", buf, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", buf, pos + 6)
            start = pos + 8
        if start + length > end or (length > 1024 and elem in (2, 3, 0x10)):
            break
        if elem in (0x0002, 0x0003, 0x0010):
            raw = bytes(buf[start : start + length]).rstrip(b"\0 ")
            found[elem] = raw.decode("ascii", "replace")
        pos = start + length
    if not all(k in found for k in (0x0002, 0x0003, 0x0010)):
        raise IntegrityError("file meta without SOP class, SOP instance or transfer syntax")
    return found[0x0002], found[0x0003], found[0x0010]


class _Parts:
    """Feeds a multipart body to the parser; calls ``on_part(headers, body)`` per whole part."""

    def __init__(self, boundary: str, on_part: Callable[[dict[str, str], bytearray], None]) -> None:
        self.on_part = on_part
        self.headers: dict[str, str] = {}
        self._field = bytearray()
        self._value = bytearray()
        self.body = bytearray()
        self.complete = False
        self.parts = 0
        self.parser = MultipartParser(
            boundary.encode("latin-1"),
            {
                "on_part_begin": self._begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_part_data": self._data,
                "on_part_end": self._end_part,
                "on_end": self._end,
            },
            max_header_count=MAX_PART_HEADERS,
            max_header_size=MAX_HEADER_LINE,
        )

    def _begin(self) -> None:
        self.headers = {}
        self.body = bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self.headers[name] = self._value.decode("latin-1").strip()
        self._field, self._value = bytearray(), bytearray()

    def _data(self, data: bytes, start: int, end: int) -> None:
        if len(self.body) + (end - start) > MAX_OBJECT:
            raise _TooLarge
        self.body += data[start:end]

    def _end_part(self) -> None:
        body, self.body = self.body, bytearray()
        self.parts += 1
        self.on_part(self.headers, body)

    def _end(self) -> None:
        self.complete = True

    def feed(self, chunk: bytes) -> None:
        if self.complete:
            return  # an epilogue after the closing boundary is ignored (RFC 2046)
        self.parser.write(chunk)


class _TooLarge(Exception):
    pass


def _boundary(site: SiteSettings, what: str, content_type: str) -> str:
    msg = EmailMessage()
    msg["content-type"] = content_type
    ctype = msg.get_content_type()
    boundary = msg.get_param("boundary")
    if ctype != "multipart/related" or not isinstance(boundary, str) or not boundary:
        raise RetrieveError(
            f"site {site.name}: {what}: the answer is not multipart/related with a boundary"
        )
    if len(boundary) > 70:  # RFC 2046: at most 70 characters
        raise RetrieveError(f"site {site.name}: {what}: multipart boundary too long")
    return boundary


def _stream_one(
    site: SiteSettings,
    path: str,
    what: str,
    handle: Callable[[dict[str, str], bytearray], None],
) -> None:
    """GET ``path`` as multipart and hand each complete part to ``handle``; raise the bridge's
    error for an HTTP failure, a malformed multipart body or a stream cut short."""
    client = client_for(site)
    try:
        with client.stream(
            "GET", path, headers={"Accept": ACCEPT, "Accept-Encoding": "identity"}
        ) as resp:
            if resp.status_code != 200:
                raise status_error(site, what, resp.status_code)
            parts = _Parts(_boundary(site, what, resp.headers.get("content-type", "")), handle)
            try:
                for chunk in resp.iter_bytes(CHUNK):
                    parts.feed(chunk)
            except FormParserError:
                raise RetrieveError(
                    f"site {site.name}: {what}: malformed multipart answer (wrong boundary or "
                    f"broken part headers) after {parts.parts} part(s)"
                ) from None
            except _TooLarge:
                raise RetrieveError(
                    f"site {site.name}: {what}: a part larger than {MAX_OBJECT >> 20} MiB"
                ) from None
            if not parts.complete:
                raise RetrieveError(
                    f"site {site.name}: {what}: the answer ended before its closing boundary "
                    f"({parts.parts} complete part(s); the partial one is dropped)"
                )
    except MdmError:
        raise
    except Exception as e:
        raise request_error(site, what, e) from None


def wado_retrieve(
    site: SiteSettings,
    *,
    study_uid: str,
    series_uid: str,
    sop_uids: Sequence[str] | None,
    expected: Collection[str],
    sink: Callable[[ReceivedObject], None],
    classes_of: Mapping[str, str] | None = None,
) -> set[str]:
    """Retrieve objects of series ``series_uid`` from ``site`` into ``sink``; the SOP
    Instance UIDs handed to it.

    ``sop_uids=None``: the whole series in one request; otherwise one request per instance.
    Only objects in ``expected`` reach the sink (others are counted and dropped), each once.
    Every one of ``expected`` must arrive, or :class:`IncompleteWado` says how many did not.
    Runs in a worker thread; the sink may block (a bounded write queue slows the reading).
    """
    want = set(expected)
    received: set[str] = set()
    others = 0
    bad: list[str] = []
    classes = classes_of or {}
    base = f"studies/{quote(study_uid)}/series/{quote(series_uid)}"

    def handle(headers: dict[str, str], body: bytearray) -> None:
        nonlocal others
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/dicom":
            raise RetrieveError(f"site {site.name}: WADO-RS sent a part that is not a DICOM object")
        try:
            sop_class, sop_uid, syntax = file_meta_uids(body)
        except IntegrityError as e:
            bad.append(f"site {site.name} sent a malformed object: {e}")
            log.warning("%s", bad[-1])
            return
        if sop_uid not in want or sop_uid in received:
            others += 1
            return
        try:
            check_object(body, sop_uid, site.name, sop_class_uid=classes.get(sop_uid, ""))
        except IntegrityError as e:
            bad.append(str(e))
            log.warning("%s", e)
            return
        sink(
            ReceivedObject(
                sop_uid=sop_uid,
                sop_class_uid=sop_class,
                transfer_syntax=syntax,
                data=memoryview(body),
                calling_aet="",
            )
        )
        received.add(sop_uid)

    try:
        if sop_uids is None:
            _stream_one(site, base, "WADO-RS series retrieval", handle)
        else:
            for uid in sop_uids:
                if uid in received:
                    continue
                _stream_one(
                    site, f"{base}/instances/{quote(uid)}", "WADO-RS instance retrieval", handle
                )
    except RetrieveError as e:
        if isinstance(e, IncompleteWado):
            raise
        raise IncompleteWado(str(e), set(received)) from None
    missing = want - received
    if missing:
        why = f"; {bad[0]}" if bad else ""
        extra = f", {others} object(s) not asked for dropped" if others else ""
        example = printable_uid(sorted(missing)[0])
        raise IncompleteWado(
            f"site {site.name}: WADO-RS delivered {len(want) - len(missing)} of {len(want)} "
            f"object(s) asked for (missing e.g. {example}{extra}){why}",
            set(received),
        )
    if others:
        log.info("site %s: %d object(s) not asked for were dropped", site.name, others)
    return received


def per_instance(sop_uids: Sequence[str], series_size: int) -> list[str] | None:
    """The instances to ask for one by one, or None to ask for the whole series (and drop
    what is not wanted): a series request when at least half of the series is wanted, as
    one stream beats that many requests."""
    if len(sop_uids) > 1 and series_size > 0 and 2 * len(sop_uids) >= series_size:
        return None
    return list(sop_uids)
