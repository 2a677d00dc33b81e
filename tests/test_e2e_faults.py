"""End to end under faults, on a real mount: a crashed daemon leaves a dead mount, not an
empty directory; the audit log fails closed; prefetch under a small cache cap.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import PacsPair
from tests.mountutil import Mount, mdm
from tests.test_e2e_mount import config, same_dataset, study_path

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def stat_errno(path: Path) -> int:
    try:
        os.stat(path)
    except OSError as e:
        return e.errno or -1
    return 0


def crash(m: Mount, pair: PacsPair, cache: Path) -> None:
    """Crash the daemon for real: a cached blob replaced by a directory makes the next open
    fail with an unexpected OSError, which a strict (test) mount does not survive."""
    inst = pair.a.instances[0]
    path = study_path(m.mountpoint, inst)
    same_dataset(path.read_bytes(), inst)
    blobs = [p for p in (cache / "objects").rglob("*") if p.is_file()]
    assert len(blobs) == 1, blobs
    blobs[0].unlink()
    blobs[0].mkdir()
    with pytest.raises(OSError):
        path.read_bytes()
    assert m.proc is not None
    m.proc.wait(20)
    shutil.rmtree(blobs[0])
    time.sleep(1.5)  # past the kernel's attribute timeout (1 s) for the mount's root


def test_a_crashed_mount_stays_an_error_until_umount_or_the_next_mount(
    orthanc_pair: PacsPair, tmp_path: Path
) -> None:
    cfg = config(orthanc_pair, tmp_path, bridge_options={"prefetch": False})
    mnt = tmp_path / "mnt"
    try:
        crashed_mount_cycle(orthanc_pair, cfg, mnt, tmp_path / "cache")
    finally:  # whatever failed, leave no mount behind
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=False)


def crashed_mount_cycle(orthanc_pair: PacsPair, cfg: Path, mnt: Path, cache: Path) -> None:
    m = Mount(cfg, mnt).start()
    try:
        crash(m, orthanc_pair, cache)
        # The job sees an error, never an empty directory it could take for the data.
        assert stat_errno(mnt) == errno.ENOTCONN
        with pytest.raises(OSError) as ei:
            os.listdir(mnt)
        assert ei.value.errno == errno.ENOTCONN
        assert "left as a dead mount (ENOTCONN)" in m.log_text()
        # `mdm umount` clears it.
        mdm("umount", str(mnt))
        assert stat_errno(mnt) == 0 and not os.path.ismount(mnt)
    finally:
        m.stop()
    m2 = Mount(cfg, mnt).start()
    try:
        crash(m2, orthanc_pair, cache)
        assert stat_errno(mnt) == errno.ENOTCONN
    finally:
        m2.proc = None  # already dead: leave the dead mount for the next mount to clear
    # The next mount clears it and serves.
    m3 = Mount(cfg, mnt).start()
    try:
        inst = orthanc_pair.a.instances[1]
        same_dataset(study_path(mnt, inst).read_bytes(), inst)
    finally:
        m3.stop()


# --- 8. the audit log fails closed ------------------------------------------------------------


@pytest.mark.parametrize("fail_open", [False, True], ids=["default", "fail_open"])
def test_an_open_whose_audit_record_cannot_be_written_fails(
    orthanc_pair: PacsPair, tmp_path: Path, fail_open: bool
) -> None:
    audit = tmp_path / "audit" / "audit.jsonl"
    extra = f'[audit]\nlog = "{audit}"\n' + ("fail_open = true\n" if fail_open else "")
    cfg = config(orthanc_pair, tmp_path, bridge_options={"prefetch": False}, extra=extra)
    first, second = orthanc_pair.a.instances[0], orthanc_pair.a.instances[1]
    with Mount(cfg, tmp_path / "mnt") as m:
        same_dataset(study_path(m.mountpoint, first).read_bytes(), first)
        assert audit.stat().st_size > 0
        # The log can no longer be written: moved away, and a directory where it was.
        audit.rename(audit.with_suffix(".old"))
        audit.mkdir()
        path = study_path(m.mountpoint, second)
        if fail_open:
            same_dataset(path.read_bytes(), second)
            assert "audit.fail_open: going on" in m.log_text()
            return
        with pytest.raises(OSError) as ei:
            path.read_bytes()
        assert ei.value.errno == errno.EIO
        lines = [x for x in m.log_text().splitlines() if "open refused" in x]
        assert len(lines) == 1, lines
        assert "audit record could not be written" in lines[0]


# --- 10. prefetch under a small cache cap -----------------------------------------------------


def retrieved_objects(log: str, series_uid: str) -> int:
    """Objects the mount asked the PACS for, for one series (its 'retrieving N' lines)."""
    import re

    pat = re.compile(rf"retrieving (\d+) object\(s\) of series {re.escape(series_uid)} ")
    return sum(int(m.group(1)) for m in pat.finditer(log))


def test_prefetch_does_not_churn_a_cache_too_small_for_the_series(
    orthanc_pair: PacsPair, tmp_path: Path
) -> None:
    series = orthanc_pair.series(orthanc_pair.shared_series[0])
    assert len(series) >= 4
    # The stored size of one object of the series, measured.
    probe = config(orthanc_pair, tmp_path / "probe", bridge_options={"prefetch": False})
    with Mount(probe, tmp_path / "probe" / "mnt") as m:
        study_path(m.mountpoint, series[0]).read_bytes()
    one = json.loads(mdm("cache", "stats", "--json", "--config", str(probe)).stdout)["bytes"]
    # A cap that holds two and a half objects of a series of four or more.
    cfg = config(orthanc_pair, tmp_path / "small", max_bytes=str(int(one * 2.5)))
    with Mount(cfg, tmp_path / "small" / "mnt") as m:
        for inst in series:
            same_dataset(study_path(m.mountpoint, inst).read_bytes(), inst)
        time.sleep(0.5)  # any prefetch still running would show in the count
        log = m.log_text()
    # One retrieval per object read: nothing prefetched only to be evicted and fetched again.
    n = retrieved_objects(log, series[0].series_uid)
    assert n == len(series), f"{n} objects retrieved for {len(series)} reads"
    assert "prefetch of series" in log and "skipped" in log


# --- 1. the receiver process dies with the mount ----------------------------------------------


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(x) for x in text]
    return out


def test_kill9_of_the_mount_during_cold_reads_ends_its_receiver_at_once(
    orthanc_pair: PacsPair, tmp_path: Path
) -> None:
    """A regression guard on a real mount (the receiver is usually between requests then and
    sees its pipe close); tests/test_receiver_process.py kills the parent while the receiver
    is blocked in a flush, which only the parent watch survives."""
    import threading

    cfg = config(orthanc_pair, tmp_path)  # move, prefetch: the receiver process is busy
    m = Mount(cfg, tmp_path / "mnt").start()
    try:
        assert m.proc is not None
        cmdlines = {
            c: Path(f"/proc/{c}/cmdline").read_text(errors="replace") for c in children(m.proc.pid)
        }
        # The receiver is multiprocessing's spawned child (not its resource tracker).
        receivers = [c for c, cmd in cmdlines.items() if "spawn_main" in cmd]
        assert len(receivers) == 1, receivers
        paths = [study_path(m.mountpoint, i) for i in orthanc_pair.instances]

        def read_all() -> None:
            for p in paths:
                try:
                    p.read_bytes()
                except OSError:
                    return

        t = threading.Thread(target=read_all, daemon=True)
        t.start()
        time.sleep(0.3)
        m.kill9()
        t0 = time.monotonic()
        while Path(f"/proc/{receivers[0]}").exists() and time.monotonic() - t0 < 10:
            stat = Path(f"/proc/{receivers[0]}/stat").read_text(errors="replace")
            if stat.split(") ")[1].startswith("Z"):
                break
            time.sleep(0.02)
        took = time.monotonic() - t0
        assert took < 1.0, f"the receiver outlived the mount by {took:.1f}s"
        t.join(30)
    finally:
        m.stop()
    # The next mount listens on the same port at once and serves.
    with Mount(cfg, tmp_path / "mnt") as m2:
        inst = orthanc_pair.instances[0]
        same_dataset(study_path(m2.mountpoint, inst).read_bytes(), inst)
