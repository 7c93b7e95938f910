"""Sinks: public manifest (Parquet), private linkage table (Parquet), private dead letters
(JSON Lines), and the progress side channel for local runs.

How a run's files appear, on every runner:

1. ``Write*`` (a ParDo fused with the stage that makes the records): each bundle's records go
   into one local temporary file, which at the end of the bundle is uploaded (local: moved)
   to ``{folder}/beam-temp-{stem}/{uuid}{suffix}``, and its name is emitted. A bundle that
   fails leaves at most a temporary object nobody names; its retry writes another.
2. :class:`PublishFiles` (one small stage for every sink of the run, after everything else):
   takes the names that reached it (only committed bundles' names do) and moves each to
   ``{folder}/{stem}-{i:05d}-of-{n:05d}{suffix}``, in sorted order, so a retried publish
   gives the same names and skips what it already moved; then removes the temporary folders.
   A Parquet sink that received no record still gets one file with the schema and no row,
   so every run's manifest can be read; the dead letters then have no file at all.

Until the publish step nothing is visible under the final names: a run killed before it
leaves only ``beam-temp-*`` folders, which ``dicom-deid gc`` and the next run's clean-up
remove (the prefix is the one Beam's own file sinks use, which earlier versions wrote
with, so one rule covers both).

Why not Beam's ``WriteToParquet``/``WriteToText``: each brings about five stages (its own
initialise, write, group, pre-finalise and finalise), twenty for the four sinks of a run,
and on the local runner every stage costs tens of milliseconds in each worker however few
records it has; building them was also about a third of the time to build the pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import uuid

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows

from .. import manifest, storage
from .common import BundleLocalFile, tmp_dir

#: rows a Parquet writer buffers before it writes them as a row group
ROW_GROUP_ROWS = 2000
#: rows held as Python dicts before they become one Arrow record batch: a manifest row is
#: about 40 columns, some 3 kB as a dict and a few hundred bytes in Arrow, so a row group
#: waits as batches (about 1 MB) rather than as 2,000 dicts (about 7 MB)
BATCH_ROWS = 250
assert ROW_GROUP_ROWS % BATCH_ROWS == 0, "row groups are whole batches"
#: the folder prefix of unpublished parts (also what ``dicom-deid gc`` removes)
TEMP_PREFIX = "beam-temp-"


@dataclasses.dataclass(frozen=True)
class Sink:
    """Where and how one kind of record is written. Plain values: pickled into DoFns."""

    name: str
    folder: str
    stem: str
    suffix: str
    #: "manifest" or "linkage" (Parquet with that schema), or "jsonl"
    kind: str

    def schema(self):
        return {"manifest": manifest.SCHEMA, "linkage": manifest.LINKAGE_SCHEMA}.get(self.kind)

    @property
    def write_empty(self) -> bool:
        """Parquet sinks publish a file with the schema and no row when they received none."""
        return self.schema() is not None

    def temp_folder(self) -> str:
        return f"{self.folder.rstrip('/')}/{TEMP_PREFIX}{self.stem}"

    def final_name(self, i: int, n: int) -> str:
        return f"{self.folder.rstrip('/')}/{self.stem}-{i:05d}-of-{n:05d}{self.suffix}"


class LocalPart:
    """One bundle's records in a local temporary file: Parquet with ``schema`` (rows as
    dicts), else lines of text; :meth:`publish` uploads it, :meth:`discard` drops it."""

    def __init__(self, suffix: str, schema=None):
        fd, self.path = tempfile.mkstemp(prefix="dicom-deid-part-", suffix=suffix, dir=tmp_dir())
        self._schema = schema
        self._rows: list = []
        self._batches: list = []
        self._batched = 0
        self._pq = None
        if schema is None:
            self._f = os.fdopen(fd, "wb")
        else:
            os.close(fd)
            import pyarrow.parquet as pq
            self._f = None
            self._pq = pq.ParquetWriter(self.path, schema, compression="zstd")

    def add(self, record) -> None:
        if self._pq is None:
            self._f.write(record.encode("utf-8") + b"\n")
            return
        self._rows.append(record)
        if len(self._rows) >= BATCH_ROWS:
            self._batch()
            if self._batched >= ROW_GROUP_ROWS:
                self._flush()

    def _batch(self) -> None:
        if self._rows:
            import pyarrow as pa
            self._batches.append(pa.RecordBatch.from_pylist(self._rows, schema=self._schema))
            self._batched += len(self._rows)
            self._rows = []

    def _flush(self) -> None:
        """Write what is buffered as one row group."""
        self._batch()
        if self._batches:
            import pyarrow as pa
            self._pq.write_table(pa.Table.from_batches(self._batches),
                                 row_group_size=max(self._batched, 1))
            self._batches, self._batched = [], 0

    def publish(self, uri: str) -> None:
        """Close the file and move it to ``uri`` (nothing of it is left locally)."""
        try:
            if self._pq is not None:
                self._flush()
                self._pq.close()
            else:
                self._f.close()
            storage.write_file(uri, self.path, move=True)
        finally:
            self.discard()

    def discard(self) -> None:
        try:
            if self._pq is not None:
                self._pq.close()
            elif not self._f.closed:
                self._f.close()
        except Exception:  # noqa: BLE001 - a broken part is thrown away either way
            pass
        try:
            os.unlink(self.path)
        except OSError:
            pass


class _WritePartsFn(BundleLocalFile, beam.DoFn):
    """Records -> one temporary object per bundle; emits ``(sink name, temporary URI)``."""

    def __init__(self, sink: Sink):
        self._sink = sink

    def setup(self):
        storage.configure()

    def process(self, record):
        if self._local is None:
            self._local = LocalPart(self._sink.suffix, self._sink.schema())
        self._local.add(record)

    def finish_bundle(self):
        part = self._take_local()
        if part is None:
            return
        uri = f"{self._sink.temp_folder()}/{uuid.uuid4().hex}{self._sink.suffix}"
        part.publish(uri)
        yield GlobalWindows.windowed_value((self._sink.name, uri))


class _PublishFn(beam.DoFn):
    """Moves every committed part to its final name; returns ``(sink name, [final URIs])``."""

    def __init__(self, sinks):
        self._sinks = tuple(sinks)

    def setup(self):
        storage.configure()

    def process(self, _, parts):
        names: dict = {}
        for name, uri in parts:
            names.setdefault(name, set()).add(uri)
        for sink in self._sinks:
            temps = sorted(names.get(sink.name, ()))
            finals = [sink.final_name(i, len(temps)) for i in range(len(temps))]
            for src, dst in zip(temps, finals):
                _move(src, dst)
            if not temps and sink.write_empty:
                finals = [sink.final_name(0, 1)]
                LocalPart(sink.suffix, sink.schema()).publish(finals[0])  # a Parquet file with no row group
            yield sink.name, finals
        for folder in {s.temp_folder() for s in self._sinks}:
            storage.delete_prefix(folder)


def _move(src: str, dst: str) -> None:
    """``src`` -> ``dst``; a move this publish (or an earlier attempt of it) already did is fine."""
    if storage.is_local(src):
        try:
            os.makedirs(os.path.dirname(storage.local_path(dst)), exist_ok=True)
            os.replace(storage.local_path(src), storage.local_path(dst))
        except FileNotFoundError:
            if not os.path.exists(storage.local_path(dst)):
                raise
        return
    if storage.stat(src) is None:
        if storage.stat(dst) is None:
            raise FileNotFoundError("a committed part is missing from the sink's temporary folder")
        return
    storage.copy(src, dst)
    storage.delete(src)


class PublishFiles(beam.PTransform):
    """The parts of every sink (the ``Write*`` outputs, flattened) -> their final names, in
    one step after all of them (see the module docstring)."""

    def __init__(self, sinks):
        super().__init__()
        self._sinks = tuple(sinks)

    def expand(self, parts):
        return (parts.pipeline | "Start" >> beam.Impulse()
                | "Publish" >> beam.ParDo(_PublishFn(self._sinks), beam.pvalue.AsList(parts)))


class _SinkWrite(beam.PTransform):
    sink: Sink

    def records(self, pcoll):  # pragma: no cover - abstract
        raise NotImplementedError

    def expand(self, pcoll):
        return self.records(pcoll) | "Write" >> beam.ParDo(_WritePartsFn(self.sink))


class WriteManifest(_SinkWrite):
    """Outcome rows -> parts of ``{output}/manifest/run-{id}/part[-{part}]-*.parquet``."""

    def __init__(self, run: manifest.RunInfo, progress_dir: str | None = None, part: str = ""):
        super().__init__()
        self._progress = progress_dir
        stem = "part" + (f"-{part}" if part else "")
        self.sink = Sink(f"manifest{'-' + part if part else ''}", run.manifest_dir(), stem,
                         ".parquet", "manifest")

    def records(self, outcomes):
        rows = outcomes | "Rows" >> beam.Map(lambda o: o.row)
        if self._progress:
            rows = rows | "Progress" >> beam.ParDo(_ProgressFn(self._progress))
        return rows


class WriteLinkage(_SinkWrite):
    """Private linkage rows -> parts of ``{private}/linkage/run-{id}/part-*.parquet``."""

    def __init__(self, run: manifest.RunInfo):
        super().__init__()
        self.sink = Sink("linkage", run.private_dir("linkage"), "part", ".parquet", "linkage")

    def records(self, rows):
        return rows


class WriteDeadLetters(_SinkWrite):
    """DeadLetters -> parts of ``{private}/dead_letters/run-{id}/part[-{part}]-*.jsonl`` (class,
    stage, fixed description and the input URI; never an exception message). A run without
    dead letters has no file here. The commit's own failures (``part="commit"``) have an empty
    URI: none crosses the shuffle before the commit; the linkage row of the input key has it."""

    def __init__(self, run: manifest.RunInfo, part: str = ""):
        super().__init__()
        self.sink = Sink(f"dead_letters{'-' + part if part else ''}", run.private_dir("dead_letters"),
                         "part" + (f"-{part}" if part else ""), ".jsonl", "jsonl")

    def records(self, dead_letters):
        return dead_letters | "ToJson" >> beam.Map(lambda d: json.dumps(d.to_json(), sort_keys=True))


class _ProgressFn(beam.DoFn):
    """Appends one byte per finished input to a per-process file; the launcher sums the
    sizes. A side channel because the local runner reports metrics only at the end."""

    def __init__(self, progress_dir: str):
        self._dir = progress_dir

    def setup(self):
        self._f = None
        try:
            self._f = open(os.path.join(self._dir, f"{os.getpid()}.count"), "ab", buffering=0)
        except OSError:
            self._f = None

    def process(self, row):
        if self._f is not None:
            try:
                self._f.write(b".")
            except OSError:
                pass
        yield row

    def teardown(self):
        if self._f is not None:
            self._f.close()
