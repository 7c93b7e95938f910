"""The run's file sinks: a temporary part per bundle, published together at the end."""

from __future__ import annotations

import json
import types

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to

from dicom_deid import manifest
from dicom_deid.errors import DeadLetter
from dicom_deid.manifest import RunInfo
from dicom_deid.transforms import sinks


def _run(tmp_path) -> RunInfo:
    return RunInfo("sink-run", "basic", "1", "0", str(tmp_path / "o"), str(tmp_path / "p"))


class _Outcome:
    def __init__(self, row):
        self.row = row


def _rows(run, n):
    return [manifest.row(run, f"key-{i:05d}", "ok", modality="CT") for i in range(n)]


def _write_parts(sink, records, bundles):
    """The parts ``_WritePartsFn`` leaves for ``records`` split into ``bundles`` bundles."""
    fn = sinks._WritePartsFn(sink)
    fn.setup()
    parts = []
    size = -(-len(records) // bundles)
    for b in range(bundles):
        fn.start_bundle()
        for r in records[b * size:(b + 1) * size]:
            assert fn.process(r) is None
        parts += [wv.value for wv in fn.finish_bundle()]
    fn.teardown()
    return parts


def test_pipeline_publishes_every_sink_once_at_the_end(tmp_path):
    run = _run(tmp_path)
    rows = _rows(run, 30)
    refs = [types.SimpleNamespace(input_key=f"k{i}", uri=f"/in/{i}.dcm") for i in range(3)]
    dead = [DeadLetter.of(ref, "read", ValueError("JOHN^DOE")) for ref in refs]
    p = beam.Pipeline(runner=FnApiRunner())
    writers = {"M": (p | "Rows" >> beam.Create([_Outcome(r) for r in rows]), sinks.WriteManifest(run, part="committed")),
               "S": (p | "NoRows" >> beam.Create([]), sinks.WriteManifest(run, part="stages")),
               "D": (p | "Dead" >> beam.Create(dead), sinks.WriteDeadLetters(run)),
               "L": (p | "NoLinks" >> beam.Create([]), sinks.WriteLinkage(run))}
    parts = [pc | f"W{k}" >> w for k, (pc, w) in writers.items()]
    files = (parts | beam.Flatten()) | sinks.PublishFiles([w.sink for _, w in writers.values()])
    assert_that(files | beam.Map(lambda kv: (kv[0], len(kv[1]))), equal_to(
        [("manifest-committed", 1), ("manifest-stages", 1), ("dead_letters", 1), ("linkage", 1)]))
    p.run().wait_until_finish()

    mdir = tmp_path / "o" / "manifest" / "run-sink-run"
    assert sorted(x.name for x in mdir.iterdir()) == [
        "part-committed-00000-of-00001.parquet", "part-stages-00000-of-00001.parquet"]
    table = pq.read_table(mdir / "part-committed-00000-of-00001.parquet")
    assert table.schema.equals(manifest.SCHEMA) and sorted(table.column("input_key").to_pylist()) == [
        r["input_key"] for r in rows]
    # a sink that received nothing still has a readable file with the schema
    empty = pq.read_table(mdir / "part-stages-00000-of-00001.parquet")
    assert empty.num_rows == 0 and empty.schema.equals(manifest.SCHEMA)
    assert pq.read_table(tmp_path / "p" / "linkage" / "run-sink-run" / "part-00000-of-00001.parquet").num_rows == 0
    lines = (tmp_path / "p" / "dead_letters" / "run-sink-run" / "part-00000-of-00001.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["input_uri"] for x in lines) == [f"/in/{i}.dcm" for i in range(3)]
    assert "JOHN" not in "".join(lines)
    assert not list(tmp_path.rglob(f"{sinks.TEMP_PREFIX}*"))  # temporary folders removed


def test_only_named_parts_are_published_and_a_repeated_publish_changes_nothing(tmp_path):
    run = _run(tmp_path)
    sink = sinks.WriteManifest(run, part="committed").sink
    rows = _rows(run, 5000)
    parts = _write_parts(sink, rows, bundles=3)
    assert len(parts) == 3 and all(name == sink.name for name, _ in parts)
    # a bundle that failed after uploading its part: the runner never saw its name
    orphan = _write_parts(sink, _rows(run, 7), bundles=1)
    publish = sinks._PublishFn([sink])
    publish.setup()
    first = list(publish.process(None, parts))
    finals = first[0][1]
    assert [f.rsplit("/", 1)[1] for f in finals] == [f"part-committed-0000{i}-of-00003.parquet" for i in range(3)]
    got = sorted(k for f in finals for k in pq.read_table(f).column("input_key").to_pylist())
    assert got == [r["input_key"] for r in rows]  # every row once; the orphan's 7 rows not at all
    assert not (tmp_path / "o" / "manifest" / "run-sink-run" / f"{sinks.TEMP_PREFIX}part-committed").exists()
    assert orphan and not any((tmp_path / "o").rglob(orphan[0][1].rsplit("/", 1)[1]))
    # a runner retrying the publish (it failed after its moves) gets the same names, no error
    assert list(publish.process(None, parts)) == first
    # rows are written in row groups, not held until the file closes
    assert pq.ParquetFile(finals[0]).metadata.num_row_groups == 1
    big = _write_parts(sink, _rows(run, sinks.ROW_GROUP_ROWS * 2 + 1), bundles=1)
    meta = pq.ParquetFile(big[0][1]).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [
        sinks.ROW_GROUP_ROWS, sinks.ROW_GROUP_ROWS, 1]
    assert pq.read_table(big[0][1]).column("input_key").to_pylist() == [
        f"key-{i:05d}" for i in range(sinks.ROW_GROUP_ROWS * 2 + 1)]


def test_a_committed_part_that_vanished_fails_the_publish(tmp_path):
    run = _run(tmp_path)
    sink = sinks.WriteLinkage(run).sink
    parts = _write_parts(sink, [manifest.linkage_row(run.run_id, input_key="k", input_uri="u")], bundles=1)
    (tmp_path / parts[0][1].replace(str(tmp_path) + "/", "")).unlink()
    publish = sinks._PublishFn([sink])
    publish.setup()
    with pytest.raises(FileNotFoundError):
        list(publish.process(None, parts))


def test_a_failed_bundle_leaves_no_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DICOM_DEID_TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    run = _run(tmp_path)
    fn = sinks._WritePartsFn(sinks.WriteManifest(run).sink)
    fn.setup()
    fn.start_bundle()
    fn.process(_rows(run, 1)[0])
    assert len(list((tmp_path / "tmp").iterdir())) == 1
    fn.start_bundle()  # the runner gave up on the bundle and started another
    assert not list((tmp_path / "tmp").iterdir())
    fn.process(_rows(run, 1)[0])
    fn.teardown()
    assert not list((tmp_path / "tmp").iterdir())
