"""The writer's queue is bounded in bytes as well as in objects: a disk that falls behind
slows the sender down before large objects pile up in memory.

The store is made slow for real: the test holds the store's own lock, so both writer
threads block in ``put`` with an object each, as they would on a slow disk.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mdm.dicom.receiver import ReceivedObject
from mdm.retrieval.writer import Writer, store_spec
from mdm.store.db import open_env
from mdm.store.keys import LocalKeyring
from mdm.store.objects import ObjectStore
from mdm.store.records import ObjectInfo
from tests.fuzzdicom import CT_CLASS, EXPLICIT, uid_of

pytestmark = pytest.mark.timeout(60)

MB = 1 << 20


SPEC = store_spec(
    site="S", level="identified", program="", view="identified", deid=None, meta={}, resource=None
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ObjectStore]:
    (tmp_path / "cache").mkdir()
    keys = LocalKeyring.load(tmp_path / "keyring.json", create=True)
    s = ObjectStore(tmp_path / "cache", open_env(tmp_path / "cache"), keys, 1 << 30, 1 << 16)
    yield s
    s.close()


def test_queued_bytes_stay_within_the_bound_and_everything_is_stored(store: ObjectStore) -> None:
    writer = Writer(store, threads=2, depth=48, max_bytes=32 * MB)
    reports: list[tuple[str, ObjectInfo | None, object]] = []
    submitted: list[int] = []
    peak = [0]

    def report(obj: ReceivedObject, info: ObjectInfo | None, error: object) -> None:
        reports.append((obj.sop_uid, info, error))

    def sender() -> None:
        for n in range(12):
            data = bytes([n]) * (10 * MB)
            obj = ReceivedObject(uid_of(n), CT_CLASS, EXPLICIT, data, "S", 0)
            writer.submit(obj, SPEC, report)
            submitted.append(n)
            peak[0] = max(peak[0], writer.held_bytes)

    try:
        with store._lock:  # both writers block in put, each holding its object
            t = threading.Thread(target=sender, daemon=True)
            t.start()
            time.sleep(1.0)
            # 3 objects of 10 MB fit in 32 MB; the 4th waits (2 with the writers, 1 queued).
            assert len(submitted) == 3, submitted
            assert writer.held_bytes == 30 * MB
        t.join(30)
        assert not t.is_alive()
        assert peak[0] <= 32 * MB
        deadline = time.monotonic() + 30
        while len(reports) < 12 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(u for u, _, _ in reports) == sorted(uid_of(n) for n in range(12))
        assert all(info is not None and err is None for _, info, err in reports)
        assert writer.held_bytes == 0
    finally:
        writer.close()


def test_an_object_larger_than_the_bound_is_taken_alone(store: ObjectStore) -> None:
    writer = Writer(store, threads=2, depth=48, max_bytes=4 * MB)
    done = threading.Event()
    got: list[object] = []

    def report(obj: ReceivedObject, info: ObjectInfo | None, error: object) -> None:
        got.append(error)
        done.set()

    try:
        obj = ReceivedObject(uid_of(99), CT_CLASS, EXPLICIT, bytes(9 * MB), "S", 0)
        writer.submit(obj, SPEC, report)  # would block forever if it waited for room
        assert done.wait(30)
        assert got == [None]
    finally:
        writer.close()
