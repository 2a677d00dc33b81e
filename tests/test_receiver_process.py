"""The receiver process dies with its parent, even while it waits for a slow store.

The store is made slow for real: another process holds the cache index's write lock, so
the receiver's writer blocks on its commit with an object outstanding, and the parent is
waiting for that object (``sync``). The parent is then killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from mdm_demo.synth import generate

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
AET = "PUSHER"

LOCKER = """
import sys, time, lmdb
env = lmdb.open(sys.argv[1], subdir=True, max_dbs=64, map_size=1 << 30)
txn = env.begin(write=True)
print("locked", flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose (its parent, now gone, cannot reap it).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_receiver_exits_within_a_second_of_its_parents_death(tmp_path: Path) -> None:
    inst = next(iter(generate(None, patients=1, seed=5, ct_slices=1, mr_slices=1, rows=8, cols=8)))
    other = generate(None, patients=1, seed=6, ct_slices=1, mr_slices=1, rows=8, cols=8)[0]
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    parent = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "receiver_parent.py"), str(cache), AET, inst.sop_uid],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    locker: subprocess.Popen[str] | None = None
    child = 0
    try:
        assert parent.stdout is not None and parent.stdin is not None
        ready = parent.stdout.readline().split()
        assert ready[:1] == ["ready"], ready
        child, port = int(ready[1]), int(ready[2])
        locker = subprocess.Popen(
            [sys.executable, "-c", LOCKER, str(cache / "index.lmdb")],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
        # The object arrives; its writer blocks on the index lock held by the locker.
        ae = AE(AET)
        ae.add_requested_context(inst.sop_class_uid, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="MDMPROC")
        assert assoc.is_established
        ds = pydicom.dcmread(__import__("io").BytesIO(inst.read()))
        result: list[object] = []
        pusher = threading.Thread(target=lambda: result.append(assoc.send_c_store(ds)))
        pusher.start()
        time.sleep(0.5)
        parent.stdin.write("sync\n")
        parent.stdin.flush()
        assert parent.stdout.readline().strip() == "syncing"
        time.sleep(0.3)
        # Another retrieval registering meanwhile is answered at once.
        parent.stdin.write(f"expect {other.sop_uid}\n")
        parent.stdin.flush()
        line = parent.stdout.readline().split()
        assert line[:1] == ["expected"], line
        assert float(line[1]) < 2.0
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        t0 = time.monotonic()
        while alive(child) and time.monotonic() - t0 < 5:
            time.sleep(0.05)
        gone = time.monotonic() - t0
        assert not alive(child), "the receiver outlived its parent"
        assert gone < 1.0, gone
        assoc.abort()
        pusher.join(10)
        # Its port is free for the next mount (which listens as pynetdicom does, with
        # SO_REUSEADDR: connections of the dead receiver may linger in TIME_WAIT).
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(1)
        s.close()
    finally:
        for p in (parent, locker):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
        if child and alive(child):
            os.kill(child, signal.SIGKILL)
