"""``mdm find``: a federated C-FIND that answers exactly what the principal's mount shows.

Under ``[identity]`` every row is presented by the same view code as the mount's
``.metadata.json`` (:meth:`mdm.access.views.View.attrs`, chosen by
:func:`mdm.access.views.view_of` from the
policy decision on the row's study or series), and the filters are matched by the bridge
against those *shown* values, never against the originals: a de-identified principal finds a
patient by the pseudonym its mount shows and a study by its shifted date, and a filter on a
real name, Patient ID or birth date matches nothing, exactly as a made-up value does. The
C-FIND sent to the sites therefore carries no filter value that the principal chose, except
UIDs it could already see (to narrow a series or image query to the studies it names).

Without ``[identity]`` (the local administrator of a workstation) filters go to the PACS as
they are: the identified view shows the originals.

Every query is audited: principal, level, the filter keys (never their values) and the number
of rows.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset

from mdm.access.decide import AccessLevel, AccessResolver, Decision, resource_of
from mdm.access.identity import Principal
from mdm.access.session import Session
from mdm.access.views import NON_PHI, View, view_of
from mdm.catalog.attrs import PATIENT_KEYS, SERIES_KEYS, STUDY_KEYS, dataset_attrs, query_dataset
from mdm.config import Config, SiteSettings
from mdm.dicom.query import fan_out
from mdm.errors import UsageError

FIND_KEYS: dict[str, list[str]] = {
    "PATIENT": ["PatientID", "PatientName", "PatientBirthDate", "PatientSex"],
    "STUDY": [
        "PatientID",
        "PatientName",
        "StudyInstanceUID",
        "StudyDate",
        "StudyDescription",
        "ModalitiesInStudy",
        "AccessionNumber",
        "NumberOfStudyRelatedInstances",
    ],
    "SERIES": [
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "SeriesNumber",
        "SeriesDescription",
        "NumberOfSeriesRelatedInstances",
    ],
    "IMAGE": [
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "SOPClassUID",
        "InstanceNumber",
    ],
}
UNIQUE = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
NARROW_MAX = 64
"""Above this many named studies or series, one federation-wide C-FIND is cheaper than one
query per parent."""


@dataclass
class FindResult:
    """Rows (keyword -> shown value, plus ``sites``), per-site errors, and notes for the user."""

    keys: list[str]
    rows: list[dict[str, Any]]
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def parse_filters(filters: Iterable[str]) -> dict[str, str]:
    """``KEY=VALUE`` arguments -> {keyword: value}; UsageError (exit 2) on anything else, with
    the closest DICOM keyword for a misspelt one."""
    out: dict[str, str] = {}
    for f in filters:
        if "=" not in f:
            raise UsageError(f"filter {f!r}: expected KEY=VALUE")
        k, v = f.split("=", 1)
        if tag_for_keyword(k) is None:
            hint = difflib.get_close_matches(k, _keywords(), n=1, cutoff=0.75)
            did = f"; did you mean {hint[0]!r}?" if hint else ""
            raise UsageError(f"filter {f!r}: {k!r} is not a DICOM keyword{did}")
        if dictionary_VR(k) == "SQ":
            raise UsageError(f"filter {f!r}: sequences cannot be matched")
        out[k] = v
    return out


@functools.cache
def _keywords() -> list[str]:
    from pydicom.datadict import keyword_dict

    return [str(k) for k in keyword_dict if k]


def _glob(pattern: str, fold: bool) -> re.Pattern[str]:
    # DICOM wildcards are * and ? only: every other character is literal (fnmatch's [] is not).
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(body, re.DOTALL | (re.IGNORECASE if fold else 0))


def matches(shown: str | None, pattern: str, keyword: str) -> bool:
    """DICOM C-FIND matching (PS3.4 C.2.2.2) of one shown value: universal (empty), single
    value, wildcard (``*``, ``?``), range (``A-B``, ``A-``, ``-B``) for dates and times, and
    a backslash list of UIDs. A multi-valued attribute matches if any of its values does;
    person names match case-insensitively."""
    if pattern == "" or pattern == "*":
        return True
    if shown is None:
        return False
    vr = dictionary_VR(keyword)
    values = shown.split("\\") if shown else [""]
    alts = pattern.split("\\") if vr == "UI" else [pattern]
    fold = vr == "PN"
    for a in alts:
        if vr in ("DA", "TM", "DT") and "-" in a:
            lo, hi = a.split("-", 1)
            for v in values:
                if v and (not lo or v >= lo) and (not hi or v[: len(hi)] <= hi):
                    return True
            continue
        if "*" in a or "?" in a:
            rx = _glob(a, fold)
            if any(rx.fullmatch(v) for v in values):
                return True
            continue
        for v in values:
            if v == a or (fold and v.casefold() == a.casefold()):
                return True
    return False


def _value(v: Any) -> Any:
    if v is None:
        return ""
    if type(v).__name__ == "MultiValue":
        return "\\".join(str(x) for x in v)
    return str(v)


def _chosen_sites(config: Config, only: Sequence[str]) -> list[SiteSettings]:
    names = [s.name for s in config.sites]
    for u in sorted(set(only) - set(names)):
        hint = difflib.get_close_matches(u, names, n=1)
        did = f"; did you mean {hint[0]!r}?" if hint else f" (sites: {', '.join(names)})"
        raise UsageError(f"--site {u!r}: no such site in {config.path}{did}")
    return [s for s in config.sites if not only or s.name in only]


def find(
    config: Config,
    session: Session,
    secret: Callable[[str], bytes],
    level: str,
    filters: Mapping[str, str],
    only_sites: Sequence[str] = (),
) -> FindResult:
    """The federated answer to ``filters`` at ``level``, as the session's principal sees it."""
    lvl = level.upper()
    keys = list(FIND_KEYS[lvl]) + [k for k in filters if k not in FIND_KEYS[lvl]]
    sites = _chosen_sites(config, only_sites)
    principal = session.principal()
    if session.local_admin:
        res = _find_as_admin(config, sites, lvl, keys, filters)
    else:
        res = _Finder(config, session, principal, secret, sites, keys, filters).run(lvl)
    if session.audit is not None:
        session.audit.record(
            principal=principal,
            action="find",
            decision="allow",
            resource={"level": lvl.lower()},
            rule="",
            policy=session.resolver.version(),
            filter_keys=",".join(sorted(filters))[:256],
            rows=len(res.rows),
        )
    return res


def _find_as_admin(
    config: Config,
    sites: list[SiteSettings],
    lvl: str,
    keys: list[str],
    filters: Mapping[str, str],
) -> FindResult:
    """The identified view shows originals: the PACS match the filters themselves."""
    ds = Dataset()
    ds.QueryRetrieveLevel = lvl
    for k in keys:
        setattr(ds, k, filters.get(k, ""))
    merged: dict[str, dict[str, Any]] = {}
    errors = []
    for r in fan_out(sites, config.bridge, lvl, ds):
        if r.error is not None:
            errors.append(str(r.error))
            continue
        for d in r.datasets:
            row = {k: _value(d.get(k)) for k in keys}
            cur = merged.setdefault(row.get(UNIQUE[lvl]) or "", {**row, "sites": []})
            cur["sites"].append(r.site.name)
    return FindResult(keys, _sorted(merged.values(), keys), errors)


def _sorted(rows: Iterable[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: [str(r.get(k, "")) for k in keys])


@dataclass
class _Study:
    attrs: dict[str, str]
    sites: set[str] = field(default_factory=set)


class _Finder:
    """One ``find`` of a principal under a policy (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        session: Session,
        principal: Principal,
        secret: Callable[[str], bytes],
        sites: list[SiteSettings],
        keys: list[str],
        filters: Mapping[str, str],
    ) -> None:
        self.config = config
        self.resolver = session.resolver
        self.principal = principal
        self.secret = secret
        self.sites = sites
        self.keys = keys
        self.filters = dict(filters)
        self.errors: list[str] = []
        self._views: dict[tuple[int, str], View] = {}

    # -- queries ------------------------------------------------------------------------
    def _query(
        self, level: str, keys: Sequence[str], sites: Iterable[str] | None = None, **uids: str
    ) -> list[tuple[str, Dataset]]:
        chosen = self.sites if sites is None else [s for s in self.sites if s.name in sites]
        out: list[tuple[str, Dataset]] = []
        for r in fan_out(chosen, self.config.bridge, level, query_dataset(level, keys, **uids)):
            if r.error is not None:
                self.errors.append(str(r.error))
                continue
            out.extend((r.site.name, ds) for ds in r.datasets)
        return out

    def _extra(self, base: Sequence[str]) -> list[str]:
        """Filter keys the base query does not ask for (returned, never matched, by the PACS)."""
        return [k for k in self.filters if k not in base]

    def _studies(self) -> dict[str, _Study]:
        out: dict[str, _Study] = {}
        keys = [*STUDY_KEYS, *self._extra(STUDY_KEYS)]
        for site, ds in self._query("STUDY", keys):
            a = dataset_attrs(ds, keys)
            uid = a.get("StudyInstanceUID", "")
            if uid:
                out.setdefault(uid, _Study(a)).sites.add(site)
        return out

    # -- decisions and views ------------------------------------------------------------
    def _decide(self, st: _Study, series: Mapping[str, str] | None = None) -> Decision:
        sites = st.sites
        return self.resolver.decide(self.principal, resource_of(sites, st.attrs, series))

    def _view(self, d: Decision) -> View:
        key = (int(d.level), d.rule)
        v = self._views.get(key)
        if v is None:
            v = self._views[key] = view_of(d, self.resolver, self.secret)
        return v

    def _shown(self, v: View, level: str, attrs: Mapping[str, str]) -> dict[str, str]:
        return v.attrs(level, attrs, NON_PHI)

    def _keep(self, shown: Mapping[str, str]) -> bool:
        return all(matches(shown.get(k), p, k) for k, p in self.filters.items())

    def _row(self, shown: Mapping[str, str], sites: Iterable[str]) -> dict[str, Any]:
        row: dict[str, Any] = {k: shown[k] for k in self.keys if k in shown}
        row["sites"] = sorted(sites)
        return row

    # -- levels -------------------------------------------------------------------------
    def run(self, lvl: str) -> FindResult:
        studies = self._studies()
        visible: list[tuple[str, _Study, View]] = []
        for uid, st in studies.items():
            d = self._decide(st)
            if d.level >= AccessLevel.METADATA:
                visible.append((uid, st, self._view(d)))
        rows: dict[tuple[str, ...], dict[str, Any]]
        if lvl == "PATIENT":
            rows = self._patients(visible)
        elif lvl == "STUDY":
            rows = {}
            for _uid, st, v in visible:
                shown = self._shown(v, "STUDY", st.attrs)
                if self._keep(shown):
                    rows[(v.kind, v.scope, shown.get("StudyInstanceUID", ""))] = self._row(
                        shown, st.sites
                    )
        else:
            rows = self._below(lvl, visible, studies)
        notes = []
        if not rows and any(p not in ("", "*") for p in self.filters.values()):
            notes.append(
                "no match: filters apply to the values your view shows (pseudonyms, remapped "
                "UIDs, shifted dates); attributes it hides match nothing"
            )
        return FindResult(self.keys, _sorted(rows.values(), self.keys), self.errors, notes)

    def _patients(
        self, visible: list[tuple[str, _Study, View]]
    ) -> dict[tuple[str, ...], dict[str, Any]]:
        out: dict[tuple[str, ...], dict[str, Any]] = {}
        for _uid, st, v in visible:
            pid = st.attrs.get("PatientID", "")
            pattrs = {k: st.attrs[k] for k in (*PATIENT_KEYS, *self.filters) if k in st.attrs}
            shown = self._shown(v, "PATIENT", pattrs)
            if not self._keep(shown):
                continue
            key = (v.kind, v.scope, v.patient_name(pid))
            row = out.get(key)
            if row is None:
                out[key] = self._row(shown, st.sites)
            else:
                row["sites"] = sorted(set(row["sites"]) | st.sites)
        return out

    def _narrow(
        self, key: str, candidates: list[tuple[str, _Study, View]]
    ) -> list[tuple[str, _Study, View]] | None:
        """The candidates whose shown ``key`` matches its filter, or None if not filtered."""
        pattern = self.filters.get(key, "")
        if pattern in ("", "*"):
            return None
        return [c for c in candidates if matches(c[2].uid_name(c[0]), pattern, key)]

    def _series(
        self, visible: list[tuple[str, _Study, View]], studies: Mapping[str, _Study]
    ) -> list[tuple[dict[str, str], _Study, View]]:
        """(series attrs, study, view) of every series the principal may see, narrowed to
        the studies a StudyInstanceUID filter names (as shown)."""
        keys = [*SERIES_KEYS, *self._extra((*SERIES_KEYS, *STUDY_KEYS))]
        named = self._narrow("StudyInstanceUID", visible)
        found: list[tuple[str, Dataset]] = []
        if named is not None and len(named) <= NARROW_MAX:
            for uid, st, _v in named:
                found += self._query("SERIES", keys, st.sites, StudyInstanceUID=uid)
        else:
            found = self._query("SERIES", keys)
        merged: dict[str, tuple[dict[str, str], set[str]]] = {}
        for site, ds in found:
            a = dataset_attrs(ds, keys)
            if a.get("SeriesInstanceUID"):
                merged.setdefault(a["SeriesInstanceUID"], (a, set()))[1].add(site)
        out: list[tuple[dict[str, str], _Study, View]] = []
        for a, sites in merged.values():
            parent = studies.get(a.get("StudyInstanceUID", ""))
            if parent is None:
                continue
            d = self.resolver.decide(self.principal, resource_of(sites, parent.attrs, a))
            if d.level >= AccessLevel.METADATA:
                out.append((a, _Study(parent.attrs, sites), self._view(d)))
        return out

    def _below(
        self,
        lvl: str,
        visible: list[tuple[str, _Study, View]],
        studies: Mapping[str, _Study],
    ) -> dict[tuple[str, ...], dict[str, Any]]:
        series = self._series(visible, studies)
        out: dict[tuple[str, ...], dict[str, Any]] = {}
        if lvl == "SERIES":
            for a, st, v in series:
                shown = {**self._shown(v, "STUDY", st.attrs), **self._shown(v, "SERIES", a)}
                if self._keep(shown):
                    out[(v.kind, v.scope, shown.get("SeriesInstanceUID", ""))] = self._row(
                        shown, st.sites
                    )
            return out
        keys = [*FIND_KEYS["IMAGE"], *self._extra(FIND_KEYS["IMAGE"])]
        pattern = self.filters.get("SeriesInstanceUID", "")
        named = [
            s
            for s in series
            if pattern in ("", "*")
            or matches(s[2].uid_name(s[0]["SeriesInstanceUID"]), pattern, "SeriesInstanceUID")
        ]
        by_uid = {a["SeriesInstanceUID"]: (a, st, v) for a, st, v in named}
        found: list[tuple[str, Dataset]] = []
        if len(named) <= NARROW_MAX:
            for a, st, _v in named:
                found += self._query(
                    "IMAGE",
                    keys,
                    st.sites,
                    StudyInstanceUID=a["StudyInstanceUID"],
                    SeriesInstanceUID=a["SeriesInstanceUID"],
                )
        else:
            found = self._query("IMAGE", keys)
        for site, ds in found:
            ia = dataset_attrs(ds, keys)
            parent = by_uid.get(ia.get("SeriesInstanceUID", ""))
            if parent is None or not ia.get("SOPInstanceUID"):
                continue
            a, st, v = parent
            shown = {
                **self._shown(v, "STUDY", st.attrs),
                **self._shown(v, "SERIES", a),
                **self._shown(v, "IMAGE", ia),
            }
            if self._keep(shown):
                key = (v.kind, v.scope, shown.get("SOPInstanceUID", ""))
                row = out.setdefault(key, self._row(shown, []))
                row["sites"] = sorted({*row["sites"], site})
        return out


def original_of(
    config: Config,
    resolver: AccessResolver,
    principal: Principal,
    secret: Callable[[str], bytes],
    study: str | None,
    series: str | None = None,
    sop: str | None = None,
    bare: str | None = None,
) -> tuple[str, str | None, str | None] | None:
    """The original (study, series, sop) UIDs behind names as ``principal``'s views show them
    (remapped ``2.25.`` UIDs of a de-identified view, or the originals themselves), or None if
    the principal sees no such object. ``bare`` is a UID given without its path: a study or a
    series (an instance of a de-identified view needs its path)."""
    session = Session(lambda: principal, resolver, None, False)
    f = _Finder(config, session, principal, secret, list(config.sites), [], {})
    studies = f._studies()
    visible = []
    for uid, st in studies.items():
        d = f._decide(st)
        if d.level >= AccessLevel.METADATA:
            visible.append((uid, st, f._view(d)))
    if bare is not None:
        for uid, _st, v in visible:
            if v.uid_name(uid) == bare:
                return uid, None, None
        for a, _st, v in f._series(visible, studies):
            if v.uid_name(a["SeriesInstanceUID"]) == bare:
                return a["StudyInstanceUID"], a["SeriesInstanceUID"], None
        return None
    named = [(uid, st, v) for uid, st, v in visible if v.uid_name(uid) == study]
    if not named:
        return None
    ostudy, st, _v = named[0]
    if series is None:
        return ostudy, None, None
    f.filters = {"StudyInstanceUID": _v.uid_name(ostudy)}
    match = [
        s for s in f._series(named, studies) if s[2].uid_name(s[0]["SeriesInstanceUID"]) == series
    ]
    if not match:
        return None
    a, sst, sv = match[0]
    if sop is None:
        return ostudy, a["SeriesInstanceUID"], None
    keys = FIND_KEYS["IMAGE"]
    for _site, ds in f._query(
        "IMAGE", keys, sst.sites, StudyInstanceUID=ostudy, SeriesInstanceUID=a["SeriesInstanceUID"]
    ):
        uid = str(ds.get("SOPInstanceUID", ""))
        if uid and sv.uid_name(uid) == sop:
            return ostudy, a["SeriesInstanceUID"], uid
    return None
