"""The hot path leaves values as read (raw bytes) unless a stage needs them.

These tests pin the behaviour that makes that safe: identifying values are still found
(deferred values of large inputs, other character sets, UTF-8), elements no rule touches are
written back byte for byte, and structures pydicom cannot convert still fail in the read
stage.
"""

import io

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_deid import errors, keys, policy, reader, tags, verify, writer
from dicom_deid.element import InputRef
from tests.conftest import CORPUS

KEY = b"\x0b" * 32
CT = "1.2.840.10008.5.1.4.1.1.2"


def _deriver():
    return keys.Deriver(KEY)


def _bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _dataset(name="PLOWRIGHT^ESMERELDA", charset=None) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.9.7.2.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.9.7.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.9.7.2.2"
    ds.Modality = "CT"
    ds.PatientName = name
    ds.PatientID = "QX55310"
    ds.Rows, ds.Columns = 2, 2
    ds.SliceThickness = "1.25"
    ds.KVP = "120"
    return ds


def _parse_bytes(data: bytes):
    d = _deriver()
    return reader.parse(InputRef("mem://x", d.input_key("mem://x")), d, data=data)


def test_kept_elements_stay_raw_and_are_written_byte_for_byte():
    ds = _dataset()
    ds.add_new(0x00181000, "LO", "SN-00042")  # DeviceSerialNumber: X in Basic
    ds.KVP = "120.5"  # unlisted technical value: kept
    obj = _parse_bytes(_bytes(ds))
    tags.deidentify(obj, tags.compile_rules(policy.load("basic"), KEY))
    out = obj.dataset
    # KVP and Rows were never converted: what is written is what was read
    assert isinstance(out.get_item(0x00180060), RawDataElement)
    assert isinstance(out.get_item(0x00280010), RawDataElement)
    assert 0x00181000 not in out
    again = pydicom.dcmread(io.BytesIO(writer.serialize(out)))
    assert str(again.KVP) == "120.5" and again.Rows == 2
    assert str(again.PatientName) != "PLOWRIGHT^ESMERELDA"


def test_deferred_text_of_a_large_input_is_still_verified(tmp_path):
    """Inputs too large for memory are parsed from a temp file with values deferred; a
    kept text value that was never loaded must still be searched."""
    ds = _dataset()
    ds.add_new(0x00324000, "LT", "x")  # placeholder, replaced below with a long UT
    del ds[0x00324000]
    long_text = ("clinical history " * 20000) + " reviewed with PLOWRIGHT today"
    ds.add_new(0x00400280, "ST", "short")
    ds.add_new(0x0040A160, "UT", long_text)  # TextValue: > DEFER_SIZE, deferred
    path = tmp_path / "large.dcm"
    path.write_bytes(_bytes(ds))
    d = _deriver()
    obj = reader.parse(InputRef(str(path), d.input_key(str(path))), d, path=str(path))
    raw = obj.dataset.get_item(0x0040A160, keep_deferred=True)
    assert isinstance(raw, RawDataElement) and raw.value is None  # really deferred
    findings = verify.find_residuals(obj, b"")
    assert "residual_phi:0040A160" in findings


def test_names_in_utf8_and_iso2022_are_found_in_raw_values():
    # UTF-8: decoded from the raw bytes directly
    ds = _dataset("MÜLLERSTRAß^ZOË", charset="ISO_IR 192")
    ds.add_new(0x00081030, "LO", "follow-up müllerstraß")  # StudyDescription, kept raw here
    obj = _parse_bytes(_bytes(ds))
    assert "residual_phi:00081030" in verify.find_residuals(obj, b"")
    # ISO 2022 with escape sequences (Japanese): decoded by pydicom, element by element
    name = "Yamada^Tarou=山田太郎^花子=やまだ^たろう"
    ds = _dataset(name, charset=["", "ISO 2022 IR 87"])
    ds.add_new(0x00081030, "LO", "山田太郎 follow-up")
    obj = _parse_bytes(_bytes(ds))
    assert any(n[0] == "山田太郎" for n in obj.phi.names)
    assert "residual_phi:00081030" in verify.find_residuals(obj, b"")


def test_no_false_finding_on_a_clean_raw_value():
    ds = _dataset()
    ds.add_new(0x00081030, "LO", "CT CHEST")
    obj = _parse_bytes(_bytes(ds))
    del obj.dataset.PatientName
    del obj.dataset.PatientID
    assert verify.find_residuals(obj, b"") == []


def test_stray_item_tag_still_fails_as_unsupported():
    path = CORPUS / "fo-dicom" / "GH364.dcm"  # a top-level (FFFE,E000) item tag
    d = _deriver()
    with pytest.raises(errors.UnsupportedObject):
        reader.parse(InputRef(str(path), d.input_key(str(path))), d, data=path.read_bytes())
