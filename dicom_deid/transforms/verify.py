"""``VerifyNoPHI``: serialise each object and look again, independently of the rules
that cleaned it. Findings quarantine the object (reason ``residual_phi``/``original_uid``)."""

from __future__ import annotations

import apache_beam as beam

from .. import verify, writer
from .common import object_pardo, DEAD_LETTER, MAIN, OUTCOME, ObjectStageFn, counter, quarantine, tmp_dir


class VerifyNoPHI(beam.PTransform):
    def __init__(self, run):
        super().__init__()
        self._run = run

    def expand(self, objects):
        return objects | "Verify" >> object_pardo(_VerifyFn(self._run)).with_outputs(
            OUTCOME, DEAD_LETTER, main=MAIN)


class _VerifyFn(ObjectStageFn):
    stage = "verify"
    module = "verify"

    def setup(self):
        self._findings = counter("verify", "objects_with_findings")

    def handle(self, obj):
        if obj.temp_path and writer.has_deferred(obj.dataset):  # (only temp-file inputs defer)
            # a large input read with deferred values: serialise to a local temp file, the
            # deferred values copied in chunks (release() removes it, also on failure)
            obj.output_file = data = writer.serialize_to_file(obj.dataset, tmp_dir())
        else:
            data = writer.serialize(obj.dataset)
        findings = verify.find_residuals(obj, data)
        if findings:
            self._findings.inc()
            reason = findings[0].split(":", 1)[0]
            yield quarantine(self._run, obj, self.stage, reason, verification="findings")
            return
        if obj.output_file is None:
            obj.output_bytes = data
        obj.facts["verification"] = "passed"
        meta = obj.dataset.file_meta
        obj.facts["transfer_syntax_out"] = str(meta.get("TransferSyntaxUID", "") or "") or None
        yield obj
