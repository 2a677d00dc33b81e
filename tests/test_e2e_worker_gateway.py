"""A worker mount whose only site is the hospital gateway (``mdm gateway`` over two real
Orthanc PACS): the DICOMweb site client end to end against the bridge's own server.

The worker sends its own token; it sees exactly the gateway's answer for that principal and
reads objects element-equal to the PACS's; a token the gateway does not grant sees nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mdm_demo.localpacs import free_port
from tests.conftest import PacsPair
from tests.mountutil import Mount
from tests.test_e2e_mount import same_dataset, study_path
from tests.test_e2e_policy import AUD, ISS, POLICY, identity_config, token
from tests.test_gateway import start_gateway, stop_gateway

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

WORKER_POLICY = """
[[allow]]
id = "worker-jobs"
description = "jobs on this worker: whatever the gateway serves them"
principals = { groups = ["radiologists", "visitors"] }
resources = { sites = ["NORTH"] }
access = "identified"
"""


def worker_config(d: Path, idp: Path, url: str) -> Path:
    (d / "policies").mkdir(parents=True, exist_ok=True)
    (d / "policies" / "main.toml").write_text(WORKER_POLICY)
    cfg = d / "mdm.toml"
    cfg.write_text(
        f'[bridge]\nae_title = "WORKER"\nport = {free_port()}\n'
        f'[cache]\ndir = "{d / "cache"}"\n[keys]\nkeyring = "{d / "keyring.json"}"\n'
        f'[identity]\nissuer = "{ISS}"\naudience = "{AUD}"\n'
        f'public_keys = "{idp / "jwks.json"}"\n[policy]\ndir = "{d / "policies"}"\n'
        f'[[site]]\nname = "NORTH"\ndicomweb = "{url}"\ntimeout = "20s"\n'
    )
    return cfg


@contextmanager
def gateway(pair: PacsPair, d: Path, idp: Path) -> Iterator[str]:
    """``mdm gateway`` over ``pair`` with the policy of test_e2e_policy; yields its URL."""
    cfg = identity_config(pair, d / "gateway", idp, POLICY.replace('"@COHORT@"', '"nobody"'))
    port = free_port()
    cfg.write_text(cfg.read_text() + f'\n[gateway]\nlisten = "127.0.0.1:{port}"\n')
    proc = start_gateway(cfg, port, d / "gateway.log")
    try:
        yield f"http://127.0.0.1:{port}/dicom-web"
    finally:
        stop_gateway(proc)


def test_a_worker_mount_reads_through_the_gateway(
    orthanc_pair: PacsPair, idp: Path, tmp_path: Path
) -> None:
    pair = orthanc_pair
    with gateway(pair, tmp_path, idp) as url:
        rad = token(idp, tmp_path / "rad.jwt", "drad", "radiologists")
        worker = worker_config(tmp_path / "worker", idp, url)
        with Mount(worker, tmp_path / "mnt", token_file=rad) as m:
            mnt = m.mountpoint
            # The gateway grants radiologists SiteA, identified: exactly that, under NORTH.
            studies = set(os.listdir(mnt / "studies")) - {".metadata.json"}
            assert studies == pair.a.study_uids
            assert set(os.listdir(mnt / "sites")) - {".metadata.json"} == {"NORTH"}
            for inst in pair.a.instances[:8]:
                same_dataset(study_path(mnt, inst).read_bytes(), inst)
            assert "Traceback" not in m.log_text()
        # The next job on this worker, with the same cache and an ungranted token, sees
        # nothing: the listings the gateway gave the first job are not reused (the catalog
        # of a mount with a DICOMweb site is private to its process), and the objects the
        # first job cached cannot be named.
        nobody = token(idp, tmp_path / "nobody.jwt", "mallory", "visitors")
        with Mount(worker, tmp_path / "mnt2", token_file=nobody) as m:
            assert set(os.listdir(m.mountpoint / "studies")) - {".metadata.json"} == set()
            inst = pair.a.instances[0]
            with pytest.raises(FileNotFoundError):
                study_path(m.mountpoint, inst).read_bytes()


def test_two_workers_one_retrieval_then_the_pacs_can_go(
    orthanc_pair_private: PacsPair, idp: Path, tmp_path: Path
) -> None:
    """Two worker mounts (separate processes and caches) read the same objects through one
    gateway; the second reads after both PACS have been stopped: one retrieval served both.
    A third, ungranted token sees nothing."""
    pair = orthanc_pair_private
    with gateway(pair, tmp_path, idp) as url:
        rad = token(idp, tmp_path / "rad.jwt", "drad", "radiologists")
        wanted = pair.a.instances
        assert wanted
        first = worker_config(tmp_path / "w1", idp, url)
        second = worker_config(tmp_path / "w2", idp, url)
        with Mount(first, tmp_path / "mnt1", token_file=rad) as m1:
            for inst in wanted:
                same_dataset(study_path(m1.mountpoint, inst).read_bytes(), inst)
        with Mount(second, tmp_path / "mnt2", token_file=rad) as m2:
            names = set(os.listdir(m2.mountpoint / "studies")) - {".metadata.json"}
            assert names == pair.a.study_uids
            for inst in wanted:  # listed while the PACS ran: the gateway's catalog
                os.listdir(study_path(m2.mountpoint, inst).parent)
            pair.a.server.stop()
            pair.b.server.stop()
            for inst in wanted:
                same_dataset(study_path(m2.mountpoint, inst).read_bytes(), inst)
        nobody = token(idp, tmp_path / "nobody.jwt", "mallory", "visitors")
        third = worker_config(tmp_path / "w3", idp, url)
        with Mount(third, tmp_path / "mnt3", token_file=nobody) as m3:
            assert set(os.listdir(m3.mountpoint / "studies")) - {".metadata.json"} == set()
