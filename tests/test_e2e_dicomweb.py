"""End to end: a real mount whose federation holds a DICOMweb site (an Orthanc with its
DICOMweb plugin, behind a fault-injecting proxy) beside a DIMSE site.

The mount lists /studies, /patients and /sites from both, reads every object of the DICOMweb
site byte for byte as Orthanc stores it (RLE, JPEG-LS and JPEG 2000 objects kept as stored),
``mdm find`` and ``mdm fetch`` use it, and faults reach the reader as the right errno, fast:
401 is EACCES, a stalled server ETIMEDOUT, a truncated or short answer and a server that is
gone EIO; nothing partial is stored and the mount stays up.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from mdm.deid import map_uid
from mdm.store.keys import LocalKeyring
from mdm_demo.localpacs import LocalOrthanc
from mdm_demo.synth import GeneratedInstance
from tests.conftest import PacsPair
from tests.dicomweb_data import dicomweb_orthanc
from tests.dicomweb_util import FaultProxy
from tests.mountutil import Mount, mdm
from tests.test_e2e_mount import config, same_dataset, study_path
from tests.test_e2e_policy import identity_config, token

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


@dataclasses.dataclass
class Web:
    server: LocalOrthanc
    proxy: FaultProxy
    instances: list[GeneratedInstance]
    compressed: tuple[str, str, list[tuple[str, str, bytes]]]

    @property
    def study_uids(self) -> set[str]:
        return {i.study_uid for i in self.instances} | {self.compressed[0]}


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    with dicomweb_orthanc(tmp_path_factory.mktemp("dicomweb")) as (server, instances, comp):
        with FaultProxy(server.http_port) as proxy:
            yield Web(server, proxy, instances, comp)


def web_site(url: str, timeout: str = "10s") -> str:
    return f'[[site]]\nname = "WEB"\ndicomweb = "{url}"\ntimeout = "{timeout}"\n'


def test_a_mixed_federation_lists_and_reads_exact_bytes(
    orthanc_pair: PacsPair, web: Web, tmp_path: Path
) -> None:
    cfg = config(orthanc_pair, tmp_path, sites=("SiteA",), extra=web_site(web.proxy.url))
    with Mount(cfg, tmp_path / "mnt") as m:
        mnt = m.mountpoint
        studies = set(os.listdir(mnt / "studies")) - {".metadata.json"}
        assert studies == orthanc_pair.a.study_uids | web.study_uids
        patients = set(os.listdir(mnt / "patients")) - {".metadata.json"}
        web_patients = {i.patient_id for i in web.instances} | {"CMPSAMPLE"}
        assert patients == orthanc_pair.a.patient_ids | web_patients
        assert set(os.listdir(mnt / "sites")) - {".metadata.json"} == {"SiteA", "WEB"}
        assert set(os.listdir(mnt / "sites" / "WEB")) - {".metadata.json"} == web_patients
        # Every object of the DICOMweb site, byte for byte as Orthanc stores it.
        for inst in web.instances:
            assert study_path(mnt, inst).read_bytes() == web.server.instance_file(inst.sop_uid)
        study, series, objs = web.compressed
        for sop, syntax, _ in objs:
            served = (mnt / "studies" / study / series / f"{sop}.dcm").read_bytes()
            assert served == web.server.instance_file(sop)
            assert syntax.encode() in served[:400]  # in its file meta: kept as stored
        # The DIMSE site beside it.
        inst = orthanc_pair.a.instances[0]
        same_dataset(study_path(mnt, inst).read_bytes(), inst)
    assert "Traceback" not in m.log_text()


def test_find_fetch_and_sites(orthanc_pair: PacsPair, web: Web, tmp_path: Path) -> None:
    cfg = config(orthanc_pair, tmp_path, sites=("SiteA",), extra=web_site(web.proxy.url))
    rows = json.loads(mdm("sites", "--config", str(cfg), "--json", "--check-retrieve").stdout)
    by = {r["site"]: r for r in rows}
    assert by["WEB"]["status"] == "up" and by["WEB"]["address"] == web.proxy.url
    assert by["WEB"]["retrieve"][0]["mode"] == "wado" and by["WEB"]["retrieve"][0]["ok"]
    found = mdm("find", "--config", str(cfg), "--level", "series", "--site", "WEB", "--json")
    series = {r["SeriesInstanceUID"]: r for r in json.loads(found.stdout)}
    assert set(series) == {i.series_uid for i in web.instances} | {web.compressed[1]}
    assert all(r["sites"] == ["WEB"] for r in series.values())
    ct = json.loads(
        mdm("find", "--config", str(cfg), "--level", "series", "--json", "Modality=CT").stdout
    )
    assert {r["SeriesInstanceUID"] for r in ct} >= {
        i.series_uid for i in web.instances if i.modality == "CT"
    }
    study = web.instances[0].study_uid
    res = mdm("fetch", "--config", str(cfg), study)
    n = sum(1 for i in web.instances if i.study_uid == study)
    assert f"{n} object(s) cached" in res.stdout
    stats = json.loads(mdm("cache", "stats", "--json", "--config", str(cfg)).stdout)
    assert stats["objects"] == n


def read_errno(path: Path) -> tuple[int, float]:
    t0 = time.monotonic()
    try:
        path.read_bytes()
    except OSError as e:
        return e.errno or -1, time.monotonic() - t0
    return 0, time.monotonic() - t0


def test_faults_reach_the_reader_as_errno(orthanc_pair: PacsPair, web: Web, tmp_path: Path) -> None:
    proxy = FaultProxy(web.server.http_port).start()
    cfg = config(
        orthanc_pair,
        tmp_path,
        sites=(),
        bridge_options={"prefetch": False},
        extra=web_site(proxy.url, timeout="2s"),
    )
    try:
        with Mount(cfg, tmp_path / "mnt", strict=True) as m:
            mnt = m.mountpoint
            paths = [study_path(mnt, i) for i in web.instances]
            for p in paths:  # listings (QIDO-RS) while the proxy passes everything
                assert p.name in os.listdir(p.parent)
            proxy.mode = "wado-401"
            assert read_errno(paths[0])[0] == errno.EACCES
            proxy.mode = "truncate"
            assert read_errno(paths[1])[0] == errno.EIO
            proxy.mode = "fewer"
            assert read_errno(paths[2])[0] == errno.EIO
            proxy.mode = "wrong-boundary"
            assert read_errno(paths[3])[0] == errno.EIO
            proxy.mode = "stall"
            code, took = read_errno(paths[4])
            assert code == errno.ETIMEDOUT and took < 8, (code, took)
            proxy.release()
            # Nothing partial was stored: the same objects now arrive whole.
            proxy.mode = "pass"
            for p, inst in zip(paths[:5], web.instances[:5], strict=True):
                assert p.read_bytes() == web.server.instance_file(inst.sop_uid)
            # A server that is gone: EIO at once, and the mount stays up.
            proxy.stop()
            code, took = read_errno(paths[5])
            assert code == errno.EIO and took < 3, (code, took)
            assert paths[0].read_bytes()  # cached: still served
            log = m.log_text()
        for what in ("refused (HTTP 401)", "closing boundary", "delivered 0 of 1", "timed out"):
            assert what in log, what
        assert "Traceback" not in log
    finally:
        proxy.stop()


def test_fail_over_from_a_dicomweb_site_to_a_dimse_site(
    orthanc_pair: PacsPair, tmp_path: Path
) -> None:
    """A series both sites hold: with the DICOMweb site gone, reads come from the DIMSE site."""
    patient = orthanc_pair.only_a_patients[0]
    held = [i for i in orthanc_pair.a.instances if i.patient_id == patient]
    server = LocalOrthanc(
        tmp_path / "web", name="WebCopy", aet="WEBCOPY", dicomweb=True, die_with_parent=True
    )
    server.start()
    try:
        server.upload(held)
        with FaultProxy(server.http_port) as proxy:
            dimse = (
                f'[[site]]\nname = "SiteA"\nae_title = "{orthanc_pair.a.server.aet}"\n'
                f'host = "127.0.0.1"\nport = {orthanc_pair.a.server.dicom_port}\n'
            )
            cfg = config(
                orthanc_pair,
                tmp_path,
                sites=(),
                bridge_options={"prefetch": False},
                extra=dimse + web_site(proxy.url, timeout="3s"),
            )
            with Mount(cfg, tmp_path / "mnt") as m:
                # The sites holding an object are tried most recently listed first: the
                # last in mdm.toml (WEB) when one listing saw both.
                first, second = held[0], held[1]
                served = study_path(m.mountpoint, first).read_bytes()
                assert served == server.instance_file(first.sop_uid)
                meta = json.loads(
                    (m.mountpoint / "studies" / first.study_uid / ".metadata.json").read_text()
                )
                assert set(meta["sites"]) == {"WEB", "SiteA"}
                proxy.stop()
                same_dataset(study_path(m.mountpoint, second).read_bytes(), second)
                log = m.log_text()
            # WEB's failure is said (by the listing or the retrieval, whichever met it first).
            assert "site WEB: " in log and "cannot connect to 127.0.0.1" in log
    finally:
        server.stop()


DEID_POLICY = """
[[allow]]
id = "grid-web"
description = "grid jobs: the DICOMweb site, de-identified"
principals = { groups = ["grid"] }
resources = { sites = ["WEB"] }
access = "deidentified"
[allow.deid]
scope = "nant"
"""


def test_the_mounts_token_is_sent_and_views_are_deidentified(
    orthanc_pair: PacsPair, web: Web, idp: Path, tmp_path: Path
) -> None:
    """Under [identity] the mount's own token goes to the DICOMweb site as a Bearer token
    (the site refuses requests without it), and objects arriving by WADO-RS are
    de-identified for a de-identified view like objects arriving by C-MOVE."""
    grid = token(idp, tmp_path / "grid.jwt", "svc-grid", "grid")
    proxy = FaultProxy(web.server.http_port).start()
    proxy.require_token = grid.read_text().strip()
    try:
        cfg = identity_config(orthanc_pair, tmp_path, idp, DEID_POLICY)
        with cfg.open("a") as f:
            f.write("\n" + web_site(proxy.url))
        with Mount(cfg, tmp_path / "mnt", token_file=grid) as m:
            secret = LocalKeyring.load(tmp_path / "keyring.json").secret("pseudonym:nant")
            inst = web.instances[0]
            sdir = m.mountpoint / "studies" / map_uid(inst.study_uid, secret=secret)
            path = sdir / map_uid(inst.series_uid, secret=secret)
            raw = (path / f"{map_uid(inst.sop_uid, secret=secret)}.dcm").read_bytes()
            ds = pydicom.dcmread(io.BytesIO(raw))
            orig = pydicom.dcmread(io.BytesIO(inst.read()))
            assert ds.PatientIdentityRemoved == "YES"
            assert ds.SOPInstanceUID == map_uid(inst.sop_uid, secret=secret)
            assert ds.PixelData == orig.PixelData
            for needle in (inst.patient_id, inst.sop_uid, inst.patient_name.split("^")[0]):
                assert needle.encode() not in raw
            # SiteA is not granted: only the DICOMweb site's studies are there.
            listed = set(os.listdir(m.mountpoint / "studies")) - {".metadata.json"}
            assert listed == {map_uid(u, secret=secret) for u in web.study_uids}
        assert proxy.auth_seen and set(proxy.auth_seen) == {f"Bearer {proxy.require_token}"}
        assert proxy.require_token not in m.log_text()
    finally:
        proxy.stop()


def test_collections_over_qido(orthanc_pair: PacsPair, web: Web, tmp_path: Path) -> None:
    """A collection's keys go to a DICOMweb site as QIDO-RS parameters, and a manifest's UID
    lists as comma-separated UID matching: both list exactly their cohort there too."""
    from mdm.namespace.bridge import Bridge
    from mdm_demo.synth import TRIAL_PROTOCOL
    from tests.test_collections import dirs
    from tests.test_namespace import names, run_as

    ct = [i for i in web.instances if i.modality == "CT"]
    mr = [i for i in web.instances if i.modality == "MR"]
    manifest = tmp_path / "m.txt"
    manifest.write_text(f"{mr[0].series_uid}\n{web.compressed[0]}\n")
    extra = (
        web_site(web.proxy.url)
        + f"""
[[collection]]
name = "trial"
match = {{ ClinicalTrialProtocolID = "{TRIAL_PROTOCOL}", Modality = "CT" }}

[[collection]]
name = "picked"
manifest = "{manifest}"
"""
    )
    cfg = config(orthanc_pair, tmp_path, sites=("SiteA",), extra=extra)
    every = [*orthanc_pair.a.instances, *web.instances]
    want_trial = {i.series_uid for i in every if i.trial == TRIAL_PROTOCOL and i.modality == "CT"}
    assert any(i.trial == TRIAL_PROTOCOL for i in ct)

    async def go(b: Bridge) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for name in ("trial", "picked"):
            got: set[str] = set()
            for p in names(await b.listdir(("collections", name))):
                for st in names(await b.listdir(("collections", name, p))):
                    got |= dirs(await b.listdir(("collections", name, p, st)))
            out[name] = got
        return out

    got = run_as(cfg, None, go)
    assert got["trial"] == want_trial
    assert got["picked"] == {mr[0].series_uid, web.compressed[1]}
