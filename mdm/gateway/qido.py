"""QIDO-RS (PS3.18 10.6): query parameters, matching and paging.

Matching is the one ``mdm find`` uses (:func:`mdm.namespace.find.matches`): exact, ``*`` and
``?`` wildcards, DA/TM/DT ranges (open-ended too), backslash UID lists, case-insensitive
person names, and always against the values the principal's view *shows*. A filter on a real
name, ID or date that a de-identified view hides therefore matches nothing, exactly as a
made-up value does: the gateway is no oracle on hidden values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mdm.dicomweb.dicomjson import attrs_to_json, keyword_of
from mdm.namespace.find import matches

# What viewers read from every answer (PS3.18 Table 10.6.3-3/4/5), beyond what was matched.
DEFAULT_FIELDS: dict[str, tuple[str, ...]] = {
    "STUDY": (
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "StudyDescription",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    "SERIES": (
        "StudyInstanceUID",
        "Modality",
        "SeriesInstanceUID",
        "SeriesNumber",
        "SeriesDescription",
        "BodyPartExamined",
        "NumberOfSeriesRelatedInstances",
    ),
    "IMAGE": (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPClassUID",
        "SOPInstanceUID",
        "InstanceNumber",
    ),
}
CONTROL = {"limit", "offset", "includefield", "fuzzymatching"}


class QueryError(ValueError):
    """A query the gateway refuses (400), with a message for the client."""


@dataclass
class Query:
    """One parsed QIDO-RS query."""

    filters: dict[str, str] = field(default_factory=dict)
    include_all: bool = False
    include: set[str] = field(default_factory=set)
    limit: int | None = None
    offset: int = 0
    warnings: list[str] = field(default_factory=list)


def parse(params: Sequence[tuple[str, str]], cap: int) -> Query:
    """Query parameters (repeated keys kept) -> :class:`Query`; QueryError on bad input."""
    q = Query()
    for key, value in params:
        if key == "limit" or key == "offset":
            try:
                n = int(value)
            except ValueError:
                raise QueryError(f"{key} must be a non-negative integer") from None
            if n < 0:
                raise QueryError(f"{key} must be a non-negative integer")
            if key == "offset":
                q.offset = n
            else:
                q.limit = n
        elif key == "includefield":
            for f in value.split(","):
                f = f.strip()
                if f == "all":
                    q.include_all = True
                elif f:
                    kw = keyword_of(f)
                    if kw is None:
                        raise QueryError(f"includefield {f!r} names no DICOM attribute")
                    q.include.add(kw)
        elif key == "fuzzymatching":
            if value.lower() == "true":
                q.warnings.append('299 gateway "fuzzymatching not supported: exact matching used"')
        elif key.startswith("_"):
            continue  # cache-busting parameters some viewers add
        else:
            if "." in key:
                raise QueryError(f"{key}: sequence matching is not supported")
            kw = keyword_of(key)
            if kw is None:
                raise QueryError(f"{key!r} is not a DICOM keyword or tag")
            q.filters[kw] = value
    if q.limit is None or q.limit > cap:
        if q.limit is not None:
            q.warnings.append(f'299 gateway "limit {q.limit} above the server cap: {cap} used"')
        q.limit = cap
    return q


def answer(
    rows: Sequence[Mapping[str, str]], q: Query, level: str
) -> tuple[list[dict[str, Any]], bool]:
    """(DICOM JSON of the matching rows from ``offset``, at most ``limit``; whether rows were
    left out by the limit). ``rows`` are the shown attributes, sorted as they are to be paged."""
    hits = [r for r in rows if all(matches(r.get(k), pat, k) for k, pat in q.filters.items())]
    assert q.limit is not None
    page = hits[q.offset : q.offset + q.limit]
    keep = None if q.include_all else {*DEFAULT_FIELDS[level], *q.filters, *q.include}
    return [attrs_to_json(r, keep) for r in page], q.offset + q.limit < len(hits)
