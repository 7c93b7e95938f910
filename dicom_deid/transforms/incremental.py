"""Incremental runs: ``SkipFinished`` (FileRefs -> the ones to process, plus recovered
manifest rows) and ``RecordFinished`` (outcomes -> the private record, as they happen).

Everything grouped here is keyed by ``input_key`` (HMAC of the URI); record rows lose their
URI as they are read, so only FileRefs (as in the fan-out) carry one across the shuffle.
See :mod:`dicom_deid.incremental` for the record, the decision rules and compaction: the
record files to read are chosen when the graph is built (``incremental.select``); past
``COMPACT_FILES`` of them, ``Decide`` also writes the reduced rows of every input it sees
into this run's compaction, which the launcher commits after the run succeeded
(:func:`commit_compaction`).
"""

from __future__ import annotations

import logging
import os
import time

import apache_beam as beam

from .. import incremental as inc
from .. import keys, manifest, storage
from ..element import Outcome
from .common import MAIN, OUTCOME, counter

RECORDS = "records"
log = logging.getLogger("dicom_deid.incremental")
#: the record is flushed every this many rows or seconds (and at the end of each bundle)
FLUSH_ROWS = int(os.environ.get("DICOM_DEID_RECORD_FLUSH_ROWS", "500"))
FLUSH_SECONDS = float(os.environ.get("DICOM_DEID_RECORD_FLUSH_SECONDS", "10"))
#: rows per part file of a compaction
COMPACT_PART_ROWS = 200_000


def complete_runs(private: str) -> frozenset:
    """Run ids that completed (their manifest is published). Read when the graph is built."""
    return frozenset(inc.run_id_of_marker(i.uri)
                     for i in storage.iter_objects(inc.complete_pattern(private)))


def mark_complete(run: manifest.RunInfo, summary: dict) -> None:
    """Written by the launcher once the run's manifest is published."""
    import json
    body = {"run_id": run.run_id, "inputs": summary.get("inputs"),
            "by_status": summary.get("by_status"), "incremental": summary.get("incremental")}
    storage.write_bytes(inc.complete_marker(run.private, run.run_id),
                        json.dumps(body, sort_keys=True).encode(), content_type="application/json")


class _Recorder:
    """Buffers record rows; each flush is one new object (one upload / rename: atomic)."""

    def __init__(self, directory: str, rows: int | None = None, seconds: float | None = None):
        self._dir = directory
        self._rows: list = []
        self._t = time.monotonic()
        self._max_rows = FLUSH_ROWS if rows is None else rows
        self._max_seconds = FLUSH_SECONDS if seconds is None else seconds

    def add(self, row: dict) -> None:
        self._rows.append(row)
        if len(self._rows) >= self._max_rows or time.monotonic() - self._t >= self._max_seconds:
            self.flush()

    def flush(self) -> None:
        self._t = time.monotonic()
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        storage.write_bytes(inc.part_name(self._dir), inc.to_parquet_bytes(rows),
                            content_type="application/vnd.apache.parquet")


def commit_compaction(run: manifest.RunInfo):
    """Launcher, after the run succeeded: commit this run's compaction of the record (if it
    made one) and delete what it replaces. A failure only leaves the record uncompacted."""
    try:
        return inc.commit_compaction(run.private, run.run_id)
    except Exception:  # noqa: BLE001 - the record stays correct, just not compacted
        log.warning("could not commit the incremental record compaction of run %s", run.run_id)
        return None


class SkipFinished(beam.PTransform):
    """FileRefs -> ``main``: FileRefs to process (with the prior fingerprint when the input
    finished before); ``outcome``: manifest rows recovered from interrupted runs."""

    def __init__(self, run: manifest.RunInfo, key_ref: keys.KeyRef, policy_label: str,
                 compact_files: int | None = None):
        super().__init__()
        self._run, self._key_ref, self._policy = run, key_ref, policy_label
        self._complete = complete_runs(run.private)
        selection = inc.select(run.private)
        self._files = list(selection.files)
        limit = inc.COMPACT_FILES if compact_files is None else compact_files
        self._plan = (inc.compaction_plan(run.private, run.run_id, selection)
                      if len(selection.replaces) > limit else None)

    @property
    def compacts(self) -> bool:
        return self._plan is not None

    def expand(self, refs):
        keyed = refs | "KeyByInput" >> beam.ParDo(_KeyByInputFn(self._key_ref))
        records = (
            refs.pipeline
            | "RecordFiles" >> beam.Create(self._files or [None])
            | "SpreadRecordFiles" >> beam.Reshuffle()
            | "ReadRecords" >> beam.ParDo(_ReadRecordsFn(self._run.private))
        )
        compact_dir = inc.compaction_dir(self._run.private, self._run.run_id) if self._plan else None
        if self._plan:  # written by the run itself: a graph built and never run leaves nothing
            (refs.pipeline | "CompactionPlan" >> beam.Create([self._plan])
             | "WritePlan" >> beam.Map(lambda data, d=compact_dir: storage.write_bytes(
                 f"{d}/{inc.PLAN}", data, content_type="application/json")))
        return (
            {"ref": keyed, "rec": records}
            | "ByInputKey" >> beam.CoGroupByKey()
            | "Decide" >> beam.ParDo(_DecideFn(self._run, self._policy, self._complete, compact_dir)).with_outputs(
                OUTCOME, main=MAIN)
        )


class _KeyByInputFn(beam.DoFn):
    def __init__(self, key_ref):
        self._key_ref = key_ref

    def setup(self):
        self._deriver = keys.Deriver(keys.resolve(self._key_ref))

    def process(self, fref):
        yield self._deriver.input_key(fref.uri), fref


class _ReadRecordsFn(beam.DoFn):
    """Record file -> (input_key, row). A file that vanished since it was listed was replaced
    by a compaction that committed meanwhile: read the committed compactions instead (once
    per process; rows read twice are harmless, see ``incremental.latest``)."""

    def __init__(self, private: str):
        self._private = private

    def setup(self):
        self._files = counter("incremental", "record_files_read")
        self._vanished = counter("incremental", "record_files_vanished")
        self._done: set = set()

    def _read(self, uri):
        data = b"".join(storage.iter_chunks(uri))
        self._files.inc()
        return inc.from_parquet_bytes(data)

    def process(self, uri):
        if uri is None:  # no record yet
            return
        pending = [uri]
        for _attempt in range(5):
            missing = []
            for u in pending:
                try:
                    rows = self._read(u)
                except (storage.ObjectNotFound, FileNotFoundError):
                    missing.append(u)
                    continue
                for row in rows:
                    yield row["input_key"], row
            if not missing:
                return
            self._vanished.inc(len(missing))
            sel = inc.select(self._private)
            pending = [u for u in sel.files if "/compact-" in u and u not in self._done]
            self._done.update(pending)
            if not pending:
                return
        raise storage.StorageError("the incremental record kept changing while it was read")


class _DecideFn(beam.DoFn):
    def __init__(self, run, policy, complete, compact_dir=None):
        self._run, self._policy, self._complete = run, policy, complete
        self._compact_dir = compact_dir

    def setup(self):
        self._new = counter("incremental", "new")
        self._changed = counter("incremental", "reprocessed")
        self._skipped = counter("incremental", "unchanged_skipped")
        self._recovered = counter("incremental", "recovered")

    def start_bundle(self):
        self._rec = _Recorder(inc.records_dir(self._run.private, self._run.run_id))
        # compaction parts need no early flush (uncommitted until the run succeeded): few, large
        self._compacted = (_Recorder(self._compact_dir, rows=COMPACT_PART_ROWS, seconds=float("inf"))
                           if self._compact_dir else None)

    def process(self, element):
        input_key, grouped = element
        refs = list(grouped["ref"])
        recs = list(grouped["rec"])
        if self._compacted is not None:  # every input the record knows, listed now or not
            for row in inc.reduce_rows(recs, self._complete):
                self._compacted.add(row)
        # no refs: recorded earlier, not listed now (deleted, or outside this run's patterns)
        fref = refs[0] if refs else None  # overlapping patterns: one input, once
        prior = inc.latest(recs, self._complete) if refs else None
        action, prior_fp = inc.decide(fref.version, self._policy, prior) if refs else (None, "")
        if action == inc.SKIP:
            self._skipped.inc()
        elif action is not None:
            self._rec.add(inc.listed_row(self._run.run_id, input_key, fref.uri, fref.version, self._policy))
            if action == inc.RECOVER:
                self._recovered.inc()
                yield beam.pvalue.TaggedOutput(OUTCOME, Outcome(inc.recovered_row(prior, self._run), {}))
            else:
                (self._changed if prior is not None else self._new).inc()
                yield fref._replace(prior_fingerprint=prior_fp) if prior_fp else fref

    def finish_bundle(self):
        self._rec.flush()
        if self._compacted is not None:
            self._compacted.flush()


class RecordFinished(beam.PTransform):
    """Outcomes -> ``finished`` rows in the private record, flushed as they accumulate.
    Apply it to each producer of outcomes (before any Flatten) so it fuses with the step
    that made the decision: a row is durable soon after its object is committed."""

    def __init__(self, run: manifest.RunInfo, policy_label: str):
        super().__init__()
        self._run, self._policy = run, policy_label

    def expand(self, outcomes):
        return outcomes | "Record" >> beam.ParDo(_RecordFinishedFn(self._run, self._policy))


class _RecordFinishedFn(beam.DoFn):
    def __init__(self, run, policy):
        self._run, self._policy = run, policy

    def setup(self):
        self._n = counter("incremental", "finished_recorded")

    def start_bundle(self):
        self._rec = _Recorder(inc.records_dir(self._run.private, self._run.run_id))

    def process(self, outcome):
        self._rec.add(inc.finished_row(self._run.run_id, outcome.row, self._policy))
        self._n.inc()
        return ()

    def finish_bundle(self):
        self._rec.flush()


def record_all(producers: dict, run: manifest.RunInfo, policy_label: str) -> None:
    """``RecordFinished`` on every producer of outcomes (label -> PCollection)."""
    for label, pcoll in producers.items():
        pcoll | f"RecordFinished{label}" >> RecordFinished(run, policy_label)


def summary_counts(metrics_result) -> dict:
    """Incremental counters from a pipeline result (for the run summary)."""
    out = {}
    try:
        from apache_beam.metrics.metric import MetricsFilter
        res = metrics_result.metrics().query(MetricsFilter().with_namespace("dicom_deid.incremental"))
        for c in res.get("counters", []):
            out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(c.committed or c.attempted or 0)
    except Exception:  # metrics are a convenience; the record and the manifest are the truth
        return {}
    return {k: out.get(k, 0) for k in ("new", "reprocessed", "unchanged_skipped", "recovered")}
