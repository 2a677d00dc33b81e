"""Collections: named cohorts of the federation, by C-FIND keys or by a manifest of UIDs.

A collection (``[[collection]]``, :class:`~mdm.config.CollectionSettings`) is resolved into
:class:`Members` by C-FINDs sent to every site:

- by keys: one study-level C-FIND per site with the collection's study-level keys (pushed
  down: the PACS answers the cohort, not the archive); series-level keys (``Modality``,
  ``SeriesDescription``, ...) select among the series of each member study when it is listed;
- by manifest: the UIDs are looked for as studies, then the rest as series, then as
  instances, in batches of list-of-UID matching (PS3.4 C.2.2.2.2), so a manifest of 2,000
  UIDs costs a few dozen C-FINDs, not 2,000.

Members are kept for ``cache.catalog_ttl`` (single-flight); the study records found are added
to the catalog. Which of them a principal sees is the policy's business, as everywhere
(:mod:`mdm.namespace.tree`). Keys and UIDs come from the configuration (the officer), never
from a principal.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from mdm.catalog.attrs import IMAGE_KEYS, SERIES_KEYS, STUDY_KEYS, query_dataset
from mdm.catalog.flight import SingleFlight
from mdm.catalog.records import Level, Record
from mdm.catalog.sync import CatalogSync
from mdm.config import CollectionSettings, Config
from mdm.errors import RetrieveError, UserError

log = logging.getLogger(__name__)

SERIES_LEVEL = frozenset(
    {
        "Modality",
        "SeriesDescription",
        "SeriesNumber",
        "BodyPartExamined",
        "SeriesDate",
        "SeriesTime",
        "ProtocolName",
        "SeriesInstanceUID",
    }
)
"""Keys that select series of a member study rather than studies."""
UID_BATCH = 100
"""UIDs per list-of-UID C-FIND (PDU size stays far below any PACS's limit)."""
_UID = re.compile(r"^[0-9]+(\.[0-9]+){2,}$")
_DEEPEST = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")


@dataclass
class Members:
    """What a collection holds: whole studies, some series of a study, some instances."""

    studies: set[str] = field(default_factory=set)
    """Every study with anything in the collection."""
    series: dict[str, set[str]] = field(default_factory=dict)
    """study UID -> the series in it, for studies not in the collection whole."""
    instances: dict[str, set[str]] = field(default_factory=dict)
    """series UID -> the instances in it, for series not in the collection whole."""
    series_keys: tuple[tuple[str, str], ...] = ()
    """Series-level keys a member series must match."""
    incomplete: list[str] = field(default_factory=list)
    """Sites whose answer hit a result cap: the collection may hold more."""
    not_found: int = 0
    """Manifest UIDs no site holds."""
    listed: float = 0.0

    def has_study(self, uid: str) -> bool:
        """Whether the study ``uid`` has anything in the collection."""
        return uid in self.studies

    def has_series(self, study: str, series: Record) -> bool:
        """Whether ``series`` (of ``study``) is in the collection."""
        if study not in self.studies:
            return False
        chosen = self.series.get(study)
        if chosen is not None and series.uid not in chosen:
            return False
        if self.series_keys:
            from mdm.namespace.find import matches

            return all(matches(series.attrs.get(k), v, k) for k, v in self.series_keys)
        return True

    def has_instance(self, series: str, uid: str) -> bool:
        """Whether instance ``uid`` of a member series is in the collection."""
        chosen = self.instances.get(series)
        return chosen is None or uid in chosen


def read_manifest(path: Path) -> list[str]:
    """The UIDs of a manifest file, in order, without repeats.

    Accepted: one UID per line (lines that are not UIDs, such as the header lines of a
    TCIA/NBIA ``.tcia`` manifest, are skipped); CSV with a header naming UID columns (the
    deepest of SOPInstanceUID, SeriesInstanceUID, StudyInstanceUID of each row; or any column
    whose name contains "uid"); the ``--json`` output of ``mdm find`` (the deepest UID of
    each row)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the manifest: {e}") from None
    found: list[str] = []
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON: {e}") from None
        for row in rows if isinstance(rows, list) else []:
            if isinstance(row, dict):
                found += _deepest(row)
    else:
        first = stripped.splitlines()[0] if stripped else ""
        if "," in first and "uid" in first.lower():
            reader = csv.DictReader(io.StringIO(text))
            for drow in reader:
                found += _deepest({k.strip(): v for k, v in drow.items() if k})
        else:
            for line in text.splitlines():
                token = line.strip().strip(",;\"'")
                if _UID.match(token):
                    found.append(token)
    return list(dict.fromkeys(u for u in found if _UID.match(u) and len(u) <= 64))


def _deepest(row: dict[str, object]) -> list[str]:
    norm = {k.replace(" ", "").lower(): v for k, v in row.items()}
    for key in _DEEPEST:
        v = norm.get(key.lower())
        if isinstance(v, str) and v.strip():
            return [v.strip()]
    return [v.strip() for k, v in norm.items() if "uid" in k and isinstance(v, str) and v.strip()]


def _batches(uids: Sequence[str], n: int = UID_BATCH) -> Iterable[list[str]]:
    for i in range(0, len(uids), n):
        yield list(uids[i : i + n])


class Cohorts:
    """Members of the configured collections, resolved by C-FIND and kept for the TTL."""

    def __init__(self, config: Config, sync: CatalogSync) -> None:
        self.config = config
        self.sync = sync
        self._members: dict[str, Members] = {}
        self._flight: SingleFlight[Members] = SingleFlight()

    @property
    def all(self) -> tuple[CollectionSettings, ...]:
        """Every configured collection."""
        return self.config.collections

    def get(self, name: str) -> CollectionSettings | None:
        """The collection ``name``, if configured."""
        return next((c for c in self.config.collections if c.name == name), None)

    def cached(self, name: str) -> Members | None:
        """The members of collection ``name`` as last resolved (no query)."""
        return self._members.get(name)

    async def members(self, c: CollectionSettings) -> Members:
        """The members of ``c`` (C-FINDs once per TTL; a stale answer is kept if no site
        answers)."""
        m = self._members.get(c.name)
        if m is not None and time.time() - m.listed < self.config.cache.catalog_ttl:
            return m

        async def run() -> Members:
            try:
                got = await (self._by_keys(c) if c.match else self._by_manifest(c))
            except RetrieveError:
                if m is not None:
                    log.info("collection %s: no site answered; its last listing is kept", c.name)
                    return m
                raise
            self._members[c.name] = got
            return got

        return await self._flight.run(c.name, run)

    # ------------------------------------------------------------------ by keys
    async def _by_keys(self, c: CollectionSettings) -> Members:
        study_keys = tuple((k, v) for k, v in c.match if k not in SERIES_LEVEL)
        series_keys = tuple((k, v) for k, v in c.match if k in SERIES_LEVEL)
        m = Members(series_keys=series_keys)
        cut: set[str] = set()
        q = query_dataset("STUDY", STUDY_KEYS, **dict(study_keys))
        answered = 0
        for site, dss in await self.sync.find("STUDY", q, cut=cut):
            if dss is None:
                continue
            answered += 1
            recs = self.sync.local_filter(
                site, self.sync.to_records("STUDY", site, dss), study_keys, "collection query"
            )
            self.sync.catalog.merge(self.sync.patients_of(recs, site) + recs)
            m.studies |= {r.uid for r in recs}
        if not answered:
            raise RetrieveError(f"no site answered the query of collection {c.name}")
        self._finish(c, m, cut)
        return m

    # ------------------------------------------------------------------ by manifest
    async def _by_manifest(self, c: CollectionSettings) -> Members:
        assert c.manifest is not None
        uids = await trio.to_thread.run_sync(read_manifest, c.manifest)
        m = Members()
        cut: set[str] = set()
        left = list(uids)
        # Studies first: most manifests name studies or series.
        whole = await self._find_uids("STUDY", "StudyInstanceUID", left, cut)
        self._merge_studies(whole)
        m.studies |= set(whole)
        left = [u for u in left if u not in whole]
        series_of: dict[str, str] = {}
        if left:
            for uid, rec in (
                await self._find_uids("SERIES", "SeriesInstanceUID", left, cut)
            ).items():
                series_of[uid] = rec.attrs.get("StudyInstanceUID", "")
            left = [u for u in left if u not in series_of]
        inst_of: dict[str, tuple[str, str]] = {}
        if left:
            for uid, rec in (await self._find_uids("IMAGE", "SOPInstanceUID", left, cut)).items():
                inst_of[uid] = (
                    rec.attrs.get("StudyInstanceUID", ""),
                    rec.attrs.get("SeriesInstanceUID", ""),
                )
            left = [u for u in left if u not in inst_of]
        partial: dict[str, set[str]] = {}
        for se, st in series_of.items():
            if st and st not in whole:
                partial.setdefault(st, set()).add(se)
        for sop, (st, se) in inst_of.items():
            if not st or not se or st in whole:
                continue
            if se in series_of:
                continue
            partial.setdefault(st, set()).add(se)
            m.instances.setdefault(se, set()).add(sop)
        if partial:
            parents = await self._find_uids("STUDY", "StudyInstanceUID", sorted(partial), cut)
            self._merge_studies(parents)
            for st in parents:
                m.studies.add(st)
                m.series[st] = partial[st]
        m.not_found = len(left)
        if left:
            log.info("collection %s: %d manifest UID(s) found at no site", c.name, len(left))
        self._finish(c, m, cut)
        return m

    async def _find_uids(
        self, level: str, key: str, uids: Sequence[str], cut: set[str]
    ) -> dict[str, Record]:
        """Which of ``uids`` the sites hold at ``level``: UID -> a record of it (sites merged)."""
        keys = {"STUDY": STUDY_KEYS, "SERIES": SERIES_KEYS, "IMAGE": IMAGE_KEYS}[level]
        found: dict[str, Record] = {}
        answered = False
        wanted = set(uids)
        for batch in _batches(uids):
            q = query_dataset(level, keys, **{key: "\\".join(batch)})
            for site, dss in await self.sync.find(level, q, cut=cut):
                if dss is None:
                    continue
                answered = True
                lvl: Level = (
                    "STUDY" if level == "STUDY" else "SERIES" if level == "SERIES" else "IMAGE"
                )
                for r in self.sync.to_records(lvl, site, dss):
                    if r.uid not in wanted:
                        continue
                    if r.uid in found:
                        found[r.uid].sites.update(r.sites)
                    else:
                        found[r.uid] = r
        if uids and not answered:
            raise RetrieveError(f"no site answered the {level.lower()} query of a manifest")
        return found

    def _merge_studies(self, studies: dict[str, Record]) -> None:
        for r in studies.values():
            for site in r.sites:
                one = Record(level="STUDY", uid=r.uid, parent=r.parent, attrs=r.attrs)
                one.sites = {site: 0.0}
                self.sync.catalog.merge([*self.sync.patients_of([one], site), one])

    def _finish(self, c: CollectionSettings, m: Members, cut: set[str]) -> None:
        m.incomplete = sorted(cut)
        m.listed = time.time()
        if cut:
            log.warning(
                "collection %s: the answer of site(s) %s hit a result cap: the collection "
                "is incomplete (narrow its keys, or split it)",
                c.name,
                ", ".join(m.incomplete),
            )
