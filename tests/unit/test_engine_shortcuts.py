"""The engine's shortcuts around pydicom's conversions (dsutil.element, replace_value,
text_parts; the tag stage's direct deletes) give the same objects as the plain paths.

Each test runs the engine twice on the same bytes, once as it is and once with the
shortcuts switched off (the plain ``ds[tag]`` path), and compares the PHI context and the
output bytes. The inputs carry what makes the paths differ when they are not equivalent:
padded and NUL-terminated values, backslashes, person names with component groups, kept
identifying elements (research keeps device identity), implicit VR.
"""

import io

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_deid import dsutil, keys, phi, policy, reader, tags, writer
from dicom_deid.element import InputRef

KEY = b"\x0c" * 32
CT = "1.2.840.10008.5.1.4.1.1.2"
PADS = [b"AB  ", b"AB\x00\x00", b" AB ", b"A\\B \x00", b"O'NEIL^ANN  ", b"X^Y=^Z ", b"", b"MOLL\xe9R^J"]


def _bytes(pad: bytes, implicit: bool) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.9.7.3.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.9.7.3"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.9.7.3.2"
    ds.Modality = "CT"
    ds.PatientName = "KEPPLE^ROSAMUND"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    # read back (a dataset read from bytes writes its raw elements as they are), then add
    # the values under test as read
    ds = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    for tag, vr in ((0x00081010, "SH"),   # StationName: kept under research (device identity)
                    (0x00181000, "LO"),   # DeviceSerialNumber: kept under research
                    (0x00080080, "LO"),   # InstitutionName
                    (0x00100020, "LO"),   # PatientID
                    (0x00080050, "SH"),   # AccessionNumber
                    (0x00140104, "PN"),   # a person name no Table E.1-1 row names: kept
                    (0x00081070, "PN")):  # OperatorsName
        t = Tag(tag)
        ds._dict[t] = RawDataElement(t, None if implicit else vr, len(pad), pad, 0, implicit, True)
    buf = io.BytesIO()
    ds.save_as(buf)
    data = buf.getvalue()
    assert pad in data
    return data


def _run(data: bytes, pol: str):
    d = keys.Deriver(KEY)
    obj = reader.parse(InputRef("mem://x", d.input_key("mem://x")), d, data=data)
    context = (obj.phi.names, obj.phi.ids, obj.phi.dates, obj.phi.texts, obj.phi.orgs)
    tags.deidentify(obj, tags.compile_rules(policy.load(pol), KEY))
    return context, writer.serialize(obj.dataset)


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("pol", ["basic", "research"])
def test_shortcuts_give_the_plain_paths_objects(monkeypatch, pol, implicit):
    for pad in PADS:
        data = _bytes(pad, implicit)
        fast = _run(data, pol)
        with monkeypatch.context() as m:
            m.setattr(phi, "text_parts", lambda ds, raw: None)
            m.setattr(dsutil, "element", lambda ds, tag, raw=None: ds[tag])
            m.setattr(phi, "element", lambda ds, tag, raw=None: ds[tag])
            m.setattr(tags, "element", lambda ds, tag, raw=None: ds[tag])
            m.setattr(tags, "replace_value", lambda ds, tag, value: False)
            m.setattr(dsutil, "_default_conversion", lambda: False)
            plain = _run(data, pol)
        assert fast == plain, (pol, implicit, pad)


def test_text_parts_are_the_converted_values():
    from pydicom.values import convert_PN, convert_text

    for raw in (b"A^B", b"A^B  ", b"A\\B \x00", b"  \\ ", b"X^Y=^Z ", b"A\tB", b""):
        for vr in ("LO", "SH", "PN"):
            elem = RawDataElement(Tag(0x00100020), vr, len(raw), raw, 0, False, True)
            parts = dsutil.text_parts(Dataset(), elem)
            converted = (convert_PN(raw, ["iso8859"]) if vr == "PN" else convert_text(raw, ["iso8859"], vr))
            want = []
            for v in phi._values(converted):
                want.extend(phi._name_components(v) if vr == "PN" else [v])
            got = []
            for p in parts or ():
                for v in phi._values(p):
                    got.extend(phi._name_components(v) if vr == "PN" else [v])
            if parts is not None:
                assert got == want, (vr, raw)
