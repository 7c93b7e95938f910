"""``CleanAttachments``: encapsulated documents and structured reports. Fail closed: no
document stage yet, so such objects are quarantined with reason ``document_stage_missing``."""

from __future__ import annotations

import apache_beam as beam

from .. import classify
from .common import object_pardo, DEAD_LETTER, MAIN, OUTCOME, ObjectStageFn, counter, quarantine


def _kind(sop: str) -> str:
    if sop.startswith("1.2.840.10008.5.1.4.1.1.104.1"):
        return "pdf"
    if sop.startswith("1.2.840.10008.5.1.4.1.1.104.2"):
        return "cda"
    if sop.startswith(classify.SR_PREFIX):
        return "sr"
    return "document"


class CleanAttachments(beam.PTransform):
    def __init__(self, run, policy):
        super().__init__()
        self._run, self._policy = run, policy

    def expand(self, objects):
        return objects | "CheckAttachments" >> object_pardo(
            _CleanAttachmentsFn(self._run, self._policy)).with_outputs(OUTCOME, DEAD_LETTER, main=MAIN)


class _CleanAttachmentsFn(ObjectStageFn):
    stage = "attachments"
    module = "attachments"

    def __init__(self, run, policy):
        super().__init__(run)
        self._policy = policy

    def setup(self):
        self._quarantined = counter("attachments", "quarantined_no_document_stage")

    def handle(self, obj):
        reason = classify.needs_stage(obj.dataset, obj.facts.get("sop_class_uid"))
        if reason == classify.DOCUMENT_STAGE_MISSING:
            self._quarantined.inc()
            kind = _kind(obj.facts.get("sop_class_uid") or "")
            yield quarantine(self._run, obj, self.stage, reason, attachment_kind=kind,
                             attachment_action="quarantined")
            return
        yield obj
