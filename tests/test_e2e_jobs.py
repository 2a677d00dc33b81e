"""Many jobs on one node: per-job mounts of one configuration share the cache safely.

The first mount listens on the storage port (C-MOVE); the others retrieve by C-GET into the
same cache. Each job reads under its own token only, and each mount logs to its own file.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pydicom
import pytest

from mdm_demo.synth import TRIAL_PROTOCOL
from tests.conftest import PacsPair
from tests.mountutil import mdm
from tests.test_e2e_mount import same_dataset, study_path
from tests.test_e2e_policy import setup, token

pytestmark = pytest.mark.e2e


def test_four_jobs_on_one_node(orthanc_pair: PacsPair, tmp_path: Path) -> None:
    pair = orthanc_pair
    idp = tmp_path / "idp"
    mdm("token", "init", str(idp))
    cfg = setup(pair, tmp_path, idp, ["NOBODY"])
    jobs = {
        "rad1": token(idp, tmp_path / "rad1.jwt", "drad1", "radiologists"),
        "rad2": token(idp, tmp_path / "rad2.jwt", "drad2", "radiologists"),
        "grid1": token(idp, tmp_path / "grid1.jwt", "job-1", "grid"),
        "grid2": token(idp, tmp_path / "grid2.jwt", "job-2", "grid"),
    }
    on_a = [i for i in pair.instances if "SiteA" in pair.sites_holding(i.sop_uid)]
    series_uid = on_a[0].series_uid
    mine = [i for i in on_a if i.series_uid == series_uid]
    trial = [i for i in pair.instances if i.trial == TRIAL_PROTOCOL]
    mounts = {name: tmp_path / f"mnt-{name}" for name in jobs}
    results: dict[str, object] = {}
    try:
        for name, mnt in mounts.items():
            mnt.mkdir()
            res = mdm("mount", str(mnt), "--config", str(cfg), "--token-file", str(jobs[name]))
            assert "mounted" in res.stdout, res.stdout + res.stderr

        def job(name: str) -> None:
            try:
                mnt = mounts[name]
                if name.startswith("rad"):
                    for i in mine:  # identified, SiteA
                        same_dataset(study_path(mnt, i).read_bytes(), i)
                    results[name] = len(mine)
                else:  # de-identified: the trial only, and no PHI in any byte read
                    got = 0
                    for root, _d, files in os.walk(mnt / "studies"):
                        for f in files:
                            if f.endswith(".dcm"):
                                data = (Path(root) / f).read_bytes()
                                ds = pydicom.dcmread(Path(root) / f)
                                assert all(i.patient_name.encode() not in data for i in trial)
                                assert ds.SOPInstanceUID.startswith("2.25.")
                                got += 1
                    results[name] = got
            except BaseException as e:  # reported by the main thread
                results[name] = e

        threads = [threading.Thread(target=job, args=(n,)) for n in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
        for name in jobs:
            assert not isinstance(results.get(name), BaseException), (name, results[name])
        assert results["rad1"] == results["rad2"] == len(mine)
        assert results["grid1"] == results["grid2"] == len(trial)
        # Each job sees its own grant only, whatever the other jobs cached.
        only_b = next(i for i in pair.instances if "SiteA" not in pair.sites_holding(i.sop_uid))
        assert not study_path(mounts["rad1"], only_b).exists()
        not_trial = next(i for i in on_a if i.trial != TRIAL_PROTOCOL)
        assert not study_path(mounts["grid1"], not_trial).exists()
        # One log per mount point, each naming its own principal only.
        logs = sorted((tmp_path / "cache" / "logs").glob("mount*.log"))
        assert len(logs) == 4
        subs = {"rad1": "drad1", "rad2": "drad2", "grid1": "job-1", "grid2": "job-2"}
        for name, sub in subs.items():
            text = next(p for p in logs if p.name.endswith(f"mnt_{name}.log")).read_text()
            assert f"running as {sub}@" in text
            assert not any(f"running as {o}@" in text for o in set(subs.values()) - {sub})
        # The first mount listened on the storage port; the others said they use C-GET.
        texts = [p.read_text() for p in logs]
        assert sum("listening on" in t for t in texts) == 1
        assert sum("retrieving by C-GET" in t for t in texts) == 3
    finally:
        for mnt in mounts.values():
            if os.path.ismount(mnt):
                mdm("umount", str(mnt), check=False)
    assert not any(os.path.ismount(m) for m in mounts.values())
