"""De-identified views end to end: a real mount of a principal whose access is de-identified.

Names, .metadata.json and file content are de-identified (PS3.15 Annex E, mdm.deid), the
pseudonyms and remapped UIDs are consistent across files and across two mounts of the same
scope, different under another scope, and the original identifiers appear nowhere.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pydicom
import pytest

from mdm.deid import map_uid, pseudonym
from mdm.store.keys import LocalKeyring
from mdm_demo.synth import TRIAL_PROTOCOL
from tests.conftest import PacsPair
from tests.mountutil import Mount, mdm
from tests.test_e2e_policy import identity_config, token

pytestmark = pytest.mark.e2e

POLICY = f"""
[[allow]]
id = "nant-grid"
description = "grid jobs of the trial, de-identified, dates shifted per patient"
principals = {{ groups = ["grid"] }}
resources = {{ trial = "{TRIAL_PROTOCOL}" }}
access = "deidentified"
[allow.deid]
scope = "nant"
retain_longitudinal = "offset"

[[allow]]
id = "radiology-a"
description = "radiologists of SiteA: identified there (and so may re-identify)"
principals = {{ groups = ["radiologists"] }}
resources = {{ sites = ["SiteA"] }}
access = "identified"

[[allow]]
id = "other-programme"
description = "another programme on the same patients: not linkable with the first"
principals = {{ groups = ["other"] }}
resources = {{ trial = "{TRIAL_PROTOCOL}" }}
access = "deidentified"
[allow.deid]
scope = "other"
"""


def config(pair: PacsPair, d: Path, idp: Path) -> Path:
    return identity_config(pair, d, idp, POLICY, leeway="30s")


def tree(mnt: Path) -> set[str]:
    out = set()
    for root, dirs, files in os.walk(mnt / "studies"):
        rel = os.path.relpath(root, mnt)
        out |= {f"{rel}/{n}" for n in dirs + files if n != ".metadata.json"}
    return out


def test_deidentified_mount(orthanc_pair: PacsPair, idp: Path, tmp_path: Path) -> None:
    pair = orthanc_pair
    cfg = config(pair, tmp_path, idp)
    trial = [i for i in pair.instances if i.trial == TRIAL_PROTOCOL]
    grid = token(idp, tmp_path / "grid.jwt", "svc-grid", "grid")
    originals = pair.instances
    phi: set[bytes] = set()
    for i in originals:
        ds = pydicom.dcmread(io.BytesIO(i.read()))
        phi |= {str(ds.PatientName).encode(), ds.PatientID.encode(), ds.AccessionNumber.encode()}
        phi |= {i.study_uid.encode(), i.series_uid.encode(), i.sop_uid.encode()}
        phi |= {str(ds.FrameOfReferenceUID).encode(), ds.PatientBirthDate.encode()}
    with Mount(cfg, tmp_path / "mnt1", token_file=grid) as m:
        mnt = m.mountpoint
        secret = LocalKeyring.load(tmp_path / "keyring.json").secret("pseudonym:nant")
        names = tree(mnt)
        want_files = {map_uid(i.sop_uid, secret=secret) + ".dcm" for i in trial}
        assert {n.rsplit("/", 1)[1] for n in names if n.endswith(".dcm")} == want_files
        # Every file of one series: de-identified, consistent, pixels untouched.
        series = pair.series(trial[0].series_uid)
        sdir = mnt / "studies" / map_uid(trial[0].study_uid, secret=secret)
        sdir = sdir / map_uid(trial[0].series_uid, secret=secret)
        frames = set()
        for inst in series:
            raw = (sdir / f"{map_uid(inst.sop_uid, secret=secret)}.dcm").read_bytes()
            for needle in phi:
                assert needle not in raw, needle
            ds = pydicom.dcmread(io.BytesIO(raw))
            orig = pydicom.dcmread(io.BytesIO(inst.read()))
            assert ds.PatientIdentityRemoved == "YES"
            assert ds.PatientID == pseudonym(inst.patient_id, secret=secret)
            assert ds.SOPInstanceUID == map_uid(inst.sop_uid, secret=secret)
            assert ds.SeriesInstanceUID == map_uid(inst.series_uid, secret=secret)
            assert ds.PixelData == orig.PixelData
            frames.add(ds.FrameOfReferenceUID)
        assert len(frames) == 1 and str(orig.FrameOfReferenceUID) not in frames
        meta = (sdir.parent / ".metadata.json").read_bytes()
        for needle in phi:
            assert needle not in meta
        assert json.loads(meta)["access"] == "deidentified"
        # The patient directory carries the pseudonym.
        assert (mnt / "patients" / pseudonym(trial[0].patient_id, secret=secret)).is_dir()
        assert not (mnt / "patients" / trial[0].patient_id).exists()
        assert not (mnt / "studies" / trial[0].study_uid).exists()
    # A second mount of the same scope, looking a remapped path up without listing first.
    with Mount(cfg, tmp_path / "mnt2", token_file=grid) as m:
        i = trial[-1]
        p = m.mountpoint / "studies" / map_uid(i.study_uid, secret=secret)
        p = p / map_uid(i.series_uid, secret=secret) / f"{map_uid(i.sop_uid, secret=secret)}.dcm"
        assert pydicom.dcmread(p).SOPInstanceUID == map_uid(i.sop_uid, secret=secret)
        assert tree(m.mountpoint) == names
    # Re-identification: only for identified access to the object, and audited.
    on_a = next(i for i in trial if "SiteA" in pair.sites_holding(i.sop_uid))
    pseudo = pseudonym(on_a.patient_id, secret=secret)
    rad = token(idp, tmp_path / "rad.jwt", "drad", "radiologists")
    args = ["reidentify", "--config", str(cfg), "--scope", "nant", pseudo]
    out = mdm(*args, "--token-file", str(rad))
    assert on_a.patient_id in out.stdout
    denied = mdm(*args, "--token-file", str(grid), check=False)
    assert denied.returncode != 0 and on_a.patient_id not in denied.stdout + denied.stderr
    # Not entitled: a real pseudonym and a made-up one get the same answer.
    made_up = "P" + "Z" * (len(pseudo) - 1)
    fake = mdm(*args[:-1], made_up, "--token-file", str(grid), check=False)
    assert (fake.returncode, fake.stdout, fake.stderr.replace(made_up, "X")) == (
        denied.returncode,
        denied.stdout,
        denied.stderr.replace(pseudo, "X"),
    )
    assert "nothing you may re-identify" in denied.stderr
    # `mdm fetch` as the de-identified principal caches de-identified objects only.
    other_study = next(i.study_uid for i in trial if i.study_uid != trial[0].study_uid)
    mdm("fetch", "--config", str(cfg), "--token-file", str(grid), "-q", other_study)
    from mdm.store.db import open_env
    from mdm.store.objects import ObjectStore

    env = open_env(tmp_path / "cache")
    try:
        refs = ObjectStore(
            tmp_path / "cache", env, LocalKeyring.load(tmp_path / "keyring.json"), 2**30
        ).list_refs()
    finally:
        env.close()
    assert any(r.sop_uid in {i.sop_uid for i in trial if i.study_uid == other_study} for r in refs)
    assert refs and all(r.view.startswith("deid/nant/") for r in refs)
    # A job warms its cohort by the UIDs its own view shows (remapped), read from stdin.
    third = next(i for i in trial if i.study_uid not in (trial[0].study_uid, other_study))
    shown = map_uid(third.series_uid, secret=secret)
    res = mdm(
        "fetch", "--config", str(cfg), "--token-file", str(grid), "-q", "-",
        input=f"{shown}\n{map_uid(third.study_uid, secret=secret)}\n",
    )  # fmt: skip
    n = sum(1 for i in trial if i.series_uid == third.series_uid)
    assert f"{shown}: {n} object(s) cached" in res.stdout, res.stdout
    assert res.stdout.count("object(s) cached") == 2
    # Another scope: not linkable.
    other = token(idp, tmp_path / "other.jwt", "svc-other", "other")
    with Mount(cfg, tmp_path / "mnt3", token_file=other) as m:
        other_names = tree(m.mountpoint)
        assert other_names and not (other_names & names)
