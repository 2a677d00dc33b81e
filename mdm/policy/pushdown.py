"""Policy push-down: what a principal's grants say about the studies it may ever see, as
C-FIND keys.

When every grant of a principal constrains a resource attribute, the union of those values
bounds what any listing can show it. :func:`narrowing` turns that bound into a
:class:`Narrowing`: the sites to ask and the study-level keys to send, so that a listing asks
the PACS for (a superset of) the principal's studies instead of the whole archive. It only
ever narrows a query; the decision on each record is still the policy's
(:mod:`mdm.access.gate`), so a PACS that ignores a key costs work, never a leak.

The values come from the policy, never from the principal: pushing them to a PACS tells the
PACS nothing the officer did not write down (docs/TRUST.md, docs/COLLECTIONS.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from mdm.policy.model import Rule

MAX_SPLIT = 16
"""Most patient IDs (or trials) asked for one by one; more and the key is not pushed."""


@dataclass(frozen=True)
class Narrowing:
    """Study-level C-FIND constraints implied by a principal's grants."""

    sites: frozenset[str] | None = None
    """Only these sites can hold a study the principal may see (None: any)."""
    keys: tuple[tuple[str, str], ...] = ()
    """(keyword, value) sent with every study C-FIND of the listing."""
    split: tuple[str, tuple[str, ...]] | None = None
    """(keyword, values): one C-FIND per value (single-valued keys such as PatientID)."""
    nothing: bool = False
    """No grant at all: a listing needs no query."""

    @property
    def unbounded(self) -> bool:
        """True if it narrows nothing (the federation-wide listing)."""
        return self.sites is None and not self.keys and self.split is None and not self.nothing

    def listing_key(self) -> str:
        """The catalog's name for the listing this narrowing asks for."""
        if self.unbounded:
            return "studies"
        text = repr((sorted(self.sites or ()), self.keys, self.split, self.nothing))
        return "studies?" + hashlib.sha256(text.encode()).hexdigest()[:16]

    def queries(self) -> list[tuple[tuple[str, str], ...]]:
        """The key sets of the C-FINDs the listing sends (one, or one per split value)."""
        if self.split is None:
            return [self.keys]
        kw, values = self.split
        return [(*self.keys, (kw, v)) for v in values]


def narrowing(grants: Sequence[Rule]) -> Narrowing:
    """The narrowing implied by ``grants`` (the principal's unexpired allow rules)."""
    if not grants:
        return Narrowing(nothing=True)
    sites: frozenset[str] | None = None
    if all(r.sites is not None for r in grants):
        sites = frozenset().union(*(r.sites or frozenset() for r in grants))
    keys: list[tuple[str, str]] = []
    split: tuple[str, tuple[str, ...]] | None = None
    if all(r.modalities is not None for r in grants):
        mods = sorted(frozenset().union(*(r.modalities or frozenset() for r in grants)))
        if mods:
            keys.append(("ModalitiesInStudy", "\\".join(mods)))
    if all(r.study_dates is not None for r in grants):
        lo = min(r.study_dates[0] for r in grants if r.study_dates is not None)
        hi = max(r.study_dates[1] for r in grants if r.study_dates is not None)
        keys.append(("StudyDate", f"{lo:%Y%m%d}-{hi:%Y%m%d}"))
    if all(r.trials is not None for r in grants):
        trials = sorted(frozenset().union(*(r.trials or frozenset() for r in grants)))
        if len(trials) == 1:
            keys.append(("ClinicalTrialProtocolID", trials[0]))
        elif 1 < len(trials) <= MAX_SPLIT:
            split = ("ClinicalTrialProtocolID", tuple(trials))
    if all(r.patient_ids is not None for r in grants):
        pids = sorted(frozenset().union(*(r.patient_ids or frozenset() for r in grants)))
        if len(pids) == 1:
            keys.append(("PatientID", pids[0]))
        elif 1 < len(pids) <= MAX_SPLIT and split is None:
            split = ("PatientID", tuple(pids))
    if all(r.study_uids is not None for r in grants):
        uids = sorted(frozenset().union(*(r.study_uids or frozenset() for r in grants)))
        if uids and len(uids) <= 500:
            # List of UID matching (PS3.4 C.2.2.2.2): one query for them all.
            keys.append(("StudyInstanceUID", "\\".join(uids)))
    return Narrowing(sites=sites, keys=tuple(sorted(keys)), split=split)
