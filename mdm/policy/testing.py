"""Test cases kept beside the policies (``<policy dir>/tests/*.toml``) and their runner.

A case names a principal, a resource, the expected level and optionally the deciding rule::

    [[case]]
    name = "grid job reads a trial study de-identified"
    principal = { sub = "svc-grid", groups = ["grid-jobs"], issuer = "https://idp" }
    resource = { site = "NORTH", patient_id = "MDM6195422", trial = "NANT-2007-01",
                 modality = "CT", study_date = "2011-05-04" }
    expect = "deidentified"
    rule = "grid-nant-trial"
    now = 2026-06-01          # optional: evaluate at this date (expiry tests)
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from mdm.access.decide import AccessLevel, Resource
from mdm.access.identity import Principal
from mdm.policy.evaluate import Explanation, Policy, PolicyDecision, normalize_now
from mdm.policy.load import TESTS_SUBDIR, Checker, read_toml
from mdm.policy.model import PolicyError, Problem

_CASE_KEYS = {"name", "description", "principal", "resource", "expect", "rule", "now"}
_PRINCIPAL_KEYS = {"sub", "issuer", "groups", "claims"}
_RESOURCE_KEYS = {
    "site",
    "sites",
    "patient_id",
    "study_uid",
    "series_uid",
    "trial",
    "modality",
    "modalities",
    "study_date",
}


@dataclass(frozen=True)
class Case:
    """One test case: who, on what, expecting which level (and optionally which rule)."""

    name: str
    principal: Principal
    resource: Resource
    expect: AccessLevel
    file: str
    line: int
    rule: str | None = None
    now: datetime | None = None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class CaseResult:
    """The outcome of one case."""

    case: Case
    decision: PolicyDecision
    explanation: Explanation

    @property
    def passed(self) -> bool:
        c, d = self.case, self.decision
        return d.level == c.expect and (c.rule is None or d.rule == c.rule)


def _str_list(ck: Checker, v: Any, path: tuple[str, ...]) -> tuple[str, ...] | None:
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return tuple(v)
    ck.err(path, f"{'.'.join(path)} must be a string or a list of strings")
    return None


def _case(ck: Checker, raw: Any) -> Case | None:
    n_errors = len(ck.errors)
    tab = ck.table(raw, ())
    if tab is None:
        return None
    ck.unknown_keys(tab, _CASE_KEYS, (), "[[case]]")
    for key in ("name", "principal", "resource", "expect"):
        if key not in tab:
            ck.err((), f"[[case]] without {key}")
    name = ck.string(tab.get("name", ""), ("name",)) or ""
    expect = AccessLevel.NONE
    if "expect" in tab and (text := ck.string(tab["expect"], ("expect",))) is not None:
        try:
            expect = AccessLevel.parse(text)
        except ValueError as e:
            ck.err(("expect",), str(e))
    rule = ck.string(tab["rule"], ("rule",)) if "rule" in tab else None
    now: datetime | None = None
    if "now" in tab:
        if isinstance(tab["now"], date):
            now = normalize_now(tab["now"])
        else:
            ck.err(("now",), "now must be a TOML date or datetime (without quotes)")
    principal = Principal(sub="", issuer="")
    if (p := ck.table(tab.get("principal", {}), ("principal",))) is not None:
        ck.unknown_keys(p, _PRINCIPAL_KEYS, ("principal",), "principal")
        sub = ck.string(p.get("sub", ""), ("principal", "sub")) or ""
        issuer = ck.string(p.get("issuer", ""), ("principal", "issuer")) or ""
        groups = _str_list(ck, p.get("groups", []), ("principal", "groups")) or ()
        claims = ck.table(p.get("claims", {}), ("principal", "claims")) or {}
        if "sub" not in p:
            ck.err(("principal",), "principal without sub")
        principal = Principal(sub=sub, issuer=issuer, groups=groups, claims=dict(claims))
    resource = Resource()
    if (r := ck.table(tab.get("resource", {}), ("resource",))) is not None:
        ck.unknown_keys(r, _RESOURCE_KEYS, ("resource",), "resource")
        sites: tuple[str, ...] = ()
        mods: tuple[str, ...] = ()
        for key in ("site", "sites"):
            if key in r:
                sites += _str_list(ck, r[key], ("resource", key)) or ()
        for key in ("modality", "modalities"):
            if key in r:
                mods += _str_list(ck, r[key], ("resource", key)) or ()
        single: dict[str, str | None] = {}
        for key in ("patient_id", "study_uid", "series_uid", "trial", "study_date"):
            v = r.get(key)
            if isinstance(v, date):
                v = v.isoformat()  # study_date written as a TOML date
            single[key] = ck.string(v, ("resource", key)) if v is not None else None
        resource = Resource(
            sites=frozenset(sites),
            modalities=frozenset(mods),
            patient_id=single["patient_id"],
            study_uid=single["study_uid"],
            series_uid=single["series_uid"],
            trial=single["trial"],
            study_date=single["study_date"],
        )
    if len(ck.errors) > n_errors:
        return None
    return Case(name, principal, resource, expect, ck.file, ck.block.line, rule, now)


def load_cases(directory: Path) -> list[Case]:
    """The cases of ``directory/tests/*.toml`` (or of ``directory`` itself if it is ``tests``).

    Raises :class:`PolicyError` listing every problem (unknown keys, wrong types, duplicate
    case names) at ``file:line``.
    """
    directory = Path(directory)
    tests = directory if directory.name == TESTS_SUBDIR else directory / TESTS_SUBDIR
    errors: list[Problem] = []
    warnings: list[Problem] = []
    cases: list[Case] = []
    seen: dict[str, str] = {}
    for path in sorted(p for p in tests.glob("*.toml") if p.is_file()):
        parsed = read_toml(path, str(path), errors)
        if parsed is None:
            continue
        doc, smap = parsed
        for key in doc:
            if key != "case":
                hint = difflib.get_close_matches(key, ["case"], n=1)
                did = "; did you mean [[case]]?" if hint else ""
                errors.append(Problem(str(path), smap.top_key(key), f"unknown key {key!r}{did}"))
        entries = doc.get("case", [])
        if not isinstance(entries, list):
            errors.append(Problem(str(path), smap.top_key("case"), "write cases as [[case]]"))
            continue
        for n, raw in enumerate(entries):
            ck = Checker(str(path), smap, smap.block("case", n), errors, warnings)
            case = _case(ck, raw)
            if case is None:
                continue
            if case.name in seen:
                ck.err(("name",), f"duplicate case name {case.name!r} (first at {seen[case.name]})")
                continue
            seen[case.name] = case.where
            cases.append(case)
    if errors:
        raise PolicyError(tests, errors)
    return cases


def run_cases(policy: Policy, cases: list[Case]) -> list[CaseResult]:
    """Decide every case with ``policy`` (at the case's ``now`` if it has one)."""
    out: list[CaseResult] = []
    for c in cases:
        decision = policy.decide(c.principal, c.resource, c.now)
        out.append(CaseResult(c, decision, policy.explain(c.principal, c.resource, c.now)))
    return out


def undecided_rules(policy: Policy, results: list[CaseResult]) -> list[str]:
    """Rules that no case expects to decide (candidates for a missing test)."""
    covered = {r.decision.rule for r in results}
    return [r.id for r in policy.rules if r.id not in covered]
