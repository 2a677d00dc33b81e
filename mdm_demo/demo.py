"""``mdm demo``: two local Orthanc "hospitals" with generated patients, a config and a mount.

Everything lives under one directory (default ``./demo``): the PACS storage, ``mdm.toml``, the
keyring, the encrypted cache and the mount point ``mnt``. ``mdm demo --stop`` takes it down.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from mdm.errors import UserError
from mdm_demo.localpacs import LocalOrthanc, free_port
from mdm_demo.synth import generate

BRIDGE_AET = "MDMBRIDGE"
SITES = (("NORTH", "NORTH_PACS", 101), ("SOUTH", "SOUTH_PACS", 202))


def _state_file(workdir: Path) -> Path:
    return workdir / "demo.json"


def stop_demo(workdir: Path) -> None:
    """Unmount the demo and stop its PACS servers."""
    from mdm_fuse.mount import unmount

    mnt = workdir / "mnt"
    if os.path.ismount(mnt):
        try:
            unmount(mnt)
        except UserError:
            unmount(mnt, lazy=True)
    state = _state_file(workdir)
    if state.exists():
        pids = json.loads(state.read_text()).get("pids", [])
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            time.sleep(0.1)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        state.unlink()
    click.echo(f"demo stopped ({workdir})")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of ours still answers kill(0); it has exited all the same.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def run_demo(workdir: Path, *, patients: int, foreground: bool) -> None:
    """Start the demo; in the foreground, serve until Ctrl-C and then take it all down."""
    if _state_file(workdir).exists():
        stop_demo(workdir)
    workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    bridge_port = free_port()
    servers: list[LocalOrthanc] = []
    click.echo("starting two local PACS with generated patients ...")
    try:
        for name, aet, seed in SITES:
            pacs = LocalOrthanc(
                workdir / "pacs" / name.lower(),
                name=name,
                aet=aet,
                modalities={BRIDGE_AET: (BRIDGE_AET, "127.0.0.1", bridge_port)},
            )
            pacs.start()
            servers.append(pacs)
            if pacs.instances_count() == 0:
                data = generate(
                    None,
                    patients=patients,
                    seed=seed,
                    ct_slices=24,
                    mr_slices=12,
                    rows=256,
                    cols=256,
                    site_tag=name.lower(),
                )
                pacs.upload(data)
        # One study held by both hospitals: reads fail over between them.
        shared = generate(None, patients=1, seed=303, ct_slices=8, mr_slices=0, site_tag="shared")
        for pacs in servers:
            if pacs.instances_count() and shared[0].sop_uid not in pacs.sop_uids():
                pacs.upload(shared)
    except BaseException:
        for s in servers:
            s.stop()
        raise
    _state_file(workdir).write_text(json.dumps({"pids": [s.pid for s in servers]}))
    config = workdir / "mdm.toml"
    lines = [
        "# Written by `mdm demo`: two local PACS on loopback ports.",
        "[bridge]",
        f'ae_title = "{BRIDGE_AET}"',
        'host = "127.0.0.1"',
        f"port = {bridge_port}",
        'retrieve = "move"',
        'timeout = "20s"',
        "",
        "[cache]",
        'dir = "cache"',
        'max_bytes = "2GiB"',
        "",
        "[keys]",
        'keyring = "keyring.json"',
    ]
    for (name, _aet, _seed), pacs in zip(SITES, servers, strict=True):
        lines += [
            "",
            "[[site]]",
            f'name = "{name}"',
            f'ae_title = "{pacs.aet}"',
            'host = "127.0.0.1"',
            f"port = {pacs.dicom_port}",
        ]
    config.write_text("\n".join(lines) + "\n")
    mnt = workdir / "mnt"
    mnt.mkdir(exist_ok=True)
    mdm = [sys.executable, "-m", "mdm"]
    if foreground:
        click.echo(_howto(workdir, config, mnt, foreground=True))
        try:
            subprocess.run(
                [*mdm, "mount", str(mnt), "--config", str(config), "--foreground"], check=False
            )
        except KeyboardInterrupt:
            pass
        finally:
            for s in servers:
                s.stop()
            _state_file(workdir).unlink(missing_ok=True)
        return
    res = subprocess.run([*mdm, "mount", str(mnt), "--config", str(config)], check=False)
    if res.returncode != 0:
        for s in servers:
            s.stop()
        raise UserError("the demo mount failed (see the message above)")
    time.sleep(0.1)
    click.echo(_howto(workdir, config, mnt, foreground=False))


def _mdm_command() -> str:
    """How to run this very ``mdm``: its name if PATH finds this one, its absolute path
    otherwise (a venv's ``bin`` that is not on PATH)."""
    here = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    found = shutil.which("mdm")
    if here is not None and here.name == "mdm" and here.is_file():
        return "mdm" if found and Path(found).resolve() == here else str(here)
    exe = Path(sys.executable).parent / "mdm"  # run as python -m mdm
    if found and exe.is_file() and Path(found).resolve() == exe.resolve():
        return "mdm"
    return str(exe) if exe.is_file() else f"{sys.executable} -m mdm"


def _howto(workdir: Path, config: Path, mnt: Path, *, foreground: bool) -> str:
    mdm = _mdm_command()
    py = sys.executable
    stop = "Ctrl-C here" if foreground else f"{mdm} demo --stop --dir {workdir.resolve()}"
    return f"""
The federation of two local PACS (NORTH and SOUTH) is mounted at {mnt.resolve()}
Try (from any directory):
  {mdm} sites --config {config.resolve()}
  {mdm} find --config {config.resolve()} --level study
  ls {mnt.resolve()}/patients {mnt.resolve()}/sites/NORTH
  cat {mnt.resolve()}/studies/*/.metadata.json | head -30
  {py} -c "import pydicom, glob; \\
    print(pydicom.dcmread(sorted(glob.glob('{mnt.resolve()}/studies/*/*/*.dcm'))[0]))"
  {mdm} cache stats --config {config.resolve()}
Stop: {stop}
"""
