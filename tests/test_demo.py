"""README's first command: `mdm demo` mounts two generated PACS, and every command it prints
works as printed, from any directory."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.mountutil import mdm

pytestmark = pytest.mark.e2e


def test_demo_prints_commands_that_work_anywhere(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    res = mdm("demo", "--dir", str(work), "--patients", "1", timeout=240)
    try:
        lines = res.stdout.splitlines()
        start = lines.index("Try (from any directory):") + 1
        end = next(i for i, x in enumerate(lines) if x.startswith("Stop:"))
        block = "\n".join(lines[start:end]).replace("\\\n", "")
        commands = [c.strip() for c in block.splitlines() if c.strip()]
        assert len(commands) >= 5
        for cmd in commands:
            assert ".venv/bin" not in cmd or os.path.isabs(shlex.split(cmd)[0]), cmd
            out = subprocess.run(
                cmd, shell=True, cwd="/", capture_output=True, text=True, timeout=120
            )
            assert out.returncode == 0, (cmd, out.stdout, out.stderr)
            assert out.stdout.strip(), cmd
        stop = lines[end].removeprefix("Stop:").strip()
    finally:
        subprocess.run(
            [*shlex.split(stop)] if "stop" in locals() else ["true"], cwd="/", timeout=120
        )
        mdm("demo", "--stop", "--dir", str(work), check=False)
    assert not os.path.ismount(work / "mnt")
