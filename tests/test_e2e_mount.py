"""End to end: two real Orthanc hospitals, a real FUSE mount, real readers.

Every instance stored in a PACS appears at its path and reads back with every data element
equal to what was stored; C-MOVE and C-GET; concurrent readers share one retrieval; nothing of
the patients' data lies in clear under the cache directory or in the log.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest

from mdm_demo.synth import GeneratedInstance
from tests.conftest import PacsPair
from tests.mountutil import Mount, mdm

pytestmark = pytest.mark.e2e


_aet_numbers = iter(range(1, 10_000))


def config(pair: PacsPair, d: Path, **kw: object) -> Path:
    """A config with its own storage SCP port and AE title, registered in both PACS."""
    from mdm_demo.localpacs import free_port

    aet, port = f"MDMT{next(_aet_numbers)}", free_port()
    pair.add_destination(aet, port)
    opts = dict(kw.pop("bridge_options", None) or {})  # type: ignore[call-overload]
    opts.update({"ae_title": aet, "port": port})
    return pair.write_config(d, bridge_options=opts, **kw)  # type: ignore[arg-type]


def study_path(mnt: Path, i: GeneratedInstance) -> Path:
    return mnt / "studies" / i.study_uid / i.series_uid / f"{i.sop_uid}.dcm"


def same_dataset(served: bytes, inst: GeneratedInstance) -> None:
    """Every data element equal to what was stored (file meta aside), pixel bytes included."""
    a = pydicom.dcmread(io.BytesIO(served))
    b = pydicom.dcmread(io.BytesIO(inst.read()))
    assert a.file_meta.TransferSyntaxUID == b.file_meta.TransferSyntaxUID
    assert a.PixelData == b.PixelData
    diff = [e.keyword or str(e.tag) for e in b if e.tag not in a or a[e.tag] != e]
    extra = [e.keyword or str(e.tag) for e in a if e.tag not in b]
    assert not diff and not extra, (diff, extra)


@pytest.fixture(scope="module")
def moved(orthanc_pair: PacsPair, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A C-MOVE mount over the module's pair."""
    d = tmp_path_factory.mktemp("move")
    cfg = config(orthanc_pair, d, retrieve="move")
    m = Mount(cfg, d / "mnt").start()
    try:
        yield m
    finally:
        m.stop()


def test_namespace_lists_the_federation(orthanc_pair: PacsPair, moved: Mount) -> None:
    mnt = moved.mountpoint
    assert sorted(os.listdir(mnt)) == [".metadata.json", "browse", "patients", "sites", "studies"]
    studies = {i.study_uid for i in orthanc_pair.instances}
    assert set(os.listdir(mnt / "studies")) - {".metadata.json"} == studies
    assert set(os.listdir(mnt / "patients")) - {".metadata.json"} == {
        i.patient_id for i in orthanc_pair.instances
    }
    for site in orthanc_pair.sites:
        assert set(os.listdir(mnt / "sites" / site.name)) - {".metadata.json"} == site.patient_ids
    # Each series lists exactly its instances, under all three roots.
    for inst in orthanc_pair.instances[:5]:
        names = set(os.listdir(study_path(mnt, inst).parent)) - {".metadata.json"}
        assert names == {f"{x.sop_uid}.dcm" for x in orthanc_pair.series(inst.series_uid)}
        assert (mnt / "patients" / inst.patient_id / inst.study_uid / inst.series_uid).is_dir()
    meta = json.loads(
        (mnt / "studies" / orthanc_pair.instances[0].study_uid / ".metadata.json").read_text()
    )
    assert meta["level"] == "STUDY"
    assert meta["attributes"]["PatientID"] == orthanc_pair.instances[0].patient_id
    assert set(meta["sites"]) == orthanc_pair.sites_holding(orthanc_pair.instances[0].study_uid)
    # Names that do not exist are ENOENT, not an error of another kind.
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "studies" / "1.2.3.4.5.6.7.8.9")
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "studies" / "../../etc")


def test_stat_does_not_retrieve_and_reads_are_exact(orthanc_pair: PacsPair, moved: Mount) -> None:
    mnt = moved.mountpoint
    before = json.loads(mdm("cache", "stats", "--json", "--config", str(moved.config)).stdout)
    for inst in orthanc_pair.instances:
        os.stat(study_path(mnt, inst))
    after = json.loads(mdm("cache", "stats", "--json", "--config", str(moved.config)).stdout)
    assert after["objects"] == before["objects"]
    for inst in orthanc_pair.instances:
        data = study_path(mnt, inst).read_bytes()
        same_dataset(data, inst)
        assert os.stat(study_path(mnt, inst)).st_size == len(data)
    # Through the other roots too.
    i = orthanc_pair.instances[-1]
    p = mnt / "patients" / i.patient_id / i.study_uid / i.series_uid / f"{i.sop_uid}.dcm"
    same_dataset(p.read_bytes(), i)
    site = sorted(orthanc_pair.sites_holding(i.sop_uid))[0]
    p = mnt / "sites" / site / i.patient_id / i.study_uid / i.series_uid / f"{i.sop_uid}.dcm"
    same_dataset(p.read_bytes(), i)


def _read_ahead_kb(mnt: Path) -> int:
    d = os.stat(mnt).st_dev
    return int(Path(f"/sys/class/bdi/{os.major(d)}:{os.minor(d)}/read_ahead_kb").read_text())


def test_the_mount_sets_its_read_ahead(
    orthanc_pair: PacsPair, moved: Mount, tmp_path: Path
) -> None:
    """``[bridge] read_ahead`` (default 1 MiB) reaches the kernel once the mount answers, and
    files read whole through it; ``"0"`` leaves the kernel's value (and says nothing)."""
    if os.geteuid() != 0:
        pytest.fail("this test runs as root, where the mount may set its read-ahead")
    deadline = time.monotonic() + 10
    while _read_ahead_kb(moved.mountpoint) != 1024 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _read_ahead_kb(moved.mountpoint) == 1024
    inst = orthanc_pair.instances[0]
    same_dataset(study_path(moved.mountpoint, inst).read_bytes(), inst)
    cfg = config(orthanc_pair, tmp_path, bridge_options={"read_ahead": "0"})
    with Mount(cfg, tmp_path / "mnt") as m:
        same_dataset(study_path(m.mountpoint, inst).read_bytes(), inst)
        assert _read_ahead_kb(m.mountpoint) == 128  # the kernel's default, left alone
        assert "read-ahead" not in m.log_text()


def test_read_only(orthanc_pair: PacsPair, moved: Mount) -> None:
    mnt = moved.mountpoint
    inst = orthanc_pair.instances[0]
    with pytest.raises(OSError) as ei:
        open(study_path(mnt, inst), "r+b")
    assert ei.value.errno == errno.EROFS
    with pytest.raises(OSError) as ei:
        (mnt / "studies" / "new").mkdir()
    assert ei.value.errno == errno.EROFS


def test_tools_read_uncached_files(orthanc_pair: PacsPair, tmp_path: Path) -> None:
    """cat, cp, rsync and pydicom on files whose size was unknown before the read."""
    cfg = config(orthanc_pair, tmp_path, retrieve="move", bridge_options={"prefetch": False})
    with Mount(cfg, tmp_path / "mnt") as m:
        series = orthanc_pair.series(orthanc_pair.shared_series[0])
        paths = [study_path(m.mountpoint, i) for i in series]
        assert all(os.stat(p).st_size == 0 for p in paths)
        out = subprocess.run(["cat", str(paths[0])], capture_output=True, check=True).stdout
        same_dataset(out, series[0])
        subprocess.run(["cp", str(paths[1]), str(tmp_path / "cp.dcm")], check=True)
        same_dataset((tmp_path / "cp.dcm").read_bytes(), series[1])
        subprocess.run(["rsync", str(paths[2]), str(tmp_path / "rs.dcm")], check=True)
        same_dataset((tmp_path / "rs.dcm").read_bytes(), series[2])
        ds = pydicom.dcmread(paths[3])
        assert ds.SOPInstanceUID == series[3].sop_uid
        assert ds.pixel_array.shape == (64, 64)


def test_forgotten_inodes_are_dropped_and_names_still_resolve(
    orthanc_pair: PacsPair, tmp_path: Path
) -> None:
    """The kernel's FORGET (here forced by dropping the dentry and inode caches) lets the
    daemon drop its inodes, so a long-running mount does not keep every name it ever served;
    the same names resolve again afterwards, to the same content."""
    cfg = config(orthanc_pair, tmp_path, bridge_options={"prefetch": False})
    with Mount(cfg, tmp_path / "mnt", log_level="DEBUG") as m:
        names = [p for p in (m.mountpoint / "studies").rglob("*") if p.suffix == ".dcm"]
        assert len(names) == len(orthanc_pair.instances)
        first = study_path(m.mountpoint, orthanc_pair.instances[0])
        before = first.read_bytes()
        forgot = re.compile(r"forgot \d+ inode\(s\); (\d+) known")
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("2\n")
        # The kernel sends FORGETs in batches; once its caches are dropped, the daemon holds
        # hardly more than the root (it held an inode for every directory and file before).
        deadline = time.monotonic() + 15
        while True:
            known = forgot.findall(m.log.read_text())
            if known and int(known[-1]) <= 5:
                break
            assert time.monotonic() < deadline, f"inodes still known after FORGET: {known[-3:]}"
            time.sleep(0.1)
        again = [p for p in (m.mountpoint / "studies").rglob("*") if p.suffix == ".dcm"]
        assert sorted(again) == sorted(names)
        assert first.read_bytes() == before
        same_dataset(before, orthanc_pair.instances[0])


def test_c_get_reads(orthanc_pair: PacsPair, tmp_path: Path) -> None:
    cfg = config(orthanc_pair, tmp_path, retrieve="get")
    with Mount(cfg, tmp_path / "mnt") as m:
        for inst in orthanc_pair.instances[::3]:
            same_dataset(study_path(m.mountpoint, inst).read_bytes(), inst)
    assert "(get," in m.log_text()


def test_concurrent_readers_share_one_retrieval(orthanc_pair: PacsPair, tmp_path: Path) -> None:
    cfg = config(orthanc_pair, tmp_path, bridge_options={"prefetch": False})
    inst = orthanc_pair.instances[1]
    with Mount(cfg, tmp_path / "mnt") as m:
        p = study_path(m.mountpoint, inst)
        os.stat(p)
        results: list[bytes] = []
        barrier = threading.Barrier(8)

        def reader() -> None:
            barrier.wait()
            results.append(p.read_bytes())

        threads = [threading.Thread(target=reader) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == 8 and len(set(results)) == 1
        same_dataset(results[0], inst)
    retrievals = [
        ln for ln in m.log_text().splitlines() if "retrieving" in ln and inst.series_uid in ln
    ]
    assert len(retrievals) == 1, retrievals


def test_a_header_scan_fetches_one_object_per_series(
    orthanc_pair: PacsPair, tmp_path: Path
) -> None:
    """Reading one header of each series (as a DICOM indexer does) fetches that object, not
    the series: prefetch waits for a second object of the series."""
    cfg = config(orthanc_pair, tmp_path)
    series = orthanc_pair.series(orthanc_pair.shared_series[0])
    assert len(series) >= 3
    with Mount(cfg, tmp_path / "mnt") as m:
        ds = pydicom.dcmread(study_path(m.mountpoint, series[0]), stop_before_pixels=True)
        assert ds.SOPInstanceUID == series[0].sop_uid
        time.sleep(1.5)  # a prefetch, if started, would be retrieving by now
        stats = json.loads(mdm("cache", "stats", "--json", "--config", str(cfg)).stdout)
        assert stats["objects"] == 1, stats
        # A second file of the series: now the rest comes in the background.
        study_path(m.mountpoint, series[1]).read_bytes()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            stats = json.loads(mdm("cache", "stats", "--json", "--config", str(cfg)).stdout)
            if stats["objects"] == len(series):
                break
            time.sleep(0.3)
        assert stats["objects"] == len(series)


def test_series_prefetch_and_no_phi_on_disk(orthanc_pair: PacsPair, tmp_path: Path) -> None:
    cfg = config(orthanc_pair, tmp_path)
    series = orthanc_pair.series(orthanc_pair.shared_series[0])
    with Mount(cfg, tmp_path / "mnt") as m:
        for inst in series:
            same_dataset(study_path(m.mountpoint, inst).read_bytes(), inst)
        listing = [
            ln
            for ln in m.log_text().splitlines()
            if "retrieving" in ln and series[0].series_uid in ln
        ]
        # The first two reads fetch one object each (the second says "the series is
        # wanted"); the rest comes in one prefetch (a read racing its start may fetch one
        # more on its own).
        assert 3 <= len(listing) <= 4, listing
        assert any(
            f"retrieving {len(series) - k} object(s)" in ln for ln in listing for k in (2, 3)
        )
        for i in orthanc_pair.instances:  # list and read everything: the catalog fills too
            study_path(m.mountpoint, i).read_bytes()
    stats = json.loads(mdm("cache", "stats", "--json", "--config", str(cfg)).stdout)
    assert stats["objects"] == len(orthanc_pair.instances)
    verify = mdm("cache", "verify", "--config", str(cfg))
    assert f"{len(orthanc_pair.instances)} object(s) checked, 0 corrupt" in verify.stdout
    needles: set[bytes] = set()
    for inst in orthanc_pair.instances:
        ds = pydicom.dcmread(io.BytesIO(inst.read()))
        needles |= {
            str(ds.PatientName).encode(),
            str(ds.PatientName).split("^")[0].encode(),
            ds.PatientID.encode(),
            ds.PatientBirthDate.encode(),
            ds.AccessionNumber.encode(),
            bytes(ds.PixelData[1000:1064]),
        }
    haystacks = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] + [m.log]
    assert len(haystacks) > len(orthanc_pair.instances)
    for path in haystacks:
        raw = path.read_bytes()
        found = [n for n in needles if n and n in raw]
        assert not found, f"{path} holds patient data in clear: {found[:3]}"


def test_fetch_find_sites_commands(orthanc_pair: PacsPair, tmp_path: Path) -> None:
    cfg = config(orthanc_pair, tmp_path)
    out = mdm("sites", "--config", str(cfg), "--json").stdout
    assert {r["site"]: r["status"] for r in json.loads(out)} == {"SiteA": "up", "SiteB": "up"}
    rows = json.loads(mdm("find", "--config", str(cfg), "--level", "series", "--json").stdout)
    assert {r["SeriesInstanceUID"] for r in rows} == {i.series_uid for i in orthanc_pair.instances}
    for r in rows:
        assert set(r["sites"]) == orthanc_pair.sites_holding(r["SeriesInstanceUID"])
    res = mdm("find", "--config", str(cfg), "--level", "series", "--json", "Modality=CT")
    ct = json.loads(res.stdout)
    assert ct and all(r["Modality"] == "CT" for r in ct)
    # Numbers are JSON numbers; a workstation without [identity] is not warned on every command.
    assert all(isinstance(r["NumberOfSeriesRelatedInstances"], int) for r in ct)
    assert "local administrator" not in res.stderr
    study = orthanc_pair.instances[0].study_uid
    res = mdm("fetch", "--config", str(cfg), study)
    n = sum(1 for i in orthanc_pair.instances if i.study_uid == study)
    assert f"{n} object(s) cached" in res.stdout
    stats = json.loads(mdm("cache", "stats", "--json", "--config", str(cfg)).stdout)
    assert stats["objects"] == n
    ev = mdm("cache", "evict", "--all", "--config", str(cfg))
    assert f"{n} object(s) evicted" in ev.stdout


def test_fetch_beside_a_running_mount(orthanc_pair: PacsPair, tmp_path: Path) -> None:
    """``mdm fetch`` with the configuration of a running mount: the storage SCP port is the
    mount's, so fetch retrieves by C-GET, and the mount serves what it cached."""
    cfg = config(orthanc_pair, tmp_path, retrieve="move", bridge_options={"prefetch": False})
    study = orthanc_pair.instances[0].study_uid
    mine = [i for i in orthanc_pair.instances if i.study_uid == study]
    with Mount(cfg, tmp_path / "mnt") as m:
        assert all(os.stat(study_path(m.mountpoint, i)).st_size == 0 for i in mine)
        res = mdm("--log-level", "INFO", "fetch", "--config", str(cfg), "--quiet", study)
        assert f"{len(mine)} object(s) cached" in res.stdout
        assert "retrieving by C-GET" in res.stderr
        time.sleep(1.2)  # attribute cache (1 s) of the sizes seen as 0 before
        for i in mine:
            p = study_path(m.mountpoint, i)
            assert os.stat(p).st_size > 0  # cached: the size is known before any read
            same_dataset(p.read_bytes(), i)
    assert "retrieving" not in m.log.read_text()  # the mount itself retrieved nothing


def test_bad_config_exit_code(tmp_path: Path) -> None:
    p = tmp_path / "mdm.toml"
    p.write_text(
        '[cache]\ndir = "c"\n[[site]]\nname = "A"\nae_title = "A"\nhost = "h"\nport = "x"\n'
    )
    res = mdm("mount", str(tmp_path), "--config", str(p), check=False)
    assert res.returncode == 2
    assert str(p) in res.stderr and "site[0].port" in res.stderr


def test_site_down_failover_and_deadlines(orthanc_pair_private: PacsPair, tmp_path: Path) -> None:
    pair = orthanc_pair_private
    cfg = config(pair, tmp_path, timeout="3s", bridge_options={"prefetch": False})
    only_a = [i for i in pair.instances if pair.sites_holding(i.sop_uid) == {"SiteA"}]
    shared = [i for i in pair.instances if pair.sites_holding(i.sop_uid) == {"SiteA", "SiteB"}]
    with Mount(cfg, tmp_path / "mnt") as m:
        mnt = m.mountpoint
        os.listdir(mnt / "studies")  # the catalog knows everything
        for i in pair.instances:
            os.stat(study_path(mnt, i))
        cached = only_a[0]
        same_dataset(study_path(mnt, cached).read_bytes(), cached)

        # A silent PACS (SIGSTOP): the reader gets ETIMEDOUT within the deadline, while ls,
        # stat and cached reads keep answering at once.
        pair.a.server.pause()
        try:
            box: dict[str, object] = {}

            def slow_read() -> None:
                t0 = time.monotonic()
                try:
                    study_path(mnt, only_a[1]).read_bytes()
                    box["err"] = None
                except OSError as e:
                    box["err"] = e.errno
                box["elapsed"] = time.monotonic() - t0

            t = threading.Thread(target=slow_read)
            t.start()
            time.sleep(0.5)
            t0 = time.monotonic()
            os.listdir(mnt / "studies")
            os.stat(study_path(mnt, only_a[2]))
            same_dataset(study_path(mnt, cached).read_bytes(), cached)
            assert time.monotonic() - t0 < 1.0
            t.join(60)
            assert box["err"] in (errno.ETIMEDOUT, errno.EIO), box
            assert float(box["elapsed"]) < 3 * 3 + 5  # type: ignore[arg-type]
        finally:
            pair.a.server.resume()

        # A dead PACS: shared objects come from the other site, the others fail fast.
        pair.a.server.stop_hard()
        for i in shared[:3]:
            same_dataset(study_path(mnt, i).read_bytes(), i)
        with pytest.raises(OSError) as ei:
            study_path(mnt, only_a[3]).read_bytes()
        assert ei.value.errno in (errno.EIO, errno.ETIMEDOUT)
        # The mount is still up and serves the other site.
        only_b = next(i for i in pair.instances if pair.sites_holding(i.sop_uid) == {"SiteB"})
        same_dataset(study_path(mnt, only_b).read_bytes(), only_b)
    assert "SiteA" in m.log_text()


def test_kill9_during_retrieval_then_remount(orthanc_pair: PacsPair, tmp_path: Path) -> None:
    cfg = config(orthanc_pair, tmp_path)
    m = Mount(cfg, tmp_path / "mnt").start()
    try:
        paths = [study_path(m.mountpoint, i) for i in orthanc_pair.instances]

        def read_all() -> None:
            for p in paths:
                try:
                    p.read_bytes()
                except OSError:
                    return

        t = threading.Thread(target=read_all, daemon=True)
        t.start()
        time.sleep(0.4)
        m.kill9()
        t.join(30)
    finally:
        m.stop()
    m2 = Mount(cfg, tmp_path / "mnt").start()
    try:
        for i in orthanc_pair.instances[:4]:
            same_dataset(study_path(m2.mountpoint, i).read_bytes(), i)
    finally:
        m2.stop()
    verify = mdm("cache", "verify", "--config", str(cfg))
    assert ", 0 corrupt" in verify.stdout


def test_a_damaged_cached_object_fails_closed_then_is_fetched_again(
    orthanc_pair: PacsPair, tmp_path: Path
) -> None:
    """A blob whose bytes did not all reach the disk (a power cut: blobs are not fsynced,
    docs/STORE.md) or were altered there: its read fails with EIO, no byte of it served, and
    the next read retrieves the object again from its PACS."""
    from mdm.store.crypto import HEADER_LEN

    cfg = config(orthanc_pair, tmp_path, retrieve="move", bridge_options={"prefetch": False})
    inst = orthanc_pair.instances[0]
    with Mount(cfg, tmp_path / "mnt") as m:
        same_dataset(study_path(m.mountpoint, inst).read_bytes(), inst)
    blobs = [p for p in (tmp_path / "cache" / "objects").rglob("*") if p.is_file()]
    assert len(blobs) == 1
    raw = bytearray(blobs[0].read_bytes())
    raw[HEADER_LEN + 100 : HEADER_LEN + 4196] = bytes(4096)  # a page that never reached the disk
    blobs[0].write_bytes(bytes(raw))
    with Mount(cfg, tmp_path / "mnt") as m:  # a new mount: nothing in the kernel's page cache
        path = study_path(m.mountpoint, inst)
        with pytest.raises(OSError) as ei:
            path.read_bytes()
        assert ei.value.errno == errno.EIO
        assert "is damaged" in m.log_text() and "dropped" in m.log_text()
        same_dataset(path.read_bytes(), inst)  # retrieved again
    verify = mdm("cache", "verify", "--config", str(cfg))
    assert "1 object(s) checked, 0 corrupt" in verify.stdout


@pytest.mark.parametrize("exact", [False, True])
def test_tar_and_zip_of_an_uncached_series(
    orthanc_pair: PacsPair, tmp_path: Path, exact: bool
) -> None:
    """`tar` trusts st_size: without bridge.exact_sizes it archives an uncached series as
    empty files (documented; cp, rsync, zip and Python read to EOF); with it, stat retrieves
    and both archives hold the exact objects."""
    import subprocess
    import tarfile
    import zipfile

    cfg = config(orthanc_pair, tmp_path, bridge_options={"prefetch": False, "exact_sizes": exact})
    series = orthanc_pair.series(orthanc_pair.shared_series[0])
    with Mount(cfg, tmp_path / "mnt") as m:
        d = study_path(m.mountpoint, series[0]).parent
        subprocess.run(["tar", "cf", str(tmp_path / "s.tar"), "-C", str(d), "."], check=True)
        subprocess.run(["zip", "-q", "-r", str(tmp_path / "s.zip"), "."], cwd=d, check=True)
    with tarfile.open(tmp_path / "s.tar") as tf:
        members = {Path(x.name).name: x for x in tf.getmembers() if x.name.endswith(".dcm")}
        assert len(members) == len(series)
        for inst in series:
            x = members[f"{inst.sop_uid}.dcm"]
            if exact:
                f = tf.extractfile(x)
                assert f is not None
                same_dataset(f.read(), inst)
            else:
                assert x.size == 0  # what a tool that trusts st_size gets: see SEMANTICS
    with zipfile.ZipFile(tmp_path / "s.zip") as zf:
        for inst in series:
            same_dataset(zf.read(f"{inst.sop_uid}.dcm"), inst)  # zip reads to EOF either way


def test_browse_has_readable_names_with_the_uid_recoverable(
    orthanc_pair: PacsPair, tmp_path: Path
) -> None:
    """/browse/<patient>/<date>_<description>_<UID>/<number>_<modality>_<desc>_<UID>/
    <instance number>_<SOP>.dcm: sorted the way people read them, the same objects as
    /studies, and only the exact readable name resolves."""
    cfg = config(orthanc_pair, tmp_path, bridge_options={"prefetch": False})
    inst = orthanc_pair.instances[0]
    with Mount(cfg, tmp_path / "mnt") as m:
        b = m.mountpoint / "browse"
        assert inst.patient_id in os.listdir(b)
        studies = [n for n in os.listdir(b / inst.patient_id) if n.endswith(inst.study_uid)]
        assert len(studies) == 1
        study = studies[0]
        assert re.match(r"^\d{8}_", study), study  # the study date first
        series = [n for n in os.listdir(b / inst.patient_id / study) if n.endswith(inst.series_uid)]
        assert len(series) == 1 and re.match(r"^\d{4}_[A-Z]+_", series[0]), series
        files = sorted(n for n in os.listdir(b / inst.patient_id / study / series[0]))
        assert ".metadata.json" in files
        files = [f for f in files if f.endswith(".dcm")]
        numbers = [int(f.split("_", 1)[0]) for f in files]
        assert numbers == sorted(numbers) and len(files) == len(
            orthanc_pair.series(inst.series_uid)
        )
        mine = next(f for f in files if f.endswith(f"_{inst.sop_uid}.dcm"))
        p = b / inst.patient_id / study / series[0] / mine
        same_dataset(p.read_bytes(), inst)
        assert p.read_bytes() == study_path(m.mountpoint, inst).read_bytes()
        # The UID is recoverable from every name; a name with another prefix does not resolve.
        assert study.rsplit("_", 1)[1] == inst.study_uid
        with pytest.raises(FileNotFoundError):
            os.stat(b / inst.patient_id / f"19000101_Forged_{inst.study_uid}")
        with pytest.raises(FileNotFoundError):
            os.stat(b / inst.patient_id / study / series[0] / f"99999_{inst.sop_uid}.dcm")
