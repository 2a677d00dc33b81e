"""``mdm sites --check-retrieve`` for a DICOMweb site: find one instance by QIDO-RS (study,
series, instance) and retrieve it by WADO-RS through the same checks as a real retrieval;
nothing is stored."""

from __future__ import annotations

import time

from pydicom.dataset import Dataset

from mdm.config import SiteSettings
from mdm.dicom.check import RetrieveCheck
from mdm.dicom.receiver import ReceivedObject
from mdm.dicomweb.qido import qido_find
from mdm.dicomweb.wado import wado_retrieve
from mdm.errors import MdmError


def _first(site: SiteSettings, level: str, **keys: str) -> Dataset | None:
    q = Dataset()
    for k, v in keys.items():
        setattr(q, k, v)
    found = qido_find(site, level, q)
    return found[0] if found else None


def sample_instance(site: SiteSettings) -> tuple[str, str, str, str]:
    """(study, series, SOP instance, SOP class) of one instance at ``site``; MdmError if none."""
    st = _first(site, "STUDY", StudyInstanceUID="")
    if st is None:
        raise MdmError(f"site {site.name} holds no study to test a retrieval with")
    study = str(st.StudyInstanceUID)
    se = _first(site, "SERIES", StudyInstanceUID=study, SeriesInstanceUID="")
    if se is None:
        raise MdmError(f"site {site.name}: study {study} has no series")
    series = str(se.SeriesInstanceUID)
    im = _first(
        site,
        "IMAGE",
        StudyInstanceUID=study,
        SeriesInstanceUID=series,
        SOPInstanceUID="",
        SOPClassUID="",
    )
    if im is None:
        raise MdmError(f"site {site.name}: series {series} has no instance")
    return study, series, str(im.SOPInstanceUID), str(im.get("SOPClassUID", ""))


def check_wado(site: SiteSettings) -> list[RetrieveCheck]:
    """Retrieve one instance of ``site`` by WADO-RS; one :class:`RetrieveCheck` (mode ``wado``)."""
    try:
        study, series, sop, cls = sample_instance(site)
        got: list[ReceivedObject] = []
        t0 = time.perf_counter()
        wado_retrieve(
            site,
            study_uid=study,
            series_uid=series,
            sop_uids=[sop],
            expected={sop},
            sink=got.append,
            classes_of={sop: cls} if cls else None,
        )
        ms = (time.perf_counter() - t0) * 1000
    except MdmError as e:
        return [RetrieveCheck("wado", False, str(e))]
    size = sum(len(o.data) for o in got)
    return [RetrieveCheck("wado", True, f"1 object delivered ({size} bytes)", round(ms, 1))]
