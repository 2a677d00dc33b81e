"""C-ECHO and C-FIND against one site, and the federated C-FIND fan-out.

Queries open a fresh association each (they are rare next to reads, and a listing must not
queue behind a retrieval on a pooled association). Every wait has the site's deadline; a
C-FIND's deadline starts again with every response, so a large but steady answer is fine and
a silent peer is not. Answers from a PACS are untrusted input: an identifier that does not
decode or lacks the unique key of its level is skipped with a warning naming the site.
"""

from __future__ import annotations

import copy
import logging
import re
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pynetdicom.association import Association

from mdm.config import BridgeSettings, SiteSettings
from mdm.dicom.matches import Matches
from mdm.dicom.net import (
    CANCEL,
    FAILURE,
    PATIENT_ROOT_FIND,
    PENDING,
    QUERY_SYNTAXES,
    STUDY_ROOT_FIND,
    SUCCESS,
    VERIFICATION,
    WARNING,
    Watchdog,
    accepted,
    close_association,
    contexts_for,
    new_ae,
    open_association,
    status_category,
    status_code,
    status_name,
)
from mdm.errors import MdmError, RetrieveError, RetrieveTimeout

log = logging.getLogger(__name__)

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
UNIQUE_KEYS = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
MAX_MATCHES = 200_000
"""A PACS that answers more than this is cut off (a listing must stay bounded in memory)."""

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass
class SiteResult:
    """The answer of one site to a fanned-out C-FIND."""

    site: SiteSettings
    datasets: list[Dataset] = field(default_factory=list)
    error: MdmError | None = None
    elapsed: float = 0.0
    truncated: bool = False
    """The answer hit a result cap: the site holds more matches than it gave."""


def c_echo(site: SiteSettings, bridge: BridgeSettings) -> float:
    """C-ECHO ``site``; return the round trip of the echo itself in seconds.

    The association set-up is not counted (it is paid once per pooled association), but it
    is bounded by the same deadline. Raises RetrieveTimeout or RetrieveError naming the site.
    """
    if site.dicomweb:  # a DICOMweb site: a one-study QIDO-RS query is its echo
        from mdm.dicomweb.qido import qido_echo

        return qido_echo(site)
    ae = new_ae(bridge.ae_title, site.timeout, bridge.max_pdu, fast_path=bridge.fast_dicom)
    assoc = open_association(
        ae, site, contexts_for([VERIFICATION], QUERY_SYNTAXES), max_pdu=bridge.max_pdu
    )
    try:
        with Watchdog(assoc, site.timeout) as wd:
            t0 = time.perf_counter()
            status = assoc.send_c_echo()
            rtt = time.perf_counter() - t0
        code = status_code(status)
        if code is None:
            _raise_empty(site, "C-ECHO", wd)
        assert code is not None
        if status_category(code) != SUCCESS:
            raise RetrieveError(f"site {site.name}: C-ECHO answered {status_name('echo', code)}")
        return rtt
    finally:
        close_association(assoc)


def _raise_empty(site: SiteSettings, what: str, wd: Watchdog) -> None:
    """pynetdicom's empty status: say whether it was our deadline or the association."""
    if wd.fired:
        raise RetrieveTimeout(f"site {site.name}: no answer to {what} within {site.timeout:g}s")
    raise RetrieveError(
        f"site {site.name}: association aborted during {what} (closed, aborted by the peer, "
        "or a malformed message)"
    )


def _prepare(identifier: Dataset, level: str) -> Dataset:
    """A copy of the caller's identifier with the level and its unique key set."""
    ds = copy.deepcopy(identifier)
    ds.QueryRetrieveLevel = level
    key = UNIQUE_KEYS[level]
    if key not in ds:
        setattr(ds, key, "")
    return ds


def _check_decodes(ds: Dataset) -> None:
    """Force pydicom's lazy decoding of every element (raises on garbage)."""
    for elem in ds:
        value = elem.value
        if elem.VR == "SQ":
            for item in value:
                _check_decodes(item)


def _valid(ds: Dataset | None, level: str, site: SiteSettings) -> bool:
    """True if ``ds`` decodes and carries a plausible unique key of ``level``."""
    key = UNIQUE_KEYS[level]
    if ds is None:
        log.warning("site %s: skipped a C-FIND response whose identifier did not decode", site.name)
        return False
    try:
        _check_decodes(ds)
        value = ds.get(key, None)
    except Exception as e:
        log.warning(
            "site %s: skipped a C-FIND response that does not decode (%s)",
            site.name,
            type(e).__name__,
        )
        return False
    text = str(value).strip() if value is not None else ""
    ok = bool(text) and len(text) <= 64 and "\\" not in text
    if ok and key != "PatientID":
        ok = _UID_RE.match(text) is not None
    if not ok:
        # Never log the value: at PATIENT level it is a patient ID.
        log.warning(
            "site %s: skipped a %s-level C-FIND response without a valid %s",
            site.name,
            level,
            key,
        )
    return ok


def _choose_model(site: SiteSettings, level: str) -> list[str]:
    """The information models to propose, preferred first."""
    if site.query_model == "patient":
        return [PATIENT_ROOT_FIND]
    if level == "PATIENT" and site.query_model == "auto":
        return [PATIENT_ROOT_FIND, STUDY_ROOT_FIND]
    return [STUDY_ROOT_FIND]


def c_find(
    site: SiteSettings, bridge: BridgeSettings, level: str, identifier: Dataset
) -> list[Dataset]:
    """C-FIND at ``level`` (PATIENT, STUDY, SERIES or IMAGE); return the valid matches.

    Study Root is used, except at PATIENT level where Patient Root is used if the site allows
    it (``query_model`` ``auto`` falls back to Study Root when the PACS rejects Patient Root,
    ``patient`` uses Patient Root at every level). Study Root has no PATIENT level, so a
    patient query over Study Root asks at STUDY level and folds the answers by PatientID.
    The caller's identifier is not modified; its unique key is added if missing.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown query level {level!r}")
    models = _choose_model(site, level)
    ae = new_ae(bridge.ae_title, site.timeout, bridge.max_pdu, fast_path=bridge.fast_dicom)
    assoc = open_association(ae, site, contexts_for(models, QUERY_SYNTAXES), max_pdu=bridge.max_pdu)
    try:
        model = next((m for m in models if accepted(assoc, m)), None)
        if model is None:
            raise RetrieveError(
                f"site {site.name}: the PACS accepts none of the query models offered "
                f"({'Patient Root' if models == [PATIENT_ROOT_FIND] else 'Study Root'})"
            )
        if level == "PATIENT" and model == STUDY_ROOT_FIND:
            return _patients_via_studies(site, assoc, identifier)
        return _run_find(site, assoc, model, level, _prepare(identifier, level))
    finally:
        close_association(assoc)


def _run_find(
    site: SiteSettings, assoc: Association, model: str, level: str, query: Dataset
) -> list[Dataset]:
    out = Matches()
    seen = 0
    with Watchdog(assoc, site.timeout) as wd:
        responses = assoc.send_c_find(query, model)
        for status, ident in responses:
            wd.touch()
            code = status_code(status)
            if code is None:
                _raise_empty(site, "C-FIND", wd)
            assert code is not None
            cat = status_category(code)
            if cat == PENDING:
                seen += 1
                if seen > MAX_MATCHES:
                    # Our own bound: keep what came, and say the answer is cut off.
                    assoc.abort()
                    out.truncated = True
                    break
                if _valid(ident, level, site):
                    assert ident is not None
                    out.append(ident)
                continue
            if cat == SUCCESS:
                break
            if cat == WARNING:
                log.warning("site %s: C-FIND ended with %s", site.name, status_name("find", code))
                break
            if cat == CANCEL and seen:
                # Matching stopped by the PACS after some answers (how several PACS say
                # "result cap reached"): a partial answer, marked as such.
                out.truncated = True
                break
            what = "cancelled" if cat == CANCEL else "failed"
            assert cat in (CANCEL, FAILURE)
            raise RetrieveError(f"site {site.name}: C-FIND {what}: {status_name('find', code)}")
    return out


def _patients_via_studies(
    site: SiteSettings, assoc: Association, identifier: Dataset
) -> list[Dataset]:
    """PATIENT level over Study Root: ask for studies, keep one answer per patient."""
    keys = [
        elem.keyword for elem in identifier if elem.keyword and elem.keyword != "QueryRetrieveLevel"
    ]
    query = _prepare(identifier, "STUDY")
    if "PatientID" not in query:
        query.PatientID = ""
    studies = _run_find(site, assoc, STUDY_ROOT_FIND, "STUDY", query)
    patients: dict[str, Dataset] = {}
    for st in studies:
        pid = str(st.get("PatientID", "") or "").strip()
        if not pid or len(pid) > 64 or pid in patients:
            continue
        ds = Dataset()
        ds.QueryRetrieveLevel = "PATIENT"
        ds.PatientID = pid
        for kw in keys:
            if kw in st and kw not in ("PatientID",) and not kw.startswith("Study"):
                setattr(ds, kw, st.get(kw))
        if "SpecificCharacterSet" in st:
            ds.SpecificCharacterSet = st.SpecificCharacterSet
        patients[pid] = ds
    return list(patients.values())


def fan_out(
    sites: Iterable[SiteSettings],
    bridge: BridgeSettings,
    level: str,
    identifier: Dataset,
) -> list[SiteResult]:
    """C-FIND every site in parallel; one result per site, in the order given.

    Each site runs under its own deadline; a site that is down or answers badly yields a
    result with ``error`` set while the others still answer.
    """
    chosen: Sequence[SiteSettings] = list(sites)
    if not chosen:
        return []

    def one(site: SiteSettings) -> SiteResult:
        return find_at(site, bridge, level, identifier)

    with ThreadPoolExecutor(max_workers=len(chosen), thread_name_prefix="mdm-find") as pool:
        return list(pool.map(one, chosen))


def find_at(
    site: SiteSettings, bridge: BridgeSettings, level: str, identifier: Dataset
) -> SiteResult:
    """C-FIND one site; its failure is in the result (``error``), never raised."""
    t0 = time.monotonic()
    try:
        if site.dicomweb:
            from mdm.dicomweb.qido import qido_find

            found = qido_find(site, level, identifier)
        else:
            found = c_find(site, bridge, level, identifier)
        cut = bool(getattr(found, "truncated", False)) or (
            site.max_results > 0 and len(found) >= site.max_results
        )
        if cut:
            log.warning(
                "site %s: the %s-level C-FIND hit a result cap (%d matches): the listing is "
                "incomplete; narrow the query (a collection, or keys)",
                site.name,
                level,
                len(found),
            )
        return SiteResult(site, found, None, time.monotonic() - t0, truncated=cut)
    except MdmError as e:
        return SiteResult(site, [], e, time.monotonic() - t0)
    except Exception as e:  # a bug or a pynetdicom surprise must not sink the others
        log.exception("site %s: C-FIND failed unexpectedly", site.name)
        err = RetrieveError(f"site {site.name}: C-FIND failed: {type(e).__name__}")
        return SiteResult(site, [], err, time.monotonic() - t0)
