"""NIfTI views (mdm/volume), in-process over two real Orthancs, without a kernel mount.

``<series>.nii.gz`` and ``<series>.json`` beside each series directory: equal to dcm2niix's
conversion of the same DICOM files (shape, world coordinates, voxel values), built once and
then served from the cache (no new retrieval, no new build); a de-identified principal's
volume and sidecar carry no PHI; a series that does not form a volume is ENOENT with its
reason in ``.metadata.json`` (a single instance decided from the catalog, without retrieval;
mixed orientations once retrieved); a metadata-only principal may list but not read them.
The builder's rules themselves are unit-tested at the end.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import nibabel
import numpy as np
import pydicom
import pytest

from mdm.deid import map_uid
from mdm.errors import AccessDenied, NotFound
from mdm.namespace.bridge import Bridge
from mdm.store.keys import LocalKeyring
from mdm.store.records import ObjectRef
from mdm.volume.build import NotAVolume, build_volume, catalog_reason
from mdm.volume.service import derived_uid
from mdm_demo.synth import TRIAL_PROTOCOL, GeneratedInstance, generate, to_bytes
from tests.conftest import PacsPair
from tests.test_e2e_policy import identity_config, token
from tests.test_namespace import POLICY, counter, run_as

nib: Any = nibabel

CT = "1.2.840.10008.5.1.4.1.1.2"


# ---------------------------------------------------------------------------- fixtures
@dataclasses.dataclass
class Odd:
    """Series of the pair that do not form a volume."""

    mixed: list[GeneratedInstance]
    """A CT series whose third slice is coronal."""
    single: list[GeneratedInstance]
    """An MR series of one instance."""


@pytest.fixture(scope="module")
def pair(orthanc_pair: PacsPair) -> tuple[PacsPair, Odd]:
    """The module's pair (tests/conftest.py), and on SiteA a patient whose series are no
    volumes (added for this module only: the pair is module-scoped)."""
    extra = generate(None, patients=1, seed=77, ct_slices=4, mr_slices=1, rows=32, cols=32)
    mixed = [i for i in extra if i.modality == "CT"]
    ds = pydicom.dcmread(io.BytesIO(mixed[2].read()))
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    mixed[2] = dataclasses.replace(mixed[2], data=to_bytes(ds), path=None)
    single = [i for i in extra if i.modality == "MR"]
    orthanc_pair.a.server.upload([*mixed, *single])
    return orthanc_pair, Odd(mixed, single)


def phi_found(text: str, instances: list[GeneratedInstance]) -> list[str]:
    """The identifying values of ``instances`` (and of their files) that occur in ``text``
    as whole words (a first name like MARY occurs inside PRIMARY, an ImageType value)."""
    values: set[str] = set()
    for i in instances:
        ds = pydicom.dcmread(io.BytesIO(i.read()), stop_before_pixels=True)
        values |= {i.patient_id, i.accession_number, i.birth_date, str(ds.StudyDate)}
        values |= {str(ds.InstitutionName), str(ds.ReferringPhysicianName), str(ds.StationName)}
        values |= {p for p in i.patient_name.split("^") if len(p) >= 3}
        values |= {i.study_uid, i.series_uid, i.sop_uid, str(ds.FrameOfReferenceUID)}
    return sorted(
        v for v in values if v and re.search(rf"(?<![A-Z0-9.]){re.escape(v)}(?![A-Z0-9])", text)
    )


def dcm2niix(instances: list[GeneratedInstance], d: Path) -> tuple[Any, dict[str, Any]]:
    """dcm2niix's conversion of the instances' DICOM files (test data written for it only)."""
    src, out = d / "dicom", d / "nifti"
    shutil.rmtree(d, ignore_errors=True)
    src.mkdir(parents=True)
    out.mkdir()
    for i in instances:
        (src / f"{i.sop_uid}.dcm").write_bytes(i.read())
    subprocess.run(
        ["dcm2niix", "-z", "y", "-f", "ref", "-o", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    (nii,) = out.glob("*.nii.gz")
    (side,) = out.glob("*.json")
    return nib.load(nii), json.loads(side.read_text())


def assert_same_volume(ours: bytes, ref: Any) -> None:
    """Same shape, affine and voxel values once both are in RAS+ (canonical) order: the two
    converters may order axes differently, the world coordinates of each voxel must agree."""
    img = nib.as_closest_canonical(nib.Nifti1Image.from_bytes(gzip.decompress(ours)))
    want = nib.as_closest_canonical(ref)
    assert img.shape == want.shape
    np.testing.assert_allclose(img.affine, want.affine, atol=1e-4)
    np.testing.assert_allclose(img.get_fdata(), want.get_fdata(), atol=1e-3)


async def read_all(b: Bridge, path: tuple[str, ...]) -> tuple[bytes, bool]:
    f = await b.open(path)
    try:
        return f.read(0, f.size + 1), f.exact_before
    finally:
        f.release()


# ---------------------------------------------------------------------------- identified
def test_volume_equals_dcm2niix_and_is_built_once(
    pair: tuple[PacsPair, Odd], tmp_path: Path
) -> None:
    """The local administrator: the files are listed beside the series in /studies,
    /patients, /sites and /browse; the .nii.gz equals dcm2niix's; the second read is a
    cache hit (no retrieval, no build); the sidecar has dcm2niix's acquisition fields."""
    p, _ = pair
    cfg = p.write_config(tmp_path)
    first = next(i for i in p.instances if i.patient_id == p.only_a_patients[0])
    ct = [i for i in p.instances if i.modality == "CT" and i.patient_id == first.patient_id]
    st, se = ct[0].study_uid, ct[0].series_uid
    ref, ref_side = dcm2niix(ct, tmp_path / "ref")

    async def go(b: Bridge) -> None:
        listing = {e.name: e for e in await b.listdir(("studies", st))}
        assert {se, se + ".nii.gz", se + ".json"} <= set(listing)
        assert listing[se + ".nii.gz"].size == 0 and not listing[se + ".nii.gz"].exact
        retrievals = b.fetcher.stats.retrievals
        built = counter("mdm_volume_builds", result="built")
        data, cached = await read_all(b, ("studies", st, se + ".nii.gz"))
        assert not cached
        assert_same_volume(data, ref)
        assert b.fetcher.stats.retrievals > retrievals  # the series, through the fetcher
        assert counter("mdm_volume_builds", result="built") == built + 1
        # Second read, and the sidecar: served from the cache.
        retrievals = b.fetcher.stats.retrievals
        again, cached = await read_all(b, ("patients", ct[0].patient_id, st, se + ".nii.gz"))
        assert cached and again == data
        side = json.loads(
            (await read_all(b, ("sites", "SiteA", ct[0].patient_id, st, se + ".json")))[0]
        )
        assert b.fetcher.stats.retrievals == retrievals
        assert counter("mdm_volume_builds", result="built") == built + 1
        for k in ("Modality", "SliceThickness", "SeriesNumber", "ImageOrientationPatientDICOM"):
            assert side[k] == ref_side[k], k
        assert (await b.lookup(("studies", st, se + ".nii.gz"))).size == len(data)
        meta = json.loads(b.metadata(await b.resolve(("studies", st, se, ".metadata.json"))))
        assert meta["volume"] == {"available": True, "built": True}
        # /browse: the readable series name, then the suffix; a forged one is NotFound.
        (sname,) = [n for n in await names(b, ("browse", ct[0].patient_id)) if st in n]
        files = await names(b, ("browse", ct[0].patient_id, sname))
        (vname,) = [n for n in files if n.endswith(f"_{se}.nii.gz")]
        assert (await read_all(b, ("browse", ct[0].patient_id, sname, vname)))[0] == data
        with pytest.raises(NotFound):
            await b.lookup(("browse", ct[0].patient_id, sname, f"forged_{se}.nii.gz"))
        with pytest.raises(NotFound):
            await b.listdir(("studies", st, se + ".nii.gz"))
        with pytest.raises(NotFound):
            await b.lookup(("studies", st, se + ".nii.gz", ".metadata.json"))

    run_as(cfg, None, go)


async def names(b: Bridge, path: tuple[str, ...]) -> list[str]:
    return [e.name for e in await b.listdir(path)]


def test_series_that_form_no_volume(pair: tuple[PacsPair, Odd], tmp_path: Path) -> None:
    """A single instance: not listed and NotFound, decided from the catalog (no retrieval).
    Mixed orientations: listed until a read retrieves and tries the series, then NotFound,
    and the reason is in .metadata.json (and stays there: a stored verdict)."""
    p, odd = pair
    cfg = p.write_config(tmp_path)
    st = odd.mixed[0].study_uid
    mixed, single = odd.mixed[0].series_uid, odd.single[0].series_uid

    async def go(b: Bridge) -> None:
        retrievals = b.fetcher.stats.retrievals
        listing = set(await names(b, ("studies", st)))
        assert single in listing and single + ".nii.gz" not in listing
        assert mixed + ".nii.gz" in listing  # the catalog cannot tell before retrieval
        with pytest.raises(NotFound):
            await b.lookup(("studies", st, single + ".nii.gz"))
        meta = json.loads(b.metadata(await b.resolve(("studies", st, single, ".metadata.json"))))
        assert meta["volume"] == {"available": False, "reason": "a single instance is not a volume"}
        assert b.fetcher.stats.retrievals == retrievals
        unavailable = counter("mdm_volume_builds", result="unavailable")
        with pytest.raises(NotFound):
            await b.open(("studies", st, mixed + ".nii.gz"))
        assert counter("mdm_volume_builds", result="unavailable") == unavailable + 1
        assert mixed + ".nii.gz" not in await names(b, ("studies", st))
        with pytest.raises(NotFound):
            await b.open(("studies", st, mixed + ".json"))
        meta = json.loads(b.metadata(await b.resolve(("studies", st, mixed, ".metadata.json"))))
        assert meta["volume"] == {"available": False, "reason": "mixed slice orientations"}
        assert counter("mdm_volume_builds", result="unavailable") == unavailable + 1

    run_as(cfg, None, go)


# ---------------------------------------------------------------------------- views
@pytest.fixture(scope="module")
def policy_config(
    pair: tuple[PacsPair, Odd], idp: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return identity_config(pair[0], tmp_path_factory.mktemp("vol"), idp, POLICY)


def test_deidentified_volume_and_sidecar_hold_no_phi(
    pair: tuple[PacsPair, Odd], idp: Path, policy_config: Path, tmp_path: Path
) -> None:
    """A de-identified principal's volume is built from its de-identified instances and
    stored in its view; neither it nor its sidecar holds a name, ID, accession number,
    institution, original UID or unshifted date; its voxels equal the identified volume's."""
    p, _ = pair
    grid = token(idp, tmp_path / "grid.jwt", "svc-grid", "grid")
    secret = LocalKeyring.load(policy_config.parent / "keyring.json").secret("pseudonym:nant")
    trial = [i for i in p.instances if i.trial == TRIAL_PROTOCOL and i.modality == "MR"]
    mr = sorted(
        (i for i in trial if i.series_uid == trial[0].series_uid), key=lambda i: i.instance_number
    )
    st, se = (map_uid(u, secret=secret) for u in (mr[0].study_uid, mr[0].series_uid))
    ref, _ = dcm2niix(mr, tmp_path / "ref")

    async def go(b: Bridge) -> None:
        data, _ = await read_all(b, ("studies", st, se + ".nii.gz"))
        side, _ = await read_all(b, ("studies", st, se + ".json"))
        assert_same_volume(data, ref)
        for blob in (gzip.decompress(data), side):
            assert not phi_found(blob.decode("latin-1"), p.instances)
        doc = json.loads(side)
        assert doc["Modality"] == "MR" and "InstitutionName" not in doc
        # Built from the de-identified instances: no identified copy was made for it.
        ident = derived_uid("volume", mr[0].series_uid, "identified")
        assert b.store.info(ObjectRef(ident, "identified")) is None

    run_as(policy_config, grid, go)


def test_metadata_only_principal_lists_but_may_not_read(
    pair: tuple[PacsPair, Odd], idp: Path, policy_config: Path, tmp_path: Path
) -> None:
    """As for instance files: listed, EACCES on open, no retrieval and nothing built."""
    p, _ = pair
    asmith = token(idp, tmp_path / "asmith.jwt", "asmith")
    i = next(i for i in p.instances if i.trial == TRIAL_PROTOCOL and i.modality == "CT")

    async def go(b: Bridge) -> None:
        assert i.series_uid + ".nii.gz" in await names(b, ("studies", i.study_uid))
        retrievals = b.fetcher.stats.retrievals
        with pytest.raises(AccessDenied):
            await b.open(("studies", i.study_uid, i.series_uid + ".nii.gz"))
        assert b.fetcher.stats.retrievals == retrievals

    run_as(policy_config, asmith, go)


# ---------------------------------------------------------------------------- units
@pytest.mark.unit
def test_catalog_rule() -> None:
    """What ls shows without retrieval (docs/SEMANTICS.md, "Volumes")."""
    assert catalog_reason({"Modality": "CT", "NumberOfSeriesRelatedInstances": "40"}, []) is None
    assert catalog_reason({"Modality": "CT"}, [CT, CT]) is None
    assert catalog_reason({"Modality": "SR"}, []) == "modality SR does not form volumes"
    assert catalog_reason({"Modality": "MR", "NumberOfSeriesRelatedInstances": "1"}, [])
    assert catalog_reason({"Modality": "CT"}, [CT])
    assert "multi-frame" in (
        catalog_reason({"Modality": "CT"}, ["1.2.840.10008.5.1.4.1.1.2.1"] * 2) or ""
    )
    assert catalog_reason({"Modality": "CT"}, [CT, "1.2.840.10008.5.1.4.1.1.7"])


@pytest.mark.unit
def test_builder_refuses_what_is_no_volume() -> None:
    insts = generate(None, patients=1, seed=5, ct_slices=5, mr_slices=0, rows=16, cols=16)
    dss = [pydicom.dcmread(io.BytesIO(i.read())) for i in insts]
    assert build_volume(list(reversed(dss))).shape == (16, 16, 5)  # sorted by position
    cases = {
        "inconsistent slice spacing": lambda d: d[4].ImagePositionPatient.__setitem__(2, -99.0),
        "several instances at one slice position (more than one volume)": lambda d: setattr(
            d[1], "ImagePositionPatient", list(d[0].ImagePositionPatient)
        ),
        "mixed image sizes": lambda d: setattr(d[3], "Rows", 8),
        "multi-frame instances are not supported": lambda d: setattr(d[0], "NumberOfFrames", 4),
    }
    for reason, spoil in cases.items():
        dss = [pydicom.dcmread(io.BytesIO(i.read())) for i in insts]
        spoil(dss)
        with pytest.raises(NotAVolume) as e:
            build_volume(dss)
        assert e.value.reason == reason
    with pytest.raises(NotAVolume):
        build_volume(dss[:1])


@pytest.mark.unit
def test_derived_uids_are_stable_valid_and_distinct() -> None:
    a = derived_uid("volume", "1.2.3", "identified")
    assert a == derived_uid("volume", "1.2.3", "identified") and len(a) <= 64
    assert a.startswith("2.25.") and a[5:].isdigit()
    assert (
        len(
            {
                a,
                derived_uid("sidecar", "1.2.3", "identified"),
                derived_uid("volume", "1.2.3", "deid/x/0123456789ab"),
            }
        )
        == 3
    )


def test_volume_opens_are_audited(pair: tuple[PacsPair, Odd], idp: Path, tmp_path: Path) -> None:
    """Each open of a volume file is one audit record, as an instance open is: allowed
    (with the key use, cold then cached), denied for a metadata-only principal."""
    p, _ = pair
    audit = tmp_path / "audit" / "audit.jsonl"
    cfg = identity_config(p, tmp_path / "cfg", idp, POLICY, audit=audit)
    grid = token(idp, tmp_path / "grid.jwt", "svc-grid", "grid")
    asmith = token(idp, tmp_path / "asmith.jwt", "asmith")
    secret = LocalKeyring.load(cfg.parent / "keyring.json").secret("pseudonym:nant")
    i = next(i for i in p.instances if i.trial == TRIAL_PROTOCOL and i.modality == "CT")
    st, se = (map_uid(u, secret=secret) for u in (i.study_uid, i.series_uid))

    async def read_twice(b: Bridge) -> None:
        for _ in range(2):
            await read_all(b, ("studies", st, se + ".nii.gz"))

    async def denied(b: Bridge) -> None:
        with pytest.raises(AccessDenied):
            await b.open(("studies", i.study_uid, i.series_uid + ".json"))

    run_as(cfg, grid, read_twice)
    run_as(cfg, asmith, denied)
    recs = [json.loads(line) for line in audit.read_text().splitlines()]
    opens = [r for r in recs if r["action"] == "open" and r["resource"].get("kind")]
    assert [(r["sub"], r["decision"], r["resource"]["kind"]) for r in opens] == [
        ("svc-grid", "allow", "volume"),
        ("svc-grid", "allow", "volume"),
        ("asmith", "deny", "sidecar"),
    ]
    assert [r.get("cached") for r in opens[:2]] == [False, True]
    assert opens[0]["resource"]["series_uid"] == i.series_uid
    assert opens[0]["resource"]["volume_uid"].startswith("2.25.")
    assert opens[0]["key_level"] and opens[0]["view"] == "deidentified"
