"""Apply the PS3.15 Annex E profile to a DICOM object (or to a dict of catalog attributes).

One walk over the dataset, at every nesting depth, decides one action per element from the
table (:mod:`mdm.deid.profile`) and performs it. The rules the table leaves open, and the
choices made here (docs/DEID.md says why):

* Combined codes keep the attribute present: X/Z -> Z; X/D, X/Z/D, Z/D -> D; X/Z/U* -> U for
  UIDs and sequences (the UIDs inside are remapped), Z otherwise. Without per-IOD module tables
  we cannot tell a type 3 attribute (removable) from a type 1/2 one; the kept form is valid for
  every type, so the object stays valid whatever its IOD.
* D on a sequence empties it (walking its items would keep unlisted text inside them).
* Attributes not in the table are kept, as the standard says, except (fail-safe): private
  attributes (removed unless on the safe list under Retain Safe Private), person names (PN)
  not explicitly K, free text (LT, ST, UT: removed, or scrubbed under Clean Descriptors),
  UIDs (remapped unless Retain UIDs or a well-known UID), public attributes unknown to the
  data dictionary (they may be newer PHI attributes), overlay groups 60xx
  (they can carry burned-in text) and group lengths (stale after editing). Dates (DA, DT) the
  table does not list follow the longitudinal option like those it does: removed when it is
  off, kept when full, shifted in offset mode (no real date next to shifted ones).
* Objects flagged BurnedInAnnotation=YES or RecognizableVisualFeatures=YES, or of a SOP class
  known to carry burned-in text (secondary captures, ultrasound, visible light photographs and
  video) unless flagged BurnedInAnnotation=NO, are refused unless ``allow_burned_in``.

Nothing is returned unless the whole object went through: any failure raises
:class:`DeidRefused` (or its subclass :class:`DeidMalformed`), never a partial output. Error
messages name tags and exception types, never values (values are PHI).
"""

from __future__ import annotations

import datetime as _dt
import errno
import io
import logging
import re
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydicom import dcmread
from pydicom.datadict import (
    dictionary_has_tag,
    dictionary_VR,
    keyword_for_tag,
    repeater_has_tag,
    tag_for_keyword,
)
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filewriter import dcmwrite
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from mdm.deid.profile import Action, ActionMap, DeidOptions, action_map, load_safe_private
from mdm.deid.pseudo import Pseudonymizer
from mdm.errors import MdmError

log = logging.getLogger(__name__)
# pydicom's warnings quote element values word for word (patient data). Installed once, at
# import: ``warnings.catch_warnings`` around each call swapped the process-wide filter list
# and raced with other threads. Warnings attributed to pydicom, or to this module (pydicom
# warns with a stacklevel that points at its caller), are dropped.
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
warnings.filterwarnings("ignore", module=r"mdm\.deid\.engine$")

MAX_DEPTH = 32
"""Deeper nesting than any IOD defines: refuse rather than recurse without bound."""

DUMMY_TEXT = "ANONYMIZED"
DUMMY_PN = "ANONYMOUS"
WELL_KNOWN_ROOT = "1.2.840.10008."
"""UIDs defined by the standard itself (SOP classes, transfer syntaxes, coding schemes...)."""

# UID attributes that name a kind of thing, not an instance: kept whatever their root, so a
# vendor's private SOP class or coding scheme still reads as what it is.
_CLASS_UID_KEYWORDS = frozenset(
    {
        "CodingSchemeUID",
        "MappingResourceUID",
        "ContextGroupExtensionCreatorUID",
        "TemplateExtensionCreatorUID",
        "TemplateExtensionOrganizationUID",
        "PrivateInformationCreatorUID",
        "ImplementationClassUID",
    }
)

# SOP classes that routinely carry burned-in text or recognisable features.
BURNED_IN_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
        "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit SC
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
        "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
        "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound Image (retired)
        "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image
        "1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume
        "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame (retired)
        "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame
        "1.2.840.10008.5.1.4.1.1.77.1.1",  # VL Endoscopic
        "1.2.840.10008.5.1.4.1.1.77.1.1.1",  # Video Endoscopic
        "1.2.840.10008.5.1.4.1.1.77.1.2.1",  # Video Microscopic
        "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL Photographic
        "1.2.840.10008.5.1.4.1.1.77.1.4.1",  # Video Photographic
        "1.2.840.10008.5.1.1.29",  # Hardcopy Grayscale Image (retired)
        "1.2.840.10008.5.1.1.30",  # Hardcopy Color Image (retired)
    }
)

# File meta elements kept (others, e.g. source/sending AE titles, name the site).
_META_KEEP = frozenset(
    {
        0x00020001,  # FileMetaInformationVersion
        0x00020002,  # MediaStorageSOPClassUID
        0x00020003,  # MediaStorageSOPInstanceUID (remapped)
        0x00020010,  # TransferSyntaxUID
        0x00020012,  # ImplementationClassUID
        0x00020013,  # ImplementationVersionName
    }
)

_FREE_TEXT_VRS = frozenset({"LT", "ST", "UT"})
_TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "SH", "ST", "UC", "UT", "UR"})
_STRING_VRS = _TEXT_VRS | {"PN", "DA", "DT", "TM", "AS", "IS", "DS", "UI"}
_BINARY_NUMERIC = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "UV": 8, "SV": 8}
_DATE_FORMATS = ("%Y%m%d", "%Y-%m-%d", "%d/%m/%Y", "%m/%d/%Y", "%d.%m.%Y", "%Y.%m.%d")


class DeidRefused(MdmError):
    """The object may not be served in a de-identified view (the reason says why)."""

    errno = errno.EACCES


class DeidMalformed(DeidRefused):
    """The object cannot be parsed or rewritten, so it cannot be de-identified safely."""

    errno = errno.EIO


@dataclass
class _Ctx:
    options: DeidOptions
    amap: ActionMap
    pseudo: Pseudonymizer
    offset: int | None
    """Days to add to dates (offset mode with a known patient), else None."""
    scrub: re.Pattern[str] | None
    """Identifying strings of this object, for Clean (C) of descriptors."""
    safe: dict[tuple[int, str, int], str]


def _context(ds: Dataset, pseudo: Pseudonymizer, options: DeidOptions, pid: str | None) -> _Ctx:
    offset = None
    if options.retain_longitudinal == "offset" and pid is not None:
        offset = pseudo.date_offset(pid)
    safe = {(s.group, s.creator, s.element): s.vr for s in load_safe_private()}
    ctx = _Ctx(options, action_map(options), pseudo, offset, None, safe)
    if options.clean_descriptors:
        terms: set[str] = set()
        _collect_terms(ds, ctx, terms, 0)
        if terms:
            ordered = sorted(terms, key=len, reverse=True)
            ctx.scrub = re.compile("|".join(re.escape(t) for t in ordered), re.IGNORECASE)
    return ctx


# ---------------------------------------------------------------------------------------------
# Actions


def _values(elem: DataElement) -> list[Any]:
    v = elem.value
    if v is None or v == "":
        return []
    if isinstance(v, MultiValue | list | tuple):
        return list(v)
    return [v]


def _set_values(elem: DataElement, values: list[Any]) -> None:
    if not values:
        elem.value = None
    elif len(values) == 1:
        elem.value = values[0]
    else:
        elem.value = values


def _is_class_uid(keyword: str) -> bool:
    return (
        keyword.endswith("ClassUID")
        or keyword.endswith("TransferSyntaxUID")
        or keyword in _CLASS_UID_KEYWORDS
    )


def _map_uids(elem: DataElement, ctx: _Ctx) -> None:
    out = []
    for v in _values(elem):
        s = str(v).strip().rstrip("\0")
        if not s or s.startswith(WELL_KNOWN_ROOT):
            out.append(s)
        else:
            out.append(ctx.pseudo.uid(s))
    _set_values(elem, out)


def _single(code: str, vr: str) -> Action:
    """One action for a (possibly combined) code: the form that keeps the object valid."""
    if code == "X/Z":
        return Action.ZERO
    if code in ("X/D", "X/Z/D", "Z/D"):
        return Action.DUMMY
    if code == "X/Z/U*":
        return Action.UID if vr in ("UI", "SQ") else Action.ZERO
    return Action(code)


def _default_action(tag: int, elem: DataElement, ctx: _Ctx) -> Action:
    """The action for a public attribute Table E.1-1 does not list."""
    group = tag >> 16
    if 0x6000 <= group <= 0x60FF:
        return Action.REMOVE  # overlays: bitmaps that may spell a name
    if not (dictionary_has_tag(tag) or repeater_has_tag(tag)):
        return Action.REMOVE  # unknown to us: may be a newer identifying attribute
    vr = elem.VR
    if vr == "PN":
        return Action.REMOVE
    if vr == "UI":
        # A class UID names a kind of object (a SOP class, a coding scheme), never a patient.
        keep = ctx.options.retain_uids or _is_class_uid(elem.keyword)
        return Action.KEEP if keep else Action.UID
    if vr in _FREE_TEXT_VRS:
        # Free text can say anything: kept only when cleaned, like the listed descriptors.
        return Action.CLEAN if ctx.options.clean_descriptors else Action.REMOVE
    if vr in ("DA", "DT"):
        # Temporal information is released by the longitudinal option alone, table or not.
        return {"off": Action.REMOVE, "full": Action.KEEP, "offset": Action.CLEAN}[
            ctx.options.retain_longitudinal
        ]
    return Action.KEEP


def _dummy(elem: DataElement, ctx: _Ctx) -> Any:
    vr = elem.VR
    if vr == "PN":
        return DUMMY_PN
    if vr in _TEXT_VRS:
        return DUMMY_TEXT
    if vr == "DA":
        return "19000101"
    if vr == "TM":
        return "000000"
    if vr == "DT":
        return "19000101000000"
    if vr == "AS":
        return "000Y"
    if vr in ("IS", "DS"):
        return "0"
    if vr in ("FL", "FD"):
        return 0.0
    if vr in _BINARY_NUMERIC or vr == "AT":
        return 0
    # OB, OW, OD, OF, OL, OV, UN: a short zero value, a multiple of every word size.
    return b"\0" * 8


def _shift_date(text: str, days: int) -> str | None:
    """``YYYYMMDD`` (or the ACR-NEMA ``YYYY.MM.DD``) moved by ``days``; None if unparseable."""
    t = text.strip()
    if len(t) == 10 and t[4] == "." and t[7] == ".":
        t = t.replace(".", "")
    if len(t) != 8 or not t.isdigit():
        return None
    try:
        d = _dt.date(int(t[:4]), int(t[4:6]), int(t[6:])) + _dt.timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    return f"{d.year:04d}{d.month:02d}{d.day:02d}"


def _shift_datetime(text: str, days: int) -> str | None:
    """DT: the date part moved by ``days``, the time (and offset) kept; None if unparseable."""
    t = text.strip()
    if len(t) >= 8:
        head = _shift_date(t[:8], days)
        return None if head is None else head + t[8:]
    if len(t) in (4, 6) and t.isdigit():
        # Year (or year-month) precision: move the first day of it, keep the precision.
        full = _shift_date(t + ("0101" if len(t) == 4 else "01"), days)
        return None if full is None else full[: len(t)]
    return None


def _shift(elem: DataElement, ctx: _Ctx) -> None:
    if ctx.offset is None:
        elem.value = None  # no patient to key the offset on: dates go
        return
    fn = _shift_date if elem.VR == "DA" else _shift_datetime
    out = []
    for v in _values(elem):
        shifted = fn(str(v), ctx.offset)
        if shifted is None:
            elem.value = None  # one value we cannot shift: drop them all rather than leak one
            return
        out.append(shifted)
    _set_values(elem, out)


def _clean(ds: Dataset, elem: DataElement, ctx: _Ctx, depth: int) -> None:
    vr = elem.VR
    if vr == "SQ":
        _walk_items(elem, ctx, depth)
    elif vr in ("DA", "DT"):
        if ctx.options.retain_longitudinal == "offset":
            _shift(elem, ctx)
        elif ctx.options.retain_longitudinal == "off":
            elem.value = None
    elif vr == "TM":
        pass  # times are kept under the modified-dates option: only the day moves
    elif vr == "PN":
        elem.value = DUMMY_PN
    elif vr in _TEXT_VRS:
        if ctx.scrub is None:
            return
        out = []
        for v in _values(elem):
            s = str(v)
            cleaned = ctx.scrub.sub("*", s)
            if cleaned != s and vr in ("CS", "AE"):
                cleaned = DUMMY_TEXT  # '*' is not a valid CS/AE character
            out.append(cleaned)
        _set_values(elem, out)
    elif vr in ("IS", "DS", "AS", "UI"):
        pass  # numbers and UIDs carry no free text (UIDs are remapped elsewhere)
    else:
        del ds[elem.tag]  # a binary value we cannot inspect


def _walk_items(elem: DataElement, ctx: _Ctx, depth: int) -> None:
    for item in elem.value or []:
        _process(item, ctx, depth + 1)


def _perform(
    ds: Dataset, tag: BaseTag, elem: DataElement, action: Action, ctx: _Ctx, d: int
) -> None:
    vr = elem.VR
    kw = elem.keyword
    if action is Action.KEEP:
        if vr == "SQ":
            _walk_items(elem, ctx, d)
    elif action is Action.REMOVE:
        del ds[tag]
    elif action is Action.ZERO:
        elem.value = Sequence() if vr == "SQ" else None
    elif action is Action.DUMMY:
        if vr == "SQ":
            # A dummy sequence is an empty one: a dummy item would need the IOD's item rules,
            # and walking the items would keep what the table does not list inside them (the
            # Text Value of an SR Content Sequence, the code meaning naming an institution).
            elem.value = Sequence()
        elif vr == "UI":
            _map_uids(elem, ctx)
        elif kw == "PatientID":
            elem.value = ctx.pseudo.patient_id(str(elem.value or ""))
        else:
            elem.value = _dummy(elem, ctx)
    elif action is Action.UID:
        if vr == "UI":
            _map_uids(elem, ctx)
        elif vr == "SQ":
            _walk_items(elem, ctx, d)
        else:
            elem.value = None
    elif action is Action.CLEAN:
        _clean(ds, elem, ctx, d)


def _safe_private(ds: Dataset, tag: BaseTag, ctx: _Ctx) -> bool:
    """Is this private data element on the safe list, with a well-formed value?"""
    creator_tag = Tag(tag.group, tag.element >> 8)
    if creator_tag not in ds:
        return False
    creator = str(ds[creator_tag].value or "").strip()
    vr = ctx.safe.get((tag.group, creator, tag.element & 0xFF))
    if vr is None:
        return False
    elem = ds[tag]
    value = elem.value
    if vr in _BINARY_NUMERIC:
        if elem.VR == vr:
            return True
        return (
            elem.VR == "UN" and isinstance(value, bytes) and len(value) % _BINARY_NUMERIC[vr] == 0
        )
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return False
    text = "\\".join(str(v) for v in _values(elem)) if not isinstance(value, str) else value
    pattern = r"[0-9+\-.eE \\]*" if vr in ("IS", "DS") else r"[A-Z0-9 _\\]*"
    return elem.VR in (vr, "UN") and re.fullmatch(pattern, text.strip("\0 ")) is not None


def _process_private(ds: Dataset, ctx: _Ctx) -> None:
    tags = [t for t in ds.keys() if t.group % 2 == 1]
    kept_blocks: set[tuple[int, int]] = set()
    creators = []
    for t in tags:
        if 0x10 <= t.element <= 0xFF:
            creators.append(t)
        elif t.element > 0xFF and ctx.amap.private == "C" and _safe_private(ds, t, ctx):
            kept_blocks.add((t.group, t.element >> 8))
        else:
            del ds[t]
    for t in creators:
        if (t.group, t.element) not in kept_blocks:
            del ds[t]


def _process(ds: Dataset, ctx: _Ctx, depth: int) -> None:
    """De-identify ``ds`` in place, items of its sequences included."""
    if depth > MAX_DEPTH:
        raise DeidMalformed(f"sequences nested deeper than {MAX_DEPTH} levels")
    for tag in list(ds.keys()):
        if tag.group % 2 == 1:
            continue  # private: once every creator is known (below)
        if tag.element == 0 or tag.group == 0x0002:
            del ds[tag]  # group lengths go stale; file meta belongs in file_meta
            continue
        elem = ds[tag]
        code = ctx.amap.lookup(int(tag))
        action = _default_action(int(tag), elem, ctx) if code is None else _single(code, elem.VR)
        _perform(ds, tag, elem, action, ctx, depth)
    _process_private(ds, ctx)


def _collect_terms(ds: Dataset, ctx: _Ctx, terms: set[str], depth: int) -> None:
    """Every string this object's profile treats as identifying (for cleaning descriptors)."""
    if depth > MAX_DEPTH:
        raise DeidMalformed(f"sequences nested deeper than {MAX_DEPTH} levels")
    for tag in list(ds.keys()):
        elem = ds[tag]
        if elem.VR == "SQ":
            for item in elem.value or []:
                _collect_terms(item, ctx, terms, depth + 1)
            continue
        if elem.VR not in _STRING_VRS or elem.VR == "UI":
            continue
        code = None if tag.group % 2 == 1 else ctx.amap.lookup(int(tag))
        identifying = elem.VR == "PN" or tag.group % 2 == 1 or code not in (None, "K", "C")
        if not identifying:
            continue
        for v in _values(elem):
            s = str(v).strip()
            if not 3 <= len(s) <= 256:
                continue
            terms.add(s)
            if elem.VR == "PN":
                terms.update(p for p in re.split(r"[\^= ,]+", s) if len(p) >= 3)
            if elem.VR == "DA" and len(s) == 8 and s.isdigit():
                try:
                    d = _dt.datetime.strptime(s, "%Y%m%d")
                except ValueError:
                    continue
                terms.update(d.strftime(f) for f in _DATE_FORMATS)


# ---------------------------------------------------------------------------------------------
# Refusal, added attributes, file meta


def check_burned_in(ds: Dataset, options: DeidOptions) -> None:
    """Raise :class:`DeidRefused` if the pixels may show identity and the view does not allow it."""
    if options.allow_burned_in:
        return
    burned = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if burned == "YES":
        raise DeidRefused("object is flagged BurnedInAnnotation=YES (pixels may show identity)")
    if str(ds.get("RecognizableVisualFeatures", "") or "").strip().upper() == "YES":
        raise DeidRefused("object is flagged RecognizableVisualFeatures=YES")
    sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
    if sop_class.strip() in BURNED_IN_SOP_CLASSES and burned != "NO":
        raise DeidRefused(
            f"SOP class {sop_class.strip()} usually carries burned-in text "
            "and the object is not flagged BurnedInAnnotation=NO"
        )


def _add_method(ds: Dataset, options: DeidOptions) -> None:
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = options.method_text()
    items = []
    for value, meaning in options.method_codes():
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = Sequence(items)
    ds.LongitudinalTemporalInformationModified = {
        "off": "REMOVED",
        "full": "UNMODIFIED",
        "offset": "MODIFIED",
    }[options.retain_longitudinal]


def _process_meta(ds: Dataset, ctx: _Ctx) -> None:
    meta = ds.file_meta
    for tag in list(meta.keys()):
        if int(tag) not in _META_KEEP:
            del meta[tag]
    if ds.get("SOPInstanceUID"):
        # Already remapped in the dataset: the meta must name the same instance.
        meta.MediaStorageSOPInstanceUID = UID(str(ds.SOPInstanceUID))
    elif "MediaStorageSOPInstanceUID" in meta and not ctx.options.retain_uids:
        _map_uids(meta["MediaStorageSOPInstanceUID"], ctx)
    if not meta.get("MediaStorageSOPClassUID") and ds.get("SOPClassUID"):
        meta.MediaStorageSOPClassUID = UID(str(ds.SOPClassUID))


_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


class _Walker:
    """Checks that a byte string is a complete encoding: every element's header and value fit,
    every undefined-length sequence and item is closed, and nothing trails. pydicom stops
    quietly at a truncated element; a truncated object must be refused, not served short."""

    def __init__(self, data: bytes, implicit: bool, little: bool) -> None:
        self.data = data
        self.implicit = implicit
        self.order: Literal["little", "big"] = "little" if little else "big"

    def _int(self, pos: int, size: int, order: Literal["little", "big"] | None = None) -> int:
        if pos + size > len(self.data):
            raise DeidMalformed(f"object is truncated at byte {pos}")
        return int.from_bytes(self.data[pos : pos + size], order or self.order)

    def _tag(self, pos: int) -> int:
        return (self._int(pos, 2) << 16) | self._int(pos + 2, 2)

    def header(self, pos: int) -> tuple[int, bytes, int, int]:
        """(tag, VR or b"", value length, position of the value) of the element at ``pos``."""
        tag = self._tag(pos)
        if tag >> 16 == 0xFFFE or self.implicit:
            return tag, b"", self._int(pos + 4, 4), pos + 8
        vr = self.data[pos + 4 : pos + 6]
        if len(vr) < 2:
            raise DeidMalformed(f"object is truncated at byte {pos}")
        if vr in _LONG_VRS:
            return tag, vr, self._int(pos + 8, 4), pos + 12
        return tag, vr, self._int(pos + 6, 2), pos + 8

    def elements(self, pos: int, end: int | None, depth: int) -> int:
        """Walk elements from ``pos`` to ``end`` (or to an item delimiter); the end position."""
        if depth > MAX_DEPTH:
            raise DeidMalformed(f"sequences nested deeper than {MAX_DEPTH} levels")
        limit = len(self.data) if end is None else end
        while pos < limit:
            tag, vr, length, pos = self.header(pos)
            if tag == _ITEM_END:
                return pos
            if length == _UNDEFINED and vr == b"UN":
                # An undefined-length UN is a sequence encoded implicit VR little endian
                # (PS3.5 6.2.2), whatever the transfer syntax.
                pos = _Walker(self.data, implicit=True, little=True).items(pos, depth + 1)
            elif length == _UNDEFINED:
                pos = self.items(pos, depth + 1)
            else:
                pos += length
            if pos > limit:
                raise DeidMalformed(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) is truncated")
        if end is None and depth > 0:
            raise DeidMalformed("an item of undefined length is not closed")
        return pos

    def items(self, pos: int, depth: int) -> int:
        """Walk the items of an undefined-length sequence (or fragments); the end position."""
        while True:
            tag, _vr, length, pos = self.header(pos)
            if tag == _SEQ_END:
                return pos
            if tag != _ITEM:
                raise DeidMalformed(f"expected an item at byte {pos - 8}")
            if length == _UNDEFINED:
                pos = self.elements(pos, None, depth)
            else:
                if pos + length > len(self.data):
                    raise DeidMalformed(f"item at byte {pos - 8} is truncated")
                pos += length


def _check_complete(data: bytes, ds: Dataset) -> None:
    """Refuse an encoding that pydicom read only in part (truncated, unclosed, trailing junk)."""
    pos = 132 if data[128:132] == b"DICM" else 0
    meta = _Walker(data, implicit=False, little=True)
    while pos + 4 <= len(data) and meta._tag(pos) >> 16 == 0x0002:
        _tag, _vr, length, value = meta.header(pos)
        pos = value + length
    if pos > len(data):
        raise DeidMalformed("file meta information is truncated")
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    body = data[pos:]
    if ts == DeflatedExplicitVRLittleEndian:
        try:
            body = zlib.decompress(body, -zlib.MAX_WBITS)
        except zlib.error:
            raise DeidMalformed("deflated dataset does not inflate") from None
    implicit, little = ds.original_encoding
    if implicit is None:
        implicit, little = ts == ImplicitVRLittleEndian, ts != ExplicitVRBigEndian
    if not implicit and len(body) >= 6 and not body[4:6].isalpha():
        implicit = True  # explicit VR announced but implicit found: pydicom switches too
    _Walker(body, implicit=bool(implicit), little=bool(little)).elements(0, len(body), 0)


def _read(data: bytes) -> Dataset:
    """Parse Part-10 bytes; a bare dataset (no preamble) gets file meta built from itself."""
    try:
        ds = dcmread(io.BytesIO(data))
    except InvalidDicomError:
        ds = dcmread(io.BytesIO(data), force=True)
    if "TransferSyntaxUID" not in ds.file_meta:
        enc = ds.original_encoding
        if enc[0] is None:
            raise DeidMalformed("cannot tell the transfer syntax of the object")
        ts = (
            ImplicitVRLittleEndian
            if enc[0]
            else (ExplicitVRLittleEndian if enc[1] else ExplicitVRBigEndian)
        )
        meta = FileMetaDataset(ds.file_meta)
        meta.TransferSyntaxUID = ts
        ds.file_meta = meta
    if not (ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")):
        raise DeidMalformed("object has no SOP Class UID")
    if not (ds.get("SOPInstanceUID") or ds.file_meta.get("MediaStorageSOPInstanceUID")):
        raise DeidMalformed("object has no SOP Instance UID")
    if len(ds) == 0:
        raise DeidMalformed("object has no dataset")
    _check_complete(data, ds)
    # Force every value to parse now, so a malformed element fails here and not half-way.
    for _ in ds.iterall():
        pass
    return ds


def _original_pid(ds: Dataset) -> str:
    return str(ds.get("PatientID", "") or "").strip()


# ---------------------------------------------------------------------------------------------
# Public API


def deidentify_dataset(ds: Dataset, *, secret: bytes, options: DeidOptions) -> None:
    """De-identify a parsed object in place (file meta included); see :func:`deidentify`."""
    pseudo = Pseudonymizer(secret)
    check_burned_in(ds, options)
    ctx = _context(ds, pseudo, options, _original_pid(ds))
    _process(ds, ctx, 0)
    _add_method(ds, options)
    _process_meta(ds, ctx)


def deidentify(data: bytes | memoryview, *, secret: bytes, options: DeidOptions) -> bytes:
    """De-identify a DICOM Part-10 object; Part-10 bytes out, same transfer syntax.

    Raises :class:`DeidRefused` when the view may not serve the object (burned-in text) and
    :class:`DeidMalformed` when it cannot be parsed or rewritten; never returns a partial
    result. Pixel data bytes are left unchanged. ``ValueError`` for a secret under 16 bytes.
    """
    Pseudonymizer(secret)  # validate the secret before anything else
    data = bytes(data)  # a received object may be a view of the receive buffer
    # Reading odd objects warns, and pydicom's warnings quote values (PHI): the filters
    # installed once at import (below the imports) silence them, thread-safely.
    try:
        ds = _read(data)
    except DeidRefused:
        raise
    except Exception as exc:
        raise DeidMalformed(f"not a readable DICOM object ({type(exc).__name__})") from None
    try:
        deidentify_dataset(ds, secret=secret, options=options)
        buf = io.BytesIO()
        dcmwrite(buf, ds, enforce_file_format=True)
    except DeidRefused:
        raise
    except Exception as exc:
        log.debug("de-identification failed: %s", type(exc).__name__)
        raise DeidMalformed(f"object could not be de-identified ({type(exc).__name__})") from None
    return buf.getvalue()


_LEVELS = frozenset({"PATIENT", "STUDY", "SERIES", "IMAGE", "INSTANCE"})


def deidentify_attrs(
    level: str,
    attrs: Mapping[str, str],
    *,
    secret: bytes,
    options: DeidOptions,
    patient_id: str | None = None,
) -> dict[str, str]:
    """The de-identified form of catalog attributes (keyword -> DICOM string value).

    The same walk as :func:`deidentify` runs over a dataset built from ``attrs``, so a
    PatientID, a UID or a shifted date reads the same in a listing as in the served object.
    Keys that are not DICOM keywords, and attributes of binary VRs, are dropped (fail-safe);
    removed attributes are absent from the result, zeroed ones are "". In offset mode the
    patient's original ID (``attrs["PatientID"]`` or ``patient_id``) keys the date offset;
    without it dates are dropped. Multiple values are joined with a backslash.
    """
    if level.upper() not in _LEVELS:
        raise ValueError(f"unknown level {level!r}")
    pseudo = Pseudonymizer(secret)
    ds = Dataset()
    for key, value in attrs.items():
        tag = tag_for_keyword(key)
        if tag is None:
            continue
        vr = dictionary_VR(tag)
        if vr not in _STRING_VRS:
            continue
        text = "" if value is None else str(value)
        parts = text.split("\\") if text else []
        ds.add(DataElement(tag, vr, parts if len(parts) > 1 else (parts[0] if parts else None)))
    pid = attrs.get("PatientID") if patient_id is None else patient_id
    ctx = _context(ds, pseudo, options, None if pid is None else str(pid).strip())
    _process(ds, ctx, 0)
    out: dict[str, str] = {}
    for elem in ds:
        out[elem.keyword or keyword_for_tag(elem.tag)] = "\\".join(str(v) for v in _values(elem))
    return out


def map_uid(uid: str, *, secret: bytes) -> str:
    """The remapped form of one UID (well-known ``1.2.840.10008.`` UIDs map to themselves)."""
    s = uid.strip().rstrip("\0")
    if s.startswith(WELL_KNOWN_ROOT):
        return s
    return Pseudonymizer(secret).uid(s)


def pseudonym(patient_id: str, *, secret: bytes) -> str:
    """The pseudonymous Patient ID of ``patient_id`` under ``secret``."""
    return Pseudonymizer(secret).patient_id(patient_id)
