"""The split-key service under a real mount: three real key servers with TLS on loopback.

Objects cached by the mount are sealed share-wise to the servers; reading them back works
with 3 and with 2 servers up and fails closed (EACCES, naming how many answered) with 1.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mdm_demo.localpacs import free_port
from tests.conftest import PacsPair
from tests.mountutil import ROOT, Mount, mdm
from tests.test_e2e_mount import same_dataset, study_path
from tests.test_e2e_policy import AUD, ISS, token

pytestmark = pytest.mark.e2e

POLICY = """
[[allow]]
id = "radiology-a"
description = "radiologists: identified, SiteA"
principals = { groups = ["radiologists"] }
resources = { sites = ["SiteA"] }
access = "identified"
"""


class KeyServers:
    """Three key servers (2 of 3) on loopback for ``cfg`` (``mdm keys init``); ``cfg`` is
    rewritten to use them. :meth:`start` starts server ``k`` (1-3); :meth:`stop` all."""

    def __init__(self, cfg: Path, d: Path) -> None:
        self.ports = [free_port() for _ in range(3)]
        self.d = d
        self.ks = d / "ks"
        listen = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        mdm(
            "keys", "init", str(self.ks), "--config", str(cfg),
            "--shares", "3", "--threshold", "2", "--listen", listen,
        )  # fmt: skip
        servers = ", ".join(f'"https://127.0.0.1:{p}"' for p in self.ports)
        keys = f'[keys]\nservers = [{servers}]\nthreshold = 2\nca_file = "{self.ks / "ca.pem"}"\n'
        cfg.write_text(cfg.read_text().replace("[keys]\n", keys + 'timeout = "3s"\n', 1))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, k: int) -> None:
        log = open(self.d / f"ks-{k}.log", "ab")
        self.procs[k] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mdm",
                "keyserver",
                "--config",
                str(self.ks / f"server-{k}.toml"),
            ],
            stdout=log,
            stderr=log,
            cwd=ROOT,
        )
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.ports[k - 1]), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError((self.d / f"ks-{k}.log").read_text())

    def stop(self) -> None:
        for p in self.procs.values():
            p.send_signal(signal.SIGCONT)
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


def test_mount_with_split_keys(orthanc_pair: PacsPair, tmp_path: Path) -> None:
    pair = orthanc_pair
    idp = tmp_path / "idp"
    mdm("token", "init", str(idp))
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "main.toml").write_text(POLICY)
    aet, port = f"MDMK{free_port() % 10000}", free_port()
    pair.add_destination(aet, port)
    extra = f"""
[identity]
issuer = "{ISS}"
audience = "{AUD}"
public_keys = "{idp / "jwks.json"}"
[policy]
dir = "{tmp_path / "policies"}"
[audit]
log = "{tmp_path / "audit.jsonl"}"
"""
    cfg = pair.write_config(tmp_path, bridge_options={"ae_title": aet, "port": port}, extra=extra)
    servers = KeyServers(cfg, tmp_path)
    procs = servers.procs
    start = servers.start
    tok = token(idp, tmp_path / "rad.jwt", "drad", "radiologists")
    on_a = [i for i in pair.instances if "SiteA" in pair.sites_holding(i.sop_uid)][:4]
    try:
        for k in (1, 2, 3):
            start(k)
        with Mount(cfg, tmp_path / "mnt", token_file=tok) as m:
            for i in on_a:
                same_dataset(study_path(m.mountpoint, i).read_bytes(), i)
            # The catalog of a running mount is private to it (a key that never left it) ...
            cats = list((tmp_path / "cache" / "catalogs").iterdir())
            assert len(cats) == 1
            blob = b"".join(f.read_bytes() for f in (tmp_path / "cache").rglob("*") if f.is_file())
            assert not [i for i in pair.instances if i.patient_name.encode() in blob]
        # ... and gone with it: nothing on the node's disk opens a catalog afterwards.
        assert not list((tmp_path / "cache" / "catalogs").iterdir())
        # The mount anchored its audit log at the key servers (on unmount at the latest).
        out = mdm("audit", "verify", "--config", str(cfg), "--token-file", str(tok)).stdout
        assert "signed by key servers 1, 2, 3" in out and "0 record(s) after it" in out, out
        # Remount: the objects are cached; their keys come from the servers again.
        procs[3].send_signal(signal.SIGSTOP)  # a silent server: 2 of 3 answer
        with Mount(cfg, tmp_path / "mnt", token_file=tok) as m:
            for i in on_a:
                same_dataset(study_path(m.mountpoint, i).read_bytes(), i)
            procs[2].send_signal(signal.SIGKILL)
            procs[2].wait()
            t0 = time.monotonic()
            with pytest.raises(OSError) as ei:
                study_path(m.mountpoint, on_a[0]).read_bytes()
            assert ei.value.errno == errno.EACCES
            assert time.monotonic() - t0 < 15
        assert "1 of 3 key servers answered" in m.log_text()
        stats = mdm("cache", "stats", "--json", "--config", str(cfg)).stdout
        assert '"objects": ' in stats
        assert not os.path.ismount(tmp_path / "mnt")
    finally:
        servers.stop()
