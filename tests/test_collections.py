"""Collections (``/collections``), policy push-down and xattrs, in-process against the two
real local PACS of ``orthanc_pair`` (no kernel mount: :class:`mdm.namespace.bridge.Bridge`).

The 2,000-study cohort and the counting of the queries that reach Orthanc are in
``tests/test_collections_scale.py``.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pydicom
import pytest

from mdm.catalog.cohorts import read_manifest
from mdm.config import load_config
from mdm.errors import NotFound
from mdm.namespace.bridge import Bridge, Entry
from mdm_demo.synth import TRIAL_PROTOCOL
from tests.conftest import PacsPair
from tests.mountutil import Mount, mdm
from tests.test_e2e_deid import POLICY as DEID_POLICY
from tests.test_e2e_policy import identity_config, token
from tests.test_namespace import names, run_as

pytestmark = pytest.mark.service


def dirs(entries: list[Entry]) -> set[str]:
    """The directory names of a listing (series directories, not the NIfTI files beside)."""
    return {e.name for e in entries if e.is_dir}


def collections_toml(manifest: Path) -> str:
    return f"""
[[collection]]
name = "trial-ct"
match = {{ ClinicalTrialProtocolID = "{TRIAL_PROTOCOL}", Modality = "CT" }}

[[collection]]
name = "picked"
manifest = "{manifest}"
pin = true

[[collection]]
name = "nobody"
match = {{ StudyDescription = "NO SUCH STUDY*" }}
"""


def test_collections_by_keys_and_manifest(orthanc_pair: PacsPair, tmp_path: Path) -> None:
    """A collection by keys lists its cohort (study keys at the PACS, series keys on the
    series); one by manifest lists exactly the UIDs named, at any level; an empty one is not
    listed; .metadata.json says what a collection is; xattrs show the view's attributes."""
    pair = orthanc_pair
    insts = pair.instances
    study_whole = insts[0].study_uid
    other = next(i for i in insts if i.study_uid != study_whole)
    one_series = other.series_uid
    third = next(i for i in insts if i.study_uid not in (study_whole, other.study_uid))
    manifest = tmp_path / "picked.tcia"
    # A TCIA/NBIA-style manifest: header lines, then UIDs (here at three levels).
    manifest.write_text(
        "downloadServerUrl=https://example.org/nbia-download/servlet/DownloadServlet\n"
        "includeAnnotation=true\nnoOfrRetry=4\ndatabasketId=manifest-1.tcia\n"
        "manifestVersion=3.0\nListOfSeriesToDownload=\n"
        f"{study_whole}\n{one_series}\n{third.sop_uid}\n1.2.3.999.404\n"
    )
    assert read_manifest(manifest) == [study_whole, one_series, third.sop_uid, "1.2.3.999.404"]
    cfg = pair.write_config(tmp_path, extra=collections_toml(manifest))
    assert [c.name for c in load_config(cfg).collections] == ["trial-ct", "picked", "nobody"]

    trial_ct = {i for i in insts if i.trial == TRIAL_PROTOCOL and i.modality == "CT"}

    async def go(b: Bridge) -> None:
        assert "collections" in names(await b.listdir(()))
        assert names(await b.listdir(("collections",))) == {"trial-ct", "picked"}
        with pytest.raises(NotFound):
            await b.listdir(("collections", "nobody"))
        # By keys.
        pats = names(await b.listdir(("collections", "trial-ct")))
        assert pats == {i.patient_id for i in trial_ct}
        seen: set[str] = set()
        for p in pats:
            for st in names(await b.listdir(("collections", "trial-ct", p))):
                for se in dirs(await b.listdir(("collections", "trial-ct", p, st))):
                    for f in names(await b.listdir(("collections", "trial-ct", p, st, se))):
                        seen.add(f[: -len(".dcm")])
        assert seen == {i.sop_uid for i in trial_ct}
        # By manifest: a whole study, one series of another, one instance of a third.
        want = {i.sop_uid for i in insts if i.study_uid == study_whole}
        want |= {i.sop_uid for i in insts if i.series_uid == one_series}
        want.add(third.sop_uid)
        got: set[str] = set()
        base = ("collections", "picked")
        for p in names(await b.listdir(base)):
            for st in names(await b.listdir((*base, p))):
                for se in dirs(await b.listdir((*base, p, st))):
                    for f in names(await b.listdir((*base, p, st, se))):
                        got.add(f[:-4])
        assert got == want
        # Outside the manifest: NotFound, though the study is there.
        other_series = next(
            i.series_uid
            for i in insts
            if i.study_uid == other.study_uid and i.series_uid != one_series
        )
        with pytest.raises(NotFound):
            await b.lookup((*base, other.patient_id, other.study_uid, other_series))
        meta = json.loads((await b.open((*base, ".metadata.json"))).read(0, 1 << 20).decode())
        assert meta["level"] == "COLLECTION"
        assert meta["collection"]["by"] == "manifest"
        assert meta["collection"]["manifest_uids_not_found"] == 1
        # xattrs: the key attributes of a study, series and instance.
        x = await b.xattrs((*base, third.patient_id, third.study_uid))
        assert x["user.dicom.StudyInstanceUID"] == third.study_uid
        assert x["user.dicom.PatientID"] == third.patient_id
        x = await b.xattrs((*base, third.patient_id, third.study_uid, third.series_uid))
        assert x["user.dicom.Modality"] == third.modality
        x = await b.xattrs(
            (*base, third.patient_id, third.study_uid, third.series_uid, third.sop_uid + ".dcm")
        )
        assert x["user.dicom.SOPInstanceUID"] == third.sop_uid
        assert await b.xattrs(base) == {}

    run_as(cfg, None, go)


def test_deidentified_collection(orthanc_pair: PacsPair, idp: Path, tmp_path: Path) -> None:
    """A de-identified principal sees a collection through its view: pseudonymous patients,
    remapped UIDs, only what its grant shows; xattrs carry no PHI; a collection limited to
    other principals does not exist for it."""
    pair = orthanc_pair
    manifest = tmp_path / "m.txt"
    manifest.write_text("\n".join(sorted({i.study_uid for i in pair.instances})) + "\n")
    extra = collections_toml(manifest) + '\n[[collection]]\nname = "staff"\n'
    extra += 'match = { Modality = "CT" }\nprincipals = ["group:radiologists"]\n'
    cfg = identity_config(pair, tmp_path, idp, DEID_POLICY)
    cfg.write_text(cfg.read_text() + extra)
    tok = token(idp, tmp_path / "grid.jwt", "job-1", groups="grid")
    trial_pids = {i.patient_id for i in pair.instances if i.trial == TRIAL_PROTOCOL}
    phi = {i.patient_id for i in pair.instances} | {i.patient_name for i in pair.instances}

    async def go(b: Bridge) -> None:
        assert names(await b.listdir(("collections",))) == {"trial-ct", "picked"}
        with pytest.raises(NotFound):
            await b.listdir(("collections", "staff"))
        pats = names(await b.listdir(("collections", "picked")))
        assert len(pats) == len(trial_pids) and not pats & phi
        for p in pats:
            for st in names(await b.listdir(("collections", "picked", p))):
                assert st.startswith("2.25.")
                x = await b.xattrs(("collections", "picked", p, st))
                assert x["user.dicom.PatientID"] == p
                assert not set(x.values()) & phi

    run_as(cfg, tok, go)


@pytest.mark.e2e
def test_fetch_pin_status_wait(orthanc_pair: PacsPair, tmp_path: Path) -> None:
    """``mdm fetch --collection`` warms a collection and summarises; a pinned one survives
    eviction pressure from everything else; ``mdm collection status`` and ``wait`` say
    complete (exit 0), and a collection never fetched times out (exit 3)."""
    pair = orthanc_pair
    insts = pair.instances
    pinned_study = insts[0].study_uid
    manifest = tmp_path / "picked.txt"
    manifest.write_text(pinned_study + "\n")
    cfg = pair.write_config(tmp_path, max_bytes="200KiB", extra=collections_toml(manifest))
    c = ["--config", str(cfg)]
    res = mdm("fetch", *c, "--collection", "picked", "-q")
    n_pinned = sum(1 for i in insts if i.study_uid == pinned_study)
    assert f"picked: {n_pinned} object(s) listed, 0 already cached" in res.stdout
    assert f"{n_pinned} retrieved, 0 failed" in res.stdout
    st = json.loads(mdm("collection", "status", *c, "--json", "picked").stdout)
    assert st["complete"] and st["cached"] == n_pinned and st["cached_bytes"] > 0
    # Eviction pressure: every other study, through a 200 KiB cache.
    others = sorted({i.study_uid for i in insts if i.study_uid != pinned_study})
    mdm("fetch", *c, "-q", *others, check=False)
    stats = json.loads(mdm("cache", "stats", *c, "--json").stdout)
    assert stats["evicted"] > 0 and stats["bytes"] <= 200 * 1024
    assert stats["pinned_objects"] == n_pinned and stats["pinned_bytes"] > 0
    st = json.loads(mdm("collection", "status", *c, "--json", "picked").stdout)
    assert st["complete"], st
    assert mdm("collection", "wait", *c, "--timeout", "5s", "picked").returncode == 0
    # A collection with one object not cached (evicted by name): wait times out.
    gone = next(
        i.sop_uid
        for i in insts
        if i.trial == TRIAL_PROTOCOL and i.modality == "CT" and i.study_uid != pinned_study
    )
    mdm("cache", "evict", *c, gone)
    res = mdm(
        "collection", "wait", *c, "--timeout", "1s", "--interval", "1s", "trial-ct", check=False
    )
    assert res.returncode == 3, res.stdout + res.stderr
    res = mdm("collection", "wait", *c, "--timeout", "1s", "nope", check=False)
    assert res.returncode == 2


@pytest.mark.e2e
def test_mount_collections_and_xattrs(orthanc_pair: PacsPair, tmp_path: Path) -> None:
    """On a real mount: /collections lists the collections, a collection's files read as
    anywhere else, and getxattr/listxattr show user.dicom.* (ENODATA for others)."""
    pair = orthanc_pair
    manifest = tmp_path / "picked.txt"
    inst = pair.instances[0]
    manifest.write_text(inst.series_uid + "\n")
    cfg = pair.write_config(tmp_path, extra=collections_toml(manifest))
    with Mount(cfg, tmp_path / "mnt") as m:
        mnt = m.mountpoint
        assert sorted(os.listdir(mnt / "collections")) == [".metadata.json", "picked", "trial-ct"]
        study = mnt / "collections" / "picked" / inst.patient_id / inst.study_uid
        assert [n for n in os.listdir(study) if (study / n).is_dir()] == [inst.series_uid]
        # The NIfTI view beside the series directory, wherever the series appears.
        assert f"{inst.series_uid}.nii.gz" in os.listdir(study)
        keys = os.listxattr(study)
        assert "user.dicom.StudyInstanceUID" in keys and "user.dicom.PatientID" in keys
        assert os.getxattr(study, "user.dicom.StudyInstanceUID").decode() == inst.study_uid
        series = study / inst.series_uid
        assert os.getxattr(series, "user.dicom.Modality").decode() == inst.modality
        f = series / f"{inst.sop_uid}.dcm"
        assert os.getxattr(f, "user.dicom.SOPInstanceUID").decode() == inst.sop_uid
        with pytest.raises(OSError) as ei:
            os.getxattr(study, "user.dicom.NoSuchKeyword")
        assert ei.value.errno == errno.ENODATA
        assert pydicom.dcmread(f).SOPInstanceUID == inst.sop_uid
