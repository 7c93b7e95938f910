"""``WriteDicom``: stage, decide duplicates, commit. Nothing is overwritten silently.

1. ``Stage`` (fused with the content stages) writes each verified object's bytes to
   ``{output}/.staging/run-{id}/{input_key}.dcm`` and emits the private linkage row. Its
   small public record (the manifest columns known so far: keyed UIDs and hashes, no PHI)
   goes to a local spill file of the bundle, one file per commit shard (the new SOP
   Instance UID picks the shard); at the end of the bundle each file is uploaded to
   ``{staging}/records/{bundle}-{shard}.jsonl`` and only ``(shard, URI)`` is emitted.
   So the records never pass through the runner: the local runner holds every element
   that crosses a shuffle in the launcher's memory, which made the commit shuffle grow
   the run's memory by a few kB per object. A bundle that fails leaves record files
   nobody names (they go with the staging folder); only committed bundles' names reach
   the commit. A failure while staging leaves as a ``staging_outcome`` row at once.
2. ``GroupByKey`` on the shard (``COMMIT_SHARDS`` keys) brings together the names of the
   record files of one shard. JSON Lines, not pickle: the records are read back from
   bucket storage.
3. ``Commit`` reads a shard's records, groups them by new SOP UID (every input that would
   land on one output path) and orders each group by input key: the first one is published
   (local: rename; object stores: server-side copy of the staged object, which appears
   atomically, then delete); a later input with the same content fingerprint is
   ``duplicate``; one with other content is ``quarantined`` (``sop_uid_conflict``). An
   output already present from an earlier run with identical bytes is left as it is
   (``ok``); with other bytes the new one is ``quarantined`` (``sop_uid_conflict``), never
   overwritten. A record file that cannot be read fails the bundle (the runner retries it;
   a lost record is never skipped). An input that fails permanently in the commit leaves
   ``{staging}/{input_key}.failed`` (its error class and fixed description, no value)
   before its staged object is removed, so a retry of the bundle reports that first failure,
   not the staged object it no longer finds.
"""

from __future__ import annotations

import json
import os
import uuid
import zlib
from typing import Optional

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows

from .. import manifest, storage, writer
from ..element import DUPLICATE, OK, QUARANTINED, Outcome
from ..errors import DeadLetter, StorageError
from .common import DEAD_LETTER, MAIN, OUTCOME, TRANSIENT, BundleLocalFile, ObjectStageFn, counter, fail
from .sinks import LocalPart

LINKAGE = "linkage"
#: rows of inputs that failed while staging (they never reach the commit)
STAGING_OUTCOME = "staging_outcome"
#: dead letters of inputs that failed in the commit (their URI did not cross the shuffle:
#: the linkage row of the same input key has it)
COMMIT_DEAD_LETTER = "commit_dead_letter"
SOP_UID_CONFLICT = "sop_uid_conflict"
#: groups the commit runs in: each holds about 1/COMMIT_SHARDS of a run's records in a
#: worker's memory at once, and each bundle of ``Stage`` writes at most this many files
COMMIT_SHARDS = 32


def shard_of(sop_uid) -> int:
    """Commit shard of a new SOP Instance UID (the same in every process)."""
    return zlib.crc32(str(sop_uid or "").encode()) % COMMIT_SHARDS


class _RecordSpill:
    """One bundle's staged records: a local JSON Lines part per shard, uploaded at the end."""

    def __init__(self):
        self._parts: dict = {}

    def add(self, sop_uid, input_key: str, row: dict) -> None:
        shard = shard_of(sop_uid)
        part = self._parts.get(shard)
        if part is None:
            part = self._parts[shard] = LocalPart(".jsonl")
        part.add(json.dumps([sop_uid, input_key, row], separators=(",", ":")))

    def publish(self, folder: str):
        """Upload every shard's part; yields ``(shard, URI)``."""
        bundle = uuid.uuid4().hex
        try:
            for shard, part in sorted(self._parts.items()):
                uri = f"{folder}/{bundle}-{shard:02d}.jsonl"
                part.publish(uri)
                yield shard, uri
        finally:
            self.discard()

    def discard(self) -> None:
        for part in self._parts.values():
            part.discard()
        self._parts = {}


def read_records(uri: str):
    """``(sop_uid, input_key, row)`` of one record file."""
    data = b"".join(storage.iter_chunks(uri))
    for line in data.decode("utf-8").splitlines():
        if line:
            sop, key, row = json.loads(line)
            yield sop, key, row


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
    except TRANSIENT:
        raise  # retried already: the bundle runs again
    except Exception:  # noqa: BLE001 - refused or denied: a leftover staged file never
        pass  # affects published outputs, and goes with the staging prefix


class WriteDicom(beam.PTransform):
    """Verified DicomObjects -> published objects. Outputs: ``outcome`` (every input that
    reached the commit), ``staging_outcome`` (inputs that failed while staging),
    ``dead_letter`` (staging), ``commit_dead_letter``, ``linkage``."""

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
            staged[MAIN]  # (shard, record file URI), one per shard and bundle
            | "ByShard" >> beam.GroupByKey()
            | "Commit" >> beam.ParDo(_CommitFn(self._run), **side).with_outputs(DEAD_LETTER, main=MAIN)
        )
        return {OUTCOME: committed[MAIN], STAGING_OUTCOME: staged[OUTCOME], DEAD_LETTER: staged[DEAD_LETTER],
                COMMIT_DEAD_LETTER: committed[DEAD_LETTER], LINKAGE: staged[LINKAGE]}


class _StageFn(BundleLocalFile, ObjectStageFn):
    stage = "write"
    module = "write"

    def setup(self):
        storage.configure()
        self._staged = counter("write", "objects_staged")

    def handle(self, obj):
        try:
            yield from self._stage(obj)
        finally:
            obj.release()  # temp files go also when staging fails (transient errors included)

    def finish_bundle(self):
        spill = self._take_local()
        if spill is None:
            return
        for shard, uri in spill.publish(f"{self._run.staging_dir()}/records"):
            yield GlobalWindows.windowed_value((shard, uri))

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
        cols = {k: v for k, v in f.items() if k in manifest.COLUMNS and v is not None}
        cols.update(content_fingerprint=obj.fingerprint, output_path=final, output_size=size,
                    output_sha256=sha)
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
        obj.release()
        try:
            if self._local is None:
                self._local = _RecordSpill()
            self._local.add(f.get("sop_uid"), obj.ref.input_key, cols)  # staged path follows from the key
        except Exception as exc:
            # a failed write may have lost buffered lines of inputs staged before this one, so
            # it is never this input's failure: the whole bundle runs again (transient)
            self._drop_local()
            raise StorageError("the bundle's record spill failed") from exc
        yield beam.pvalue.TaggedOutput(LINKAGE, link)


class _CommitFn(beam.DoFn):
    def __init__(self, run):
        self._run = run

    def setup(self):
        storage.configure()
        self._ok = counter("write", "objects_written")
        self._dup = counter("write", "duplicates")
        self._conflict = counter("write", "sop_uid_conflicts")

    def process(self, element, _after=None):
        _shard, uris = element
        groups: dict = {}
        for uri in sorted(uris):
            for sop, key, row in read_records(uri):
                groups.setdefault(sop, []).append((key, row))
        for sop in sorted(groups, key=str):
            yield from self._commit(sorted(groups.pop(sop), key=lambda r: r[0]))

    def _commit(self, records):
        staging = self._run.staging_dir()
        records = [{"input_key": k, "staged": f"{staging}/{k}.dcm", "row": row} for k, row in records]
        winner = records[0]
        final = winner["row"]["output_path"]
        try:
            existing = storage.sha256_of(final)
        except TRANSIENT:
            raise
        except Exception as exc:  # the output path cannot be read: the group cannot be decided
            for rec in records:
                yield from self._failed(rec, exc)
            return
        winner_failed = None  # (exception, recorded (error class, description) or None)
        for i, rec in enumerate(records):
            row = dict(rec["row"])
            if winner_failed is not None:  # nothing was published to be a duplicate of
                yield from self._failed(rec, *winner_failed)
                continue
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
                # an earlier attempt of this bundle may have failed this input and removed
                # its staged object: report that first failure, not the missing object
                recorded = self._recorded_failure(rec)
                if i == 0:
                    winner_failed = (exc, recorded)
                yield from self._failed(rec, exc, recorded)
                continue
            if status != OK:
                row["output_path"] = None
            {OK: self._ok, DUPLICATE: self._dup}.get(status, self._conflict).inc()
            row.update(extra)
            yield Outcome(manifest.row(self._run, rec["input_key"], status,
                                       **{k: v for k, v in row.items() if k not in _ROW_FIXED}), {})

    def _failed(self, rec, exc, recorded: Optional[tuple] = None):
        """A permanent failure of one input in the commit: its row and its dead letter. The
        failure is recorded beside the staged object before that is removed. A transient
        error writing that record fails the bundle (it runs again with the object still
        there); a permanent one (the storage that failed the input may refuse this too)
        leaves the failure unrecorded, which only matters if the bundle runs again."""
        ref = _Ref(rec["input_key"])
        if recorded is not None:  # this input's or its group's winner's first failure
            dl = DeadLetter(input_key=ref.input_key, input_uri=ref.uri, stage="write",
                            error_class=recorded[0], description=recorded[1])
        else:
            dl = DeadLetter.of(ref, "write", exc)
            try:
                storage.write_bytes(self._marker(rec), json.dumps(
                    {"error_class": dl.error_class, "description": dl.description}).encode())
            except TRANSIENT:
                raise
            except Exception:  # noqa: BLE001 - unrecorded: only a retry would miss it
                pass
        discard(rec["staged"])
        for out in fail(self._run, ref, "write", exc, module="write", dead_letter=dl):
            yield out.value if out.tag == OUTCOME else out

    def _marker(self, rec) -> str:
        return f"{self._run.staging_dir()}/{rec['input_key']}.failed"

    def _recorded_failure(self, rec) -> Optional[tuple]:
        """``(error class, description)`` an earlier attempt recorded for this input, if any."""
        try:
            data = json.loads(b"".join(storage.iter_chunks(self._marker(rec))))
            recorded = (data["error_class"], data["description"])
        except TRANSIENT:
            raise
        except Exception:  # noqa: BLE001 - none recorded (the usual case), or unreadable:
            return None  # this failure stands
        return recorded if all(isinstance(v, str) for v in recorded) else None


_ROW_FIXED = {"schema_version", "run_id", "timestamp", "input_key", "status", "policy_name",
              "policy_version", "pipeline_version"}


class _Ref:
    """Minimal input reference for failures after the shuffle (no URI crosses it)."""

    def __init__(self, input_key):
        self.input_key = input_key
        self.uri = ""
