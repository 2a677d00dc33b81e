"""De-identification (PS3.15 Annex E): the table, the engine, pseudonyms, options, refusals.

Pure unit tests: no servers. The PHI object is built from the table data itself, so every
attribute Table E.1-1 lists that can hold text, a date or a UID carries a distinctive value.
"""

from __future__ import annotations

import datetime as dt
import errno
import io
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_files
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from mdm.deid import (
    DeidMalformed,
    DeidOptions,
    DeidRefused,
    Pseudonymizer,
    deidentify,
    deidentify_attrs,
    edition,
    load_table,
    map_uid,
    pseudonym,
)
from mdm.errors import MdmError
from mdm_demo import synth

SECRET = b"scope-secret-trial-A-0123456789"
OTHER = b"scope-secret-trial-B-9876543210"
CT = "1.2.840.10008.5.1.4.1.1.2"
SC = "1.2.840.10008.5.1.4.1.1.7"

TEXT_VRS = {"AE", "CS", "LO", "LT", "SH", "ST", "UC", "UT", "UR", "PN"}
BINARY_VRS = {"OB", "OW", "OD", "OF", "OL", "OV", "UN"}
# VRs that cannot carry text, a date or a UID, so a distinctive PHI value cannot be planted in
# them (or could not be byte-searched without false hits): numbers, ages, tags.
SKIPPED_VRS = {"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV", "IS", "DS", "AS", "AT"}
LEVELS = "ABC"  # top level, in a sequence item, in an item of a sequence inside that item


def _read_quiet(data: bytes, force: bool = False) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(io.BytesIO(data), force=force)


def _strict_read(data: bytes) -> Dataset:
    """Read and parse every element with any warning turned into an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = dcmread(io.BytesIO(data))
        for _ in ds.iterall():
            pass
        for _ in ds.file_meta:
            pass
    return ds


def _to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------
# The PHI object


class PhiObject:
    """A CT object with a distinctive PHI value in every table attribute that can hold one."""

    def __init__(self) -> None:
        self.tokens: list[bytes] = []
        self.skipped: list[str] = []
        self.planted = 0
        self.pixels = bytes(range(256)) * 2  # 16x16 8-bit, recognisable

    def _plant(self, ds: Dataset, tag: int, vr: str, idx: int, level: str, code: str = "") -> bool:
        lvl = LEVELS.index(level)
        text = f"PHI{idx:03d}{level}"
        if vr in TEXT_VRS:
            value: object = text if vr != "PN" else f"{text}^GIVEN{idx:03d}{level}"
            self.tokens.append(text.encode())
            if vr == "PN":
                self.tokens.append(f"GIVEN{idx:03d}{level}".encode())
        elif vr in ("DA", "DT", "TM"):
            day = dt.date(1800, 1, 1) + dt.timedelta(days=idx * 3 + lvl)
            da = f"{day:%Y%m%d}"
            if vr == "TM":
                value = f"12{lvl:02d}00.{idx:06d}"
                self.tokens.append(str(value).encode())
            else:
                value = da if vr == "DA" else da + "101500"
                self.tokens.append(da.encode())
        elif vr == "UI":
            # Fixed width, so no planted UID is a prefix of another.
            value = f"1.2.826.0.1.3680043.10.999.1{idx:03d}{lvl}"
            self.tokens.append(str(value).encode())
        elif vr in BINARY_VRS:
            value = (text.encode() + b"\0" * 8)[:8]
            self.tokens.append(text.encode())
        elif vr == "SQ":
            item = Dataset()
            item.PersonName = f"SQN{idx:03d}{level}"
            item.InstitutionName = f"SQI{idx:03d}{level}"
            item.TextValue = f"SQT{idx:03d}{level}"  # not in the table: free text
            self.tokens.append(f"SQT{idx:03d}{level}".encode())
            if code in ("D", "X/D", "X/Z/D", "Z/D"):
                # A dummy sequence must not keep what its items hold, listed or not.
                item.CodeMeaning = f"SQC{idx:03d}{level}"
                self.tokens.append(f"SQC{idx:03d}{level}".encode())
            item.UID = f"1.2.826.0.1.3680043.10.998.1{idx:03d}{lvl}"
            self.tokens += [f"SQN{idx:03d}{level}".encode(), f"SQI{idx:03d}{level}".encode()]
            self.tokens.append(item.UID.encode())
            value = Sequence([item])
        else:
            return False
        ds.add(DataElement(tag, vr, value))
        return True

    def fill(self, ds: Dataset, level: str) -> None:
        """Plant a PHI value in every table attribute of ``ds`` (level A, B or C)."""
        for idx, row in enumerate(load_table().rows):
            if row.tag == "PRIVATE" or row.tag.startswith("0000") or row.tag.startswith("0002"):
                continue  # private: planted separately; command and file meta groups: no
            tag = int(row.tag.replace("x", "0"), 16)
            try:
                vr = dictionary_VR(tag).split(" or ")[0]
            except KeyError:
                if level == "A":
                    self.skipped.append(f"{row.tag} {row.name}: not in pydicom's dictionary")
                continue
            if vr in SKIPPED_VRS:
                if level == "A":
                    self.skipped.append(f"{row.tag} {row.keyword}: VR {vr}")
                continue
            if self._plant(ds, tag, vr, idx, level, row.codes["basic"]):
                self.planted += 1
        # Beyond the table (the fail-safe rules): a person name, dates, an attribute unknown to
        # the dictionary, an overlay description.
        for j, (tag, vr) in enumerate(
            (
                (0x00140104, "PN"),  # SecondaryReviewerName
                (0x00140102, "DA"),  # SecondaryReviewDate
                (0x0008041F, "DT"),  # StudyUpdateDateTime
                (0x00441234, "LO"),  # no such public attribute
                (0x60000022, "LO"),  # OverlayDescription
                (0x0040A160, "UT"),  # TextValue
            )
        ):
            assert load_table().rows and f"{tag:08X}" not in {r.tag for r in load_table().rows}
            self._plant(ds, tag, vr, 800 + j, level)
        # Private attributes: text, a name, a date, a UID and a private sequence.
        block = ds.private_block(0x0011, f"PHI CREATOR {level}", create=True)
        for off, vr in ((1, "LO"), (2, "PN"), (3, "DA"), (4, "UI"), (5, "SQ")):
            self._plant(ds, block.get_tag(off), vr, 900 + off, level)

    def build(self) -> Dataset:
        """The whole object: level A at the top, B and C nested in a non-table sequence."""
        top = Dataset()
        self.fill(top, "A")
        inner = Dataset()
        self.fill(inner, "C")
        mid = Dataset()
        self.fill(mid, "B")
        # Sequences the table does not list: kept, so the walk must go inside them.
        mid.ReferencedSeriesSequence = Sequence([inner])
        top.ReferencedSeriesSequence = Sequence([mid])
        top.SpecificCharacterSet = "ISO_IR 100"
        top.SOPClassUID = CT
        top.Modality = "CT"
        top.BurnedInAnnotation = "NO"
        top.SamplesPerPixel = 1
        top.PhotometricInterpretation = "MONOCHROME2"
        top.Rows = 16
        top.Columns = 32
        top.BitsAllocated = 8
        top.BitsStored = 8
        top.HighBit = 7
        top.PixelRepresentation = 0
        top.PixelData = self.pixels
        top.file_meta = FileMetaDataset()
        top.file_meta.MediaStorageSOPClassUID = UID(CT)
        top.file_meta.MediaStorageSOPInstanceUID = top.SOPInstanceUID
        top.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return top

    def leaks(self, data: bytes) -> list[str]:
        """Every PHI value found in ``data``.

        The remapped UIDs are taken out first: a planted date is a bare run of 8 digits and
        could otherwise turn up by chance inside a 39-digit ``2.25.`` UID.
        """
        data = re.sub(rb"2\.25\.[0-9]+", b"", data)
        return [t.decode() for t in self.tokens if t in data]


@pytest.fixture(scope="module")
def phi() -> tuple[PhiObject, bytes]:
    obj = PhiObject()
    ds = obj.build()
    return obj, _to_bytes(ds)


def test_phi_object_really_carries_phi(phi: tuple[PhiObject, bytes]) -> None:
    """The fixture is meaningful: every planted value is in the input."""
    obj, data = phi
    assert obj.planted > 3 * 450, obj.planted
    assert obj.leaks(data) == [t.decode() for t in obj.tokens]
    assert len(set(obj.tokens)) == len(obj.tokens)
    # What could not be planted is only what the test cannot search for (listed for review).
    assert all("VR" in s or "dictionary" in s for s in obj.skipped)
    assert len(obj.skipped) < 150


def test_basic_profile_removes_every_phi_value(phi: tuple[PhiObject, bytes]) -> None:
    obj, data = phi
    out = deidentify(data, secret=SECRET, options=DeidOptions())
    assert obj.leaks(out) == []
    ds = _strict_read(out)
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.DeidentificationMethod[0].startswith("MDM PS3.15 2025b")
    codes = [(i.CodeValue, i.CodingSchemeDesignator) for i in ds.DeidentificationMethodCodeSequence]
    assert codes == [("113100", "DCM")]
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"
    assert ds.PatientID == pseudonym("PHI" + _row_index("PatientID") + "A", secret=SECRET)
    for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert str(ds[kw].value).startswith("2.25."), kw
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.SOPClassUID == CT and ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.PixelData == obj.pixels
    # The non-table sequences were kept and walked, two levels deep; no private data is left.
    inner = ds.ReferencedSeriesSequence[0].ReferencedSeriesSequence[0]
    assert str(inner.SOPInstanceUID).startswith("2.25.")
    assert not any(e.tag.is_private for e in ds.iterall())


def _row_index(keyword: str) -> str:
    for i, row in enumerate(load_table().rows):
        if row.keyword == keyword:
            return f"{i:03d}"
    raise KeyError(keyword)


def test_metadata_attrs_carry_no_phi(phi: tuple[PhiObject, bytes]) -> None:
    """deidentify_attrs over the string attributes of the PHI object (the .metadata.json)."""
    obj, data = phi
    ds = _read_quiet(data)
    attrs = {
        e.keyword: "\\".join(map(str, e.value)) if e.VM > 1 else str(e.value)
        for e in ds
        if e.keyword and e.VR not in ("SQ", *BINARY_VRS, *SKIPPED_VRS)
    }
    assert len(attrs) > 300
    out = deidentify_attrs("IMAGE", attrs, secret=SECRET, options=DeidOptions())
    assert obj.leaks(json.dumps(out).encode()) == []
    served = _strict_read(deidentify(data, secret=SECRET, options=DeidOptions()))
    for kw in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert out[kw] == str(served[kw].value), kw
    assert "PatientBirthDate" not in out or out["PatientBirthDate"] == ""
    assert "NotADicomKeyword" not in deidentify_attrs(
        "STUDY", {"NotADicomKeyword": "x"}, secret=SECRET, options=DeidOptions()
    )


def test_no_phi_in_logs(phi: tuple[PhiObject, bytes], caplog: pytest.LogCaptureFixture) -> None:
    obj, data = phi
    caplog.set_level(logging.DEBUG)
    deidentify(data, secret=SECRET, options=DeidOptions())
    with pytest.raises(DeidRefused):
        deidentify(data[: len(data) // 2], secret=SECRET, options=DeidOptions())
    assert obj.leaks(caplog.text.encode()) == []
    assert SECRET.decode() not in caplog.text


# ------------------------------------------------------------------------------------------
# A study: consistency of UIDs and references


@pytest.fixture(scope="module")
def study() -> list[bytes]:
    """One patient, one study, three series: CT (3), MR (2) and a derived series referencing
    the CT images (SourceImageSequence, ReferencedImageSequence)."""
    insts = synth.generate(None, patients=1, seed=7, ct_slices=3, mr_slices=2, rows=16, cols=16)
    files = [i.read() for i in insts]
    ct = [_read_quiet(f) for f in files if _read_quiet(f).Modality == "CT"]
    derived = _read_quiet(files[0])
    derived.SeriesInstanceUID = "1.2.826.0.1.3680043.10.555.1"
    derived.SeriesNumber = 3
    derived.SOPInstanceUID = "1.2.826.0.1.3680043.10.555.1.1"
    derived.file_meta.MediaStorageSOPInstanceUID = derived.SOPInstanceUID
    derived.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    refs = []
    for c in ct:
        item = Dataset()
        item.ReferencedSOPClassUID = c.SOPClassUID
        item.ReferencedSOPInstanceUID = c.SOPInstanceUID
        refs.append(item)
    derived.SourceImageSequence = Sequence(refs)
    derived.ReferencedImageSequence = Sequence([refs[0]])
    return [*files, _to_bytes(derived)]


def _deid_all(files: list[bytes], secret: bytes, options: DeidOptions) -> list[Dataset]:
    return [_strict_read(deidentify(f, secret=secret, options=options)) for f in files]


def test_study_uids_consistent_and_references_resolve(study: list[bytes]) -> None:
    orig = [_read_quiet(f) for f in study]
    out = _deid_all(study, SECRET, DeidOptions())
    assert len({str(d.StudyInstanceUID) for d in out}) == 1
    assert len({str(d.SeriesInstanceUID) for d in out}) == 3
    assert len({str(d.SOPInstanceUID) for d in out}) == len(study)
    assert len({str(d.PatientID) for d in out}) == 1
    by_series: dict[str, set[str]] = {}
    for o, d in zip(orig, out, strict=True):
        assert d.StudyInstanceUID == map_uid(o.StudyInstanceUID, secret=SECRET)
        assert d.SOPInstanceUID == map_uid(o.SOPInstanceUID, secret=SECRET)
        assert d.SOPInstanceUID != o.SOPInstanceUID
        assert d.PixelData == o.PixelData
        by_series.setdefault(str(d.SeriesInstanceUID), set()).add(str(d.FrameOfReferenceUID))
    assert all(len(f) == 1 for f in by_series.values())
    derived = out[-1]
    ct_sops = {str(d.SOPInstanceUID) for d in out if d.Modality == "CT"} - {
        str(derived.SOPInstanceUID)
    }
    refs = {str(i.ReferencedSOPInstanceUID) for i in derived.SourceImageSequence}
    assert refs == ct_sops  # every reference resolves to a de-identified CT image
    assert {str(i.ReferencedSOPClassUID) for i in derived.SourceImageSequence} == {CT}
    assert str(derived.ReferencedImageSequence[0].ReferencedSOPInstanceUID) in ct_sops


def test_same_secret_same_output_other_secret_unlinkable(study: list[bytes]) -> None:
    first = [deidentify(f, secret=SECRET, options=DeidOptions()) for f in study]
    again = [deidentify(f, secret=SECRET, options=DeidOptions()) for f in study]
    assert first == again
    a = [_strict_read(b) for b in first]
    b = _deid_all(study, OTHER, DeidOptions())
    for x, y in zip(a, b, strict=True):
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID"):
            assert x[kw].value != y[kw].value, kw
        assert x.PixelData == y.PixelData


# ------------------------------------------------------------------------------------------
# Every sample object goes through or is refused clearly


def _pydicom_samples() -> Iterator[str]:
    for path in get_testdata_files():
        if os.path.isfile(path):
            yield path


ALL_ON = DeidOptions(
    retain_longitudinal="offset",
    retain_patient_characteristics=True,
    retain_device_identity=True,
    retain_institution_identity=True,
    clean_descriptors=True,
    retain_safe_private=True,
    allow_burned_in=True,
)


@pytest.mark.parametrize("options", [DeidOptions(), ALL_ON], ids=["basic", "all-options"])
def test_pydicom_samples_and_generated_data_go_through(options: DeidOptions) -> None:
    outcomes: dict[str, int] = {"ok": 0, "refused": 0}
    for path in _pydicom_samples():
        with open(path, "rb") as fh:
            data = fh.read()
        try:
            out = deidentify(data, secret=SECRET, options=options)
        except DeidRefused as exc:
            assert str(exc), path  # a reason, always
            assert exc.errno in (errno.EACCES, errno.EIO)
            outcomes["refused"] += 1
            continue
        ds = _read_quiet(out)
        assert ds.PatientIdentityRemoved == "YES", path
        orig = _read_quiet(data, force=True)  # some samples have no file meta
        if "PixelData" in orig:
            assert ds.PixelData == orig.PixelData, path
        if "TransferSyntaxUID" in orig.file_meta:
            assert ds.file_meta.TransferSyntaxUID == orig.file_meta.TransferSyntaxUID, path
        outcomes["ok"] += 1
    # Most samples are ordinary images; with allow_burned_in the captures go through too.
    assert outcomes["ok"] > (80 if options == DeidOptions() else 120), outcomes
    for inst in synth.generate(None, patients=3, seed=3, ct_slices=2, mr_slices=2, rows=16):
        out = deidentify(inst.read(), secret=SECRET, options=options)
        assert inst.patient_name.encode() not in out
        assert inst.patient_id.encode() not in out
        assert inst.accession_number.encode() not in out


def test_malformed_input_is_refused_never_partial(study: list[bytes]) -> None:
    for bad in (b"", b"not dicom at all", study[0][:300], study[0][: len(study[0]) // 2]):
        with pytest.raises(DeidMalformed) as info:
            deidentify(bad, secret=SECRET, options=DeidOptions())
        assert info.value.errno == errno.EIO
        assert isinstance(info.value, DeidRefused) and isinstance(info.value, MdmError)


# ------------------------------------------------------------------------------------------
# Burned-in annotation


def _with(data: bytes, **attrs: object) -> bytes:
    ds = _read_quiet(data)
    for k, v in attrs.items():
        if v is None:
            del ds[k]
        else:
            setattr(ds, k, v)
    if "SOPClassUID" in attrs:
        ds.file_meta.MediaStorageSOPClassUID = UID(str(attrs["SOPClassUID"]))
    return _to_bytes(ds)


def test_burned_in_objects_refused_unless_allowed(study: list[bytes]) -> None:
    flagged = _with(study[0], BurnedInAnnotation="YES")
    with pytest.raises(DeidRefused, match="BurnedInAnnotation=YES") as info:
        deidentify(flagged, secret=SECRET, options=DeidOptions())
    assert info.value.errno == errno.EACCES
    assert deidentify(flagged, secret=SECRET, options=DeidOptions(allow_burned_in=True))
    sc = _with(study[0], SOPClassUID=SC)
    with pytest.raises(DeidRefused, match="burned-in"):
        deidentify(sc, secret=SECRET, options=DeidOptions())
    sc_clean = _with(study[0], SOPClassUID=SC, BurnedInAnnotation="NO")
    assert _strict_read(deidentify(sc_clean, secret=SECRET, options=DeidOptions()))
    faces = _with(study[0], RecognizableVisualFeatures="YES")
    with pytest.raises(DeidRefused):
        deidentify(faces, secret=SECRET, options=DeidOptions())


# ------------------------------------------------------------------------------------------
# Options


def test_date_offset_same_for_all_objects_of_a_patient() -> None:
    insts = synth.generate(
        None, patients=3, seed=11, studies_per_patient=2, ct_slices=2, mr_slices=1, rows=16
    )
    opts = DeidOptions(retain_longitudinal="offset")
    offsets: dict[str, set[int]] = {}
    for inst in insts:
        o = _read_quiet(inst.read())
        d = _strict_read(deidentify(inst.read(), secret=SECRET, options=opts))
        delta = (
            dt.datetime.strptime(d.StudyDate, "%Y%m%d")
            - dt.datetime.strptime(o.StudyDate, "%Y%m%d")
        ).days
        offsets.setdefault(inst.patient_id, set()).add(delta)
        assert d.StudyTime == o.StudyTime  # times kept
        assert d.PatientBirthDate == ""  # Z in every column: not a longitudinal date
        assert d.LongitudinalTemporalInformationModified == "MODIFIED"
        assert "113107" in [i.CodeValue for i in d.DeidentificationMethodCodeSequence]
        attrs = deidentify_attrs(
            "STUDY",
            {
                "PatientID": o.PatientID,
                "StudyDate": o.StudyDate,
                "StudyInstanceUID": o.StudyInstanceUID,
            },
            secret=SECRET,
            options=opts,
        )
        assert attrs["StudyDate"] == d.StudyDate  # the listing agrees with the object
    for pid, deltas in offsets.items():
        assert len(deltas) == 1, pid
        (delta,) = deltas
        assert delta == Pseudonymizer(SECRET).date_offset(pid)
        assert -3652 <= delta <= -1
    assert len({next(iter(v)) for v in offsets.values()}) > 1


def test_options_change_the_output_as_documented(study: list[bytes]) -> None:
    base = _with(
        study[0],
        SeriesDescription="FOLLOW-UP OF {} AFTER SURGERY".format(
            str(_read_quiet(study[0]).PatientName).split("^")[0]
        ),
        DeviceSerialNumber="SN-4711",
    )
    orig = _read_quiet(base)
    plain = _strict_read(deidentify(base, secret=SECRET, options=DeidOptions()))
    assert plain.StudyDate == "" and "PatientAge" not in plain and plain.PatientSex == ""
    assert plain.StationName == "ANONYMIZED" and plain.InstitutionName == "ANONYMIZED"
    assert "SeriesDescription" not in plain and plain.DeviceSerialNumber == "ANONYMIZED"

    def run(**kw: object) -> Dataset:
        return _strict_read(deidentify(base, secret=SECRET, options=DeidOptions(**kw)))  # type: ignore[arg-type]

    def codes(ds: Dataset) -> list[str]:
        return [i.CodeValue for i in ds.DeidentificationMethodCodeSequence]

    full = run(retain_longitudinal="full")
    assert full.StudyDate == orig.StudyDate and full.StudyTime == orig.StudyTime
    assert codes(full) == ["113100", "113106"]
    chars = run(retain_patient_characteristics=True)
    assert (chars.PatientSex, chars.PatientAge, chars.PatientWeight) == (
        orig.PatientSex,
        orig.PatientAge,
        orig.PatientWeight,
    )
    assert codes(chars) == ["113100", "113108"]
    dev = run(retain_device_identity=True)
    assert dev.StationName == orig.StationName and dev.DeviceSerialNumber == "SN-4711"
    assert codes(dev) == ["113100", "113109"]
    inst = run(retain_institution_identity=True)
    assert inst.InstitutionName == orig.InstitutionName
    assert codes(inst) == ["113100", "113112"]
    uids = run(retain_uids=True)
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        assert uids[kw].value == orig[kw].value
    assert uids.file_meta.MediaStorageSOPInstanceUID == orig.SOPInstanceUID
    assert codes(uids) == ["113100", "113110"]
    clean = run(clean_descriptors=True)
    name = str(orig.PatientName).split("^")[0]
    assert clean.SeriesDescription == "FOLLOW-UP OF * AFTER SURGERY", name
    assert clean.StudyDescription == orig.StudyDescription
    assert codes(clean) == ["113100", "113105"]
    # Options never bring back what no option covers.
    for ds in (full, chars, dev, inst, uids, clean):
        assert str(ds.PatientName) == "" and ds.PatientID != orig.PatientID
        assert orig.AccessionNumber not in str(ds.get("AccessionNumber", ""))


def test_retain_safe_private_keeps_only_listed_numeric_elements(study: list[bytes]) -> None:
    ds = _read_quiet(study[1])
    siemens = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    siemens.add_new(0x0C, "IS", "1000")  # B_value: on the safe list
    siemens.add_new(0x0B, "LO", "PRIVNAME")  # not on the list
    ge = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
    ge.add_new(0x39, "LO", "DOE JOHN")  # listed, but not of the listed VR: removed
    other = ds.private_block(0x0029, "ACME PRIVATE", create=True)
    other.add_new(0x01, "LO", "PRIVSECRET")
    data = _to_bytes(ds)
    off = _strict_read(deidentify(data, secret=SECRET, options=DeidOptions()))
    assert not any(e.tag.is_private for e in off)
    on_bytes = deidentify(data, secret=SECRET, options=DeidOptions(retain_safe_private=True))
    on = _strict_read(on_bytes)
    kept = {(e.tag.group, e.tag.element & 0xFF): e.value for e in on if e.tag.is_private}
    assert kept[(0x0019, 0x0C)] == "1000"
    assert kept[(0x0019, 0x10)] == "SIEMENS MR HEADER"  # its creator, so it still reads
    assert b"PRIVNAME" not in on_bytes and b"PRIVSECRET" not in on_bytes
    assert b"DOE JOHN" not in on_bytes and b"GEMS_PARM_01" not in on_bytes
    assert b"ACME PRIVATE" not in on_bytes
    assert "113111" in [i.CodeValue for i in on.DeidentificationMethodCodeSequence]


# ------------------------------------------------------------------------------------------
# Pseudonyms and the table


def test_pseudonyms() -> None:
    p, q = Pseudonymizer(SECRET), Pseudonymizer(OTHER)
    pid = p.patient_id("MDM0012345")
    assert re.fullmatch(r"P[A-Z2-7]{16}", pid)
    assert pid == p.patient_id("MDM0012345") != q.patient_id("MDM0012345")
    assert pid != p.patient_id("MDM0012346")
    uid = p.uid("1.2.3.4.5")
    assert re.fullmatch(r"2\.25\.(0|[1-9][0-9]*)", uid) and len(uid) <= 64
    assert uid == map_uid("1.2.3.4.5", secret=SECRET) != q.uid("1.2.3.4.5")
    assert int(uid[5:]) < 2**128
    assert map_uid(CT, secret=SECRET) == CT  # well-known UIDs are not remapped
    assert p.date_offset("MDM0012345") == p.date_offset("MDM0012345")
    assert -3652 <= p.date_offset("X") <= -1
    assert "scope-secret" not in repr(p)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Pseudonymizer(b"short")


def test_table_is_the_standard_as_data() -> None:
    table = load_table()
    assert edition() == "DICOM PS3.15 2025b Table E.1-1"
    rows = {r.keyword: r for r in table.rows if r.keyword}
    assert len(table.rows) > 600
    assert rows["PatientName"].codes["basic"] == "Z"
    assert rows["PatientID"].codes["basic"] == "Z/D"
    assert rows["SOPInstanceUID"].codes["basic"] == "U"
    assert rows["SOPInstanceUID"].codes["rtn_uids"] == "K"
    assert rows["ReferencedImageSequence"].codes["basic"] == "X/Z/U*"
    assert rows["StudyDate"].codes["rtn_long_modified_dates"] == "C"
    assert rows["InstitutionName"].codes["rtn_institution_identity"] == "K"
    assert any(r.tag == "PRIVATE" for r in table.rows)
    assert any(r.tag == "60xx3000" for r in table.rows)
    with pytest.raises(ValueError):
        DeidOptions(retain_longitudinal="yes")  # type: ignore[arg-type]
