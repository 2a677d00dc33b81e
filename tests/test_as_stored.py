"""Objects come back exactly as the PACS stores them, by C-MOVE and by C-GET.

pydicom's own sample files (JPEG baseline, extended and lossless, JPEG 2000 lossy and
lossless, RLE, deflate, big endian, palette, YBR, SR, RT plan and dose, waveform,
segmentation) are stored in a real Orthanc and retrieved; every one must come back in its
stored transfer syntax with every element equal. A C-GET proposes one presentation context
per (SOP class, transfer syntax): with one context listing all syntaxes, Orthanc sends the
first syntax it can produce and transcodes (or fails on JPEG 2000, which it cannot decode).
"""

from __future__ import annotations

import io
import os
import threading
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from mdm.config import BridgeSettings, SiteSettings
from mdm.dicom.receiver import ReceivedObject, StorageSCP
from mdm.dicom.retrieve import CLASSES_PER_GET, GET_SYNTAXES, Retriever, get_contexts
from mdm_demo.localpacs import LocalOrthanc, free_port

pytestmark = pytest.mark.timeout(300)

PACS_AET = "ASSTORED"
BRIDGE_AET = "MDMSTORED"

SAMPLES = (
    "693_J2KI.dcm",
    "GDCMJ2K_TextGBR.dcm",
    "SC_rgb_gdcm_KY.dcm",
    "examples_jpeg2k.dcm",
    "JPEG-lossy.dcm",
    "SC_rgb_dcmtk_+eb+cr.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "examples_ybr_color.dcm",
    "CT_small.dcm",
    "ExplVR_BigEnd.dcm",
    "MR_small_RLE.dcm",
    "image_dfl.dcm",
    "examples_palette.dcm",
    "examples_rgb_color.dcm",
    "test-SR.dcm",
    "rtplan.dcm",
    "waveform_ecg.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    "SC_rgb_jpeg_lossy_gdcm.dcm",
    "SC_jpeg_no_color_transform.dcm",
    "examples_overlay.dcm",
    "J2K_pixelrep_mismatch.dcm",
    "SC_rgb_small_odd_jpeg.dcm",
    "rtdose.dcm",
    "liver_1frame.dcm",
)


@dataclass(frozen=True)
class Sample:
    name: str
    data: bytes
    sop_uid: str
    sop_class: str
    study_uid: str
    series_uid: str
    syntax: str


def read(data: bytes) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some samples are deliberately odd
        return pydicom.dcmread(io.BytesIO(data), force=True)


def sample(name: str, data: bytes | None = None) -> Sample:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not among pydicom's bundled test files"
    raw = data if data is not None else Path(str(path)).read_bytes()
    ds = read(raw)
    return Sample(
        name,
        raw,
        str(ds.SOPInstanceUID),
        str(ds.SOPClassUID),
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
        str(ds.file_meta.TransferSyntaxUID),
    )


def mixed_series() -> list[Sample]:
    """Four samples of four SOP classes re-filed into one new series (more classes than one
    C-GET association holds with one context per syntax)."""
    study, series = generate_uid(), generate_uid()
    out = []
    for name in ("CT_small.dcm", "MR_small_RLE.dcm", "rtplan.dcm", "test-SR.dcm"):
        path = get_testdata_file(name, download=False)
        assert path is not None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(str(path))
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(sample(name, buf.getvalue()))
    return out


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return [sample(n) for n in SAMPLES]


@pytest.fixture(scope="module")
def mixed() -> list[Sample]:
    return mixed_series()


@pytest.fixture(scope="module")
def bridge(dicom_mode: str) -> BridgeSettings:
    """Built again for each DICOM path (tests/conftest.py, ``dicom_mode``)."""
    return BridgeSettings(ae_title=BRIDGE_AET, host="127.0.0.1", port=free_port(), timeout=10.0)


@pytest.fixture(scope="module")
def scp(bridge: BridgeSettings) -> Iterator[StorageSCP]:
    s = StorageSCP(bridge, {PACS_AET})
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def pacs(
    tmp_path_factory: pytest.TempPathFactory,
    samples: list[Sample],
    mixed: list[Sample],
    scp: StorageSCP,
) -> Iterator[LocalOrthanc]:
    o = LocalOrthanc(
        tmp_path_factory.mktemp("orthanc"),
        name="stored",
        aet=PACS_AET,
        modalities={"mdm": (BRIDGE_AET, "127.0.0.1", scp.port)},
        die_with_parent=True,
    )
    try:
        o.start()
        ids = o.upload(s.data for s in [*samples, *mixed])
        for s, oid in zip([*samples, *mixed], ids, strict=True):
            # What the PACS holds is the reference (Orthanc drops group lengths and
            # trailing padding as it stores): fetched over HTTP, never over DICOM.
            with urllib.request.urlopen(f"{o.url}/instances/{oid}/file", timeout=10) as r:
                STORED[s.sop_uid] = r.read()
        yield o
    finally:
        o.stop()


STORED: dict[str, bytes] = {}
"""SOP Instance UID -> the Part-10 file as the PACS stores it."""


@pytest.fixture
def retriever(bridge: BridgeSettings, scp: StorageSCP) -> Iterator[Retriever]:
    r = Retriever(bridge, scp)
    try:
        yield r
    finally:
        r.close()


def site(pacs: LocalOrthanc) -> SiteSettings:
    return SiteSettings("STORED", PACS_AET, "127.0.0.1", pacs.dicom_port, timeout=10.0)


class Collector:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objects: dict[str, ReceivedObject] = {}

    def __call__(self, obj: ReceivedObject) -> None:
        with self.lock:
            self.objects[obj.sop_uid] = obj


def meaningful(ds: Dataset) -> list[int]:
    """The tags compared: all but group lengths (retired, PS3.5 7.2) and trailing padding
    (FFFC,FFFC), which a DICOM sender may drop (DCMTK does). Values are compared, not the
    VR: a sample that stores encapsulated pixel data as OW is sent as OB."""
    return [int(e.tag) for e in ds if e.tag.element != 0 and e.tag != 0xFFFCFFFC]


def as_stored(got: ReceivedObject, want: Sample) -> str:
    """'' if ``got`` is ``want`` as the PACS stores it (the syntax of the sample, and every
    element of the PACS's copy), else what differs."""
    if got.transfer_syntax != want.syntax:
        return f"transfer syntax {got.transfer_syntax} instead of {want.syntax}"
    a, b = read(got.data), read(STORED[want.sop_uid])
    if str(b.file_meta.TransferSyntaxUID) != want.syntax:
        return "the PACS stores it in another syntax"
    if str(a.file_meta.TransferSyntaxUID) != want.syntax:
        return "file meta names another transfer syntax"
    ta, tb = meaningful(a), meaningful(b)
    diff = sorted(set(ta) ^ set(tb))
    diff += [t for t in tb if t in ta and a[t].value != b[t].value]
    return f"elements differ: {diff[:5]}" if diff else ""


def test_get_contexts_fit_one_association() -> None:
    cxs = get_contexts(["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"])
    assert all(len(cx.transfer_syntax) == 1 for cx in cxs)
    assert len(cxs) == 2 * len(GET_SYNTAXES)
    assert CLASSES_PER_GET * len(GET_SYNTAXES) + 2 <= 128


@pytest.mark.parametrize("mode", ["move", "get"])
def test_every_sample_comes_back_as_stored(
    pacs: LocalOrthanc, retriever: Retriever, samples: list[Sample], mode: str
) -> None:
    """One IMAGE-level retrieval per sample, as a reader's first read does."""
    bad: dict[str, str] = {}
    for s in samples:
        sink = Collector()
        try:
            retriever.retrieve(
                site(pacs),
                level="IMAGE",
                study_uid=s.study_uid,
                series_uid=s.series_uid,
                sop_uids=[s.sop_uid],
                expected={s.sop_uid},
                sink=sink,
                classes_of={s.sop_uid: s.sop_class},
                mode=mode,
            )
        except Exception as e:
            bad[s.name] = f"{type(e).__name__}: {e}"
            continue
        diff = as_stored(sink.objects[s.sop_uid], s)
        if diff:
            bad[s.name] = diff
    print(f"{mode}: {len(samples) - len(bad)}/{len(samples)} element-equal")
    assert not bad, bad


@pytest.mark.parametrize("known", [True, False], ids=["classes-known", "classes-asked"])
def test_get_of_a_series_of_more_classes_than_one_association_holds(
    pacs: LocalOrthanc, retriever: Retriever, mixed: list[Sample], known: bool
) -> None:
    """Four classes in one series: the C-GET is split by class over several associations
    (classes from the catalog, or from a C-FIND when the caller knows none)."""
    assert len({s.sop_class for s in mixed}) > CLASSES_PER_GET
    sink = Collector()
    first = mixed[0]
    out = retriever.retrieve(
        site(pacs),
        level="SERIES",
        study_uid=first.study_uid,
        series_uid=first.series_uid,
        expected={s.sop_uid for s in mixed},
        sink=sink,
        classes_of={s.sop_uid: s.sop_class for s in mixed} if known else None,
        mode="get",
    )
    assert not out.missing
    for s in mixed:
        assert as_stored(sink.objects[s.sop_uid], s) == "", s.name


def test_the_samples_are_bundled_with_pydicom() -> None:
    # The test must never reach for the network: every sample ships with pydicom.
    for name in SAMPLES:
        path = get_testdata_file(name, download=False)
        assert path is not None and os.path.isfile(str(path)), name


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["move", "get", "auto"])
def test_every_sample_reads_back_as_stored_through_a_mount(
    pacs: LocalOrthanc, samples: list[Sample], tmp_path: Path, mode: str
) -> None:
    """Every retrieve mode, through a real mount: each sample file, read as a job would."""
    from tests.mountutil import Mount

    aet, port = f"MDMS{mode.upper()}", free_port()
    pacs.add_modality(aet, aet, "127.0.0.1", port)
    cfg = tmp_path / "mdm.toml"
    cfg.write_text(
        f'[bridge]\nae_title = "{aet}"\nhost = "127.0.0.1"\nport = {port}\n'
        f'retrieve = "{mode}"\nprefetch = false\n'
        f'[cache]\ndir = "{tmp_path / "cache"}"\n[keys]\nkeyring = "{tmp_path / "k.json"}"\n'
        f'[[site]]\nname = "STORED"\nae_title = "{PACS_AET}"\nhost = "127.0.0.1"\n'
        f'port = {pacs.dicom_port}\nretrieve = "{mode}"\ntimeout = "10s"\n'
    )
    bad: dict[str, str] = {}
    with Mount(cfg, tmp_path / "mnt") as m:
        for s in samples:
            path = m.mountpoint / "studies" / s.study_uid / s.series_uid / f"{s.sop_uid}.dcm"
            try:
                data = path.read_bytes()
            except OSError as e:
                bad[s.name] = f"read failed: {e}"
                continue
            ds = read(data)
            got = ReceivedObject(
                s.sop_uid, s.sop_class, str(ds.file_meta.TransferSyntaxUID), data, ""
            )
            diff = as_stored(got, s)
            if diff:
                bad[s.name] = diff
    print(f"mount, {mode}: {len(samples) - len(bad)}/{len(samples)} element-equal")
    assert not bad, bad
