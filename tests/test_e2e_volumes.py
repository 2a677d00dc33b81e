"""NIfTI views on a real mount: nibabel loads ``<series>.nii.gz`` straight from the mount
(size 0 before it is built: read to EOF with direct I/O), equal to dcm2niix's conversion of
the same DICOM files; a de-identified mount's volume and sidecar carry no PHI; a file beside
a series that is not there is ENOENT."""

from __future__ import annotations

import errno
import gzip
import json
import os
from pathlib import Path
from typing import Any

import nibabel
import pytest

from mdm.deid import map_uid
from mdm.store.keys import LocalKeyring
from mdm_demo.synth import TRIAL_PROTOCOL
from tests.conftest import PacsPair
from tests.mountutil import Mount
from tests.test_e2e_deid import config as deid_config
from tests.test_e2e_policy import token
from tests.test_volumes import assert_same_volume, dcm2niix, phi_found

pytestmark = pytest.mark.e2e

nib: Any = nibabel


def test_volume_through_the_mount_equals_dcm2niix(orthanc_pair: PacsPair, tmp_path: Path) -> None:
    pair = orthanc_pair
    cfg = pair.write_config(tmp_path)
    inst = next(i for i in pair.instances if i.modality == "CT")
    series = [i for i in pair.instances if i.series_uid == inst.series_uid]
    ref, ref_side = dcm2niix(series, tmp_path / "ref")
    with Mount(cfg, tmp_path / "mnt") as m:
        study = m.mountpoint / "studies" / inst.study_uid
        names = set(os.listdir(study))
        assert {inst.series_uid + ".nii.gz", inst.series_uid + ".json"} <= names
        vol = study / (inst.series_uid + ".nii.gz")
        assert vol.stat().st_size == 0  # not built yet
        # nibabel.load trusts st_size ("Empty file") until the volume is built: read it to
        # EOF first (docs/SEMANTICS.md, "File sizes"), or mount with exact_sizes.
        data = vol.read_bytes()
        assert_same_volume(data, ref)
        assert vol.stat().st_size == len(data)  # cached now: the size is exact
        img = nib.load(vol)  # straight from the mount
        assert img.shape == ref.shape
        side = json.loads((study / (inst.series_uid + ".json")).read_text())
        assert side["Modality"] == ref_side["Modality"] == "CT"
        meta = json.loads((study / inst.series_uid / ".metadata.json").read_text())
        assert meta["volume"] == {"available": True, "built": True}
        with pytest.raises(OSError) as e:
            (study / "1.2.3.4.nii.gz").stat()
        assert e.value.errno == errno.ENOENT
        assert "volume" in m.log_text() and "built" in m.log_text()


def test_deidentified_volume_through_the_mount(
    orthanc_pair: PacsPair, idp: Path, tmp_path: Path
) -> None:
    pair = orthanc_pair
    cfg = deid_config(pair, tmp_path, idp)
    grid = token(idp, tmp_path / "grid.jwt", "svc-grid", "grid")
    secret = LocalKeyring.load(cfg.parent / "keyring.json").secret("pseudonym:nant")
    inst = next(i for i in pair.instances if i.trial == TRIAL_PROTOCOL and i.modality == "CT")
    series = [i for i in pair.instances if i.series_uid == inst.series_uid]
    ref, _ = dcm2niix(series, tmp_path / "ref")
    with Mount(cfg, tmp_path / "mnt", token_file=grid) as m:
        study = m.mountpoint / "studies" / map_uid(inst.study_uid, secret=secret)
        stem = map_uid(inst.series_uid, secret=secret)
        data = (study / (stem + ".nii.gz")).read_bytes()
        side = (study / (stem + ".json")).read_bytes()
        assert_same_volume(data, ref)
        for blob in (gzip.decompress(data), side):
            assert not phi_found(blob.decode("latin-1"), pair.instances)
        assert not (m.mountpoint / "studies" / inst.study_uid).exists()


def test_exact_sizes_lets_nibabel_load_a_cold_volume(
    orthanc_pair: PacsPair, tmp_path: Path
) -> None:
    """With ``[bridge] exact_sizes = true`` a stat of a volume builds it, so a tool that
    trusts st_size (nibabel.load) reads a cold volume."""
    pair = orthanc_pair
    cfg = pair.write_config(tmp_path, bridge_options={"exact_sizes": True})
    inst = next(i for i in pair.instances if i.modality == "MR")
    series = [i for i in pair.instances if i.series_uid == inst.series_uid]
    ref, _ = dcm2niix(series, tmp_path / "ref")
    with Mount(cfg, tmp_path / "mnt") as m:
        vol = m.mountpoint / "studies" / inst.study_uid / (inst.series_uid + ".nii.gz")
        img = nib.load(vol)
        assert img.shape == ref.shape
        assert_same_volume(vol.read_bytes(), ref)
