"""Find inputs and read them: ``MatchInputs`` (file patterns -> FileRef, fanned out) and
``ReadDicom`` (FileRef -> DicomObject, or a skipped/failed outcome).

The fan-out (``Reshuffle``) is on file references only; ``ReadDicom`` and everything that
touches content after it are fused ParDos, so object content never crosses a shuffle.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import NamedTuple

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from .. import incremental, keys, manifest, memory, reader, storage
from ..element import SKIPPED, InputRef, Outcome
from ..errors import InputTooLarge
from .common import object_pardo, DEAD_LETTER, MAIN, OUTCOME, TRANSIENT, counter, fail, tmp_dir

#: objects up to this size are read into memory; larger ones stream to a local temp file
IN_MEMORY_MAX = 64 * 1024 * 1024


class FileRef(NamedTuple):
    uri: str
    size: int
    #: the store's version when listed (``gen:``/``etag:``/``mtime:``; see dicom_deid.storage)
    version: str = ""
    #: incremental runs: content fingerprint recorded when this input last finished
    prior_fingerprint: str = ""


class MatchInputs(beam.PTransform):
    """File patterns (local, gs://, s3://; recursive globs) -> FileRef, then Reshuffle.

    Listing is split across workers: each pattern is first *planned* (``storage.plan_listing``:
    up to a few folder levels are opened with one ``scandir`` / delimiter ``/`` listing each,
    giving the objects directly in them and sub-folders or key prefixes as listing tasks);
    the tasks are fanned out (Reshuffle) and listed in parallel (``storage.iter_task``),
    each streamed page by page; then every FileRef is fanned out again. Each object is
    listed exactly once, by the planner or by one task; names are never collected."""

    def __init__(self, patterns):
        super().__init__()
        self._patterns = list(patterns)

    def expand(self, pbegin):
        planned = (
            pbegin
            | "Patterns" >> beam.Create(self._patterns)
            | "PlanListing" >> beam.ParDo(_PlanListingFn()).with_outputs(_TASKS, main=MAIN)
        )
        listed = (
            planned[_TASKS]
            | "FanOutListing" >> beam.Reshuffle()
            | "List" >> beam.ParDo(_ListFn())
        )
        return (
            (planned[MAIN], listed)
            | "Listed" >> beam.Flatten()
            | "FanOut" >> beam.Reshuffle()
        )


_TASKS = "listing_tasks"


class _PlanListingFn(beam.DoFn):
    """Pattern -> FileRef for objects found while splitting, and (pattern, task) listing
    tasks (tagged ``listing_tasks``) for the rest."""

    def setup(self):
        self._listed = counter("read", "objects_listed")
        self._tasks = counter("read", "listing_tasks")
        self._retries = counter("storage", "retries")

    def process(self, pattern: str):
        for item in storage.plan_listing(pattern, on_retry=self._retries.inc):
            if isinstance(item, str):
                self._tasks.inc()
                yield beam.pvalue.TaggedOutput(_TASKS, (pattern, item))
            else:
                self._listed.inc()
                yield FileRef(item.uri, item.size, item.version)


class _ListFn(beam.DoFn):
    """(pattern, task) -> FileRef per matching object under the task's folder or prefix,
    streamed (no list of all names)."""

    def setup(self):
        self._listed = counter("read", "objects_listed")
        self._retries = counter("storage", "retries")

    def process(self, task):
        pattern, where = task
        for info in storage.iter_task(pattern, where, on_retry=self._retries.inc):
            self._listed.inc()
            yield FileRef(info.uri, info.size, info.version)


class ReadDicom(beam.PTransform):
    """FileRef -> DicomObject (``main``); DICOMDIR -> skipped and unreadable -> failed
    (``outcome``); private ``dead_letter``."""

    def __init__(self, run: manifest.RunInfo, key_ref: keys.KeyRef, max_input_bytes: int):
        super().__init__()
        self._run, self._key_ref, self._max = run, key_ref, max_input_bytes

    def expand(self, refs):
        return refs | "ReadObjects" >> object_pardo(
            _ReadDicomFn(self._run, self._key_ref, self._max)
        ).with_outputs(OUTCOME, DEAD_LETTER, main=MAIN)


class _ReadDicomFn(beam.DoFn):
    def __init__(self, run, key_ref, max_input_bytes):
        self._run, self._key_ref, self._max = run, key_ref, max_input_bytes

    def setup(self):
        memory.start_trimming()  # local runs only (dicom_deid.memory)
        self._deriver = keys.Deriver(keys.resolve(self._key_ref))
        self._read = counter("read", "objects_read")
        self._bytes = counter("read", "bytes_read")
        self._retries = counter("storage", "retries")

    def process(self, fref: FileRef):
        ref = InputRef(fref.uri, self._deriver.input_key(fref.uri), fref.size)
        temp_path = None
        try:
            if fref.size > self._max:
                raise InputTooLarge()
            data, temp_path, sha = self._fetch(fref)
            obj = reader.parse(ref, self._deriver, data=data, path=temp_path, sha256=sha,
                               temp_path=temp_path)
            temp_path = None  # now owned by obj
        except TRANSIENT:
            self._cleanup(temp_path)
            raise
        except Exception as exc:
            self._cleanup(temp_path)
            yield from fail(self._run, ref, "read", exc, module="read")
            return
        self._read.inc()
        self._bytes.inc(obj.facts.get("input_size") or 0)
        if fref.prior_fingerprint and not obj.facts.get("reason"):
            # incremental run: this input finished before; say whether its content changed
            obj.facts["reason"] = incremental.change_reason(fref.prior_fingerprint, obj.fingerprint)
        if obj.facts.get("reason") == "dicomdir":
            # directory records hold names and paths: never copied
            row = manifest.row(self._run, ref.input_key, SKIPPED, stage="read", reason="dicomdir",
                               content_fingerprint=obj.fingerprint,
                               **{k: v for k, v in obj.facts.items() if k in manifest.COLUMNS and k != "reason"})
            obj.release()
            yield beam.pvalue.TaggedOutput(OUTCOME, Outcome(row, {}))
            return
        yield obj

    @staticmethod
    def _cleanup(path):
        if path:
            try:
                os.unlink(path)
            except OSError:
                pass

    def _fetch(self, fref: FileRef):
        """Bytes in memory for small objects; a local temp file for large ones (ranged,
        retried chunks; 403/404 raise storage.AccessDenied/ObjectNotFound: dead letters)."""
        try:
            return storage.fetch(fref.uri, fref.size, self._max, IN_MEMORY_MAX, tmp_dir(),
                                 on_retry=self._retries.inc)
        except storage.TooLarge:
            raise InputTooLarge() from None
