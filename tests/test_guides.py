"""The task guides (docs/GUIDE-*.md) run as written.

Every fenced block marked ```` ```sh check ```` or ```` ```python check ```` is run, in the
order of the guide, in one bash session (``set -euo pipefail``: the first failing command fails
the test, naming the block's line) against two real Orthancs, with ``mdm`` on the PATH and the
files a reader of the guide is told they have (an ``mdm.toml``, a running node mount, key
servers...) prepared here. Blocks without ``check`` are what cannot run here (a scheduler's
submit files, systemd); the commands they wrap are checked blocks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mdm_demo.localpacs import free_port
from tests.conftest import PacsPair
from tests.mountutil import ROOT, Mount, mdm
from tests.test_e2e_mount import config

pytestmark = pytest.mark.e2e

DOCS = ROOT / "docs"
_BLOCK = re.compile(r"^```(sh|python) check\n(.*?)^```\n", re.M | re.S)
ISS = "https://idp.example.org/realms/mdm"


def checked_blocks(guide: Path) -> list[tuple[str, str, int]]:
    """(language, code, line) of each checked block of ``guide``."""
    text = guide.read_text()
    return [
        (m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1) for m in _BLOCK.finditer(text)
    ]


def run_guide(guide: Path, cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    """Run the checked blocks of ``guide``; return the session's output (AssertionError with
    the failing block otherwise)."""
    blocks = checked_blocks(guide)
    assert blocks, f"{guide.name} has no checked blocks"
    script = ["set -euo pipefail"]
    for lang, code, line in blocks:
        script.append(f"echo '>>> {guide.name}:{line}' >&2")
        if lang == "sh":
            script.append(code)
        else:
            script.append(f"python3 - <<'MDM_PY_EOF'\n{code}MDM_PY_EOF")
    full_env = {
        **os.environ,
        **env,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    full_env.pop("MDM_STRICT", None)
    res = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    out = res.stdout + res.stderr
    if res.returncode != 0:
        where = re.findall(r">>> (\S+)", res.stderr)
        raise AssertionError(
            f"{guide.name}: the block at {where[-1] if where else '?'} failed "
            f"(exit {res.returncode}):\n{out[-6000:]}"
        )
    return out


def unmount_all_under(root: Path) -> None:
    """Leave no mount of a guide behind, whatever failed: unmount, then end the processes
    this test started (their command lines name ``root``), by pid."""
    with open("/proc/mounts") as f:
        points = [line.split()[1] for line in f]
    for p in points:
        if p.startswith(str(root)):
            subprocess.run(["fusermount3", "-u", "-z", p], capture_output=True, check=False)
    deadline = time.monotonic() + 10
    while True:
        pids = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    if str(root).encode() in (d / "cmdline").read_bytes():
                        pids.append(int(d.name))
                except OSError:
                    continue
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM if time.monotonic() < deadline else signal.SIGKILL)
        time.sleep(0.5)


def test_checked_blocks_are_found() -> None:
    for name in ("GUIDE-researcher.md", "GUIDE-grid-jobs.md", "GUIDE-security-officer.md"):
        blocks = checked_blocks(DOCS / name)
        assert len(blocks) >= 3, name
        assert all(code.strip() for _, code, _ in blocks)


def test_researcher_guide(orthanc_pair: PacsPair, tmp_path: Path) -> None:
    """Run from the home directory, as a reader would: a mount point named ``mdm`` beside the
    daemon's starting directory once made its imports look into its own mount and hang."""
    home = tmp_path / "home"
    home.mkdir()
    cfg = config(orthanc_pair, home / ".mdm", retrieve="auto")
    shutil.move(cfg, home / "mdm.toml")
    try:
        out = run_guide(DOCS / "GUIDE-researcher.md", home, {"HOME": str(home)})
    finally:
        unmount_all_under(tmp_path)
    assert "healthy" in out
    assert re.search(r"\(4, 64, 64\) (uint16|int16) CT", out), out
    assert not os.path.ismount(home / "mdm")


def test_grid_jobs_guide(orthanc_pair: PacsPair, tmp_path: Path) -> None:
    work = tmp_path / "job"
    (work / "acl_policies").mkdir(parents=True)
    (tmp_path / "tmp").mkdir()
    shutil.copy(ROOT / "acl_policies" / "grid-jobs.toml", work / "acl_policies")
    extra = f"""
[identity]
issuer = "{ISS}"
audience = "mdm"
public_keys = "keys/jwks.json"
[policy]
dir = "acl_policies"
"""
    cfg = config(orthanc_pair, work, retrieve="auto", extra=extra)
    shutil.move(cfg, work / "job.toml")
    try:
        out = run_guide(DOCS / "GUIDE-grid-jobs.md", work, {"TMPDIR": str(tmp_path / "tmp")})
    finally:
        unmount_all_under(tmp_path)
    # Both runs read the de-identified series: once through their own mount, once the node's.
    assert out.count("4 slices of CT, 64x64") == 2, out
    assert "job-7781" in out
    mounts = re.findall(r"reading studies/2\.25\.[0-9]+/2\.25\.[0-9]+ through (\S+)", out)
    assert len(mounts) == 2 and mounts[0].startswith(str(tmp_path / "tmp")), out
    assert mounts[1] == str(work / "node-mnt"), out
    assert not list((tmp_path / "tmp").iterdir())  # the job's own mount point is gone


BASE_POLICY = """
[[allow]]
id = "radiology-a"
description = "radiologists: identified, SiteA"
principals = { groups = ["radiologists"], issuers = ["https://idp.example.org/realms/mdm"] }
resources = { sites = ["SiteA"] }
access = "identified"
expires = 2027-12-31
"""
BASE_CASES = """
[[case]]
name = "a radiologist reads SiteA"
principal = { sub = "dr.x", issuer = "https://idp.example.org/realms/mdm", \
groups = ["radiologists"] }
resource = { site = "SiteA", modality = "CT" }
expect = "identified"
"""


def test_security_officer_guide(orthanc_pair: PacsPair, tmp_path: Path) -> None:
    """A node with a mount (of dr.leak, whose token is then 'copied'), three key servers, and
    the officer's policy repository; the leaked token's holder keeps reading meanwhile."""
    pair = orthanc_pair
    work = tmp_path / "node"
    repo, deploy = work / "acl_policies", work / "deployed"
    (repo / "tests").mkdir(parents=True)
    deploy.mkdir()
    for d in (repo, deploy):
        (d / "radiology.toml").write_text(BASE_POLICY)
    (repo / "tests" / "radiology.toml").write_text(BASE_CASES)
    mdm("token", "init", str(work / "keys"))
    extra = f"""
[identity]
issuer = "{ISS}"
audience = "mdm"
public_keys = "keys/jwks.json"
[policy]
dir = "deployed"
officers = ["security-officers"]
[audit]
log = "audit/audit.jsonl"
anchor_interval = "1s"
"""
    cfg = config(pair, work, retrieve="auto", extra=extra)
    ports = [free_port() for _ in range(3)]
    ks = work / "ks"
    listen = ",".join(f"127.0.0.1:{p}" for p in ports)
    mdm(
        *("keys", "init", str(ks), "--config", str(cfg)),
        *("--shares", "3", "--threshold", "2", "--listen", listen),
    )
    servers = ", ".join(f'"https://127.0.0.1:{p}"' for p in ports)
    keys = f'[keys]\nservers = [{servers}]\nthreshold = 2\nca_file = "{ks / "ca.pem"}"\n'
    cfg.write_text(cfg.read_text().replace("[keys]\n", keys + 'timeout = "3s"\n', 1))

    def tok(name: str, sub: str, groups: str) -> Path:
        p = work / name
        args = ["token", "issue", "--key", str(work / "keys" / "signing-key.pem")]
        args += ["--issuer", ISS, "--audience", "mdm", "--sub", sub, "--groups", groups]
        p.write_text(mdm(*args, "--ttl", "2h").stdout)
        p.chmod(0o600)
        return p

    leaked = tok("dr.leak.jwt", "dr.leak", "radiologists")
    tok("officer.jwt", "officer", "security-officers")
    procs: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()
    outcomes: list[str] = []
    try:
        for k in (1, 2, 3):
            log = open(tmp_path / f"ks-{k}.log", "ab")
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "mdm",
                        "keyserver",
                        "--config",
                        str(ks / f"server-{k}.toml"),
                    ],
                    stdout=log,
                    stderr=log,
                    cwd=ROOT,
                )
            )
            log.close()
        for p in ports:
            wait_port(p)
        inst = next(i for i in pair.instances if i.patient_id == pair.only_a_patients[0])
        with Mount(cfg, work / "node-mnt", token_file=leaked, strict=False) as m:
            path = (
                m.mountpoint / "studies" / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm"
            )
            assert path.read_bytes()

            def keep_reading() -> None:  # the holder of the copied token
                while not stop.wait(0.5):
                    try:
                        path.read_bytes()
                        outcomes.append("ok")
                    except OSError as e:
                        outcomes.append(errno.errorcode.get(e.errno or 0, "?"))

            reader = threading.Thread(target=keep_reading, daemon=True)
            reader.start()
            out = run_guide(DOCS / "GUIDE-security-officer.md", work, {"DEPLOY": str(deploy)})
            stop.set()
            reader.join(10)
    finally:
        stop.set()
        for p in procs:
            p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
            if p.poll() is None:
                p.kill()
                p.wait(5)
        unmount_all_under(tmp_path)
    assert "25 passed" not in out  # our own cases, not the repository's
    assert re.search(r"[0-9]+ passed, 0 failed", out), out
    assert re.search(r"policy version in force: ([0-9a-f]+) \(deployed: \1\)", out), out
    assert "chain intact" in out, out
    # Reads went on until the deny, and were refused after it (hidden: ENOENT).
    assert "ok" in outcomes and outcomes[-1] == "ENOENT", outcomes
    assert re.search(r"reads allowed to dr.leak since \S+: 0", out), out
    assert "rotated SiteA/identified: 1 cached objects, 1 re-sealed" in out, out
    assert "healthy" in out, out


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")
