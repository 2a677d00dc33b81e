"""What a hostile peer can do to the storage SCP and to our C-GET associations: raw sockets and
pynetdicom peers on 127.0.0.1, against the real listener (one regression test per point of
the hostile-PACS report)."""

from __future__ import annotations

import io
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

from mdm.config import BridgeSettings, SiteSettings
from mdm.dicom import net
from mdm.dicom.receiver import ReceivedObject, StorageSCP
from mdm.dicom.retrieve import Retriever
from mdm.errors import RetrieveError
from mdm_demo.localpacs import free_port
from mdm_demo.synth import generate
from tests.test_fuzz_receiver import pause

pytestmark = pytest.mark.timeout(120)

PACS_AET = "EVILPACS"
BRIDGE_AET = "MDMLIMITS"
EXPLICIT = "1.2.840.10008.1.2.1"
GEN = generate(None, patients=1, seed=1818, ct_slices=3, mr_slices=0, rows=32, cols=32)
DS = [pydicom.dcmread(io.BytesIO(g.read())) for g in GEN]
CT_CLASS = GEN[0].sop_class_uid


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def scp() -> Iterator[StorageSCP]:
    bridge = BridgeSettings(
        ae_title=BRIDGE_AET, host="127.0.0.1", port=free_port(), timeout=2.0, max_pdu=65536
    )
    s = StorageSCP(bridge, {PACS_AET})
    s.start()
    yield s
    s.stop()


class Collector:
    def __init__(self) -> None:
        self.objects: dict[str, ReceivedObject] = {}

    def __call__(self, obj: ReceivedObject) -> None:
        self.objects[obj.sop_uid] = obj


def associate(port: int) -> Association:
    ae = AE(PACS_AET)
    ae.add_requested_context(CT_CLASS, EXPLICIT)
    ae.acse_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title=BRIDGE_AET)
    assert assoc.is_established
    return assoc


def raw_of(assoc: Association) -> socket.socket:
    sock = assoc.dul.socket
    assert sock is not None and sock.socket is not None
    return sock.socket


def wait_for(cond: object, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():  # type: ignore[operator]
            return time.monotonic() - t0
        time.sleep(0.01)
    raise AssertionError(f"not within {timeout}s")


def read_until_closed(s: socket.socket, timeout: float) -> bytes:
    s.settimeout(timeout)
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return got


def store(assoc: Association, ds: Dataset) -> int:
    status = assoc.send_c_store(ds)
    return int(status.Status) if "Status" in status else -1


def still_serves(scp: StorageSCP) -> None:
    """A well-behaved peer is still served after the abuse."""
    got = Collector()
    with scp.expect([GEN[1].sop_uid], got):
        assoc = associate(scp.port)
        try:
            assert store(assoc, DS[1]) == 0x0000
        finally:
            assoc.release()
    assert set(got.objects) == {GEN[1].sop_uid}


# --- 1. memory is bounded by what we negotiated -----------------------------------------------


@pytest.mark.fast_only  # stock pynetdicom reads a PDU of any announced length
def test_a_huge_pdu_announced_before_association_costs_nothing(
    scp: StorageSCP, caplog: pytest.LogCaptureFixture
) -> None:
    before = rss_mib()
    socks = []
    for pdu_type in (0x01, 0x04, 0x09):
        s = socket.create_connection(("127.0.0.1", scp.port))
        s.sendall(struct.pack(">BBL", pdu_type, 0, 1 << 30))
        socks.append(s)
    for s in socks:
        answer = read_until_closed(s, 3)
        assert answer[:1] == b"\x07"  # an A-ABORT, then the connection is closed
        s.close()
    assert rss_mib() - before < 20
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("before association" in m for m in errors)
    assert any("unknown PDU type 0x09" in m for m in errors)
    still_serves(scp)


@pytest.mark.fast_only  # stock pynetdicom reads a PDU of any announced length
def test_a_pdata_over_the_negotiated_maximum_is_aborted(scp: StorageSCP) -> None:
    before = rss_mib()
    assoc = associate(scp.port)
    raw_of(assoc).sendall(struct.pack(">BBL", 0x04, 0, 1 << 30))
    took = wait_for(lambda: not assoc.is_established, 2)
    assert took < 1.0
    assert rss_mib() - before < 20
    still_serves(scp)


@pytest.mark.fast_only  # stock pynetdicom reads a PDU of any announced length
def test_a_large_pdata_is_read_as_it_arrives() -> None:
    """``max_pdu = 0`` announces DEFAULT_MAX_PDU, never "unlimited"; PDUs within it are read
    as their bytes arrive, so announcing one costs nothing until it is sent."""
    bridge = BridgeSettings(
        ae_title=BRIDGE_AET, host="127.0.0.1", port=free_port(), timeout=2.0, max_pdu=0
    )
    default = StorageSCP(bridge, {PACS_AET})
    default.start()
    try:
        held = []
        before = rss_mib()
        for _ in range(8):  # 8 x 4 MiB announced, a few bytes sent, then silence
            a = associate(default.port)
            assert a.acceptor.maximum_length == net.DEFAULT_MAX_PDU
            n = net.DEFAULT_MAX_PDU
            raw_of(a).sendall(struct.pack(">BBLLB", 0x04, 0, n, n - 4, 1) + b"\x00" * 10)
            held.append(a)
        time.sleep(0.5)
        assert rss_mib() - before < 16
        over = associate(default.port)
        raw_of(over).sendall(struct.pack(">BBL", 0x04, 0, net.DEFAULT_MAX_PDU + 1024))
        assert wait_for(lambda: not over.is_established, 2) < 1.0
        for a in held:  # the stalled PDUs end at the stall timeout
            wait_for(lambda a=a: not a.is_established, 5)
    finally:
        default.stop()


@pytest.mark.fast_only  # stock: no gate, ARTIM is acse_timeout
def test_unassociated_connections_are_limited_in_number_and_time(
    scp: StorageSCP, caplog: pytest.LogCaptureFixture
) -> None:
    idle = [socket.create_connection(("127.0.0.1", scp.port)) for _ in range(8)]
    time.sleep(0.3)
    extra = socket.create_connection(("127.0.0.1", scp.port))
    t0 = time.monotonic()
    assert read_until_closed(extra, 2) == b""  # closed at once, nothing said
    assert time.monotonic() - t0 < 1.0
    extra.close()
    assert any("have not presented an association" in r.getMessage() for r in caplog.records)
    # A peer that dribbles a header a byte at a time is cut at the deadline too.
    for s in idle[:7]:
        s.close()
    drip = idle[7]
    t0 = time.monotonic()
    header = struct.pack(">BBL", 0x01, 0, 200)
    cut = False
    for b in header * 20:
        try:
            drip.sendall(bytes([b]))
        except OSError:
            cut = True
            break
        time.sleep(0.2)
        if time.monotonic() - t0 > 4:
            break
    took = time.monotonic() - t0
    assert cut or read_until_closed(drip, 1) in (b"", b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00")
    assert took < 2.0 + 1.5
    drip.close()
    still_serves(scp)


# --- 5. a malformed PDU aborts at once, naming the peer ---------------------------------------


@pytest.mark.fast_only  # stock pynetdicom has its own outcomes
@pytest.mark.parametrize(
    "pdu",
    [
        pytest.param(struct.pack(">BBLLB", 0x04, 0, 5, 1, 1), id="one-byte-pdv"),
        pytest.param(struct.pack(">BBLL", 0x04, 0, 4, 0), id="empty-pdv"),
        pytest.param(struct.pack(">BBL", 0x0A, 0, 8) + b"\0" * 8, id="unknown-type"),
        pytest.param(struct.pack(">BBL", 0x05, 0, 40) + b"\0" * 40, id="release-rq-of-40"),
        pytest.param(struct.pack(">BBLLB", 0x04, 0, 10, 6, 1) + b"\x03\0\0\0\0", id="pdv-past-pdu"),
    ],
)
def test_a_malformed_pdu_aborts_at_once(
    scp: StorageSCP, caplog: pytest.LogCaptureFixture, pdu: bytes
) -> None:
    assoc = associate(scp.port)
    raw_of(assoc).sendall(pdu)
    assert wait_for(lambda: not assoc.is_established, 2) < 1.0
    assert assoc.is_aborted
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(f"AE {PACS_AET!r}" in m and "association aborted" in m for m in errors), errors
    assert not any(r.exc_info for r in caplog.records)
    still_serves(scp)


# --- 4. every C-STORE gets an answer ----------------------------------------------------------


def test_a_store_without_a_data_set_is_answered(scp: StorageSCP) -> None:
    got = Collector()
    with scp.expect([GEN[0].sop_uid], got):
        assoc = associate(scp.port)
        try:
            req = C_STORE()
            req.MessageID = 7
            req.AffectedSOPClassUID = CT_CLASS
            req.AffectedSOPInstanceUID = GEN[0].sop_uid
            req.Priority = 2
            cx = assoc.accepted_contexts[0].context_id
            pause(assoc)  # its reactor must not take our response
            assoc.dimse.send_msg(req, cx)
            _cx, rsp = assoc.dimse.get_msg(block=True)
            assoc._reactor_checkpoint.set()
            assert isinstance(rsp, C_STORE)
            assert rsp.MessageIDBeingRespondedTo == 7 and rsp.Status == 0xC000
            # ... and the association goes on.
            assert store(assoc, DS[0]) == 0x0000
        finally:
            assoc.release()
    assert set(got.objects) == {GEN[0].sop_uid}


# --- the C-GET side: a hostile C-GET SCP ------------------------------------------------------


class HostileGet:
    """A pynetdicom C-GET SCP whose C-STOREs to the bridge misbehave as told."""

    def __init__(self) -> None:
        self.port = free_port()
        self.statuses: list[int] = []
        self.mode = "good"
        ae = AE("EVILGET")
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_supported_context(CT_CLASS, EXPLICIT, scu_role=True, scp_role=True)
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_GET, self.on_get)]
        )

    def _raw_store(self, assoc: Association, cx_id: int, with_data: bool) -> None:
        req = C_STORE()
        req.MessageID = 99
        req.AffectedSOPClassUID = CT_CLASS
        req.AffectedSOPInstanceUID = GEN[0].sop_uid
        req.Priority = 2
        if with_data:
            req.DataSet = io.BytesIO(DS_BODY)
        assoc.dimse.send_msg(req, cx_id)
        _cx, rsp = assoc.dimse.get_msg(block=True)
        self.statuses.append(int(rsp.Status) if rsp is not None else -1)

    def on_get(self, event: evt.Event) -> Iterator[object]:
        yield 1
        assoc = event.assoc
        cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == CT_CLASS)
        if self.mode == "no-data-set":
            self._raw_store(assoc, cx.context_id, with_data=False)
        elif self.mode == "other-context":
            self._raw_store(assoc, 255, with_data=True)
        yield 0x0000, None

    def stop(self) -> None:
        self.server.shutdown()


def _body() -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    b = DicomBytesIO()
    b.is_little_endian, b.is_implicit_VR = True, False
    write_dataset(b, DS[0])
    return b.getvalue()


DS_BODY = _body()


@pytest.fixture
def hostile_get() -> Iterator[HostileGet]:
    h = HostileGet()
    yield h
    h.stop()


@pytest.mark.parametrize(("mode", "status"), [("no-data-set", 0xC000), ("other-context", 0x0122)])
def test_cget_stores_that_cannot_be_trusted_are_refused(
    scp: StorageSCP,
    hostile_get: HostileGet,
    mode: str,
    status: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Point 4 (no data set) and point 7 (a context we never accepted) over C-GET: a status
    for the PACS, nothing delivered, and the retrieval ends at once (no deadline wait)."""
    hostile_get.mode = mode
    site = SiteSettings(
        "EVIL", "EVILGET", "127.0.0.1", hostile_get.port, retrieve="get", timeout=5.0
    )
    retriever = Retriever(scp.bridge, scp)
    got = Collector()
    t0 = time.monotonic()
    try:
        with pytest.raises(RetrieveError, match="site EVIL: delivered 0 of 1"):
            retriever.retrieve(
                site,
                level="IMAGE",
                study_uid=GEN[0].study_uid,
                series_uid=GEN[0].series_uid,
                sop_uids=[GEN[0].sop_uid],
                expected={GEN[0].sop_uid},
                sink=got,
                sop_classes={CT_CLASS},
            )
    finally:
        retriever.close()
    assert time.monotonic() - t0 < 3
    assert hostile_get.statuses == [status]
    assert got.objects == {}
    reason = "no data set" if mode == "no-data-set" else "not accepted for its class"
    lines = [r.getMessage() for r in caplog.records if r.name == "mdm.dicom.receiver"]
    assert (
        lines
        == [f"site EVIL: C-STORE of {GEN[0].sop_uid} refused: " + lines[0].split("refused: ")[1]]
        and reason in lines[0]
    )


def test_thread_cleanup() -> None:
    time.sleep(0.2)
    assert threading.active_count() < 40, [t.name for t in threading.enumerate()]
