"""``mdm policy``: check, test and explain ACL policy directories.

Exit codes: 0 success; 1 a test case failed; 2 the policy (or its test cases) has errors.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from mdm.access.decide import AccessLevel, Resource
from mdm.access.identity import Principal, principal_from_claims
from mdm.config import Config
from mdm.errors import MdmError, NotFound, UserError
from mdm.policy.evaluate import (
    Explanation,
    Policy,
    explain_lines,
    format_explanation,
)
from mdm.policy.load import load_policy
from mdm.policy.testing import load_cases, run_cases, undecided_rules

DEFAULT_DIR = "acl_policies"


class PolicyGroup(click.Group):
    """Prints policy and user errors as lines without a traceback, exiting with their code.

        Same behaviour as ``mdm.cli.main.MdmGroup`` (not imported: ``mdm.cli.main`` imports this
    module).
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"mdm: error: {e}", err=True)
            sys.exit(e.exit_code)


@click.group(cls=PolicyGroup)
def policy() -> None:
    """Check, test and explain ACL policies (see docs/POLICY.md)."""


@policy.command()
@click.argument(
    "directory",
    required=False,
    type=click.Path(path_type=Path),
    default=None,
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    help="mdm.toml: check against its sites, and its [policy] dir when DIRECTORY is not given.",
)
@click.option("--strict", is_flag=True, help="Warnings fail the check too (exit 1).")
def check(directory: Path | None, config_path: Path | None, strict: bool) -> None:
    """Validate the policy files of DIRECTORY (default: [policy] dir of --config, else
    acl_policies/ or $MDM_POLICY_DIR), and warn about rules that are valid but likely wrong:
    unknown sites or modalities, denies that fail open on a missing attribute, broad
    identified grants, case-variant levels."""
    known: list[str] | None = None
    if config_path is not None:
        from mdm.config import load_config

        config = load_config(config_path)
        known = [s.name for s in config.sites]
        if directory is None and config.policy is not None:
            directory = config.policy.dir
    if directory is None:
        directory = Path(os.environ.get("MDM_POLICY_DIR", DEFAULT_DIR))
    pol = load_policy(directory, known_sites=known)
    warnings = sorted(set(pol.warnings), key=lambda w: (w.file, w.line, w.message))
    for w in warnings:
        click.echo(f"warning: {w}", err=True)
    allows = sum(1 for r in pol.rules if r.effect == "allow")
    click.echo(
        f"{directory}: OK, {len(pol.rules)} rules ({allows} allow, {len(pol.rules) - allows} deny)"
        f" in {len(pol.files)} files, version {pol.version}"
        + (f", {len(warnings)} warning(s)" if warnings else "")
    )
    if strict and warnings:
        sys.exit(1)


@policy.command("test")
@click.argument(
    "directory",
    required=False,
    type=click.Path(path_type=Path),
    default=lambda: os.environ.get("MDM_POLICY_DIR", DEFAULT_DIR),
)
@click.option("--verbose", "-v", is_flag=True, help="Explain passing cases too.")
def test_cmd(directory: Path, verbose: bool) -> None:
    """Run the test cases in DIRECTORY/tests/*.toml against the policy in DIRECTORY."""
    pol = load_policy(directory)
    for w in pol.warnings:
        click.echo(f"warning: {w}", err=True)
    cases = load_cases(directory)
    if not cases:
        raise UserError(f"{directory}/tests: no test cases ([[case]] in *.toml)")
    results = run_cases(pol, cases)
    failed = 0
    for res in results:
        c, d = res.case, res.decision
        if res.passed:
            click.echo(f"PASS {c.name}")
            if not verbose:
                continue
        else:
            failed += 1
            want = c.expect.label + (f" by {c.rule}" if c.rule else "")
            click.echo(
                f"FAIL {c.name} ({c.where}): expected {want}, got {d.level.label} by {d.rule}"
            )
        click.echo("\n".join(f"       {line}" for line in explain_lines(res.explanation)))
    untested = undecided_rules(pol, results)
    if untested:
        click.echo(f"note: no case is decided by: {', '.join(untested)}", err=True)
    click.echo(f"{len(results) - failed} passed, {failed} failed (policy version {pol.version})")
    if failed:
        raise SystemExit(1)


def _claims(pairs: tuple[str, ...]) -> dict[str, object]:
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r}: expected KEY=VALUE", param_hint="--claim")
        prev = out.get(key)
        # A repeated claim becomes a list, as a multi-valued token claim would be.
        if prev is None:
            out[key] = value
        elif isinstance(prev, list):
            prev.append(value)
        else:
            out[key] = [prev, value]
    return out


def _token_principal(token_file: Path) -> Principal:
    import jwt

    try:
        token = token_file.read_text().strip()
    except OSError as e:
        raise UserError(f"{token_file}: cannot read: {e.strerror or e}") from None
    try:
        # Explaining is not authenticating: the claims are read as they are, and the output
        # says so. The mount verifies tokens before it decides anything.
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as e:
        raise UserError(f"{token_file}: not a JWT: {e}") from None
    return principal_from_claims(claims)


@policy.command()
@click.option(
    "--policy-dir",
    "directory",
    type=click.Path(path_type=Path),
    default=lambda: os.environ.get("MDM_POLICY_DIR", DEFAULT_DIR),
    show_default="acl_policies or $MDM_POLICY_DIR",
    help="The policy directory.",
)
@click.option(
    "--token-file",
    "--token",
    "token_file",
    type=click.Path(path_type=Path),
    default=lambda: os.environ.get("MDM_TOKEN_FILE"),
    help="Explain for the principal of this JWT (also $MDM_TOKEN_FILE; verified under "
    "[identity] when TARGET is given, read as it is otherwise).",
)
@click.option("--sub", help="Principal subject (instead of --token-file).")
@click.option("--issuer", default="", help="Principal issuer.")
@click.option("--groups", multiple=True, help="Groups, comma-separated or repeated.")
@click.option("--claim", "claims", multiple=True, help="KEY=VALUE (repeatable).")
@click.option("--site", "sites", multiple=True, help="Site holding the resource (repeatable).")
@click.option("--patient-id")
@click.option("--study-uid")
@click.option("--series-uid")
@click.option("--trial", help="ClinicalTrialProtocolID.")
@click.option("--modality", "modalities", multiple=True, help="Modality (repeatable).")
@click.option("--study-date", help="YYYY-MM-DD or YYYYMMDD.")
@click.option("--now", "now", type=click.DateTime(), help="Evaluate at this time (UTC).")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=lambda: os.environ.get("MDM_CONFIG", "mdm.toml"),
    help="mdm.toml, to look TARGET up in the federation (and its [policy] dir).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the explanation as JSON.")
@click.option("--fail", is_flag=True, help="Exit 1 unless the decision allows some access.")
@click.argument("target", required=False)
def explain(
    as_json: bool,
    fail: bool,
    config_path: Path,
    target: str | None,
    directory: Path,
    token_file: Path | None,
    sub: str | None,
    issuer: str,
    groups: tuple[str, ...],
    claims: tuple[str, ...],
    sites: tuple[str, ...],
    patient_id: str | None,
    study_uid: str | None,
    series_uid: str | None,
    trial: str | None,
    modalities: tuple[str, ...],
    study_date: str | None,
    now: datetime | None,
) -> None:
    """Explain a decision: the level, the deciding rule, and why no other rule decided.

    TARGET is a path in a mount (/mnt/mdm/studies/UID/...) or a study, series or SOP
    instance UID: its attributes are looked up in the federation of --config. Without TARGET,
    describe the resource with the flags.
    """
    if sub is not None:
        token_file = None  # --sub describes a principal; $MDM_TOKEN_FILE does not apply
    if (token_file is None) == (sub is None):
        raise click.UsageError("give either --token-file FILE or --sub (with --groups/--claim)")
    config = None
    if target is not None:
        from mdm.config import load_config

        config = load_config(config_path)
        if config.policy is not None and directory == Path(DEFAULT_DIR):
            directory = config.policy.dir
    pol = load_policy(directory)
    if config is not None and target is not None and config.identity is not None:
        # A real object under [identity]: a verified token, and nothing about the object
        # unless the principal may see it (or is a security officer).
        if token_file is None:
            raise UserError(
                f"{config_path}: [identity] is configured: explaining an object of the "
                "federation needs --token-file (verified; --sub only describes a resource by "
                "flags)"
            )
        level = _explain_guarded(config, pol, token_file, target, now, as_json)
        if fail and level < AccessLevel.METADATA:
            sys.exit(1)
        return
    if token_file is not None:
        principal = _token_principal(token_file)
        click.echo("note: token claims read without verifying its signature", err=True)
    else:
        assert sub is not None
        principal = Principal(
            sub=sub,
            issuer=issuer,
            groups=tuple(g.strip() for gs in groups for g in gs.split(",") if g.strip()),
            claims=_claims(claims),
        )
    if config is not None and target is not None:
        from mdm.access.explain import resource_for

        resource = resource_for(config, target)
        click.echo(
            f"resource: {target} (study {resource.study_uid}, sites "
            f"{', '.join(sorted(resource.sites))})",
            err=True,
        )
    else:
        resource = Resource(
            sites=frozenset(sites),
            patient_id=patient_id,
            study_uid=study_uid,
            series_uid=series_uid,
            trial=trial,
            modalities=frozenset(modalities),
            study_date=study_date,
        )
    exp = pol.explain(principal, resource, now)
    click.echo(
        json.dumps(explanation_dict(exp), indent=2)
        if as_json
        else format_explanation(pol, principal, resource, exp)
    )
    if fail and exp.decision.level < AccessLevel.METADATA:
        sys.exit(1)


def explanation_dict(exp: Explanation, *, reasons: bool = True) -> dict[str, Any]:
    """An explanation as JSON-ready data (``reasons=False``: decision and rule only)."""
    d = exp.decision
    out: dict[str, Any] = {
        "decision": d.level.label,
        "rule": d.rule,
        "policy_version": exp.version,
    }
    if reasons:
        out["rules"] = [
            {
                "id": o.rule.id,
                "effect": o.rule.effect,
                "access": o.rule.access.label,
                "status": o.status,
                "where": o.rule.where,
                "reasons": list(o.reasons),
            }
            for o in exp.outcomes
        ]
    return out


def _explain_guarded(
    config: Config,
    pol: Policy,
    token_file: Path,
    target: str,
    now: datetime | None,
    as_json: bool = False,
) -> AccessLevel:
    """``policy explain TARGET`` under ``[identity]``: the token is verified; a principal that
    may not see the object learns nothing of it (a hidden object and a missing one read the
    same); below ``identified``, only the decision and its rule (no attributes, no reasons:
    they name patient IDs and dates); security officers (``[policy] officers``) see all.
    TARGET may be a path or UID as the principal's own mount shows it (remapped ``2.25.`` UIDs
    of a de-identified view included)."""
    from mdm.access.explain import resource_for
    from mdm.access.identity import TokenVerifier

    assert config.identity is not None
    try:
        text = token_file.read_text().strip()
    except OSError as e:
        raise UserError(f"{token_file}: cannot read: {e.strerror or e}") from None
    principal = TokenVerifier(config.identity).verify(text)
    officers = set(config.policy.officers) if config.policy is not None else set()
    officer = bool(officers & set(principal.groups))
    resource: Resource | None
    try:
        resource = resource_for(config, target)
    except NotFound:
        resource = _resource_as_shown(config, principal, token_file, target)
    decision = pol.decide(principal, resource, now) if resource is not None else None
    if not officer and (decision is None or decision.level < AccessLevel.METADATA):
        raise UserError(
            f"{target}: nothing to explain for {principal.label()} (no such object, or not "
            "visible to this principal)"
        )
    assert resource is not None and decision is not None
    full = officer or decision.level >= AccessLevel.IDENTIFIED
    exp = pol.explain(principal, resource, now)
    if as_json:
        click.echo(json.dumps(explanation_dict(exp, reasons=full), indent=2))
    elif full:
        click.echo(format_explanation(pol, principal, resource, exp))
    else:
        click.echo(f"decision: {decision.level.label} by {decision.rule}")
        click.echo(
            "(attributes and per-rule reasons are shown to identified principals and security "
            "officers only)"
        )
    return decision.level


def _resource_as_shown(
    config: Config, principal: Principal, token_file: Path, target: str
) -> Resource | None:
    """The resource behind a path or UID of the principal's own view (remapped UIDs)."""
    from mdm.access.explain import parse_target, resource_for
    from mdm.keyservice.client import provider_for
    from mdm.namespace.find import original_of
    from mdm.policy import PolicyResolver
    from mdm.store.keys import LocalKeyring

    assert config.policy is not None
    study, series, sop, bare = parse_target(target)
    if not any(n and n.startswith("2.25.") for n in (study, series, sop, bare)):
        return None  # no remapped name: the originals were looked up already
    try:
        keys = provider_for(config.keys, token_file) or LocalKeyring.load(
            config.keys.keyring, create=False
        )
        resolver = PolicyResolver(config.policy.dir, known_sites=[s.name for s in config.sites])
        found = original_of(config, resolver, principal, keys.secret, study, series, sop, bare)
    except MdmError:
        return None
    if found is None:
        return None
    ostudy, oseries, osop = found
    path = "/x/studies/" + "/".join(
        [ostudy, *([oseries] if oseries else []), *([osop + ".dcm"] if osop else [])]
    )
    try:
        return resource_for(config, path)
    except NotFound:
        return None
