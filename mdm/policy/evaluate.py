"""Deciding and explaining: the semantics of a policy.

Default deny; any matching, unexpired deny wins (level ``none``: the resource is invisible);
among matching, unexpired allows the highest ``access`` wins (the first in load order on a tie).

``decide`` and ``explain`` share one matching function (:func:`_mismatches`), so the
explanation can never disagree with the decision; ``decide`` merely stops at the first reason
a rule does not apply.

Unknown resource attributes fail closed: an attribute that is ``None`` (or an empty set) never
satisfies a rule that constrains it. Sites and modalities are sets (a study held at two sites, a
study with CT and MR series): such a condition is met when any of the resource's values is
listed. The mount decides series with the series' own modality, so an allow restricted to CT
shows the CT series of a mixed study and hides the others.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from mdm.access.decide import AccessLevel, Decision, Resource
from mdm.access.identity import RESERVED_CLAIMS, Principal
from mdm.policy.model import Problem, Rule

DEFAULT_DENY = "default-deny"


def normalize_now(now: datetime | date | None) -> datetime:
    """A timezone-aware instant: ``None`` is now, a date is its midnight (UTC), naive is UTC."""
    if now is None:
        return datetime.now(UTC)
    if not isinstance(now, datetime):
        return datetime(now.year, now.month, now.day, tzinfo=UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=UTC)


@functools.lru_cache(maxsize=4096)
def parse_study_date(text: str | None) -> date | None:
    """DICOM ``YYYYMMDD`` or ISO ``YYYY-MM-DD``; anything else is unknown (``None``)."""
    if not text:
        return None
    t = text.strip()
    try:
        if len(t) == 8 and t.isdigit():
            return date(int(t[:4]), int(t[4:6]), int(t[6:]))
        return date.fromisoformat(t)
    except ValueError:
        return None


def claim_strings(value: Any) -> frozenset[str]:
    """The string forms of a token claim (a list claim matches by any element)."""
    if isinstance(value, bool):
        return frozenset({"true" if value else "false"})
    if isinstance(value, str | int | float):
        return frozenset({str(value)})
    if isinstance(value, list | tuple | set | frozenset):
        out: set[str] = set()
        for v in value:
            if not isinstance(v, list | tuple | set | frozenset | dict):
                out |= claim_strings(v)
        return frozenset(out)
    return frozenset()


@dataclass(frozen=True)
class _Res:
    """A resource normalised once per decision (modalities upper-case, the date parsed)."""

    sites: frozenset[str]
    patient_id: str | None
    study_uid: str | None
    trial: str | None
    modalities: frozenset[str]
    study_date: date | None

    @classmethod
    def of(cls, r: Resource) -> _Res:
        return cls(
            sites=r.sites,
            patient_id=r.patient_id or None,
            study_uid=r.study_uid or None,
            trial=r.trial or None,
            modalities=frozenset(m.strip().upper() for m in r.modalities if m.strip()),
            study_date=parse_study_date(r.study_date),
        )


def _fmt(values: Iterable[str], limit: int = 6) -> str:
    vs = sorted(values)
    shown = ", ".join(vs[:limit])
    more = f", ... ({len(vs) - limit} more)" if len(vs) > limit else ""
    return f"[{shown}{more}]"


def _principal_mismatches(rule: Rule, p: Principal, first_only: bool) -> list[str]:
    out: list[str] = []
    if rule.subjects is not None and p.sub not in rule.subjects:
        out.append(f"principal: sub {p.sub!r} not in {_fmt(rule.subjects)}")
        if first_only:
            return out
    if rule.issuers is not None and p.issuer not in rule.issuers:
        out.append(f"principal: issuer {p.issuer!r} not in {_fmt(rule.issuers)}")
        if first_only:
            return out
    if rule.groups is not None and rule.groups.isdisjoint(p.groups):
        has = _fmt(p.groups) if p.groups else "none"
        out.append(f"principal: no group in {_fmt(rule.groups)} (has {has})")
        if first_only:
            return out
    for name, allowed in rule.claims:
        if name not in p.claims:
            out.append(f"principal: claim {name!r} missing (rule requires {_fmt(allowed)})")
        elif allowed.isdisjoint(claim_strings(p.claims[name])):
            got = _fmt(claim_strings(p.claims[name]))
            out.append(f"principal: claim {name!r} {got} not in {_fmt(allowed)}")
        else:
            continue
        if first_only:
            return out
    return out


def _one(label: str, value: str | None, allowed: frozenset[str] | None, out: list[str]) -> bool:
    """Checks a single-valued attribute; False (and a reason) when it does not match."""
    if allowed is None:
        return True
    if value is None:
        out.append(f"resource: {label} unknown (rule requires {_fmt(allowed)})")
        return False
    if value not in allowed:
        out.append(f"resource: {label} {value} not in {_fmt(allowed)}")
        return False
    return True


def _many(
    label: str, values: frozenset[str], allowed: frozenset[str] | None, out: list[str]
) -> bool:
    """Checks a set-valued attribute: any listed value matches."""
    if allowed is None:
        return True
    if not values:
        out.append(f"resource: {label} unknown (rule requires {_fmt(allowed)})")
        return False
    if allowed.isdisjoint(values):
        out.append(f"resource: {label} {_fmt(values)[1:-1]} not in {_fmt(allowed)}")
        return False
    return True


def _resource_mismatches(rule: Rule, r: _Res, first_only: bool) -> list[str]:
    out: list[str] = []
    if not _many("site", r.sites, rule.sites, out) and first_only:
        return out
    if not _one("patient_id", r.patient_id, rule.patient_ids, out) and first_only:
        return out
    if not _one("study_uid", r.study_uid, rule.study_uids, out) and first_only:
        return out
    if not _one("trial", r.trial, rule.trials, out) and first_only:
        return out
    if not _many("modality", r.modalities, rule.modalities, out) and first_only:
        return out
    if rule.study_dates is not None:
        lo, hi = rule.study_dates
        if r.study_date is None:
            out.append(f"resource: study_date unknown (rule requires {lo}..{hi})")
        elif not lo <= r.study_date <= hi:
            out.append(f"resource: study_date {r.study_date} outside {lo}..{hi}")
    return out


@dataclass(frozen=True)
class PolicyDecision(Decision):
    """A :class:`Decision` of a policy file set; its ``version`` names the policy in force.

    The audit trail records the version in force with each decision; reading it from the
    decision (not from the resolver afterwards) is exact even when a reload happens in between.
    """


@dataclass(frozen=True)
class RuleOutcome:
    """Why one rule did or did not decide.

    ``status`` is one of ``decided``, ``expired``, ``no-match``, ``overridden`` (an allow beaten
    by a deny), ``also-denies`` (a deny after the deciding one), ``lower`` / ``same-level`` (an
    allow beaten by a higher or earlier one).
    """

    rule: Rule
    status: str
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class Explanation:
    """A decision with the deciding rule and, for every other rule, why it did not decide."""

    decision: PolicyDecision
    deciding: Rule | None
    outcomes: tuple[RuleOutcome, ...]
    version: str
    now: datetime


@dataclass(frozen=True)
class Policy:
    """A loaded, validated policy directory (immutable; a reload builds a new one)."""

    directory: str
    version: str
    rules: tuple[Rule, ...]
    files: tuple[str, ...] = ()
    warnings: tuple[Problem, ...] = ()
    _denies: tuple[Rule, ...] = field(init=False, repr=False, compare=False)
    _allows: tuple[Rule, ...] = field(init=False, repr=False, compare=False)
    _cache: tuple[tuple[Principal, tuple[Rule, ...], tuple[Rule, ...]], ...] = field(
        init=False, repr=False, compare=False
    )
    _lock: threading.Lock = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Frozen dataclass: derived fields are set once here, through object.__setattr__.
        object.__setattr__(self, "_denies", tuple(r for r in self.rules if r.effect == "deny"))
        object.__setattr__(self, "_allows", tuple(r for r in self.rules if r.effect == "allow"))
        object.__setattr__(self, "_cache", ())
        object.__setattr__(self, "_lock", threading.Lock())

    def rule(self, rule_id: str) -> Rule | None:
        """The rule with this id, if any."""
        return next((r for r in self.rules if r.id == rule_id), None)

    def _for_principal(self, p: Principal) -> tuple[tuple[Rule, ...], tuple[Rule, ...]]:
        """The denies and allows whose principal conditions ``p`` meets (memoised).

        A mount asks for the same principal object thousands of times per listing; the cache is
        keyed by identity (``is``) and holds the principal itself, so an id is never reused.
        """
        for cached, denies, allows in self._cache:
            if cached is p:
                return denies, allows
        denies = tuple(r for r in self._denies if not _principal_mismatches(r, p, True))
        allows = tuple(r for r in self._allows if not _principal_mismatches(r, p, True))
        with self._lock:
            # Replaced, never mutated: readers iterate a tuple without taking the lock.
            cache = ((p, denies, allows), *self._cache[:7])
            object.__setattr__(self, "_cache", cache)
        return denies, allows

    def grants(self, principal: Principal, now: datetime | date | None = None) -> tuple[Rule, ...]:
        """The unexpired allow rules whose principal conditions ``principal`` meets (whatever
        the resource): what the principal may be granted somewhere."""
        t = normalize_now(now)
        return tuple(r for r in self._for_principal(principal)[1] if not r.expired(t))

    def decide(
        self, principal: Principal, resource: Resource, now: datetime | date | None = None
    ) -> PolicyDecision:
        """The access decision of ``principal`` on ``resource`` (no PHI in the result)."""
        t = normalize_now(now)
        res = _Res.of(resource)
        denies, allows = self._for_principal(principal)
        for r in denies:
            if not r.expired(t) and not _resource_mismatches(r, res, True):
                return PolicyDecision(AccessLevel.NONE, r.id, _reason(r), self.version)
        best: Rule | None = None
        for r in allows:
            if (best is None or r.access > best.access) and not r.expired(t):
                if not _resource_mismatches(r, res, True):
                    best = r
        if best is None:
            return PolicyDecision(
                AccessLevel.NONE, DEFAULT_DENY, "no rule grants access", self.version
            )
        return PolicyDecision(best.access, best.id, _reason(best), self.version)

    def explain(
        self, principal: Principal, resource: Resource, now: datetime | date | None = None
    ) -> Explanation:
        """The decision, the deciding rule, and why each other rule did not decide."""
        t = normalize_now(now)
        res = _Res.of(resource)
        matched: list[Rule] = []
        misses: dict[str, tuple[str, ...]] = {}
        for r in self.rules:
            if r.expired(t):
                continue
            why = _principal_mismatches(r, principal, False) + _resource_mismatches(r, res, False)
            if why:
                misses[r.id] = tuple(why)
            else:
                matched.append(r)
        deny = next((r for r in matched if r.effect == "deny"), None)
        best: Rule | None = None
        for r in matched:
            if r.effect == "allow" and (best is None or r.access > best.access):
                best = r
        deciding = deny or best
        decision = self.decide(principal, resource, t)
        outcomes: list[RuleOutcome] = []
        for r in self.rules:
            if r is deciding:
                outcomes.append(RuleOutcome(r, "decided"))
            elif r.expired(t):
                outcomes.append(RuleOutcome(r, "expired", (f"expired on {r.expires_text}",)))
            elif r.id in misses:
                outcomes.append(RuleOutcome(r, "no-match", misses[r.id]))
            elif r.effect == "deny":
                assert deny is not None
                outcomes.append(
                    RuleOutcome(r, "also-denies", (f"also matches; deny {deny.id} comes first",))
                )
            elif deny is not None:
                outcomes.append(RuleOutcome(r, "overridden", (f"overridden by deny {deny.id}",)))
            else:
                assert best is not None
                if r.access < best.access:
                    beaten = f"lower level ({r.access.label}) than {best.id} ({best.access.label})"
                    outcomes.append(RuleOutcome(r, "lower", (beaten,)))
                else:
                    beaten = f"same level as {best.id}, which comes first"
                    outcomes.append(RuleOutcome(r, "same-level", (beaten,)))
        return Explanation(decision, deciding, tuple(outcomes), self.version, t)


def _reason(rule: Rule) -> str:
    if rule.description:
        return rule.description
    return "denied" if rule.effect == "deny" else f"allowed {rule.access.label}"


def _describe_principal(p: Principal) -> str:
    parts = [f"sub={p.sub}", f"issuer={p.issuer or '(none)'}"]
    if p.groups:
        parts.append(f"groups={_fmt(p.groups, 20)}")
    for k in sorted(p.claims):
        if k in RESERVED_CLAIMS or k == "jti":
            continue
        parts.append(f"{k}={_fmt(claim_strings(p.claims[k]), 20)}")
    return " ".join(parts)


def _describe_resource(r: Resource) -> str:
    parts: list[str] = []
    if r.sites:
        parts.append(f"sites={_fmt(r.sites, 20)}")
    for label, v in (
        ("patient_id", r.patient_id),
        ("study_uid", r.study_uid),
        ("series_uid", r.series_uid),
        ("trial", r.trial),
    ):
        if v:
            parts.append(f"{label}={v}")
    if r.modalities:
        parts.append(f"modalities={_fmt(r.modalities, 20)}")
    if r.study_date:
        parts.append(f"study_date={r.study_date}")
    return " ".join(parts) or "(no attributes)"


_STATUS = {
    "decided": "DECIDED",
    "expired": "expired",
    "no-match": "no match",
    "overridden": "overridden",
    "also-denies": "also denies",
    "lower": "lower",
    "same-level": "same level",
}


def format_explanation(
    policy: Policy, principal: Principal, resource: Resource, exp: Explanation
) -> str:
    """Human-readable form of an :class:`Explanation` (for ``mdm policy explain``)."""
    d = exp.decision
    lines: list[str] = []
    if exp.deciding is None:
        lines.append(f"decision: {d.level.label} (default-deny: no rule grants access)")
    else:
        r = exp.deciding
        lines.append(f"decision: {d.level.label} by {r.effect} {r.id} ({r.where})")
        if r.description:
            lines.append(f"  {r.description}")
    lines.append(f"policy: {policy.directory} version {exp.version} at {exp.now:%Y-%m-%d %H:%M}Z")
    lines.append(f"principal: {_describe_principal(principal)}")
    lines.append(f"resource: {_describe_resource(resource)}")
    lines.append("rules:")
    if not exp.outcomes:
        lines.append("  (none)")
    for o in exp.outcomes:
        r = o.rule
        what = f"{r.effect} {r.id}" + (f" ({r.access.label})" if r.effect == "allow" else "")
        lines.append(f"  {_STATUS[o.status]:<11} {what}  {r.where}")
        lines.extend(f"      {why}" for why in o.reasons)
    return "\n".join(lines)


def explain_text(
    policy: Policy,
    principal: Principal,
    resource: Resource,
    now: datetime | date | None = None,
) -> str:
    """The explanation of one decision as text: decision, deciding rule, every other rule."""
    return format_explanation(policy, principal, resource, policy.explain(principal, resource, now))


def explain_lines(exp: Explanation) -> Sequence[str]:
    """The explanation's per-rule lines only (for test-failure reports)."""
    out: list[str] = []
    for o in exp.outcomes:
        out.append(f"{_STATUS[o.status]:<11} {o.rule.effect} {o.rule.id}")
        out.extend(f"    {why}" for why in o.reasons)
    return out
