"""The local token issuer: ``mdm token init|issue|show`` round trip through TokenVerifier."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from mdm.access.identity import InvalidToken, TokenFile, TokenVerifier, jwk_thumbprint, load_keys
from mdm.access.tokens import issue_token, load_signing_key
from mdm.cli.main import MdmGroup
from mdm.cli.token import token
from mdm.config import IdentitySettings, load_config

ISS = "https://issuer.local"
AUD = "mdm"


@pytest.fixture
def mdm() -> click.Group:
    """A stand-in for the ``mdm`` group, with its error handling, holding only ``token``."""
    return MdmGroup(name="mdm", commands={"token": token})


def run(group: click.Group, *args: str) -> Result:
    return CliRunner().invoke(group, list(args), catch_exceptions=False)


def _config(tmp_path: Path, jwks: Path, issuer: str = ISS) -> Path:
    p = tmp_path / "mdm.toml"
    p.write_text(
        f'[cache]\ndir = "{tmp_path / "cache"}"\n'
        f'[identity]\nissuer = "{issuer}"\naudience = "{AUD}"\npublic_keys = "{jwks}"\n'
        'leeway = "5s"\n'
    )
    return p


def _issue(mdm: click.Group, key: Path, *extra: str) -> str:
    r = run(mdm, "token", "issue", "--key", str(key), "--issuer", ISS, "--audience", AUD, *extra)
    assert r.exit_code == 0, r.output
    return r.stdout.strip()


def test_init_issue_verify_round_trip(tmp_path: Path, mdm: click.Group) -> None:
    d = tmp_path / "issuer"
    r = run(mdm, "token", "init", str(d))
    assert r.exit_code == 0, r.output
    key, jwks = d / "signing-key.pem", d / "jwks.json"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    (jwk,) = json.loads(jwks.read_text())["keys"]
    assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == ("OKP", "Ed25519", "EdDSA", "sig")
    assert "d" not in jwk and jwk["kid"] in r.output
    assert jwk["kid"] == jwk_thumbprint(load_signing_key(key).public_key())
    assert load_keys(jwks).kids() == [jwk["kid"]]

    tok = _issue(
        mdm,
        key,
        "--sub",
        "grid-job-17",
        "--groups",
        "trial-nant, grid",
        "--claim",
        "site=CHLA",
        "--claim",
        'trial_ids:=["NANT-2007-01"]',
        "--claim",
        "tier:=2",
        "--ttl",
        "30m",
    )
    assert tok.count(".") == 2 and "\n" not in tok
    settings = IdentitySettings(issuer=ISS, audience=AUD, public_keys=jwks, leeway=5)
    p = TokenVerifier(settings).verify(tok)
    assert (p.sub, p.issuer, p.groups) == ("grid-job-17", ISS, ("trial-nant", "grid"))
    assert p.claims["site"] == "CHLA" and p.claims["trial_ids"] == ["NANT-2007-01"]
    assert p.claims["tier"] == 2
    assert 1790 <= p.expires - time.time() <= 1800

    # As a mount would use it: a private token file.
    tf = tmp_path / "token"
    tf.write_text(tok + "\n")
    tf.chmod(0o600)
    assert TokenFile(tf, TokenVerifier(settings)).current().sub == "grid-job-17"

    # show, unverified and verified.
    r = run(mdm, "token", "show", str(tf))
    assert r.exit_code == 0, r.output
    shown = json.loads(r.stdout)
    assert shown["header"] == {"alg": "EdDSA", "kid": jwk["kid"], "typ": "JWT"}
    assert shown["claims"]["sub"] == "grid-job-17" and "(in 29m" in shown["expires"]
    cfg = _config(tmp_path, jwks)
    r = run(mdm, "token", "show", str(tf), "--config", str(cfg))
    assert r.exit_code == 0 and f"valid: grid-job-17@{ISS}" in r.stdout
    (tmp_path / "other").mkdir()
    bad_cfg = _config(tmp_path / "other", jwks, issuer="https://other")
    r = run(mdm, "token", "show", str(tf), "--config", str(bad_cfg))
    assert r.exit_code == 1
    assert "invalid: wrong issuer 'https://issuer.local' (expected 'https://other')" in r.stdout
    assert load_config(cfg).identity is not None


def test_init_refuses_to_overwrite_without_force(tmp_path: Path, mdm: click.Group) -> None:
    d = tmp_path / "issuer"
    assert run(mdm, "token", "init", str(d)).exit_code == 0
    key = d / "signing-key.pem"
    before = key.read_bytes()
    r = run(mdm, "token", "init", str(d))
    assert r.exit_code == 1 and "already exists" in r.stderr and "--force" in r.stderr
    assert key.read_bytes() == before
    assert run(mdm, "token", "init", str(d), "--force").exit_code == 0
    assert key.read_bytes() != before


def test_rotated_key_refuses_old_tokens(tmp_path: Path, mdm: click.Group) -> None:
    d = tmp_path / "issuer"
    run(mdm, "token", "init", str(d))
    old = _issue(mdm, d / "signing-key.pem", "--sub", "alice")
    v = TokenVerifier(
        IdentitySettings(issuer=ISS, audience=AUD, public_keys=d / "jwks.json", leeway=5)
    )
    assert v.verify(old).sub == "alice"
    run(mdm, "token", "init", str(d), "--force")
    with pytest.raises(InvalidToken, match="unknown key id"):
        v.verify(old)
    assert v.verify(_issue(mdm, d / "signing-key.pem", "--sub", "alice")).sub == "alice"


def test_issue_bad_input(tmp_path: Path, mdm: click.Group) -> None:
    d = tmp_path / "issuer"
    run(mdm, "token", "init", str(d))
    key = d / "signing-key.pem"
    base = ["token", "issue", "--key", str(key), "--issuer", ISS, "--audience", AUD, "--sub", "a"]
    r = run(mdm, *base, "--claim", "sub=root")
    assert r.exit_code == 1 and "set by the issuer" in r.stderr
    r = run(mdm, *base, "--claim", "novalue")
    assert r.exit_code == 1 and "NAME=VALUE" in r.stderr
    r = run(mdm, *base, "--ttl", "soon")
    assert r.exit_code == 1 and "--ttl" in r.stderr
    key.chmod(0o644)
    r = run(mdm, *base)
    assert r.exit_code == 1 and "chmod 600" in r.stderr and r.stdout == ""
    r = run(mdm, "token", "issue", "--key", str(tmp_path / "nokey.pem"), *base[4:])
    assert r.exit_code == 1 and "no such signing key" in r.stderr


def test_show_expired_and_garbage(tmp_path: Path, mdm: click.Group) -> None:
    d = tmp_path / "issuer"
    run(mdm, "token", "init", str(d))
    tok = issue_token(
        d / "signing-key.pem", issuer=ISS, audience=AUD, sub="a", ttl=60, now=time.time() - 7200
    )
    f = tmp_path / "t"
    f.write_text(tok)
    r = run(mdm, "token", "show", str(f))
    assert r.exit_code == 0 and "(expired 1h" in json.loads(r.stdout)["expires"]
    r = run(mdm, "token", "show", str(f), "--config", str(_config(tmp_path, d / "jwks.json")))
    assert r.exit_code == 1 and "invalid: token expired at" in r.stdout
    f.write_text("garbage")
    r = run(mdm, "token", "show", str(f))
    assert r.exit_code == 1 and "not a JWT" in r.stderr
