"""``mdm sites --check-retrieve``: prove the retrieval round trip of each site, not just C-ECHO.

A C-ECHO says the PACS answers; it does not say that the PACS can connect back to the bridge's
storage SCP (C-MOVE) or that it serves C-GET. The check finds one instance at the site (one
C-FIND per level), retrieves it the way the site is configured to (``move``, ``get``, or both
for ``auto``) into a storage SCP that discards it, and names the likely cause of a failure.
Nothing is stored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from pydicom.dataset import Dataset

from mdm.config import BridgeSettings, SiteSettings
from mdm.dicom.query import c_find
from mdm.dicom.receiver import StorageSCP
from mdm.dicom.retrieve import IncompleteRetrieve, Retriever
from mdm.errors import MdmError, RetrieveTimeout


@dataclass(frozen=True)
class RetrieveCheck:
    """The outcome of one retrieval mode at one site."""

    mode: str
    ok: bool
    detail: str
    elapsed_ms: float = 0.0


def _first(site: SiteSettings, bridge: BridgeSettings, level: str, **keys: str) -> Dataset | None:
    q = Dataset()
    q.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(q, k, v)
    found = c_find(site, bridge, level, q)
    return found[0] if found else None


def sample_instance(site: SiteSettings, bridge: BridgeSettings) -> tuple[str, str, str, str]:
    """(study, series, SOP instance, SOP class) of one instance the site holds; MdmError if
    the site holds none or does not answer."""
    st = _first(site, bridge, "STUDY", StudyInstanceUID="")
    if st is None:
        raise MdmError(f"site {site.name} holds no study to test a retrieval with")
    study = str(st.StudyInstanceUID)
    se = _first(site, bridge, "SERIES", StudyInstanceUID=study, SeriesInstanceUID="")
    if se is None:
        raise MdmError(f"site {site.name}: study {study} has no series")
    series = str(se.SeriesInstanceUID)
    im = _first(
        site,
        bridge,
        "IMAGE",
        StudyInstanceUID=study,
        SeriesInstanceUID=series,
        SOPInstanceUID="",
        SOPClassUID="",
    )
    if im is None:
        raise MdmError(f"site {site.name}: series {series} has no instance")
    return study, series, str(im.SOPInstanceUID), str(im.get("SOPClassUID", ""))


def _collect(into: list[str], obj: Any) -> None:
    into.append(obj.sop_uid)


def _hint(mode: str, site: SiteSettings, bridge: BridgeSettings, error: MdmError) -> str:
    text = str(error)
    if mode == "move" and (
        isinstance(error, RetrieveTimeout | IncompleteRetrieve)
        or "0xA801" in text
        or "Move Destination" in text
        or "0xC000" in text
    ):
        return (
            f"{text}; the PACS could not deliver to the bridge: register AE {bridge.ae_title} "
            f"at {bridge.host}:{bridge.port} in site {site.name} (as a C-MOVE destination), "
            "and let that address reach this host"
        )
    if mode == "get":
        return f'{text}; the PACS may not serve C-GET: use retrieve = "move" for {site.name}'
    return text


def check_retrieve(
    site: SiteSettings, bridge: BridgeSettings, *, listen: bool = True
) -> list[RetrieveCheck]:
    """Retrieve one instance from ``site`` by each mode it is configured for.

    ``listen=False``: the bridge's port is taken (a mount of this configuration runs): C-MOVE
    cannot be checked from here and is reported as such.
    """
    if site.dicomweb:
        from mdm.dicomweb.check import check_wado

        return check_wado(site)
    modes = {"move": ["move"], "get": ["get"], "auto": ["get", "move"]}[site.retrieve]
    try:
        study, series, sop, cls = sample_instance(site, bridge)
    except MdmError as e:
        return [RetrieveCheck(m, False, str(e)) for m in modes]
    scp = StorageSCP(bridge, {site.ae_title})
    out: list[RetrieveCheck] = []
    try:
        if listen and "move" in modes:
            scp.start()
        retriever = Retriever(bridge, scp)
        try:
            for mode in modes:
                if mode == "move" and not listen:
                    out.append(
                        RetrieveCheck(
                            mode,
                            False,
                            f"port {bridge.port} is in use (a running mount?): stop it to check "
                            "C-MOVE",
                        )
                    )
                    continue
                got: list[str] = []
                t0 = time.perf_counter()
                try:
                    retriever.retrieve(
                        site,
                        level="IMAGE",
                        study_uid=study,
                        series_uid=series,
                        sop_uids=[sop],
                        expected={sop},
                        sink=partial(_collect, got),
                        classes_of={sop: cls} if cls else None,
                        mode=mode,
                    )
                except MdmError as e:
                    out.append(RetrieveCheck(mode, False, _hint(mode, site, bridge, e)))
                    continue
                ms = (time.perf_counter() - t0) * 1000
                ok = sop in got
                detail = "1 object delivered" if ok else "the PACS reported success, nothing came"
                out.append(RetrieveCheck(mode, ok, detail, round(ms, 1)))
        finally:
            retriever.close()
    finally:
        scp.stop()
    return out
