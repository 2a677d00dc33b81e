"""What the bridge asks a C-FIND for at each level, and how an answer becomes attributes.

One module for the mount's catalog sync (:mod:`mdm.catalog.sync`), ``mdm find``, ``policy
explain`` and ``reidentify``: the same keys, the same flattening of multi-valued attributes,
so the attributes a policy matches on are the same whichever command asked.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydicom.dataset import Dataset

STUDY_KEYS = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "StudyDescription",
    "AccessionNumber",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
    "ClinicalTrialProtocolID",
)
SERIES_KEYS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "NumberOfSeriesRelatedInstances",
)
IMAGE_KEYS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
)
PATIENT_KEYS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex")


def dataset_attrs(ds: Dataset, keys: Sequence[str]) -> dict[str, str]:
    """The non-empty values of ``keys`` in a C-FIND answer, multi-values joined by ``\\``."""
    out: dict[str, str] = {}
    for k in keys:
        v = ds.get(k)
        if v is None or v == "":
            continue
        if isinstance(v, list | tuple) or type(v).__name__ == "MultiValue":
            out[k] = "\\".join(str(x) for x in v)
        else:
            out[k] = str(v)
    return out


def query_dataset(level: str, keys: Sequence[str], **filters: str) -> Dataset:
    """A C-FIND identifier at ``level`` asking for ``keys`` (empty: return) and ``filters``."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k in keys:
        setattr(ds, k, filters.get(k, ""))
    for k, v in filters.items():
        if k not in keys:
            setattr(ds, k, v)
    return ds
