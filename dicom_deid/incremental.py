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

This module knows nothing of Beam; the transforms are in ``transforms/incremental.py``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import json
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
    return f"{root(private)}/records/run-*/*.parquet"


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


def latest(records: Iterable[dict], complete_runs: frozenset) -> Optional[Prior]:
    """The latest finished decision for one input whose run also recorded its version."""
    listed: dict[str, dict] = {}
    finished: dict[str, dict] = {}
    for r in records:
        bucket = listed if r["kind"] == LISTED else finished
        prev = bucket.get(r["run_id"])
        if prev is None or r["timestamp"] > prev["timestamp"]:
            bucket[r["run_id"]] = r
    best = None
    for run_id, f in finished.items():
        lst = listed.get(run_id)
        if lst is None:
            continue
        if best is None or f["timestamp"] > best[0]["timestamp"]:
            best = (f, lst)
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
