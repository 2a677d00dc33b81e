"""A hostile PACS (a pynetdicom peer: no real PACS misbehaves on demand) against a real mount.

It answers C-FIND correctly but, asked to C-MOVE an instance, delivers another object under the
requested UID, or bytes that are no dataset at all. The reader gets EIO, the log names the site
and the reason, and the mount keeps serving the honest site.
"""

from __future__ import annotations

import errno
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from mdm_demo.localpacs import free_port
from mdm_demo.synth import GeneratedInstance, generate
from tests.conftest import PacsPair
from tests.mountutil import Mount

pytestmark = pytest.mark.e2e


class Hostile:
    def __init__(self, bridge_aet: str, bridge_port: int) -> None:
        gen = generate(None, patients=1, seed=666, ct_slices=3, mr_slices=0, rows=32, cols=32)
        self.instances = gen
        self.datasets = [pydicom.dcmread(io.BytesIO(g.read())) for g in gen]
        self.bridge = (bridge_aet, bridge_port)
        self.lies: dict[str, Path] = {}
        self.port = free_port()
        ae = AE(ae_title="EVILPACS")
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        for cx in StoragePresentationContexts:
            ae.add_requested_context(cx.abstract_syntax)
        self.ae = ae
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_FIND, self.on_find), (evt.EVT_C_MOVE, self.on_move)],
        )

    def on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        q = event.identifier
        level = q.QueryRetrieveLevel
        seen = set()
        for ds in self.datasets:
            key = {"STUDY": ds.StudyInstanceUID, "SERIES": ds.SeriesInstanceUID}.get(
                level, ds.SOPInstanceUID
            )
            if key in seen:
                continue
            if "SOPInstanceUID" in q and q.SOPInstanceUID and q.SOPInstanceUID != ds.SOPInstanceUID:
                continue
            seen.add(key)
            r = Dataset()
            r.QueryRetrieveLevel = level
            for k in ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate"):
                setattr(r, k, getattr(ds, k))
            if level in ("SERIES", "IMAGE"):
                r.SeriesInstanceUID = ds.SeriesInstanceUID
                r.Modality = ds.Modality
            if level == "IMAGE":
                r.SOPInstanceUID = ds.SOPInstanceUID
                r.SOPClassUID = ds.SOPClassUID
            yield 0xFF00, r

    def on_move(self, event: evt.Event) -> Iterator[object]:
        yield "127.0.0.1", self.bridge[1]
        wanted = event.identifier.SOPInstanceUID
        wanted = list(wanted) if not isinstance(wanted, str) else [wanted]
        yield len(wanted)
        for uid in wanted:
            ds = self.datasets[0].copy()
            ds.SOPInstanceUID = uid
            ds._lie = self.lies[uid]  # sent by the patched send_c_store below
            yield 0xFF00, ds

    def stop(self) -> None:
        self.server.shutdown()


def lie_file(path: Path, announced_uid: str, body_from: GeneratedInstance | None) -> Path:
    """A Part-10 file whose meta announces ``announced_uid`` but whose body is another
    instance (or, without ``body_from``, bytes that are no dataset at all)."""
    src = pydicom.dcmread(io.BytesIO((body_from or GEN0[0]).read()))
    src.file_meta.MediaStorageSOPInstanceUID = announced_uid
    if body_from is not None:
        src.PatientName = "LIAR^PAYLOAD"
        src.save_as(path)  # as the file is: enforcing the format would fix the meta
        return path
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, src)
    raw = buf.getvalue()
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    path.write_bytes(raw[:meta_end] + os.urandom(4096))
    return path


@pytest.fixture
def lying_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """Patch the hostile peer's pynetdicom (this test process only, not the bridge) so a
    dataset carrying ``_lie`` is sent as that file, meta and body as they are."""
    from pynetdicom import _config
    from pynetdicom.association import Association

    orig = Association.send_c_store

    def send(self: Association, dataset: object, *a: object, **kw: object) -> object:
        lie = getattr(dataset, "_lie", None)
        if lie is None:
            return orig(self, dataset, *a, **kw)  # type: ignore[arg-type]
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
        return orig(self, lie, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Association, "send_c_store", send)


GEN0 = generate(None, patients=1, seed=667, ct_slices=1, mr_slices=0, rows=32, cols=32)


def test_wrong_or_garbage_object_under_a_requested_uid(
    orthanc_pair: PacsPair, tmp_path: Path, lying_store: None
) -> None:
    bridge_aet, port = "MDMHOST", free_port()
    orthanc_pair.add_destination(bridge_aet, port)
    evil = Hostile(bridge_aet, port)
    g1, g2 = evil.instances[1], evil.instances[2]
    evil.lies[g1.sop_uid] = lie_file(tmp_path / "other.dcm", g1.sop_uid, GEN0[0])
    evil.lies[g2.sop_uid] = lie_file(tmp_path / "junk.dcm", g2.sop_uid, None)
    try:
        extra = f"""
[[site]]
name = "Evil"
ae_title = "EVILPACS"
host = "127.0.0.1"
port = {evil.port}
timeout = "5s"
"""
        cfg = orthanc_pair.write_config(
            tmp_path,
            bridge_options={"ae_title": bridge_aet, "port": port, "prefetch": False},
            extra=extra,
        )
        with Mount(cfg, tmp_path / "mnt") as m:
            mnt = m.mountpoint
            for g in (g1, g2):
                p = mnt / "studies" / g.study_uid / g.series_uid / f"{g.sop_uid}.dcm"
                with pytest.raises(OSError) as ei:
                    p.read_bytes()
                assert ei.value.errno == errno.EIO
            # The honest sites still serve.
            good = orthanc_pair.instances[0]
            q = mnt / "studies" / good.study_uid / good.series_uid / f"{good.sop_uid}.dcm"
            assert pydicom.dcmread(q).SOPInstanceUID == good.sop_uid
            assert os.path.ismount(mnt)
        log = m.log_text()
        assert "Evil" in log and "another object" in log and "malformed object" in log
        assert "LIAR" not in log
    finally:
        evil.stop()


def test_hostile_thread_cleanup() -> None:
    assert threading.active_count() < 50
