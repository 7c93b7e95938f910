"""``CleanPixels``: burned-in text. Fail closed: this version has no pixel cleaner, so an
object that may carry burned-in text is quarantined with reason ``pixel_stage_missing``."""

from __future__ import annotations

import apache_beam as beam

from .. import classify
from .common import object_pardo, DEAD_LETTER, MAIN, OUTCOME, ObjectStageFn, counter, quarantine


class CleanPixels(beam.PTransform):
    def __init__(self, run, policy):
        super().__init__()
        self._run, self._policy = run, policy

    def expand(self, objects):
        return objects | "CheckPixels" >> object_pardo(_CleanPixelsFn(self._run, self._policy)).with_outputs(
            OUTCOME, DEAD_LETTER, main=MAIN)


class _CleanPixelsFn(ObjectStageFn):
    stage = "pixels"
    module = "pixels"

    def __init__(self, run, policy):
        super().__init__(run)
        self._policy = policy

    def setup(self):
        self._quarantined = counter("pixels", "quarantined_no_pixel_stage")

    def handle(self, obj):
        reason = classify.needs_stage(obj.dataset, obj.facts.get("sop_class_uid"))
        if reason == classify.PIXEL_STAGE_MISSING:
            self._quarantined.inc()
            yield quarantine(self._run, obj, self.stage, reason, pixel_action="quarantined")
            return
        obj.facts.setdefault("pixel_action", "none")
        yield obj
