"""``WriteDicom``: stage, decide duplicates, commit. Nothing is overwritten silently.

1. ``Stage`` (fused with the content stages) writes each verified object's bytes to
   ``{output}/.staging/run-{id}/{input_key}.dcm`` and emits a small record keyed by the new
   SOP Instance UID (a keyed UID: no PHI), plus the private linkage row.
2. ``GroupByKey`` on the new SOP UID brings together every input that would land on one
   output path (only those small records cross the shuffle). A record is one compact bytes
   value (``_pack``): the local runner holds every record of the run in the launcher's
   memory until the shuffle is read, and a bytes value costs there about a quarter of a
   dict of the same row. A failure while staging crosses the same shuffle (keyed
   ``!{input_key}``, never a SOP UID), so ``Commit`` emits every outcome of this transform
   and no Flatten is needed after it (each Flatten of the local runner is one more pass of
   every row through the launcher).
3. ``Commit`` orders each group by input key: the first one is published (local: rename;
   object stores: server-side copy of the staged object, which appears atomically, then
   delete); a later input with the same content fingerprint is ``duplicate``; one with other
   content is ``quarantined`` (``sop_uid_conflict``). An output already present from an
   earlier run with identical bytes is left as it is (``ok``); with other bytes the new one
   is ``quarantined`` (``sop_uid_conflict``), never overwritten.
"""

from __future__ import annotations

import os

import apache_beam as beam

from .. import manifest, storage, writer
from ..element import DUPLICATE, OK, QUARANTINED, Outcome
from .common import DEAD_LETTER, MAIN, OUTCOME, TRANSIENT, ObjectStageFn, counter, fail

LINKAGE = "linkage"
SOP_UID_CONFLICT = "sop_uid_conflict"
#: key prefix of failures that cross the shuffle (SOP UIDs are digits and dots)
_FAILED_KEY = "!"


def _pack(input_key: str, row: dict) -> bytes:
    """A staged record as one compact bytes value (``manifest.pack_values``): the input key
    and the row's columns. ``row`` holds manifest columns only."""
    return manifest.pack_values({**row, "input_key": input_key})


def _unpack(data: bytes) -> tuple[str, dict]:
    """-> (input key, row); a column that was None is left out (``manifest.row`` fills it)."""
    row = manifest.unpack_values(data)
    input_key = row.pop("input_key")
    return input_key, {c: v for c, v in row.items() if v is not None}


def write_bytes(uri: str, data: bytes) -> None:
    """Stage a whole object (local: temp name + rename; object stores: one upload)."""
    storage.write_bytes(uri, data, content_type="application/dicom")


def write_file(uri: str, path: str) -> None:
    """Stage a large object serialised to a local file, streamed from disk (local staging:
    the file is moved into place where it can be)."""
    storage.write_file(uri, path, content_type="application/dicom", move=True)


def publish(staged: str, final: str) -> None:
    if storage.is_local(staged) and storage.is_local(final):
        dst = storage.local_path(final)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(storage.local_path(staged), dst)  # same filesystem: a rename
        return
    storage.copy(staged, final)  # server-side copy: the final object appears atomically
    storage.delete(staged)


def discard(staged: str) -> None:
    try:
        storage.delete(staged)
    except OSError:
        pass  # a leftover staged file never affects published outputs


class WriteDicom(beam.PTransform):
    """Verified DicomObjects -> published objects. Outputs: outcome, dead_letter, linkage."""

    def __init__(self, run: manifest.RunInfo, after=None):
        super().__init__()
        self._run = run
        #: optional PCollection of one element: nothing is published before it exists (the
        #: pseudonym store's new entries, in direct mode; see CommitNewPatients)
        self._after = after

    def expand(self, objects):
        staged = objects | "Stage" >> beam.ParDo(_StageFn(self._run)).with_outputs(
            OUTCOME, DEAD_LETTER, LINKAGE, main=MAIN)
        side = {} if self._after is None else {"_after": beam.pvalue.AsSingleton(self._after)}
        committed = (
            staged[MAIN]
            | "BySopUid" >> beam.GroupByKey()
            | "Commit" >> beam.ParDo(_CommitFn(self._run), **side)
        )
        # every outcome comes out of Commit (staging failures cross the shuffle too), so no
        # Flatten: each one costs the local runner another pass of every row through the
        # launcher, and consumers fuse with Commit (the incremental record is written as
        # commits happen)
        return {OUTCOME: committed, DEAD_LETTER: staged[DEAD_LETTER], LINKAGE: staged[LINKAGE]}


class _StageFn(ObjectStageFn):
    stage = "write"
    module = "write"

    def setup(self):
        self._staged = counter("write", "objects_staged")

    def process(self, obj, *args, **kwargs):
        for out in super().process(obj, *args, **kwargs):
            if isinstance(out, beam.pvalue.TaggedOutput) and out.tag == OUTCOME:
                # a staging failure: its row crosses the shuffle beside the records
                yield (_FAILED_KEY + out.value.row["input_key"], out.value)
            else:
                yield out

    def handle(self, obj):
        try:
            yield from self._stage(obj)
        finally:
            obj.release()  # temp files go also when staging fails (transient errors included)

    def _stage(self, obj):
        f = obj.facts
        rel = writer.relative_path(f.get("pseudo_patient_id"), f.get("study_uid"),
                                   f.get("series_uid"), f.get("sop_uid"))
        staged = f"{self._run.staging_dir()}/{obj.ref.input_key}.dcm"
        final = f"{self._run.output.rstrip('/')}/{rel}"
        out = obj.output_file
        if out is not None:  # large object: on local disk, sha256 and size known
            write_file(staged, out.path)
            size, sha = out.size, out.sha256
        else:
            data = obj.output_bytes
            write_bytes(staged, data)
            size, sha = len(data), writer.sha256(data)
        self._staged.inc()
        cols = {k: v for k, v in f.items() if k in manifest.COLUMNS}
        cols.update(content_fingerprint=obj.fingerprint, output_path=final, output_size=size,
                    output_sha256=sha)
        record = _pack(obj.ref.input_key, cols)  # the staged path follows from the input key
        p = obj.private
        link = manifest.linkage_row(
            self._run.run_id, input_key=obj.ref.input_key, input_uri=obj.ref.uri,
            patient_key_hmac=p.get("patient_key_hmac"), original_patient_id=p.get("original_patient_id"),
            original_issuer=p.get("original_issuer"), original_nhs_number=p.get("original_nhs_number"),
            person_key_kind=p.get("person_key_kind"),
            pseudo_patient_id=p.get("pseudo_patient_id"),
            original_study_uid=p.get("original_study_uid"), study_uid=f.get("study_uid"),
            original_series_uid=p.get("original_series_uid"), series_uid=f.get("series_uid"),
            original_sop_uid=p.get("original_sop_uid"), sop_uid=f.get("sop_uid"),
            original_frame_of_reference_uid=p.get("original_frame_of_reference_uid"),
            frame_of_reference_uid=p.get("frame_of_reference_uid"), output_path=final)
        sop = f.get("sop_uid")
        obj.release()
        yield beam.pvalue.TaggedOutput(LINKAGE, link)
        yield (sop, record)


class _CommitFn(beam.DoFn):
    def __init__(self, run):
        self._run = run

    def setup(self):
        self._ok = counter("write", "objects_written")
        self._dup = counter("write", "duplicates")
        self._conflict = counter("write", "sop_uid_conflicts")

    def process(self, element, _after=None):
        key, values = element
        if isinstance(key, str) and key.startswith(_FAILED_KEY):
            yield from values  # failures while staging: their outcomes, as they were
            return
        records = sorted((_unpack(v) for v in values), key=lambda r: r[0])
        staging = self._run.staging_dir()
        records = [{"input_key": k, "staged": f"{staging}/{k}.dcm", "row": row} for k, row in records]
        winner = records[0]
        final = winner["row"]["output_path"]
        try:
            existing = storage.sha256_of(final)
        except TRANSIENT:
            raise
        for i, rec in enumerate(records):
            row = dict(rec["row"])
            try:
                if i == 0:
                    if existing is None:
                        publish(rec["staged"], final)
                        status, extra = OK, {}
                    elif existing == row["output_sha256"]:
                        discard(rec["staged"])  # identical bytes already published
                        status, extra = OK, {}
                    else:
                        discard(rec["staged"])
                        status, extra = QUARANTINED, {"stage": "write", "reason": SOP_UID_CONFLICT}
                elif rec["row"].get("content_fingerprint") == winner["row"].get("content_fingerprint"):
                    discard(rec["staged"])
                    status, extra = DUPLICATE, {"stage": "write", "reason": "identical_input"}
                else:
                    discard(rec["staged"])
                    status, extra = QUARANTINED, {"stage": "write", "reason": SOP_UID_CONFLICT}
            except TRANSIENT:
                raise
            except Exception as exc:
                for out in fail(self._run, _Ref(rec["input_key"]), "write", exc, module="write"):
                    if out.tag == OUTCOME:
                        yield out.value
                continue
            if status != OK:
                row["output_path"] = None
            {OK: self._ok, DUPLICATE: self._dup}.get(status, self._conflict).inc()
            row.update(extra)
            yield Outcome(manifest.row(self._run, rec["input_key"], status,
                                       **{k: v for k, v in row.items() if k not in _ROW_FIXED}), {})


_ROW_FIXED = {"schema_version", "run_id", "timestamp", "input_key", "status", "policy_name",
              "policy_version", "pipeline_version"}


class _Ref:
    """Minimal input reference for failures after the shuffle (no URI crosses it)."""

    def __init__(self, input_key):
        self.input_key = input_key
        self.uri = ""
