"""``/collections``: the configured cohorts as directories, with the names, views, decisions
and audit of ``/patients``.

Paths::

    ("collections",)                                  the collections the principal may use
    ("collections", NAME)                             their patients (as the view names them)
    ("collections", NAME, Patient, StudyUID, SeriesUID, "<SOPInstanceUID>.dcm")

Below a collection's patient, a study, series or instance is the node of ``/studies`` at the
same UIDs (so decisions, views, reads and audit are those of everywhere else), kept only if
the collection holds it (:class:`~mdm.catalog.cohorts.Members`). A collection's patients are
found from its member studies alone: walking a collection never lists the federation.

"May use": a collection with a ``principals`` list is for those subjects (or ``group:NAME``)
only; one without is for whoever may see at least one of its studies. Either way only what
the policy shows the principal is listed inside.

Listing a collection (or one of its patients) starts the series listings of its studies in
the background, many at once under each site's association limit, so that a walk finds them
done (docs/COLLECTIONS.md, "Listings at scale").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from mdm.access.decide import Decision
from mdm.access.gate import Who
from mdm.access.identity import Principal
from mdm.catalog.cohorts import Members
from mdm.catalog.records import Record
from mdm.config import CollectionSettings
from mdm.errors import AccessDenied, MdmError, NotFound
from mdm.retrieval.fetcher import Target

if TYPE_CHECKING:
    from mdm.namespace.tree import Entry, Namespace, Node

Patients = dict[str, list[tuple[Record, Decision]]]
MEMO_MAX = 64
PLAN_CONCURRENCY = 64
"""Listings a warm-up plan waits on at once (each C-FIND still under its site's limit)."""


@dataclass
class Plan:
    """What warming a collection means for one principal."""

    collection: CollectionSettings
    targets: list[Target] = field(default_factory=list)
    not_readable: int = 0
    """Series the principal sees as metadata only (listed, never retrieved)."""
    errors: list[str] = field(default_factory=list)


class CollectionTree:
    """resolve / listdir / metadata below ``/collections`` (module docstring)."""

    def __init__(self, ns: Namespace) -> None:
        self.ns = ns
        self._patients: dict[tuple[object, ...], Patients] = {}

    # ------------------------------------------------------------------ who may use
    @staticmethod
    def named_for(principal: Principal, c: CollectionSettings) -> bool:
        """Whether ``principal`` is among the collection's ``principals`` (if it has any)."""
        if principal.admin or c.principals is None:
            return True
        return principal.sub in c.principals or any(
            f"group:{g}" in c.principals for g in principal.groups
        )

    async def usable(self, principal: Principal, c: CollectionSettings) -> Members | None:
        """The members of ``c`` if ``principal`` may use it (module docstring), else None."""
        if not self.named_for(principal, c):
            return None
        m = await self.ns.cohorts.members(c)
        if c.principals is not None:
            return m
        return m if self.patients(principal, m) else None

    def patients(self, principal: Principal, m: Members) -> Patients:
        """The patient directory names of the member studies ``principal`` may see.

        Memoised per members listing, principal and policy version: a walk asks for it at
        every directory, and it costs a decision per member study."""
        key = (
            id(m),
            m.listed,
            principal.label(),
            principal.groups,
            tuple(sorted((k, str(v)) for k, v in principal.claims.items())),
            self.ns.gate.resolver.version(),
        )
        got = self._patients.get(key)
        if got is not None:
            return got
        out: Patients = {}
        gate, names = self.ns.gate, self.ns.names
        for uid in sorted(m.studies):
            s = self.ns.sync.catalog.get("STUDY", uid)
            if s is None or not s.sites:
                continue
            d = gate.decide(principal, s)
            if gate.visible(d):
                out.setdefault(names.view(d).patient_name(s.parent), []).append((s, d))
        if len(self._patients) >= MEMO_MAX:
            self._patients.clear()
        self._patients[key] = out
        return out

    async def _collection(
        self, principal: Principal, name: str
    ) -> tuple[CollectionSettings, Members]:
        c = self.ns.cohorts.get(name)
        if c is None:
            raise NotFound(name)
        m = await self.usable(principal, c)
        if m is None:
            raise NotFound(name)
        return c, m

    # ------------------------------------------------------------------ resolve
    async def resolve(self, who: Who, path: tuple[str, ...]) -> Node:
        """The node at ``path`` (``("collections", NAME, ...)``, at least two names)."""
        from mdm.namespace.tree import Node

        principal = who()
        c, m = await self._collection(principal, path[1])
        if len(path) == 2:
            return Node(kind="collection", path=path, collection=c.name)
        pats = self.patients(principal, m)
        studies = pats.get(path[2])
        if not studies:
            raise NotFound(path[2])
        if len(path) == 3:
            s, d = studies[0]
            patient = self.ns.sync.catalog.get("PATIENT", s.parent) or Record(
                level="PATIENT", uid=s.parent, parent="", sites=dict(s.sites)
            )
            view = self.ns.names.view(d)
            return Node(kind="patient", path=path, patient=patient, view=view, collection=c.name)
        node = await self.ns.resolve(who, ("studies", *path[3:]))
        assert node.study is not None
        if node.study.uid not in {s.uid for s, _ in studies}:
            raise NotFound(path[3])
        if node.series is not None and not m.has_series(node.study.uid, node.series):
            raise NotFound(path[4])
        if (
            node.instance is not None
            and node.series is not None
            and not m.has_instance(node.series.uid, node.instance.uid)
        ):
            raise NotFound(path[5])
        node.path, node.collection = path, c.name
        node.patient = self.ns.sync.catalog.get("PATIENT", node.study.parent)
        return node

    # ------------------------------------------------------------------ listdir
    async def listdir(self, who: Who, path: tuple[str, ...]) -> list[Entry]:
        """The entries (without ``.metadata.json``) of a directory under ``/collections``."""
        from mdm.namespace.tree import Entry

        t = self.ns.started
        principal = who()
        if len(path) == 1:
            out: list[Entry] = []
            for c in self.ns.cohorts.all:
                if await self.usable(principal, c) is not None:
                    out.append(Entry(c.name, True, mtime=t))
            return out
        c, m = await self._collection(principal, path[1])
        pats = self.patients(principal, m)
        sync, names = self.ns.sync, self.ns.names
        if len(path) == 2:
            sync.prefetch_series([s for rows in pats.values() for s, _ in rows])
            return [Entry(n, True, mtime=t) for n in pats]
        if len(path) == 3:
            rows = pats.get(path[2])
            if not rows:
                raise NotFound(path[2])
            sync.prefetch_series([s for s, _ in rows])
            return [Entry(names.name(names.view(d), s.uid), True, mtime=t) for s, d in rows]
        node = await self.resolve(who, path)
        if node.kind == "study":
            assert node.study is not None
            await sync.ensure_series(node.study)
            kept = [
                se
                for se in sync.children("SERIES", node.study.uid)
                if se.sites and m.has_series(node.study.uid, se)
            ]
            out = []
            for se in kept:
                d = self.ns.gate.decide(principal, node.study, se)
                if self.ns.gate.visible(d):
                    out.append(Entry(names.name(names.view(d), se.uid), True, mtime=t))
                    if self.ns.volumes is not None:  # <series>.nii.gz/.json beside it
                        out += self.ns.volumes.entries(se, names.view(d), out[-1].name, t)
            sync.prefetch_instances(node.study, kept)
            return out
        if node.kind == "series":
            assert node.series is not None
            entries = await self.ns.listdir(who, ("studies", *path[3:]))
            return [
                e
                for e in entries
                if e.name != ".metadata.json"
                and m.has_instance(node.series.uid, names.aliases.original(e.name[:-4]))
            ]
        raise NotFound("not a directory")

    # ------------------------------------------------------------------ warm-up plan
    async def plan(self, who: Who, name: str) -> Plan:
        """Every object of collection ``name`` that ``who`` may read, as retrieval targets
        in its view (``mdm fetch --collection``, ``mdm collection status``). The series and
        instance listings run many at once, each under its site's association limit."""
        principal = who()
        c, m = await self._collection(principal, name)
        pats = self.patients(principal, m)
        sync, targets = self.ns.sync, self.ns.targets
        plan = Plan(collection=c)
        work = trio.CapacityLimiter(PLAN_CONCURRENCY)

        async def one_series(study: Record, se: Record) -> None:
            async with work:
                try:
                    ts = await targets.series_targets(principal, study, se)
                except AccessDenied:
                    plan.not_readable += 1  # metadata only: listed, never retrieved
                    return
                except MdmError as e:
                    plan.errors.append(f"series listing failed: {e}")
                    return
            plan.targets += [t for t in ts if m.has_instance(se.uid, t.sop_uid)]

        async def one_study(study: Record) -> None:
            async with work:
                try:
                    await sync.ensure_series(study)
                except MdmError as e:
                    plan.errors.append(f"study listing failed: {e}")
                    return
            async with trio.open_nursery() as nursery:
                for se in sync.children("SERIES", study.uid):
                    if se.sites and m.has_series(study.uid, se):
                        d = self.ns.gate.decide(principal, study, se)
                        if self.ns.gate.visible(d):
                            nursery.start_soon(one_series, study, se)

        async with trio.open_nursery() as nursery:
            for rows in pats.values():
                for s, _ in rows:
                    nursery.start_soon(one_study, s)
        plan.targets.sort(key=lambda t: (t.study_uid, t.series_uid, t.sop_uid))
        return plan

    # ------------------------------------------------------------------ metadata
    def annotate(self, who: Who, of: Node, doc: dict[str, Any]) -> None:
        """Add to a ``.metadata.json`` document what collections and result caps say of it:
        the collection (its keys' names, never their values) and the ``incomplete`` marker
        of a listing that hit a PACS's result cap."""
        incomplete: list[str] = []
        if of.collection is not None:
            c = self.ns.cohorts.get(of.collection)
            m = self.ns.cohorts.cached(of.collection)
            if c is not None and of.kind == "collection":
                doc["level"] = "COLLECTION"
                doc["collection"] = {
                    "name": c.name,
                    "by": "keys" if c.match else "manifest",
                    "keys": [k for k, _ in c.match],
                    "pin": c.pin,
                }
                if m is not None:
                    doc["collection"]["manifest_uids_not_found"] = m.not_found
            if m is not None and of.kind == "collection":
                incomplete += m.incomplete
        sync = self.ns.sync
        if (of.kind == "top" and of.path[:1] != ("collections",)) or of.kind == "site":
            for key, sites in sync.incomplete.items():
                if key == "studies" or key.startswith("studies?"):
                    incomplete += sites
        elif of.kind == "study" and of.study is not None:
            incomplete += sync.incomplete.get(f"SERIES:{of.study.uid}", [])
        elif of.kind == "series" and of.series is not None:
            incomplete += sync.incomplete.get(f"IMAGE:{of.series.uid}", [])
        if incomplete:
            doc["incomplete"] = {
                "sites": sorted(set(incomplete)),
                "reason": "a PACS result cap was hit: this listing may miss entries",
            }
