"""QIDO-RS: the C-FIND questions of the bridge (a level and an identifier) asked of a
DICOMweb site, answered as pydicom Datasets.

The identifier is turned into a query the way a C-FIND would read it: an empty attribute is
a return key (``includefield``), a non-empty one a matching key (``*``/``?`` wildcards, DA/TM
ranges and ``\\``-separated UID lists carry over, a UID list as a comma list). UIDs that name
the parent resource go into the path (``/studies/{study}/series``); without them the top-level
``/series`` and ``/instances`` resources are used. PATIENT level has no QIDO resource: studies
are asked for and folded by PatientID, as over Study Root.

Answers are paged with ``limit``/``offset`` until a page comes back short, and capped at
:data:`MAX_MATCHES` in all (logged). A server that ignores ``offset`` (the same page again)
stops the paging. Every item must convert to a Dataset and carry a plausible unique key of
its level; others are skipped with a warning naming the site and the count, never a value.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import quote

import httpx
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from mdm.config import SiteSettings
from mdm.dicom.matches import Matches
from mdm.dicomweb.dicomjson import JsonAnswerError, datasets_from_json, parse_json_array
from mdm.dicomweb.transport import client_for, request_error, status_error
from mdm.errors import NotFound, RetrieveError

log = logging.getLogger(__name__)

PAGE = 1000
"""Matches asked for per request (``limit``)."""
MAX_MATCHES = 200_000
"""Matches kept per query in all (the same bound as a C-FIND)."""
ACCEPT_JSON = "application/dicom+json, application/json;q=0.9"

_UNIQUE = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# Attributes that are never sent as query parameters.
_NOT_KEYS = {"QueryRetrieveLevel", "SpecificCharacterSet", "QueryRetrieveView"}


def _value_text(value: object, vr: str) -> str:
    if isinstance(value, MultiValue | list | tuple):
        parts = [str(v) for v in value]
        return ",".join(parts) if vr == "UI" else "\\".join(parts)
    text = "" if value is None else str(value)
    if vr == "UI" and "\\" in text:
        return ",".join(p for p in text.split("\\") if p)
    return text


def _single_uid(ds: Dataset, keyword: str) -> str:
    """The value of ``keyword`` if it names exactly one UID, else empty."""
    value = ds.get(keyword, None)
    if value is None or isinstance(value, MultiValue | list):
        return ""
    text = str(value).strip()
    return text if _UID_RE.match(text) and len(text) <= 64 else ""


def query_of(level: str, identifier: Dataset) -> tuple[str, list[tuple[str, str]], dict[str, str]]:
    """(resource path, query parameters, UIDs of the path) for a C-FIND-shaped question.

    The UIDs in the path are returned so that they can be set on answers that leave them out.
    """
    study = _single_uid(identifier, "StudyInstanceUID")
    series = _single_uid(identifier, "SeriesInstanceUID")
    in_path: dict[str, str] = {}
    if level in ("STUDY", "PATIENT"):
        path = "studies"
    elif level == "SERIES":
        if study:
            path, in_path = f"studies/{quote(study)}/series", {"StudyInstanceUID": study}
        else:
            path = "series"
    elif level == "IMAGE":
        if study and series:
            path = f"studies/{quote(study)}/series/{quote(series)}/instances"
            in_path = {"StudyInstanceUID": study, "SeriesInstanceUID": series}
        elif study:
            path, in_path = f"studies/{quote(study)}/instances", {"StudyInstanceUID": study}
        else:
            path = "instances"
    else:
        raise ValueError(f"unknown query level {level!r}")
    params: list[tuple[str, str]] = []
    fields: list[str] = []
    for elem in identifier:
        kw = elem.keyword
        if not kw or kw in _NOT_KEYS or kw in in_path:
            continue
        if elem.VR == "SQ":
            fields.append(kw)
            continue
        text = _value_text(elem.value, elem.VR).strip()
        if text:
            params.append((kw, text))
        else:
            fields.append(kw)
    if level == "PATIENT":
        fields.append("PatientID")
    for kw in dict.fromkeys(fields):
        params.append(("includefield", kw))
    return path, params, in_path


_SAFE = "*?,^-._~!$'()/:@\\"


def query_string(params: list[tuple[str, str]]) -> str:
    """``params`` as a query string, percent-encoding only what must be (``&``, ``=``, ``+``,
    ``#``, ``%``, spaces, non-ASCII): Orthanc's DICOMweb plugin matches the raw text, so an
    encoded ``*`` (``%2A``, as httpx and urllib write it) would no longer be a wildcard."""
    return "&".join(f"{quote(k, safe='')}={quote(v, safe=_SAFE)}" for k, v in params)


def _plausible(ds: Dataset, level: str) -> bool:
    key = _UNIQUE[level]
    value = ds.get(key, None)
    text = str(value).strip() if value is not None else ""
    if not text or len(text) > 64 or "\\" in text or isinstance(value, MultiValue):
        return False
    return key == "PatientID" or _UID_RE.match(text) is not None


def qido_find(site: SiteSettings, level: str, identifier: Dataset) -> list[Dataset]:
    """QIDO-RS at ``level`` (PATIENT, STUDY, SERIES or IMAGE); the valid matches.

    Raises RetrieveTimeout, RetrieveError or AccessDenied naming the site. A 404 (the parent
    study or series is not at this site) is an empty answer, as a C-FIND would give.
    """
    path, params, in_path = query_of(level, identifier)
    what = f"QIDO-RS {path.split('/')[-1]} query"
    client = client_for(site)
    out = Matches()
    seen: set[str] = set()
    unique = _UNIQUE["STUDY" if level == "PATIENT" else level]
    offset = 0
    skipped = 0
    while True:
        page = [*params, ("limit", str(PAGE)), ("offset", str(offset))]
        try:
            resp = client.get(f"{path}?{query_string(page)}", headers={"Accept": ACCEPT_JSON})
        except Exception as e:
            raise request_error(site, what, e) from None
        if resp.status_code == 204:
            break
        if resp.status_code != 200:
            err = status_error(site, what, resp.status_code)
            if isinstance(err, NotFound):
                break
            raise err
        if resp.headers.get("Warning"):
            # Servers say so when they cut an answer; the text is the server's, not logged.
            log.warning("site %s: the %s answer carries a Warning header", site.name, what)
        try:
            items = parse_json_array(resp.content)
        except JsonAnswerError as e:
            raise RetrieveError(f"site {site.name}: {what}: {e}") from None
        datasets, bad = datasets_from_json(items)
        skipped += bad
        new = 0
        for ds in datasets:
            for kw, uid in in_path.items():
                if kw not in ds:
                    setattr(ds, kw, uid)
            if not _plausible(ds, "STUDY" if level == "PATIENT" else level):
                skipped += 1
                continue
            key = str(ds.get(unique)).strip()
            if key in seen:
                continue
            seen.add(key)
            new += 1
            out.append(ds)
            if len(out) >= MAX_MATCHES:
                log.warning(
                    "site %s: %s capped at %d matches; narrow the query",
                    site.name,
                    what,
                    MAX_MATCHES,
                )
                out.truncated = True
                return _fold_patients(out, identifier) if level == "PATIENT" else out
        if len(items) < PAGE or new == 0:
            break
        offset += len(items)
    if skipped:
        log.warning(
            "site %s: skipped %d %s answer(s) that did not convert or lack a valid %s",
            site.name,
            skipped,
            what,
            unique,
        )
    return _fold_patients(out, identifier) if level == "PATIENT" else out


def _fold_patients(studies: list[Dataset], identifier: Dataset) -> list[Dataset]:
    """PATIENT level: one answer per PatientID, with the (non-study) attributes asked for."""
    asked = {e.keyword for e in identifier if e.keyword} | {"PatientID", "SpecificCharacterSet"}
    patients: dict[str, Dataset] = {}
    for st in studies:
        pid = str(st.get("PatientID", "") or "").strip()
        if not pid or len(pid) > 64 or pid in patients:
            continue
        ds = Dataset()
        for elem in st:
            if elem.keyword in asked and not elem.keyword.startswith("Study"):
                ds.add(elem)
        ds.QueryRetrieveLevel = "PATIENT"
        patients[pid] = ds
    return list(patients.values())


def qido_echo(site: SiteSettings) -> float:
    """The echo of a DICOMweb site: a QIDO-RS study query for at most one study; its round
    trip in seconds (raises like :func:`qido_find`, 404 included)."""
    import time

    client = client_for(site)
    what = "QIDO-RS echo (studies?limit=1)"
    t0 = time.perf_counter()
    try:
        resp = client.get(
            "studies",
            params=[("limit", "1"), ("includefield", "StudyInstanceUID")],
            headers={"Accept": ACCEPT_JSON},
        )
    except (httpx.HTTPError, OSError) as e:
        raise request_error(site, what, e) from None
    rtt = time.perf_counter() - t0
    if resp.status_code not in (200, 204):
        raise status_error(site, what, resp.status_code)
    try:
        parse_json_array(resp.content)
    except JsonAnswerError as e:
        raise RetrieveError(f"site {site.name}: {what}: {e}") from None
    return rtt
