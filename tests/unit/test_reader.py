"""Broken inputs fail with distinct, value-free errors."""

import pytest

from dicom_deid import errors, keys, reader
from dicom_deid.element import InputRef, PhiContext
from tests.conftest import CORPUS, make_broken_inputs

PLANTED = "GRIMTHORPE^ODALINDA"


def _parse(path):
    d = keys.Deriver(b"\x05" * 32)
    return reader.parse(InputRef(str(path), d.input_key(str(path))), d, data=path.read_bytes())


def test_broken_inputs_distinct_errors(tmp_path):
    broken = make_broken_inputs(tmp_path, CORPUS / "dcm_qa_ts" / "1.dcm", PLANTED)
    classes = {}
    for name, path in broken.items():
        with pytest.raises(Exception) as e:
            _parse(path)
        dl = errors.DeadLetter.of(InputRef(str(path), "k"), "read", e.value)
        assert PLANTED not in dl.description and "GRIMTHORPE" not in dl.error_class
        classes[name] = type(e.value)
    assert classes["zero"] is errors.EmptyInput
    assert classes["random"] is errors.NotDicom and classes["text"] is errors.NotDicom
    assert len({classes["zero"], classes["random"], classes["truncated"], classes["corrupt"]}) == 4


def test_phi_context_collected_and_memory_only():
    obj = _parse(CORPUS / "dcm_qa_ts" / "1.dcm")
    assert isinstance(obj.phi, PhiContext) and obj.phi.ids
    import pickle
    with pytest.raises(TypeError):
        pickle.dumps(obj.phi)
    with pytest.raises(TypeError):
        pickle.dumps(obj)
    assert "names=" in repr(obj.phi) and str(obj.phi.ids[0]) not in repr(obj.phi)


def test_no_preamble_file_reads(tmp_path):
    obj = _parse(CORPUS.parent / "pydicom" / "ExplVR_LitEndNoMeta.dcm")
    assert obj.dataset is not None
