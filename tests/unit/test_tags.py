"""Header de-identification on datasets with planted identifiers (no Beam)."""

import io

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from dicom_deid import keys, policy, reader, sample, standard, tags, verify, writer
from dicom_deid.element import InputRef

KEY = b"\x07" * 32
CT = "1.2.840.10008.5.1.4.1.1.2"
NAME = "QUIMBLEY^ZARAPHINE"


def parse(data: bytes, uri="mem://x"):
    d = keys.Deriver(KEY)
    return reader.parse(InputRef(uri, d.input_key(uri)), d, data=data)


def to_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def ct_dataset() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.9.7.1.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.9.7.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.9.7.1.2"
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.9.7.1.3"
    ds.Modality = "CT"
    ds.PatientName = NAME
    ds.PatientID = "RX99812"
    ds.PatientBirthDate = "19610412"
    ds.StudyDate = "20240301"
    ds.SeriesDate = "20240301"
    ds.ContentDate = "20240302"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC77120"
    ds.ReferringPhysicianName = "DRAVENFELL^OSWIN"
    ds.InstitutionName = "ST BARNABY INFIRMARY"
    ds.PatientAddress = "12 WOLLOWAY CLOSE"
    ds.StudyDescription = "CT CHEST QUIMBLEY"
    ds.ImageComments = "seen by DRAVENFELL"
    ds.Manufacturer = "ACME"
    ds.SliceThickness = "1.25"
    ds.PatientSex = "F"
    ds.PatientAge = "062Y"
    # references to other objects, three levels deep, with the patient name hidden inside
    ref = Dataset()
    ref.ReferencedSOPClassUID = CT
    ref.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.9.7.1.1"
    inner = Dataset()
    inner.PersonName = NAME
    inner.TextValue = "QUIMBLEY"
    ref.ContentSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([ref])
    req = Dataset()
    req.AccessionNumber = "ACC77120"
    req.RequestedProcedureDescription = "for QUIMBLEY"
    req.ReferencedStudySequence = Sequence([Dataset()])
    req.ReferencedStudySequence[0].ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.9.7.1"
    ds.RequestAttributesSequence = Sequence([req])
    # a private block relocated to 0x0019 block 0x40, and another creator's block
    ds.add_new(0x00190040, "LO", "DEIDTEST PRIVATE")
    ds.add_new(0x00194001, "LO", NAME)
    ds.add_new(0x60003000, "OW", b"\x00\x01" * 8)  # overlay data
    ds.add_new(0x60004000, "LT", "overlay for QUIMBLEY")
    return ds


def deid(ds_bytes: bytes, pol="basic"):
    obj = parse(ds_bytes)
    rules = tags.compile_rules(policy.load(pol), KEY)
    tags.deidentify(obj, rules)
    out = writer.serialize(obj.dataset)
    return obj, out


@pytest.mark.parametrize("pol", ["basic", "research", "allowlist"])
def test_no_planted_value_survives(pol):
    obj, out = deid(to_bytes(ct_dataset()), pol)
    up = out.upper()
    for v in ("QUIMBLEY", "ZARAPHINE", "RX99812", "19610412", "ACC77120", "DRAVENFELL",
              "BARNABY", "WOLLOWAY", "1.2.826.0.1.3680043.9.7.1"):
        assert v.encode() not in up, v
    assert verify.find_residuals(obj, out) == []


def test_type2_emptied_type3_removed_per_iod():
    obj, out = deid(to_bytes(ct_dataset()))
    ds = pydicom.dcmread(io.BytesIO(out))
    assert standard.attribute_type(CT, (0x00080020,)) == "2"
    assert "StudyDate" in ds and ds.StudyDate == ""          # X/Z on a type 2 attribute -> Z
    assert "AccessionNumber" in ds and ds.AccessionNumber == ""
    assert "ReferringPhysicianName" in ds and ds.ReferringPhysicianName == ""
    assert "InstitutionName" not in ds and "PatientAddress" not in ds
    assert "StudyDescription" not in ds and "ImageComments" not in ds
    assert "PatientBirthDate" in ds and ds.PatientBirthDate == ""
    assert ds.Manufacturer == "ACME" and ds.SliceThickness == 1.25      # kept
    assert not any(int(t) >> 16 & 1 for t in ds.keys())               # no private group left
    assert 0x60003000 not in ds and 0x60004000 not in ds               # overlay data/comments


def test_uids_remapped_consistently_everywhere():
    obj, out = deid(to_bytes(ct_dataset()))
    ds = pydicom.dcmread(io.BytesIO(out))
    d = keys.Deriver(KEY)
    assert ds.SOPInstanceUID == d.uid("1.2.826.0.1.3680043.9.7.1.1")
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.SOPClassUID == CT and ds.file_meta.MediaStorageSOPClassUID == CT
    # Referenced Image Sequence is X/Z/U*: kept with every UID remapped, so references
    # between objects stay consistent; the planted text inside is cleaned
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert ds.ReferencedImageSequence[0].ReferencedSOPClassUID == CT
    if "RequestAttributesSequence" in ds:
        for item in ds.RequestAttributesSequence:
            for ref in item.get("ReferencedStudySequence", []):
                assert ref.ReferencedSOPInstanceUID == ds.StudyInstanceUID


def test_pseudonym_and_markers():
    obj, out = deid(to_bytes(ct_dataset()))
    ds = pydicom.dcmread(io.BytesIO(out))
    assert ds.PatientID == obj.facts["pseudo_patient_id"] == str(ds.PatientName)
    assert ds.PatientIdentityRemoved == "YES"
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100"]
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"
    # the same patient in another object gets the same pseudonym
    obj2, _ = deid(to_bytes(ct_dataset()))
    assert obj2.facts["pseudo_patient_id"] == obj.facts["pseudo_patient_id"]


def test_research_shifts_dates_keeping_intervals_and_keeps_characteristics():
    obj, out = deid(to_bytes(ct_dataset()), "research")
    ds = pydicom.dcmread(io.BytesIO(out))
    import datetime as dt
    study = dt.datetime.strptime(ds.StudyDate, "%Y%m%d")
    content = dt.datetime.strptime(ds.ContentDate, "%Y%m%d")
    assert ds.StudyDate != "20240301" and (content - study).days == 1
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    assert ds.PatientSex == "F"
    codes = [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]
    assert "113107" in codes and "113108" in codes
    # options this version cannot apply are not claimed
    assert "113105" in codes and "113101" not in codes
    assert obj.facts["options_not_applied"] == ["clean_pixel_data"]


def test_clean_descriptors_keep_clinical_words():
    ds = ct_dataset()
    ds.StudyDescription = "CT CHEST Quimbley follow-up"
    ds.ImageComments = "Zaraphine Quimbley, NHS 943 476 5919, scanned 01/03/2024, call 01632 960123"
    ds.add_new(0x00081080, "LO", ["PNEUMONIA QUIMBLEY", "COPD"])  # AdmittingDiagnosesDescription
    obj, out = deid(to_bytes(ds), "research")
    res = pydicom.dcmread(io.BytesIO(out))
    assert res.StudyDescription == "CT CHEST [NAME] follow-up"
    comments = res.ImageComments
    assert "[NAME]" in comments and "[NHS]" in comments and "[DATE]" in comments and "[PHONE]" in comments
    assert "QUIMBLEY" not in comments.upper() and "9434765919" not in comments.replace(" ", "")
    assert list(res.AdmittingDiagnosesDescription) == ["PNEUMONIA [NAME]", "COPD"]
    assert b"QUIMBLEY" not in out.upper()


def test_overrides_keyword_path_private_and_allowlist(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("""schema: 1
name: custom
version: "2"
overrides:
  - {attribute: StudyDescription, action: replace, value: "RESEARCH STUDY"}
  - {attribute: RequestAttributesSequence, action: keep}
  - {attribute: AccessionNumber, within: [RequestAttributesSequence], action: hash}
  - {attribute: Manufacturer, action: remove}
  - {private: {creator: DEIDTEST PRIVATE, group: "0x0019", element: "0x01"}, action: empty}
""")
    pol = policy.load(str(f))
    obj = parse(to_bytes(ct_dataset()))
    tags.deidentify(obj, tags.compile_rules(pol, KEY))
    ds = obj.dataset
    assert ds.StudyDescription == "RESEARCH STUDY" and "Manufacturer" not in ds
    hashed = ds.RequestAttributesSequence[0].AccessionNumber
    assert hashed and hashed != "ACC77120" and ds.AccessionNumber == ""   # top level: profile Z
    assert ds[0x00194001].value == "" and ds[0x00190040].value == "DEIDTEST PRIVATE"  # relocated block found
    allow = tmp_path / "a.yaml"
    allow.write_text("schema: 1\nname: a\nversion: 1\nmode: allowlist\nallowlist: [Modality, SliceThickness]\n")
    src = ct_dataset()
    src.ConvolutionKernel = "STANDARD"   # type 3 in CT, not on this allowlist -> removed
    obj = parse(to_bytes(src))
    tags.deidentify(obj, tags.compile_rules(policy.load(str(allow)), KEY))
    assert "ConvolutionKernel" not in obj.dataset and obj.dataset.SliceThickness == 1.25
    assert obj.dataset.Manufacturer == "ACME"  # type 2 in the CT IOD: required, so kept


def test_inspect_log_records_every_decision():
    obj = parse(to_bytes(ct_dataset()))
    log = []
    tags.deidentify(obj, tags.compile_rules(policy.load("basic"), KEY), log=log)
    actions = {(path, tag): act for path, tag, _vr, act, _value in log}
    assert all(value is None for *_rest, value in log)  # values only with show_values
    assert actions[((), 0x00081030)] == "X" and actions[((), 0x00080020)] == "Z"
    assert actions[((), 0x00194001)] == "X (private)"


def test_safe_private_kept_through_relocated_block():
    safe = tags.safe_private_list()
    creator, group, elem_byte = sorted(standard.safe_private_elements())[0]
    unsafe_byte = next(b for b in range(256) if (creator, group, b) not in safe)
    ds = ct_dataset()
    block = 0x70  # not the block the vendor normally uses
    ds.add_new((group << 16) | block, "LO", creator.upper())
    ds.add_new((group << 16) | (block << 8) | elem_byte, "UN", b"1234")
    ds.add_new((group << 16) | (block << 8) | unsafe_byte, "LO", NAME)
    obj, out = deid(to_bytes(ds), "research")
    res = pydicom.dcmread(io.BytesIO(out))
    assert (group << 16) | (block << 8) | elem_byte in res          # safe: kept, whole
    assert str(res[(group << 16) | (block << 8) | elem_byte].value).strip("b'") == "1234"
    assert (group << 16) | block in res                             # its creator too
    assert (group << 16) | (block << 8) | unsafe_byte not in res    # unsafe: removed
    assert b"QUIMBLEY" not in out.upper()
    basic_obj, basic_out = deid(to_bytes(ds), "basic")
    assert not any(int(t) >> 16 & 1 for t in pydicom.dcmread(io.BytesIO(basic_out)).keys())


def test_canary_on_generated_sample(tmp_path):
    s = sample.generate(tmp_path / "s", n_files=6, n_patients=2, seed=3)
    planted = {v.upper().encode() for v in s.planted_values()}
    for pol in ("basic", "research", "allowlist"):
        for f in s.files:
            obj, out = deid(f.read_bytes(), pol)
            up = out.upper()
            leaked = [v for v in planted if v in up]
            assert not leaked, (pol, f.name, len(leaked))


def test_safe_private_list_includes_tcia_keeps():
    tcia_k = {k for k, d in standard.tcia_private_dispositions().items() if d == "k"}
    safe = tags.safe_private_list()
    assert standard.safe_private_elements() <= safe and tcia_k <= safe
    assert not ({k for k, d in standard.tcia_private_dispositions().items() if d == "d"}
                - standard.safe_private_elements()) & safe


@pytest.mark.parametrize("pol", ["basic", "research", "allowlist"])
def test_kept_attributes_survive_unchanged(pol):
    src = ct_dataset()
    obj = parse(to_bytes(src))
    log = []
    tags.deidentify(obj, tags.compile_rules(policy.load(pol), KEY), log=log)
    kept = [tag for path, tag, vr, act, _v in log if path == () and act == "K" and vr != "SQ"]
    assert kept
    for tag in kept:
        assert obj.dataset[tag].value == src[tag].value, hex(tag)


@pytest.mark.parametrize("name", ["chrX1.dcm", "chrH31.dcm", "chrGerm.dcm", "chrRuss.dcm", "chrI2.dcm"])
@pytest.mark.parametrize("pol", ["basic", "research"])
def test_non_ascii_names_removed_and_charset_valid(name, pol):
    from tests.conftest import CORPUS
    path = CORPUS / "fo-dicom" / "charset" / name
    src = pydicom.dcmread(path)
    names = [str(e.value) for e in src.iterall() if e.VR == "PN" and e.value]
    obj, out = deid(path.read_bytes(), pol)
    res = pydicom.dcmread(io.BytesIO(out))
    res.decode()  # every value decodes under the object's character set
    texts = [str(e.value) for e in res.iterall() if e.VR in ("PN", "LO", "SH", "LT", "ST", "UT")]
    for n in names:
        for comp in n.replace("=", "^").split("^"):
            if len(comp.strip()) >= 2:
                assert not any(comp.strip() in t for t in texts), (name, pol)
    assert res.SpecificCharacterSet == src.SpecificCharacterSet


def test_un_vr_private_and_three_level_nesting_cleaned():
    ds = ct_dataset()
    ds.add_new(0x00290010, "LO", "SOME VENDOR")
    ds.add_new(0x00291001, "UN", NAME.encode())      # a private UN blob holding the name
    lvl3 = Dataset()
    lvl3.PersonName = NAME
    lvl3.TextValue = "QUIMBLEY note"
    lvl2 = Dataset()
    lvl2.ContentSequence = Sequence([lvl3])
    lvl1 = Dataset()
    lvl1.ContentSequence = Sequence([lvl2])
    ds.ContentSequence = Sequence([lvl1])
    for pol in ("basic", "research", "allowlist"):
        obj, out = deid(to_bytes(ds), pol)
        assert b"QUIMBLEY" not in out.upper() and b"ZARAPHINE" not in out.upper(), pol


def test_research_shifts_unlisted_and_private_dates():
    ds = ct_dataset()
    ds.add_new(0x00181078, "DT", "20240301101500")    # RadiopharmaceuticalStartDateTime
    creator, group, byte = sorted(tags.compile_rules(policy.load("research"), KEY).private_dates)[0]
    ds.add_new((group << 16) | 0x0050, "LO", creator.upper())
    ds.add_new((group << 16) | 0x5000 | byte, "DA", "20240301")
    obj, out = deid(to_bytes(ds), "research")
    res = pydicom.dcmread(io.BytesIO(out))
    shifted = res.StudyDate
    assert shifted != "20240301"
    if "RadiopharmaceuticalStartDateTime" in res:
        assert res.RadiopharmaceuticalStartDateTime.startswith(shifted)
    assert res[(group << 16) | 0x5000 | byte].value == shifted


def _policy_with(*options) -> policy.Policy:
    import json
    return policy.parse(json.dumps({"schema": 1, "name": "one", "version": "1", "options": list(options)}))


def _rich_dataset() -> Dataset:
    ds = ct_dataset()
    ds.StationName = "CTSTATION7"
    ds.DeviceSerialNumber = "SN-4410"
    ds.InstitutionName = "ST BARNABY INFIRMARY"
    ds.PatientWeight = "71"
    item = Dataset()
    item.ValueType = "TEXT"
    item.TextValue = "lesion seen by QUIMBLEY"
    ds.ContentSequence = Sequence([item])
    text = Dataset()
    text.UnformattedTextValue = "Patient QUIMBLEY 01/03/2024"
    ann = Dataset()
    ann.TextObjectSequence = Sequence([text])
    ds.GraphicAnnotationSequence = Sequence([ann])
    return ds


OPTION_CHECKS = {
    # option: (check on the de-identified dataset, check that Basic alone does otherwise)
    "rtn_uids": (lambda ds: ds.SOPInstanceUID == "1.2.826.0.1.3680043.9.7.1.1",
                 lambda ds: ds.SOPInstanceUID != "1.2.826.0.1.3680043.9.7.1.1"),
    "rtn_long_full_dates": (lambda ds: ds.StudyDate == "20240301", lambda ds: ds.StudyDate == ""),
    "rtn_long_modified_dates": (lambda ds: ds.StudyDate not in ("", "20240301") and len(ds.StudyDate) == 8,
                                lambda ds: ds.StudyDate == ""),
    "rtn_device_identity": (lambda ds: ds.get("DeviceSerialNumber") == "SN-4410",
                            lambda ds: ds.get("DeviceSerialNumber") in (None, "", "ANONYMIZED")),
    "rtn_institution_identity": (lambda ds: ds.get("InstitutionName") == "ST BARNABY INFIRMARY",
                                 lambda ds: "InstitutionName" not in ds),
    "rtn_patient_characteristics": (lambda ds: ds.PatientSex == "F" and ds.get("PatientWeight") == 71,
                                    lambda ds: ds.get("PatientSex", "") == "" and "PatientWeight" not in ds),
    "clean_descriptors": (lambda ds: ds.get("StudyDescription") == "CT CHEST [NAME]",
                          lambda ds: "StudyDescription" not in ds),
    "clean_structured_content": (
        lambda ds: "ContentSequence" in ds and "QUIMBLEY" not in str(ds.ContentSequence[0].get("TextValue", "")),
        lambda ds: "QUIMBLEY" not in str(ds.get("ContentSequence", ""))),
    "clean_graphics": (
        lambda ds: "GraphicAnnotationSequence" in ds and "QUIMBLEY" not in str(ds.GraphicAnnotationSequence[0]),
        lambda ds: "GraphicAnnotationSequence" not in ds or "QUIMBLEY" not in str(ds.GraphicAnnotationSequence[0])),
}


@pytest.mark.parametrize("option", sorted(OPTION_CHECKS))
def test_each_option_changes_what_basic_does(option):
    with_option, basic_only = OPTION_CHECKS[option]
    obj = parse(to_bytes(_rich_dataset()))
    tags.deidentify(obj, tags.compile_rules(_policy_with(option), KEY))
    assert with_option(obj.dataset), option
    codes = [c.CodeValue for c in obj.dataset.DeidentificationMethodCodeSequence]
    assert policy.OPTION_CODES[option][0] in codes
    out = writer.serialize(obj.dataset)
    assert b"QUIMBLEY" not in out.upper() and b"RX99812" not in out
    base = parse(to_bytes(_rich_dataset()))
    tags.deidentify(base, tags.compile_rules(_policy_with(), KEY))
    assert basic_only(base.dataset), option
