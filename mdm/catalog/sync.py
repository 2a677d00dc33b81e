"""Catalog sync: C-FIND answers of the federation turned into catalog records.

:class:`CatalogSync` is the one writer of the catalog's listings: the federated study listing,
the series of a study and the instances of a series, each fanned out to the sites that hold
the parent (one worker thread per site, under the site's association limit), merged by UID,
kept for ``cache.catalog_ttl`` and then refreshed in the background while the stale listing is
served. A study, series or instance never listed is found by a targeted C-FIND; one that no
site holds is remembered for ``NEGATIVE_TTL`` seconds (forgotten when the policy changes).
Concurrent askers share one C-FIND per listing (single-flight).

It knows nothing of principals: what a principal may see of these records is for
:mod:`mdm.access.gate` and :mod:`mdm.namespace.naming` to say. Its queries carry UIDs only,
never a value a principal chose.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import trio
from pydicom.dataset import Dataset

from mdm.catalog.attrs import (
    IMAGE_KEYS,
    PATIENT_KEYS,
    SERIES_KEYS,
    STUDY_KEYS,
    dataset_attrs,
    query_dataset,
)
from mdm.catalog.flight import SingleFlight
from mdm.catalog.records import ROOT, Catalog, Level, Record
from mdm.config import Config, SiteSettings
from mdm.dicom.query import SiteResult, find_at
from mdm.errors import MdmError, NotFound, RetrieveError
from mdm.namespace.names import is_uid
from mdm.policy.pushdown import Narrowing

log = logging.getLogger(__name__)

NEGATIVE_TTL = 30.0
"""Seconds a name that no site holds (or that is hidden) answers NotFound without a C-FIND."""
NEGATIVE_MAX = 10_000
ANY_OF = frozenset({"ModalitiesInStudy"})
"""Keys whose backslash-separated values match any of them (PS3.4 C.6.2.1.2)."""
PREFETCH_MAX = 20_000
"""Most child listings one directory listing starts in the background."""

Answers = list[tuple[str, list[Dataset] | None]]
"""(site, datasets) per site asked; None where the site failed."""


class CatalogSync:
    """Listings and targeted lookups of the federation, through the catalog (module doc).

    ``limiter(site)`` is the site's association limiter (the one its retrievals take);
    ``nursery`` runs background refreshes; ``policy_version()`` names the policy in force
    (a policy edit may show what was hidden: the negative cache is cleared then)."""

    def __init__(
        self,
        config: Config,
        catalog: Catalog,
        *,
        limiter: Callable[[str], trio.CapacityLimiter],
        nursery: trio.Nursery,
        policy_version: Callable[[], str],
    ) -> None:
        self.config = config
        self.catalog = catalog
        self._limiter = limiter
        self._nursery = nursery
        self._policy_version = policy_version
        self._listings: SingleFlight[None] = SingleFlight()
        self._negative: dict[tuple[str, str], float] = {}
        self._negative_version = ""
        self.incomplete: dict[str, list[str]] = {}
        """Listing key -> the sites whose answer to it hit a result cap (it is partial)."""

    # ------------------------------------------------------------------ C-FIND
    async def find(
        self,
        level: str,
        identifier: Dataset,
        sites: Sequence[str] | None = None,
        *,
        cut: set[str] | None = None,
    ) -> Answers:
        """Fan a C-FIND out to ``sites`` (all by default); (site, datasets or None on error).

        ``cut`` collects the sites whose answer hit a result cap (it is partial)."""
        chosen = [s for s in self.config.sites if sites is None or s.name in sites]
        if not chosen:
            return []
        got: dict[str, SiteResult] = {}

        async def one(site: SiteSettings) -> None:
            # Under the site's association limit, the same one its retrievals take: a burst
            # of listings never opens more than max_associations to one PACS.
            got[site.name] = await trio.to_thread.run_sync(
                find_at,
                site,
                self.config.bridge,
                level,
                identifier,
                limiter=self._limiter(site.name),
            )

        async with trio.open_nursery() as nursery:
            for site in chosen:
                nursery.start_soon(one, site)
        out: Answers = []
        for r in (got[s.name] for s in chosen):
            if r.error is not None:
                # INFO: the caller reports what it could not do (EIO, a CLI error line).
                log.info("C-FIND %s at site %s failed: %s", level, r.site.name, r.error)
                out.append((r.site.name, None))
            else:
                out.append((r.site.name, list(r.datasets)))
                if r.truncated and cut is not None:
                    cut.add(r.site.name)
        return out

    def _mark(self, key: str, cut: set[str]) -> None:
        """Remember (or forget) that the listing ``key`` is incomplete at the sites ``cut``."""
        if cut:
            self.incomplete[key] = sorted(cut)
        else:
            self.incomplete.pop(key, None)

    @staticmethod
    def local_filter(
        site: str, recs: list[Record], keys: Sequence[tuple[str, str]], what: str
    ) -> list[Record]:
        """Keep the records that match ``keys`` (C-FIND matching) where their attributes hold
        the key; a PACS that did not apply a key is said at DEBUG (no values)."""
        from mdm.namespace.find import matches

        checkable = [(k, v) for k, v in keys if k in STUDY_KEYS or k in SERIES_KEYS]
        if not checkable:
            return recs

        def ok(k: str, v: str, shown: str | None) -> bool:
            if k in ANY_OF:  # a multi-valued key asked with several values: any of them
                return any(matches(shown, alt, k) for alt in v.split("\\"))
            return matches(shown, v, k)

        out: list[Record] = []
        for r in recs:
            failed = [k for k, v in checkable if not ok(k, v, r.attrs.get(k))]
            if failed:
                log.debug(
                    "site %s did not apply the key(s) %s of the %s: filtered locally",
                    site,
                    ",".join(failed),
                    what,
                )
                continue
            out.append(r)
        return out

    @staticmethod
    def to_records(level: Level, site: str, dss: list[Dataset]) -> list[Record]:
        """Catalog records of one site's C-FIND answers at ``level`` (UID-less ones skipped)."""
        recs: list[Record] = []
        for ds in dss:
            if level == "STUDY":
                a = dataset_attrs(ds, STUDY_KEYS)
                uid, parent = a.get("StudyInstanceUID", ""), a.get("PatientID", "")
            elif level == "SERIES":
                a = dataset_attrs(ds, SERIES_KEYS)
                uid, parent = a.get("SeriesInstanceUID", ""), a.get("StudyInstanceUID", "")
            else:
                a = dataset_attrs(ds, IMAGE_KEYS)
                uid, parent = a.get("SOPInstanceUID", ""), a.get("SeriesInstanceUID", "")
            if not uid:
                log.warning("site %s returned a %s answer without its UID; skipped", site, level)
                continue
            recs.append(Record(level=level, uid=uid, parent=parent, attrs=a, sites={site: 0.0}))
        return recs

    @staticmethod
    def patients_of(studies: list[Record], site: str) -> list[Record]:
        """The patient records of a site's studies (their patient attributes)."""
        seen: dict[str, Record] = {}
        for s in studies:
            pid = s.parent
            if pid not in seen:
                pa = {k: s.attrs[k] for k in PATIENT_KEYS if k in s.attrs}
                seen[pid] = Record(
                    level="PATIENT", uid=pid, parent=ROOT, attrs=pa, sites={site: 0.0}
                )
        return list(seen.values())

    # ------------------------------------------------------------------ listings
    async def ensure_studies(self, narrow: Narrowing | None = None) -> None:
        """The federated study listing (all sites), refreshed after the catalog TTL.

        With a ``narrow`` (a principal's grants as C-FIND keys, :mod:`mdm.policy.pushdown`),
        only the sites and studies it allows are asked for: a listing of its own, added to the
        catalog (it removes nothing: other principals' studies are not its to judge)."""
        if narrow is not None and not narrow.unbounded:
            await self._ensure_narrowed(narrow)
            return
        if self.catalog.fresh("studies"):
            return

        async def run() -> None:
            answered = 0
            cut: set[str] = set()
            for site, dss in await self.find("STUDY", query_dataset("STUDY", STUDY_KEYS), cut=cut):
                if dss is None:
                    continue
                answered += 1
                recs = self.to_records("STUDY", site, dss)
                self.catalog.merge(
                    self.patients_of(recs, site),
                    replace_site=site,
                    replace_scope=("PATIENT", ROOT),
                )
                self.catalog.merge(recs, replace_site=site, replace_scope=("STUDY", ROOT))
            self._mark("studies", cut)
            if answered:
                self.catalog.merge([], listed="studies")
            elif not self.catalog.listed_at("studies"):
                raise RetrieveError("no site answered the study listing")

        await self._refresh("studies", run)

    async def _ensure_narrowed(self, narrow: Narrowing) -> None:
        if narrow.nothing or self.catalog.fresh("studies"):
            return  # no grant: nothing to list; a fresh full listing holds every study
        key = narrow.listing_key()
        if self.catalog.fresh(key):
            return
        sites = sorted(narrow.sites) if narrow.sites is not None else None
        if sites is not None and not any(s.name in sites for s in self.config.sites):
            return

        async def run() -> None:
            answered = 0
            cut: set[str] = set()
            for keys in narrow.queries():
                q = query_dataset("STUDY", STUDY_KEYS, **dict(keys))
                for site, dss in await self.find("STUDY", q, sites, cut=cut):
                    if dss is None:
                        continue
                    answered += 1
                    recs = self.local_filter(
                        site, self.to_records("STUDY", site, dss), keys, "study listing"
                    )
                    self.catalog.merge(self.patients_of(recs, site) + recs)
            self._mark(key, cut)
            self._mark("studies", cut)
            if answered:
                self.catalog.merge([], listed=key)
            elif not self.catalog.listed_at(key):
                raise RetrieveError("no site answered the study listing")

        await self._refresh(key, run)

    async def ensure_series(self, study: Record) -> None:
        """The series listing of ``study`` (TTL)."""
        q = query_dataset("SERIES", SERIES_KEYS, StudyInstanceUID=study.uid)
        await self._ensure_children("SERIES", study, q, f"series of study {study.uid}")

    async def ensure_instances(self, study: Record, series: Record) -> None:
        """The instance listing of ``series`` (TTL)."""
        q = query_dataset(
            "IMAGE", IMAGE_KEYS, StudyInstanceUID=study.uid, SeriesInstanceUID=series.uid
        )
        await self._ensure_children("IMAGE", series, q, f"instances of series {series.uid}")

    async def _ensure_children(self, level: Level, parent: Record, q: Dataset, what: str) -> None:
        """List the children of ``parent`` at ``level`` at the sites that hold it (TTL)."""
        key = f"{level}:{parent.uid}"
        if self.catalog.fresh(key):
            return

        async def run() -> None:
            answered = 0
            cut: set[str] = set()
            for site, dss in await self.find(level, q, list(parent.sites) or None, cut=cut):
                if dss is None:
                    continue
                answered += 1
                recs = [
                    r for r in self.to_records(level, site, dss) if r.parent in ("", parent.uid)
                ]
                for r in recs:
                    r.parent = parent.uid
                self.catalog.merge(recs, replace_site=site, replace_scope=(level, parent.uid))
            self._mark(key, cut)
            if answered:
                self.catalog.merge([], listed=key)
            elif not self.catalog.listed_at(key):
                raise RetrieveError(f"no site answered the listing of the {what}")

        await self._refresh(key, run)

    async def _refresh(self, key: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run a listing; once one exists, a stale one is served while it refreshes.

        ``ls`` never waits for a slow or dead site when the catalog has any answer: the
        listing refreshes in the background and the next ``ls`` shows the result.
        """
        if self.catalog.listed_at(key) > 0:
            if not self._listings.in_flight(key):
                self._nursery.start_soon(self._refresh_in_background, key, run)
            return
        await self._listings.run(key, run)

    async def _refresh_in_background(self, key: str, run: Callable[[], Awaitable[None]]) -> None:
        try:
            await self._listings.run(key, run)
        except MdmError as e:
            log.info("background refresh of a listing failed: %s", e)

    # ------------------------------------------------------------------ prefetch
    def prefetch_series(self, studies: Sequence[Record]) -> None:
        """List the series of ``studies`` in the background, many at once: each C-FIND under
        its site's association limit, so a walk (``find``, ``du``) finds them listed."""
        todo = [s for s in studies if not self.catalog.fresh(f"SERIES:{s.uid}")]
        if todo:
            self._nursery.start_soon(self._prefetch, [(self.ensure_series, (s,)) for s in todo])

    def prefetch_instances(self, study: Record, series: Sequence[Record]) -> None:
        """List the instances of ``series`` of ``study`` in the background (as above)."""
        todo = [se for se in series if not self.catalog.fresh(f"IMAGE:{se.uid}")]
        if todo:
            self._nursery.start_soon(
                self._prefetch, [(self.ensure_instances, (study, se)) for se in todo]
            )

    async def _prefetch(
        self, jobs: Sequence[tuple[Callable[..., Awaitable[None]], tuple[Record, ...]]]
    ) -> None:
        async def one(fn: Callable[..., Awaitable[None]], args: tuple[Record, ...]) -> None:
            try:
                await fn(*args)
            except MdmError as e:
                log.debug("a background listing failed: %s", e)

        async with trio.open_nursery() as nursery:
            for fn, args in jobs[:PREFETCH_MAX]:
                nursery.start_soon(one, fn, args)

    # ------------------------------------------------------------------ negative cache
    def negative_hit(self, kind: str, name: str) -> bool:
        """Whether ``name`` (of ``kind``: study, series, image) was found missing lately."""
        version = self._policy_version()
        if version != self._negative_version:
            # A policy edit may show what was hidden: forget hidden and missing names alike.
            self._negative.clear()
            self._negative_version = version
        t = self._negative.get((kind, name))
        return t is not None and t > time.monotonic()

    def remember_missing(self, kind: str, name: str) -> None:
        """Answer NotFound for ``name`` without a C-FIND for the next NEGATIVE_TTL seconds."""
        if len(self._negative) > NEGATIVE_MAX:
            self._negative.clear()
        self._negative[(kind, name)] = time.monotonic() + NEGATIVE_TTL

    # ------------------------------------------------------------------ by UID
    async def query_study(self, uid: str) -> Answers:
        """The targeted C-FIND of one study at every site; RetrieveError if none answered
        (unreachable is not "missing", for hidden and missing UIDs alike)."""
        answers = await self.find("STUDY", query_dataset("STUDY", STUDY_KEYS, StudyInstanceUID=uid))
        if answers and all(dss is None for _, dss in answers):
            raise RetrieveError("no site answered the study query")
        return answers

    async def study(self, uid: str) -> Record:
        """The study ``uid``: from the catalog, or a targeted C-FIND if never listed."""
        rec = self.catalog.get("STUDY", uid)
        if rec is not None and rec.sites:
            return rec
        if not is_uid(uid) or self.negative_hit("study", uid):
            raise NotFound(uid)

        async def run() -> None:
            for site, dss in await self.query_study(uid):
                if dss:
                    recs = [r for r in self.to_records("STUDY", site, dss) if r.uid == uid]
                    self.catalog.merge(self.patients_of(recs, site) + recs)

        await self._listings.run("study:" + uid, run)
        rec = self.catalog.get("STUDY", uid)
        if rec is None or not rec.sites:
            self.remember_missing("study", uid)
            raise NotFound(uid)
        return rec

    async def series(self, study: Record, uid: str) -> Record:
        """Series ``uid`` of ``study`` (lists the study's series if needed)."""
        rec = self.catalog.get("SERIES", uid)
        if rec is None or not rec.sites:
            if not is_uid(uid) or self.negative_hit("series", uid):
                raise NotFound(uid)
            await self.ensure_series(study)
            rec = self.catalog.get("SERIES", uid)
        if rec is None or rec.parent != study.uid or not rec.sites:
            self.remember_missing("series", uid)
            raise NotFound(uid)
        return rec

    async def instance(self, study: Record, series: Record, uid: str) -> Record:
        """Instance ``uid`` of ``series``: catalog, or a targeted IMAGE-level C-FIND."""
        rec = self.catalog.get("IMAGE", uid)
        if rec is None or not rec.sites:
            if not is_uid(uid) or self.negative_hit("image", uid):
                raise NotFound(uid)
            q = query_dataset(
                "IMAGE",
                IMAGE_KEYS,
                StudyInstanceUID=study.uid,
                SeriesInstanceUID=series.uid,
                SOPInstanceUID=uid,
            )

            async def run() -> None:
                for site, dss in await self.find("IMAGE", q, list(series.sites) or None):
                    if dss:
                        recs = [r for r in self.to_records("IMAGE", site, dss) if r.uid == uid]
                        for r in recs:
                            r.parent = series.uid
                        self.catalog.merge(recs)

            await self._listings.run("image:" + uid, run)
            rec = self.catalog.get("IMAGE", uid)
        if rec is None or rec.parent != series.uid or not rec.sites:
            self.remember_missing("image", uid)
            raise NotFound(uid)
        return rec

    # ------------------------------------------------------------------ children
    def studies_of(self, pid: str, site: str | None = None) -> list[Record]:
        """The listed studies of patient ``pid`` (at ``site``, if given)."""
        return [
            s
            for s in self.catalog.children("STUDY", pid)
            if s.sites and (site is None or site in s.sites)
        ]

    def children(self, level: Level, parent: str) -> list[Record]:
        """The catalog's records under ``parent`` at ``level`` (as last listed)."""
        return self.catalog.children(level, parent)
