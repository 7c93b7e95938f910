"""Deterministic synthetic DICOM sample sets with planted FAKE identifiers.

The files are built from real images that ship inside pydicom
(``pydicom.data.get_testdata_file``): their pixel data and most technical attributes
are kept as they are, while every patient-, study- and staff-identifying attribute is
overwritten with an invented value. The same invented values are also hidden in the
places de-identification tends to miss: free text (descriptions, comments), nested
sequences (``OtherPatientIDsSequence``, ``RequestAttributesSequence`` two levels
deep), a private block and, for the NM template, a vendor (GE) private tag.

Everything planted is reported by :class:`SampleSet` so tests and benchmarks can scan
the de-identified output for canaries (:meth:`SampleSet.planted_values`).

Optionally a share of the files are full size 512x512 16-bit CT slices with numpy
generated pixel data (a body phantom plus noise), for realistic throughput tests.

All names, addresses, telephone numbers (Ofcom drama range 01632 960xxx) and NHS
numbers (999 test range, valid modulus-11 check digit) are invented. Output is
byte-for-byte identical for the same arguments. File names carry no identifiers.

Engine module: plain Python + pydicom + numpy, never imports apache_beam.

CLI::

    python -m dicom_deid.sample OUT_DIR --files 24 --patients 4 --seed 0 --ct512-share 0.0
"""

from __future__ import annotations

import argparse
import functools
import io
import sys
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

from . import text as _text

__all__ = [
    "PlantedPatient",
    "SampleSet",
    "generate",
    "nhs_check_digit",
    "is_valid_nhs_number",
    "PRIVATE_GROUP",
    "PRIVATE_CREATOR",
    "KINDS",
    "main",
]

#: Group and creator of the private block that holds planted values.
PRIVATE_GROUP = 0x0009
PRIVATE_CREATOR = "DEIDTEST PRIVATE"

# --------------------------------------------------------------------------------------
# Invented vocabularies. Deliberately odd so that they never collide with clinical
# words, DICOM dictionary text or the template files (a unit test checks the latter).
# --------------------------------------------------------------------------------------
_LAST_NAMES = (
    "QUIMBLEY", "VORTASHEN", "ZELNIKORR", "FENWODGE", "MALVERIQ", "OSTRAVELL",
    "PLIMSWORTHE", "TRUXBOLDT", "GRIBBLESNAP", "HAXWORTHY", "YARNSPITTLE", "DWERRYMORE",
    "KLOSSWINDER", "MUMBRECHTLY", "NETTLEFRODGE", "WOBBLECOMBE", "SPRANGLETHORN",
    "CRUMWHISTLE", "BLAXENDRAKE", "TWINDLEPOPE", "ORMSKETTLE", "PUDDIFRATT",
    "JUXONBERRY", "SKELLYWHORNE",
)
_FIRST_NAMES = (
    "ZARAPHINE", "ODALRIC", "MIRELDA", "THADWICK", "ELSPETRA", "CORVINIAN", "JESSAMYR",
    "BALTHAZINE", "PERRAGOLD", "WYNSELDA", "FALKWIN", "ISOLDRA", "MAGNERIC", "QUENTILDA",
    "RODERIX", "SAFFRELLA", "TIBBALDUS", "ULVERINE", "VESPERINE", "AMBROSETTE",
    "GWENDARIC", "HORTENSIO", "LUCASTRA", "NIMBERLY",
)
_STAFF_LAST = (
    "DRUMWELLOW", "PRITCHLOWE", "ABERNETHIX", "SNODGRAVEL", "WHITTLEBURNE", "CARRAWEIGH",
    "FOXHOLLOWAY", "MERRIWETHAN", "GOBBLESTONE", "HUMPERDALE",
)
_STAFF_FIRST = (
    "OSBERTINE", "HILDEGUNNA", "PERCIVALDO", "ROSAMUNDIA", "EGBERTUS", "WILFRIDA",
    "CUTHBERTO", "ETHELDRIDA",
)
# (name, address, short code for IssuerOfPatientID)
_INSTITUTIONS = (
    ("PELLINGROVE ROYAL INFIRMARY", "1 INFIRMARY ROAD, PELLINGROVE ZQ1 4XZ", "PRI"),
    ("ST QUENBURGA HOSPITAL", "40 CHAPELWICK STREET, WEXBURY XW2 7QJ", "SQH"),
    ("GRIMSTOKE UNIVERSITY HOSPITAL", "GRIMSTOKE PARK, GRIMSTOKE QV9 2LP", "GUH"),
    ("NORTH THRUSKETT MEDICAL CENTRE", "7 BARROWMEAD WAY, THRUSKETT ZQ8 3WD", "NTM"),
    ("MARROWFIELD COMMUNITY HOSPITAL", "MARROWFIELD LANE, MARROWFIELD XW5 6HB", "MCH"),
)
_STREETS = ("FENNIGRAVE", "HOBBLEDOWN", "QUARRINGTON", "WIMBLEMOOR", "SCRATCHLEY",
            "TUFFENHAM", "BRIMBLEWICK", "OTTERSNAITH")
_STREET_KINDS = ("LANE", "ROAD", "CLOSE", "CRESCENT", "GARDENS")
_TOWNS = (("PELLINGROVE", "ZQ"), ("WEXBURY", "XW"), ("GRIMSTOKE", "QV"), ("THRUSKETT", "ZQ"))

# Clinical vocabulary per study family: (study words, [series words]).
_FAMILY_TEXT = {
    "CT": (("CT CHEST", "CT ABDOMEN PELVIS", "CT THORAX"),
           ("AX 5mm", "AX 1.25mm lung", "COR MPR", "post contrast")),
    "MR": (("MR BRAIN", "MR HEAD", "MR KNEE"),
           ("T2 FSE", "T1 SE", "FLAIR", "DWI b1000")),
    "NM": (("NM BONE SCAN", "NM WHOLE BODY"), ("WB ANT", "WB POST")),
}
_SERIES_TEXT = {"rtdose": ("RT DOSE plan A", "RT DOSE boost")}

# --------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------
#: kind -> (pydicom test file, study family). "ct512" is synthetic (see _ct512_template).
KINDS: dict[str, tuple[str, str]] = {
    "ct": ("CT_small.dcm", "CT"),              # CT 128x128, explicit VR LE, GE private groups
    "mr": ("MR_small_implicit.dcm", "MR"),     # MR 64x64, implicit VR LE
    "nm": ("JPEG2000.dcm", "NM"),              # NM as SC, JPEG 2000, nested seqs, GE private
    "rtdose": ("rtdose_1frame.dcm", "CT"),     # RT Dose, implicit VR LE, sequences 3 deep
    "ct512": ("CT_small.dcm", "CT"),           # 512x512 int16 CT, pixels generated
}

_UID_NAMESPACE = uuid.UUID("6f0d1d5e-2f7b-5a8e-9c1e-0d1c0de1d000")
_DATE0 = np.datetime64("2019-01-07")


def _uid(seed: int, *parts: object) -> UID:
    """Deterministic ``2.25.<uuid>`` UID from a name-based (SHA-1) UUID.

    (``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`` ignores
    ``entropy_srcs`` and is random, so it cannot be used here.)
    """
    name = "/".join(["dicom_deid.sample", str(seed), *map(str, parts)])
    return UID(f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}")


@functools.lru_cache(maxsize=None)
def _template_bytes(kind: str) -> bytes:
    """Bytes of the template file for ``kind`` (read once per process)."""
    if kind == "ct512":
        return _ct512_template()
    raw = Path(get_testdata_file(KINDS[kind][0])).read_bytes()
    if kind != "rtdose":
        return raw
    # rtdose_1frame.dcm references its plan with an invalid UID ("...0123..."), which
    # makes pydicom warn on every access: swap it for a valid placeholder once.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(raw))
        ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID = "1.2.3.4"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _ct512_template() -> bytes:
    """CT_small.dcm metadata re-shaped to a 512x512 slice, without pixel data."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for tag in (0x7FE00010, 0xFFFCFFFC):  # PixelData, DataSetTrailingPadding
        if tag in ds:
            del ds[tag]
    ds.Rows = 512
    ds.Columns = 512
    ds.PixelSpacing = [0.703125, 0.703125]
    ds.ReconstructionDiameter = "360.0"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelPaddingValue = -2000
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _fresh(kind: str) -> Dataset:
    return pydicom.dcmread(io.BytesIO(_template_bytes(kind)))


@functools.lru_cache(maxsize=1)
def _grid() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Normalised x (1, 512), y (512, 1) and the constant spine / outside-FOV masks."""
    c = (np.arange(512, dtype=np.float32) - 255.5) / 256.0
    x, y = c[None, :], c[:, None]
    spine = x**2 + (y - 0.38) ** 2 <= 0.085**2
    outside_fov = x**2 + y**2 > 1.0
    return x, y, spine, outside_fov


def _ct512_pixels(seed: int, index: int, z: float) -> bytes:
    """An int16 axial CT-like slice: FOV circle, body ellipse, lungs, spine, noise.

    Stored values are HU + 1024 (RescaleIntercept -1024); outside the reconstruction
    circle the PixelPaddingValue -2000 is used. ``z`` in [0, 1] shapes the anatomy.
    """
    x, y, spine, outside_fov = _grid()
    rng = np.random.default_rng([seed, index, 512])
    img = np.zeros((512, 512), dtype=np.int16)  # air
    body_a, body_b = 0.78 - 0.08 * z, 0.56 - 0.05 * z
    img[(x / body_a) ** 2 + ((y + 0.05) / body_b) ** 2 <= 1.0] = 1024 + 40  # soft tissue
    s = 0.35 + 0.65 * np.sin(np.pi * min(max(z, 0.0), 1.0))  # lungs grow then shrink
    for cx in (-0.3, 0.3):
        lung = ((x - cx) / (0.17 * s + 0.01)) ** 2 + ((y + 0.04) / (0.27 * s + 0.01)) ** 2
        img[lung <= 1.0] = 1024 - 850
    img[spine] = 1024 + 700  # bone
    img += rng.integers(-18, 19, size=(512, 512), dtype=np.int16)
    img[outside_fov] = -2000
    return img.astype("<i2", copy=False).tobytes()


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlantedPatient:
    """Invented identity of one synthetic patient.

    ``other_values`` lists every other identifying string planted for this patient:
    the name in several written forms, surname and first name alone, NHS number
    (plain and spaced), address, telephone, accession numbers of all the patient's
    studies, institution name and address, referring/performing physicians and the
    operator.
    """

    patient_id: str
    patient_name: str
    birth_date: str
    other_values: tuple[str, ...]


@dataclass(frozen=True)
class SampleSet:
    root: Path
    files: tuple[Path, ...]
    patients: tuple[PlantedPatient, ...]

    def planted_values(self) -> frozenset[str]:
        """Every identifying string planted anywhere (length >= 4), for canary scans."""
        out: set[str] = set()
        for p in self.patients:
            out.update((p.patient_id, p.patient_name, p.birth_date, *p.other_values))
        return frozenset(v for v in out if len(v) >= 4)


def nhs_check_digit(first9: str) -> int | None:
    """Modulus-11 check digit for the first nine NHS number digits (None if invalid)."""
    if len(first9) != 9 or not first9.isdigit():
        raise ValueError("need exactly nine digits")
    return _text.nhs_check_digit(first9)


def is_valid_nhs_number(value: str) -> bool:
    return _text.nhs_valid(value.replace(" ", ""))


# --------------------------------------------------------------------------------------
# Planning (pure, cheap): who, which studies/series, how many files of which kind
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Patient:
    index: int
    last: str
    first: str
    patient_id: str
    birth_date: str
    sex: str
    nhs: str
    address: str
    phone: str
    institution: tuple[str, str, str]
    referring: str
    performing: str
    operator: str

    @property
    def pn(self) -> str:
        return f"{self.last}^{self.first}"

    @property
    def nhs_spaced(self) -> str:
        return f"{self.nhs[:3]} {self.nhs[3:6]} {self.nhs[6:]}"

    @property
    def natural(self) -> str:
        return f"{self.first} {self.last}"

    @property
    def mixed_case(self) -> str:
        return f"{self.first.title()} {self.last.title()}"


@dataclass
class _Study:
    patient: int
    number: int  # 1-based within the patient
    uid: UID
    accession: str
    date: str
    time: str
    family: str = "CT"
    description: str = ""


@dataclass
class _Series:
    study: _Study
    number: int  # 1-based within the study
    uid: UID
    for_uid: UID
    kind: str = ""
    n_files: int = 0
    description: str = ""


def _make_patients(rng: np.random.Generator, n: int) -> list[_Patient]:
    combos = [(l, f) for l in _LAST_NAMES for f in _FIRST_NAMES]
    if n > len(combos):
        raise ValueError(f"at most {len(combos)} patients supported")
    order = rng.permutation(len(combos))[:n]
    staff = [f"{l}^{f}" for l in _STAFF_LAST for f in _STAFF_FIRST]
    used_ids: set[str] = set()
    used_nhs: set[str] = set()
    patients = []
    for i, ci in enumerate(order):
        last, first = combos[int(ci)]
        while True:
            pid = f"RX{int(rng.integers(0, 10**7)):07d}"
            if pid not in used_ids:
                used_ids.add(pid)
                break
        while True:
            first9 = f"999{int(rng.integers(0, 10**6)):06d}"
            check = nhs_check_digit(first9)
            if check is not None and first9 + str(check) not in used_nhs:
                nhs = first9 + str(check)
                used_nhs.add(nhs)
                break
        year = int(rng.integers(1931, 2004))
        birth = f"{year}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
        town, area = _TOWNS[int(rng.integers(len(_TOWNS)))]
        postcode = (f"{area}{int(rng.integers(1, 10))} {int(rng.integers(1, 10))}"
                    f"{'ABDEFGHJLNPQRSTUWXYZ'[int(rng.integers(20))]}"
                    f"{'ABDEFGHJLNPQRSTUWXYZ'[int(rng.integers(20))]}")
        address = (f"{int(rng.integers(2, 199))} {_STREETS[int(rng.integers(len(_STREETS)))]} "
                   f"{_STREET_KINDS[int(rng.integers(len(_STREET_KINDS)))]}, {town} {postcode}")
        s = rng.choice(len(staff), size=3, replace=False)
        patients.append(_Patient(
            index=i, last=last, first=first, patient_id=pid, birth_date=birth,
            sex=("F", "M")[int(rng.integers(2))], nhs=nhs, address=address,
            phone=f"01632 960{int(rng.integers(0, 1000)):03d}",
            institution=_INSTITUTIONS[int(rng.integers(len(_INSTITUTIONS)))],
            referring=staff[int(s[0])], performing=staff[int(s[1])], operator=staff[int(s[2])],
        ))
    return patients


def _plan(seed: int, rng: np.random.Generator, patients: list[_Patient], n_files: int,
          n512: int) -> list[_Series]:
    """Studies (1-2 per patient) and series (1-2 per study), with kinds and file counts.

    Each series is homogeneous in kind; exactly ``n512`` files are ct512 slices.
    """
    n_other = n_files - n512
    used_acc: set[str] = set()
    layout: list[list[int]] = []  # per patient: series count of each study
    for _ in patients:
        layout.append([int(rng.integers(1, 3)) for _ in range(int(rng.integers(1, 3)))])
    # Never more series than files (each series holds >= 1 file) ...
    while sum(map(sum, layout)) > n_files:
        biggest = max(range(len(layout)), key=lambda i: (sum(layout[i]), -i))
        lay = layout[biggest]
        if lay[-1] > 1:
            lay[-1] -= 1
        else:
            lay.pop()
    # ... but at least two when both ct512 and other files are needed.
    if n512 and n_other and sum(map(sum, layout)) < 2:
        layout[0][0] = 2
    series: list[_Series] = []
    for p, lay in zip(patients, layout):
        for st_no, n_ser in enumerate(lay, start=1):
            while True:
                acc = f"ACN{int(rng.integers(0, 10**8)):08d}"
                if acc not in used_acc:
                    used_acc.add(acc)
                    break
            day = _DATE0 + np.timedelta64(int(rng.integers(0, 5 * 365)), "D")
            study = _Study(
                patient=p.index, number=st_no, uid=_uid(seed, "study", p.index, st_no),
                accession=acc, date=str(day).replace("-", ""),
                time=f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}"
                     f"{int(rng.integers(0, 60)):02d}",
            )
            for se_no in range(1, n_ser + 1):
                series.append(_Series(
                    study=study, number=se_no,
                    uid=_uid(seed, "series", p.index, st_no, se_no),
                    for_uid=_uid(seed, "for", p.index, st_no, se_no),
                ))
    n_ser = len(series)
    if n_ser == 0:
        return series
    # Number of ct512 series k: each kind group needs >= 1 series and >= 1 file/series.
    lo = max(n_ser - n_other, 1 if n512 else 0)
    hi = min(n512, n_ser - (1 if n_other else 0))
    k = min(max(int(round(n512 / n_files * n_ser)), lo), hi)
    ct512_idx = set(int(i) for i in rng.choice(n_ser, size=k, replace=False)) if k else set()
    for i, s in enumerate(series):
        if i in ct512_idx:
            s.kind = "ct512"
    # Study families and the remaining kinds.
    by_study: dict[int, list[_Series]] = {}
    for s in series:
        by_study.setdefault(id(s.study), []).append(s)
    for group in by_study.values():
        study = group[0].study
        if any(s.kind == "ct512" for s in group):
            study.family = "CT"
        else:
            study.family = ("CT", "MR", "NM")[int(rng.integers(3))]
        for j, s in enumerate(x for x in group if not x.kind):
            if study.family == "CT":
                s.kind = "ct" if j == 0 and not any(x.kind == "ct512" for x in group) else (
                    ("ct", "rtdose")[int(rng.integers(2))])
            else:
                s.kind = {"MR": "mr", "NM": "nm"}[study.family]
    # File counts: >= 1 per series, remainder spread at random within each kind group.
    for is512, total in ((True, n512), (False, n_other)):
        group = [s for s in series if (s.kind == "ct512") == is512]
        if not group:
            continue
        extra = rng.multinomial(total - len(group), [1.0 / len(group)] * len(group))
        for s, e in zip(group, extra):
            s.n_files = 1 + int(e)
    # Descriptions mix clinical words with the patient's surname.
    for group in by_study.values():
        study = group[0].study
        p = patients[study.patient]
        words, ser_words = _FAMILY_TEXT[study.family]
        study.description = f"{words[int(rng.integers(len(words)))]} {p.last} follow-up"
        for s in group:
            if s.kind == "rtdose":
                w = _SERIES_TEXT["rtdose"][int(rng.integers(2))]
            else:
                w = ser_words[int(rng.integers(len(ser_words)))]
            s.description = f"{w} {p.last}"
    return series


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------
def _personalise(ds: Dataset, p: _Patient, s: _Series) -> None:
    """Plant the patient/study/series values (everything that is constant per series)."""
    st = s.study
    inst_name, inst_addr, inst_code = p.institution
    ds.StudyInstanceUID = st.uid
    ds.SeriesInstanceUID = s.uid
    ds.FrameOfReferenceUID = s.for_uid
    ds.StudyID = f"{st.number}"
    ds.SeriesNumber = s.number
    for kw in ("Study", "Series", "Acquisition", "Content", "InstanceCreation"):
        setattr(ds, f"{kw}Date", st.date)
        setattr(ds, f"{kw}Time", st.time)
    ds.AccessionNumber = st.accession
    ds.StudyDescription = st.description
    ds.SeriesDescription = s.description
    # Institution and staff.
    ds.InstitutionName = inst_name
    ds.InstitutionAddress = inst_addr
    ds.ReferringPhysicianName = p.referring
    ds.PerformingPhysicianName = p.performing
    ds.NameOfPhysiciansReadingStudy = p.referring
    ds.OperatorsName = p.operator
    # Patient.
    ds.PatientName = p.pn
    ds.PatientID = p.patient_id
    ds.IssuerOfPatientID = inst_code
    ds.PatientBirthDate = p.birth_date
    ds.PatientSex = p.sex
    age = int(st.date[:4]) - int(p.birth_date[:4]) - (st.date[4:] < p.birth_date[4:])
    ds.PatientAge = f"{age:03d}Y"
    ds.PatientAddress = p.address
    ds.PatientTelephoneNumbers = p.phone
    ds.PatientComments = f"{p.mixed_case} prefers morning appointments, tel {p.phone}"
    nhs_item = Dataset()
    nhs_item.PatientID = p.nhs
    nhs_item.IssuerOfPatientID = "NHS"
    nhs_item.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = Sequence([nhs_item])
    ds.ImageComments = (f"Patient {p.natural} NHS {p.nhs_spaced}: "
                        f"compare with previous {st.description.split()[0]}")
    # Request attributes: accession in the item, name in the SPS description, and the
    # institution two levels deep.
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = f"{inst_name} RIS"
    req = Dataset()
    req.AccessionNumber = st.accession
    req.IssuerOfAccessionNumberSequence = Sequence([issuer])
    req.RequestedProcedureID = f"RP{st.number}{s.number}"
    req.RequestedProcedureDescription = st.description.rsplit(" ", 2)[0]
    req.ScheduledProcedureStepID = f"SPS{st.number}{s.number}"
    req.ScheduledProcedureStepDescription = (
        f"{req.RequestedProcedureDescription} for {p.last}, {p.first}")
    ds.RequestAttributesSequence = Sequence([req])
    # Private block with the name (LO) and the NHS number.
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", p.pn)
    block.add_new(0x11, "LO", p.nhs)
    # Kind specific.
    if s.kind == "nm":
        # GE Genie private "Patient Object Name" holds the name in yet another form.
        ds[0x00091040].value = f"{p.last},{p.first}"
    elif s.kind == "rtdose":
        ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID = _uid(s.uid, "plan")


def _instance_elements(base: Dataset, seed: int, s: _Series, instance: int, index: int,
                       sop_uid: UID) -> Dataset:
    """The top-level elements that differ between the instances of a series."""
    ds = Dataset()
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = instance
    if s.kind in ("ct", "ct512", "mr"):
        z = -75.0 + 5.0 * (instance - 1) if s.kind != "mr" else 6.64 + 0.8 * (instance - 1)
        pos = list(base.ImagePositionPatient)
        ds.ImagePositionPatient = [pos[0], pos[1], f"{z:.2f}"]
        ds.SliceLocation = f"{z:.2f}"
    if s.kind == "ct512":
        ds.PixelData = _ct512_pixels(seed, index, (instance - 0.5) / s.n_files)
        ds["PixelData"].VR = "OW"
    elif s.kind == "nm":
        ref = Dataset()
        src = base.SourceImageSequence[0]
        for elem in src:
            ref.add(elem)
        ref.ReferencedSOPInstanceUID = _uid(seed, "src", sop_uid)
        ds.SourceImageSequence = Sequence([ref])
    return ds


def _encode(ds: Dataset, implicit: bool) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR = implicit
    fp.is_little_endian = True
    write_dataset(fp, ds)
    return fp.getvalue()


class _SeriesWriter:
    """Encodes the series-constant part of a dataset once and splices per-instance
    elements in between (pydicom's encoder dominates the run time otherwise).

    The result is byte-identical to ``dcmwrite(..., enforce_file_format=True)`` of the
    complete dataset (checked by the unit tests).
    """

    def __init__(self, base: Dataset, var_tags: list[int]) -> None:
        self.sop_class = base.SOPClassUID
        self.transfer_syntax = base.file_meta.TransferSyntaxUID
        self.implicit = self.transfer_syntax.is_implicit_VR
        self.var_tags = sorted(var_tags)
        bounds = [*self.var_tags, 1 << 33]
        parts = [Dataset() for _ in bounds]
        for tag in sorted(base.keys()):
            if tag in self.var_tags:
                continue
            i = next(j for j, b in enumerate(bounds) if tag < b)
            parts[i][tag] = base.get_item(tag)
        self.segments = [_encode(part, self.implicit) for part in parts]

    def file_bytes(self, inst: Dataset) -> bytes:
        meta = FileMetaDataset()
        meta.FileMetaInformationVersion = b"\x00\x01"
        meta.MediaStorageSOPClassUID = self.sop_class
        meta.MediaStorageSOPInstanceUID = inst.SOPInstanceUID
        meta.TransferSyntaxUID = self.transfer_syntax
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "DICOM_DEID_SMPL"
        fp = DicomBytesIO()
        fp.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fp, meta, enforce_standard=True)
        out = [fp.getvalue(), self.segments[0]]
        for tag, seg in zip(self.var_tags, self.segments[1:]):
            one = Dataset()
            one[tag] = inst[tag]
            out.append(_encode(one, self.implicit))
            out.append(seg)
        return b"".join(out)


_VAR_TAGS = {
    "ct": (0x00080018, 0x00200013, 0x00200032, 0x00201041),
    "mr": (0x00080018, 0x00200013, 0x00200032, 0x00201041),
    "ct512": (0x00080018, 0x00200013, 0x00200032, 0x00201041, 0x7FE00010),
    "nm": (0x00080018, 0x00082112, 0x00200013),
    "rtdose": (0x00080018, 0x00200013),
}


def generate(out_dir: Path, n_files: int = 24, n_patients: int = 4, seed: int = 0,
             ct512_share: float = 0.0) -> SampleSet:
    """Write ``n_files`` synthetic DICOM files for ``n_patients`` invented patients.

    Files go to ``out_dir/p{patient:03d}/{index:05d}.dcm`` (``index`` is global and
    0-based; existing files of the same name are overwritten, others are left alone).
    Every patient gets >= 1 file, 1-2 studies and 1-2 series per study (fewer when
    there are not enough files). Each series is one kind (see :data:`KINDS`);
    ``round(ct512_share * n_files)`` files (Python rounding, half to even) are
    512x512 int16 CT slices. Same arguments -> same bytes.
    """
    if n_files < 0 or n_patients < 1:
        raise ValueError("need n_files >= 0 and n_patients >= 1")
    if not 0.0 <= ct512_share <= 1.0:
        raise ValueError("ct512_share must be within [0, 1]")
    if n_files and n_files < n_patients:
        raise ValueError("need at least one file per patient")
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    patients = _make_patients(rng, n_patients)
    n512 = int(round(ct512_share * n_files))
    series = _plan(seed, rng, patients, n_files, n512) if n_files else []

    files: list[Path] = []
    index = 0
    for s in series:
        p = patients[s.study.patient]
        folder = out_dir / f"p{p.index:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        base = _fresh(s.kind)
        _personalise(base, p, s)
        writer = _SeriesWriter(base, list(_VAR_TAGS[s.kind]))
        for instance in range(1, s.n_files + 1):
            inst = _instance_elements(base, seed, s, instance, index, _uid(seed, "sop", index))
            path = folder / f"{index:05d}.dcm"
            path.write_bytes(writer.file_bytes(inst))
            files.append(path)
            index += 1

    accessions: dict[int, list[str]] = {}
    for s in series:
        acc = accessions.setdefault(s.study.patient, [])
        if s.study.accession not in acc:
            acc.append(s.study.accession)
    planted = []
    for p in patients:
        others = [
            p.natural, f"{p.last}, {p.first}", f"{p.last},{p.first}", p.mixed_case,
            p.last, p.first, p.nhs, p.nhs_spaced, p.address, p.phone,
            *accessions.get(p.index, []),
            p.institution[0], p.institution[1], p.referring, p.performing, p.operator,
        ]
        planted.append(PlantedPatient(
            patient_id=p.patient_id, patient_name=p.pn, birth_date=p.birth_date,
            other_values=tuple(dict.fromkeys(others)),
        ))
    return SampleSet(root=out_dir, files=tuple(files), patients=tuple(planted))


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m dicom_deid.sample",
        description="Write a deterministic synthetic DICOM sample set with FAKE planted "
                    "identifiers (no identifying values are printed).")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--files", type=int, default=24)
    ap.add_argument("--patients", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ct512-share", type=float, default=0.0)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        result = generate(a.out_dir, n_files=a.files, n_patients=a.patients, seed=a.seed,
                          ct512_share=a.ct512_share)
    except ValueError as exc:
        ap.error(str(exc))
    elapsed = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in result.files)
    print(f"wrote {len(result.files)} files ({size / 2**20:.1f} MiB) for "
          f"{len(result.patients)} patients, {int(round(a.ct512_share * a.files))} ct512 "
          f"slices, seed {a.seed}, {len(result.planted_values())} planted values, "
          f"to {result.root} in {elapsed:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
