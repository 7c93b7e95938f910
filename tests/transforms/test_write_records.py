"""WriteDicom's staged records: spilled to files per commit shard, never through the runner."""

from __future__ import annotations

import hashlib
import json
import os
import types

import pytest

from dicom_deid import storage
from dicom_deid.errors import StorageError
from dicom_deid.manifest import RunInfo
from dicom_deid.transforms import write


def _run(tmp_path) -> RunInfo:
    return RunInfo("rec-run", "basic", "1", "0", str(tmp_path / "o"), str(tmp_path / "p"))


def _sop(i: int) -> str:
    return f"2.25.{1000 + i}"


def test_records_spill_per_shard_and_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("DICOM_DEID_TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    spill = write._RecordSpill()
    rows = {f"k{i:03d}": {"modality": "CT", "output_size": i, "deid_method_codes": ["113100"]}
            for i in range(200)}
    for i, (key, row) in enumerate(rows.items()):
        spill.add(_sop(i), key, row)
    published = list(spill.publish(str(tmp_path / "records")))
    assert len(published) == len({s for s, _ in published}) <= write.COMMIT_SHARDS
    assert os.listdir(tmp_path / "tmp") == []  # the local spill is gone
    seen = {}
    for shard, uri in published:
        for sop, key, row in write.read_records(uri):
            assert write.shard_of(sop) == shard
            seen[key] = row
    assert seen == rows
    # the shard of a UID is the same in every process (not Python's salted hash)
    assert write.shard_of("2.25.1") == write.shard_of("2.25.1") and 0 <= write.shard_of(None) < write.COMMIT_SHARDS


def test_failed_upload_leaves_no_local_spill(tmp_path, monkeypatch):
    monkeypatch.setenv("DICOM_DEID_TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    spill = write._RecordSpill()
    for i in range(50):
        spill.add(_sop(i), f"k{i}", {"modality": "CT"})
    calls = []

    def flaky(uri, path, **kw):
        calls.append(uri)
        if len(calls) == 2:
            raise ConnectionError("upload failed")
        return real(uri, path, **kw)

    real = storage.write_file
    monkeypatch.setattr(storage, "write_file", flaky)
    with pytest.raises(ConnectionError):
        list(spill.publish(str(tmp_path / "records")))
    assert os.listdir(tmp_path / "tmp") == []


def _stage(run, key: str, data: bytes) -> dict:
    staged = f"{run.staging_dir()}/{key}.dcm"
    storage.write_bytes(staged, data)
    return {"content_fingerprint": hashlib.sha256(data).hexdigest()[:32], "output_size": len(data),
            "output_sha256": hashlib.sha256(data).hexdigest(), "modality": "CT"}


def test_commit_groups_a_shard_by_sop_uid(tmp_path):
    run = _run(tmp_path)
    final = f"{run.output}/P/1/2/{_sop(1)}.dcm"
    other = f"{run.output}/P/1/2/{_sop(2)}.dcm"
    recs = {
        "a": (_sop(1), _stage(run, "a", b"same bytes")),
        "b": (_sop(1), _stage(run, "b", b"same bytes")),       # identical input: duplicate
        "c": (_sop(1), _stage(run, "c", b"other bytes")),      # same SOP UID, other content
        "d": (_sop(2), _stage(run, "d", b"fourth")),
    }
    # two bundles' files of one shard, records in no particular order
    files = []
    for bundle in (("c", "a"), ("d", "b")):
        spill = write._RecordSpill()
        for key in bundle:
            sop, row = recs[key]
            spill.add(sop, key, {**row, "output_path": final if sop == _sop(1) else other})
        files += [uri for _, uri in spill.publish(f"{run.staging_dir()}/records")]
    fn = write._CommitFn(run)
    fn.setup()
    out = [o.row for o in fn.process((0, list(reversed(files))))]
    by_key = {r["input_key"]: r for r in out}
    assert sorted(by_key) == ["a", "b", "c", "d"]
    assert (by_key["a"]["status"], by_key["a"]["output_path"]) == ("ok", final)
    assert (by_key["b"]["status"], by_key["b"]["reason"]) == ("duplicate", "identical_input")
    assert (by_key["c"]["status"], by_key["c"]["reason"]) == ("quarantined", "sop_uid_conflict")
    assert by_key["c"]["output_path"] is None and by_key["d"]["status"] == "ok"
    assert open(storage.local_path(final), "rb").read() == b"same bytes"
    assert by_key["a"]["deid_method_codes"] == [] and by_key["a"]["modality"] == "CT"


def test_commit_fails_on_a_missing_record_file(tmp_path):
    run = _run(tmp_path)
    fn = write._CommitFn(run)
    fn.setup()
    with pytest.raises(Exception):  # never a silent skip: the bundle fails and is retried
        list(fn.process((3, [f"{run.staging_dir()}/records/gone-03.jsonl"])))


def test_a_commit_failure_is_a_row_and_a_value_free_dead_letter(tmp_path):
    run = _run(tmp_path)
    final = f"{run.output}/P/1/2/{_sop(7)}.dcm"
    os.makedirs(storage.local_path(final) + "/JOHN^DOE")  # a folder where the output goes
    spill = write._RecordSpill()
    spill.add(_sop(7), "k7", {**_stage(run, "k7", b"bytes"), "output_path": final})
    # an identical input: with nothing published it is no duplicate, it fails with the group
    spill.add(_sop(7), "k8", {**_stage(run, "k8", b"bytes"), "output_path": final})
    files = [uri for _, uri in spill.publish(f"{run.staging_dir()}/records")]
    fn = write._CommitFn(run)
    fn.setup()
    out = list(fn.process((write.shard_of(_sop(7)), files)))
    rows = [o.row for o in out if not hasattr(o, "tag")]
    dead = [o.value for o in out if getattr(o, "tag", None) == write.DEAD_LETTER]
    assert [(r["input_key"], r["status"], r["stage"]) for r in rows] == [
        ("k7", "failed", "write"), ("k8", "failed", "write")]
    assert all(r["output_path"] is None for r in rows)
    assert [d.input_key for d in dead] == ["k7", "k8"] and {d.stage for d in dead} == {"write"}
    assert dead[0].error_class.endswith("Error") and "JOHN" not in str([d.to_json() for d in dead])


class _Obj:
    """The parts of a DicomObject the staging step reads."""

    def __init__(self, i: int):
        self.facts = {"sop_uid": _sop(i), "study_uid": "2.25.1", "series_uid": "2.25.2",
                      "pseudo_patient_id": "DDTEST", "modality": "CT"}
        self.ref = types.SimpleNamespace(input_key=f"k{i:03d}", uri=f"/in/JOHN^DOE/{i}.dcm")
        self.output_file, self.output_bytes = None, b"DICM" * (i + 1)
        self.fingerprint, self.private = f"fp{i}", {}

    def release(self):
        pass


def test_stage_spills_records_and_emits_only_their_names(tmp_path):
    run = _run(tmp_path)
    fn = write._StageFn(run)
    fn.setup()
    fn.start_bundle()
    outs = [o for i in range(40) for o in fn.process(_Obj(i))]
    assert {o.tag for o in outs} == {write.LINKAGE}  # records leave only at the bundle's end
    named = [wv.value for wv in fn.finish_bundle()]
    got = {key: (sop, row) for _, uri in named for sop, key, row in write.read_records(uri)}
    assert sorted(got) == [f"k{i:03d}" for i in range(40)]
    assert got["k003"][0] == _sop(3) and got["k003"][1]["output_size"] == 16
    assert not any("JOHN" in open(storage.local_path(uri)).read() for _, uri in named)
    fn.teardown()


def test_a_failed_spill_write_fails_the_bundle_not_one_input(tmp_path, monkeypatch):
    run = _run(tmp_path)
    fn = write._StageFn(run)
    fn.setup()
    fn.start_bundle()
    for i in range(3):
        list(fn.process(_Obj(i)))
    real = write._RecordSpill.add

    def full(self, *a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(write._RecordSpill, "add", full)
    with pytest.raises(StorageError):  # transient: the runner runs the whole bundle again
        list(fn.process(_Obj(3)))
    assert fn._local is None  # the spill of the broken bundle is gone
    monkeypatch.setattr(write._RecordSpill, "add", real)
    fn.start_bundle()  # the retry
    for i in range(4):
        list(fn.process(_Obj(i)))
    named = [wv.value for wv in fn.finish_bundle()]
    assert sorted(k for _, uri in named for _, k, _ in write.read_records(uri)) == [f"k{i:03d}" for i in range(4)]


def _records(run, *entries) -> list:
    """Stage each ``(i, sop, data)`` as input ``k{i}`` and spill its record; the record files."""
    spill = write._RecordSpill()
    for i, sop, data in entries:
        spill.add(sop, f"k{i}", {**_stage(run, f"k{i}", data), "output_path": f"{run.output}/P/1/2/{sop}.dcm"})
    return [uri for _, uri in spill.publish(f"{run.staging_dir()}/records")]


def _commit(fn, files) -> tuple[dict, list]:
    """One commit bundle: its rows by input key, and its dead letters."""
    out = list(fn.process((0, files)))
    return ({o.row["input_key"]: o.row for o in out if not hasattr(o, "tag")},
            [o.value for o in out if getattr(o, "tag", None) == write.DEAD_LETTER])


def _commit_fn(run):
    fn = write._CommitFn(run)
    fn.setup()
    return fn


def test_a_retried_commit_reports_the_first_failure_not_the_object_it_removed(tmp_path, monkeypatch):
    """A permanent failure, then a transient one later in the bundle: the runner runs the
    bundle again, and the inputs that failed first fail with that first error class, not as
    staged objects that are no longer there."""
    run = _run(tmp_path)
    # k20 and k22 share a SOP UID (k22 fails with its group's winner, k20); k21 is alone and
    # is committed after them (groups go by SOP UID)
    files = _records(run, (20, _sop(20), b"bytes 20"), (22, _sop(20), b"bytes 22"), (21, _sop(21), b"bytes 21"))
    real = write.publish
    calls = []

    def flaky(staged, final):
        calls.append(final)
        if len(calls) == 1:
            raise PermissionError(13, "Permission denied", "/in/JOHN^DOE")  # permanent
        if len(calls) == 2:
            raise ConnectionError("reset")  # transient: the bundle fails and runs again
        return real(staged, final)

    monkeypatch.setattr(write, "publish", flaky)
    fn = _commit_fn(run)
    with pytest.raises(ConnectionError):
        _commit(fn, files)
    rows, dead = _commit(fn, files)  # the retry
    assert {k: r["status"] for k, r in rows.items()} == {"k20": "failed", "k22": "failed", "k21": "ok"}
    assert rows["k20"]["error_class"] == "PermissionError"  # not FileNotFoundError
    # one dead letter per input, each under its own key, matching the rows
    assert sorted((d.input_key, d.error_class) for d in dead) == [
        ("k20", "PermissionError"), ("k22", "PermissionError")]
    assert all(d.description == rows[d.input_key]["reason"] for d in dead)
    assert os.path.exists(storage.local_path(rows["k21"]["output_path"]))
    text = open(storage.local_path(f"{run.staging_dir()}/k20.failed")).read()
    assert json.loads(text) == {"error_class": "PermissionError", "description": dead[0].description}
    assert "JOHN" not in text  # the exception's message (it named a path) is not recorded


def test_a_failure_without_an_earlier_attempt_is_its_own(tmp_path):
    run = _run(tmp_path)
    files = _records(run, (30, _sop(30), b"x"))
    os.remove(storage.local_path(f"{run.staging_dir()}/k30.dcm"))  # staged object lost, no record
    _rows, dead = _commit(_commit_fn(run), files)
    assert [d.error_class for d in dead] == ["FileNotFoundError"]


def test_a_failure_that_cannot_be_recorded_is_still_a_row_and_a_dead_letter(tmp_path, monkeypatch):
    run = _run(tmp_path)
    files = _records(run, (40, _sop(40), b"x"))
    os.makedirs(storage.local_path(f"{run.output}/P/1/2/{_sop(40)}.dcm"))  # publish fails
    real = storage.write_bytes

    def refuse_markers(uri, data, **kw):
        if uri.endswith(".failed"):
            raise PermissionError(13, "Permission denied")
        return real(uri, data, **kw)

    monkeypatch.setattr(storage, "write_bytes", refuse_markers)
    rows, dead = _commit(_commit_fn(run), files)
    assert [r["status"] for r in rows.values()] == ["failed"] and len(dead) == 1
    assert not os.path.exists(storage.local_path(f"{run.staging_dir()}/k40.failed"))


def test_a_malformed_failure_record_leaves_this_failure_standing(tmp_path):
    run = _run(tmp_path)
    files = _records(run, (50, _sop(50), b"x"))
    os.remove(storage.local_path(f"{run.staging_dir()}/k50.dcm"))
    fn = _commit_fn(run)
    for bad in (b"[1, 2]", b'{"error_class": 7, "description": "x"}', b"{}", b"not json"):
        storage.write_bytes(f"{run.staging_dir()}/k50.failed", bad)
        _rows, dead = _commit(fn, files)
        assert [d.error_class for d in dead] == ["FileNotFoundError"], bad


def test_a_refused_discard_is_no_failure(tmp_path, monkeypatch):
    from dicom_deid.storage import AccessDenied
    run = _run(tmp_path)
    files = _records(run, (60, _sop(60), b"same"), (61, _sop(60), b"same"))

    def refused(uri, **kw):
        raise AccessDenied()

    monkeypatch.setattr(storage, "delete", refused)
    rows, _dead = _commit(_commit_fn(run), files)
    assert {k: r["status"] for k, r in rows.items()} == {"k60": "ok", "k61": "duplicate"}
