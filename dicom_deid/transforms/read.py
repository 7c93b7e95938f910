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

from .. import keys, manifest, reader
from ..element import SKIPPED, InputRef, Outcome
from ..errors import InputTooLarge
from .common import object_pardo, DEAD_LETTER, MAIN, OUTCOME, TRANSIENT, counter, fail, tmp_dir

#: objects up to this size are read into memory; larger ones stream to a local temp file
IN_MEMORY_MAX = 64 * 1024 * 1024


class FileRef(NamedTuple):
    uri: str
    size: int


class MatchInputs(beam.PTransform):
    """File patterns (local, gs://, s3://; recursive globs) -> FileRef, then Reshuffle."""

    def __init__(self, patterns):
        super().__init__()
        self._patterns = list(patterns)

    def expand(self, pbegin):
        return (
            pbegin
            | "Patterns" >> beam.Create(self._patterns)
            | "Match" >> fileio.MatchAll()
            | "ToFileRef" >> beam.Map(lambda m: FileRef(m.path, int(m.size_in_bytes or 0)))
            | "FanOut" >> beam.Reshuffle()
        )


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
        self._deriver = keys.Deriver(keys.resolve(self._key_ref))
        self._read = counter("read", "objects_read")
        self._bytes = counter("read", "bytes_read")

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
        """Bytes in memory for small objects; a local temp file for large ones."""
        uri = fref.uri
        if "://" not in uri and fref.size <= IN_MEMORY_MAX:
            with open(uri, "rb") as f:
                data = f.read(self._max + 1)
            if len(data) > self._max:
                raise InputTooLarge()
            return data, None, hashlib.sha256(data).hexdigest()
        h = hashlib.sha256()
        with FileSystems.open(uri, compression_type="uncompressed") as src:
            if fref.size <= IN_MEMORY_MAX:
                data = src.read()
                h.update(data)
                return data, None, h.hexdigest()
            fd, path = tempfile.mkstemp(prefix="dicom-deid-", suffix=".dcm", dir=tmp_dir())
            total = 0
            with os.fdopen(fd, "wb") as dst:
                while True:
                    chunk = src.read(8 << 20)
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > self._max:
                        dst.close()
                        os.unlink(path)
                        raise InputTooLarge()
                    h.update(chunk)
                    dst.write(chunk)
        return None, path, h.hexdigest()
