"""The test harness itself: synthetic data, local Orthanc servers, dcmtk helpers."""

from __future__ import annotations

import io
import os
import socket
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import PacsPair

from mdm.config import load_config
from mdm_demo.localpacs import (
    LOOPBACK,
    DcmtkStoreSCP,
    LocalOrthanc,
    echoscu,
    free_port,
    movescu,
    movescu_command,
)
from mdm_demo.synth import (
    CT_IMAGE_STORAGE,
    MR_IMAGE_STORAGE,
    TRIAL_PROTOCOL,
    GeneratedInstance,
    by_series,
    generate,
    generate_series,
)


def _dataset_bytes(part10: bytes) -> bytes:
    """The data set after the file meta group (its length is in (0002,0000))."""
    assert part10[128:132] == b"DICM"
    group_len = int.from_bytes(part10[132 + 8 : 132 + 12], "little")
    return part10[132 + 12 + group_len :]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# -- synthetic data -------------------------------------------------------------------------


def test_synth_is_reproducible_and_realistic(synth_small: list[GeneratedInstance]) -> None:
    again = generate(None, patients=2, seed=1234, ct_slices=5, mr_slices=4, rows=64, cols=64)
    assert [i.read() for i in synth_small] == [i.read() for i in again]
    assert all(i.path is not None and i.path.is_file() for i in synth_small)

    other = generate(None, patients=2, seed=1235, ct_slices=5, mr_slices=4, rows=64, cols=64)
    assert not {i.sop_uid for i in other} & {i.sop_uid for i in synth_small}
    tagged = generate(None, patients=1, seed=1234, ct_slices=1, mr_slices=0, site_tag="B")
    assert tagged[0].sop_uid not in {i.sop_uid for i in synth_small}

    assert len(synth_small) == 2 * (5 + 4)
    assert len({i.sop_uid for i in synth_small}) == len(synth_small)
    assert len({i.patient_id for i in synth_small}) == 2
    assert len(by_series(synth_small)) == 4
    assert [i.trial for i in synth_small].count(TRIAL_PROTOCOL) == 9  # patient 0 only

    pixels: set[bytes] = set()
    for series in by_series(synth_small).values():
        dss = [pydicom.dcmread(io.BytesIO(i.read())) for i in series]
        first = dss[0]
        assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert first.SOPClassUID == (
            CT_IMAGE_STORAGE if first.Modality == "CT" else MR_IMAGE_STORAGE
        )
        assert first.PatientName == series[0].patient_name
        assert first.PatientID.startswith("MDM") and first.PatientID[3:].isdigit()
        for kw in ("PatientBirthDate", "AccessionNumber", "InstitutionName", "StudyDate"):
            assert str(getattr(first, kw)).strip()
        assert str(first.ReferringPhysicianName).count("^") == 1
        assert ("ClinicalTrialProtocolID" in first) == (series[0].trial is not None)
        zs = []
        for ds in dss:
            assert ds.FrameOfReferenceUID == first.FrameOfReferenceUID
            assert ds.ImageOrientationPatient == first.ImageOrientationPatient
            assert ds.PixelSpacing == first.PixelSpacing
            assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.PixelRepresentation) == (
                64,
                64,
                16,
                0,
            )
            arr = ds.pixel_array
            assert arr.shape == (64, 64) and arr.dtype == np.uint16
            assert arr.std() > 50  # a phantom, not a flat image
            pixels.add(arr.tobytes())
            zs.append(float(ds.ImagePositionPatient[2]))
        steps = np.diff(zs)
        assert np.allclose(steps, -float(first.SliceThickness))
        if first.Modality == "CT":
            assert first.RescaleIntercept == -1024 and first.RescaleSlope == 1
            hu = dss[len(dss) // 2].pixel_array.astype(int) - 1024
            assert hu.min() < -900 and hu.max() > 500  # air and bone
    assert len(pixels) == len(synth_small)  # every instance has its own pixels


def test_generate_series_is_fast(tmp_path: Path) -> None:
    t0 = time.monotonic()
    series = generate_series(None, count=300)
    elapsed = time.monotonic() - t0
    assert elapsed < 10, f"300 instances took {elapsed:.1f}s"
    assert len({i.sop_uid for i in series}) == 300
    assert len({i.series_uid for i in series}) == 1
    assert 500_000 < len(series[0].read()) < 560_000
    ds = pydicom.dcmread(io.BytesIO(series[150].read()))
    assert (ds.Rows, ds.Columns) == (512, 512)
    on_disk = generate_series(tmp_path, count=3)
    assert all(i.path is not None and i.data is None for i in on_disk)
    assert [i.read() for i in on_disk] == [i.read() for i in generate_series(None, count=3)]


# -- Orthanc pair ---------------------------------------------------------------------------


def test_pair_answers_echo(orthanc_pair: PacsPair) -> None:
    for site in orthanc_pair.sites:
        assert site.server.running()
        assert echoscu(LOOPBACK, site.server.dicom_port, called_aet=site.server.aet)
    assert not echoscu(LOOPBACK, free_port(), called_aet="NOBODY", timeout=2)


def test_pair_holds_what_was_uploaded(orthanc_pair: PacsPair) -> None:
    a, b = orthanc_pair.a, orthanc_pair.b
    for site in (a, b):
        assert site.server.instances_count() == len(site.instances)
        assert site.server.sop_uids() == site.sop_uids
    assert a.patient_ids >= set(orthanc_pair.only_a_patients)
    assert not b.patient_ids & set(orthanc_pair.only_a_patients)
    assert b.patient_ids >= set(orthanc_pair.only_b_patients)
    assert not a.patient_ids & set(orthanc_pair.only_b_patients)
    assert len(orthanc_pair.shared_series) == 3
    for series in orthanc_pair.shared_series:
        assert orthanc_pair.sites_holding(series) == {"SiteA", "SiteB"}
    split = [i for i in orthanc_pair.instances if i.study_uid == orthanc_pair.split_study]
    assert {i.modality for i in split if "SiteA" in orthanc_pair.sites_holding(i.sop_uid)} == {"CT"}
    assert a.sop_uids | b.sop_uids == {i.sop_uid for i in orthanc_pair.instances}


def test_pair_writes_a_valid_config(orthanc_pair: PacsPair, tmp_path: Path) -> None:
    path = orthanc_pair.write_config(
        tmp_path,
        sites=("SiteB", "SiteA"),
        retrieve="get",
        site_options={"SiteA": {"max_associations": 3}},
    )
    cfg = load_config(path)
    assert cfg.bridge.ae_title == orthanc_pair.bridge_aet
    assert cfg.bridge.port == orthanc_pair.bridge_port
    assert [s.name for s in cfg.sites] == ["SiteB", "SiteA"]
    assert cfg.site("SiteA").port == orthanc_pair.a.server.dicom_port
    assert cfg.site("SiteA").ae_title == "SITEA"
    assert cfg.site("SiteA").max_associations == 3
    assert cfg.site("SiteB").retrieve == "get"
    assert cfg.site("SiteB").timeout == 10.0
    assert cfg.cache.dir == tmp_path / "cache"
    for site in orthanc_pair.sites:
        assert site.server.modalities[orthanc_pair.bridge_aet][2] == orthanc_pair.bridge_port


def test_movescu_into_storescp(orthanc_pair: PacsPair, tmp_path: Path) -> None:
    series_uid = orthanc_pair.shared_series[0]
    expected = {i.sop_uid: i for i in orthanc_pair.series(series_uid)}
    with DcmtkStoreSCP(tmp_path / "recv", aet="PEERSCP") as scp:
        orthanc_pair.add_destination("PEERSCP", scp.port)
        server = orthanc_pair.b.server
        any_inst = next(iter(expected.values()))
        movescu(
            LOOPBACK,
            server.dicom_port,
            called_aet=server.aet,
            dest_aet="PEERSCP",
            study_uid=any_inst.study_uid,
            series_uid=series_uid,
            timeout=60,
        )
        files = scp.files()
        pid = scp.pid
    assert pid is not None and _gone(pid)
    assert len(files) == len(expected)
    for f in files:
        got = f.read_bytes()
        ds = pydicom.dcmread(f)
        inst = expected.pop(ds.SOPInstanceUID)
        orig = pydicom.dcmread(io.BytesIO(inst.read()))
        assert np.array_equal(ds.pixel_array, orig.pixel_array)
        # storescp writes its own file meta; the data set itself travelled untouched.
        assert _dataset_bytes(got) == _dataset_bytes(inst.read())
    assert not expected


def test_movescu_command_line() -> None:
    cmd = movescu_command(
        "127.0.0.1", 104, called_aet="PACS", dest_aet="ME", study_uid="1.2", series_uid=None
    )
    assert cmd[0] == "movescu" and cmd[-2:] == ["127.0.0.1", "104"]
    assert "QueryRetrieveLevel=STUDY" in cmd and "StudyInstanceUID=1.2" in cmd
    cmd = movescu_command(
        "127.0.0.1", 104, called_aet="PACS", dest_aet="ME", study_uid="1.2", series_uid="1.3"
    )
    assert "QueryRetrieveLevel=SERIES" in cmd and "SeriesInstanceUID=1.3" in cmd


# -- life cycle and faults -----------------------------------------------------------------


def test_pause_kill_and_stop_leave_no_process(tmp_path: Path) -> None:
    inst = generate(None, patients=1, seed=5, ct_slices=2, mr_slices=0, rows=16, cols=16)
    with LocalOrthanc(tmp_path / "o", name="Solo", aet="SOLO", die_with_parent=True) as srv:
        srv.upload(inst)
        assert srv.instances_count() == 2
        pid = srv.pid
        assert pid is not None and srv.running()
        srv.pause()
        # A silent PACS: TCP connects (kernel backlog) but nothing answers.
        with socket.create_connection((LOOPBACK, srv.dicom_port), timeout=2):
            pass
        assert not echoscu(LOOPBACK, srv.dicom_port, called_aet="SOLO", timeout=1)
        srv.resume()
        assert echoscu(LOOPBACK, srv.dicom_port, called_aet="SOLO")
        srv.pause()  # stop() must cope with a paused server
    assert _gone(pid)
    assert not srv.running()

    # Restart on the same ports and storage: the data survived; then die hard.
    srv.start()
    assert srv.instances_count() == 2
    srv.clear()
    assert srv.instances_count() == 0
    pid = srv.pid
    assert pid is not None
    srv.stop_hard()
    assert _gone(pid)
    with pytest.raises(OSError):
        socket.create_connection((LOOPBACK, srv.dicom_port), timeout=2).close()
    assert not echoscu(LOOPBACK, srv.dicom_port, called_aet="SOLO", timeout=1)
    srv.stop()  # idempotent


def test_start_survives_a_taken_port(tmp_path: Path) -> None:
    srv = LocalOrthanc(tmp_path / "o", name="Clash", aet="CLASH", die_with_parent=True)
    with socket.socket() as squatter:
        squatter.bind((LOOPBACK, srv.dicom_port))
        squatter.listen()
        taken = srv.dicom_port
        with srv:
            assert srv.dicom_port != taken  # it moved to a free port
            assert echoscu(LOOPBACK, srv.dicom_port, called_aet="CLASH")
        fixed = LocalOrthanc(
            tmp_path / "f", name="Fixed", aet="FIXED", dicom_port=taken, die_with_parent=True
        )
        with pytest.raises(RuntimeError, match="start-up"):
            fixed.start()
        assert not fixed.running()
