"""Sinks: public manifest (Parquet), private linkage table (Parquet), private dead letters
(JSON Lines), and the progress side channel for local runs.

All writes use ``num_shards=0`` so records are written by the ParDo that receives them;
only the temporary file names are grouped at finalisation, never the records.
"""

from __future__ import annotations

import json
import os

import apache_beam as beam
from apache_beam.io.parquetio import WriteToParquet

from .. import manifest

#: bytes of rows a Parquet writer buffers before it writes them as a row group. Beam's
#: default (64 MB) keeps every row of a local run's bundle (the whole run) in the worker
#: until the file closes; 4 MB is still several thousand rows per group.
ROW_GROUP_BYTES = 4 * 1024 * 1024


class WriteManifest(beam.PTransform):
    """Outcome rows -> ``{output}/manifest/run-{id}/part[-{part}]-*.parquet``."""

    def __init__(self, run: manifest.RunInfo, progress_dir: str | None = None, part: str = ""):
        super().__init__()
        self._run, self._progress, self._part = run, progress_dir, part

    def expand(self, outcomes):
        rows = outcomes | "Rows" >> beam.Map(lambda o: o.row)
        if self._progress:
            rows = rows | "Progress" >> beam.ParDo(_ProgressFn(self._progress))
        prefix = f"{self._run.manifest_dir()}/part" + (f"-{self._part}" if self._part else "")
        return rows | "Parquet" >> WriteToParquet(
            prefix, schema=manifest.SCHEMA, file_name_suffix=".parquet", codec="zstd",
            row_group_buffer_size=ROW_GROUP_BYTES)


class WriteLinkage(beam.PTransform):
    """Private linkage rows -> ``{private}/linkage/run-{id}/part-*.parquet``."""

    def __init__(self, run: manifest.RunInfo):
        super().__init__()
        self._run = run

    def expand(self, rows):
        return rows | "Parquet" >> WriteToParquet(
            f"{self._run.private_dir('linkage')}/part", schema=manifest.LINKAGE_SCHEMA,
            file_name_suffix=".parquet", codec="zstd", row_group_buffer_size=ROW_GROUP_BYTES)


class WriteDeadLetters(beam.PTransform):
    """DeadLetters -> ``{private}/dead_letters/run-{id}/part-*.jsonl`` (class, stage, fixed
    description and the input URI; never an exception message)."""

    def __init__(self, run: manifest.RunInfo):
        super().__init__()
        self._run = run

    def expand(self, dead_letters):
        return (
            dead_letters
            | "ToJson" >> beam.Map(lambda d: json.dumps(d.to_json(), sort_keys=True))
            # skip_if_empty: Beam's S3 writer cannot finish an empty object (a multipart
            # upload with no part), so a run without dead letters writes no file at all
            | "Jsonl" >> beam.io.WriteToText(f"{self._run.private_dir('dead_letters')}/part",
                                             file_name_suffix=".jsonl", skip_if_empty=True)
        )


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
