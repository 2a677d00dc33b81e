"""Data for the DICOMweb tests: generated studies and compressed objects kept as encoded."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from mdm_demo.localpacs import LocalOrthanc
from mdm_demo.synth import GeneratedInstance, generate

COMPRESSED = (
    "MR_small_RLE.dcm",  # RLE Lossless
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS Lossless
    "examples_jpeg2k.dcm",  # JPEG 2000
)


def generated() -> list[GeneratedInstance]:
    """Two patients, each a study of a 5-slice CT and a 3-slice MR series."""
    return generate(None, patients=2, seed=1313, ct_slices=5, mr_slices=3, rows=32, cols=32)


def compressed_series() -> tuple[str, str, list[tuple[str, str, bytes]]]:
    """(study UID, series UID, [(SOP UID, transfer syntax, Part-10 bytes)]): pydicom's
    compressed samples under fresh UIDs in one series, their pixel data left as encoded."""
    study, series = generate_uid(), generate_uid()
    out: list[tuple[str, str, bytes]] = []
    for i, name in enumerate(COMPRESSED):
        path = get_testdata_file(name)
        assert path is not None, name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
        sop = generate_uid()
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName = "CMPSAMPLE", "Compressed^Samples"
        ds.InstanceNumber = i + 1
        ds.Modality = "MR"
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append((sop, str(ds.file_meta.TransferSyntaxUID), buf.getvalue()))
    return study, series, out


Compressed = tuple[str, str, list[tuple[str, str, bytes]]]


@contextmanager
def dicomweb_orthanc(
    workdir: Path,
) -> Iterator[tuple[LocalOrthanc, list[GeneratedInstance], Compressed]]:
    """An Orthanc with its DICOMweb plugin holding :func:`generated` studies (their PHI
    remembered by the log checks) and the :func:`compressed_series`; stopped on exit."""
    from tests.phi import remember_phi

    server = LocalOrthanc(
        workdir, name="WebSite", aet="WEBSITE", dicomweb=True, die_with_parent=True
    )
    server.start()
    try:
        instances = generated()
        remember_phi(instances)
        server.upload(instances)
        comp = compressed_series()
        server.upload(data for _, _, data in comp[2])
        yield server, instances, comp
    finally:
        server.stop()
