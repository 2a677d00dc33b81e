"""A burst of listings keeps to the site's association limit (``max_associations``).

The PACS is a pynetdicom peer (a real PACS cannot report how many C-FINDs it serves at once)
that answers slowly and records the most C-FINDs it served concurrently.
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

from mdm_demo.localpacs import free_port
from mdm_demo.synth import generate
from tests.mountutil import Mount

pytestmark = pytest.mark.e2e


class SlowFindPACS:
    def __init__(self, delay: float) -> None:
        gen = generate(None, patients=8, seed=11, ct_slices=1, mr_slices=0, rows=16, cols=16)
        self.datasets = [pydicom.dcmread(io.BytesIO(g.read())) for g in gen]
        self.delay = delay
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0
        self.port = free_port()
        ae = AE(ae_title="SLOWPACS")
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(Verification)
        ae.maximum_associations = 64
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_FIND, self.on_find)]
        )

    def on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            time.sleep(self.delay)
            q = event.identifier
            level = q.QueryRetrieveLevel
            for ds in self.datasets:
                if level != "STUDY" and q.get("StudyInstanceUID") not in ("", ds.StudyInstanceUID):
                    continue
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
        finally:
            with self.lock:
                self.now -= 1

    def stop(self) -> None:
        self.server.shutdown()


def test_a_burst_of_listings_keeps_to_max_associations(tmp_path: Path) -> None:
    pacs = SlowFindPACS(delay=0.4)
    cfg = tmp_path / "mdm.toml"
    cfg.write_text(
        f'[bridge]\nae_title = "MDMLIM"\nport = {free_port()}\nprefetch = false\n'
        f'[cache]\ndir = "{tmp_path / "cache"}"\n'
        f'[[site]]\nname = "SLOW"\nae_title = "SLOWPACS"\nhost = "127.0.0.1"\nport = {pacs.port}\n'
        'max_associations = 2\ntimeout = "20s"\n'
    )
    try:
        with Mount(cfg, tmp_path / "mnt") as m:
            studies = [s for s in os.listdir(m.mountpoint / "studies") if s != ".metadata.json"]
            assert len(studies) == 8
            with pacs.lock:
                pacs.peak = 0
            with ThreadPoolExecutor(max_workers=8) as pool:
                listed = list(pool.map(lambda s: os.listdir(m.mountpoint / "studies" / s), studies))
            # .metadata.json, the series, and its NIfTI view (.nii.gz and .json) beside it
            assert all(len(x) == 4 for x in listed), listed
            assert 1 <= pacs.peak <= 2, f"{pacs.peak} C-FINDs at once with max_associations = 2"
    finally:
        pacs.stop()
