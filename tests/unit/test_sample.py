"""Tests for dicom_deid.sample: synthetic DICOM with planted FAKE identifiers."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from dicom_deid import sample
from dicom_deid.sample import (
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    PlantedPatient,
    SampleSet,
    generate,
    is_valid_nhs_number,
    nhs_check_digit,
)

N_FILES = 40
N_PATIENTS = 5
SHARE = 0.25


@pytest.fixture(scope="module")
def sset(tmp_path_factory) -> SampleSet:
    return generate(tmp_path_factory.mktemp("a"), n_files=N_FILES, n_patients=N_PATIENTS,
                    seed=7, ct512_share=SHARE)


@pytest.fixture(scope="module")
def datasets(sset):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no pydicom warnings on re-read
        return {f: pydicom.dcmread(f) for f in sset.files}


def _by_id(sset: SampleSet) -> dict[str, PlantedPatient]:
    return {p.patient_id: p for p in sset.patients}


def _text(value) -> str:
    if isinstance(value, bytes):  # implicit VR private element re-reads as UN
        value = value.decode("ascii")
    return str(value).rstrip(" \x00")


def _parts(p: PlantedPatient) -> tuple[str, str]:
    last, first = p.patient_name.split("^")
    return last, first


def _nhs(p: PlantedPatient) -> str:
    return next(v for v in p.other_values if len(v) == 10 and v.isdigit())


# ---------------------------------------------------------------- determinism / layout
def test_deterministic_bytes(tmp_path):
    a = generate(tmp_path / "a", n_files=30, n_patients=3, seed=11, ct512_share=0.2)
    b = generate(tmp_path / "b", n_files=30, n_patients=3, seed=11, ct512_share=0.2)
    rel_a = [f.relative_to(a.root) for f in a.files]
    rel_b = [f.relative_to(b.root) for f in b.files]
    assert rel_a == rel_b
    for fa, fb in zip(a.files, b.files):
        assert fa.read_bytes() == fb.read_bytes(), fa
    assert a.patients == b.patients
    assert a.planted_values() == b.planted_values()


def test_different_seed_differs(tmp_path):
    a = generate(tmp_path / "a", n_files=6, n_patients=2, seed=1)
    b = generate(tmp_path / "b", n_files=6, n_patients=2, seed=2)
    assert a.patients != b.patients
    assert a.files[0].read_bytes() != b.files[0].read_bytes()


def test_file_names(sset):
    assert len(sset.files) == N_FILES
    on_disk = sorted(sset.root.rglob("*"))
    assert sorted(f for f in on_disk if f.is_file()) == sorted(sset.files)
    for i, f in enumerate(sset.files):
        rel = f.relative_to(sset.root).as_posix()
        assert re.fullmatch(r"p\d{3}/\d{5}\.dcm", rel), rel
        assert f.name == f"{i:05d}.dcm"


def test_paths_contain_no_planted_value(sset):
    planted = [v.upper() for v in sset.planted_values()]
    for f in sset.files:
        rel = f.relative_to(sset.root).as_posix().upper()
        assert not [v for v in planted if v in rel], rel


def test_patient_folder_matches_patient(sset, datasets):
    ids = [p.patient_id for p in sset.patients]
    for f, ds in datasets.items():
        assert f.parent.name == f"p{ids.index(ds.PatientID):03d}"


# ---------------------------------------------------------------- validity
def test_valid_dicom_file_format(sset, datasets):
    for f, ds in datasets.items():
        raw = f.read_bytes()
        assert raw[:128] == b"\x00" * 128 and raw[128:132] == b"DICM"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert "PixelData" in ds


def test_bytes_equal_pydicom_encoding(sset):
    """The spliced fast writer produces what dcmwrite(enforce_file_format=True) does."""
    for f in sset.files:
        raw = f.read_bytes()
        buf = io.BytesIO()
        pydicom.dcmread(io.BytesIO(raw)).save_as(buf, enforce_file_format=True)
        assert buf.getvalue() == raw, f


def test_pixels_decode(datasets):
    for f, ds in datasets.items():
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            continue  # the NM template is JPEG 2000; decoding needs an optional plugin
        arr = ds.pixel_array
        assert arr.shape[-2:] == (ds.Rows, ds.Columns)


def test_template_pixels_kept(datasets):
    originals = {}
    for kind, (name, _) in sample.KINDS.items():
        if kind != "ct512":
            tmpl = pydicom.dcmread(get_testdata_file(name))
            originals[tmpl.SOPClassUID, tmpl.Rows] = tmpl.PixelData
    for ds in datasets.values():
        if ds.Rows != 512:
            assert ds.PixelData == originals[ds.SOPClassUID, ds.Rows]


def test_sop_uids_unique(datasets):
    uids = [ds.SOPInstanceUID for ds in datasets.values()]
    assert len(set(uids)) == len(uids)
    for uid in uids:
        assert uid.is_valid and uid.startswith("2.25.")


def test_study_and_series_consistency(sset, datasets):
    studies = defaultdict(list)
    series = defaultdict(list)
    for ds in datasets.values():
        studies[ds.StudyInstanceUID].append(ds)
        series[ds.SeriesInstanceUID].append(ds)
    for group in studies.values():
        for kw in ("PatientID", "AccessionNumber", "StudyDate", "StudyTime",
                   "StudyDescription", "StudyID", "ReferringPhysicianName"):
            assert len({str(getattr(d, kw)) for d in group}) == 1, kw
        assert 1 <= len({d.SeriesInstanceUID for d in group}) <= 2
    for group in series.values():
        for kw in ("StudyInstanceUID", "FrameOfReferenceUID", "Modality", "SeriesNumber",
                   "SeriesDescription", "SOPClassUID", "Rows"):
            assert len({str(getattr(d, kw)) for d in group}) == 1, kw
        assert sorted(int(d.InstanceNumber) for d in group) == list(range(1, len(group) + 1))
    per_patient = defaultdict(set)
    for ds in datasets.values():
        per_patient[ds.PatientID].add(ds.StudyInstanceUID)
    assert set(per_patient) == {p.patient_id for p in sset.patients}
    assert all(1 <= len(s) <= 2 for s in per_patient.values())
    # accession numbers identify studies
    acc = {ds.StudyInstanceUID: ds.AccessionNumber for ds in datasets.values()}
    assert len(set(acc.values())) == len(acc)


# ---------------------------------------------------------------- ct512 share
@pytest.mark.parametrize("n_files,share", [(10, 0.0), (10, 0.35), (7, 1.0), (3, 0.5)])
def test_ct512_share(tmp_path, n_files, share):
    s = generate(tmp_path, n_files=n_files, n_patients=2, seed=3, ct512_share=share)
    big = []
    for f in s.files:
        ds = pydicom.dcmread(f)
        if ds.Rows == 512:
            big.append(ds)
    assert len(s.files) == n_files
    assert len(big) == round(share * n_files)
    for ds in big:
        assert ds.SOPClassUID == CTImageStorage
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert (ds.Columns, ds.BitsAllocated, ds.PixelRepresentation) == (512, 16, 1)
        assert len(ds.PixelData) == 512 * 512 * 2
        arr = ds.pixel_array
        assert arr.dtype.name == "int16" and arr.std() > 100  # image-like, not flat


def test_ct512_series_homogeneous(sset, datasets):
    rows_by_series = defaultdict(set)
    for ds in datasets.values():
        rows_by_series[ds.SeriesInstanceUID].add(ds.Rows)
    assert all(len(r) == 1 for r in rows_by_series.values())
    assert sum(ds.Rows == 512 for ds in datasets.values()) == round(SHARE * N_FILES)


# ---------------------------------------------------------------- planted values
def test_nhs_check_digit():
    assert nhs_check_digit("943476591") == 9  # the NHS's published example 943 476 5919
    assert is_valid_nhs_number("943 476 5919")
    assert not is_valid_nhs_number("9434765918")
    assert not is_valid_nhs_number("94347659")


def test_patients_planted(sset):
    assert len(sset.patients) == N_PATIENTS
    assert len({p.patient_id for p in sset.patients}) == N_PATIENTS
    assert len({p.patient_name for p in sset.patients}) == N_PATIENTS
    for p in sset.patients:
        assert re.fullmatch(r"RX\d{7}", p.patient_id)
        assert re.fullmatch(r"[A-Z]+\^[A-Z]+", p.patient_name)
        assert re.fullmatch(r"(19|20)\d{6}", p.birth_date)
        nhs = _nhs(p)
        assert is_valid_nhs_number(nhs) and nhs.startswith("999")  # NHS test range
        assert f"{nhs[:3]} {nhs[3:6]} {nhs[6:]}" in p.other_values
        last, first = _parts(p)
        for form in (f"{first} {last}", f"{last}, {first}", last, first):
            assert form in p.other_values


def test_planted_values(sset):
    values = sset.planted_values()
    assert all(isinstance(v, str) and len(v) >= 4 for v in values)
    for p in sset.patients:
        assert {p.patient_id, p.patient_name, p.birth_date} <= values
        assert {v for v in p.other_values if len(v) >= 4} <= values


def test_every_file_carries_its_patients_values(sset, datasets):
    patients = _by_id(sset)
    for f, ds in datasets.items():
        p = patients[ds.PatientID]
        last, first = _parts(p)
        nhs = _nhs(p)
        nhs_spaced = f"{nhs[:3]} {nhs[3:6]} {nhs[6:]}"
        assert ds.PatientName == p.patient_name
        assert ds.PatientBirthDate == p.birth_date
        assert f"{first} {last}" in ds.ImageComments and nhs_spaced in ds.ImageComments
        assert last in ds.StudyDescription and last in ds.SeriesDescription
        assert ds.StudyDescription != last  # mixed with clinical words
        opid = ds.OtherPatientIDsSequence[0]
        assert opid.PatientID == nhs and opid.IssuerOfPatientID == "NHS"
        for kw in ("PatientAddress", "PatientTelephoneNumbers", "AccessionNumber",
                   "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
                   "OperatorsName", "PerformingPhysicianName"):
            assert str(getattr(ds, kw)) in p.other_values, kw
        # sequence depth >= 2
        req = ds.RequestAttributesSequence[0]
        assert req.AccessionNumber == ds.AccessionNumber
        assert f"{last}, {first}" in req.ScheduledProcedureStepDescription
        issuer = req.IssuerOfAccessionNumberSequence[0]
        assert issuer.LocalNamespaceEntityID == f"{ds.InstitutionName} RIS"
        # private block
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        assert _text(block[0x10].value) == p.patient_name
        assert _text(block[0x11].value) == nhs
        # the raw bytes contain the canaries (what a byte-level scan would find)
        raw = f.read_bytes()
        assert p.patient_name.encode() in raw and nhs.encode() in raw
        assert p.patient_id.encode() in raw


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> SampleSet:
    return generate(tmp_path_factory.mktemp("mixed"), n_files=120, n_patients=12, seed=5,
                    ct512_share=0.1)


def test_kinds_covered(mixed):
    seen = {pydicom.dcmread(f, stop_before_pixels=True).Modality for f in mixed.files}
    assert {"CT", "MR", "NM", "RTDOSE"} <= seen


def test_vendor_private_name_in_nm(mixed):
    patients = _by_id(mixed)
    found = 0
    for f in mixed.files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if ds.Modality == "NM":
            last, first = _parts(patients[ds.PatientID])
            assert _text(ds[0x00091040].value) == f"{last},{first}"  # GE Genie private
            found += 1
    assert found


def test_planted_values_absent_from_templates(tmp_path):
    """No false positives: canaries never occur in the unmodified template files."""
    values: set[str] = set()
    for seed in range(3):
        values |= generate(tmp_path / str(seed), n_files=20, n_patients=20,
                           seed=seed).planted_values()
    blobs = [Path(get_testdata_file(name)).read_bytes().upper()
             for name, _ in sample.KINDS.values()]
    for v in values:
        for blob in blobs:
            assert v.upper().encode() not in blob, v


def test_empty_sample_set_has_no_values():
    assert SampleSet(Path("."), (), ()).planted_values() == frozenset()


# ---------------------------------------------------------------- errors, CLI, layering
def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        generate(tmp_path, n_files=4, ct512_share=1.5)
    with pytest.raises(ValueError):
        generate(tmp_path, n_files=2, n_patients=3)


def test_cli_prints_no_phi(tmp_path, capsys):
    assert sample.main([str(tmp_path), "--files", "8", "--patients", "2", "--seed", "4",
                        "--ct512-share", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "wrote 8 files" in out and "2 ct512" in out
    ref = generate(tmp_path / "ref", n_files=8, n_patients=2, seed=4, ct512_share=0.25)
    assert not [v for v in ref.planted_values() if v in out]
    assert len(list(tmp_path.glob("p*/*.dcm"))) == 8


def test_engine_module_does_not_import_beam():
    code = "import sys, dicom_deid.sample; sys.exit('apache_beam' in sys.modules)"
    root = Path(sample.__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0
