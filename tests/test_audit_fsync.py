"""The audit log's fsync runs on a timer thread, never on the thread writing a record, and
still reaches the last record of a burst within fsync_interval; close() leaves a whole chain."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from mdm.access.identity import Principal
from mdm.audit.log import AuditLog, verify

ALICE = Principal(sub="alice", issuer="https://idp.test")
STUDY = "1.2.826.0.1.3680043.8.498.1"
INTERVAL = 0.05
MARGIN = 0.5


def test_fsync_never_on_the_recording_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records written for ~0.5 s: every fsync happens on another thread, at most about once
    per interval, and one covering the last record follows it within interval + margin;
    after close() every record is on disk and the chain verifies."""
    real_fsync = os.fsync
    calls: list[tuple[float, threading.Thread, int, int]] = []  # (when, thread, inode, size)
    lock = threading.Lock()

    def spy(fd: int) -> None:
        st = os.fstat(fd)
        with lock:
            calls.append((time.monotonic(), threading.current_thread(), st.st_ino, st.st_size))
        real_fsync(fd)

    path = tmp_path / "audit" / "audit.jsonl"
    log = AuditLog(path, fsync_interval=INTERVAL)
    me = threading.current_thread()
    monkeypatch.setattr(os, "fsync", spy)
    n = 0
    t_start = time.monotonic()
    try:
        while time.monotonic() - t_start < 0.5:
            t_last = time.monotonic()
            log.record(
                principal=ALICE,
                action="open",
                decision="allow",
                resource={"site": "CHLA", "study_uid": STUDY, "sop_uid": f"{STUDY}.{n}"},
                rule="r",
                policy="a" * 64,
            )
            n += 1
            time.sleep(0.001)
        size = path.stat().st_size
        ino = path.stat().st_ino
        deadline = t_last + INTERVAL + MARGIN
        while time.monotonic() < deadline:
            with lock:
                if any(i == ino and s == size for _, _, i, s in calls):
                    break
            time.sleep(0.005)
        with lock:
            before_close = list(calls)
        assert before_close, "no fsync at all"
        assert all(t is not me for _, t, _, _ in before_close), "fsync on the caller's thread"
        last = [c for c in before_close if c[2] == ino and c[3] == size]
        assert last, f"the last record was not fsynced within {INTERVAL + MARGIN}s"
        assert last[0][0] - t_last < INTERVAL + MARGIN
        # fsynced at most once per interval: each timer syncs the log and its head
        timers = {t for _, t, _, _ in before_close}
        elapsed = before_close[-1][0] - t_start
        assert len(timers) <= elapsed / INTERVAL + 2, (len(timers), elapsed)
        assert n > 50
    finally:
        log.close()
    monkeypatch.undo()

    lines = path.read_bytes().splitlines()
    assert len(lines) == n
    assert [json.loads(x)["seq"] for x in lines] == list(range(1, n + 1))
    assert verify(path) == []
