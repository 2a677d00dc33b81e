"""The hospital gateway, end to end: ``mdm gateway`` over two real Orthanc PACS, with policy
and identity, asked by an independent DICOMweb client (dicomweb-client) and by raw HTTP.

Each principal gets exactly what its mount would show: identified objects element-equal to
the PACS's, de-identified objects and answers with no PHI in any byte, metadata-only access
refused content (403), nothing for an ungranted token (404 as for what does not exist), 401
without a valid token. Every request is audited.
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from mdm_demo.localpacs import free_port
from mdm_demo.synth import TRIAL_PROTOCOL
from tests.conftest import PacsPair
from tests.mountutil import mdm
from tests.phi import phi_in
from tests.test_e2e_keys import KeyServers
from tests.test_e2e_mount import same_dataset
from tests.test_e2e_policy import POLICY, forged_token, identity_config, token
from tests.tlsutil import make_tls

pytestmark = pytest.mark.e2e


@dataclass
class Gw:
    url: str
    cfg: Path
    audit: Path
    tokens: dict[str, str]
    pair: PacsPair
    cohort: list[str]
    log: Path
    policy: str

    def client(self, who: str | None) -> DICOMwebClient:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return DICOMwebClient(self.url, headers=headers)

    def get(self, path: str, who: str | None, **kw: object) -> httpx.Response:
        headers = dict(kw.pop("headers", {}) or {})  # type: ignore[call-overload]
        if who:
            headers["Authorization"] = f"Bearer {self.tokens[who]}"
        url = self.url.removesuffix("/dicom-web") + path if path == "/status" else self.url + path
        return httpx.get(url, headers=headers, timeout=60, **kw)  # type: ignore[arg-type]


def start_gateway(
    cfg: Path, port: int, log: Path, scheme: str = "http", verify: object = True
) -> subprocess.Popen[bytes]:
    """``mdm gateway`` as users run it, in the foreground; waits until it answers."""
    exe = Path(sys.executable).parent / "mdm"
    proc = subprocess.Popen(
        [str(exe), "--log-level", "INFO", "gateway", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    wait_answering(proc, port, log, scheme, verify)
    return proc


def wait_answering(
    proc: subprocess.Popen[bytes], port: int, log: Path, scheme: str = "http", verify: object = True
) -> None:
    """Wait until the gateway at ``port`` answers HTTP (AssertionError with its log if not)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited: {log.read_text()}")
        try:
            httpx.get(f"{scheme}://127.0.0.1:{port}/dicom-web/studies", timeout=2, verify=verify)  # type: ignore[arg-type]
            return
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"gateway did not start: {log.read_text()}")


def stop_gateway(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def gw(orthanc_pair: PacsPair, idp: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gw]:
    d = tmp_path_factory.mktemp("gateway")
    cohort = sorted({i.patient_id for i in orthanc_pair.instances})[:2]
    policy = POLICY.replace('"@COHORT@"', ", ".join(f'"{c}"' for c in cohort))
    audit = d / "audit" / "audit.jsonl"
    cfg = identity_config(orthanc_pair, d, idp, policy, audit=audit)
    port = free_port()
    text = cfg.read_text().replace("[policy]\n", '[policy]\nofficers = ["secops"]\n', 1)
    cfg.write_text(text + f'\n[gateway]\nlisten = "127.0.0.1:{port}"\n')
    tokens = {
        "rad": token(idp, d / "rad.jwt", "drad", "radiologists"),
        "grid": token(idp, d / "grid.jwt", "svc-grid", "grid"),
        "res": token(idp, d / "res.jwt", "asmith"),
        "nobody": token(idp, d / "nobody.jwt", "mallory", "visitors"),
        "officer": token(idp, d / "officer.jwt", "osec", "secops"),
        "forged": forged_token(d, "drad", "radiologists"),
        "expired": token(idp, d / "old.jwt", "drad", "radiologists", ttl="1s"),
    }
    log = d / "gateway.log"
    proc = start_gateway(cfg, port, log)
    try:
        yield Gw(
            f"http://127.0.0.1:{port}/dicom-web",
            cfg,
            audit,
            {k: v.read_text().strip() for k, v in tokens.items()},
            orthanc_pair,
            cohort,
            log,
            policy,
        )
    finally:
        stop_gateway(proc)
        assert not phi_in(log.read_text()), "PHI in the gateway's log"


def uids(rows: list[dict[str, dict]], tag: str) -> set[str]:
    return {r[tag]["Value"][0] for r in rows if "Value" in r.get(tag, {})}


def test_identified_principal_gets_exactly_its_grant_element_equal(gw: Gw) -> None:
    pair = gw.pair
    on_a = {i.study_uid for i in pair.instances if "SiteA" in pair.sites_holding(i.sop_uid)}
    c = gw.client("rad")
    studies = c.search_for_studies(get_remaining=True)
    assert uids(studies, "0020000D") == on_a
    row = studies[0]
    for tag in ("00080061", "00201208", "00100010"):  # what viewers read, PHI included
        assert tag in row, tag
    # The positive control of the PHI checks below: identified rows do carry PHI.
    assert phi_in(json.dumps(studies))
    st = sorted(on_a)[0]
    series = c.search_for_series(st)
    assert series and all(r["0020000D"]["Value"] == [st] for r in series)
    se = series[0]["0020000E"]["Value"][0]
    got = c.retrieve_series(st, se, media_types=(("application/dicom", "*"),))
    want = {i.sop_uid: i for i in pair.series(se)}
    assert {str(ds.SOPInstanceUID) for ds in got} == set(want)
    for ds in got:
        buf = pydicom.filebase.DicomBytesIO()
        ds.save_as(buf, enforce_file_format=False)
        same_dataset(buf.getvalue(), want[str(ds.SOPInstanceUID)])
    insts = c.search_for_instances(st, se)
    assert uids(insts, "00080018") == set(want)


def test_raw_instance_is_the_stored_bytes_and_metadata_frames_work(gw: Gw) -> None:
    inst = gw.pair.instances[0]
    if "SiteA" not in gw.pair.sites_holding(inst.sop_uid):
        inst = next(i for i in gw.pair.instances if "SiteA" in gw.pair.sites_holding(i.sop_uid))
    path = f"/studies/{inst.study_uid}/series/{inst.series_uid}/instances/{inst.sop_uid}"
    r = gw.get(
        path,
        "rad",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
    )
    assert r.status_code == 200, r.text
    assert "multipart/related" in r.headers["content-type"]
    c = gw.client("rad")
    ds = c.retrieve_instance(
        inst.study_uid, inst.series_uid, inst.sop_uid, media_types=(("application/dicom", "*"),)
    )
    assert str(ds.SOPInstanceUID) == inst.sop_uid
    meta = c.retrieve_instance_metadata(inst.study_uid, inst.series_uid, inst.sop_uid)
    assert meta["00080018"]["Value"] == [inst.sop_uid]
    assert "BulkDataURI" in meta["7FE00010"], meta["7FE00010"]
    assert meta["7FE00010"]["BulkDataURI"].startswith(gw.url), meta["7FE00010"]
    frames = c.retrieve_instance_frames(
        inst.study_uid,
        inst.series_uid,
        inst.sop_uid,
        [1],
        media_types=(("application/octet-stream", "*"),),
    )
    orig = pydicom.dcmread(pydicom.filebase.DicomBytesIO(inst.read()))
    if not orig.file_meta.TransferSyntaxUID.is_encapsulated:
        assert frames[0] == orig.PixelData[: len(frames[0])] and len(frames[0]) > 0
    # A bulk data URI the metadata gives is served.
    bulk = httpx.get(
        meta["7FE00010"]["BulkDataURI"],
        headers={"Authorization": f"Bearer {gw.tokens['rad']}"},
        timeout=60,
    )
    assert bulk.status_code == 200 and len(bulk.content) >= len(frames[0])


def test_deidentified_principal_sees_no_phi_in_any_byte(gw: Gw) -> None:
    pair = gw.pair
    trial = [i for i in pair.instances if i.trial == TRIAL_PROTOCOL]
    assert trial
    c = gw.client("grid")
    studies = c.search_for_studies(get_remaining=True)
    assert studies and len(studies) == len({i.study_uid for i in trial})
    text = json.dumps(studies)
    assert not phi_in(text), phi_in(text)
    real = {i.study_uid for i in pair.instances}
    shown = uids(studies, "0020000D")
    assert not shown & real and all(u.startswith("2.25.") for u in shown)
    # Filters on real values find nothing; on shown values, the study.
    assert c.search_for_studies(search_filters={"PatientID": trial[0].patient_id}) == []
    assert c.search_for_studies(search_filters={"StudyInstanceUID": trial[0].study_uid}) == []
    pseudo = studies[0]["00100020"]["Value"][0]
    assert c.search_for_studies(search_filters={"PatientID": pseudo})
    st = studies[0]["0020000D"]["Value"][0]
    se = c.search_for_series(st)[0]["0020000E"]["Value"][0]
    r = gw.get(
        f"/studies/{st}/series/{se}",
        "grid",
        headers={"Accept": "multipart/related; type=application/dicom; transfer-syntax=*"},
    )
    assert r.status_code == 200, r.text
    assert not phi_in(r.content.decode("latin-1")), "PHI in a de-identified object"
    got = c.retrieve_series(st, se, media_types=(("application/dicom", "*"),))
    assert got and all(str(ds.SOPInstanceUID).startswith("2.25.") for ds in got)
    meta = json.dumps(c.retrieve_series_metadata(st, se))
    assert not phi_in(meta)


def test_metadata_level_gets_403_and_ungranted_gets_404(gw: Gw) -> None:
    pair = gw.pair
    mine = [i for i in pair.instances if i.patient_id in gw.cohort]
    res = gw.client("res")
    studies = res.search_for_studies(get_remaining=True)
    assert studies
    st = studies[0]["0020000D"]["Value"][0]
    se = res.search_for_series(st)[0]["0020000E"]["Value"][0]
    assert gw.get(f"/studies/{st}/series/{se}", "res").status_code == 403
    nobody = gw.client("nobody")
    assert nobody.search_for_studies() == []
    i = mine[0]
    hidden = f"/studies/{i.study_uid}/series/{i.series_uid}/instances/{i.sop_uid}"
    other = i.study_uid[:-1] + ("1" if i.study_uid[-1] != "1" else "2")
    missing = f"/studies/{other}/series/{i.series_uid}/instances/{i.sop_uid}"
    a, b = gw.get(hidden, "nobody"), gw.get(missing, "nobody")
    assert a.status_code == b.status_code == 404 and a.content == b.content


def test_tokens_and_bad_requests(gw: Gw) -> None:
    i = gw.pair.instances[0]
    for who in (None, "forged", "expired"):
        r = gw.get("/studies", who)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert gw.get("/instances", "rad").status_code == 413
    assert gw.get("/studies?limit=x", "rad").status_code == 400
    assert gw.get("/studies?NotAKeyword=1", "rad").status_code == 400
    r = gw.get(
        f"/studies/{i.study_uid}/series/{i.series_uid}/instances/{i.sop_uid}",
        "rad",
        headers={"Accept": "image/png"},
    )
    assert r.status_code in (404, 406)
    pre = httpx.options(
        gw.url + "/studies",
        headers={
            "Origin": "http://viewer.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert pre.status_code == 200
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    r = gw.get("/studies", None, headers={"Origin": "http://viewer.example"})
    assert r.status_code == 401 and r.headers.get("access-control-allow-origin") == "*"


def test_paging_limit_offset_and_warning(gw: Gw) -> None:
    c = gw.client("rad")
    every = c.search_for_studies(get_remaining=True)
    assert len(every) >= 2
    first = gw.get("/studies?limit=1", "rad")
    assert first.status_code == 200 and len(first.json()) == 1 and "Warning" in first.headers
    second = gw.get("/studies?limit=1&offset=1", "rad").json()
    assert second and second != first.json()
    assert gw.get(f"/studies?offset={len(every)}", "rad").json() == []


def test_every_request_is_audited(gw: Gw) -> None:
    before = len(gw.audit.read_text().splitlines())
    gw.get("/studies", "nobody")
    gw.get("/studies", "forged")
    i = gw.pair.instances[0]
    gw.get(f"/studies/{i.study_uid}/series/{i.series_uid}", "nobody")
    time.sleep(0.5)
    new = [json.loads(x) for x in gw.audit.read_text().splitlines()[before:] if x.strip()]
    web = [
        (r["sub"], r["route"], r["status"], r["decision"]) for r in new if r["action"] == "dicomweb"
    ]
    assert ("mallory", "qido-studies", 200, "allow") in web
    assert ("(no valid token)", "qido-studies", 401, "deny") in web
    assert ("mallory", "wado-series", 404, "deny") in web
    hidden = [r for r in new if r["route"] == "wado-series"]
    assert hidden[0]["resource"]["study_uid"] == i.study_uid  # UIDs only, never PHI
    assert not phi_in(gw.audit.read_text())
    assert mdm_ok("audit", "verify", "--config", str(gw.cfg))


def mdm_ok(*args: str) -> bool:
    return mdm(*args).returncode == 0


def test_tls_gateway_is_verified_against_its_ca(gw: Gw, tmp_path: Path, idp: Path) -> None:
    ca, cert, key = make_tls(tmp_path / "tls", "127.0.0.1", "gw")
    port = free_port()
    cfg = identity_config(gw.pair, tmp_path, idp, gw.policy)
    with cfg.open("a") as f:
        f.write(
            f'\n[gateway]\nlisten = "127.0.0.1:{port}"\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
        )
    proc = start_gateway(
        cfg, port, tmp_path / "gw.log", "https", ssl.create_default_context(cafile=str(ca))
    )
    try:
        url = f"https://127.0.0.1:{port}/dicom-web"
        auth = {"Authorization": f"Bearer {gw.tokens['rad']}"}
        s = requests.Session()
        s.verify = str(ca)
        s.trust_env = False  # else REQUESTS_CA_BUNDLE, when set, overrides verify
        c = DICOMwebClient(url, session=s, headers=auth)
        assert c.search_for_studies()
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(url + "/studies", headers=auth, timeout=5)  # the system's trust store
        with pytest.raises(httpx.TransportError):
            httpx.get(url.replace("https:", "http:") + "/studies", headers=auth, timeout=5)
    finally:
        stop_gateway(proc)


def test_plain_http_only_on_loopback(tmp_path: Path) -> None:
    from mdm.config import load_config
    from mdm.errors import ConfigError

    cfg = tmp_path / "mdm.toml"
    cfg.write_text(f'[cache]\ndir = "{tmp_path / "c"}"\n[gateway]\nlisten = "0.0.0.0:8443"\n')
    with pytest.raises(ConfigError, match="loopback"):
        load_config(cfg)
    cfg.write_text(f'[cache]\ndir = "{tmp_path / "c"}"\n[gateway]\nlisten = "127.0.0.1:8443"\n')
    assert load_config(cfg).gateway is not None


def test_status_is_for_officers_and_shows_queued_work(gw: Gw) -> None:
    assert gw.get("/status", "rad").status_code == 403  # not an officer
    assert gw.get("/status", None).status_code == 401
    r = gw.get("/status", "officer")
    assert r.status_code == 200, r.text
    doc = r.json()
    assert {s["name"] for s in doc["sites"]} == {"SiteA", "SiteB"}
    assert all(set(s["paced"]) == {"urgent", "bulk", "window"} for s in doc["sites"])
    assert doc["policy"]["version"]


def test_a_series_streams_before_its_last_object_has_arrived(
    orthanc_pair_private: PacsPair, idp: Path, tmp_path: Path
) -> None:
    """The first part of a series goes out while the PACS has not yet delivered the rest:
    its first object is cached, the PACS is then frozen (SIGSTOP), and the client receives
    that whole first part; once the PACS runs again the stream completes."""
    pair = orthanc_pair_private
    cfg = identity_config(pair, tmp_path, idp, POLICY.replace('"@COHORT@"', '"nobody"'))
    port = free_port()
    cfg.write_text(cfg.read_text() + f'\n[gateway]\nlisten = "127.0.0.1:{port}"\n')
    proc = start_gateway(cfg, port, tmp_path / "gateway.log")
    try:
        url = f"http://127.0.0.1:{port}/dicom-web"
        tok = token(idp, tmp_path / "r.jwt", "drad", "radiologists").read_text().strip()
        auth = {"Authorization": f"Bearer {tok}"}
        on_a = [i for i in pair.instances if pair.sites_holding(i.sop_uid) == {"SiteA"}]
        series = max({i.series_uid for i in on_a}, key=lambda s: len(pair.series(s)))
        members = sorted(pair.series(series), key=lambda i: i.sop_uid)
        assert len(members) >= 3
        first = members[0]
        base = f"{url}/studies/{first.study_uid}/series/{series}"
        accept = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
        # A viewer searches first (the listing is the catalog's), then reads one object.
        assert len(httpx.get(f"{base}/instances", headers=auth, timeout=60).json()) == len(members)
        r = httpx.get(f"{base}/instances/{first.sop_uid}", headers={**auth, **accept}, timeout=60)
        assert r.status_code == 200
        pair.a.server.pause()
        resumed = False
        try:
            with httpx.stream("GET", base, headers={**auth, **accept}, timeout=60) as resp:
                assert resp.status_code == 200
                bnd = resp.headers["content-type"].split("boundary=")[1].strip('"').encode()
                got = b""
                it = resp.iter_bytes()
                # The first part arrives whole while the PACS, frozen, has sent nothing more.
                deadline = time.monotonic() + 8
                while True:
                    got += next(it)
                    body = got.partition(b"\r\n\r\n")[2]
                    try:
                        same_dataset(body, first)
                        break
                    except Exception:
                        assert time.monotonic() < deadline, "the first part did not arrive"
                pair.a.server.resume()
                resumed = True
                for chunk in it:
                    got += chunk
            assert got.rstrip().endswith(b"--" + bnd + b"--")
            assert got.count(b"Content-Type: application/dicom") == len(members)
            # A PACS that stays silent past the site's timeout mid-stream: the connection is
            # aborted (no closing delimiter passes for a whole answer), one log line, no
            # traceback.
            other = next(s for s in {i.series_uid for i in on_a} if s != series)
            obase = f"{url}/studies/{pair.series(other)[0].study_uid}/series/{other}"
            rows = httpx.get(f"{obase}/instances", headers=auth, timeout=60).json()
            ofirst = min(r["00080018"]["Value"][0] for r in rows)  # the first part's object
            one = httpx.get(f"{obase}/instances/{ofirst}", headers={**auth, **accept}, timeout=60)
            assert one.status_code == 200
            pair.a.server.pause()
            resumed = False
            with pytest.raises(httpx.RemoteProtocolError):
                with httpx.stream("GET", obase, headers={**auth, **accept}, timeout=60) as resp:
                    for _ in resp.iter_bytes():
                        pass
            log = (tmp_path / "gateway.log").read_text()
            assert "a streamed answer was aborted" in log or "PACS did not answer" in log
        finally:
            if not resumed:
                pair.a.server.resume()
    finally:
        stop_gateway(proc)
    assert "Traceback" not in (tmp_path / "gateway.log").read_text()


def test_a_series_larger_than_half_the_cache_is_not_retrieved_whole(
    orthanc_pair: PacsPair, idp: Path, tmp_path: Path
) -> None:
    """A series retrieval whose series would take more than half the gateway's cache does not
    prefetch it whole (its objects would evict each other before they are streamed, and be
    retrieved again): each object is retrieved once, the stream whole and in order."""
    pair = orthanc_pair
    on_a = [i for i in pair.instances if pair.sites_holding(i.sop_uid) == {"SiteA"}]
    series = max({i.series_uid for i in on_a}, key=lambda s: len(pair.series(s)))
    members = sorted(pair.series(series), key=lambda i: i.sop_uid)
    assert len(members) >= 4
    one = max(len(i.read()) for i in members)
    cfg = identity_config(pair, tmp_path, idp, POLICY.replace('"@COHORT@"', '"nobody"'))
    port = free_port()
    # Room for 3 objects (a stored object is its file and a few hundred bytes more).
    text = cfg.read_text().replace('max_bytes = "1GiB"', f'max_bytes = "{int(one * 3.2)}"', 1)
    assert text != cfg.read_text()
    cfg.write_text(text + f'\n[gateway]\nlisten = "127.0.0.1:{port}"\n')
    log = tmp_path / "gateway.log"
    proc = start_gateway(cfg, port, log)
    try:
        tok = token(idp, tmp_path / "r.jwt", "drad", "radiologists").read_text().strip()
        headers = {
            "Authorization": f"Bearer {tok}",
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*',
        }
        base = f"http://127.0.0.1:{port}/dicom-web/studies/{members[0].study_uid}"
        r = httpx.get(f"{base}/series/{series}", headers=headers, timeout=60)
        assert r.status_code == 200
        parts = r.content.split(b"Content-Type: application/dicom")[1:]
        assert len(parts) == len(members)
        for part, inst in zip(parts, members, strict=True):
            same_dataset(part.partition(b"\r\n\r\n")[2].rsplit(b"\r\n--", 1)[0], inst)
    finally:
        stop_gateway(proc)
    text = log.read_text()
    assert "not retrieved whole" in text
    retrieved = re.findall(rf"retrieving (\d+) object\(s\) of series {re.escape(series)} ", text)
    assert sum(int(n) for n in retrieved) == len(members), retrieved


def test_a_gateway_over_key_servers(orthanc_pair: PacsPair, idp: Path, tmp_path: Path) -> None:
    """With ``[keys] servers``, the gateway's cache keys are released by the key servers to
    the gateway's own token (and its audit log is anchored there); each request is still
    decided by the gateway for the request's token. With too few servers up, a cached
    object is refused (503), never served without its key servers."""
    policy = POLICY.replace('"@COHORT@"', '"nobody"') + (
        '\n[[allow]]\nid = "gateway-service"\ndescription = "the gateway: its cache keys"\n'
        'principals = { subjects = ["gw-north"] }\nresources = {}\naccess = "identified"\n'
    )
    cfg = identity_config(orthanc_pair, tmp_path, idp, policy, audit=tmp_path / "audit.jsonl")
    servers = KeyServers(cfg, tmp_path)
    port = free_port()
    cfg.write_text(cfg.read_text() + f'\n[gateway]\nlisten = "127.0.0.1:{port}"\n')
    gw_token = token(idp, tmp_path / "gw.jwt", "gw-north")
    try:
        for k in (1, 2, 3):
            servers.start(k)
        exe = Path(sys.executable).parent / "mdm"
        log = tmp_path / "gateway.log"
        proc = subprocess.Popen(
            [str(exe), "--log-level", "INFO", "gateway", "--config", str(cfg)],
            env={**os.environ, "MDM_TOKEN_FILE": str(gw_token)},
            stdout=subprocess.DEVNULL,
            stderr=log.open("wb"),
        )
        try:
            wait_answering(proc, port, log)
            rad = token(idp, tmp_path / "rad.jwt", "drad", "radiologists").read_text().strip()
            c = DICOMwebClient(
                f"http://127.0.0.1:{port}/dicom-web", headers={"Authorization": f"Bearer {rad}"}
            )
            inst = next(i for i in orthanc_pair.instances if i.sop_uid in orthanc_pair.a.sop_uids)
            ds = c.retrieve_instance(
                inst.study_uid,
                inst.series_uid,
                inst.sop_uid,
                media_types=(("application/dicom", "*"),),
            )
            buf = pydicom.filebase.DicomBytesIO()
            ds.save_as(buf, enforce_file_format=False)
            same_dataset(buf.getvalue(), inst)
            # Two of three servers gone: the cached object's key cannot be released.
            servers.procs[2].kill()
            servers.procs[3].kill()
            r = httpx.get(
                f"http://127.0.0.1:{port}/dicom-web/studies/{inst.study_uid}/series/"
                f"{inst.series_uid}/instances/{inst.sop_uid}",
                headers={"Authorization": f"Bearer {rad}"},
                timeout=60,
            )
            assert r.status_code == 503 and "Retry-After" in r.headers
        finally:
            stop_gateway(proc)
        assert "released to gw-north" in log.read_text()
        assert "Traceback" not in log.read_text()
    finally:
        servers.stop()
