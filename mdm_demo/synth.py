"""Synthetic, realistic DICOM patients for tests, ``mdm demo`` and the benchmark.

Everything is deterministic in ``seed`` (and ``site_tag``): names, dates, UIDs and pixels come
from seeded generators, so a rerun produces the same files byte for byte. The patients carry
the PHI fields a de-identification test hunts for (name, ID, birth date, accession number,
institution, referring physician, ...) and some are enrolled in a clinical trial
(``ClinicalTrialProtocolID``) for policy tests. Pixels are a 3-D phantom (ellipsoids of
tissue-like values, cut per slice, plus mild noise), so every instance has its own content.

All of it is fake: the names are drawn from short lists of common names.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    PYDICOM_ROOT_UID,
    UID,
    ExplicitVRLittleEndian,
    generate_uid,
)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
TRIAL_PROTOCOL = "NANT-2007-01"
"""The clinical trial some generated patients are enrolled in (every even patient index)."""

_FEMALE = ("JANE", "MARY", "ANNA", "LINDA", "SUSAN", "EMMA", "OLIVIA", "SOPHIE", "CLARA", "NORA")
_MALE = ("JOHN", "JAMES", "ROBERT", "DAVID", "PAUL", "MARK", "LUCAS", "NOAH", "OSCAR", "HENRY")
_LAST = (
    "DOE",
    "SMITH",
    "JOHNSON",
    "BROWN",
    "GARCIA",
    "MILLER",
    "DAVIS",
    "MARTIN",
    "LEFEBVRE",
    "ROSSI",
    "MULLER",
    "NGUYEN",
    "KOWALSKI",
    "OKAFOR",
    "TANAKA",
    "SILVA",
)
_PHYSICIANS = ("HOUSE^GREGORY", "GREY^MEREDITH", "CARTER^JOHN", "ROSS^DOUG", "QUINN^MICHAELA")
_INSTITUTIONS = (
    "SAINT LUKE CHILDRENS HOSPITAL",
    "LAKESIDE UNIVERSITY MEDICAL CENTER",
    "NORTH VALLEY CANCER INSTITUTE",
    "RIVERSIDE GENERAL HOSPITAL",
)
_STUDY_DESCRIPTIONS = (
    "NEUROBLASTOMA STAGING",
    "ONCOLOGY FOLLOW-UP",
    "ABDOMEN PELVIS W CONTRAST",
    "CHEST ABDOMEN RESPONSE ASSESSMENT",
)

# Ellipsoids of the phantom in normalised coordinates (x, y, z in [-1, 1]):
# (cx, cy, cz, semi-axis a, b, c, rotation in degrees, CT value in HU, MR signal).
# Painted in order, so later (inner) structures overwrite earlier ones.
_PHANTOM: tuple[tuple[float, float, float, float, float, float, float, int, int], ...] = (
    (0.00, 0.00, 0.00, 0.86, 0.66, 1.60, 0, 40, 420),  # body, soft tissue
    (0.00, 0.00, 0.00, 0.80, 0.60, 1.60, 0, -90, 900),  # subcutaneous fat ring (inner cut)
    (0.00, 0.02, 0.00, 0.76, 0.56, 1.60, 0, 35, 400),  # muscle and organs
    (-0.32, -0.12, 0.55, 0.28, 0.34, 0.70, 12, -820, 30),  # right lung base
    (0.32, -0.12, 0.55, 0.26, 0.32, 0.70, -12, -820, 30),  # left lung base
    (-0.28, -0.05, -0.10, 0.34, 0.26, 0.55, -20, 62, 520),  # liver
    (0.30, 0.05, -0.35, 0.12, 0.16, 0.30, 10, 32, 610),  # left kidney
    (-0.30, 0.08, -0.38, 0.11, 0.15, 0.30, -10, 32, 610),  # right kidney
    (0.00, 0.36, 0.00, 0.09, 0.09, 1.60, 0, 700, 180),  # vertebral body
    (0.00, 0.22, 0.00, 0.05, 0.05, 1.60, 0, 210, 80),  # aorta (contrast)
    (0.14, -0.02, -0.22, 0.13, 0.11, 0.22, 30, 78, 980),  # adrenal mass (the tumour)
)
_CT_AIR = -1000
_CT_INTERCEPT = -1024
_MAX_STORED = 4095  # 12 bits stored in 16 allocated


@dataclass(frozen=True)
class GeneratedInstance:
    """One generated DICOM instance: where it is (file or bytes) and what identifies it."""

    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str
    instance_number: int
    path: Path | None = None
    data: bytes | None = field(default=None, repr=False)
    patient_name: str = ""
    birth_date: str = ""
    accession_number: str = ""
    trial: str | None = None
    """``ClinicalTrialProtocolID`` of the patient, or None if not enrolled."""

    def read(self) -> bytes:
        """The Part-10 file content (from memory or from ``path``)."""
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()


@dataclass(frozen=True)
class _Patient:
    patient_id: str
    name: str
    sex: str
    birth_date: str
    trial: str | None


@dataclass(frozen=True)
class _Study:
    uid: str
    date: str
    time: str
    accession: str
    study_id: str
    description: str
    institution: str
    physician: str


def _uid(seed: int, site_tag: str, *parts: object) -> str:
    """A deterministic UID under the pydicom root: SHA-512 of the seed, tag and path."""
    return str(generate_uid(PYDICOM_ROOT_UID, ["mdm-synth", str(seed), site_tag, *map(str, parts)]))


def _int_seed(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _date(rng: random.Random, first_year: int, last_year: int) -> str:
    return (
        f"{rng.randint(first_year, last_year):04d}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
    )


def _time(rng: random.Random) -> str:
    return f"{rng.randint(7, 19):02d}{rng.randint(0, 59):02d}{rng.randint(0, 59):02d}"


class _Phantom:
    """The per-series phantom: r^2 maps of every ellipse, computed once, cut per slice."""

    def __init__(self, rows: int, cols: int, modality: str, rng: np.random.Generator) -> None:
        self.rows = rows
        self.cols = cols
        self.mr = modality == "MR"
        # Normalised pixel centres; the phantom keeps its aspect on non-square images.
        span = max(rows, cols)
        y = ((np.arange(rows, dtype=np.float32) + 0.5) - rows / 2) / (span / 2)
        x = ((np.arange(cols, dtype=np.float32) + 0.5) - cols / 2) / (span / 2)
        xx, yy = np.meshgrid(x, y)
        self.shapes: list[tuple[npt.NDArray[np.float32], float, float, int]] = []
        # A per-patient anatomy: jitter centres and sizes a little.
        jitter = rng.uniform(-0.04, 0.04, size=(len(_PHANTOM), 4)).astype(np.float32)
        for k, (cx, cy, cz, a, b, c, deg, hu, mr) in enumerate(_PHANTOM):
            cxj, cyj = cx + float(jitter[k, 0]), cy + float(jitter[k, 1])
            aj, bj = a * (1 + float(jitter[k, 2])), b * (1 + float(jitter[k, 3]))
            th = np.deg2rad(deg)
            dx, dy = xx - cxj, yy - cyj
            u = (dx * np.cos(th) + dy * np.sin(th)) / aj
            v = (-dx * np.sin(th) + dy * np.cos(th)) / bj
            r2 = (u * u + v * v).astype(np.float32)
            value = mr if self.mr else hu - _CT_INTERCEPT
            self.shapes.append((r2, cz, c, value))
        self.background = 0 if self.mr else _CT_AIR - _CT_INTERCEPT
        # A bank of noise rows, sliced at a different offset per slice: noise at the cost of a
        # view instead of drawing rows*cols random numbers for every instance.
        sigma = 12.0 if self.mr else 8.0
        self.noise = np.rint(rng.normal(0.0, sigma, size=(2 * rows + 1, cols))).astype(np.int16)

    def slice(self, z: float, index: int) -> npt.NDArray[np.uint16]:
        """Stored values of the cut at normalised height ``z`` (``index`` picks the noise)."""
        img = np.full((self.rows, self.cols), self.background, dtype=np.int16)
        for r2, cz, c, value in self.shapes:
            lim = 1.0 - ((z - cz) / c) ** 2
            if lim > 0:
                np.putmask(img, r2 <= lim, value)
        # Offsets 1 + (index * 97) mod (rows) stay distinct for the first `rows` slices.
        off = 1 + (index * 97) % self.rows
        img += self.noise[off : off + self.rows]
        np.clip(img, 0, _MAX_STORED, out=img)
        return img.astype("<u2")


class _SeriesWriter:
    """One series: a base dataset mutated per instance and serialised at once (no copies)."""

    def __init__(
        self,
        *,
        seed: int,
        site_tag: str,
        patient: _Patient,
        study: _Study,
        series_number: int,
        modality: str,
        rows: int,
        cols: int,
        slices: int,
        rng: random.Random,
    ) -> None:
        self.seed = seed
        self.site_tag = site_tag
        self.patient = patient
        self.study = study
        self.modality = modality
        self.slices = slices
        self.rows = rows
        self.cols = cols
        self.series_uid = _uid(seed, site_tag, "series", study.uid, series_number)
        self.sop_class = CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE
        self.phantom = _Phantom(
            rows,
            cols,
            modality,
            np.random.default_rng(_int_seed(seed, site_tag, patient.patient_id, modality)),
        )
        fov = 350.0 if modality == "CT" else 300.0
        self.spacing = round(fov / max(rows, cols), 6)
        self.thickness = 2.5 if modality == "CT" else 5.0
        self.origin_x = -self.spacing * cols / 2
        self.origin_y = -self.spacing * rows / 2
        self.z0 = 0.5 * self.thickness * (slices - 1)
        self.ds = self._base(series_number, rng)

    def _base(self, series_number: int, rng: random.Random) -> Dataset:
        p, st = self.patient, self.study
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceCreationDate = st.date
        ds.InstanceCreationTime = st.time
        ds.SOPClassUID = self.sop_class
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = st.date
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = st.time
        ds.AccessionNumber = st.accession
        ds.Modality = self.modality
        ds.Manufacturer = "MDM SYNTHETIC"
        ds.InstitutionName = st.institution
        ds.InstitutionAddress = "1 HOSPITAL ROAD, SPRINGFIELD"
        ds.ReferringPhysicianName = st.physician
        ds.StationName = f"{self.modality}SCAN{rng.randint(1, 9)}"
        ds.StudyDescription = st.description
        if self.modality == "CT":
            ds.SeriesDescription = f"AX ABDOMEN {self.thickness}MM"
            ds.BodyPartExamined = "ABDOMEN"
        else:
            ds.SeriesDescription = "AX T1 POST GAD"
            ds.BodyPartExamined = "ABDOMEN"
        ds.OperatorsName = f"{rng.choice(_LAST)}^{rng.choice(_FEMALE + _MALE)}"
        ds.ManufacturerModelName = "PHANTOM 3000"
        ds.PatientName = p.name
        ds.PatientID = p.patient_id
        ds.PatientBirthDate = p.birth_date
        ds.PatientSex = p.sex
        ds.PatientAge = f"{max(0, int(st.date[:4]) - int(p.birth_date[:4])):03d}Y"
        ds.PatientWeight = str(round(rng.uniform(12, 95), 1))
        if p.trial:
            ds.ClinicalTrialSponsorName = "NEW APPROACHES TO NEUROBLASTOMA THERAPY"
            ds.ClinicalTrialProtocolID = p.trial
            ds.ClinicalTrialProtocolName = "NEUROBLASTOMA IMAGING"
            ds.ClinicalTrialSiteID = self.site_tag or "SITE01"
            ds.ClinicalTrialSiteName = st.institution
            ds.ClinicalTrialSubjectID = f"SUBJ-{p.patient_id[-4:]}"
        ds.SliceThickness = str(self.thickness)
        if self.modality == "CT":
            ds.KVP = "120"
            ds.ConvolutionKernel = "STANDARD"
        else:
            ds.ScanningSequence = "SE"
            ds.SequenceVariant = "SP"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "2D"
            ds.RepetitionTime = "500"
            ds.EchoTime = "12"
            ds.EchoTrainLength = "1"
            ds.MagneticFieldStrength = "1.5"
            ds.ImagingFrequency = "63.87"
            ds.ImagedNucleus = "1H"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = st.uid
        ds.SeriesInstanceUID = self.series_uid
        ds.StudyID = st.study_id
        ds.SeriesNumber = series_number
        ds.AcquisitionNumber = 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = _uid(
            self.seed, self.site_tag, "frame", self.series_uid, series_number
        )
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = self.rows
        ds.Columns = self.cols
        ds.PixelSpacing = [self.spacing, self.spacing]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        if self.modality == "CT":
            ds.WindowCenter = "40"
            ds.WindowWidth = "400"
            ds.RescaleIntercept = str(_CT_INTERCEPT)
            ds.RescaleSlope = "1"
            ds.RescaleType = "HU"
        else:
            ds.WindowCenter = "600"
            ds.WindowWidth = "1200"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = UID(self.sop_class)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        return ds

    def instances(self) -> Iterator[tuple[str, int, bytes]]:
        """Yield ``(sop_uid, instance_number, part10_bytes)`` for each slice, head to feet."""
        ds = self.ds
        for i in range(self.slices):
            sop = _uid(self.seed, self.site_tag, "sop", self.series_uid, i)
            z_mm = self.z0 - i * self.thickness
            # The phantom spans the series top to bottom whatever the slice count.
            z = 0.0 if self.slices == 1 else 0.95 - 1.9 * i / (self.slices - 1)
            ds.SOPInstanceUID = sop
            ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
            ds.InstanceNumber = i + 1
            ds.ImagePositionPatient = [round(self.origin_x, 4), round(self.origin_y, 4), z_mm]
            ds.SliceLocation = str(z_mm)
            ds.PixelData = self.phantom.slice(z, i).tobytes()
            yield sop, i + 1, to_bytes(ds)


def to_bytes(ds: Dataset) -> bytes:
    """Serialise ``ds`` (which must carry ``file_meta``) as a DICOM Part-10 file in memory."""
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _patients(n: int, seed: int, site_tag: str) -> list[_Patient]:
    rng = random.Random(f"mdm-synth-patients:{seed}:{site_tag}")
    out: list[_Patient] = []
    ids: set[str] = set()
    for i in range(n):
        sex = rng.choice("FM")
        first = rng.choice(_FEMALE if sex == "F" else _MALE)
        pid = f"MDM{rng.randrange(10**7):07d}"
        while pid in ids:
            pid = f"MDM{rng.randrange(10**7):07d}"
        ids.add(pid)
        out.append(
            _Patient(
                patient_id=pid,
                name=f"{rng.choice(_LAST)}^{first}",
                sex=sex,
                birth_date=_date(rng, 1950, 2014),
                trial=TRIAL_PROTOCOL if i % 2 == 0 else None,
            )
        )
    return out


def _emit(
    writer: _SeriesWriter,
    out_dir: Path | None,
    study: _Study,
    patient: _Patient,
) -> Iterator[GeneratedInstance]:
    series_dir = None
    if out_dir is not None:
        series_dir = out_dir / patient.patient_id / study.uid / writer.series_uid
        series_dir.mkdir(parents=True, exist_ok=True)
    for sop, number, data in writer.instances():
        path = None
        if series_dir is not None:
            path = series_dir / f"{sop}.dcm"
            path.write_bytes(data)
        yield GeneratedInstance(
            patient_id=patient.patient_id,
            study_uid=study.uid,
            series_uid=writer.series_uid,
            sop_uid=sop,
            sop_class_uid=writer.sop_class,
            modality=writer.modality,
            instance_number=number,
            path=path,
            data=data if path is None else None,
            patient_name=patient.name,
            birth_date=patient.birth_date,
            accession_number=study.accession,
            trial=patient.trial,
        )


def iter_generate(
    out_dir: Path | None,
    *,
    patients: int,
    seed: int,
    studies_per_patient: int = 1,
    ct_slices: int = 6,
    mr_slices: int = 4,
    rows: int = 128,
    cols: int = 128,
    site_tag: str = "",
) -> Iterator[GeneratedInstance]:
    """Like :func:`generate`, one instance at a time (for large sets)."""
    if rows < 8 or cols < 8:
        raise ValueError("images must be at least 8x8")
    for p_index, patient in enumerate(_patients(patients, seed, site_tag)):
        for s_index in range(studies_per_patient):
            rng = random.Random(f"mdm-synth-study:{seed}:{site_tag}:{p_index}:{s_index}")
            study = _Study(
                uid=_uid(seed, site_tag, "study", patient.patient_id, s_index),
                date=_date(rng, max(2010, int(patient.birth_date[:4]) + 1), 2024),
                time=_time(rng),
                accession=f"ACC{rng.randrange(10**8):08d}",
                study_id=str(rng.randint(1000, 9999)),
                description=rng.choice(_STUDY_DESCRIPTIONS),
                institution=(
                    f"{site_tag.upper()} MEDICAL CENTER" if site_tag else rng.choice(_INSTITUTIONS)
                ),
                physician=rng.choice(_PHYSICIANS),
            )
            for number, (modality, slices) in enumerate(
                (("CT", ct_slices), ("MR", mr_slices)), start=1
            ):
                if slices <= 0:
                    continue
                writer = _SeriesWriter(
                    seed=seed,
                    site_tag=site_tag,
                    patient=patient,
                    study=study,
                    series_number=number,
                    modality=modality,
                    rows=rows,
                    cols=cols,
                    slices=slices,
                    rng=rng,
                )
                yield from _emit(writer, out_dir, study, patient)


def generate(
    out_dir: Path | None,
    *,
    patients: int,
    seed: int,
    studies_per_patient: int = 1,
    ct_slices: int = 6,
    mr_slices: int = 4,
    rows: int = 128,
    cols: int = 128,
    site_tag: str = "",
) -> list[GeneratedInstance]:
    """Generate ``patients`` patients, each with studies of one CT and one MR series.

    With ``out_dir`` the files go to ``out_dir/<PatientID>/<StudyUID>/<SeriesUID>/<SOP>.dcm``
    and each instance carries its ``path``; with ``None`` they stay in memory (``data``).
    A series with 0 slices is left out. Even patient indices are enrolled in
    :data:`TRIAL_PROTOCOL`. Same arguments, same bytes; a different ``seed`` or ``site_tag``
    gives different patients and UIDs.
    """
    return list(
        iter_generate(
            out_dir,
            patients=patients,
            seed=seed,
            studies_per_patient=studies_per_patient,
            ct_slices=ct_slices,
            mr_slices=mr_slices,
            rows=rows,
            cols=cols,
            site_tag=site_tag,
        )
    )


def iter_series(
    out_dir: Path | None,
    *,
    count: int,
    rows: int = 512,
    cols: int = 512,
    seed: int = 0,
    modality: str = "CT",
    site_tag: str = "bench",
) -> Iterator[GeneratedInstance]:
    """Like :func:`generate_series`, one instance at a time (memory stays flat)."""
    if modality not in ("CT", "MR"):
        raise ValueError("modality must be CT or MR")
    (patient,) = _patients(1, seed, site_tag)
    rng = random.Random(f"mdm-synth-series:{seed}:{site_tag}")
    study = _Study(
        uid=_uid(seed, site_tag, "study", patient.patient_id, 0),
        date=_date(rng, 2015, 2024),
        time=_time(rng),
        accession=f"ACC{rng.randrange(10**8):08d}",
        study_id=str(rng.randint(1000, 9999)),
        description=rng.choice(_STUDY_DESCRIPTIONS),
        institution=rng.choice(_INSTITUTIONS),
        physician=rng.choice(_PHYSICIANS),
    )
    writer = _SeriesWriter(
        seed=seed,
        site_tag=site_tag,
        patient=patient,
        study=study,
        series_number=1,
        modality=modality,
        rows=rows,
        cols=cols,
        slices=count,
        rng=rng,
    )
    yield from _emit(writer, out_dir, study, patient)


def generate_series(
    out_dir: Path | None,
    *,
    count: int,
    rows: int = 512,
    cols: int = 512,
    seed: int = 0,
    modality: str = "CT",
    site_tag: str = "bench",
) -> list[GeneratedInstance]:
    """One series of ``count`` instances of one patient (the benchmark's workload).

    At 512x512 each file is about 0.5 MB; 300 instances take a few seconds.
    """
    return list(
        iter_series(
            out_dir,
            count=count,
            rows=rows,
            cols=cols,
            seed=seed,
            modality=modality,
            site_tag=site_tag,
        )
    )


def by_series(instances: Sequence[GeneratedInstance]) -> dict[str, list[GeneratedInstance]]:
    """Group instances by SeriesInstanceUID, in generation order."""
    out: dict[str, list[GeneratedInstance]] = {}
    for inst in instances:
        out.setdefault(inst.series_uid, []).append(inst)
    return out


def by_study(instances: Sequence[GeneratedInstance]) -> dict[str, list[GeneratedInstance]]:
    """Group instances by StudyInstanceUID, in generation order."""
    out: dict[str, list[GeneratedInstance]] = {}
    for inst in instances:
        out.setdefault(inst.study_uid, []).append(inst)
    return out
