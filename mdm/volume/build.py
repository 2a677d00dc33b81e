"""Building a NIfTI-1 volume and its BIDS sidecar from the instances of one series, in memory.

A pure library: pydicom datasets in, ``(nii.gz bytes, sidecar bytes)`` out, or
:class:`NotAVolume` with a reason. Nothing is written to disk (the plaintext stays in memory;
the caller encrypts the result into the store). The NIfTI image is written by nibabel.

Geometry (DICOM PS3.3 C.7.6.2.1.1, NIfTI-1 ``qform``/``sform``): DICOM patient coordinates
are LPS, NIfTI world coordinates RAS, so the affine is ``diag(-1, -1, 1) @ M`` where ``M``
maps voxel ``(i, j, k)`` = (column, row, slice) to LPS::

    x = IPP[0] + i * dc * r + j * dr * c + k * ds * n

``r`` and ``c`` are the row and column direction cosines of ImageOrientationPatient, ``dc``/
``dr`` the column and row spacing (PixelSpacing is row spacing first), ``n`` the unit vector
from the first slice to the last, ``ds`` the spacing between slice positions. Slices are
sorted by their position along ``r x c``. The array is stored as ``data[i, j, k]`` (the
pixel array transposed, in Fortran order as NIfTI stores it), stored values unchanged with
the rescale slope and intercept in ``scl_slope``/``scl_inter`` (as dcm2niix does), so
``get_fdata`` gives the rescaled values.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nibabel
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

nib: Any = nibabel  # untyped library

BUILDER_VERSION = 1
"""Bumped when the output of the builder changes: it is part of every volume's derived UID,
so volumes built by an older builder are neither served nor reused (they age out by LRU)."""

GZIP_LEVEL = 1
"""zlib level of the .nii.gz: 1 compresses a CT series about as well as 6 in a third of the
time, and the build is on the reader's path."""

# Single-frame image storage classes whose instances stack into a volume.
VOLUME_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image",
    "1.2.840.10008.5.1.4.1.1.128": "PET Image",
    "1.2.840.10008.5.1.4.1.1.20": "NM Image",
}
MULTIFRAME_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image",
    "1.2.840.10008.5.1.4.1.1.130": "Enhanced PET Image",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image",
}
VOLUME_MODALITIES = frozenset({"CT", "MR", "PT", "NM"})

ORIENTATION_TOLERANCE = 1e-4
"""Largest difference between two slices' direction cosines that is still one orientation."""
SPACING_TOLERANCE = 0.01
"""Largest relative difference between two slice gaps that is still one spacing (dcm2niix
warns from about the same)."""


class NotAVolume(Exception):
    """The series does not form one volume. ``reason`` names no patient data (codes and
    numbers only): it goes to the log and to ``.metadata.json``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def catalog_reason(series_attrs: dict[str, str], sop_classes: Sequence[str]) -> str | None:
    """Why a series cannot form a volume, from what the catalog knows without retrieval (its
    C-FIND attributes and, if its instances were listed, their SOP classes); None if it may.

    The rule that decides what ``ls`` shows: an image modality, more than one instance when
    the count is known, and (when known) one single-frame image storage class."""
    modality = series_attrs.get("Modality", "")
    if modality not in VOLUME_MODALITIES:
        return f"modality {modality or 'unknown'} does not form volumes"
    count = series_attrs.get("NumberOfSeriesRelatedInstances", "").strip()
    if count.isdigit() and int(count) < 2:
        return "a single instance is not a volume"
    classes = set(sop_classes)
    if len(sop_classes) == 1:
        return "a single instance is not a volume"
    if len(classes) > 1:
        return "instances of several SOP classes"
    for uid in classes:
        if uid in MULTIFRAME_SOP_CLASSES:
            return f"multi-frame {MULTIFRAME_SOP_CLASSES[uid]} is not supported"
        if uid not in VOLUME_SOP_CLASSES:
            return f"SOP class {uid} is not a single-frame image class"
    return None


@dataclass(frozen=True)
class Volume:
    """A built volume: the .nii.gz and the sidecar (both plaintext, in memory)."""

    nifti: bytes
    sidecar: bytes
    shape: tuple[int, ...]


def _floats(ds: Dataset, keyword: str, n: int) -> npt.NDArray[np.float64]:
    v = ds.get(keyword)
    if v is None:
        raise NotAVolume(f"an instance lacks {keyword}")
    try:
        out = np.array([float(x) for x in v], dtype=np.float64)
    except (TypeError, ValueError):
        raise NotAVolume(f"an instance has a malformed {keyword}") from None
    if out.shape != (n,):
        raise NotAVolume(f"an instance has a malformed {keyword}")
    return out


def _scale(ds: Dataset) -> tuple[float, float]:
    try:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        inter = float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        raise NotAVolume("an instance has a malformed rescale") from None
    return slope, inter


def build_volume(datasets: Sequence[Dataset]) -> Volume:
    """Stack the instances of one series into a NIfTI-1 volume; NotAVolume if they do not
    form one (module docstring for the geometry). Consumes the datasets' pixel data (each
    slice's is dropped once copied, to bound memory)."""
    if len(datasets) < 2:
        raise NotAVolume("a single instance is not a volume")
    first = datasets[0]
    for ds in datasets:
        frames = ds.get("NumberOfFrames")
        if frames is not None and str(frames).strip() not in ("", "1"):
            raise NotAVolume("multi-frame instances are not supported")
        if "PixelData" not in ds:
            raise NotAVolume("an instance has no pixel data")
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise NotAVolume("colour images are not supported")
    iop = _floats(first, "ImageOrientationPatient", 6)
    spacing = _floats(first, "PixelSpacing", 2)
    rows, cols = int(first.Rows), int(first.Columns)
    for ds in datasets[1:]:
        if np.abs(_floats(ds, "ImageOrientationPatient", 6) - iop).max() > ORIENTATION_TOLERANCE:
            raise NotAVolume("mixed slice orientations")
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise NotAVolume("mixed image sizes")
        if np.abs(_floats(ds, "PixelSpacing", 2) - spacing).max() > 1e-4:
            raise NotAVolume("mixed pixel spacings")
    r, c = iop[:3], iop[3:]
    normal = np.cross(r, c)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise NotAVolume("malformed ImageOrientationPatient")
    pos = [_floats(ds, "ImagePositionPatient", 3) for ds in datasets]
    order = sorted(range(len(datasets)), key=lambda k: float(np.dot(pos[k], normal)))
    dist = np.array([float(np.dot(pos[k], normal)) for k in order])
    gaps = np.diff(dist)
    if gaps.min() < 1e-3:
        raise NotAVolume("several instances at one slice position (more than one volume)")
    ds_mm = float(gaps.mean())
    if np.abs(gaps - ds_mm).max() > SPACING_TOLERANCE * ds_mm:
        raise NotAVolume("inconsistent slice spacing")
    sidecar = sidecar_of(datasets[order[0]], ds_mm)
    p0, pn = pos[order[0]], pos[order[-1]]
    step = (pn - p0) / (len(order) - 1)
    if np.linalg.norm(np.cross(step / np.linalg.norm(step), normal)) > 1e-2:
        # Slices not stacked along their normal: a gantry tilt; resampling is not ours to do.
        raise NotAVolume("slices are not stacked along their normal (gantry tilt)")
    scales = {_scale(ds) for ds in datasets}
    per_slice = len(scales) > 1
    # One array in NIfTI's (Fortran) order, filled slice by slice; each slice's DICOM pixel
    # bytes are dropped once copied, so the peak is about twice the pixel bytes, not four.
    data: npt.NDArray[Any] | None = None
    high = 0
    for n, k in enumerate(order):
        ds = datasets[k]
        try:
            plane = np.asarray(ds.pixel_array)
        except Exception as e:  # pydicom raises many types for undecodable pixel data
            raise NotAVolume(f"pixel data cannot be decoded ({type(e).__name__})") from None
        if plane.shape != (rows, cols):
            raise NotAVolume("malformed pixel data")
        if data is None:
            dtype = np.float32 if per_slice else plane.dtype
            data = np.empty((cols, rows, len(order)), dtype=dtype, order="F")
        if per_slice:  # per-slice rescale: store the rescaled values themselves
            s, i = _scale(ds)
            data[:, :, n] = plane.T.astype(np.float32) * np.float32(s) + np.float32(i)
        else:
            data[:, :, n] = plane.T
            if plane.dtype == np.uint16:
                high = max(high, int(plane.max(initial=0)))
        del plane, ds.PixelData
        with contextlib.suppress(AttributeError):
            ds._pixel_array = None  # pydicom's cached decoded array
    assert data is not None
    slope, inter = (1.0, 0.0) if per_slice else next(iter(scales))
    if data.dtype == np.uint16 and high < 32768:
        data = data.view(np.int16)  # what dcm2niix writes for 12-bit unsigned data (no copy)
    lps = np.eye(4)
    lps[:3, 0] = r * spacing[1]
    lps[:3, 1] = c * spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = p0
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    img = nib.Nifti1Image(data, affine)
    hdr = img.header
    hdr.set_slope_inter(slope, inter)
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_qform(affine, code=1)  # scanner coordinates
    hdr.set_sform(affine, code=1)
    hdr["descrip"] = f"mdm-bridge volume v{BUILDER_VERSION}".encode()
    # Streamed into gzip (no uncompressed copy); no file name, no mtime in the gzip header:
    # the same series always gives the same bytes.
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=GZIP_LEVEL, mtime=0) as gz:
        img.to_file_map({"image": nib.FileHolder(fileobj=gz)})
    nifti = buf.getvalue()
    return Volume(nifti=nifti, sidecar=sidecar, shape=tuple(int(x) for x in data.shape))


# -------------------------------------------------------------------------- the sidecar
# BIDS names dcm2niix writes, from DICOM keywords: acquisition parameters only. No patient
# attributes at all (dcm2niix's default -ba y omits them too). Attributes that can identify
# (institution, station, serial number, times) come from the served dataset: in a
# de-identified view they are there only if the view's options retained them.
_SIDECAR_TEXT = (
    ("Modality", "Modality"),
    ("Manufacturer", "Manufacturer"),
    ("ManufacturerModelName", "ManufacturersModelName"),
    ("InstitutionName", "InstitutionName"),
    ("InstitutionalDepartmentName", "InstitutionalDepartmentName"),
    ("InstitutionAddress", "InstitutionAddress"),
    ("StationName", "StationName"),
    ("DeviceSerialNumber", "DeviceSerialNumber"),
    ("BodyPartExamined", "BodyPartExamined"),
    ("PatientPosition", "PatientPosition"),
    ("SoftwareVersions", "SoftwareVersions"),
    ("MRAcquisitionType", "MRAcquisitionType"),
    ("SeriesDescription", "SeriesDescription"),
    ("ProtocolName", "ProtocolName"),
    ("ScanningSequence", "ScanningSequence"),
    ("SequenceVariant", "SequenceVariant"),
    ("ScanOptions", "ScanOptions"),
    ("SequenceName", "SequenceName"),
    ("ImageType", "ImageType"),
    ("ConvolutionKernel", "ConvolutionKernel"),
    ("ImagedNucleus", "ImagedNucleus"),
    ("RescaleType", "RescaleType"),
)
_SIDECAR_NUMBERS = (
    ("MagneticFieldStrength", "MagneticFieldStrength", 1.0),
    ("ImagingFrequency", "ImagingFrequency", 1.0),
    ("SeriesNumber", "SeriesNumber", 1.0),
    ("AcquisitionNumber", "AcquisitionNumber", 1.0),
    ("SliceThickness", "SliceThickness", 1.0),
    ("EchoTime", "EchoTime", 0.001),  # BIDS: seconds
    ("RepetitionTime", "RepetitionTime", 0.001),
    ("InversionTime", "InversionTime", 0.001),
    ("FlipAngle", "FlipAngle", 1.0),
    ("EchoTrainLength", "EchoTrainLength", 1.0),
    ("KVP", "KVP", 1.0),
    ("XRayTubeCurrent", "XRayTubeCurrent", 1.0),
    ("ExposureTime", "ExposureTime", 1.0),
)


def _text(v: object) -> str | list[str]:
    if isinstance(v, str):
        return v
    if isinstance(v, list | tuple) or type(v).__name__ == "MultiValue":
        return [str(x) for x in v]  # type: ignore[attr-defined]
    return str(v)


def sidecar_of(ds: Dataset, slice_spacing: float) -> bytes:
    """The BIDS sidecar of a volume, from its first slice (module comment above)."""
    doc: dict[str, Any] = {}
    for kw, name in _SIDECAR_TEXT:
        v = ds.get(kw)
        if v is not None and str(v).strip() and str(v) != "ANONYMIZED":
            doc[name] = _text(v)
    for kw, name, factor in _SIDECAR_NUMBERS:
        v = ds.get(kw)
        try:
            if v is not None and str(v).strip():
                x = float(v) * factor
                doc[name] = int(x) if x.is_integer() and factor == 1.0 else round(x, 6)
        except (TypeError, ValueError):
            continue
    t = ds.get("AcquisitionTime")
    if t is not None and str(t).strip() and set(str(t)) - {"0", "."}:
        # A time the view shows (kept or shifted with its date); a dummy 000000 is not one.
        s = str(t)
        doc["AcquisitionTime"] = f"{s[0:2]}:{s[2:4]}:{s[4:6]}{s[6:]}" if len(s) >= 6 else s
    doc["SpacingBetweenSlices"] = round(slice_spacing, 6)
    iop = ds.get("ImageOrientationPatient")
    if iop is not None:
        doc["ImageOrientationPatientDICOM"] = [float(x) for x in iop]
    doc["ConversionSoftware"] = "mdm-bridge"
    doc["ConversionSoftwareVersion"] = f"volume v{BUILDER_VERSION}"
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()
