"""A parent process for a receiver process (tests/test_receiver_process.py).

Starts a ProcessStorageSCP over a cache, registers an expectation for the UID given, prints
``ready <child pid> <port>``, then reads commands from stdin:
``sync``    waits (in a thread) for everything received for that expectation to be stored;
``expect``  registers another UID and prints ``expected <seconds>``.
The test kills this process with SIGKILL.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from mdm.config import BridgeSettings
from mdm.dicom.procscp import ProcessStorageSCP, StoreParams
from mdm.dicom.receiver import Source


def main() -> None:
    cache, aet, uid = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    bridge = BridgeSettings(ae_title="MDMPROC", host="127.0.0.1", port=0)
    scp = ProcessStorageSCP(
        bridge,
        {aet},
        StoreParams(cache, cache.parent / "keyring.json", 2**30, 256 * 1024),
    )
    scp.start()
    src = Source(aet, frozenset({"127.0.0.1"}))
    spec = {"site": "PUSHER", "meta": {"study_uid": "1", "series_uid": "1", "site": "PUSHER"}}
    exp = scp.expect([uid], lambda obj: None, spec, source=src)
    print("ready", scp.pid, scp.port, flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "sync":
            threading.Thread(target=scp.sync, args=(exp,), daemon=True).start()
            print("syncing", flush=True)
        elif cmd[0] == "expect":
            t0 = time.monotonic()
            scp.expect([cmd[1]], lambda obj: None, spec, source=src)
            print("expected", f"{time.monotonic() - t0:.3f}", flush=True)


if __name__ == "__main__":
    main()
