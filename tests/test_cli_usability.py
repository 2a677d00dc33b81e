"""The command line as a user meets it: the real `mdm` command, its options and exit codes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jwt
import pytest

from mdm_demo.localpacs import free_port
from tests.conftest import PacsPair
from tests.mountutil import ROOT, mdm

EXAMPLES = ROOT / "acl_policies"


def test_token_issue_out_ttl_and_groups(tmp_path: Path) -> None:
    mdm("token", "init", str(tmp_path / "idp"))
    out = tmp_path / "job.jwt"
    out.write_text("old")
    out.chmod(0o644)  # an existing, too open file: rewritten 0600
    args = ["token", "issue", "--key", str(tmp_path / "idp" / "signing-key.pem")]
    args += ["--issuer", "https://i", "--audience", "a", "--sub", "job-1", "--ttl", "1h30m"]
    res = mdm(*args, "--groups", "a,b", "--groups", "c", "--out", str(out))
    assert res.stdout == "" and "0600" in res.stderr
    assert os.stat(out).st_mode & 0o777 == 0o600
    claims = jwt.decode(out.read_text().strip(), options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 5400
    assert claims["groups"] == ["a", "b", "c"]
    bad = mdm(*args[:-2], "--ttl", "1h30x", check=False)
    assert bad.returncode == 1 and "not a duration" in bad.stderr


def test_find_usage_errors_say_what_was_meant(tmp_path: Path) -> None:
    cfg = tmp_path / "mdm.toml"
    cfg.write_text(
        f'[cache]\ndir = "{tmp_path / "cache"}"\n'
        '[[site]]\nname = "NORTH"\nae_title = "N"\nhost = "127.0.0.1"\nport = 9\n'
        '[[site]]\nname = "SOUTH"\nae_title = "S"\nhost = "127.0.0.1"\nport = 9\n'
    )
    res = mdm("find", "--config", str(cfg), "Modaltiy=CT", check=False)
    assert res.returncode == 2
    assert "did you mean 'Modality'" in res.stderr and "Traceback" not in res.stderr
    res = mdm("find", "--config", str(cfg), "--site", "NORHT", "Modality=CT", check=False)
    assert res.returncode == 2 and "did you mean 'NORTH'" in res.stderr


def test_explain_json_fail_and_token_file(tmp_path: Path) -> None:
    base = ["policy", "explain", "--policy-dir", str(EXAMPLES)]
    who = ["--sub", "dr.north", "--groups", "radiologists", "--claim", "hospital=NORTH"]
    res = mdm(*base, *who, "--site", "SOUTH", "--modality", "CT", "--json")
    doc = json.loads(res.stdout)
    assert doc["decision"] == "metadata" and doc["rule"] == "radiology-federation-metadata"
    assert any(r["status"] == "no-match" and r["reasons"] for r in doc["rules"])
    # --fail: exit 1 unless some access is allowed (as `opa eval --fail`).
    assert mdm(*base, *who, "--site", "SOUTH", "--fail", check=False).returncode == 0
    res = mdm(*base, "--sub", "nobody", "--site", "SOUTH", "--fail", check=False)
    assert res.returncode == 1 and "decision: none" in res.stdout
    # --token-file, as every other command spells it.
    tok = jwt.encode({"sub": "job-1", "iss": "x", "groups": ["nant-grid-jobs"]}, "k" * 32)
    (tmp_path / "t.jwt").write_text(tok)
    res = mdm(*base, "--token-file", str(tmp_path / "t.jwt"), "--site", "NORTH", "--json",
              "--trial", "NANT-2007-01", "--modality", "MR")  # fmt: skip
    assert json.loads(res.stdout)["rule"] == "grid-nant-trial"


def test_policy_check_lints_against_the_config(tmp_path: Path) -> None:
    pol = tmp_path / "pol"
    pol.mkdir()
    (pol / "a.toml").write_text(
        "[[allow]]\n"
        'id = "wide"\n'
        'principals = { groups = ["g"] }\n'
        'access = "Identified"\n'
        "\n"
        "[[allow]]\n"
        'id = "typos"\n'
        'principals = { groups = ["g"], issuers = ["https://i"] }\n'
        'resources = { sites = ["NORHT"], modalities = ["CTT"] }\n'
        'access = "metadata"\n'
        "\n"
        "[[deny]]\n"
        'id = "no-trial"\n'
        'resources = { trial = "SECRET-1" }\n'
    )
    cfg = tmp_path / "mdm.toml"
    cfg.write_text(
        f'[cache]\ndir = "{tmp_path / "cache"}"\n'
        '[[site]]\nname = "NORTH"\nae_title = "N"\nhost = "127.0.0.1"\nport = 9\n'
        f'[policy]\ndir = "{pol}"\n'
    )
    res = mdm("policy", "check", "--config", str(cfg))
    warnings = [x for x in res.stderr.splitlines() if x.startswith("warning:")]
    for needle in (
        "site 'NORHT' is not a configured site (did you mean 'NORTH'?)",
        "modality 'CTT' is not a DICOM modality (did you mean 'CT'?)",
        "a deny on trial does not apply to objects without ClinicalTrialProtocolID",
        "identified access with no resources",
        "identified access without issuers",
        "access 'Identified': write it in lower case",
    ):
        assert any(needle in w for w in warnings), (needle, warnings)
    lines = [int(w.split(":")[2]) for w in warnings]
    assert lines == sorted(lines) and len(set(warnings)) == len(warnings)
    assert mdm("policy", "check", "--config", str(cfg), "--strict", check=False).returncode == 1
    # An impossible date says so, instead of the TOML parser's words.
    (pol / "b.toml").write_text(
        '[[allow]]\nid = "d"\nprincipals = { groups = ["g"] }\naccess = "metadata"\n'
        "expires = 2024-02-30\n"
    )
    res = mdm("policy", "check", "--config", str(cfg), check=False)
    assert res.returncode == 2
    assert "b.toml:5: 2024-02-30 is not a calendar date" in res.stderr


def test_man_pages_and_completion(tmp_path: Path) -> None:
    import subprocess

    out = subprocess.run(
        [str(ROOT / "scripts" / "manpages"), str(tmp_path / "man")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    pages = {p.name for p in (tmp_path / "man").iterdir()}
    assert {"mdm.1", "mdm-find.1", "mdm-fetch.1", "mdm-policy-explain.1", "mdm-mount.1"} <= pages
    assert "token-file" in (tmp_path / "man" / "mdm-policy-explain.1").read_text()
    # Completion comes from click: the documented line gives a bash completion script.
    env = {**os.environ, "_MDM_COMPLETE": "bash_source"}
    res = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "mdm")], env=env, capture_output=True, text=True
    )
    assert "_mdm_completion" in res.stdout


def test_audit_query_and_tail_filter(tmp_path: Path) -> None:
    from mdm.access.identity import Principal
    from mdm.audit.log import AuditLog

    log = tmp_path / "audit.jsonl"
    alice, bob = Principal(sub="alice", issuer="i"), Principal(sub="bob", issuer="i")
    with AuditLog(log) as a:
        for i in range(5):
            a.record(
                principal=alice if i % 2 else bob,
                action="open" if i < 4 else "find",
                decision="deny" if i == 3 else "allow",
                resource={"study_uid": f"1.2.3.{i}"},
                rule="r-1" if i < 2 else "r-2",
                policy="p",
            )
    base = ["audit", "query", "--log", str(log)]
    assert mdm(*base, "--count").stdout.strip() == "5"
    assert mdm(*base, "--sub", "alice", "--count").stdout.strip() == "2"
    assert mdm(*base, "--decision", "deny", "--count").stdout.strip() == "1"
    res = mdm(*base, "--uid", "1.2.3.4", "--json")
    assert json.loads(res.stdout)["action"] == "find"
    assert mdm(*base, "--rule", "r-2", "--action", "open", "--count").stdout.strip() == "2"
    assert mdm(*base, "--since", "1h", "--count").stdout.strip() == "5"
    assert mdm(*base, "--until", "2000-01-01", check=False).returncode == 1  # nothing matches
    bad = mdm(*base, "--since", "yesterday", check=False)
    assert bad.returncode == 2 and "--since" in bad.stderr
    tail = mdm("audit", "tail", "--log", str(log), "-n", "1", "--sub", "bob", "--json")
    assert json.loads(tail.stdout)["resource"]["study_uid"] == "1.2.3.4"


@pytest.mark.e2e
def test_sites_check_retrieve_names_the_missing_registration(
    orthanc_pair: PacsPair, tmp_path: Path
) -> None:
    pair = orthanc_pair
    aet, port = f"MDMC{free_port() % 10000}", free_port()
    pair.add_destination(aet, port)
    good = pair.write_config(tmp_path / "good", bridge_options={"ae_title": aet, "port": port})
    res = mdm("sites", "--config", str(good), "--check-retrieve", "--json")
    rows = json.loads(res.stdout)
    assert all(r["status"] == "up" and r["retrieve"][0]["ok"] for r in rows), rows
    # An AE title the PACS does not know: C-ECHO is fine, C-MOVE cannot come back.
    stranger = f"MDMX{free_port() % 10000}"
    bad = pair.write_config(
        tmp_path / "bad", bridge_options={"ae_title": stranger, "port": free_port()}
    )
    res = mdm("sites", "--config", str(bad), "--check-retrieve", check=False)
    assert res.returncode == 1, res.stdout
    assert f"register AE {stranger} at 127.0.0.1:" in res.stdout, res.stdout
    assert "retrieve failed" in res.stdout
    # The same by C-GET needs no registration.
    res = mdm(
        "sites", "--config", str(pair.write_config(tmp_path / "get", retrieve="get",
        bridge_options={"ae_title": stranger, "port": free_port()})), "--check-retrieve",
    )  # fmt: skip
    assert "C-GET ok" in res.stdout


@pytest.mark.e2e
def test_a_workstation_without_audit_section_still_records(
    orthanc_pair: PacsPair, tmp_path: Path
) -> None:
    cfg = orthanc_pair.write_config(tmp_path)
    assert "[audit]" not in cfg.read_text()
    mdm("find", "--config", str(cfg), "--level", "study", "Modality=CT")
    assert (tmp_path / "cache" / "audit.jsonl").is_file()
    res = mdm("audit", "query", "--config", str(cfg), "--action", "find", "--json")
    rec = json.loads(res.stdout.splitlines()[-1])
    assert rec["sub"] == "local-admin" and rec["filter_keys"] == "Modality"
    assert "chain intact" in mdm("audit", "verify", "--config", str(cfg)).stdout
