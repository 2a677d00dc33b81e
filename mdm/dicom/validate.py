"""A cheap check of a received object before it is stored.

A hostile or broken PACS can answer a C-MOVE with bytes that are not the object asked for:
garbage, a truncated dataset, or another instance under the requested UID. Decoding whole
datasets would cost the receive path dearly, so this reads only the elements up to SOP
Instance UID (a fraction of a millisecond) and insists they parse and name the expected
instance. Pixel data and the rest are served as the PACS encoded them.
"""

from __future__ import annotations

import io
import warnings

from pydicom.errors import InvalidDicomError
from pydicom.filereader import dcmread

from mdm.errors import IntegrityError

# pydicom warns (through `warnings`) on a dataset that ends early; here that is just
# a malformed object, reported as an error below.
warnings.filterwarnings("ignore", message="End of file reached before delimiter")
warnings.filterwarnings("ignore", message="Expected explicit VR, but found implicit VR")


def check_object(data: bytes, sop_uid: str, site: str) -> None:
    """Raise IntegrityError unless ``data`` is a Part-10 object of instance ``sop_uid``."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise IntegrityError(f"site {site} sent a malformed object for {sop_uid} (no DICM header)")
    try:
        ds = dcmread(io.BytesIO(data), specific_tags=["SOPInstanceUID"], stop_before_pixels=True)
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
