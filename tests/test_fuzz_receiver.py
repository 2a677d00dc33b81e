"""Fuzz: a hostile PACS (a pynetdicom peer speaking raw DIMSE) and raw sockets against the
bridge's receiver, through C-MOVE (into the receiver process, which stores) and C-GET (on our
own association), while a healthy site is retrieved from throughout.

Seeded (``MDM_FUZZ_SEED``, default 18); ``MDM_FUZZ_OBJECTS`` C-STOREs per run (default 10,000,
about a minute here). Asserts: no process death, no traceback in any log, nothing stored that
is not a well-formed copy of the requested instance, every C-STORE with a data set answered,
every protocol violation aborted at once, no retrieval past twice its deadline, the healthy
site served within its deadline every time, and peak RSS of the receiver process and of the
retrieving process under ``RSS_BOUND_MIB``.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import random
import socket
import struct
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from mdm.access.identity import LOCAL_ADMIN
from mdm.config import BridgeSettings, SiteSettings
from mdm.dicom.procscp import ProcessStorageSCP, StoreParams
from mdm.dicom.receiver import ReceivedObject, StoredNotice
from mdm.dicom.retrieve import Retriever
from mdm.errors import RetrieveError, RetrieveTimeout
from mdm.store.db import open_env
from mdm.store.keys import LocalKeyring
from mdm.store.objects import ObjectStore
from mdm.store.records import ObjectRef
from mdm_demo.localpacs import free_port
from tests.fuzzdicom import (
    BOMB_KIND,
    CT_CLASS,
    DEFLATED,
    EXPLICIT,
    IMPLICIT,
    NO_DATA_SENT_KIND,
    PROTOCOL_KINDS,
    STALL_KIND,
    Corpus,
    Payload,
    payload,
    uid_of,
)

# Bad PDUs and message-size limits are fast-path limits (docs/DICOM.md, Limits).
pytestmark = [pytest.mark.timeout(400), pytest.mark.fast_only]

SEED = int(os.environ.get("MDM_FUZZ_SEED", "18"))
OBJECTS = int(os.environ.get("MDM_FUZZ_OBJECTS", "10000"))
BATCH = 100
TIMEOUT = 2.0
RSS_BOUND_MIB = 300
PROTOCOL_RATE = 0.004
STUDY = "1.2.826.0.1.3680043.10.1818.1"
SERIES = "1.2.826.0.1.3680043.10.1818.2"
BRIDGE_AET = "MDMFUZZ"
# Kinds that are never a well-formed copy of the requested instance.
NEVER_ACCEPTED = {
    "dup_uid",
    "other_uid",
    "nul_uid",
    "deep",
    "never_closed",
    "meta_in_ds",
    "empty",
    "huge_len",
    "undefined_len",
    "no_dataset",
    "pixels",
    BOMB_KIND,
    NO_DATA_SENT_KIND,
}


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pydicom_reads_it_all(data: bytes, uid: str) -> bool:
    def walk(ds: Dataset) -> None:
        for elem in ds:
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item)
            else:
                _ = elem.value

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data))
        walk(ds)
    return str(ds.SOPInstanceUID) == uid


def pause(assoc: Association) -> None:
    """Keep a requestor association's reactor from reading the DIMSE queue (it would take
    our responses as unexpected messages and drop them), for the association's life: as
    pynetdicom's ``send_c_*`` do per call, without their window between the flag and the
    wait."""
    assoc._reactor_checkpoint.clear()
    time.sleep(0.005)
    while not assoc._is_paused and assoc.is_established:
        time.sleep(0.001)


def alive(assoc: Association) -> bool:
    """The association is still up as far as its DUL knows (the flag ``is_established`` is
    updated by the association's own thread, busy in our handler during a C-GET)."""
    return assoc.dul.is_alive() and assoc.dul.state_machine.current_state == "Sta6"


class Hostile:
    """The hostile PACS: answers C-MOVE and C-GET with raw C-STOREs of seeded payloads."""

    def __init__(
        self,
        corpus: Corpus,
        bridge_port: int,
        *,
        bridge_aet: str = BRIDGE_AET,
        catalog: list[Dataset] | None = None,
    ) -> None:
        self.corpus = corpus
        self.bridge_aet = bridge_aet
        self.catalog = catalog or []
        """C-FIND answers (IMAGE-level records; higher levels are derived)."""
        self.bridge_port = bridge_port
        self.port = free_port()
        self.lock = threading.Lock()
        self.kinds: dict[str, str] = {}
        self.status: dict[str, int | None] = {}
        """Our answer to each data C-STORE (None: no answer)."""
        self.abort_delays: list[tuple[str, str, float]] = []
        """(kind, mode, seconds until the association ended) per protocol violation."""
        self.unanswered_aborts: list[float] = []
        """For each unanswered C-STORE, how long until the bridge aborted."""
        self.sent = Counter[str]()
        self.forced: dict[str, str] = {}
        self.msg_ids = itertools.count(1)
        ae = AE("EVILPACS")
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(CT_CLASS, EXPLICIT, scu_role=True, scp_role=True)
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[
                (evt.EVT_C_MOVE, self.on_move),
                (evt.EVT_C_GET, self.on_get),
                (evt.EVT_C_FIND, self.on_find),
            ],
        )
        store_ae = AE("EVILPACS")
        for ts in (EXPLICIT, IMPLICIT, DEFLATED):
            store_ae.add_requested_context(CT_CLASS, ts)
        store_ae.acse_timeout = 5
        store_ae.dimse_timeout = 5
        self.store_ae = store_ae

    def stop(self) -> None:
        self.server.shutdown()

    def _payload(self, uid: str, syntaxes: tuple[str, ...]) -> Payload:
        forced = self.forced.get(uid)
        if forced == BOMB_KIND:
            return Payload(BOMB_KIND, DEFLATED, self.corpus.bomb())
        if forced == STALL_KIND:
            return Payload(STALL_KIND, EXPLICIT, None)
        if forced == NO_DATA_SENT_KIND:
            return Payload(NO_DATA_SENT_KIND, EXPLICIT, b"")
        rng = random.Random(f"{SEED}:{uid}")
        return payload(
            self.corpus, rng, uid, syntaxes=syntaxes, protocol_rate=PROTOCOL_RATE, kind=forced
        )

    def _send(self, assoc: Association, p: Payload, uid: str, cx_id: int) -> bool:
        """Send one payload; False if the association is gone afterwards."""
        with self.lock:
            self.kinds[uid] = p.kind
            self.sent[p.kind] += 1
        raw = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        if p.protocol:
            if raw is None:
                return False
            t0 = time.monotonic()
            try:
                if p.kind == "pdv1":
                    raw.sendall(struct.pack(">BBLLB", 0x04, 0, 5, 1, cx_id))
                elif p.kind == "pdu_huge":
                    raw.sendall(struct.pack(">BBL", 0x04, 0, 1 << 30))
                elif p.kind == "pdu_unknown":
                    raw.sendall(struct.pack(">BBL", 0x0B, 0, 6) + bytes(6))
                elif p.kind == "abort_mid":
                    raw.sendall(struct.pack(">BBLLBB", 0x04, 0, 16, 12, cx_id, 0) + bytes(10))
                    raw.sendall(struct.pack(">BBLL", 0x07, 0, 4, 0))
                elif p.kind == "garbage_pdu":
                    raw.sendall(random.Random(uid).randbytes(64))
                elif p.kind == STALL_KIND:
                    raw.sendall(struct.pack(">BBL", 0x04, 0, 1000) + bytes(10))
                    time.sleep(TIMEOUT + 0.5)
            except OSError:
                pass
            deadline = time.monotonic() + 3 * TIMEOUT
            while alive(assoc) and time.monotonic() < deadline:
                time.sleep(0.005)
            if p.kind != STALL_KIND:
                mode = "move" if assoc.is_requestor else "get"
                with self.lock:
                    self.abort_delays.append((p.kind, mode, time.monotonic() - t0))
            return False
        req = C_STORE()
        req.MessageID = next(self.msg_ids) % 65536
        req.AffectedSOPClassUID = CT_CLASS
        req.AffectedSOPInstanceUID = uid
        req.Priority = 2
        if p.body is not None:
            req.DataSet = io.BytesIO(p.body)
        status: int | None = None
        t0 = time.monotonic()
        try:
            assoc.dimse.send_msg(req, cx_id)
            _cx, rsp = assoc.dimse.get_msg(block=True)
            if isinstance(rsp, C_STORE) and rsp.Status is not None:
                status = int(rsp.Status)
        except Exception:
            status = None
        with self.lock:
            self.status[uid] = status
        if status is None:
            deadline = time.monotonic() + 3 * TIMEOUT
            while alive(assoc) and time.monotonic() < deadline:
                time.sleep(0.005)
            with self.lock:
                self.unanswered_aborts.append(time.monotonic() - t0)
            if alive(assoc):  # not aborted by the bridge: do not go on with it
                assoc.abort()
            return False
        return alive(assoc)

    def _uids(self, event: evt.Event) -> list[str]:
        q = event.identifier
        if q.QueryRetrieveLevel != "IMAGE":
            return [str(r.SOPInstanceUID) for r in self.catalog]
        u = q.SOPInstanceUID
        return [u] if isinstance(u, str) else list(u)

    def on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        q = event.identifier
        level = q.QueryRetrieveLevel
        keys = {
            "STUDY": ("StudyInstanceUID",),
            "SERIES": ("StudyInstanceUID", "SeriesInstanceUID"),
            "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
        }[level]
        seen = set()
        for rec in self.catalog:
            if any(k in q and q[k].value and q[k].value != rec[k].value for k in keys):
                continue
            key = tuple(str(rec[k].value) for k in keys)
            if key in seen:
                continue
            seen.add(key)
            r = Dataset()
            r.QueryRetrieveLevel = level
            for k in (*keys, "SpecificCharacterSet", "PatientID", "PatientName"):
                if k in rec:
                    setattr(r, k, rec[k].value)
            for k in ("SOPClassUID", "Modality"):
                if level != "STUDY" and k in rec:
                    setattr(r, k, rec[k].value)
            yield 0xFF00, r

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        assoc: Association | None = None
        try:
            for uid in self._uids(event):
                if assoc is None or not alive(assoc):
                    if assoc is not None:  # let its reactor see that it is over
                        assoc._reactor_checkpoint.set()
                    assoc = self.store_ae.associate(
                        "127.0.0.1", self.bridge_port, ae_title=self.bridge_aet
                    )
                    if not assoc.is_established:
                        assoc = None
                        continue
                    pause(assoc)
                p = self._payload(uid, (EXPLICIT, IMPLICIT, DEFLATED))
                cx = next(
                    c.context_id
                    for c in assoc.accepted_contexts
                    if c.transfer_syntax[0] == p.syntax
                )
                self._send(assoc, p, uid, cx)
        finally:
            if assoc is not None:
                assoc._reactor_checkpoint.set()
                if assoc.is_established:
                    assoc.release()
        yield "127.0.0.1", self.bridge_port
        yield 0

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        assoc = event.assoc
        cx = next(c.context_id for c in assoc.accepted_contexts if c.abstract_syntax == CT_CLASS)
        for uid in self._uids(event):
            if not self._send(assoc, self._payload(uid, (EXPLICIT,)), uid, cx):
                break
        yield 0


class Honest:
    """A healthy site: C-MOVE and C-GET of a few clean objects, as pynetdicom sends them."""

    def __init__(self, corpus: Corpus, bridge_port: int) -> None:
        self.uids = [uid_of(10**7 * 3 + i) for i in range(4)]
        self.datasets = {}
        for uid in self.uids:
            ds = pydicom.dcmread(
                io.BytesIO(b"\0" * 128 + b"DICM" + _meta(uid) + corpus.body(uid, EXPLICIT))
            )
            self.datasets[uid] = ds
        self.bridge_port = bridge_port
        self.port = free_port()
        ae = AE("GOODPACS")
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_supported_context(CT_CLASS, EXPLICIT, scu_role=True, scp_role=True)
        ae.add_requested_context(CT_CLASS, EXPLICIT)
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_MOVE, self.on_move), (evt.EVT_C_GET, self.on_get)],
        )

    def _wanted(self, event: evt.Event) -> list[Dataset]:
        u = event.identifier.SOPInstanceUID
        uids = [u] if isinstance(u, str) else list(u)
        return [self.datasets[x] for x in uids]

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        yield "127.0.0.1", self.bridge_port
        found = self._wanted(event)
        yield len(found)
        for ds in found:
            yield 0xFF00, ds

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        found = self._wanted(event)
        yield len(found)
        for ds in found:
            yield 0xFF00, ds

    def stop(self) -> None:
        self.server.shutdown()


def _meta(uid: str) -> bytes:
    from mdm.dicom.part10 import file_meta

    return file_meta(CT_CLASS, uid, EXPLICIT)


class RawAbuser(threading.Thread):
    """Raw sockets against the listener: junk, absurd lengths, silence, drips, strangers."""

    def __init__(self, port: int) -> None:
        super().__init__(name="fuzz-raw", daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.connections = 0
        self.rng = random.Random(SEED)

    def run(self) -> None:
        while not self.stop.wait(0.05):
            kind = self.rng.choice(("huge", "junk", "idle", "drip", "stranger", "rq_huge"))
            try:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=3)
            except OSError:
                continue
            self.connections += 1
            try:
                if kind == "huge":
                    s.sendall(struct.pack(">BBL", self.rng.choice((1, 2, 4, 5, 7)), 0, 1 << 30))
                elif kind == "rq_huge":
                    s.sendall(struct.pack(">BBL", 0x01, 0, (1 << 20) + 1) + bytes(100))
                elif kind == "junk":
                    s.sendall(self.rng.randbytes(self.rng.randint(1, 300)))
                elif kind == "idle":
                    time.sleep(0.3)
                elif kind == "drip":
                    for b in struct.pack(">BBL", 0x01, 0, 300)[:4]:
                        s.sendall(bytes([b]))
                        time.sleep(0.1)
                elif kind == "stranger":
                    ae = AE("STRANGER")
                    ae.add_requested_context(CT_CLASS, EXPLICIT)
                    ae.acse_timeout = 3
                    a = ae.associate("127.0.0.1", self.port, ae_title=BRIDGE_AET)
                    assert not a.is_established
                s.settimeout(0.5)
                try:
                    s.recv(100)
                except OSError:
                    pass
            except OSError:
                pass
            finally:
                s.close()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[ProcessStorageSCP]:
    bridge = BridgeSettings(
        ae_title=BRIDGE_AET, host="127.0.0.1", port=free_port(), timeout=TIMEOUT, max_pdu=16384
    )
    params = StoreParams(tmp_path / "cache", tmp_path / "keyring.json", 1 << 30, 64 * 1024)
    (tmp_path / "cache").mkdir()
    scp = ProcessStorageSCP(bridge, {"EVILPACS", "GOODPACS"}, params, log_level=logging.INFO)
    scp.start()
    yield scp
    scp.stop()


def test_fuzz_hostile_pacs_and_raw_sockets(
    receiver: ProcessStorageSCP,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    corpus = Corpus()
    corpus.bomb()
    evil = Hostile(corpus, receiver.port)
    good = Honest(corpus, receiver.port)
    retriever = Retriever(receiver.bridge, receiver)
    child_pid = receiver._proc.pid
    me = os.getpid()
    peaks = {"receiver": 0, "retriever": 0}
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.02):
            peaks["receiver"] = max(peaks["receiver"], rss_kib(child_pid))
            peaks["retriever"] = max(peaks["retriever"], rss_kib(me))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    abuser = RawAbuser(receiver.port)
    healthy: list[tuple[str, float, str | None]] = []
    stop_healthy = threading.Event()

    def probe() -> None:
        for n in itertools.count():
            if stop_healthy.wait(0.25):
                return
            mode = ("move", "get")[n % 2]
            uid = good.uids[n % len(good.uids)]
            site = SiteSettings(
                "GOOD", "GOODPACS", "127.0.0.1", good.port, retrieve=mode, timeout=TIMEOUT
            )
            got: list[Any] = []
            t0 = time.monotonic()
            error = None
            try:
                retriever.retrieve(
                    site,
                    level="IMAGE",
                    study_uid=STUDY,
                    series_uid=SERIES,
                    sop_uids=[uid],
                    expected={uid},
                    sink=got.append,
                    sop_classes={CT_CLASS},
                    store_spec=spec("GOOD"),
                )
            except (RetrieveError, RetrieveTimeout) as e:
                error = str(e)
            healthy.append((mode, time.monotonic() - t0, error))

    prober = threading.Thread(target=probe, daemon=True)
    stored: dict[str, Any] = {}
    got_by_get: dict[str, bytes] = {}
    lock = threading.Lock()

    def sink(obj: Any) -> None:
        with lock:
            if isinstance(obj, StoredNotice):
                if obj.info is not None:
                    stored[obj.sop_uid] = obj.info
            elif isinstance(obj, ReceivedObject):
                got_by_get[obj.sop_uid] = bytes(obj.data)

    durations: list[tuple[str, float]] = []
    errors = Counter[str]()
    started = time.monotonic()
    abuser.start()
    prober.start()
    try:
        for b in itertools.count():
            if b >= 4 and sum(evil.sent.values()) >= OBJECTS:
                break
            mode = ("move", "get")[b % 2]
            uids = [uid_of(b * BATCH + i + 1) for i in range(BATCH)]
            if b in (2, 3):  # one stall and one data set never sent, per mode
                evil.forced[uids[BATCH // 2]] = STALL_KIND
                evil.forced[uids[BATCH // 4]] = NO_DATA_SENT_KIND
            if mode == "move" and b % 10 == 0:  # deflate bombs
                evil.forced[uids[7]] = BOMB_KIND
            # at least one protocol violation of each kind, in both modes
            evil.forced[uids[BATCH - 10]] = list(PROTOCOL_KINDS)[b % len(PROTOCOL_KINDS)]
            site = SiteSettings(
                "EVIL", "EVILPACS", "127.0.0.1", evil.port, retrieve=mode, timeout=TIMEOUT
            )
            t0 = time.monotonic()
            try:
                retriever.retrieve(
                    site,
                    level="IMAGE",
                    study_uid=STUDY,
                    series_uid=SERIES,
                    sop_uids=uids,
                    expected=set(uids),
                    sink=sink,
                    sop_classes={CT_CLASS},
                    store_spec=spec("EVIL"),
                )
            except (RetrieveError, RetrieveTimeout) as e:
                errors[type(e).__name__] += 1
            durations.append((mode, time.monotonic() - t0))
    finally:
        stop_healthy.set()
        prober.join(30)
        abuser.stop.set()
        abuser.join(10)
        sampling.set()
        sampler.join(5)
        retriever.close()
        evil.stop()
        good.stop()
    elapsed = time.monotonic() - started
    assert receiver.running, "the receiver process died"
    peak_receiver = max(peaks["receiver"], rss_kib(child_pid, "VmHWM"))

    # Nothing stored that is not a well-formed copy of the requested instance.
    keys = LocalKeyring.load(tmp_path / "keyring.json")
    store = ObjectStore(tmp_path / "cache", open_env(tmp_path / "cache"), keys, 1 << 30, 1 << 16)
    try:
        evil_stored = {u for u in stored if u in evil.kinds}
        for uid in evil_stored:
            reader = store.open(ObjectRef(uid, "identified"), LOCAL_ADMIN)
            try:
                data = reader.read(0, reader.size)
            finally:
                reader.close()
            assert pydicom_reads_it_all(data, uid), (uid, evil.kinds[uid])
    finally:
        store.close()
    for uid, data in got_by_get.items():
        if uid in evil.kinds:
            assert pydicom_reads_it_all(data, uid), (uid, evil.kinds[uid])
    accepted = evil_stored | (set(got_by_get) & set(evil.kinds))
    wrongly = Counter(evil.kinds[u] for u in accepted if evil.kinds[u] in NEVER_ACCEPTED)
    assert not wrongly, wrongly

    # Every C-STORE answered; every clean one accepted (and stored or delivered).
    unanswered = Counter(evil.kinds[u] for u, s in evil.status.items() if s is None)
    assert unanswered == Counter({NO_DATA_SENT_KIND: 2}), (
        unanswered,
        [(u, evil.kinds.get(u), evil.status.get(u)) for u in evil.forced],
    )
    assert max(evil.unanswered_aborts) < TIMEOUT + 1.0, evil.unanswered_aborts
    valid = [u for u, k in evil.kinds.items() if k == "valid"]
    # (0x0124: sent after its retrieval had ended - the stalls - nobody expects it any more)
    bad_valid = [(u, evil.status[u]) for u in valid if evil.status[u] not in (0x0000, 0x0124)]
    assert valid and not bad_valid, bad_valid
    late = [u for u in valid if evil.status[u] == 0x0124]
    assert len(late) < len(valid) / 10, len(late)
    lost = [u for u in valid if evil.status[u] == 0 and u not in stored and u not in got_by_get]
    assert not lost, lost
    refused = Counter(evil.kinds[u] for u, s in evil.status.items() if s not in (0, None))

    # Protocol violations aborted at once; no retrieval past twice its deadline.
    # (random bytes can announce a PDU longer than what follows: that one ends at the stall
    # timeout, as any PDU left unfinished does)
    assert evil.abort_delays, "no protocol violation was sent"
    slow = [a for a in evil.abort_delays if a[2] > (TIMEOUT + 1 if a[0] == "garbage_pdu" else 1.0)]
    assert not slow, slow
    assert max(d for _, d in durations) < 2 * TIMEOUT + 0.5, durations

    # The healthy site was served throughout, within its deadline.
    assert len(healthy) >= 10
    assert all(e is None for _, _, e in healthy), [h for h in healthy if h[2]]
    assert max(d for _, d, _ in healthy) < TIMEOUT

    # Memory: bounded whatever lengths and ratios the peer used.
    assert peak_receiver / 1024 < RSS_BOUND_MIB, peak_receiver
    assert peaks["retriever"] / 1024 < RSS_BOUND_MIB, peaks["retriever"]

    # No traceback anywhere (the receiver process logs to our stderr).
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    assert not [r for r in caplog.records if r.exc_info and r.name.startswith("mdm")]
    assert "Traceback" not in caplog.text
    total = sum(evil.sent.values())
    assert total >= OBJECTS
    print(
        f"\nfuzz: seed {SEED}, {total} C-STOREs ({dict(evil.sent)}), "
        f"{abuser.connections} raw connections, {len(healthy)} healthy retrievals, "
        f"{elapsed:.1f}s; refused {sum(refused.values())}; accepted {len(accepted)}; "
        f"peak RSS receiver {peak_receiver / 1024:.0f} MiB, "
        f"retrieving process {peaks['retriever'] / 1024:.0f} MiB; "
        f"slowest abort {max(a[2] for a in evil.abort_delays) * 1000:.0f} ms; "
        f"slowest retrieval {max(d for _, d in durations):.2f}s"
    )


def spec(site: str) -> dict[str, Any]:
    return {
        "site": site,
        "level": "identified",
        "program": "",
        "view": "identified",
        "meta": {"study_uid": STUDY, "series_uid": SERIES},
    }
