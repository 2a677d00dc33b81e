"""Names and views: how a principal's view names the federation, and back.

:class:`Names` turns records into the names a principal's view shows (patient pseudonyms,
remapped ``2.25.`` UIDs, ``/browse`` readable names) and names back into records. It holds two
caches, both shared by every principal of the process:

- the view of each decision (a :class:`~mdm.access.views.View` is a function of the decision
  alone, so two principals with the same decision share it);
- the alias table, remapped UID -> original, learnt from listings and bounded (oldest out
  first; a name no longer there is found again by listing its parent).

Neither cache grants anything. The alias table only says which original a remapped name *may*
stand for; a name resolves only if the asking principal's own view of that original gives
exactly that name (``*_named`` check it), so a principal never resolves a name its view would
not produce, whoever taught the table the alias. A name that exists but is hidden costs the
same work as a missing one and is NotFound alike (:meth:`Names.conceal`); the negative cache
remembers a hidden name for the principal it was hidden from only, so one principal's failed
lookups never hide another's names.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

from mdm.access.decide import Decision
from mdm.access.gate import Gate
from mdm.access.identity import Principal
from mdm.access.views import NON_PHI, View, view_of
from mdm.catalog.records import ROOT, Record
from mdm.catalog.sync import CatalogSync
from mdm.errors import NotFound
from mdm.namespace.names import safe_name

MAX_ALIASES = 200_000
"""Remapped UIDs remembered by a process (about 250 bytes each)."""
MAX_VIEWS = 1000
READABLE_DESC = 40
"""Longest description kept in a readable (``/browse``) name."""
METADATA = ".metadata.json"


class AliasTable:
    """Remapped (de-identified) UID -> original, bounded: the oldest go first."""

    def __init__(self, limit: int = MAX_ALIASES) -> None:
        self.limit = limit
        self._map: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._map)

    def __contains__(self, name: object) -> bool:
        return name in self._map

    def learn(self, name: str, uid: str) -> None:
        """Remember that ``name`` is shown for ``uid`` (no-op when they are the same)."""
        if name != uid and name not in self._map:
            self._map[name] = uid
            if len(self._map) > self.limit:
                for _ in range(max(self.limit // 10, 1)):
                    self._map.popitem(last=False)

    def original(self, name: str) -> str:
        """The original UID behind ``name`` if known, else ``name`` itself."""
        return self._map.get(name, name)


async def _none() -> None:
    return None


class Names:
    """Views, aliases and readable names over the catalog (see the module docstring)."""

    def __init__(
        self,
        sync: CatalogSync,
        gate: Gate,
        secret: Callable[[str], bytes],
        *,
        aliases: AliasTable | None = None,
    ) -> None:
        self.sync = sync
        self.gate = gate
        self._secret = secret
        self._views: dict[tuple[Any, ...], View] = {}
        self.aliases = aliases if aliases is not None else AliasTable()

    # ------------------------------------------------------------------ views
    def view(self, d: Decision) -> View:
        """The view a decision grants (names, metadata and content follow it)."""
        key = (d.level, d.rule, d.version)
        v = self._views.get(key)
        if v is not None:
            return v
        v = view_of(d, self.gate.resolver, self._secret)
        if len(self._views) > MAX_VIEWS:
            self._views.clear()
        self._views[key] = v
        return v

    def name(self, v: View, uid: str) -> str:
        """The name ``v`` shows for ``uid`` (a remapped one is remembered as an alias)."""
        name = v.uid_name(uid)
        self.aliases.learn(name, uid)
        return name

    # ------------------------------------------------------------------ patients
    async def patients(
        self, principal: Principal, site: str | None
    ) -> list[tuple[str, Record, View]]:
        """(directory name, patient, view) of every patient ``principal`` may see; a patient
        whose studies are seen in two views (identified here, de-identified there) appears
        twice."""
        await self.sync.ensure_studies(self.gate.narrowing(principal))
        out: dict[str, tuple[str, Record, View]] = {}
        for rec in self.sync.children("PATIENT", ROOT):
            if not rec.sites or (site is not None and site not in rec.sites):
                continue
            for s in self.sync.studies_of(rec.uid, site):
                d = self.gate.decide(principal, s)
                if self.gate.visible(d):
                    v = self.view(d)
                    name = v.patient_name(rec.uid)
                    out.setdefault(name, (name, rec, v))
        return list(out.values())

    async def patient(
        self, principal: Principal, name: str, site: str | None
    ) -> tuple[Record, View]:
        """The patient ``principal``'s view names ``name`` (at ``site``); NotFound otherwise."""
        if safe_name(name) == name:
            rec = self.sync.catalog.get("PATIENT", name)
            if rec is not None and rec.sites and (site is None or site in rec.sites):
                for s in self.sync.studies_of(rec.uid, site):
                    d = self.gate.decide(principal, s)
                    if self.gate.visible(d) and self.view(d).patient_name(rec.uid) == name:
                        return rec, self.view(d)
        for n, rec, v in await self.patients(principal, site):
            if n == name:
                return rec, v
        raise NotFound(name)

    # ------------------------------------------------------------------ studies and below
    @staticmethod
    def _hidden(principal: Principal, name: str) -> str:
        """The negative-cache key of a name hidden from ``principal`` (and only from it: a
        name another principal failed to resolve must not become NotFound for its owner)."""
        return f"{name}\0{principal.label()}\0{','.join(principal.groups)}"

    def _missing(self, kind: str, principal: Principal, name: str) -> bool:
        """Whether ``name`` was lately found missing (for all) or hidden (from ``principal``)."""
        return self.sync.negative_hit(kind, name) or self.sync.negative_hit(
            kind, self._hidden(principal, name)
        )

    async def conceal(
        self, kind: str, principal: Principal, name: str, work: Callable[[], Awaitable[Any]]
    ) -> NoReturn:
        """NotFound for a name that exists but is hidden from ``principal``, after the same
        ``work`` a name that exists nowhere costs (then the negative cache, as for a missing
        name): timing tells the two apart no better than the answer does."""
        key = self._hidden(principal, name)
        if not self.sync.negative_hit(kind, key):
            # Its errors too: with every site down a missing name is EIO, so a hidden one is.
            await work()
            self.sync.remember_missing(kind, key)
        raise NotFound(name)

    async def learn_studies(self, principal: Principal) -> None:
        """List the studies and learn the names ``principal``'s views give them."""
        await self.sync.ensure_studies(self.gate.narrowing(principal))
        for s in self.sync.children("STUDY", ROOT):
            d = self.gate.decide(principal, s)
            if s.sites and self.gate.visible(d):
                self.name(self.view(d), s.uid)

    async def study_named(self, principal: Principal, name: str) -> tuple[Record, Decision]:
        """The study ``principal``'s view names ``name``, and the decision on it."""
        if self._missing("study", principal, name):
            raise NotFound(name)
        if name not in self.aliases and name.startswith("2.25."):
            # Perhaps a remapped UID never listed here: the listing teaches the aliases.
            await self.learn_studies(principal)
        original = self.aliases.original(name)
        known = self.sync.catalog.get("STUDY", original) is not None
        study = await self.sync.study(original)
        d = self.gate.decide(principal, study)
        if not self.gate.visible(d) or self.name(self.view(d), study.uid) != name:
            # A study never listed was just looked up by the same C-FIND a missing one costs.
            work = (lambda: self.sync.query_study(study.uid)) if known else _none
            await self.conceal("study", principal, name, work)
        return study, d

    async def series_named(
        self, principal: Principal, study: Record, name: str
    ) -> tuple[Record, Decision]:
        """Series ``name`` (as ``principal``'s view names it) of ``study``, and the decision."""
        if self._missing("series", principal, name):
            raise NotFound(name)
        if name not in self.aliases and name.startswith("2.25."):
            await self.sync.ensure_series(study)
            for se in self.sync.children("SERIES", study.uid):
                self.name(self.view(self.gate.decide(principal, study, se)), se.uid)
        series = await self.sync.series(study, self.aliases.original(name))
        d = self.gate.decide(principal, study, series)
        if not self.gate.visible(d) or self.name(self.view(d), series.uid) != name:
            await self.conceal("series", principal, name, lambda: self.sync.ensure_series(study))
        return series, d

    async def instance_named(self, study: Record, series: Record, name: str, v: View) -> Record:
        """Instance file ``name`` (``<uid>.dcm`` as view ``v`` names it) of ``series``."""
        stem = name[: -len(".dcm")]
        if stem not in self.aliases and stem.startswith("2.25.") and v.kind == "deidentified":
            await self.sync.ensure_instances(study, series)
            for i in self.sync.children("IMAGE", series.uid):
                self.name(v, i.uid)
        inst = await self.sync.instance(study, series, self.aliases.original(stem))
        if self.name(v, inst.uid) != stem:
            raise NotFound(name)
        return inst

    # ------------------------------------------------------------------ readable names
    def readable_name(self, kind: str, rec: Record, v: View) -> str:
        """The ``/browse`` name of a study, series or instance: what its view shows of its
        date, number and description, then its (view's) UID, which is always the last
        ``_``-separated part (UIDs hold digits and dots only), so it is recoverable."""
        uid = self.name(v, rec.uid)
        if kind == "instance":
            return f"{instance_number_head(rec)}_{uid}.dcm"
        level = "STUDY" if kind == "study" else "SERIES"
        shown = v.attrs(level, rec.attrs, NON_PHI)
        if kind == "study":
            parts = [shown.get("StudyDate") or "nodate", shown.get("StudyDescription", "")]
        else:
            num = shown.get("SeriesNumber", "")
            head = f"{int(num):04d}" if num.strip().lstrip("-").isdigit() else "0000"
            parts = [head, shown.get("Modality", ""), shown.get("SeriesDescription", "")]
        words = [readable_part(x) for x in parts]
        return "_".join([w for w in words if w] + [uid])


def instance_number_head(rec: Record) -> str:
    """The start of an instance's ``/browse`` file name: its InstanceNumber, zero-padded."""
    num = rec.attrs.get("InstanceNumber", "")
    return f"{int(num):05d}" if num.strip().lstrip("-").isdigit() else "00000"


def uid_of_readable(name: str) -> str:
    """The UID name (``<uid>`` or ``<uid>.dcm``) a ``/browse`` name ends with."""
    if name == METADATA:
        return name
    if name.endswith(".dcm"):
        return name[:-4].rsplit("_", 1)[-1] + ".dcm"
    return name.rsplit("_", 1)[-1]


def readable_part(text: str) -> str:
    """A description as a name part: letters, digits, '-' and '.', spaces as '-', no '_'
    (it separates the parts), bounded."""
    out = "".join(c if c.isalnum() or c in "-." else "-" for c in text.strip())
    while "--" in out:
        out = out.replace("--", "-")
    return safe_name(out.strip("-.")[:READABLE_DESC]) if out.strip("-.") else ""
