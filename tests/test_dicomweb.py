"""DICOMweb sites against a real Orthanc with its DICOMweb plugin (no mount).

QIDO-RS answers the bridge's C-FIND-shaped questions at every level, paged; WADO-RS delivers
every object byte for byte as Orthanc stores it (compressed ones included) through the object
checks; faults (401, a truncated or short multipart answer, a wrong boundary, a stalled or
absent server, an untrusted certificate) end in the bridge's errors, fast, and deliver nothing
partial; the mount's token is sent, re-read when it changes, and never without [identity].
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from mdm.config import SiteSettings
from mdm.dicom.check import check_retrieve
from mdm.dicom.query import c_echo, find_at
from mdm.dicom.receiver import ReceivedObject
from mdm.dicomweb import qido, transport
from mdm.dicomweb.qido import qido_find
from mdm.dicomweb.wado import IncompleteWado, wado_retrieve
from mdm.errors import AccessDenied, RetrieveError, RetrieveTimeout
from mdm_demo.localpacs import LocalOrthanc, free_port
from mdm_demo.synth import GeneratedInstance, by_series
from tests.dicomweb_data import dicomweb_orthanc
from tests.dicomweb_util import FaultProxy
from tests.tlsutil import make_tls

pytestmark = pytest.mark.timeout(120)


@dataclasses.dataclass
class Web:
    server: LocalOrthanc
    instances: list[GeneratedInstance]
    compressed: tuple[str, str, list[tuple[str, str, bytes]]]


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    with dicomweb_orthanc(tmp_path_factory.mktemp("dicomweb")) as (server, instances, comp):
        yield Web(server, instances, comp)
        transport.close_clients()


@pytest.fixture(autouse=True)
def no_token() -> Iterator[None]:
    transport.use_token_file(None)
    yield
    transport.use_token_file(None)


def site(url: str, **kw: object) -> SiteSettings:
    values: dict[str, object] = {
        "name": "WEB",
        "ae_title": "",
        "host": "127.0.0.1",
        "port": 1,
        "retrieve": "wado",
        "timeout": 5.0,
        "dicomweb": url,
    }
    values.update(kw)
    return SiteSettings(**values)  # type: ignore[arg-type]


def q(**keys: str) -> Dataset:
    ds = Dataset()
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def collect() -> tuple[list[ReceivedObject], object]:
    got: list[ReceivedObject] = []
    return got, got.append


def test_qido_levels_paging_and_matching(web: Web, monkeypatch: pytest.MonkeyPatch) -> None:
    s = site(web.server.dicomweb_url)
    inst = web.instances
    studies = qido_find(s, "STUDY", q(StudyInstanceUID="", PatientID="", ModalitiesInStudy=""))
    assert {str(d.StudyInstanceUID) for d in studies} == {i.study_uid for i in inst} | {
        web.compressed[0]
    }
    study = inst[0].study_uid
    series = qido_find(s, "SERIES", q(StudyInstanceUID=study, SeriesInstanceUID="", Modality=""))
    want = {i.series_uid for i in inst if i.study_uid == study}
    assert {str(d.SeriesInstanceUID) for d in series} == want
    assert all(str(d.StudyInstanceUID) == study for d in series)
    ct = [i for i in inst if i.study_uid == study and i.modality == "CT"]
    images = qido_find(
        s,
        "IMAGE",
        q(StudyInstanceUID=study, SeriesInstanceUID=ct[0].series_uid, SOPInstanceUID=""),
    )
    assert {str(d.SOPInstanceUID) for d in images} == {i.sop_uid for i in ct}
    # Matching keys: exact, wildcard, a UID list.
    only_ct = qido_find(s, "SERIES", q(StudyInstanceUID=study, Modality="CT"))
    assert {str(d.SeriesInstanceUID) for d in only_ct} == {ct[0].series_uid}
    name = inst[0].patient_name.split("^")[0]
    by_name = qido_find(s, "STUDY", q(PatientName=name[:3] + "*", StudyInstanceUID=""))
    assert study in {str(d.StudyInstanceUID) for d in by_name}
    two = [inst[0].study_uid, web.compressed[0]]
    listed = qido_find(s, "STUDY", q(StudyInstanceUID="\\".join(two)))
    assert {str(d.StudyInstanceUID) for d in listed} == set(two)
    # PATIENT level: studies folded by PatientID.
    patients = qido_find(s, "PATIENT", q(PatientID="", PatientName=""))
    assert {str(d.PatientID) for d in patients} == {i.patient_id for i in inst} | {"CMPSAMPLE"}
    # Paging: pages of 2 give the same answer as one page.
    monkeypatch.setattr(qido, "PAGE", 2)
    paged = qido_find(s, "STUDY", q(StudyInstanceUID=""))
    assert sorted(str(d.StudyInstanceUID) for d in paged) == sorted(
        str(d.StudyInstanceUID) for d in studies
    )
    # find_at dispatches on the site's kind; a 404 parent is an empty answer.
    r = find_at(s, None, "SERIES", q(StudyInstanceUID="1.2.3.4", SeriesInstanceUID=""))  # type: ignore[arg-type]
    assert r.error is None and r.datasets == []


def test_wado_delivers_the_stored_bytes(web: Web) -> None:
    s = site(web.server.dicomweb_url)
    for series_uid, members in by_series(web.instances).items():
        got, sink = collect()
        first = members[0]
        uids = {i.sop_uid for i in members}
        received = wado_retrieve(
            s,
            study_uid=first.study_uid,
            series_uid=series_uid,
            sop_uids=None,
            expected=uids,
            sink=sink,  # type: ignore[arg-type]
        )
        assert received == uids
        for o in got:
            assert bytes(o.data) == web.server.instance_file(o.sop_uid)
    # Compressed objects come back as stored: same bytes, same transfer syntax.
    study, series, objs = web.compressed
    for one in (None, [objs[1][0]]):
        got, sink = collect()
        want = {u for u, _, _ in objs} if one is None else set(one)
        wado_retrieve(
            s,
            study_uid=study,
            series_uid=series,
            sop_uids=one,
            expected=want,
            sink=sink,  # type: ignore[arg-type]
        )
        assert {o.sop_uid for o in got} == want
        for o in got:
            syntax = next(ts for u, ts, _ in objs if u == o.sop_uid)
            assert o.transfer_syntax == syntax != "1.2.840.10008.1.2.1"
            assert bytes(o.data) == web.server.instance_file(o.sop_uid)


def test_echo_and_check_retrieve(web: Web) -> None:
    s = site(web.server.dicomweb_url)
    assert c_echo(s, None) < 5  # type: ignore[arg-type]
    [check] = check_retrieve(s, None)  # type: ignore[arg-type]
    assert check.mode == "wado" and check.ok, check


def series_args(web: Web) -> dict[str, object]:
    members = next(iter(by_series(web.instances).values()))
    return {
        "study_uid": members[0].study_uid,
        "series_uid": members[0].series_uid,
        "expected": {i.sop_uid for i in members},
    }


def test_wado_faults(web: Web, tmp_path: Path) -> None:
    with FaultProxy(web.server.http_port) as proxy:
        s = site(proxy.url)
        args = series_args(web)
        expected: set[str] = args["expected"]  # type: ignore[assignment]
        # A cut multipart stream (HTTP framing intact): the complete parts arrive, the cut
        # one does not, and the error says so.
        proxy.mode = "truncate"
        got, sink = collect()
        with pytest.raises(IncompleteWado, match="ended before its closing boundary") as ei:
            wado_retrieve(s, sop_uids=None, sink=sink, **args)  # type: ignore[arg-type]
        assert len(got) == len(expected) - 1 == len(ei.value.received)
        for o in got:
            assert bytes(o.data) == web.server.instance_file(o.sop_uid)
        # A 200 with fewer objects than asked for is an error for the missing one.
        proxy.mode = "fewer"
        got, sink = collect()
        with pytest.raises(IncompleteWado, match=f"delivered {len(expected) - 1} of "):
            wado_retrieve(s, sop_uids=None, sink=sink, **args)  # type: ignore[arg-type]
        assert len(got) == len(expected) - 1
        proxy.mode = "wrong-boundary"
        got, sink = collect()
        with pytest.raises(RetrieveError, match="malformed multipart"):
            wado_retrieve(s, sop_uids=None, sink=sink, **args)  # type: ignore[arg-type]
        assert got == []
        # Objects other than those asked for: none reaches the sink, and the answer is
        # short of every object asked for.
        other_uid, _, other_data = web.compressed[2][0]
        assert other_uid not in expected
        proxy.other_part = other_data
        proxy.mode = "other-object"
        got, sink = collect()
        with pytest.raises(IncompleteWado, match=f"delivered 0 of {len(expected)}"):
            wado_retrieve(s, sop_uids=None, sink=sink, **args)  # type: ignore[arg-type]
        assert got == []
        # A server announcing a 10 GB body and closing after the real one: an error at once,
        # nothing reserved for the announced size.
        proxy.mode = "huge-length"
        got, sink = collect()
        t0 = time.monotonic()
        with pytest.raises(RetrieveError):
            wado_retrieve(s, sop_uids=None, sink=sink, **args)  # type: ignore[arg-type]
        assert time.monotonic() - t0 < 5
        proxy.mode = "wado-401"
        with pytest.raises(AccessDenied, match="site WEB: WADO-RS series retrieval refused"):
            wado_retrieve(s, sop_uids=None, sink=sink, **args)  # type: ignore[arg-type]
        # A stalled server: the site's timeout, not a hang.
        proxy.mode = "stall"
        t0 = time.monotonic()
        with pytest.raises(RetrieveTimeout, match="timed out after 1s"):
            wado_retrieve(site(proxy.url, timeout=1.0), sop_uids=None, sink=sink, **args)  # type: ignore[arg-type]
        assert time.monotonic() - t0 < 5
        proxy.release()
        proxy.mode = "pass"
        got, sink = collect()
        assert wado_retrieve(s, sop_uids=None, sink=sink, **args) == expected  # type: ignore[arg-type]
    # Nobody listening: a clear error at once.
    down = site(f"http://127.0.0.1:{free_port()}/dicom-web")
    t0 = time.monotonic()
    with pytest.raises(RetrieveError, match=r"site WEB: .*cannot connect to"):
        wado_retrieve(down, sop_uids=None, sink=sink, **args)  # type: ignore[arg-type]
    with pytest.raises(RetrieveError, match="cannot connect"):
        qido_find(down, "STUDY", q(StudyInstanceUID=""))
    assert time.monotonic() - t0 < 2


def test_the_mounts_token_is_sent_and_reread(web: Web, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first-token\n")
    token.chmod(0o600)
    with FaultProxy(web.server.http_port) as proxy:
        s = site(proxy.url)
        proxy.require_token = "first-token"
        # Without [identity] no header is sent at all.
        with pytest.raises(AccessDenied, match=r"HTTP 401.*\(none was sent\)"):
            qido_find(s, "STUDY", q(StudyInstanceUID=""))
        assert proxy.auth_seen == [None]
        transport.use_token_file(token)
        assert qido_find(s, "STUDY", q(StudyInstanceUID=""))
        # A renewed token file is used at the next request.
        token.write_text("second-token\n")
        with pytest.raises(AccessDenied):
            qido_find(s, "STUDY", q(StudyInstanceUID=""))
        proxy.require_token = "second-token"
        assert qido_find(s, "STUDY", q(StudyInstanceUID=""))
        assert proxy.auth_seen[-1] == "Bearer second-token"


def test_https_with_the_sites_ca_and_a_wrong_one(
    web: Web, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca, cert, key = make_tls(tmp_path / "right")
    other_ca, _, _ = make_tls(tmp_path / "wrong", name="another")
    with FaultProxy(web.server.http_port, tls=(cert, key)) as proxy:
        good = site(proxy.url, ca_file=ca)
        assert qido_find(good, "STUDY", q(StudyInstanceUID=""))
        members = next(iter(by_series(web.instances).values()))
        got, sink = collect()
        wado_retrieve(
            good,
            study_uid=members[0].study_uid,
            series_uid=members[0].series_uid,
            sop_uids=[members[0].sop_uid],
            expected={members[0].sop_uid},
            sink=sink,  # type: ignore[arg-type]
        )
        assert bytes(got[0].data) == web.server.instance_file(members[0].sop_uid)
        for bad in (site(proxy.url, ca_file=other_ca), site(proxy.url)):
            with pytest.raises(
                RetrieveError, match=r"TLS certificate of 127\.0\.0\.1:.* not trusted"
            ):
                qido_find(bad, "STUDY", q(StudyInstanceUID=""))
