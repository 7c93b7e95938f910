"""``fastwrite.serialize`` writes what pydicom writes, byte for byte, or leaves it to pydicom.

Every comparison prepares two datasets from the same bytes the same way, serialises one with
``fastwrite`` and the other with pydicom (``dcmwrite(enforce_file_format=True)``), and asserts
equal bytes wherever the fast path answers. The inputs: every vendored real file (read as it
is, and after the engine's basic and research policies), pydicom's own test files, and a file
whose elements carry every VR as new Python values (empty, multi-valued, odd-length, dates,
person names in a non-default character set, nested sequences).
"""

import datetime
import io
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian)
from pydicom.valuerep import PersonName

from dicom_deid import fastwrite, keys, policy, reader, tags, writer
from dicom_deid.element import InputRef
from dicom_deid.safety import quiet

from tests.conftest import DATA

KEY = b"\x5a" * 32
RULES = {p: tags.compile_rules(policy.load(p), KEY) for p in ("basic", "research")}


def _real_files() -> list[Path]:
    names = {".md", ".tsv", ".txt", ".json", ""}
    return sorted(p for p in DATA.rglob("*") if p.is_file() and p.suffix.lower() not in names
                  and p.name != "LICENSE")


def _prepared(data: bytes, how: str, path: str = "x"):
    """A dataset from ``data`` as the writer receives it, or None if it cannot be made."""
    with quiet():
        try:
            if how == "read":
                ds = pydicom.dcmread(io.BytesIO(data), force=True)
            else:
                d = keys.Deriver(KEY)
                obj = reader.parse(InputRef(path, d.input_key(path), len(data)), d, data=data)
                tags.deidentify(obj, RULES[how])
                ds = obj.dataset
            writer._prepare_meta(ds)
        except Exception:  # noqa: BLE001 - unreadable inputs are the reader's tests' business
            return None
    return ds


def _compare(data: bytes, how: str, path: str = "x") -> str:
    """'fast' (equal bytes), 'pydicom' (fast path declined) or 'skip' (not writable input)."""
    a, b = _prepared(data, how, path), _prepared(data, how, path)
    if a is None:
        return "skip"
    fast = fastwrite.serialize(a)
    try:
        ref = writer._pydicom_serialize(b)
    except Exception:  # noqa: BLE001 - pydicom refuses: so must the fast path
        assert fast is None, f"{path} ({how}): the fast path wrote what pydicom refuses"
        return "skip"
    if fast is None:
        return "pydicom"
    assert fast == ref, f"{path} ({how}): fast output differs from pydicom's"
    # the dataset is left as pydicom leaves it (it converts Pixel Data to set its length form)
    pixel = 0x7FE00010
    if pixel in b._dict:
        assert type(a._dict[pixel]) is type(b._dict[pixel])
        assert a._dict[pixel].is_undefined_length == b._dict[pixel].is_undefined_length
    return "fast"


@pytest.mark.parametrize("how", ["read", "basic", "research"])
def test_vendored_real_files_give_pydicoms_bytes(how):
    files = _real_files()
    assert len(files) > 50
    outcomes = [_compare(p.read_bytes(), how, str(p)) for p in files]
    fast = outcomes.count("fast")
    # the fast path must be what runs for ordinary files, or this test would prove nothing
    assert fast >= 0.6 * (len(outcomes) - outcomes.count("skip")), outcomes


@pytest.mark.filterwarnings("ignore:One or more download failures")
def test_pydicoms_test_files_give_pydicoms_bytes():
    files = [f for f in get_testdata_files("*.dcm") if Path(f).stat().st_size < 8_000_000]
    outcomes = [_compare(Path(f).read_bytes(), "read", f) for f in files]
    assert outcomes.count("fast") >= 30, outcomes


def _base_bytes(ts, charset=None) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.9.7.4.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.9.7.4"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.9.7.4.2"
    ds.Modality = "OT"
    ds.PatientName = "SOMEONE^ELSE"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel = 2, 3, 16, 1
    ds.PixelData = b"\x01\x00" * 6
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _set_every_vr(ds: Dataset) -> None:
    """New Python values on a dataset read from bytes: every VR pydicom writes, in the
    forms the engine produces (empty values, several values, odd lengths, dates)."""
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-D1100", "SRT", "Head"
    inner = Dataset()
    inner.TextValue = "odd"
    item.ContentSequence = Sequence([inner])
    values = [
        ("RetrieveAETitle", "AE_TITLE"), ("PatientAge", "042Y"),
        ("FrameIncrementPointer", [0x00181063, 0x00181065]), ("ImageType", ["DERIVED", "SECONDARY"]),
        ("StudyDate", datetime.date(2001, 2, 3)), ("SeriesDate", "20010203"), ("AcquisitionDate", ""),
        ("SliceThickness", 1.25), ("PixelSpacing", [0.5, "0.75"]), ("AcquisitionDateTime", "20010203040506.123"),
        ("RealWorldValueLUTData", [1.5, -2.25]), ("RecommendedDisplayFrameRateInFloat", 2.5),
        ("InstanceNumber", 7), ("ReferencedFrameNumber", [1, 2, 3]), ("InstitutionName", "ODD"),
        ("ImageComments", "a comment with \\ backslash"), ("PatientComments", ""),
        ("EncapsulatedDocument", b"\x01\x02\x03"), ("OperatorsName", [PersonName("A^B"), "C^D=E^F"]),
        ("ReferringPhysicianName", ""), ("StationName", "SHORT"), ("StudyDescription", "x" * 63),
        ("SpecimenShortDescription", "y"), ("StudyTime", datetime.time(4, 5, 6)), ("SeriesTime", "040506.1"),
        ("ReferencedSOPClassUID", "1.2.840.10008.5.1.4.1.1.2"), ("RequestedProcedureDescription", "z"),
        ("ReferencedSOPInstanceUID", "1.2.3"), ("AnatomicRegionSequence", Sequence([item])),
        ("OtherPatientIDsSequence", Sequence([])), ("TextValue", "unlimited text " * 5),
        ("RetrieveURL", "https://example.invalid/x"), ("LongCodeValue", "long code"),
        ("FloatPixelPaddingValue", 1.0),
        ("SelectorSLValue", [-1, 2]), ("SelectorSVValue", [-(2 ** 40)]), ("SelectorUVValue", [2 ** 40]),
        ("SelectorULValue", [1, 2 ** 31]), ("SelectorOLValue", b"\x00" * 8),
        ("SelectorODValue", b"\x00" * 16), ("SelectorOFValue", b"\x00" * 4), ("SelectorOVValue", b"\x00" * 8),
    ]
    for keyword, value in values:
        setattr(ds, keyword, value)
    ds.add_new(0x00091010, "UN", b"\x01\x02\x03")  # private, no creator: written as bytes
    ds.add_new(0x00290010, "LO", "A CREATOR")
    ds.add_new(0x00291001, "OB", b"\x07")


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("charset", [None, "ISO_IR 192", "ISO_IR 100"])
def test_new_values_of_every_vr_give_pydicoms_bytes(ts, charset):
    base = _base_bytes(ts, charset)
    a, b = pydicom.dcmread(io.BytesIO(base)), pydicom.dcmread(io.BytesIO(base))
    for ds in (a, b):
        _set_every_vr(ds)
        if charset == "ISO_IR 192":
            ds.PatientName = "Müller^Zoë"
        writer._prepare_meta(ds)
    fast = fastwrite.serialize(a)
    assert fast is not None, "the fast path must cover this"
    assert fast == writer._pydicom_serialize(b)
    again = pydicom.dcmread(io.BytesIO(fast))
    assert again.AnatomicRegionSequence[0].ContentSequence[0].TextValue == "odd"


def test_files_read_in_another_encoding_are_left_to_pydicom():
    for ts in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian):
        ds = pydicom.dcmread(io.BytesIO(_base_bytes(ts)))
        writer._prepare_meta(ds)
        assert fastwrite.serialize(ds) is None
        out = writer.serialize(ds)  # pydicom writes it
        assert pydicom.dcmread(io.BytesIO(out)).SOPInstanceUID == ds.SOPInstanceUID
    # written in another encoding than read: pydicom converts every element, so its way
    ds = pydicom.dcmread(io.BytesIO(_base_bytes(ImplicitVRLittleEndian)))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    writer._prepare_meta(ds)
    assert fastwrite.serialize(ds) is None


def test_a_refused_dataset_is_refused_by_pydicom_as_before():
    ds = pydicom.dcmread(io.BytesIO(_base_bytes(ExplicitVRLittleEndian)))
    ds.add_new(0x00020099, "UN", b"\x00\x00")  # a file meta element in the dataset
    writer._prepare_meta(ds)
    assert fastwrite.serialize(ds) is None
    with pytest.raises(ValueError):
        writer.serialize(ds)
