"""The end of a retrieval in the receiver process: nothing is answered as stored and then not
reported.

``ProcessStorageSCP.sync`` ends the expectation in the child and waits for what it accepted.
A C-STORE of one of its UIDs arriving after that (a slow PACS, the retrieval ended by its
deadline before ``cancel`` reached the child) is refused with 0x0124, as one arriving after
the cancellation: the PACS is told the bridge did not keep it. Before, it was stored and
answered 0x0000, and its notice went to a retrieval that no longer listened.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import FileMetaDataset
from pynetdicom import AE

from mdm.config import BridgeSettings
from mdm.dicom.procscp import ProcessStorageSCP, StoreParams
from mdm.dicom.receiver import StoredNotice
from mdm_demo.localpacs import free_port
from tests.fuzzdicom import CT_CLASS, EXPLICIT, Corpus, uid_of

pytestmark = pytest.mark.timeout(120)

AET = "MDMSYNC"
PEER = "SYNCPACS"


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[ProcessStorageSCP]:
    bridge = BridgeSettings(ae_title=AET, host="127.0.0.1", port=free_port(), timeout=10.0)
    (tmp_path / "cache").mkdir()
    params = StoreParams(tmp_path / "cache", tmp_path / "keyring.json", 1 << 30, 64 * 1024)
    scp = ProcessStorageSCP(bridge, {PEER}, params, log_level=logging.WARNING)
    scp.start()
    yield scp
    scp.stop()


def test_an_object_arriving_after_sync_is_refused_not_lost(receiver: ProcessStorageSCP) -> None:
    corpus = Corpus()
    first, second = uid_of(901), uid_of(902)
    notices: list[Any] = []
    spec = {"site": "SYNC", "level": "identified", "program": "", "view": "identified"}
    exp = receiver.expect([first, second], notices.append, spec)
    ae = AE(PEER)
    ae.add_requested_context(CT_CLASS, EXPLICIT)
    ae.dimse_timeout = 30
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title=AET)
    assert assoc.is_established
    try:

        def send(uid: str) -> int:
            ds = copy.deepcopy(corpus.dataset)
            ds.SOPInstanceUID = uid
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = EXPLICIT
            rsp = assoc.send_c_store(ds)
            assert "Status" in rsp, rsp
            return int(rsp.Status)

        assert send(first) == 0x0000
        receiver.sync(exp)
        # Everything accepted before sync returned has been reported.
        assert [n.sop_uid for n in notices] == [first]
        assert isinstance(notices[0], StoredNotice) and notices[0].info is not None
        # The expectation is still registered in the parent (cancel comes next): the child
        # alone decides, and must not keep what nobody will be told of.
        assert send(second) == 0x0124
    finally:
        assoc.release()
        exp.cancel()
    assert [n.sop_uid for n in notices] == [first]
    assert second not in exp.received
