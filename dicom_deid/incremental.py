"""Incremental runs and resumable backfills: the record of finished inputs.

``dicom-deid run --incremental`` keeps, under the **private** prefix (it holds input URIs,
which may contain names), a record of what each run finished::

    {private}/incremental/records/run-{run_id}/part-{uuid}.parquet   written while the run works
    {private}/incremental/complete/run-{run_id}.json                 written when the run completes

Two kinds of rows, both keyed by ``input_key`` (HMAC of the URI):

* ``listed``: the input as this run found it: URI and the store's version (GCS generation,
  S3 ETag, else size + modification time), written before the input is read;
* ``finished``: the input's final decision: keyed content fingerprint (computed while
  reading), status, and the whole public manifest row; written as soon as the decision is
  final (after the commit for published objects), flushed every few hundred rows or seconds,
  so a run killed midway leaves a usable record.

The next incremental run lists the inputs and, per input, takes the latest ``finished`` row
whose run also ``listed`` it (:func:`latest`), then :func:`decide`:

* same version, same policy, a final status -> **skip**: no work, no new manifest row (the
  input's latest manifest row is still its current state), counted as ``unchanged``;
  if that run never completed (killed), its manifest was never published, so the recorded
  row is **recovered** into this run's manifest instead (same columns, this run's run_id);
* otherwise -> **process**; when it had finished before, the new ``ok`` row says
  ``reason = content_changed`` (other keyed content fingerprint) or ``content_unchanged``
  (new version, same bytes: e.g. rewritten with identical content);
* ``failed`` inputs are always processed again (a 403 may have been fixed since).

**Compaction.** Each run adds part files, so the record would grow by a run's worth of
files for ever. When an incremental run finds more than :data:`COMPACT_FILES` record files
(``DICOM_DEID_RECORD_COMPACT_FILES``, default 64), it also writes, from the rows it grouped
anyway, only the rows that can still decide anything (:func:`reduce_rows`: per input the
latest decision and its listing, plus unpaired rows of runs that never completed) to::

    {private}/incremental/records/compact-{run_id}/part-{uuid}.parquet
    {private}/incremental/records/compact-{run_id}/_plan.json       the files it replaces (written by the pipeline)
    {private}/incremental/records/compact-{run_id}/_replaces.json   commit: written after the run succeeded

and then deletes the files it replaces (:func:`commit_compaction`). The compacted parts are
complete before the commit, and nothing is deleted before it, so a reader sees every row at
any moment, sometimes twice (harmless: :func:`latest` keeps one row per run and kind). Readers
(:func:`select`) read run parts and the parts of *committed* compactions, skip what a
committed compaction replaced, and, when a file vanishes between listing and reading (a
compaction committed meanwhile), read the committed compactions again
(``transforms/incremental.py``). A compaction that never committed (killed run) is ignored
by readers and removed by ``dicom-deid gc`` / the next run's housekeeping. Compacted
``listed`` rows no longer carry the input URI (the linkage table keeps input paths).

This module knows nothing of Beam; the transforms are in ``transforms/incremental.py``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import json
import os
import time
import uuid
from typing import Iterable, Optional

import pyarrow as pa
import pyarrow.parquet as pq

LISTED, FINISHED = "listed", "finished"
#: decisions that are final for the same content under the same policy
FINAL_STATUSES = frozenset({"ok", "duplicate", "skipped", "quarantined", "excluded", "removed"})
SKIP, RECOVER, PROCESS = "skip", "recover", "process"
CONTENT_CHANGED, CONTENT_UNCHANGED = "content_changed", "content_unchanged"

RECORD_SCHEMA = pa.schema([
    pa.field("kind", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("input_key", pa.string(), nullable=False),
    pa.field("input_uri", pa.string()),          # listed rows only (private)
    pa.field("version", pa.string()),            # listed rows only
    pa.field("policy", pa.string()),
    pa.field("content_fingerprint", pa.string()),  # finished rows only
    pa.field("status", pa.string()),
    pa.field("manifest_row", pa.string()),       # finished rows: the public manifest row (JSON)
])


def root(private: str) -> str:
    return f"{private.rstrip('/')}/incremental"


def records_dir(private: str, run_id: str) -> str:
    return f"{root(private)}/records/run-{run_id}"


def records_pattern(private: str) -> str:
    """Run part files (not compactions: see :func:`select`)."""
    return f"{root(private)}/records/run-*/*.parquet"


#: compact the record when an incremental run finds more record files than this
COMPACT_FILES = int(os.environ.get("DICOM_DEID_RECORD_COMPACT_FILES", "64"))
PLAN, REPLACES = "_plan.json", "_replaces.json"


def records_root(private: str) -> str:
    return f"{root(private)}/records"


def compaction_dir(private: str, run_id: str) -> str:
    return f"{records_root(private)}/compact-{run_id}"


def _rel(private: str, uri: str) -> str:
    base = records_root(private) + "/"
    return uri[len(base):] if uri.startswith(base) else uri


def _read_json(uri: str) -> Optional[dict]:
    from . import storage
    try:
        doc = json.loads(b"".join(storage.iter_chunks(uri)).decode("utf-8"))
    except (storage.ObjectNotFound, FileNotFoundError, ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


@dataclasses.dataclass
class Selection:
    """What a reader of the record reads now (URIs), and what a compaction would replace."""

    files: list            # run parts and parts of committed compactions, not replaced
    leftovers: list        # files a committed compaction replaced that still exist
    markers: list          # ``_replaces.json`` of the committed compactions

    @property
    def replaces(self) -> list:
        return self.files + self.leftovers


def select(private: str) -> Selection:
    """The record files to read. Order matters: run parts are listed first, then the
    commit markers, then the parts of each committed compaction, so a compaction that
    commits during the listing is either not yet seen (its replaced files are still read)
    or seen with all its parts (they are complete before its commit)."""
    from . import storage
    rr = records_root(private)
    run_parts = [i.uri for i in storage.iter_objects(records_pattern(private))]
    replaced, committed, markers = set(), [], []
    for info in storage.iter_objects(f"{rr}/compact-*/{REPLACES}"):
        doc = _read_json(info.uri)
        if doc is None:  # removed meanwhile by a newer compaction: that one is listed too
            continue
        markers.append(info.uri)
        committed.append(info.uri.rsplit("/", 1)[0])
        replaced.update(doc.get("replaces") or [])
    compact_parts = [i.uri for d in committed for i in storage.iter_objects(f"{d}/*.parquet")]
    files, leftovers = [], []
    for uri in dict.fromkeys(run_parts + compact_parts):
        (leftovers if _rel(private, uri) in replaced else files).append(uri)
    return Selection(files=files, leftovers=leftovers, markers=markers)


def compaction_plan(private: str, run_id: str, selection: Selection) -> bytes:
    return json.dumps({"run_id": run_id, "replaces": [_rel(private, u) for u in selection.replaces],
                       "markers": [_rel(private, u) for u in selection.markers]}, indent=1).encode()


def commit_compaction(private: str, run_id: str) -> Optional[dict]:
    """After the run that compacted succeeded: commit (``_replaces.json``), then delete the
    files it replaces and the markers of the compactions it superseded. None when this run
    did not compact. Safe to repeat; a failure part-way leaves readers consistent."""
    from . import storage
    d = compaction_dir(private, run_id)
    plan = _read_json(f"{d}/{PLAN}")
    if plan is None:
        return None
    rr = records_root(private)
    storage.write_bytes(f"{d}/{REPLACES}", json.dumps(
        {"run_id": run_id, "replaces": plan.get("replaces") or []}, indent=1).encode(),
        content_type="application/json", durable=True)
    n = 0
    for rel in plan.get("replaces") or []:
        storage.delete(f"{rr}/{rel}")
        n += 1
    for rel in plan.get("markers") or []:
        folder = f"{rr}/{rel}".rsplit("/", 1)[0]
        storage.delete(f"{rr}/{rel}")
        storage.delete(f"{folder}/{PLAN}")
    storage.delete(f"{d}/{PLAN}")
    if storage.is_local(rr):  # empty run folders left behind
        base = storage.local_path(rr)
        for name in os.listdir(base) if os.path.isdir(base) else []:
            try:
                os.rmdir(os.path.join(base, name))
            except OSError:
                pass
    return {"files_replaced": n, "compactions_superseded": len(plan.get("markers") or [])}


def remove_uncommitted_compactions(private: str, keep_runs=(), stale_after: float = 6 * 3600,
                                   dry_run: bool = False, now: Optional[float] = None) -> int:
    """Delete compaction folders that never committed (no ``_replaces.json``), of runs not
    in ``keep_runs`` and not written to for ``stale_after``. Returns the objects removed."""
    from . import storage
    rr = records_root(private)
    now = time.time() if now is None else now
    folders: dict[str, list] = {}
    for info in storage.iter_objects(f"{rr}/compact-*/*"):
        folders.setdefault(info.uri.rsplit("/", 1)[0], []).append(info)
    n = 0
    for folder, infos in folders.items():
        run_id = folder.rsplit("/", 1)[-1][len("compact-"):]
        if run_id in keep_runs or any(i.uri.endswith("/" + REPLACES) for i in infos):
            continue
        newest = max((i.mtime for i in infos if i.mtime is not None), default=None)
        if newest is None or now - newest <= stale_after:
            continue
        for i in infos:
            if not dry_run:
                storage.delete(i.uri)
            n += 1
    return n


def complete_marker(private: str, run_id: str) -> str:
    return f"{root(private)}/complete/run-{run_id}.json"


def complete_pattern(private: str) -> str:
    return f"{root(private)}/complete/run-*.json"


def run_id_of_marker(uri: str) -> str:
    name = uri.rsplit("/", 1)[-1]
    return name[len("run-"):-len(".json")]


def part_name(directory: str) -> str:
    return f"{directory}/part-{uuid.uuid4().hex}.parquet"


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def listed_row(run_id: str, input_key: str, uri: str, version: str, policy: str) -> dict:
    return {"kind": LISTED, "run_id": run_id, "timestamp": _now(), "input_key": input_key,
            "input_uri": uri, "version": version, "policy": policy, "content_fingerprint": None,
            "status": None, "manifest_row": None}


def _json_default(v):
    if isinstance(v, _dt.datetime):
        return {"__ts__": v.isoformat()}
    raise TypeError(type(v).__name__)


def _json_hook(d):
    if set(d) == {"__ts__"}:
        return _dt.datetime.fromisoformat(d["__ts__"])
    return d


def finished_row(run_id: str, manifest_row: dict, policy: str) -> dict:
    return {"kind": FINISHED, "run_id": run_id, "timestamp": _now(),
            "input_key": manifest_row["input_key"], "input_uri": None, "version": None,
            "policy": policy, "content_fingerprint": manifest_row.get("content_fingerprint"),
            "status": manifest_row.get("status"),
            "manifest_row": json.dumps(manifest_row, default=_json_default, sort_keys=True)}


def manifest_row_from_json(text: str) -> dict:
    return json.loads(text, object_hook=_json_hook)


def to_parquet_bytes(rows: list[dict]) -> bytes:
    table = pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def from_parquet_bytes(data: bytes, drop_uri: bool = True) -> list[dict]:
    table = pq.read_table(io.BytesIO(data))
    if drop_uri and "input_uri" in table.column_names:
        table = table.drop(["input_uri"])  # never needed after listing; keep it off shuffles
    return table.to_pylist()


@dataclasses.dataclass(frozen=True)
class Prior:
    """What earlier runs left for one input."""

    run_id: str
    version: str
    policy: str
    fingerprint: Optional[str]
    status: str
    manifest_row: Optional[str]
    complete: bool


def _by_run(records: Iterable[dict]) -> tuple[dict, dict]:
    """Per run: its latest ``listed`` and latest ``finished`` row."""
    listed: dict[str, dict] = {}
    finished: dict[str, dict] = {}
    for r in records:
        bucket = listed if r["kind"] == LISTED else finished
        prev = bucket.get(r["run_id"])
        if prev is None or r["timestamp"] > prev["timestamp"]:
            bucket[r["run_id"]] = r
    return listed, finished


def _best(listed: dict, finished: dict):
    best = None
    for run_id, f in finished.items():
        lst = listed.get(run_id)
        if lst is None:
            continue
        if best is None or f["timestamp"] > best[0]["timestamp"]:
            best = (f, lst)
    return best


def reduce_rows(records: Iterable[dict], complete_runs: frozenset) -> list[dict]:
    """The rows of one input that can still matter to :func:`latest`, now or after more
    runs add rows (which only come later): the latest decision and its listing, plus the
    unpaired row of a run that never completed (its other half may still arrive). Other
    runs' decisions are older than the latest one, so they can never be chosen again."""
    listed, finished = _by_run(records)
    best = _best(listed, finished)
    keep = list(best[::-1]) if best else []
    best_run = best[0]["run_id"] if best else None
    for run_id in sorted(set(listed) ^ set(finished)):
        if run_id != best_run and run_id not in complete_runs:
            keep.append(listed.get(run_id) or finished[run_id])
    return keep


def latest(records: Iterable[dict], complete_runs: frozenset) -> Optional[Prior]:
    """The latest finished decision for one input whose run also recorded its version."""
    best = _best(*_by_run(records))
    if best is None:
        return None
    f, lst = best
    return Prior(run_id=f["run_id"], version=lst["version"] or "", policy=f["policy"] or "",
                 fingerprint=f["content_fingerprint"], status=f["status"] or "",
                 manifest_row=f["manifest_row"], complete=f["run_id"] in complete_runs)


def decide(version: str, policy: str, prior: Optional[Prior]) -> tuple[str, str]:
    """-> (skip | recover | process, prior content fingerprint or "")."""
    if prior is None:
        return PROCESS, ""
    fp = prior.fingerprint or ""
    if prior.status not in FINAL_STATUSES or prior.policy != policy:
        return PROCESS, fp
    if not version or prior.version != version:
        return PROCESS, fp
    if prior.complete:
        return SKIP, fp
    return (RECOVER, fp) if prior.manifest_row else (PROCESS, fp)


def change_reason(prior_fingerprint: str, fingerprint: str) -> str:
    return CONTENT_UNCHANGED if prior_fingerprint == fingerprint else CONTENT_CHANGED


def recovered_row(prior: Prior, run) -> dict:
    """The manifest row of a decision made by an interrupted run, re-issued by ``run``."""
    row = manifest_row_from_json(prior.manifest_row)
    row["run_id"] = run.run_id
    return row
