"""``DeidentifyTags``: header de-identification per policy, with the pseudonym map as a
side input served per key (``AsMultiMap``: portable runners fetch one key at a time)."""

from __future__ import annotations

import apache_beam as beam

from .. import keys, tags
from ..policy import Policy
from ..pseudonyms import original_person_ids
from .pseudonyms import NEW_PATIENTS, route_by_map
from .common import object_pardo, DEAD_LETTER, MAIN, OUTCOME, ObjectStageFn, counter


class DeidentifyTags(beam.PTransform):
    """De-identifies header attributes per a Policy. Outputs: main, outcome, dead_letter.

    ``pseudonyms`` is a PCollection of ``(patient_key_hmac, entry)`` where entry is a dict
    with ``pseudonym`` and ``date_offset_days``; patients without an entry get the keyed
    derivation. Keys are HMACs: no plaintext identifier is ever broadcast.
    """

    def __init__(self, run, policy: Policy, key_ref: keys.KeyRef, pseudonyms, require_entry: bool = False,
                 report_new: bool = False):
        super().__init__()
        self._run, self._policy, self._key_ref, self._pseudonyms = run, policy, key_ref, pseudonyms
        #: True when the map was built for this run (BuildPseudonymMap): an object without
        #: an entry is quarantined (pseudonym_missing), never given a derived pseudonym
        self._require_entry = require_entry
        #: direct mode (no header scan; the map holds only the store's exceptions): also
        #: output ``new_patients``, (HMAC, derived entry) of patients without an entry, for
        #: the store (CommitNewPatients)
        self._report_new = report_new

    def expand(self, objects):
        return objects | "ApplyTagRules" >> object_pardo(
            _DeidentifyTagsFn(self._run, self._policy, self._key_ref, self._require_entry, self._report_new),
            pseudonyms=beam.pvalue.AsMultiMap(self._pseudonyms),
        ).with_outputs(OUTCOME, DEAD_LETTER, NEW_PATIENTS, main=MAIN)


class _DeidentifyTagsFn(ObjectStageFn):
    stage = "tags"
    module = "tags"

    #: new patients reported per DoFn instance are remembered up to this many (repeats are
    #: also merged downstream; this only keeps the shuffle small)
    REPORTED_MAX = 100_000
    #: map lookups remembered per DoFn instance (patient-key HMAC -> entry or None)
    ENTRIES_MAX = 50_000

    def __init__(self, run, policy, key_ref, require_entry=False, report_new=False):
        super().__init__(run)
        self._policy, self._key_ref = policy, key_ref
        self._require_entry, self._report_new = require_entry, report_new

    def setup(self):
        self._rules = tags.compile_rules(self._policy, keys.resolve(self._key_ref))
        self._done = counter("tags", "objects_deidentified")
        self._reported: set = set()
        # each lookup of the map (a multimap side input) is a request to the runner: one per
        # object, though a patient has many. The map is a batch side input in the global
        # window, fixed for the whole job, so an answer stays true across bundles
        self._entries: dict = {}

    def handle(self, obj, pseudonyms):
        mode = getattr(self._policy, "person_key", "patient_id")
        obj.patient_key = tags.patient_key_of(obj.dataset, self._rules.deriver, mode)
        # a lookup returns an iterable of the key's values (a list in-process, a state-backed
        # iterable on portable runners): take the first, never index it
        key = obj.patient_key
        if key in self._entries:
            entry = self._entries[key]
        else:
            entry = next(iter(pseudonyms[key]), None)
            if len(self._entries) >= self.ENTRIES_MAX:
                self._entries.clear()
            self._entries[key] = entry
        routed = route_by_map(self._run, obj, entry, self._require_entry)  # excluded / quarantined
        if routed is not None:
            yield routed
            return
        obj.private.update(original_person_ids(obj.dataset, mode))  # private linkage only
        tags.deidentify(obj, self._rules, entry)
        self._done.inc()
        if self._report_new and entry is None and obj.patient_key not in self._reported:
            if len(self._reported) >= self.REPORTED_MAX:
                self._reported.clear()
            self._reported.add(obj.patient_key)
            m = tags.mapping_for(obj.patient_key, self._rules.deriver, None)
            yield beam.pvalue.TaggedOutput(NEW_PATIENTS, (obj.patient_key, {
                "pseudonym": m.pseudonym, "date_offset_days": m.date_offset_days}))
        yield obj
