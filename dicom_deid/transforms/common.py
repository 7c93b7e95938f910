"""Shared plumbing of the content stages: output tags, routing, counters."""

from __future__ import annotations

import os
from typing import Iterator, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from .. import manifest
from ..element import FAILED, QUARANTINED, DicomObject, Outcome
from ..errors import DeadLetter, StorageError

MAIN = "main"
OUTCOME = "outcome"
DEAD_LETTER = "dead_letter"

# Exceptions that mean "storage hiccup": let the runner retry the bundle.
TRANSIENT = (StorageError, ConnectionError, TimeoutError)


def counter(module: str, name: str):
    return Metrics.counter(f"dicom_deid.{module}", name)


def outcome_from_object(run: manifest.RunInfo, obj: DicomObject, status: str, **fields) -> Outcome:
    cols = {k: v for k, v in obj.facts.items() if k in manifest.COLUMNS}
    cols.update(fields)
    cols.setdefault("content_fingerprint", obj.fingerprint)
    return Outcome(manifest.row(run, obj.ref.input_key, status, **cols), {})


def quarantine(run: manifest.RunInfo, obj: DicomObject, stage: str, reason: str, **fields):
    out = outcome_from_object(run, obj, QUARANTINED, stage=stage, reason=reason, **fields)
    obj.release()
    return beam.pvalue.TaggedOutput(OUTCOME, out)


def fail(run: manifest.RunInfo, ref, stage: str, exc: BaseException, obj: Optional[DicomObject] = None,
         module: str = "pipeline", dead_letter: Optional[DeadLetter] = None) -> Iterator:
    """Route a permanent failure: a private dead letter plus a public ``failed`` row.
    ``dead_letter``, when given, is used as it is (a failure recorded by an earlier attempt)."""
    dl = dead_letter or DeadLetter.of(ref, stage, exc)
    counter(module, "dead_letters").inc()
    fields = {}
    if obj is not None:
        fields = {k: v for k, v in obj.facts.items() if k in manifest.COLUMNS}
        fields["content_fingerprint"] = obj.fingerprint
        obj.release()
    fields.update(stage=stage, error_class=dl.error_class, reason=dl.description)
    yield beam.pvalue.TaggedOutput(DEAD_LETTER, dl)
    yield beam.pvalue.TaggedOutput(OUTCOME, Outcome(manifest.row(run, ref.input_key, FAILED, **fields), {}))


class ObjectStageFn(beam.DoFn):
    """Base of the DoFns that take a DicomObject and pass it on or route it away."""

    stage = "stage"
    module = "pipeline"

    def __init__(self, run: manifest.RunInfo):
        self._run = run

    def process(self, obj: DicomObject, *args, **kwargs):
        try:
            yield from self.handle(obj, *args, **kwargs)
        except TRANSIENT:
            raise
        except Exception as exc:  # permanent: route, don't crash
            yield from fail(self._run, obj.ref, self.stage, exc, obj, self.module)

    def handle(self, obj: DicomObject, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError


class BundleLocalFile:
    """Mixin of DoFns that gather a bundle's records in a local file (``self._local``: any
    object with ``discard()``) and upload it when the bundle finishes: what a bundle that
    failed in this instance left is dropped at the next bundle and at teardown."""

    _local = None

    def start_bundle(self):
        self._drop_local()

    def teardown(self):
        self._drop_local()

    def _take_local(self):
        """The bundle's local file (None when it had no record), no longer held here."""
        local, self._local = self._local, None
        return local

    def _drop_local(self):
        if self._local is not None:
            self._local.discard()
        self._local = None


def tmp_dir() -> str:
    return os.environ.get("DICOM_DEID_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"


# --- DicomObjects never get encoded -----------------------------------------------------
from apache_beam.coders import coder_impl as _coder_impl  # noqa: E402
from apache_beam.coders import coders as _coders  # noqa: E402


class _InMemoryOnlyImpl(_coder_impl.StreamCoderImpl):
    def encode_to_stream(self, value, stream, nested):
        raise TypeError("DicomObject holds original identifiers and must never be serialized")

    def decode_from_stream(self, stream, nested):
        raise TypeError("DicomObject is never serialized")

    def estimate_size(self, value, nested=False):
        # Beam samples element sizes for its counters by encoding them; answer from the
        # object's own size instead (no encoding, no copy of PHI).
        try:
            return int(value.facts.get("input_size") or 0) or 1024
        except Exception:
            return 1024


class InMemoryOnlyCoder(_coders.Coder):
    """Coder of the PCollections of DicomObject: sizes are estimated, encoding refuses.

    The content stages are fused, so a runner never needs to encode these; if one ever
    tried (a broken fusion, a shuffle added by mistake), the job fails instead of leaking.
    """

    def _create_impl(self):
        return _InMemoryOnlyImpl()

    def is_deterministic(self):
        return False

    def to_type_hint(self):
        from ..element import DicomObject
        return DicomObject

    def __eq__(self, other):
        return type(self) is type(other)

    def __hash__(self):
        return hash(type(self))


def _register():
    from ..element import DicomObject
    from apache_beam.coders.typecoders import registry
    registry.register_coder(DicomObject, InMemoryOnlyCoder)


_register()


def object_pardo(fn: beam.DoFn, **side_inputs) -> beam.ParDo:
    """A ParDo whose main output is DicomObjects (never encoded; see InMemoryOnlyCoder)."""
    from ..element import DicomObject
    return beam.ParDo(fn, **side_inputs).with_output_types(DicomObject)
