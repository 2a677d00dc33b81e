"""Retrieval under faults: routing by site, deadlines with stale pooled associations,
association failures by name, the C-GET -> C-MOVE fallback, request sizes.

Real Orthanc servers (``orthanc_pair``) and real pynetdicom peers on loopback ports.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator

import pydicom
import pytest
from conftest import PacsPair
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from mdm.config import BridgeSettings, SiteSettings
from mdm.dicom.receiver import ReceivedObject, StorageSCP
from mdm.dicom.retrieve import GetUnavailable, Retriever, move_may_help
from mdm.errors import RetrieveError, RetrieveTimeout
from mdm_demo.localpacs import LocalOrthanc, free_port
from mdm_demo.synth import GeneratedInstance, generate

pytestmark = pytest.mark.timeout(120)


class Collector:
    def __init__(self, delay: float = 0.0) -> None:
        self.lock = threading.Lock()
        self.calls: list[ReceivedObject] = []
        self.delay = delay

    def __call__(self, obj: ReceivedObject) -> None:
        time.sleep(self.delay)
        with self.lock:
            self.calls.append(obj)

    @property
    def uids(self) -> set[str]:
        with self.lock:
            return {o.sop_uid for o in self.calls}


def site_settings(server: LocalOrthanc, name: str, timeout: float = 5.0) -> SiteSettings:
    return SiteSettings(name, server.aet, "127.0.0.1", server.dicom_port, timeout=timeout)


@pytest.fixture
def pair_scp(orthanc_pair: PacsPair) -> Iterator[StorageSCP]:
    bridge = BridgeSettings(
        ae_title=orthanc_pair.bridge_aet, host="127.0.0.1", port=orthanc_pair.bridge_port
    )
    scp = StorageSCP(bridge, {orthanc_pair.a.server.aet, orthanc_pair.b.server.aet})
    scp.start()
    try:
        yield scp
    finally:
        scp.stop()


def orthanc_send(server: LocalOrthanc, sop_uid: str, dest: str) -> None:
    """Make ``server`` C-STORE one of its instances to the modality ``dest`` (REST)."""
    found = server.request("POST", "/tools/lookup", sop_uid.encode(), "text/plain")
    oid = next(f["ID"] for f in found if f["Type"] == "Instance")
    body = json.dumps({"Resources": [oid], "Synchronous": True}).encode()
    try:
        server.request("POST", f"/modalities/{dest}/store", body, "application/json")
    except RuntimeError:
        pass  # a refused sub-operation is an HTTP error: the receiver's counters tell


# --- 5. routing ------------------------------------------------------------------------------


def test_an_object_is_accepted_only_from_the_site_it_was_asked_of(
    orthanc_pair: PacsPair, pair_scp: StorageSCP
) -> None:
    inst = next(i for i in orthanc_pair.instances if i.series_uid in orthanc_pair.shared_series)
    a, b = orthanc_pair.a.server, orthanc_pair.b.server
    sink = Collector()
    wrong = pair_scp.stats.refused_wrong_site
    with pair_scp.expect([inst.sop_uid], sink, source=site_settings(a, "SiteA")):
        orthanc_send(b, inst.sop_uid, orthanc_pair.bridge_aet)  # not asked of SiteB
        assert sink.uids == set()
        assert pair_scp.stats.refused_wrong_site == wrong + 1
        orthanc_send(a, inst.sop_uid, orthanc_pair.bridge_aet)
        assert sink.uids == {inst.sop_uid}


def _push(port: int, calling: str, called: str, data: bytes, results: list[int]) -> None:
    ae = AE(calling)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(pydicom.dcmread(io.BytesIO(data)))
        results.append(int(status.Status))
    finally:
        assoc.release()


def test_a_duplicate_on_two_associations_is_delivered_once(
    orthanc_pair: PacsPair, pair_scp: StorageSCP
) -> None:
    inst = next(i for i in orthanc_pair.a.instances if i.modality == "CT")
    data = inst.read()
    sink = Collector(delay=0.5)  # the first copy is still in the sink when the second comes
    results: list[int] = []
    a = orthanc_pair.a.server
    with pair_scp.expect([inst.sop_uid], sink, source=site_settings(a, "SiteA")):
        pushers = [
            threading.Thread(
                target=_push,
                args=(pair_scp.port, a.aet, orthanc_pair.bridge_aet, data, results),
            )
            for _ in range(2)
        ]
        for t in pushers:
            t.start()
        for t in pushers:
            t.join(30)
    assert results == [0, 0]  # both acknowledged
    assert len(sink.calls) == 1  # delivered once


def test_a_syntax_the_bridge_does_not_accept_is_named(
    orthanc_pair: PacsPair, pair_scp: StorageSCP, caplog: pytest.LogCaptureFixture
) -> None:
    ae = AE(orthanc_pair.a.server.aet)
    ae.add_requested_context(CTImageStorage, "1.2.826.0.1.3680043.99.1.1")  # private syntax
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    with caplog.at_level(logging.WARNING, logger="mdm.dicom.receiver"):
        assoc = ae.associate("127.0.0.1", pair_scp.port, ae_title=orthanc_pair.bridge_aet)
        assert assoc.is_established
        assoc.release()
        deadline = time.monotonic() + 5
        while "1.2.826.0.1.3680043.99.1.1" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    line = next(r.getMessage() for r in caplog.records if "does not accept" in r.getMessage())
    assert orthanc_pair.a.server.aet in line and CTImageStorage in line
    assert "1.2.826.0.1.3680043.99.1.1" in line


# --- a pynetdicom PACS that records its requests ---------------------------------------------


class RecordingPacs:
    """A Study Root C-GET/C-MOVE SCP over a few instances, recording each identifier.

    ``get_status``: answer every C-GET with this final status and no sub-operation.
    """

    def __init__(
        self, instances: list[GeneratedInstance], dest: tuple[str, int], get_status: int = 0
    ) -> None:
        self.aet = "RECPACS"
        self.by_uid = {i.sop_uid: i for i in instances}
        self.dest = dest
        self.get_status = get_status
        self.requests: list[tuple[str, str, int]] = []
        """(service, QueryRetrieveLevel, number of SOP Instance UIDs named)."""
        ae = AE(self.aet)
        for cx in (
            StudyRootQueryRetrieveInformationModelGet,
            StudyRootQueryRetrieveInformationModelMove,
        ):
            ae.add_supported_context(cx)
        ae.add_supported_context(
            CTImageStorage, ExplicitVRLittleEndian, scp_role=True, scu_role=True
        )
        ae.add_supported_context("1.2.840.10008.1.1")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        self.port = free_port()
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_GET, self._get), (evt.EVT_C_MOVE, self._move)],
        )

    def stop(self) -> None:
        self.server.shutdown()

    def site(self, name: str = "REC", retrieve: str = "move", timeout: float = 5.0) -> SiteSettings:
        return SiteSettings(
            name, self.aet, "127.0.0.1", self.port, retrieve=retrieve, timeout=timeout
        )

    def _matches(self, ident: Dataset, service: str) -> list[Dataset]:
        level = str(ident.QueryRetrieveLevel)
        uids = ident.get("SOPInstanceUID", "")
        named = (
            [str(u) for u in uids]
            if isinstance(uids, list | pydicom.multival.MultiValue)
            else ([str(uids)] if uids else [])
        )
        self.requests.append((service, level, len(named)))
        chosen = [
            i
            for i in self.by_uid.values()
            if i.study_uid == ident.StudyInstanceUID
            and (level == "STUDY" or i.series_uid == ident.SeriesInstanceUID)
            and (level != "IMAGE" or i.sop_uid in named)
        ]
        return [pydicom.dcmread(io.BytesIO(i.read())) for i in chosen]

    def _get(self, event: evt.Event) -> Iterator[object]:
        if self.get_status:
            self.requests.append(("get", str(event.identifier.QueryRetrieveLevel), 0))
            yield 1
            yield (self.get_status, None)
            return
        found = self._matches(event.identifier, "get")
        yield len(found)
        for ds in found:
            yield (0xFF00, ds)

    def _move(self, event: evt.Event) -> Iterator[object]:
        found = self._matches(event.identifier, "move")
        yield self.dest
        yield len(found)
        for ds in found:
            yield (0xFF00, ds)


@pytest.fixture(scope="module")
def ct_series() -> list[GeneratedInstance]:
    gen = generate(None, patients=1, seed=77, ct_slices=7, mr_slices=1, rows=16, cols=16)
    return [i for i in gen if i.modality == "CT"]


def fetch_with(
    tmp_path, pacs: RecordingPacs, scp_port: int, targets: list, *, retrieve: str, level: str
) -> tuple[list[str], list[str]]:
    """Run a real Fetcher (store, keyring, retriever, storage SCP) over ``targets``;
    return (stored SOP UIDs, errors)."""
    import trio

    from mdm.config import load_config
    from mdm.retrieval.fetcher import Fetcher
    from mdm.store.db import open_env
    from mdm.store.keys import LocalKeyring
    from mdm.store.objects import ObjectStore
    from mdm.store.records import ObjectRef

    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg_path = tmp_path / "mdm.toml"
    cfg_path.write_text(
        f'[bridge]\nae_title = "MDMREC"\nhost = "127.0.0.1"\nport = {scp_port}\n'
        f'receiver = "thread"\n[cache]\ndir = "{tmp_path / "cache"}"\n'
        f'[keys]\nkeyring = "{tmp_path / "keyring.json"}"\n'
        f'[[site]]\nname = "REC"\nae_title = "{pacs.aet}"\nhost = "127.0.0.1"\n'
        f'port = {pacs.port}\nretrieve = "{retrieve}"\ntimeout = "5s"\n'
    )
    config = load_config(cfg_path)
    keys = LocalKeyring.load(config.keys.keyring, create=True)
    env = open_env(config.cache.dir)
    store = ObjectStore(
        config.cache.dir, env, keys, config.cache.max_bytes, config.cache.chunk_size
    )
    scp = StorageSCP(config.bridge, {pacs.aet})
    scp.start()
    retriever = Retriever(config.bridge, scp)
    errors: list[str] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fetcher = Fetcher(config, store, retriever, nursery)
            try:
                with trio.fail_after(60):
                    await fetcher.fetch_many(targets, level=level)
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
            finally:
                await trio.to_thread.run_sync(fetcher.close)
                nursery.cancel_scope.cancel()

    try:
        trio.run(main)
        stored = [t.sop_uid for t in targets if store.info(ObjectRef(t.sop_uid, "identified"))]
    finally:
        retriever.close()
        scp.stop()
        store.close()
        env.close()
    return stored, errors


def targets_of(insts: list[GeneratedInstance], *, whole: bool) -> list:
    from mdm.retrieval.fetcher import Target

    return [
        Target(
            sop_uid=i.sop_uid,
            study_uid=i.study_uid,
            series_uid=i.series_uid,
            sop_class_uid=i.sop_class_uid,
            sites=("REC",),
            series_size=len(insts) if whole else 0,
        )
        for i in insts
    ]


# --- 6. request sizes ------------------------------------------------------------------------


def test_a_whole_series_is_one_series_level_move_and_a_list_goes_in_bounded_batches(
    tmp_path, ct_series: list[GeneratedInstance], monkeypatch: pytest.MonkeyPatch
) -> None:
    import mdm.dicom.retrieve as retrieve_mod

    monkeypatch.setattr(retrieve_mod, "BATCH_SIZE", 3)
    port = free_port()
    pacs = RecordingPacs(ct_series, ("127.0.0.1", port))
    try:
        stored, errors = fetch_with(
            tmp_path / "whole",
            pacs,
            port,
            targets_of(ct_series, whole=True),
            retrieve="move",
            level="SERIES",
        )
        assert not errors and sorted(stored) == sorted(i.sop_uid for i in ct_series)
        assert pacs.requests == [("move", "SERIES", 0)]
        pacs.requests.clear()
        part = ct_series[1:]  # the first was read on its own: the rest, by UID
        stored, errors = fetch_with(
            tmp_path / "part",
            pacs,
            port,
            targets_of(part, whole=False),
            retrieve="move",
            level="SERIES",
        )
        assert not errors and len(stored) == len(part)
        assert [r[:2] for r in pacs.requests] == [("move", "IMAGE")] * 2
        assert sorted(r[2] for r in pacs.requests) == [3, 3]
    finally:
        pacs.stop()


# --- 7. C-GET -> C-MOVE fallback -------------------------------------------------------------


def test_get_falls_back_to_move_on_a_status_that_says_it_cannot_perform(
    tmp_path, ct_series: list[GeneratedInstance]
) -> None:
    port = free_port()
    # "Refused: Out of Resources - Unable to perform sub-operations": the C-GET was not
    # performed; a C-MOVE (the PACS's own association, its own contexts) may be.
    pacs = RecordingPacs(ct_series, ("127.0.0.1", port), get_status=0xA702)
    try:
        one = ct_series[:1]
        stored, errors = fetch_with(
            tmp_path, pacs, port, targets_of(one, whole=False), retrieve="auto", level="IMAGE"
        )
        assert not errors, errors
        assert stored == [one[0].sop_uid]
        assert [r[0] for r in pacs.requests] == ["get", "move"]
    finally:
        pacs.stop()


def test_the_fallback_is_decided_by_status_not_by_message() -> None:
    from mdm.dicom.retrieve import IncompleteRetrieve, RetrieveOutcome

    def failed(code: int) -> IncompleteRetrieve:
        return IncompleteRetrieve("site X: refused", RetrieveOutcome(set(), {"1.2"}, "", 0.0, code))

    assert move_may_help(GetUnavailable("site X: no C-GET"))
    assert move_may_help(failed(0xA702))
    assert not move_may_help(failed(0xA900))  # the identifier is wrong: a C-MOVE would be too
    assert not move_may_help(RetrieveTimeout("site X: refused to answer"))
    assert not move_may_help(RetrieveError("site X: association refused"))


# --- 3. association failures by name ---------------------------------------------------------


@pytest.fixture
def peer(request: pytest.FixtureRequest) -> Iterator[int]:
    """A peer on a loopback port that behaves as ``request.param`` says."""
    kind = request.param
    if kind == "refused":
        yield free_port()  # nothing listens
        return
    if kind == "rejected":
        ae = AE("PICKY")
        ae.add_supported_context("1.2.840.10008.1.1")
        ae.require_calling_aet = ["SOMEONE_ELSE"]
        port = free_port()
        server = ae.start_server(("127.0.0.1", port), block=False)
        try:
            yield port
        finally:
            server.shutdown()
        return
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    stop = threading.Event()
    conns: list[socket.socket] = []

    def serve() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            conns.append(conn)
            if kind == "aborted":
                conn.recv(65536)
                conn.sendall(bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 0]))  # A-ABORT, by the peer

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        for c in conns:
            c.close()
        srv.close()


@pytest.mark.parametrize(
    ("peer", "kind", "words"),
    [
        ("refused", RetrieveError, "connection refused"),
        (
            "rejected",
            RetrieveError,
            "association rejected (Rejected Permanent, Service User, Calling AE title not "
            "recognised)",
        ),
        ("aborted", RetrieveError, "aborted by the peer"),
        ("silent", RetrieveTimeout, "no answer to the association request within 2s"),
    ],
    indirect=["peer"],
)
def test_association_failures_say_what_happened(peer: int, kind: type, words: str) -> None:
    from mdm.dicom.query import c_echo

    bridge = BridgeSettings(ae_title="MDMNAMED", host="127.0.0.1", port=free_port())
    site = SiteSettings("PEER", "PEER", "127.0.0.1", peer, timeout=2.0)
    with pytest.raises((RetrieveError, RetrieveTimeout)) as info:
        c_echo(site, bridge)
    assert type(info.value) is kind, info.value
    assert words in str(info.value)
    if "aborted" not in words:
        assert "aborted" not in str(info.value)


# --- 2. a stale pooled association counts against the same deadline --------------------------


def test_a_silent_pacs_with_a_pooled_association_costs_one_deadline(
    orthanc_pair_private: PacsPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mdm.dicom.retrieve as retrieve_mod

    monkeypatch.setattr(retrieve_mod, "VALIDATE_AFTER", 0.2)  # validate at once, not after 5 s
    pair = orthanc_pair_private
    bridge = BridgeSettings(ae_title=pair.bridge_aet, host="127.0.0.1", port=pair.bridge_port)
    scp = StorageSCP(bridge, {pair.a.server.aet})
    scp.start()
    retriever = Retriever(bridge, scp)
    site = site_settings(pair.a.server, "SiteA", timeout=3.0)
    insts = pair.a.instances
    try:
        for mode, inst in (("get", insts[0]), ("move", insts[1])):
            sink = Collector()

            def one(i: GeneratedInstance = inst, m: str = mode, s: Collector = sink) -> float:
                t0 = time.monotonic()
                retriever.retrieve(
                    site,
                    level="IMAGE",
                    study_uid=i.study_uid,
                    series_uid=i.series_uid,
                    sop_uids=[i.sop_uid],
                    expected={i.sop_uid},
                    sink=s,
                    classes_of={i.sop_uid: i.sop_class_uid},
                    mode=m,
                )
                return time.monotonic() - t0

            one()  # the association is now pooled
            assert retriever.pool_stats("SiteA").idle >= 1
            time.sleep(0.5)
            pair.a.server.pause()
            try:
                t0 = time.monotonic()
                with pytest.raises(RetrieveTimeout, match="site SiteA"):
                    one()
                took = time.monotonic() - t0
            finally:
                pair.a.server.resume()
            # One deadline (3 s), not the echo's and then the new association's (6 s).
            assert took < 3.0 * 1.4, (mode, took)
    finally:
        retriever.close()
        scp.stop()


def test_a_get_that_sends_nothing_names_site_and_sop_class(
    ct_series: list[GeneratedInstance],
) -> None:
    """The PACS sends nothing on any of the syntaxes offered: the error says where and what
    (the bridge offered every syntax it knows and asks for no transcoding)."""
    port = free_port()
    pacs = RecordingPacs(ct_series, ("127.0.0.1", port), get_status=0xA702)
    bridge = BridgeSettings(ae_title="MDMREC", host="127.0.0.1", port=port)
    scp = StorageSCP(bridge, {pacs.aet})
    retriever = Retriever(bridge, scp)
    inst = ct_series[0]
    try:
        with pytest.raises(RetrieveError) as ei:
            retriever.retrieve(
                pacs.site(),
                level="IMAGE",
                study_uid=inst.study_uid,
                series_uid=inst.series_uid,
                sop_uids=[inst.sop_uid],
                expected={inst.sop_uid},
                sink=Collector(),
                classes_of={inst.sop_uid: inst.sop_class_uid},
                mode="get",
            )
        msg = str(ei.value)
        assert msg.startswith("site REC:") and inst.sop_class_uid in msg
        assert "transfer syntaxes offered" in msg and move_may_help(ei.value)
    finally:
        retriever.close()
        pacs.stop()
