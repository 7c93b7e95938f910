"""Transforms under Beam's in-process FnApiRunner: main, outcome and dead-letter outputs,
and counters."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to, is_not_empty

from dicom_deid import keys, policy
from dicom_deid.manifest import RunInfo
from dicom_deid.transforms.common import DEAD_LETTER, MAIN, OUTCOME
from dicom_deid.transforms.read import FileRef, ReadDicom
from dicom_deid.transforms.tags import DeidentifyTags
from tests.conftest import CORPUS, make_broken_inputs


def _run(tmp_path) -> RunInfo:
    return RunInfo("test-run", "basic", "1", "0", str(tmp_path / "o"), str(tmp_path / "p"))


def test_read_and_tags_route_outputs_and_count(tmp_path, key_file):
    good = [CORPUS / "dcm_qa_ts" / "1.dcm", CORPUS / "highdicom" / "data" / "test_files" / "ct_image.dcm"]
    broken = make_broken_inputs(tmp_path / "b", good[0], "HOLLINGDRAKE^MERRIWEN")
    refs = [FileRef(str(p), p.stat().st_size) for p in good + [broken["zero"], broken["random"]]]
    run, ref = _run(tmp_path), keys.KeyRef(str(key_file))
    p = beam.Pipeline(runner=FnApiRunner())
    read = p | beam.Create(refs) | ReadDicom(run, ref, 1 << 30)
    pseudonyms = p | "Map" >> beam.Create([]).with_output_types(tuple[str, dict])
    tagged = read[MAIN] | DeidentifyTags(run, policy.load("basic"), ref, pseudonyms)
    # only plain values leave the fused stages: project the objects to public facts
    facts = tagged[MAIN] | beam.Map(lambda o: (o.facts["modality"], o.facts["pseudo_patient_id"][:2]))
    assert_that(facts, equal_to([("MR", "DD"), ("CT", "DD")]), label="DeidentifiedObjects")
    assert_that(read[OUTCOME] | beam.Map(lambda o: (o.row["status"], o.row["error_class"])),
                equal_to([("failed", "dicom_deid.errors.EmptyInput"), ("failed", "dicom_deid.errors.NotDicom")]),
                label="FailedRows")
    assert_that(read[DEAD_LETTER] | beam.Map(lambda d: d.stage), equal_to(["read", "read"]), label="DeadLetters")
    assert_that(tagged[DEAD_LETTER], equal_to([]), label="NoTagFailures")
    result = p.run()
    result.wait_until_finish()
    counters = {r.key.metric.name: r.committed for r in result.metrics().query(
        MetricsFilter().with_namespace("dicom_deid.read"))["counters"]}
    assert counters["objects_read"] == 2 and counters["dead_letters"] == 2
    tags_counters = {r.key.metric.name: r.committed for r in result.metrics().query(
        MetricsFilter().with_namespace("dicom_deid.tags"))["counters"]}
    assert tags_counters["objects_deidentified"] == 2


def test_pseudonym_map_side_input_is_used(tmp_path, key_file):
    """An entry in the map (keyed by the patient key HMAC) wins over keyed derivation."""
    path = CORPUS / "dcm_qa_ts" / "1.dcm"
    import pydicom
    from dicom_deid import tags
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    d = keys.Deriver(keys.resolve(keys.KeyRef(str(key_file))))
    pkey = tags.patient_key_of(ds, d)
    run, ref = _run(tmp_path), keys.KeyRef(str(key_file))
    p = beam.Pipeline(runner=FnApiRunner())
    pseudonyms = p | "Map" >> beam.Create([(pkey, {"pseudonym": "STUDY0001", "date_offset_days": -400})])
    read = p | beam.Create([FileRef(str(path), path.stat().st_size)]) | ReadDicom(run, ref, 1 << 30)
    tagged = read[MAIN] | DeidentifyTags(run, policy.load("basic"), ref, pseudonyms)
    out = tagged[MAIN] | beam.Map(lambda o: (o.facts["pseudo_patient_id"], str(o.dataset.PatientID)))
    assert_that(out, equal_to([("STUDY0001", "STUDY0001")]))
    assert_that(read[MAIN] | beam.Map(lambda o: 1), is_not_empty(), label="ReadSomething")
    p.run().wait_until_finish()


def test_the_map_is_asked_once_per_patient_not_once_per_object(tmp_path, key_file):
    """Each lookup of the map side input is a request to the runner: the tag stage keeps
    the answers (an entry, or none) per patient key, and every object gets the same."""
    from dicom_deid import reader, sample
    from dicom_deid.element import InputRef
    from dicom_deid.transforms.tags import _DeidentifyTagsFn
    s = sample.generate(tmp_path / "in", n_files=6, n_patients=2, seed=3)
    files = sorted((tmp_path / "in").rglob("*.dcm"))
    assert len(files) == 6 and len(s.patients) == 2
    run, ref = _run(tmp_path), keys.KeyRef(str(key_file))
    d = keys.Deriver(keys.resolve(ref))

    class CountingMap(dict):
        def __init__(self, entries):
            super().__init__(entries)
            self.asked = []

        def __getitem__(self, k):
            self.asked.append(k)
            return self.get(k, [])

    def run_all(pseudonyms):
        fn = _DeidentifyTagsFn(run, policy.load("basic"), ref)
        fn.setup()
        got = []
        for f in files:
            data = f.read_bytes()
            obj = reader.parse(InputRef(str(f), d.input_key(str(f)), len(data)), d, data=data)
            out = [o for o in fn.handle(obj, pseudonyms) if not isinstance(o, beam.pvalue.TaggedOutput)]
            assert len(out) == 1
            got.append((obj.patient_key, out[0].facts["pseudo_patient_id"]))
        return got

    empty = CountingMap({})
    derived = run_all(empty)
    patients = sorted({k for k, _p in derived})
    assert len(patients) == 2 and sorted(empty.asked) == patients, "one lookup per patient"
    chosen = CountingMap({patients[0]: [{"pseudonym": "FIXED01", "date_offset_days": -3}]})
    mapped = run_all(chosen)
    assert sorted(chosen.asked) == patients
    # the map's entry went to every object of its patient, the derivation to the others
    assert {p for k, p in mapped if k == patients[0]} == {"FIXED01"}
    assert [p for k, p in mapped if k == patients[1]] == [p for k, p in derived if k == patients[1]]
