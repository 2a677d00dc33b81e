"""Who sees what, end to end: signed tokens, policy files, a real mount per principal.

Each principal's view of the mount (every file a `find` would list) equals exactly what the
policy grants it; a policy edit shows within 5 s without remount; bad tokens are refused; the
audit chain verifies, and editing a line makes `mdm audit verify` fail naming it.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest

from mdm.deid import map_uid
from mdm.store.keys import LocalKeyring
from mdm_demo.localpacs import free_port
from mdm_demo.synth import TRIAL_PROTOCOL
from tests.conftest import PacsPair
from tests.mountutil import Mount, mdm
from tests.test_e2e_mount import same_dataset

pytestmark = pytest.mark.e2e
ISS = "https://idp.test.example"
AUD = "mdm-test"


def visible_files(mnt: Path) -> set[str]:
    """SOP UIDs of every .dcm file under /studies (what `find` over the mount lists)."""
    out = set()
    for _root, _dirs, files in os.walk(mnt / "studies"):
        out |= {f[: -len(".dcm")] for f in files if f.endswith(".dcm")}
    return out


def token(
    idp: Path, dest: Path, sub: str, groups: str = "", ttl: str = "1h", **claims: str
) -> Path:
    args = ["token", "issue", "--key", str(idp / "signing-key.pem"), "--issuer", ISS]
    args += ["--audience", AUD, "--sub", sub, "--ttl", ttl]
    if groups:
        args += ["--groups", groups]
    for k, v in claims.items():
        args += ["--claim", f"{k}={v}"]
    dest.write_text(mdm(*args).stdout.strip() + "\n")
    dest.chmod(0o600)
    return dest


def forged_token(tmp_path: Path, sub: str, groups: str) -> Path:
    """A well-formed token for ``sub`` signed by an issuer key nobody trusts (0600)."""
    other = tmp_path / "other-idp"
    if not other.exists():
        mdm("token", "init", str(other))
    dest = tmp_path / f"forged-{sub}.jwt"
    return token(other, dest, sub, groups)


POLICY = f"""
[[allow]]
id = "radiology-a"
description = "radiologists of SiteA: identified, SiteA only"
principals = {{ groups = ["radiologists"] }}
resources = {{ sites = ["SiteA"] }}
access = "identified"

[[allow]]
id = "grid-trial"
description = "grid jobs: the trial, de-identified"
principals = {{ groups = ["grid"] }}
resources = {{ trial = "{TRIAL_PROTOCOL}" }}
access = "deidentified"

[[allow]]
id = "researcher-cohort"
description = "a researcher: chosen patients, metadata"
principals = {{ subjects = ["asmith"] }}
resources = {{ patient_ids = ["@COHORT@"] }}
access = "metadata"
"""


def identity_config(
    pair: PacsPair,
    d: Path,
    idp: Path,
    policy: str,
    *,
    audit: Path | None = None,
    leeway: str = "0s",
) -> Path:
    """``d/mdm.toml`` for the pair under ``[identity]`` (tokens of ``idp``), the policy file
    ``d/policies/main.toml`` and, with ``audit``, an audit log; the bridge's AE is registered
    at both PACS."""
    pol = d / "policies"
    pol.mkdir(parents=True, exist_ok=True)
    (pol / "main.toml").write_text(policy)
    aet, port = f"MDMP{free_port() % 10000}", free_port()
    pair.add_destination(aet, port)
    extra = f"""
[identity]
issuer = "{ISS}"
audience = "{AUD}"
public_keys = "{idp / "jwks.json"}"
leeway = "{leeway}"

[policy]
dir = "{pol}"
"""
    if audit is not None:
        extra += f'\n[audit]\nlog = "{audit}"\n'
    return pair.write_config(d, bridge_options={"ae_title": aet, "port": port}, extra=extra)


def setup(pair: PacsPair, d: Path, idp: Path, cohort: list[str]) -> Path:
    policy = POLICY.replace('"@COHORT@"', ", ".join(f'"{c}"' for c in cohort))
    return identity_config(pair, d, idp, policy, audit=d / "audit" / "audit.jsonl")


def test_each_principal_sees_exactly_its_grant(
    orthanc_pair: PacsPair, idp: Path, tmp_path: Path
) -> None:
    pair = orthanc_pair
    cohort = sorted({i.patient_id for i in pair.instances})[:2]
    cfg = setup(pair, tmp_path, idp, cohort)
    on_a = pair.a.sop_uids
    trial = {i.sop_uid for i in pair.instances if i.trial == TRIAL_PROTOCOL}
    chosen = {i.sop_uid for i in pair.instances if i.patient_id in cohort}
    assert on_a and trial and chosen and trial != chosen

    cases = [
        ("rad", token(idp, tmp_path / "rad.jwt", "drad", "radiologists"), on_a, "identified"),
        ("grid", token(idp, tmp_path / "grid.jwt", "svc-grid", "grid"), trial, "deidentified"),
        ("res", token(idp, tmp_path / "res.jwt", "asmith"), chosen, "metadata"),
        ("nobody", token(idp, tmp_path / "nobody.jwt", "mallory", "visitors"), set(), None),
    ]
    for name, tok, expected, level in cases:
        m = Mount(cfg, tmp_path / f"mnt-{name}", token_file=tok)
        with m:
            mnt = m.mountpoint
            if level == "deidentified":
                # A de-identified view shows remapped UIDs only (checked in test_e2e_deid).
                secret = LocalKeyring.load(tmp_path / "keyring.json").secret("pseudonym:grid-trial")
                assert visible_files(mnt) == {map_uid(u, secret=secret) for u in expected}
                continue
            assert visible_files(mnt) == expected, name
            hidden = next(i for i in pair.instances if i.sop_uid not in expected)
            p = mnt / "studies" / hidden.study_uid / hidden.series_uid / f"{hidden.sop_uid}.dcm"
            with pytest.raises(FileNotFoundError):
                os.stat(p)
            if not expected:
                continue
            inst = next(i for i in pair.instances if i.sop_uid in expected)
            p = mnt / "studies" / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm"
            meta = json.loads((p.parent.parent / ".metadata.json").read_text())
            assert meta["access"] == level
            if level == "identified":
                same_dataset(p.read_bytes(), inst)
                assert meta["attributes"]["PatientID"] == inst.patient_id
            else:
                # Below identified: a pseudonym at most, never the Patient ID or the name.
                assert meta["attributes"].get("PatientID") != inst.patient_id
                assert "PatientName" not in meta["attributes"]
                assert inst.patient_id not in os.listdir(mnt / "patients")
                assert inst.patient_name not in json.dumps(meta)
                with pytest.raises(PermissionError):
                    p.read_bytes()

    # `mdm find` under the same policy: each principal's answers are its grant, PHI only
    # when identified.
    def find(tok: str, lvl: str = "study") -> list[dict[str, object]]:
        res = mdm("find", "--config", str(cfg), "--token-file", tok, "--json", "--level", lvl)
        return json.loads(res.stdout)  # type: ignore[no-any-return]

    rad_rows = find(str(tmp_path / "rad.jwt"))
    assert {r["StudyInstanceUID"] for r in rad_rows} == {
        i.study_uid for i in pair.instances if i.sop_uid in on_a
    }
    assert all(r["PatientName"] for r in rad_rows)
    res_rows = find(str(tmp_path / "res.jwt"))
    assert {r["StudyInstanceUID"] for r in res_rows} == {
        i.study_uid for i in pair.instances if i.patient_id in cohort
    }
    for r in res_rows:
        assert "PatientName" not in r and r["PatientID"] not in cohort
    assert find(str(tmp_path / "nobody.jwt"), "series") == []
    # explain names the deciding rule for a real object, looked up by UID and by path.
    inst = next(i for i in pair.instances if i.sop_uid in on_a)
    rad = tmp_path / "rad.jwt"
    out = mdm("policy", "explain", "--config", str(cfg), "--token", str(rad), inst.series_uid)
    assert "radiology-a" in out.stdout and "identified" in out.stdout
    path = f"/mnt/x/studies/{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.dcm"
    out = mdm(
        "policy",
        "explain",
        "--config",
        str(cfg),
        "--token",
        str(tmp_path / "grid.jwt"),
        path,
        check=False,
    )
    assert ("grid-trial" in out.stdout) == (inst.sop_uid in trial)
    # Below identified: the decision only, never the object's attributes.
    assert inst.patient_id not in out.stdout + out.stderr
    if inst.sop_uid not in trial:
        assert out.returncode == 1 and "nothing to explain" in out.stderr
    # The audit trail of all four mounts verifies.
    res = mdm("audit", "verify", "--config", str(cfg))
    assert "chain intact" in res.stdout or res.returncode == 0
    log = (tmp_path / "audit" / "audit.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in log]
    assert {"open", "retrieve"} <= {r["action"] for r in recs}
    # One record per open, carrying the key use that served it.
    allowed = [r for r in recs if r["action"] == "open" and r["decision"] == "allow"]
    assert allowed and all(r["key_site"] and r["key_level"] for r in allowed)
    assert "key-unwrap" not in {r["action"] for r in recs}
    assert any(r["action"] == "open" and r["decision"] == "deny" for r in recs)
    for r in recs:
        assert all(i.patient_id not in json.dumps(r) for i in pair.instances)
    # Editing any line breaks the chain, and verify names that line.
    lines = log[:]
    k = len(lines) // 2
    lines[k] = lines[k].replace('"allow"', '"deny"', 1) if '"allow"' in lines[k] else lines[k] + " "
    (tmp_path / "audit" / "audit.jsonl").write_text("\n".join(lines) + "\n")
    bad = mdm("audit", "verify", "--config", str(cfg), check=False)
    assert bad.returncode != 0
    assert f"line {k + 1}" in (bad.stdout + bad.stderr)


def test_policy_edit_and_token_expiry_in_a_running_mount(
    orthanc_pair: PacsPair, idp: Path, tmp_path: Path
) -> None:
    pair = orthanc_pair
    cfg = setup(pair, tmp_path, idp, ["NOBODY"])
    tok = token(idp, tmp_path / "rad.jwt", "drad", "radiologists", ttl="8s")
    on_a = pair.a.sop_uids
    with Mount(cfg, tmp_path / "mnt", token_file=tok) as m:
        mnt = m.mountpoint
        inst = next(i for i in pair.instances if i.sop_uid in on_a)
        p = mnt / "studies" / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm"
        f = open(p, "rb")
        assert f.read(16)
        # Revoke: radiologists lose SiteA. Hidden within 5 s, the open file stops reading.
        pol = tmp_path / "policies" / "main.toml"
        pol.write_text(pol.read_text().replace('sites = ["SiteA"]', 'sites = ["SiteZ"]'))
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5.0:
            try:
                os.stat(p)
            except FileNotFoundError:
                break
            time.sleep(0.2)
        assert time.monotonic() - t0 < 5.0, "revocation not visible within 5 s"
        with pytest.raises(OSError) as ei:
            os.pread(f.fileno(), 1024, 4096)
        assert ei.value.errno == errno.EACCES
        f.close()
        # A broken edit keeps the last good policy (still revoked) and says where.
        pol.write_text(pol.read_text() + "\n[[allow]]\nid = 3\n")
        time.sleep(2.5)
        with pytest.raises(FileNotFoundError):
            os.stat(p)
        assert "main.toml:" in m.log_text()
        # Restore the grant: visible again.
        pol.write_text(POLICY.replace('"@COHORT@"', '"NOBODY"'))
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5.0 and not p.exists():
            time.sleep(0.2)
        assert p.exists()
        # The token expires: opens fail with EACCES, one clear log line.
        time.sleep(max(0.0, 8.5 - (time.monotonic() - t0)))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                p.read_bytes()
            except PermissionError:
                break
            time.sleep(0.5)
        with pytest.raises(PermissionError):
            p.read_bytes()
    assert "expired" in m.log_text()


def test_revoked_grant_stops_reads_the_page_cache_would_serve(
    orthanc_pair: PacsPair, idp: Path, tmp_path: Path
) -> None:
    """The attack: keep a handle open on a file already read (its pages in the kernel's
    cache, where reads never reach the daemon), lose the grant, read on. The mount drops the
    cached pages of a revoked open file, so the read reaches the re-check: EACCES."""
    pair = orthanc_pair
    cfg = setup(pair, tmp_path, idp, ["NOBODY"])
    tok = token(idp, tmp_path / "rad.jwt", "drad", "radiologists")
    inst = next(i for i in pair.instances if i.sop_uid in pair.a.sop_uids)
    with Mount(cfg, tmp_path / "mnt", token_file=tok) as m:
        p = m.mountpoint / "studies" / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm"
        whole = p.read_bytes()  # cached now: the next open is served from the page cache
        fd = os.open(p, os.O_RDONLY)
        try:
            assert os.pread(fd, len(whole), 0) == whole
            # Downgrade: radiologists keep seeing the file (metadata), but may not read it.
            pol = tmp_path / "policies" / "main.toml"
            pol.write_text(pol.read_text().replace('access = "identified"', 'access = "metadata"'))
            deadline = time.monotonic() + 5.0
            while True:
                try:
                    got = os.pread(fd, len(whole), 0)
                except PermissionError:
                    break
                assert got == whole
                assert time.monotonic() < deadline, "an open file read on after revocation"
                time.sleep(0.2)
            assert p.exists()  # still listed: metadata access
            with pytest.raises(PermissionError):
                p.read_bytes()
        finally:
            os.close(fd)
    assert "grant of an open file revoked" in m.log_text()


def test_bad_tokens_refuse_to_mount(orthanc_pair: PacsPair, idp: Path, tmp_path: Path) -> None:
    cfg = setup(orthanc_pair, tmp_path, idp, ["X"])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    expired = token(idp, tmp_path / "old.jwt", "drad", "radiologists", ttl="1s")
    time.sleep(1.5)
    res = mdm("mount", str(mnt), "--config", str(cfg), "--token-file", str(expired), check=False)
    assert res.returncode != 0 and "expired" in res.stderr
    loose = token(idp, tmp_path / "loose.jwt", "drad", "radiologists")
    loose.chmod(0o644)
    res = mdm("mount", str(mnt), "--config", str(cfg), "--token-file", str(loose), check=False)
    assert res.returncode != 0 and "chmod 600" in res.stderr
    forged = forged_token(tmp_path, "drad", "radiologists")
    res = mdm("mount", str(mnt), "--config", str(cfg), "--token-file", str(forged), check=False)
    assert res.returncode != 0 and ("key id" in res.stderr or "signature" in res.stderr)
    res = mdm("mount", str(mnt), "--config", str(cfg), check=False)
    assert res.returncode != 0 and "token is required" in res.stderr
    assert not os.path.ismount(mnt)
    # A broken policy refuses to start too (fail closed), naming file and line.
    good = token(idp, tmp_path / "good.jwt", "drad", "radiologists")
    (tmp_path / "policies" / "main.toml").write_text('[[allow]]\nid = "x"\nacess = "identified"\n')
    res = mdm("mount", str(mnt), "--config", str(cfg), "--token-file", str(good), check=False)
    assert res.returncode == 2 and "main.toml:3" in res.stderr
