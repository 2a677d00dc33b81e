"""End to end under faults, on a real mount: a crashed daemon leaves a dead mount, not an
empty directory; the audit log fails closed; prefetch under a small cache cap.
"""

from __future__ import annotations

import errno
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
