"""DICOM networking against a real Orthanc, pynetdicom peers and hostile TCP servers."""

from __future__ import annotations

import dataclasses
import io
import logging
import shutil
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from mdm.config import BridgeSettings, SiteSettings
from mdm.dicom.query import c_echo, c_find, fan_out
from mdm.dicom.receiver import ReceivedObject, StorageSCP
from mdm.dicom.retrieve import IncompleteRetrieve, Retriever
from mdm.errors import RetrieveError, RetrieveTimeout
from mdm_demo.localpacs import LocalOrthanc, free_port
from mdm_demo.synth import generate

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


PACS_AET = "TESTPACS"
BRIDGE_AET = "MDMTEST"


@dataclass
class Inst:
    patient_id: str
    patient_name: str
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    pixels: bytes
    part10: bytes


def inventory() -> list[Inst]:
    """Two synthetic patients, each a study with a CT and an MR series (real pixels)."""
    out = []
    for g in generate(None, patients=2, seed=11, ct_slices=6, mr_slices=3, rows=64, cols=64):
        raw = g.read()
        ds = pydicom.dcmread(io.BytesIO(raw))
        out.append(
            Inst(
                g.patient_id,
                g.patient_name or str(ds.PatientName),
                g.study_uid,
                g.series_uid,
                g.sop_uid,
                g.sop_class_uid,
                bytes(ds.PixelData),
                raw,
            )
        )
    return out


@pytest.fixture(scope="module")
def data() -> list[Inst]:
    return inventory()


@pytest.fixture(scope="module")
def bridge(dicom_mode: str) -> BridgeSettings:
    """Built again for each DICOM path (tests/conftest.py, ``dicom_mode``)."""
    return BridgeSettings(ae_title=BRIDGE_AET, host="127.0.0.1", port=free_port(), timeout=5.0)


@pytest.fixture(scope="module")
def scp(bridge: BridgeSettings) -> Iterator[StorageSCP]:
    s = StorageSCP(bridge, {PACS_AET})
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def pacs(
    tmp_path_factory: pytest.TempPathFactory, data: list[Inst], scp: StorageSCP
) -> Iterator[LocalOrthanc]:
    o = LocalOrthanc(
        tmp_path_factory.mktemp("orthanc"),
        name="pacs1",
        aet=PACS_AET,
        modalities={"mdm": (BRIDGE_AET, "127.0.0.1", scp.port)},
        die_with_parent=True,
    )
    try:
        o.start()
        o.upload(inst.part10 for inst in data)
        yield o
    finally:
        o.resume()
        o.stop()


def site_of(pacs: LocalOrthanc, name: str = "PACS1", **kw: object) -> SiteSettings:
    args: dict[str, object] = {"timeout": 5.0, "max_associations": 2}
    args.update(kw)
    return SiteSettings(name, PACS_AET, "127.0.0.1", pacs.dicom_port, **args)  # type: ignore[arg-type]


@pytest.fixture
def retriever(bridge: BridgeSettings, scp: StorageSCP) -> Iterator[Retriever]:
    r = Retriever(bridge, scp)
    yield r
    r.close()


class Collector:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objects: dict[str, ReceivedObject] = {}

    def __call__(self, obj: ReceivedObject) -> None:
        with self.lock:
            self.objects[obj.sop_uid] = obj


def check_pixels(objs: dict[str, ReceivedObject], want: list[Inst]) -> None:
    assert set(objs) == {i.sop_uid for i in want}
    for inst in want:
        obj = objs[inst.sop_uid]
        ds = pydicom.dcmread(io.BytesIO(obj.data))
        assert ds.SOPInstanceUID == inst.sop_uid
        assert obj.sop_class_uid == inst.sop_class_uid
        assert ds.file_meta.TransferSyntaxUID == obj.transfer_syntax
        assert ds.PixelData == inst.pixels


# --- echo and find ------------------------------------------------------------------------


def test_echo_round_trip(pacs: LocalOrthanc, bridge: BridgeSettings) -> None:
    rtt = c_echo(site_of(pacs), bridge)
    assert 0 < rtt < 1.0


def test_echo_closed_port_is_a_named_error(bridge: BridgeSettings) -> None:
    site = SiteSettings("DOWN", "NOBODY", "127.0.0.1", free_port(), timeout=3.0)
    t0 = time.monotonic()
    with pytest.raises(RetrieveError, match="site DOWN"):
        c_echo(site, bridge)
    assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("model", ["auto", "study", "patient"])
def test_find_every_level_returns_the_inventory(
    pacs: LocalOrthanc,
    bridge: BridgeSettings,
    data: list[Inst],
    model: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    site = site_of(pacs, query_model=model)
    q = Dataset()
    q.PatientID = ""
    q.PatientName = ""
    patients = c_find(site, bridge, "PATIENT", q)
    assert sorted(d.PatientID for d in patients) == sorted({i.patient_id for i in data})
    assert all(d.QueryRetrieveLevel == "PATIENT" for d in patients)
    names = {i.patient_id: i.patient_name for i in data}
    assert all(str(d.PatientName) == names[d.PatientID] for d in patients)

    q = Dataset()
    q.StudyInstanceUID = ""
    q.PatientID = ""
    studies = c_find(site, bridge, "STUDY", q)
    assert sorted(d.StudyInstanceUID for d in studies) == sorted({i.study_uid for i in data})

    for study in {i.study_uid for i in data}:
        q = Dataset()
        q.StudyInstanceUID = study
        if model == "patient":
            q.PatientID = next(i.patient_id for i in data if i.study_uid == study)
        series = c_find(site, bridge, "SERIES", q)
        want = {i.series_uid for i in data if i.study_uid == study}
        assert sorted(d.SeriesInstanceUID for d in series) == sorted(want)
        for se in want:
            q = Dataset()
            q.StudyInstanceUID = study
            q.SeriesInstanceUID = se
            q.SOPClassUID = ""
            if model == "patient":
                q.PatientID = next(i.patient_id for i in data if i.study_uid == study)
            images = c_find(site, bridge, "IMAGE", q)
            want_i = {(i.sop_uid, i.sop_class_uid) for i in data if i.series_uid == se}
            assert {(d.SOPInstanceUID, d.SOPClassUID) for d in images} == want_i
    # PHI never reaches the log, at any level
    for inst in data:
        assert inst.patient_name.split("^")[0] not in caplog.text
        assert inst.patient_id not in caplog.text


def test_fan_out_with_a_dead_and_a_silent_site(
    pacs: LocalOrthanc, bridge: BridgeSettings, data: list[Inst]
) -> None:
    silent = socket.socket()  # accepts TCP (kernel backlog) but never says a word
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        good = site_of(pacs, "GOOD")
        dead = SiteSettings("DEAD", "X", "127.0.0.1", free_port(), timeout=2.0)
        mute = SiteSettings("MUTE", "X", "127.0.0.1", silent.getsockname()[1], timeout=2.0)
        q = Dataset()
        q.StudyInstanceUID = ""
        t0 = time.monotonic()
        results = fan_out([dead, good, mute], bridge, "STUDY", q)
        elapsed = time.monotonic() - t0
    finally:
        silent.close()
    assert elapsed < 2.0 + 1.5
    by = {r.site.name: r for r in results}
    assert [r.site.name for r in results] == ["DEAD", "GOOD", "MUTE"]
    assert by["GOOD"].error is None
    assert {d.StudyInstanceUID for d in by["GOOD"].datasets} == {i.study_uid for i in data}
    assert isinstance(by["DEAD"].error, RetrieveError) and "DEAD" in str(by["DEAD"].error)
    assert isinstance(by["MUTE"].error, RetrieveTimeout) and "MUTE" in str(by["MUTE"].error)
    assert by["DEAD"].datasets == [] and by["MUTE"].datasets == []


# --- hostile query peers -------------------------------------------------------------------


def test_find_against_a_junk_byte_server_fails_cleanly(bridge: BridgeSettings) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                try:
                    conn.recv(65536)
                    conn.sendall(b"\x99\x00garbage-garbage-garbage" * 10)
                    time.sleep(0.2)
                except OSError:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        site = SiteSettings("JUNK", "X", "127.0.0.1", srv.getsockname()[1], timeout=3.0)
        q = Dataset()
        q.StudyInstanceUID = ""
        t0 = time.monotonic()
        with pytest.raises(RetrieveError, match="site JUNK"):
            c_find(site, bridge, "STUDY", q)
        assert time.monotonic() - t0 < 2.5
    finally:
        stop.set()
        t.join()
        srv.close()


@pytest.fixture
def bad_find_scp() -> Iterator[int]:
    """A pynetdicom Find SCP that mixes good and malformed matches."""
    good_uid = "1.2.3.4.5"

    def on_find(event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        ok = Dataset()
        ok.QueryRetrieveLevel = "STUDY"
        ok.StudyInstanceUID = good_uid
        yield 0xFF00, ok
        no_key = Dataset()
        no_key.QueryRetrieveLevel = "STUDY"
        no_key.PatientID = "X"
        yield 0xFF00, no_key
        bad_uid = Dataset()
        bad_uid.QueryRetrieveLevel = "STUDY"
        with warnings.catch_warnings():  # pydicom rightly warns about this value
            warnings.simplefilter("ignore")
            bad_uid.StudyInstanceUID = "../../etc/passwd"
        yield 0xFF00, bad_uid
        multi = Dataset()
        multi.QueryRetrieveLevel = "STUDY"
        multi.StudyInstanceUID = ["1.2.3", "1.2.4"]
        yield 0xFF00, multi
        yield 0x0000, None

    ae = AE("BADPACS")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find)]
    )
    yield int(server.server_address[1])
    server.shutdown()


def test_find_skips_malformed_matches(
    bad_find_scp: int, bridge: BridgeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    site = SiteSettings("BAD", "BADPACS", "127.0.0.1", bad_find_scp, timeout=3.0)
    q = Dataset()
    q.StudyInstanceUID = ""
    with caplog.at_level(logging.WARNING, logger="mdm.dicom.query"):
        found = c_find(site, bridge, "STUDY", q)
    assert [d.StudyInstanceUID for d in found] == ["1.2.3.4.5"]
    skipped = [r for r in caplog.records if "site BAD: skipped" in r.getMessage()]
    assert len(skipped) == 3


# --- retrieval ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["move", "get"])
def test_retrieve_series_delivers_decodable_identical_pixels(
    pacs: LocalOrthanc, retriever: Retriever, data: list[Inst], mode: str
) -> None:
    for series in sorted({i.series_uid for i in data})[:2]:
        want = [i for i in data if i.series_uid == series]
        got = Collector()
        out = retriever.retrieve(
            site_of(pacs, f"PACS-{mode}", retrieve=mode),
            level="SERIES",
            study_uid=want[0].study_uid,
            series_uid=series,
            expected={i.sop_uid for i in want},
            sink=got,
            sop_classes={i.sop_class_uid for i in want} if mode == "get" else None,
        )
        assert out.missing == set()
        assert out.received == {i.sop_uid for i in want}
        assert out.status.startswith("Success")
        check_pixels(got.objects, want)


@pytest.mark.fast_only
def test_c_get_stores_are_served_on_the_thread_that_read_them(
    pacs: LocalOrthanc, retriever: Retriever, data: list[Inst]
) -> None:
    """The C-STOREs of our C-GET are handled by the DUL thread that decoded them, as inbound
    ones are, not handed to the thread waiting for the C-GET's responses; two C-GETs in a
    row on the pooled association (the second waits for the reactor to count as paused)."""
    from mdm.dicom.fast import FastDUL

    series = sorted({i.series_uid for i in data})[0]
    want = [i for i in data if i.series_uid == series]
    for _ in range(2):
        threads: list[threading.Thread] = []
        got = Collector()

        def sink(obj: ReceivedObject, got: Collector = got, threads: list = threads) -> None:
            threads.append(threading.current_thread())
            got(obj)

        out = retriever.retrieve(
            site_of(pacs, "PACS-inline-get", retrieve="get"),
            level="SERIES",
            study_uid=want[0].study_uid,
            series_uid=series,
            expected={i.sop_uid for i in want},
            sink=sink,
            sop_classes={i.sop_class_uid for i in want},
        )
        assert out.received == {i.sop_uid for i in want}
        assert threads and all(isinstance(t, FastDUL) for t in threads)
        check_pixels(got.objects, want)


def retrieve_one(retriever: Retriever, site: SiteSettings, inst: Inst, sink: Collector) -> None:
    """Retrieve one instance alone (IMAGE level, as a reader's first byte does)."""
    out = retriever.retrieve(
        site,
        level="IMAGE",
        study_uid=inst.study_uid,
        series_uid=inst.series_uid,
        sop_uids=[inst.sop_uid],
        expected={inst.sop_uid},
        sink=sink,
        sop_classes={inst.sop_class_uid} if site.retrieve == "get" else None,
    )
    assert out.received == {inst.sop_uid}


def test_move_of_one_image_reuses_the_pooled_association(
    pacs: LocalOrthanc, retriever: Retriever, data: list[Inst]
) -> None:
    site = site_of(pacs, "POOLED")
    got = Collector()
    for n, inst in enumerate(data[:4]):
        retrieve_one(retriever, site, inst, got)
        stats = retriever.pool_stats("POOLED")
        assert stats.opened == 1
        assert stats.reused == n
        assert stats.idle == 1 and stats.in_use == 0
    check_pixels(got.objects, data[:4])
    retriever.close()
    assert retriever.pool_stats("POOLED").idle == 0
    assert retriever.pool_stats("POOLED").closed == 1


def alternate_get_and_move(
    retriever: Retriever, site: SiteSettings, insts: list[Inst]
) -> Collector:
    """Retrieve each instance alone, by C-GET and C-MOVE in turn (as ``auto`` does)."""
    import dataclasses

    got = Collector()
    for n, inst in enumerate(insts):
        retrieve_one(
            retriever,
            dataclasses.replace(site, retrieve="get" if n % 2 == 0 else "move"),
            inst,
            got,
        )
    return got


def test_auto_mode_keeps_its_warm_get_and_move_associations(
    pacs: LocalOrthanc, retriever: Retriever, data: list[Inst]
) -> None:
    """``retrieve = "auto"`` alternates C-GET and C-MOVE on one site: both reuse the
    associations opened ahead of time (a mode switch is not a configuration change)."""

    site = site_of(pacs, "AUTO", retrieve="auto")
    assert retriever.warm(site)
    assert retriever.pool_stats("AUTO").opened == 2
    got = alternate_get_and_move(retriever, site, data[:4])
    stats = retriever.pool_stats("AUTO")
    assert (stats.opened, stats.reused, stats.closed, stats.idle) == (2, 4, 0, 2)
    check_pixels(got.objects, data[:4])


def test_a_retrieval_during_warm_up_waits_for_the_warm_associations(
    pacs: LocalOrthanc, retriever: Retriever, data: list[Inst]
) -> None:
    """A mount read at once after start finds the associations still being opened ahead
    of time: it waits for those instead of opening more."""

    site = site_of(pacs, "WARMING", retrieve="auto")
    warm = threading.Thread(target=retriever.warm, args=(site,))
    warm.start()
    alternate_get_and_move(retriever, site, data[:2])
    warm.join(10)
    stats = retriever.pool_stats("WARMING")
    assert (stats.opened, stats.closed, stats.idle) == (2, 0, 2)


def test_a_list_of_images_goes_in_bounded_batches_on_one_association(
    pacs: LocalOrthanc, retriever: Retriever, data: list[Inst], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An IMAGE-level list longer than BATCH_SIZE goes out as several requests, all on one
    pooled association (the path a prefetch of part of a series takes)."""
    import mdm.dicom.retrieve as retrieve_mod

    monkeypatch.setattr(retrieve_mod, "BATCH_SIZE", 4)
    series = data[0].series_uid
    want = [i for i in data if i.series_uid == series]
    assert len(want) > 4
    uids = [i.sop_uid for i in want]
    got = Collector()
    out = retriever.retrieve(
        site_of(pacs, "BATCH"),
        level="IMAGE",
        study_uid=want[0].study_uid,
        series_uid=series,
        sop_uids=uids,
        expected=set(uids),
        sink=got,
    )
    assert out.missing == set()
    check_pixels(got.objects, want)
    assert retriever.pool_stats("BATCH").opened == 1  # both batches on one association


def test_success_with_a_missing_object_is_an_error(
    pacs: LocalOrthanc, retriever: Retriever, data: list[Inst]
) -> None:
    series = data[0].series_uid
    want = [i for i in data if i.series_uid == series]
    ghost = generate_uid()
    got = Collector()
    with pytest.raises(IncompleteRetrieve) as ei:
        retriever.retrieve(
            site_of(pacs, "COUNT"),
            level="SERIES",
            study_uid=want[0].study_uid,
            series_uid=series,
            expected={i.sop_uid for i in want} | {ghost},
            sink=got,
        )
    assert f"delivered {len(want)} of {len(want) + 1}" in str(ei.value)
    assert "site COUNT" in str(ei.value)
    assert ei.value.outcome.missing == {ghost}
    check_pixels(got.objects, want)  # what arrived was delivered first


# --- the storage SCP's door ------------------------------------------------------------------


def _push(port: int, calling: str, inst: Inst) -> int | None:
    ae = AE(calling)
    ae.add_requested_context(inst.sop_class_uid, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=BRIDGE_AET)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(pydicom.dcmread(io.BytesIO(inst.part10)))
        return int(status.Status)
    finally:
        assoc.release()


def test_unsolicited_store_is_refused(scp: StorageSCP, data: list[Inst]) -> None:
    inst = data[0]
    rejected = scp.stats.rejected_associations
    assert _push(scp.port, "INTRUDER", inst) is None  # unknown AE: association rejected
    # pynetdicom counts the rejection (EVT_REJECTED) after queueing the A-ASSOCIATE-RJ: the
    # peer can hold the answer before the counter moves.
    deadline = time.monotonic() + 5
    while scp.stats.rejected_associations == rejected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scp.stats.rejected_associations == rejected + 1
    refused = scp.stats.refused_unexpected
    assert _push(scp.port, PACS_AET, inst) == 0x0124  # known AE, nobody asked for it
    assert scp.stats.refused_unexpected == refused + 1
    got = Collector()
    with scp.expect([inst.sop_uid], got):
        assert _push(scp.port, PACS_AET, inst) == 0x0000
    assert set(got.objects) == {inst.sop_uid}
    assert got.objects[inst.sop_uid].calling_aet == PACS_AET
    assert _push(scp.port, PACS_AET, inst) == 0x0124  # expectation cancelled
    assert scp.pending() == 0


def test_a_failing_sink_gives_the_pacs_a_failure_status(scp: StorageSCP, data: list[Inst]) -> None:
    def boom(obj: ReceivedObject) -> None:
        raise OSError("disk on fire")

    with scp.expect([data[1].sop_uid], boom):
        status = _push(scp.port, PACS_AET, data[1])
    assert status is not None and status != 0 and status >> 12 != 0xF


def test_a_c_store_handler_that_raises_answers_0xc211_and_the_association_goes_on(
    scp: StorageSCP, data: list[Inst], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As pynetdicom answers when its handler raises (0xC211), on either path; the next
    C-STORE on the same association is served."""
    from mdm.dicom.receiver import Expectation

    first, second = data[3], data[4]
    real = Expectation._claim

    def claim(self: Expectation, sop_uid: str) -> bool:
        if sop_uid == first.sop_uid:
            raise RuntimeError("injected fault in the handler")
        return real(self, sop_uid)

    monkeypatch.setattr(Expectation, "_claim", claim)
    got = Collector()
    ae = AE(PACS_AET)
    ae.add_requested_context(first.sop_class_uid, ExplicitVRLittleEndian)
    with scp.expect([first.sop_uid, second.sop_uid], got):
        assoc = ae.associate("127.0.0.1", scp.port, ae_title=BRIDGE_AET)
        assert assoc.is_established
        try:
            statuses = [
                int(assoc.send_c_store(pydicom.dcmread(io.BytesIO(i.part10))).Status)
                for i in (first, second)
            ]
        finally:
            assoc.release()
    assert statuses == [0xC211, 0x0000]
    assert set(got.objects) == {second.sop_uid}
    check_pixels(got.objects, [second])


@pytest.mark.fast_only
def test_inbound_store_is_served_on_the_thread_that_read_it(
    scp: StorageSCP, data: list[Inst]
) -> None:
    """A C-STORE on an accepted context is handled by the DUL thread that decoded it (no
    hand-off to the association thread), and still answered."""
    import threading

    from mdm.dicom.fast import FastDUL

    threads: list[threading.Thread] = []

    def sink(obj: ReceivedObject) -> None:
        threads.append(threading.current_thread())

    with scp.expect([data[2].sop_uid], sink):
        assert _push(scp.port, PACS_AET, data[2]) == 0x0000
    assert len(threads) == 1 and isinstance(threads[0], FastDUL)


def _layers(assoc: Any) -> list[type]:
    """The classes that make up a live association: itself, its DUL, DIMSE, socket and
    DIMSE message queue."""
    parts = [assoc, assoc.dul, assoc.dimse, assoc.dul.socket, assoc.dimse.msg_queue]
    return [type(p) for p in parts]


def test_the_configured_dicom_path_is_the_one_on_live_associations(
    pacs: LocalOrthanc, scp: StorageSCP, bridge: BridgeSettings, data: list[Inst], dicom_mode: str
) -> None:
    """``fast_dicom = false`` is stock pynetdicom: no class of mdm.dicom.fast on an outbound
    association nor on an inbound one (and only pynetdicom's own classes); with the fast
    path on, every layer of both is the fast path's."""
    from pynetdicom.association import Association

    from mdm.dicom import fast
    from mdm.dicom.net import VERIFICATION, contexts_for, new_ae, open_association

    assert bridge.fast_dicom is (dicom_mode != "stock")
    site = site_of(pacs, "LAYERS")
    ae = new_ae(bridge.ae_title, 5.0, bridge.max_pdu, fast_path=bridge.fast_dicom)
    cxs = contexts_for([VERIFICATION], [ExplicitVRLittleEndian])
    out = open_association(ae, site, cxs, max_pdu=0)
    try:
        outbound = [type(ae), *_layers(out)]
    finally:
        out.release()

    inbound: list[list[type]] = []
    compiled: list[tuple[bool, int]] = []

    def sink(obj: ReceivedObject) -> None:
        # Runs while the PACS's association is up: pynetdicom's associations are threads.
        for t in threading.enumerate():
            if isinstance(t, Association) and t.is_acceptor and t.is_established:
                inbound.append(_layers(t))
                reader = getattr(t.dul, "_reader", None)
                compiled.append((getattr(t.dul, "compiled", False), reader and reader.pdus))

    with scp.expect([data[3].sop_uid], sink):
        assert _push(scp.port, PACS_AET, data[3]) == 0x0000
    assert len(inbound) == 1
    live = outbound + inbound[0]
    # The object was read by the compiled loop in "fast" mode, by the Python one otherwise.
    if dicom_mode == "fast":
        assert compiled[0][0] and compiled[0][1], compiled
    else:
        assert compiled == [(False, None)], compiled
    if dicom_mode != "stock":
        assert all(issubclass(c, fast.FAST_CLASSES) for c in live), live
    else:
        assert not [c for c in live if issubclass(c, fast.FAST_CLASSES)], live
        ours = [c for c in live[1:] if c.__module__.split(".")[0] not in ("pynetdicom", "queue")]
        assert not ours, ours


def test_the_receiver_process_takes_the_dicom_path_of_its_settings(
    tmp_path: Path, bridge: BridgeSettings, dicom_mode: str
) -> None:
    from mdm.dicom.procscp import ProcessStorageSCP, StoreParams

    settings = dataclasses.replace(bridge, port=free_port())
    params = StoreParams(tmp_path / "cache", tmp_path / "keyring.json", 1 << 30, 256 * 1024)
    proc = ProcessStorageSCP(settings, {PACS_AET}, params)
    proc.start()
    try:
        assert proc.fast_path is (dicom_mode != "stock") is settings.fast_dicom
    finally:
        proc.stop()


# --- deadlines -------------------------------------------------------------------------------


def test_a_slow_move_that_keeps_progressing_is_not_cut_off(
    pacs: LocalOrthanc, retriever: Retriever, data: list[Inst]
) -> None:
    """The deadline is a progress deadline: each object that arrives (and each pending
    C-MOVE response) restarts it, so a C-MOVE longer than the timeout completes."""
    ct = [i for i in data if i.sop_class_uid == data[0].sop_class_uid]
    series = [i for i in ct if i.series_uid == ct[0].series_uid]
    assert len(series) >= 5
    got = Collector()

    def slow(obj: ReceivedObject) -> None:
        time.sleep(0.25)
        got(obj)

    started = time.monotonic()
    out = retriever.retrieve(
        site_of(pacs, "SLOWSINK", retrieve="move", timeout=0.7),
        level="SERIES",
        study_uid=series[0].study_uid,
        series_uid=series[0].series_uid,
        expected={i.sop_uid for i in series},
        sink=slow,
    )
    assert time.monotonic() - started > 0.7 * 1.5
    assert out.received == {i.sop_uid for i in series} and not out.missing


def test_pending_responses_go_to_the_progress_callback() -> None:
    from io import BytesIO

    from pynetdicom.dimse_primitives import C_FIND, C_MOVE

    from mdm.dicom.fast import ProgressQueue

    def rsp(status: int, **kw: object) -> C_MOVE:
        p = C_MOVE()
        p.MessageIDBeingRespondedTo = 1
        p.Status = status
        p.Identifier = BytesIO()
        for k, v in kw.items():
            setattr(p, k, v)
        return p

    q = ProgressQueue()
    seen: list[int] = []
    q.put((1, rsp(0xFF00)))  # no callback: queued as pynetdicom would
    q.on_pending = lambda: seen.append(1)
    q.put((1, rsp(0xFF00, NumberOfRemainingSuboperations=3)))
    q.put((1, rsp(0xFF01)))
    final, commented = rsp(0x0000), rsp(0xFF00, ErrorComment="odd")
    with_identifier = rsp(0xFF00, Identifier=BytesIO(b"\x08\x00\x58\x00\x00\x00\x00\x00"))
    find = C_FIND()
    find.MessageIDBeingRespondedTo, find.Status = 1, 0xFF00
    for item in (final, commented, with_identifier, find, None):
        q.put((1, item))
    assert seen == [1, 1]
    queued = [q.get_nowait()[1] for _ in range(q.qsize())]
    assert len(queued) == 6 and queued[1:] == [final, commented, with_identifier, find, None]


def test_stopped_pacs_times_out_within_the_deadline(
    pacs: LocalOrthanc, retriever: Retriever, data: list[Inst]
) -> None:
    site = site_of(pacs, "FROZEN", timeout=3.0)
    inst = data[0]
    got = Collector()
    # Warm the pool so the silent peer is met both on a pooled association and a new one.
    retrieve_one(retriever, site, inst, got)
    pacs.pause()
    try:
        for _ in range(2):
            t0 = time.monotonic()
            with pytest.raises(RetrieveTimeout, match="site FROZEN"):
                retriever.retrieve(
                    site,
                    level="SERIES",
                    study_uid=inst.study_uid,
                    series_uid=inst.series_uid,
                    expected={i.sop_uid for i in data if i.series_uid == inst.series_uid},
                    sink=got,
                )
            assert 2.5 < time.monotonic() - t0 < 3.0 + 1.5
        with pytest.raises(RetrieveTimeout):
            c_echo(site, retriever.bridge)
    finally:
        pacs.resume()
    # ... and it recovers once the PACS is back
    retrieve_one(retriever, site, inst, got)


# --- the receive path's direct encodings, against the libraries' own -----------------------

UID_CASES = [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1"),
    ("1.2.840.10008.5.1.4.1.1.4", "1.2.33.4", "1.2.840.10008.1.2"),
    (
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.826.0.1.3680043.8.498.1000884495910016097340218182547652993",
        "1.2.840.10008.1.2.4.50",
    ),
]


@pytest.mark.parametrize(("sop_class", "sop_uid", "syntax"), UID_CASES)
def test_file_meta_is_byte_identical_to_pydicoms(sop_class: str, sop_uid: str, syntax: str) -> None:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import create_file_meta

    from mdm.dicom.part10 import file_meta

    ref = DicomBytesIO()
    meta = create_file_meta(
        sop_class_uid=sop_class, sop_instance_uid=sop_uid, transfer_syntax=syntax
    )
    write_file_meta_info(ref, meta, enforce_standard=True)
    assert file_meta(sop_class, sop_uid, syntax) == ref.getvalue()
    with pytest.raises(ValueError):
        file_meta(sop_class, sop_uid + "é", syntax)


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0x0124, 0xB000])
@pytest.mark.parametrize(("sop_class", "sop_uid", "syntax"), UID_CASES)
def test_store_response_is_byte_identical_to_pynetdicoms(
    sop_class: str, sop_uid: str, syntax: str, status: int
) -> None:
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    from mdm.dicom.fast import encode_store_response

    for message_id in (1, 4242, 65535):
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = message_id
        rsp.AffectedSOPClassUID = sop_class
        rsp.AffectedSOPInstanceUID = sop_uid
        rsp.Status = status
        msg = C_STORE_RSP()
        msg.primitive_to_message(rsp)
        ref = encode(msg.command_set, True, True)
        assert encode_store_response(sop_class, sop_uid, message_id, status) == ref


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
def test_received_object_check_reads_only_the_head(data: list[Inst], syntax: str) -> None:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    from mdm.dicom.part10 import part10
    from mdm.dicom.validate import check_object
    from mdm.errors import IntegrityError

    inst = data[0]
    ds = pydicom.dcmread(io.BytesIO(inst.part10))
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, syntax == "1.2.840.10008.1.2"
    write_dataset(buf, ds)
    body = buf.getvalue()
    obj = part10(inst.sop_class_uid, inst.sop_uid, syntax, body)
    offset = len(obj) - len(body)
    assert pydicom.dcmread(io.BytesIO(obj)).PixelData == inst.pixels
    for fast in (True, False):
        kw = {"dataset_offset": offset, "transfer_syntax": syntax} if fast else {}
        check_object(obj, inst.sop_uid, "S", **kw)  # type: ignore[arg-type]
        with pytest.raises(IntegrityError, match="another object"):
            check_object(obj, inst.sop_uid + "1", "S", **kw)  # type: ignore[arg-type]
        for broken in (obj[:offset], obj[:offset] + b"\x08\x00\x18\x00garbage", b"junk" * 40):
            with pytest.raises(IntegrityError, match="S sent"):
                check_object(broken, inst.sop_uid, "S", **kw)  # type: ignore[arg-type]
