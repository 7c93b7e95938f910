"""Manifest schema v1 (public Parquet) and the linkage table (private Parquet).

The manifest has one row per input and run, failures included. It carries no original
identifier and no input path: inputs are named by ``input_key`` (HMAC of the URI) and
content by ``content_fingerprint`` (HMAC of the sha256). Columns later stages fill are
nullable until they do.

Layout: ``{output}/manifest/run-{run_id}/part-*.parquet``; all runs together form one
logical table. The current state of an input is its latest row::

    SELECT * FROM read_parquet('{output}/manifest/*/*.parquet')
    QUALIFY row_number() OVER (PARTITION BY input_key ORDER BY timestamp DESC) = 1
"""

from __future__ import annotations

import datetime as _dt
import pickle as _pickle
import zlib as _zlib
from typing import Optional

import pyarrow as pa

SCHEMA_VERSION = 1

SCHEMA = pa.schema([
    pa.field("schema_version", pa.int16(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("input_key", pa.string(), nullable=False),
    pa.field("content_fingerprint", pa.string()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("reason", pa.string()),
    pa.field("stage", pa.string()),
    pa.field("error_class", pa.string()),
    pa.field("sop_class_uid", pa.string()),
    pa.field("modality", pa.string()),
    pa.field("transfer_syntax_in", pa.string()),
    pa.field("transfer_syntax_out", pa.string()),
    pa.field("pseudo_patient_id", pa.string()),
    pa.field("study_uid", pa.string()),
    pa.field("series_uid", pa.string()),
    pa.field("sop_uid", pa.string()),
    pa.field("output_path", pa.string()),
    pa.field("input_size", pa.int64()),
    pa.field("output_size", pa.int64()),
    pa.field("output_sha256", pa.string()),
    pa.field("attrs_removed", pa.int32()),
    pa.field("attrs_emptied", pa.int32()),
    pa.field("attrs_replaced", pa.int32()),
    pa.field("attrs_kept", pa.int32()),
    pa.field("attrs_cleaned", pa.int32()),
    pa.field("pixel_action", pa.string()),
    pa.field("pixel_verification", pa.string()),
    pa.field("attachment_kind", pa.string()),
    pa.field("attachment_action", pa.string()),
    pa.field("verification", pa.string()),
    pa.field("options_not_applied", pa.list_(pa.string())),
    pa.field("deid_method_codes", pa.list_(pa.string())),
    pa.field("policy_name", pa.string()),
    pa.field("policy_version", pa.string()),
    pa.field("pipeline_version", pa.string()),
])
COLUMNS = tuple(SCHEMA.names)

#: what each column means (README table is generated from this; a test checks they agree)
DESCRIPTIONS = {
    "schema_version": "manifest schema version (1)",
    "run_id": "the run that wrote the row",
    "timestamp": "when the row was decided (UTC)",
    "input_key": "HMAC of the input URI: stable per input and key, reveals no path",
    "content_fingerprint": "HMAC of the input bytes' sha256",
    "status": "ok, quarantined, failed, skipped, duplicate, removed or excluded",
    "reason": "why the status (e.g. sop_uid_conflict, pixel_stage_missing, dicomdir, residual_phi)",
    "stage": "stage that decided a non-ok status (read, tags, pixels, attachments, verify, write)",
    "error_class": "exception class of a failure (never its message)",
    "sop_class_uid": "SOP Class UID (a registry UID)",
    "modality": "Modality",
    "transfer_syntax_in": "transfer syntax of the input",
    "transfer_syntax_out": "transfer syntax written",
    "pseudo_patient_id": "pseudonymous patient ID",
    "study_uid": "new Study Instance UID",
    "series_uid": "new Series Instance UID",
    "sop_uid": "new SOP Instance UID",
    "output_path": "URI of the de-identified object",
    "input_size": "input size in bytes",
    "output_size": "output size in bytes",
    "output_sha256": "sha256 of the output bytes",
    "attrs_removed": "attributes removed (X)",
    "attrs_emptied": "attributes emptied (Z)",
    "attrs_replaced": "attributes replaced (D, U, pseudonyms)",
    "attrs_kept": "attributes kept",
    "attrs_cleaned": "attributes cleaned (C)",
    "pixel_action": "what the pixel stage did (none, quarantined...)",
    "pixel_verification": "the pixel stage's own verification verdict",
    "attachment_kind": "pdf, cda, sr... when the object carries a document",
    "attachment_action": "what the document stage did",
    "verification": "verdict of the residual-PHI check (passed / findings)",
    "options_not_applied": "policy options this version could not apply to the object",
    "deid_method_codes": "CID 7050 codes written to DeidentificationMethodCodeSequence",
    "policy_name": "policy name",
    "policy_version": "policy version",
    "pipeline_version": "dicom-deid version",
}

LINKAGE_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("input_key", pa.string(), nullable=False),
    pa.field("input_uri", pa.string(), nullable=False),
    pa.field("patient_key_hmac", pa.string()),
    pa.field("original_patient_id", pa.string()),
    pa.field("original_issuer", pa.string()),
    pa.field("original_nhs_number", pa.string()),
    pa.field("person_key_kind", pa.string()),
    pa.field("pseudo_patient_id", pa.string()),
    pa.field("original_study_uid", pa.string()),
    pa.field("study_uid", pa.string()),
    pa.field("original_series_uid", pa.string()),
    pa.field("series_uid", pa.string()),
    pa.field("original_sop_uid", pa.string()),
    pa.field("sop_uid", pa.string()),
    pa.field("original_frame_of_reference_uid", pa.string()),
    pa.field("frame_of_reference_uid", pa.string()),
    pa.field("output_path", pa.string()),
])


def now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def row(run, input_key: str, status: str, **fields) -> dict:
    """A complete manifest row: every column present, unknown ones None."""
    unknown = set(fields) - set(COLUMNS)
    if unknown:
        raise KeyError(f"not manifest columns: {sorted(unknown)}")
    r = dict.fromkeys(COLUMNS)
    r.update(fields)
    r.update(schema_version=SCHEMA_VERSION, run_id=run.run_id, timestamp=now(), input_key=input_key,
             status=status, policy_name=run.policy_name, policy_version=run.policy_version,
             pipeline_version=run.pipeline_version)
    for k in ("options_not_applied", "deid_method_codes"):
        if r[k] is None:
            r[k] = []
    return r


def pack_values(row: dict) -> bytes:
    """A row's values in column order (no names; a missing column as None), pickled and
    compressed: how rows cross stage boundaries and shuffles (``element.Outcome.__reduce__``).
    The local runner keeps every row of a run in the launcher's memory between stages, and
    this is about a third of a pickled dict."""
    return _zlib.compress(_pickle.dumps(tuple(row.get(c) for c in COLUMNS), protocol=5), 1)


def unpack_values(data: bytes) -> dict:
    """:func:`pack_values` back to ``{column: value}`` (every column)."""
    return dict(zip(COLUMNS, _pickle.loads(_zlib.decompress(data))))


def pack_row(row: dict) -> Optional[bytes]:
    """A complete manifest row (:func:`row`) as :func:`pack_values`; None when ``row`` is not
    exactly one complete row (it then crosses as it is)."""
    if len(row) != len(COLUMNS) or any(c not in row for c in COLUMNS):
        return None
    return pack_values(row)


unpack_row = unpack_values


def linkage_row(run_id: str, **fields) -> dict:
    r = dict.fromkeys(LINKAGE_SCHEMA.names)
    r.update(fields)
    r["run_id"] = run_id
    return r


import dataclasses as _dc  # noqa: E402


@_dc.dataclass(frozen=True)
class RunInfo:
    """What every row of one run shares. Plain values: safe to pickle into DoFns."""

    run_id: str
    policy_name: str
    policy_version: str
    pipeline_version: str
    output: str
    private: str

    def manifest_dir(self) -> str:
        return f"{self.output.rstrip('/')}/manifest/run-{self.run_id}"

    def staging_dir(self) -> str:
        return f"{self.output.rstrip('/')}/.staging/run-{self.run_id}"

    def private_dir(self, kind: str) -> str:
        return f"{self.private.rstrip('/')}/{kind}/run-{self.run_id}"
