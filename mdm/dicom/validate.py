"""A cheap check of a received object before it is stored.

A hostile or broken PACS can answer a C-MOVE with bytes that are not the object asked for:
garbage, a truncated dataset, or another instance under the requested UID. Decoding whole
datasets would cost the receive path dearly, so this reads only the file meta and the
dataset's elements up to SOP Instance UID (0008,0018), a few dozen microseconds, and insists
they parse and name the expected instance. Pixel data and the rest are served as the PACS
encoded them.
"""

from __future__ import annotations

import io
import warnings

from pydicom.errors import InvalidDicomError
from pydicom.filereader import data_element_generator, read_partial
from pydicom.tag import BaseTag
from pydicom.uid import UID

from mdm.errors import IntegrityError

# pydicom warns (through `warnings`) on a dataset that ends early; here that is just
# a malformed object, reported as an error below.
warnings.filterwarnings("ignore", message="End of file reached before delimiter")
warnings.filterwarnings("ignore", message="Expected explicit VR, but found implicit VR")


_SOP_UID = 0x00080018


def _past_sop_uid(tag: BaseTag, vr: str | None, length: int) -> bool:
    return bool(tag > _SOP_UID)


def check_object(
    data: bytes,
    sop_uid: str,
    site: str,
    *,
    dataset_offset: int = 0,
    transfer_syntax: str = "",
) -> None:
    """Raise IntegrityError unless ``data`` is a Part-10 object of instance ``sop_uid``.

    ``dataset_offset`` and ``transfer_syntax``: where the dataset starts and how it is
    encoded, when the caller wrote the file meta itself (the receiver does, from the
    C-STORE request): then only the dataset's first elements are read.
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        raise IntegrityError(f"site {site} sent a malformed object for {sop_uid} (no DICM header)")
    syntax = UID(transfer_syntax)
    if dataset_offset >= 132 and syntax.is_transfer_syntax and not syntax.is_deflated:
        got = _sop_uid_of_dataset(data, dataset_offset, syntax, sop_uid, site)
        if got != sop_uid:
            raise IntegrityError(f"site {site} sent another object ({got}) for {sop_uid}")
        return
    try:
        ds = read_partial(io.BytesIO(data), stop_when=_past_sop_uid, specific_tags=[_SOP_UID])
        got = str(ds.get("SOPInstanceUID", "") or "")
        meta = str(ds.file_meta.get("MediaStorageSOPInstanceUID", "") or "")
    except (InvalidDicomError, ValueError, KeyError, EOFError, OSError, NotImplementedError) as e:
        raise IntegrityError(
            f"site {site} sent a malformed object for {sop_uid}: {type(e).__name__}"
        ) from None
    if not got:
        raise IntegrityError(
            f"site {site} sent a malformed object for {sop_uid} (no SOP Instance UID found)"
        )
    if got != sop_uid:
        raise IntegrityError(f"site {site} sent another object ({got}) for {sop_uid}")
    if meta and meta != sop_uid:
        raise IntegrityError(f"site {site} sent a file whose meta names another instance")


def _sop_uid_of_dataset(data: bytes, offset: int, syntax: UID, sop_uid: str, site: str) -> str:
    """SOP Instance UID of the dataset at ``data[offset:]`` (its leading elements only)."""
    fp = io.BytesIO(data)
    fp.seek(offset)
    try:
        for elem in data_element_generator(
            fp, syntax.is_implicit_VR, syntax.is_little_endian, stop_when=_past_sop_uid
        ):
            if elem.tag == _SOP_UID:
                raw = elem.value
                if not isinstance(raw, bytes):
                    break
                return raw.decode("ascii").strip("\0 ")
    except (ValueError, KeyError, EOFError, OSError, NotImplementedError, UnicodeError) as e:
        raise IntegrityError(
            f"site {site} sent a malformed object for {sop_uid}: {type(e).__name__}"
        ) from None
    raise IntegrityError(
        f"site {site} sent a malformed object for {sop_uid} (no SOP Instance UID found)"
    )
