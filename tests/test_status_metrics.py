"""`mdm status` and the Prometheus endpoint against real mounts of two real Orthancs.

Status: one screen (and --json) from the mount's control socket (0600 in a 0700 directory);
exit 0 healthy, 1 degraded (a site down, a failed policy reload, an invalid token), 2 when
several mounts share the configuration and none is chosen, 4 when no mount runs. Metrics: the
endpoint of a real mount, scraped over HTTP after reads, counts what the reads did, and no
label or value anywhere carries a UID, a patient ID or a name of the patients read.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mdm.config import load_config
from mdm.ops.status import socket_path
from mdm_demo.localpacs import free_port
from mdm_demo.synth import GeneratedInstance
from tests.conftest import PacsPair
from tests.mountutil import ROOT, Mount, mdm
from tests.test_e2e_mount import config, study_path
from tests.test_e2e_policy import AUD, ISS, POLICY, setup, token

pytestmark = pytest.mark.e2e


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        return str(r.read().decode())


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pat = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)$"
    for line in text.splitlines():
        m = re.match(pat, line)
        if m:
            return float(m.group(1))
    return 0.0


def status(cfg: Path, *args: str) -> tuple[int, str]:
    res = mdm("status", "--config", str(cfg), *args, check=False, timeout=60)
    return res.returncode, res.stdout + res.stderr


def read_series(mnt: Path, insts: list[GeneratedInstance]) -> int:
    n = 0
    for i in insts:
        n += len(study_path(mnt, i).read_bytes())
    return n


def test_status_and_metrics_of_a_running_mount(orthanc_pair: PacsPair, tmp_path: Path) -> None:
    pair = orthanc_pair
    port = free_port()
    cfg = config(pair, tmp_path, retrieve="move", extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    code, out = status(cfg)
    assert code == 4 and "no running mount" in out, out
    # A sentinel patient: read all of it, twice (misses, then hits).
    sentinel = pair.only_a_patients[0]
    insts = [i for i in pair.instances if i.patient_id == sentinel]
    with Mount(cfg, tmp_path / "mnt") as m:
        served = read_series(m.mountpoint, insts)
        read_series(m.mountpoint, insts)  # much of it from the kernel's page cache
        code, out = status(cfg)
        assert code == 0, out
        assert "SiteA" in out and "SiteB" in out and "healthy" in out
        held = open(study_path(m.mountpoint, insts[0]), "rb")  # pinned while open
        code, out = status(cfg, "--json")
        held.close()
        doc = json.loads(out)
        assert doc["healthy"] and doc["problems"] == []
        assert doc["cache"]["pinned_objects"] == 1 and doc["cache"]["pinned_bytes"] > 0
        assert {s["name"]: s["state"] for s in doc["sites"]} == {"SiteA": "up", "SiteB": "up"}
        assert all(s["rtt_ms"] is not None and s["in_flight"] >= 0 for s in doc["sites"])
        assert doc["cache"]["objects"] >= len(insts) and doc["cache"]["max_bytes"] == 2**30
        assert doc["audit"]["chain"] == "ok" and doc["audit"]["writes"] >= len(insts)
        assert doc["keys"]["mode"] == "local keyring"
        assert doc["token"]["subject"] == "local-admin"
        assert doc["mount"]["mountpoint"] == str(m.mountpoint)
        # The control socket: the mounting user's only.
        sock = socket_path(load_config(cfg), m.mountpoint)
        assert sock.parent == tmp_path / "cache" / "run"
        assert stat.S_ISSOCK(os.stat(sock).st_mode)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700

        text = scrape(port)
        assert sample(text, "mdm_objects_total", site="SiteA", result="stored") >= len(insts)
        assert sample(text, "mdm_retrievals_total", site="SiteA", result="ok") >= 1
        assert sample(text, "mdm_retrieval_seconds_count", site="SiteA") >= 1
        assert sample(text, "mdm_bytes_received_total", site="SiteA") > 0
        assert sample(text, "mdm_bytes_served_total") >= served
        assert sample(text, "mdm_cache_lookups_total", result="miss") >= 1
        assert sample(text, "mdm_cache_lookups_total", result="hit") >= len(insts)
        assert sample(text, "mdm_open_seconds_count", cache="hit") >= len(insts)
        assert sample(text, "mdm_fuse_operations_total", op="read") >= len(insts)
        assert sample(text, "mdm_fuse_operations_total", op="lookup") >= 1
        assert sample(text, "mdm_cache_bytes") > 0
        assert sample(text, "mdm_cache_max_bytes") == 2**30
        assert sample(text, "mdm_policy_decisions_total", level="study", result="identified") > 0
        assert sample(text, "mdm_audit_writes_total", result="ok") >= len(insts)
        assert sample(text, "mdm_up", role="mount") == 1
        # An error is counted by operation and errno name.
        with pytest.raises(FileNotFoundError):
            os.stat(m.mountpoint / "studies" / "1.2.3.4.5.6.7.8.9")
        text = scrape(port)
        assert sample(text, "mdm_fuse_errors_total", op="lookup", errno="ENOENT") >= 1
        # No PHI and no UID, in any label or value: every identifier of every patient.
        for i in pair.instances:
            for value in (i.patient_id, i.study_uid, i.series_uid, i.sop_uid, i.accession_number):
                assert value not in text, value
            for part in i.patient_name.split("^"):
                if len(part) > 2:
                    assert part not in text, part
        # Every label value is from a closed set: no free text got in.
        values = set(re.findall(r'="([^"]*)"', text))
        allowed = re.compile(
            r"^(SiteA|SiteB|none|ok|incomplete|timeout|error|refused|stored|failed|hit|miss|"
            r"study|series|object|metadata|deidentified|identified|mount|keyserver|"
            r"[a-z]+|E[A-Z]+|[0-9.+Inf]+|[0-9]+|/v1/[a-z/-]+|other|"
            r"[a-z_]+|[A-Za-z]+\.[a-z_0-9]+)$"
        )
        assert all(allowed.match(v) for v in values), sorted(values)
    code, out = status(cfg)
    assert code == 4 and "no running mount" in out, out


def test_status_chooses_among_mounts_and_reports_problems(
    orthanc_pair: PacsPair, tmp_path: Path
) -> None:
    pair = orthanc_pair
    dead = free_port()  # nothing listens: a site that is down
    extra = (
        f'[[site]]\nname = "SiteDown"\nae_title = "DOWN"\nhost = "127.0.0.1"\nport = {dead}\n'
        'timeout = "2s"\n'
    )
    cfg = config(pair, tmp_path, retrieve="move", extra=extra)
    with Mount(cfg, tmp_path / "mnt1") as m1, Mount(cfg, tmp_path / "mnt2") as m2:
        code, out = status(cfg)
        assert code == 2, out
        assert str(m1.mountpoint) in out and str(m2.mountpoint) in out
        code, out = status(cfg, "--mountpoint", str(m2.mountpoint), "--json")
        assert code == 1, out
        doc = json.loads(out)
        assert doc["mount"]["mountpoint"] == str(m2.mountpoint)
        states = {s["name"]: s["state"] for s in doc["sites"]}
        assert states == {"SiteA": "up", "SiteB": "up", "SiteDown": "down"}
        assert any(p.startswith("site SiteDown: down") for p in doc["problems"])
        # The second mount found the storage port taken: it retrieves by C-GET.
        assert doc["mount"]["retrieve_by_get_only"]
        code, out = status(cfg, "--mountpoint", str(m1.mountpoint))
        assert code == 1 and "PROBLEM: site SiteDown: down" in out, out
        # A daemon killed outright leaves its socket: nothing answers there.
        m2.kill9()
        code, out = status(cfg, "--mountpoint", str(m2.mountpoint))
        assert code == 4 and "no running mount" in out, out
        code, out = status(cfg, "--json")
        assert code == 1 and json.loads(out)["mount"]["mountpoint"] == str(m1.mountpoint)
    code, out = status(cfg, "--mountpoint", str(tmp_path / "mnt1"))
    assert code == 4, out
    code, out = status(tmp_path / "nope.toml")
    assert code == 2, out


def test_status_shows_token_expiry_and_a_failed_policy_reload(
    orthanc_pair: PacsPair, idp: Path, tmp_path: Path
) -> None:
    pair = orthanc_pair
    cfg = setup(pair, tmp_path, idp, ["NOBODY"])
    tok = token(idp, tmp_path / "rad.jwt", "drad", "radiologists", ttl="20m")
    with Mount(cfg, tmp_path / "mnt", token_file=tok):
        code, out = status(cfg, "--json")
        doc = json.loads(out)
        assert code == 0, out
        assert doc["token"]["subject"] == "drad" and 0 < doc["token"]["expires_in_s"] <= 1200
        assert any("expires in" in w for w in doc["warnings"])
        assert doc["policy"]["version"] and doc["policy"]["last_reload"] is None
        # A broken edit: the last good policy stays in force, and status says so (exit 1).
        pol = tmp_path / "policies" / "main.toml"
        pol.write_text(POLICY + "\n[[allow]]\nid = 3\n")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            code, out = status(cfg, "--json")
            doc = json.loads(out)
            if doc["policy"]["last_reload"]:
                break
            time.sleep(0.5)
        assert code == 1, out
        assert doc["policy"]["last_reload"]["result"] == "failed"
        assert "main.toml" in doc["policy"]["last_reload"]["error"]
        code, out = status(cfg)
        assert "PROBLEM: policy: the last reload failed" in out and "WARNING: token" in out


KEYS_POLICY = """
[[allow]]
id = "radiology-a"
description = "radiologists: identified, SiteA"
principals = { groups = ["radiologists"] }
resources = { sites = ["SiteA"] }
access = "identified"
"""


def test_key_servers_in_status_and_their_metrics(orthanc_pair: PacsPair, tmp_path: Path) -> None:
    """Three real key servers (TLS) with [metrics]; a mount reading through them."""
    pair = orthanc_pair
    idp_dir = tmp_path / "idp"
    mdm("token", "init", str(idp_dir))
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "main.toml").write_text(KEYS_POLICY)
    mport = free_port()
    extra = f"""
[identity]
issuer = "{ISS}"
audience = "{AUD}"
public_keys = "{idp_dir / "jwks.json"}"
[policy]
dir = "{tmp_path / "policies"}"
[audit]
log = "{tmp_path / "audit.jsonl"}"
anchor_interval = "0.5s"
[metrics]
listen = "127.0.0.1:{mport}"
"""
    cfg = config(pair, tmp_path, retrieve="move", extra=extra)
    ports = [free_port() for _ in range(3)]
    kports = [free_port() for _ in range(3)]
    ks = tmp_path / "ks"
    listen = ",".join(f"127.0.0.1:{p}" for p in ports)
    mdm(
        *("keys", "init", str(ks), "--config", str(cfg)),
        *("--shares", "3", "--threshold", "2", "--listen", listen),
    )
    servers = ", ".join(f'"https://127.0.0.1:{p}"' for p in ports)
    keys = f'[keys]\nservers = [{servers}]\nthreshold = 2\nca_file = "{ks / "ca.pem"}"\n'
    cfg.write_text(cfg.read_text().replace("[keys]\n", keys + 'timeout = "3s"\n', 1))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for k in (1, 2, 3):
            toml = ks / f"server-{k}.toml"
            toml.write_text(
                toml.read_text() + f'\n[metrics]\nlisten = "127.0.0.1:{kports[k - 1]}"\n'
            )
            log = open(tmp_path / f"ks-{k}.log", "ab")
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "mdm", "keyserver", "--config", str(toml)],
                    stdout=log,
                    stderr=log,
                    cwd=ROOT,
                )
            )
            log.close()
        for p in ports:
            wait_port(p)
        tok = token(idp_dir, tmp_path / "rad.jwt", "drad", "radiologists")
        insts = [i for i in pair.instances if i.patient_id == pair.only_a_patients[0]]
        with Mount(cfg, tmp_path / "mnt", token_file=tok) as m:
            read_series(m.mountpoint, insts)
            time.sleep(1.0)  # an anchor round
            code, out = status(cfg, "--json")
            doc = json.loads(out)
            assert code == 0, out
            assert doc["keys"]["reachable"] == 3 and doc["keys"]["threshold"] == 2
            assert doc["audit"]["anchor"]["anchored_seq"] >= 1
            mtext = scrape(mport)
            assert sample(mtext, "mdm_keyserver_requests_total", server="1", result="ok") > 0
            # Each key server counts what it served, and says nothing of what it was.
            for kp in kports:
                text = scrape(kp)
                assert sample(text, "mdm_up", role="keyserver") == 1
                assert (
                    sample(
                        text,
                        "mdm_keyserver_served_requests_total",
                        endpoint="/v1/open",
                        status="200",
                    )
                    > 0
                )
                assert sample(text, "mdm_keyserver_request_seconds_count", endpoint="/v1/open") > 0
                assert sample(text, "mdm_audit_writes_total", result="ok") > 0
                assert sample(
                    text, "mdm_policy_decisions_total", level="object", result="identified"
                )
                for i in pair.instances:
                    for v in (i.patient_id, i.study_uid, i.series_uid, i.sop_uid):
                        assert v not in text and v not in mtext, v
                assert "drad" not in text and "drad" not in mtext
            # A key server down: still readable (2 of 3), but degraded.
            procs[2].send_signal(signal.SIGKILL)
            procs[2].wait()
            code, out = status(cfg)
            assert code == 1, out
            assert "keys      2 of 3 key servers reachable (2 needed)" in out
            assert "PROBLEM: key servers: 2 of 3 reachable" in out
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")
