"""ACL policies: semantics, validation at file:line, test cases, CLI, hot reload."""

from __future__ import annotations

import logging
import os
import shutil
import textwrap
import threading
import time
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from mdm.access.decide import AccessLevel, Resource
from mdm.access.identity import Principal
from mdm.cli.policy import policy as policy_cli
from mdm.policy import (
    DEFAULT_DENY,
    Policy,
    PolicyError,
    PolicyResolver,
    explain_text,
    load_policy,
    principal_from_claims,
)
from mdm.policy.testing import load_cases, run_cases

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "acl_policies"
NOW = date(2026, 6, 1)


def write(d: Path, name: str, text: str) -> Path:
    p = d / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return p


def pol(tmp_path: Path, text: str, name: str = "p.toml") -> Policy:
    write(tmp_path, name, text)
    return load_policy(tmp_path, now=NOW)


def who(sub: str = "u", *groups: str, issuer: str = "https://idp", **claims: object) -> Principal:
    return Principal(sub=sub, issuer=issuer, groups=groups, claims=claims)


def res(
    site: str | None = "SiteA",
    patient_id: str | None = "P1",
    study_uid: str | None = "1.2.3",
    trial: str | None = None,
    modality: str | None = "CT",
    study_date: str | None = "20200115",
) -> Resource:
    return Resource(
        sites=frozenset([site] if site else []),
        patient_id=patient_id,
        study_uid=study_uid,
        trial=trial,
        modalities=frozenset([modality] if modality else []),
        study_date=study_date,
    )


MATRIX = """
[[allow]]
id = "meta-all"
principals = { groups = ["staff"] }
access = "metadata"

[[allow]]
id = "deid-a"
principals = { groups = ["staff"] }
resources = { sites = ["SiteA"] }
access = "deidentified"

[[allow]]
id = "ident-ct"
principals = { groups = ["rad"], claims = { hospital = ["SiteA", "SiteC"] } }
resources = { sites = ["SiteA"], modalities = ["ct"] }
access = "identified"

[[allow]]
id = "trial"
principals = { subjects = ["job"] }
resources = { trial = "T-1", study_dates = ["2020-01-01", "2020-12-31"] }
access = "deidentified"
expires = 2026-12-31

[[allow]]
id = "pinned"
principals = { subjects = ["svc"], issuers = ["https://good"] }
access = "identified"

[[allow]]
id = "old"
principals = { groups = ["staff"] }
access = "identified"
expires = 2026-01-01

[[deny]]
id = "vip"
description = "VIP"
resources = { patient_ids = ["VIP-1"] }

[[deny]]
id = "no-contractors-b"
principals = { groups = ["contractor"] }
resources = { sites = ["SiteB"] }
"""


# ---------------------------------------------------------------------------- semantics
@pytest.mark.parametrize(
    ("principal", "resource", "level", "rule"),
    [
        # default deny
        (who("x", "nobody"), res(), AccessLevel.NONE, DEFAULT_DENY),
        # highest allow wins (metadata < deidentified); lower ones lose
        (who("x", "staff"), res(), AccessLevel.DEIDENTIFIED, "deid-a"),
        (who("x", "staff"), res(site="SiteB"), AccessLevel.METADATA, "meta-all"),
        # claims match (scalar and list claim), modality matched case-insensitively
        (who("r", "rad", hospital="SiteA"), res(), AccessLevel.IDENTIFIED, "ident-ct"),
        (who("r", "rad", hospital=["SiteX", "SiteC"]), res(), AccessLevel.IDENTIFIED, "ident-ct"),
        (who("r", "rad", hospital="SiteB"), res(), AccessLevel.NONE, DEFAULT_DENY),
        (who("r", "rad"), res(), AccessLevel.NONE, DEFAULT_DENY),
        (who("r", "rad", hospital="SiteA"), res(modality="MR"), AccessLevel.NONE, DEFAULT_DENY),
        # deny wins over every allow, whoever asks
        (who("r", "rad", hospital="SiteA"), res(patient_id="VIP-1"), AccessLevel.NONE, "vip"),
        (who("x", "staff"), res(patient_id="VIP-1"), AccessLevel.NONE, "vip"),
        (who("x", "staff", "contractor"), res(site="SiteB"), AccessLevel.NONE, "no-contractors-b"),
        (who("x", "staff", "contractor"), res(), AccessLevel.DEIDENTIFIED, "deid-a"),
        # trial + date range; unknown attributes fail closed
        (who("job"), res(trial="T-1"), AccessLevel.DEIDENTIFIED, "trial"),
        (who("job"), res(trial="T-1", study_date="2020-12-31"), AccessLevel.DEIDENTIFIED, "trial"),
        (who("job"), res(trial="T-1", study_date="20210101"), AccessLevel.NONE, DEFAULT_DENY),
        (who("job"), res(trial="T-2"), AccessLevel.NONE, DEFAULT_DENY),
        (who("job"), res(trial=None), AccessLevel.NONE, DEFAULT_DENY),
        (who("job"), res(trial="T-1", study_date=None), AccessLevel.NONE, DEFAULT_DENY),
        (who("job"), res(trial="T-1", study_date="garbage"), AccessLevel.NONE, DEFAULT_DENY),
        (who("r", "rad", hospital="SiteA"), res(site=None), AccessLevel.NONE, DEFAULT_DENY),
        (who("r", "rad", hospital="SiteA"), res(modality=None), AccessLevel.NONE, DEFAULT_DENY),
        # issuer pinning
        (who("svc", issuer="https://good"), res(), AccessLevel.IDENTIFIED, "pinned"),
        (who("svc", issuer="https://evil"), res(), AccessLevel.NONE, DEFAULT_DENY),
    ],
)
def test_decision_matrix(
    tmp_path: Path, principal: Principal, resource: Resource, level: AccessLevel, rule: str
) -> None:
    p = pol(tmp_path, MATRIX)
    d = p.decide(principal, resource, NOW)
    assert (d.level, d.rule) == (level, rule)
    assert d.version == p.version
    # explain must agree with decide, always
    e = p.explain(principal, resource, NOW)
    assert e.decision == d
    assert (e.deciding.id if e.deciding else DEFAULT_DENY) == rule


def test_expiry(tmp_path: Path) -> None:
    p = pol(tmp_path, MATRIX)
    staff = who("x", "staff")
    # "old" (identified, expires 2026-01-01) applies through that day, then is ignored.
    assert p.decide(staff, res(), date(2026, 1, 1)).rule == "old"
    assert p.decide(staff, res(), datetime(2026, 1, 1, 23, 59, tzinfo=UTC)).rule == "old"
    assert p.decide(staff, res(), date(2026, 1, 2)).rule == "deid-a"
    assert p.decide(who("job"), res(trial="T-1"), date(2027, 1, 1)).rule == DEFAULT_DENY
    text = explain_text(p, staff, res(), NOW)
    assert "expired on 2026-01-01" in text
    # an expired rule is a warning at load time, not an error
    assert any("expired" in w.message and w.line == 34 for w in p.warnings)


def test_datetime_expiry_with_offset(tmp_path: Path) -> None:
    p = pol(
        tmp_path,
        """
        [[allow]]
        id = "a"
        principals = { subjects = ["u"] }
        access = "metadata"
        expires = 2026-06-01T12:00:00+02:00
        """,
    )
    assert p.decide(who(), res(), datetime(2026, 6, 1, 9, 59, tzinfo=UTC)).rule == "a"
    assert p.decide(who(), res(), datetime(2026, 6, 1, 10, 0, tzinfo=UTC)).rule == DEFAULT_DENY


def test_deny_without_principals_hits_everyone_and_multi_site(tmp_path: Path) -> None:
    p = pol(
        tmp_path,
        """
        [[allow]]
        id = "a-rad"
        principals = { groups = ["rad"] }
        resources = { sites = ["SiteA"] }
        access = "identified"

        [[deny]]
        id = "embargo-b"
        resources = { sites = ["SiteB"] }
        """,
    )
    both = Resource(sites=frozenset({"SiteA", "SiteC"}), patient_id="P", modalities=frozenset())
    assert p.decide(who("r", "rad"), both).rule == "a-rad"  # any listed site matches
    ab = Resource(sites=frozenset({"SiteA", "SiteB"}), patient_id="P")
    assert p.decide(who("r", "rad"), ab).rule == "embargo-b"  # deny catches any part
    assert p.decide(LOCAL := who("admin"), ab).level == AccessLevel.NONE
    assert LOCAL.sub == "admin"


def test_explain_reasons(tmp_path: Path) -> None:
    p = pol(tmp_path, MATRIX)
    e = p.explain(who("r", "rad", "staff", hospital="SiteA"), res(modality="CT"), NOW)
    by = {o.rule.id: o for o in e.outcomes}
    assert by["ident-ct"].status == "decided"
    assert by["deid-a"].reasons == ("lower level (deidentified) than ident-ct (identified)",)
    assert by["old"].status == "expired"
    assert "principal: sub 'r' not in [job]" in by["trial"].reasons
    assert "resource: trial unknown (rule requires [T-1])" in by["trial"].reasons
    assert by["vip"].reasons == ("resource: patient_id P1 not in [VIP-1]",)
    assert by["no-contractors-b"].reasons[0].startswith("principal: no group in [contractor]")
    e = p.explain(who("r", "rad", hospital="SiteA"), res(modality="MR"), NOW)
    assert (
        "resource: modality MR not in [CT]"
        in {o.rule.id: o for o in e.outcomes}["ident-ct"].reasons
    )
    e = p.explain(who("x", "staff"), res(patient_id="VIP-1"), NOW)
    by = {o.rule.id: o for o in e.outcomes}
    assert by["deid-a"].reasons == ("overridden by deny vip",)
    text = explain_text(p, who("x", "staff"), res(patient_id="VIP-1"), NOW)
    assert text.startswith("decision: none by deny vip (")
    assert "p.toml:36" in text


def test_principal_from_claims() -> None:
    p = principal_from_claims({"sub": "a", "iss": "https://i", "groups": ["g"], "dept": 7})
    assert (p.sub, p.issuer, p.groups) == ("a", "https://i", ("g",))
    assert p.claims["dept"] == 7 and "sub" not in p.claims
    assert principal_from_claims({"sub": "a", "groups": "g1, g2"}).groups == ("g1", "g2")


def test_numeric_and_boolean_claims(tmp_path: Path) -> None:
    p = pol(
        tmp_path,
        """
        [[allow]]
        id = "a"
        principals = { claims = { level = "3", trained = "true" } }
        access = "metadata"
        """,
    )
    assert p.decide(who(level=3, trained=True), res()).rule == "a"
    assert p.decide(who(level=3, trained=False), res()).rule == DEFAULT_DENY


def test_decide_is_fast(tmp_path: Path) -> None:
    p = pol(tmp_path, MATRIX)
    pr = who("r", "rad", "staff", hospital="SiteA")
    resources = [res(patient_id=f"P{i}") for i in range(2000)]
    t0 = time.perf_counter()
    for r in resources * 5:
        p.decide(pr, r)
    assert time.perf_counter() - t0 < 1.0  # 10k decisions: a big directory listing


# ---------------------------------------------------------------------------- validation
BAD = [
    ("[[allow]\nid = 'a'\n", 1, "TOML syntax error"),
    ('[[allow]]\nid = "a"\naccess = \n', 3, "TOML syntax error"),
    ('title = "x"\n', 1, "unknown key 'title'"),
    ('[[alow]]\nid = "a"\n', 1, "did you mean [[allow]]"),
    ('[allow]\nid = "a"\n', 1, "write each rule as [[allow]]"),
    (
        '[[allow]]\nid = "a"\nprincipals = { subjects = ["u"] }\naccess = "metadata"\n'
        "expire = 2027-01-01\n",
        5,
        "unknown key 'expire' in [[allow]]",
    ),
    (
        '[[allow]]\nid = "a"\naccess = "metadata"\n\n'
        'principals = { subjects = ["u"], grups = ["g"] }\n',
        5,
        "unknown key 'principals.grups'",
    ),
    (
        '[[allow]]\nid = "a"\naccess = "metadata"\nprincipals = { subjects = ["u"] }\n'
        'resources = { sites = [\n  "A"], modality = ["CT"] }\n',
        6,
        "did you mean 'modalities'",
    ),
    (
        '[[allow]]\nid = "a"\nprincipals = { subjects = "u" }\naccess = "metadata"\n',
        3,
        "principals.subjects must be a list of strings, not a string",
    ),
    (
        '[[allow]]\nid = 7\nprincipals = { subjects = ["u"] }\naccess = "metadata"\n',
        2,
        "id must be a string",
    ),
    (
        '[[allow]]\nprincipals = { subjects = ["u"] }\naccess = "metadata"\n',
        1,
        "[[allow]] without id",
    ),
    ('[[allow]]\nid = "a"\nprincipals = { subjects = ["u"] }\n', 1, "without access"),
    (
        '[[allow]]\nid = "a"\nprincipals = { subjects = ["u"] }\naccess = "full"\n',
        4,
        "unknown access level 'full'",
    ),
    ('[[allow]]\nid = "a"\naccess = "metadata"\n', 1, "without principals"),
    (
        '[[allow]]\nid = "a"\nprincipals = { claims = {} }\naccess = "metadata"\n',
        3,
        "without principals",
    ),
    (
        '[[allow]]\nid = "a"\nprincipals = { groups = [] }\naccess = "metadata"\n',
        3,
        "principals.groups is empty: the rule can never match",
    ),
    ('[[deny]]\nid = "d"\nresources = { patient_ids = [] }\n', 3, "can never match"),
    (
        '[[allow]]\nid = "a"\naccess = "metadata"\n'
        'principals = { subjects = ["u"], claims = { hospital = "N", groups = ["g"] } }\n',
        4,
        "claim 'groups' is not matched through claims: the rule can never match; use "
        "principals.groups",
    ),
    ('[[deny]]\nid = "d"\naccess = "none"\n', 3, "a deny takes no access"),
    ('[[deny]]\nid = "d"\n[deny.deid]\nx = 1\n', 3, "unknown key 'deid' in [[deny]]"),
    (
        '[[allow]]\nid = "a"\nprincipals = { subjects = ["u"] }\naccess = "metadata"\n'
        'resources = { study_dates = ["2024-01-01", "2020-12-31"] }\n',
        5,
        "study_dates range is reversed",
    ),
    (
        '[[allow]]\nid = "a"\nprincipals = { subjects = ["u"] }\naccess = "metadata"\n'
        'resources = { study_dates = ["2024-13-01", "2025-01-01"] }\n',
        5,
        "bad date '2024-13-01'",
    ),
    (
        '[[allow]]\nid = "a"\nprincipals = { subjects = ["u"] }\naccess = "metadata"\n'
        'resources = { study_dates = ["2024-1-1", "2025-01-01"] }\n',
        5,
        "bad date '2024-1-1'",
    ),
    (
        '[[allow]]\nid = "a"\nprincipals = { subjects = ["u"] }\naccess = "metadata"\n'
        'resources = { study_dates = ["2024-01-01"] }\n',
        5,
        "range of two dates",
    ),
    (
        '[[allow]]\nid = "a"\nprincipals = { subjects = ["u"] }\naccess = "metadata"\n'
        'expires = "2027-01-01"\n',
        5,
        "written without quotes",
    ),
    (
        '[[allow]]\nid = "a"\nprincipals = { subjects = ["u"] }\naccess = "metadata"\n'
        "expires = 5\n",
        5,
        "expires must be a TOML date",
    ),
    (
        '[[allow]]\nid = "a"\nprincipals = { subjects = ["u"] }\naccess = "metadata"\ndeid = 5\n',
        5,
        "deid must be a table",
    ),
    (
        '[[allow]]\nid = "a b"\nprincipals = { subjects = ["u"] }\naccess = "metadata"\n',
        2,
        "use letters, digits",
    ),
    (
        # a sub-table written as a header, and a key named in a comment / a string before it
        '[[allow]]\nid = "a"  # groups = [] here is a comment\ndescription = "grups = x"\n'
        'access = "metadata"\n[allow.principals]\nsubjects = ["u"]\ngrups = ["g"]\n',
        7,
        "unknown key 'principals.grups'",
    ),
    (
        '[[allow]]\nid = "a"\naccess = "metadata"\nprincipals.subjects = ["u"]\n'
        "principals.claims.dept = 3\n",
        5,
        "principals.claims.dept must be a string or a list of strings",
    ),
]


@pytest.mark.parametrize(("text", "line", "message"), BAD)
def test_validation_error_at_file_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    # a valid file first, so the broken one is not the only rule source
    write(tmp_path, "a-ok.toml", '[[deny]]\nid = "ok"\nresources = { sites = ["Z"] }\n')
    path = write(tmp_path, "b-bad.toml", text)
    with pytest.raises(PolicyError) as ei:
        load_policy(tmp_path)
    problems = [str(p) for p in ei.value.problems]
    assert any(p.startswith(f"{path}:{line}: ") and message in p for p in problems), problems
    assert ei.value.exit_code == 2


def test_every_problem_is_listed_and_rules_located(tmp_path: Path) -> None:
    write(
        tmp_path,
        "a.toml",
        """
        [[allow]]
        id = "one"
        principals = { groups = ["g"] }
        access = "metadata"

        [[allow]]
        id = "two"
        principals = { groups = ["g"] }
        access = "bogus"

        [[deny]]
        id = "one"
        resources = { sites = [] }
        """,
    )
    write(tmp_path, "b.toml", '[[deny]]\nid = "two"\nfoo = 1\n')
    with pytest.raises(PolicyError) as ei:
        load_policy(tmp_path)
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    got = {str(p) for p in ei.value.problems}
    assert f"{a}:9: unknown access level 'bogus' (none, metadata, deidentified, identified)" in got
    assert f"{a}:12: duplicate rule id 'one' (first defined at {a}:2)" in got
    assert f"{a}:13: resources.sites is empty: the rule can never match" in got
    assert f"{b}:2: duplicate rule id 'two' (first defined at {a}:7)" in got
    assert any(p.startswith(f"{b}:3: unknown key 'foo'") for p in got)
    assert len(got) == 5
    assert str(ei.value).splitlines()[0] == f"{tmp_path}: 5 policy errors"


def test_warnings_tests_dir_and_version(tmp_path: Path) -> None:
    write(
        tmp_path,
        "a.toml",
        """
        [[allow]]
        id = "a"
        principals = { groups = ["g"] }
        resources = { sites = ["NORTH", "NORHT"] }
        access = "metadata"
        expires = 2020-01-01
        """,
    )
    write(tmp_path, "tests/cases.toml", "this is not a policy file")
    write(tmp_path, "notes.txt", "ignored")
    p = load_policy(tmp_path, known_sites={"NORTH", "SOUTH"})
    msgs = [str(w) for w in p.warnings]
    assert f"{tmp_path / 'a.toml'}:6: rule a expired on 2020-01-01: it is ignored" in msgs
    assert (
        f"{tmp_path / 'a.toml'}:4: site 'NORHT' is not a configured site (did you mean 'NORTH'?)"
        in msgs
    )
    v1 = p.version
    assert len(v1) == 16
    write(tmp_path, "notes.txt", "still ignored")
    assert load_policy(tmp_path).version == v1
    write(tmp_path, "b.toml", "")
    assert load_policy(tmp_path).version != v1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "everything is denied" in str(load_policy(empty).warnings[0])
    with pytest.raises(PolicyError, match="not a directory"):
        load_policy(tmp_path / "missing")


def test_deid_table_kept(tmp_path: Path) -> None:
    p = pol(
        tmp_path,
        """
        [[allow]]
        id = "a"
        principals = { groups = ["g"] }
        access = "deidentified"
        [allow.deid]
        retain_longitudinal = "offset"
        scope = "nant"
        """,
    )
    assert p.rules[0].deid == {"retain_longitudinal": "offset", "scope": "nant"}


def test_deid_table_validated(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text(
        '[[allow]]\nid = "a"\nprincipals = { groups = ["g"] }\naccess = "deidentified"\n'
        '[allow.deid]\nkeep_dates = true\nretain_uids = "yes"\nscope = "a b"\n'
    )
    with pytest.raises(PolicyError) as ei:
        load_policy(tmp_path)
    text = str(ei.value)
    assert "p.toml:6: unknown de-identification option" in text
    assert "p.toml:7: retain_uids must be true or false" in text
    assert "p.toml:8: scope" in text


# ---------------------------------------------------------------------------- test cases + CLI
def test_examples_check_and_their_cases_pass() -> None:
    r = CliRunner().invoke(policy_cli, ["check", str(EXAMPLES)])
    assert r.exit_code == 0, r.output
    assert "OK, " in r.output
    pol_ = load_policy(EXAMPLES)
    results = run_cases(pol_, load_cases(EXAMPLES))
    assert len(results) >= 20
    assert all(x.passed for x in results), [x.case.name for x in results if not x.passed]
    # every example rule is exercised as a deciding rule, and there are negative cases
    assert {x.decision.rule for x in results} >= {r.id for r in pol_.rules}
    assert sum(x.case.expect == AccessLevel.NONE for x in results) >= 8
    r = CliRunner().invoke(policy_cli, ["test", str(EXAMPLES)])
    assert r.exit_code == 0, r.output
    assert "0 failed" in r.output and "FAIL" not in r.output


def test_mutated_expectation_fails(tmp_path: Path) -> None:
    d = tmp_path / "pol"
    shutil.copytree(EXAMPLES, d)
    f = d / "tests" / "vip.toml"
    text = f.read_text()
    assert 'expect = "none"\nrule = "vip-patients"' in text
    f.write_text(text.replace('expect = "none"', 'expect = "deidentified"', 1))
    r = CliRunner().invoke(policy_cli, ["test", str(d)])
    assert r.exit_code == 1, r.output
    assert "FAIL VIP trial patient is hidden from the grid job" in r.output
    assert "expected deidentified by vip-patients, got none by vip-patients" in r.output
    assert "1 failed" in r.output
    # a wrong deciding rule fails too, even when the level is right
    f.write_text(text.replace('rule = "vip-patients"', 'rule = "grid-nant-trial"', 1))
    r = CliRunner().invoke(policy_cli, ["test", str(d)])
    assert r.exit_code == 1 and "got none by vip-patients" in r.output


def test_cli_errors_exit_2_with_file_line(tmp_path: Path) -> None:
    write(tmp_path, "p.toml", '[[allow]]\nid = "a"\nprincipals = { groups = ["g"] }\naccess = 3\n')
    for cmd in ("check", "test"):
        r = CliRunner().invoke(policy_cli, [cmd, str(tmp_path)])
        assert r.exit_code == 2
        assert f"{tmp_path / 'p.toml'}:4: access must be a string" in r.output
    # broken test cases are located too
    write(
        tmp_path,
        "p.toml",
        '[[allow]]\nid = "a"\nprincipals = { groups = ["g"] }\naccess = "metadata"\n',
    )
    write(
        tmp_path,
        "tests/t.toml",
        '[[case]]\nname = "c"\nprincipal = { sub = "u" }\n'
        'resource = { site = "A", modalty = "CT" }\nexpect = "metadata"\n',
    )
    r = CliRunner().invoke(policy_cli, ["test", str(tmp_path)])
    assert r.exit_code == 2
    assert f"{tmp_path / 'tests' / 't.toml'}:4: unknown key 'resource.modalty'" in r.output
    # no cases at all is a failure, not a silent pass
    (tmp_path / "tests" / "t.toml").unlink()
    r = CliRunner().invoke(policy_cli, ["test", str(tmp_path)])
    assert r.exit_code != 0 and "no test cases" in r.output


def test_cli_explain(tmp_path: Path) -> None:
    args = ["explain", "--policy-dir", str(EXAMPLES), "--sub", "dr.north", "--groups",
            "radiologists", "--claim", "hospital=NORTH", "--site", "SOUTH", "--modality", "CT",
            "--patient-id", "MDM1090226"]  # fmt: skip
    r = CliRunner().invoke(policy_cli, args)
    assert r.exit_code == 0, r.output
    assert r.output.startswith("decision: metadata by allow radiology-federation-metadata")
    assert "resource: site SOUTH not in [NORTH]" in r.output
    import jwt  # a token's claims (explain does not verify; the mount does)

    tok = jwt.encode({"sub": "job-1", "iss": "x", "groups": ["nant-grid-jobs"]}, "k" * 32)
    (tmp_path / "t.jwt").write_text(tok)
    r = CliRunner().invoke(
        policy_cli,
        [
            "explain",
            "--policy-dir",
            str(EXAMPLES),
            "--token",
            str(tmp_path / "t.jwt"),
            "--site",
            "NORTH",
            "--trial",
            "NANT-2007-01",
            "--modality",
            "MR",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "decision: deidentified by allow grid-nant-trial" in r.output
    r = CliRunner().invoke(policy_cli, ["explain", "--policy-dir", str(EXAMPLES)])
    assert r.exit_code == 2 and "--token-file FILE or --sub" in r.output


# ---------------------------------------------------------------------------- hot reload
RULE = """
[[allow]]
id = "{id}"
principals = {{ groups = ["g"] }}
access = "{access}"
"""


def rewrite_file(path: Path, text: str) -> None:
    """Rewrite a file so that its mtime certainly changes (coarse-mtime filesystems)."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    st = path.stat()
    if st.st_mtime_ns == before:
        os.utime(path, ns=(st.st_atime_ns, before + 1_000_000))


def _wait_for(pred: object, timeout: float) -> float:
    assert callable(pred)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_hot_reload(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "p.toml"
    rewrite_file(f, RULE.format(id="a", access="metadata"))
    r = PolicyResolver(tmp_path, reload_interval=0.2)
    g = who("u", "g")
    d = r.decide(g, res())
    assert (d.level, d.rule) == (AccessLevel.METADATA, "a")
    v1 = r.version()
    # an edit takes effect within the interval (+ margin)
    rewrite_file(f, RULE.format(id="b", access="identified"))
    took = _wait_for(lambda: r.decide(g, res()).rule == "b", 2.0)
    assert took < r.reload_interval + r.settle + 0.5
    assert r.version() != v1 and r.decide(g, res()).version == r.version()
    v2 = r.version()
    # a broken edit: the last good policy stays, the error is logged once with file:line
    caplog.set_level(logging.INFO, logger="mdm.policy")
    rewrite_file(f, RULE.format(id="c", access="identified") + "\nfoo = 1\n")
    _wait_for(
        lambda: r.decide(g, res()) and any(rec.levelno == logging.ERROR for rec in caplog.records),
        2.0,
    )
    for _ in range(20):
        d = r.decide(g, res())
        time.sleep(0.03)
    assert (d.level, d.rule, r.version()) == (AccessLevel.IDENTIFIED, "b", v2)
    errors = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    assert f"{f}:7: unknown key 'foo'" in errors[0]
    assert v2 in errors[0]
    # fixing it takes effect again; removing the file revokes everything
    rewrite_file(f, RULE.format(id="c", access="deidentified"))
    _wait_for(lambda: r.decide(g, res()).rule == "c", 2.0)
    f.unlink()
    _wait_for(lambda: r.decide(g, res()).rule == DEFAULT_DENY, 2.0)


def test_half_written_file_never_takes_effect(tmp_path: Path) -> None:
    allow = RULE.format(id="a", access="identified")
    full = allow + '\n[[deny]]\nid = "vip"\nresources = { patient_ids = ["VIP-1"] }\n'
    f = tmp_path / "p.toml"
    f.write_text(full)
    os.utime(f, (time.time() - 10, time.time() - 10))
    r = PolicyResolver(tmp_path, reload_interval=0.0, settle=0.3)
    vip = res(patient_id="VIP-1")
    assert r.decide(who("u", "g"), vip).rule == "vip"
    # an in-place rewrite caught halfway: valid TOML, but the deny is cut off
    f.write_text(allow)
    seen = set()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.15:
        seen.add(r.decide(who("u", "g"), vip).rule)
    assert seen == {"vip"}  # the half file never took effect
    f.write_text(full.replace("VIP-1", "VIP-2") + "\n")  # the writer finishes
    _wait_for(lambda: r.decide(who("u", "g"), vip).rule == "a", 2.0)
    assert r.decide(who("u", "g"), res(patient_id="VIP-2")).rule == "vip"


def test_broken_policy_at_start_raises(tmp_path: Path) -> None:
    write(tmp_path, "p.toml", '[[deny]]\nid = "x"\nresources = { sites = "A" }\n')
    with pytest.raises(PolicyError, match=r"p\.toml:3: resources\.sites must be a list"):
        PolicyResolver(tmp_path)


def test_resolver_is_thread_safe_during_reloads(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    rewrite_file(f, RULE.format(id="a", access="metadata"))
    r = PolicyResolver(tmp_path, reload_interval=0.0)
    seen: set[str] = set()
    failures: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                seen.add(r.decide(who("u", "g"), res()).rule)
        except BaseException as e:  # pragma: no cover - reported below
            failures.append(e)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(20):
        rewrite_file(f, RULE.format(id=f"r{i}", access="metadata"))
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join()
    assert not failures
    assert seen <= {"a"} | {f"r{i}" for i in range(20)}
    _wait_for(lambda: r.decide(who("u", "g"), res()).rule == "r19", 2.0)
