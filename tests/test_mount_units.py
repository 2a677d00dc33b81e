"""mount_device (read from /proc/self/mountinfo) and set_read_ahead of mdm_fuse.mount, on the
real root filesystem and on tmpfs mounts made here (root only; nothing is left mounted)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mdm_fuse.mount import mount_device, set_read_ahead


def _dev(path: Path | str) -> str:
    d = os.stat(path).st_dev
    return f"{os.major(d)}:{os.minor(d)}"


def _mountinfo() -> list[tuple[str, str, str]]:
    """(major:minor, mount point, fs type) of every mount, parsed independently of the code."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text("utf-8", "surrogateescape").splitlines():
        pre, _, post = line.partition(" - ")
        f = pre.split(" ")
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), f[4])
        out.append((f[2], point, post.split(" ")[0]))
    return out


def _mount_tmpfs(point: Path) -> None:
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "mdmtest", str(point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")


def _umount_all(point: Path) -> None:
    for _ in range(5):
        if not os.path.ismount(point):
            return
        if subprocess.run(["umount", str(point)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Mount points to mount tmpfs on; every one of them is unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    points: list[Path] = []
    try:
        yield points
    finally:
        for p in points:
            _umount_all(p)
        assert not any(os.path.ismount(p) for p in points)


def test_root_device() -> None:
    """For "/" the major:minor of the last mount of / (what stat says on ext4/xfs); a relative
    path is made absolute first."""
    roots = [(dev, fs) for dev, point, fs in _mountinfo() if point == "/"]
    assert roots
    dev, fs = roots[-1]
    assert mount_device(Path("/")) == dev
    if fs not in ("btrfs", "overlay", "zfs"):
        assert dev == _dev("/")


def test_relative_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative path names the mount it resolves to."""
    monkeypatch.chdir("/")
    assert mount_device(Path(".")) == mount_device(Path("/")) is not None


def test_not_a_mount_point(tmp_path: Path) -> None:
    """A directory that is not a mount point (nor a missing path) has no device."""
    assert not os.path.ismount(tmp_path)
    assert mount_device(tmp_path) is None
    assert mount_device(tmp_path / "missing") is None


@pytest.mark.parametrize("name", ["with space", "tab\there", "back\\slash", "naïve dir"])
def test_escaped_mount_point(tmp_path: Path, mounts: list[Path], name: str) -> None:
    """A mount point whose path mountinfo escapes (\\040, \\011, \\134) or holds UTF-8 is
    found; of two mounts stacked on one point, the last one counts."""
    point = tmp_path / name
    point.mkdir()
    mounts.append(point)
    _mount_tmpfs(point)
    first = _dev(point)
    assert mount_device(point) == first
    assert mount_device(tmp_path) is None
    _mount_tmpfs(point)  # a second mount over the first
    second = _dev(point)
    assert second != first
    assert mount_device(point) == second


def test_read_ahead_zero_writes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """nbytes <= 0: False at once, the root mount's knob untouched, nothing logged."""
    dev = mount_device(Path("/"))
    knob = Path("/sys/class/bdi") / str(dev) / "read_ahead_kb"
    before = knob.read_text() if knob.exists() else None
    caplog.set_level(logging.DEBUG, logger="mdm_fuse.mount")
    assert set_read_ahead(Path("/"), 0) is False
    assert set_read_ahead(Path("/"), -4096) is False
    after = knob.read_text() if knob.exists() else None
    assert before == after
    assert caplog.records == []


def test_read_ahead_not_mounted_logs_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A directory that is not a mount: False, and one log line saying so (and how to set it)."""
    caplog.set_level(logging.DEBUG, logger="mdm_fuse.mount")
    assert set_read_ahead(tmp_path, 1 << 20) is False
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert "read-ahead" in lines[0] and str(tmp_path) in lines[0]
    assert "echo 1024 >" in lines[0]


def test_read_ahead_without_a_knob(
    tmp_path: Path, mounts: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A mount with no backing-device knob (tmpfs): False and one log line naming the knob."""
    point = tmp_path / "mnt"
    point.mkdir()
    mounts.append(point)
    _mount_tmpfs(point)
    knob = Path("/sys/class/bdi") / _dev(point) / "read_ahead_kb"
    if knob.exists():
        pytest.skip(f"{knob} exists on this kernel")
    caplog.set_level(logging.DEBUG, logger="mdm_fuse.mount")
    assert set_read_ahead(point, 1 << 20) is False
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert "read-ahead" in lines[0] and str(knob) in lines[0]
