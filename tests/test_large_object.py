"""A 200 MB object through the receiver process into the encrypted store: held once in
memory (the receive buffer is the Part-10 file; the store encrypts it chunk by chunk)."""

from __future__ import annotations

import copy
import io
import logging
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE

from mdm.config import BridgeSettings, SiteSettings
from mdm.dicom.part10 import file_meta
from mdm.dicom.procscp import ProcessStorageSCP, StoreParams
from mdm.dicom.receiver import ReceivedObject, StorageSCP, StoredNotice
from mdm.dicom.retrieve import Retriever
from mdm.store.db import open_env
from mdm.store.keys import LocalKeyring, Scope
from mdm.store.objects import ObjectStore
from mdm.store.records import ObjectRef
from mdm_demo.localpacs import free_port
from tests.fuzzdicom import CT_CLASS, EXPLICIT, Corpus, uid_of
from tests.test_fuzz_receiver import SERIES, STUDY, pause, rss_kib

pytestmark = pytest.mark.timeout(180)

SIDE = 10240  # 10240 x 10240 x 16 bits: 200 MiB of pixel data
AET = "MDMBIG"


def big_body(uid: str) -> bytes:
    ds = copy.deepcopy(Corpus().dataset)
    ds.SOPInstanceUID = uid
    ds.Rows = ds.Columns = SIDE
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    del ds.PixelData
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    n = SIDE * SIDE * 2
    return buf.getvalue() + struct.pack("<HH2s2xL", 0x7FE0, 0x0010, b"OW", n) + bytes(n)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[ProcessStorageSCP]:
    bridge = BridgeSettings(ae_title=AET, host="127.0.0.1", port=free_port(), timeout=10.0)
    (tmp_path / "cache").mkdir()
    params = StoreParams(tmp_path / "cache", tmp_path / "keyring.json", 2 << 30, 256 * 1024)
    scp = ProcessStorageSCP(bridge, {"BIGPACS"}, params, log_level=logging.WARNING)
    scp.start()
    yield scp
    scp.stop()


@pytest.mark.fast_only  # stock pynetdicom copies the data set
def test_a_200_mb_object_is_held_once(receiver: ProcessStorageSCP) -> None:
    uid = uid_of(7 * 10**7)
    body = big_body(uid)
    pid = receiver._proc.pid
    base = rss_kib(pid)
    notices: list[Any] = []
    done = threading.Event()

    def sink(obj: Any) -> None:
        notices.append(obj)
        done.set()

    spec = {"site": "BIG", "level": "identified", "program": "", "view": "identified"}
    exp = receiver.expect([uid], sink, spec)
    try:
        ae = AE("BIGPACS")
        ae.add_requested_context(CT_CLASS, EXPLICIT)
        ae.dimse_timeout = 60
        assoc = ae.associate("127.0.0.1", receiver.port, ae_title=AET)
        assert assoc.is_established
        try:
            req = C_STORE()
            req.MessageID = 1
            req.AffectedSOPClassUID = CT_CLASS
            req.AffectedSOPInstanceUID = uid
            req.Priority = 2
            req.DataSet = io.BytesIO(body)
            pause(assoc)
            assoc.dimse.send_msg(req, assoc.accepted_contexts[0].context_id)
            _cx, rsp = assoc.dimse.get_msg(block=True)
            assoc._reactor_checkpoint.set()
            assert rsp is not None and rsp.Status == 0x0000
        finally:
            assoc.release()
        receiver.sync(exp)
        assert done.wait(60)
    finally:
        exp.cancel()
    notice = notices[0]
    assert isinstance(notice, StoredNotice) and notice.error is None
    assert notice.info.size == 132 + len(file_meta(CT_CLASS, uid, EXPLICIT)) + len(body)
    peak = rss_kib(pid, "VmHWM")
    grew_mib = (peak - base) / 1024
    size_mib = len(body) / 2**20
    print(f"\n200 MB object: receiver peak RSS {peak / 1024:.0f} MiB (+{grew_mib:.0f} MiB)")
    # One copy of the object, plus PDU buffers and the store's chunk in flight.
    assert grew_mib < size_mib * 1.3, (grew_mib, size_mib)


@pytest.mark.fast_only  # stock pynetdicom copies the data set
def test_a_200_mb_object_by_cget_is_held_once(tmp_path: Path) -> None:
    """The retrieving process (C-GET: the object arrives on our own association) holds it
    once too, and stores it chunk by chunk."""
    uid = uid_of(7 * 10**7 + 1)
    port = free_port()
    root = Path(__file__).resolve().parent.parent
    peer = subprocess.Popen(
        [sys.executable, "-m", "tests.bigget_peer", str(port), uid],
        cwd=root,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert peer.stdout is not None and peer.stdout.readline().strip() == "ready"
        bridge = BridgeSettings(ae_title=AET, host="127.0.0.1", port=free_port(), timeout=10.0)
        scp = StorageSCP(bridge, set())
        keys = LocalKeyring.load(tmp_path / "keyring.json", create=True)
        (tmp_path / "cache").mkdir()
        store = ObjectStore(tmp_path / "cache", open_env(tmp_path / "cache"), keys, 2 << 30)
        retriever = Retriever(bridge, scp)
        me = os.getpid()
        base = rss_kib(me)
        peak = [base]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.01):
                peak[0] = max(peak[0], rss_kib(me))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stored: list[Any] = []

        def sink(obj: ReceivedObject) -> None:
            stored.append(
                store.put(
                    ObjectRef(obj.sop_uid, "identified"), Scope("BIG", "identified", ""), obj.data
                )
            )

        try:
            retriever.retrieve(
                SiteSettings("BIG", "BIGGET", "127.0.0.1", port, retrieve="get", timeout=20.0),
                level="IMAGE",
                study_uid=STUDY,
                series_uid=SERIES,
                sop_uids=[uid],
                expected={uid},
                sink=sink,
                sop_classes={CT_CLASS},
            )
        finally:
            sampling.set()
            sampler.join()
            retriever.close()
            store.close()
        assert len(stored) == 1 and stored[0].size > SIDE * SIDE * 2
        grew_mib = (peak[0] - base) / 1024
        size_mib = SIDE * SIDE * 2 / 2**20
        print(f"\n200 MB object by C-GET: retrieving process +{grew_mib:.0f} MiB")
        assert grew_mib < size_mib * 1.3, (grew_mib, size_mib)
    finally:
        if peer.stdin is not None:
            peer.stdin.close()
        peer.wait(10)
