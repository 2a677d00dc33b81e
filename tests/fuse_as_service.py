"""Run ``mdm mount`` with the credentials of a systemd unit, without systemd.

``unshare -m --propagation private python -m tests.fuse_as_service WORKDIR BOUNDING [--nnp]``
runs, as root in a private mount namespace: it makes the interpreter, the venv and the source
tree reachable for an unprivileged user (an overlay of any ancestor directory others cannot
enter, in this namespace only) and ``/dev/fuse`` usable by anyone (as on Debian), then starts
``mdm mount --foreground`` as ``nobody`` with the given capability bounding set (``setpriv``,
as systemd's ``User=`` and ``CapabilityBoundingSet=`` would) and, with ``--nnp``, the
no_new_privs flag (``NoNewPrivileges=yes``). It lists the mount as that user, unmounts it with
``mdm umount`` and prints one JSON line: mounted, the mount's options, the listing, the
unmount's and the daemon's exit codes, and the daemon's log.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NOBODY = 65534
ROOT = Path(__file__).resolve().parent.parent
_overlaid: dict[Path, Path] = {}


def _reachable(path: Path) -> None:
    """Let others traverse to ``path``: each ancestor they cannot enter becomes, in this
    namespace, a tmpfs (0755) holding only the child on the way, bound from the original."""
    parts = path.resolve().parts
    for i in range(1, len(parts)):
        d, child = Path(*parts[:i]), parts[i]
        if d in _overlaid:
            if not (d / child).exists():
                (d / child).mkdir()
                subprocess.run(["mount", "--rbind", str(_overlaid[d] / child), str(d / child)])
            continue
        if d.stat().st_mode & stat.S_IXOTH:
            continue
        stage = Path(tempfile.mkdtemp(prefix="stage-"))
        subprocess.run(["mount", "--rbind", str(d), str(stage)], check=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(d)], check=True)
        _overlaid[d] = stage
        (d / child).mkdir()
        subprocess.run(["mount", "--rbind", str(stage / child), str(d / child)], check=True)


def _as_nobody(bounding: str, nnp: bool) -> list[str]:
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    cmd += [f"--bounding-set={bounding}", "--inh-caps=-all"]
    return cmd + (["--no-new-privs"] if nnp else [])


def main() -> None:
    work, bounding, nnp = Path(sys.argv[1]), sys.argv[2], "--nnp" in sys.argv[3:]
    reads = [a.removeprefix("--read=") for a in sys.argv[3:] if a.startswith("--read=")]
    for p in (Path(sys.base_prefix), Path(sys.prefix), ROOT, work):
        _reachable(p)
    fuse = Path("/dev/fuse")
    if fuse.stat().st_mode & 0o006 != 0o006:  # Debian's udev makes it 0666; a container may not
        node = work / "fuse"
        os.mknod(node, 0o666 | stat.S_IFCHR, fuse.stat().st_rdev)
        os.chmod(node, 0o666)
        subprocess.run(["mount", "--bind", str(node), str(fuse)], check=True)
    mdm = [sys.executable, "-m", "mdm"]
    mnt = work / "mnt"
    log = work / "daemon.log"
    mount = ["mount", str(mnt), "--config", str(work / "mdm.toml"), "--foreground"]
    with open(log, "wb") as out:
        daemon = subprocess.Popen(
            [*_as_nobody(bounding, nnp), *mdm, "--log-level", "INFO", *mount],
            stdout=out,
            stderr=out,
            cwd=ROOT,
        )
    options = ""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and daemon.poll() is None and not options:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            f = line.split()
            if f[4] == str(mnt):
                options = line.split(" - ", 1)[1]
        time.sleep(0.1)
    listing: list[str] = []
    read: dict[str, str] = {}
    umount_rc = None
    if options:
        ls = subprocess.run(
            [*_as_nobody(bounding, nnp), "ls", str(mnt)], capture_output=True, text=True
        )
        listing = ls.stdout.split()
        for rel in reads:  # a file read as that user: retrieved through the receiver process
            cat = subprocess.run(
                [*_as_nobody(bounding, nnp), "cat", str(mnt / rel)], capture_output=True
            )
            read[rel] = base64.b64encode(cat.stdout).decode() if cat.returncode == 0 else ""
        umount_rc = subprocess.run(
            [*_as_nobody(bounding, nnp), *mdm, "umount", str(mnt)], cwd=ROOT
        ).returncode
    try:
        daemon_rc = daemon.wait(30)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon_rc = daemon.wait()
    print(
        json.dumps(
            {
                "mounted": bool(options),
                "options": options,
                "listing": listing,
                "read": read,
                "umount_rc": umount_rc,
                "daemon_rc": daemon_rc,
                "log": log.read_text(errors="replace")[-3000:],
            }
        )
    )


if __name__ == "__main__":
    main()
