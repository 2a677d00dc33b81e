"""`mdm fetch` (real processes: the command and its receiver process) against a hostile PACS,
by C-GET and by C-MOVE: it fails with one error line naming the site and no traceback,
keeps PACS bytes (an absurd character set) out of its output, stores only the clean objects,
stays within its deadline and within the memory bound."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from mdm.store.db import open_env
from mdm.store.keys import LocalKeyring
from mdm.store.objects import ObjectStore
from mdm.store.records import ObjectRef
from mdm_demo.localpacs import free_port
from tests.fuzzdicom import BOMB_KIND, CT_CLASS, Corpus, uid_of
from tests.test_fuzz_receiver import (
    RSS_BOUND_MIB,
    SERIES,
    STUDY,
    Hostile,
    pydicom_reads_it_all,
    rss_kib,
)

pytestmark = pytest.mark.timeout(180)

BRIDGE = "MDMFETCH"
UIDS = [uid_of(5 * 10**7 + i) for i in range(12)]
# What the hostile PACS sends for each instance (the rest are clean).
KINDS = {
    UIDS[3]: "dup_uid",
    UIDS[4]: "deep",
    UIDS[5]: "nul_uid",
    UIDS[6]: "meta_in_ds",
    UIDS[7]: "no_dataset",
    UIDS[8]: "pixels",
}
LAST = {"get": "pdv1", "move": "pdu_huge"}
BOMB = {"get": None, "move": BOMB_KIND}


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            continue
        for k in kids:
            out += [k, *descendants(k)]
    return out


def catalog(corpus: Corpus) -> list[Dataset]:
    out = []
    for uid in UIDS:
        ds = copy.deepcopy(corpus.dataset)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = STUDY, SERIES, uid
        ds.SOPClassUID = CT_CLASS
        ds.SpecificCharacterSet = "ISO_IR 1^A2"  # quoted by pydicom's warning, if let through
        out.append(ds)
    return out


@pytest.fixture
def hostile() -> Iterator[tuple[Hostile, int]]:
    port = free_port()
    corpus = Corpus()
    evil = Hostile(corpus, port, bridge_aet=BRIDGE, catalog=catalog(corpus))
    yield evil, port
    evil.stop()


@pytest.mark.parametrize("mode", ["get", "move"])
def test_mdm_fetch_from_a_hostile_pacs(
    hostile: tuple[Hostile, int], tmp_path: Path, mode: str
) -> None:
    evil, port = hostile
    evil.forced = {u: KINDS.get(u, "valid") for u in UIDS}
    evil.forced[UIDS[-1]] = LAST[mode]
    bomb = BOMB[mode]
    if bomb:
        evil.forced[UIDS[9]] = bomb
    cfg = tmp_path / "mdm.toml"
    cfg.write_text(
        f"""
[bridge]
ae_title = "{BRIDGE}"
host = "127.0.0.1"
port = {port}
retrieve = "{mode}"
prefetch = false
timeout = "3s"
[cache]
dir = "{tmp_path / "cache"}"
max_bytes = "1GiB"
[keys]
keyring = "{tmp_path / "keyring.json"}"
[[site]]
name = "EVIL"
ae_title = "EVILPACS"
host = "127.0.0.1"
port = {evil.port}
retrieve = "{mode}"
timeout = "3s"
"""
    )
    mdm = Path(sys.executable).with_name("mdm")
    t0 = time.monotonic()
    peaks: dict[int, int] = {}
    with subprocess.Popen(
        [str(mdm), "fetch", "--quiet", "--config", str(cfg), STUDY],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MDM_CONFIG": str(cfg)},
    ) as proc:
        result: list[tuple[str, str]] = []
        reader = threading.Thread(target=lambda: result.append(proc.communicate(timeout=60)))
        reader.start()
        while reader.is_alive():  # the command and its receiver process, sampled
            for pid in [proc.pid, *descendants(proc.pid)]:
                peaks[pid] = max(peaks.get(pid, 0), rss_kib(pid, "VmHWM"))
            time.sleep(0.02)
        reader.join()
    took = time.monotonic() - t0
    out, err = result[0]
    peak_mib = max(peaks.values()) / 1024
    assert proc.returncode == 1, (proc.returncode, err[-2000:])
    assert "Traceback" not in err and "ExceptionGroup" not in err, err[-3000:]
    assert "Traceback" not in out and "ExceptionGroup" not in out, out[-3000:]
    # One line for the UID that failed, naming the site (`mdm fetch` prints UID: outcome).
    errors = [line for line in out.splitlines() if line.startswith(f"{STUDY}: error:")]
    assert len(errors) == 1 and "site EVIL" in errors[0], (out[-2000:], err[-2000:])
    assert "1^A2" not in err and "1^A2" not in out
    assert took < 30
    print(f"\nmdm fetch ({mode}): peak RSS {peak_mib:.0f} MiB, {took:.1f}s")
    assert peak_mib < RSS_BOUND_MIB, peak_mib
    # Only clean copies were stored: the controls sent before the protocol violation.
    keys = LocalKeyring.load(tmp_path / "keyring.json")
    store = ObjectStore(tmp_path / "cache", open_env(tmp_path / "cache"), keys, 1 << 30, 1 << 16)
    try:
        stored = [u for u in UIDS if store.info(ObjectRef(u, "identified")) is not None]
        from mdm.access.identity import LOCAL_ADMIN

        for uid in stored:
            assert evil.forced[uid] == "valid", (uid, evil.forced[uid])
            reader = store.open(ObjectRef(uid, "identified"), LOCAL_ADMIN)
            try:
                assert pydicom_reads_it_all(reader.read(0, reader.size), uid)
            finally:
                reader.close()
    finally:
        store.close()
    clean_sent = [u for u in UIDS if evil.kinds.get(u) == "valid" and evil.status.get(u) == 0]
    assert set(clean_sent) <= set(stored) and clean_sent, (evil.kinds, evil.status, err[-3000:])
