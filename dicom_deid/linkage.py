"""``dicom-deid link export``: the private linkage table and the pseudonym store as the
mapping CSVs a benchmark or a data custodian needs. Engine module: no pipeline.

Writes, into a local folder created owner-only (the content is identifying):

* ``patients.csv``: original PatientID, issuer, NHS number, person key kind, patient key
  HMAC, pseudonym, date offset (from the store)
* ``uids.csv``: level (study, series, sop, frame_of_reference), original UID, new UID
* ``files.csv``: run id, input key, input URI, output path, new SOP Instance UID

Rows of several runs are merged; for one input the latest run wins.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from . import pseudonyms as ps
from .errors import ConfigError

_UID_LEVELS = (("study", "original_study_uid", "study_uid"),
               ("series", "original_series_uid", "series_uid"),
               ("sop", "original_sop_uid", "sop_uid"),
               ("frame_of_reference", "original_frame_of_reference_uid", "frame_of_reference_uid"))


def _list(pattern: str) -> list[str]:
    from . import storage
    return sorted(i.uri for i in storage.iter_objects(pattern))


def _read(files: list[str]) -> list[dict]:
    tables = [pq.read_table(io.BytesIO(ps.read_bytes(f))) for f in files]
    if not tables:
        return []
    return pa.concat_tables(tables, promote_options="default").to_pylist()


def read_linkage(private: str, run_id: Optional[str] = None) -> list[dict]:
    """Linkage rows, latest run per input."""
    runs = f"run-{run_id}" if run_id else "run-*"
    rows = _read(_list(f"{private.rstrip('/')}/linkage/{runs}/*.parquet"))
    latest: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: r["run_id"]):
        latest[r["input_key"]] = r
    return list(latest.values())


def _store_offsets(private: str) -> dict[str, int]:
    """pseudonym store: HMAC -> date offset of the latest entry (no key needed to read)."""
    rows = _read(ps.list_store_parts(ps.store_dir(private)))
    out: dict[str, tuple] = {}
    for r in rows:
        k = r["patient_key_hmac"]
        if k not in out or (r["created"], r["run_id"]) >= out[k][0]:
            out[k] = ((r["created"], r["run_id"]), r["date_offset_days"])
    return {k: v[1] for k, v in out.items()}


def _write_csv(path: str, header: list[str], rows) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    n = 0
    with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow(r)
            n += 1
    return n


def export(private: str, out_dir: str, run_id: Optional[str] = None) -> dict[str, int]:
    rows = read_linkage(private, run_id)
    if not rows:
        raise ConfigError("link export: no linkage table under the private prefix"
                          + (" for that run" if run_id else ""))
    offsets = _store_offsets(private)
    os.makedirs(out_dir, mode=0o700, exist_ok=True)
    patients = {}
    for r in rows:
        key = (r.get("original_patient_id"), r.get("original_issuer"), r.get("original_nhs_number"),
               r.get("person_key_kind"), r.get("patient_key_hmac"), r.get("pseudo_patient_id"))
        patients[key] = offsets.get(r.get("patient_key_hmac"))
    uids = {}
    for r in rows:
        for level, old, new in _UID_LEVELS:
            if r.get(old):
                uids[(level, r[old])] = r.get(new)
    counts = {
        "patients.csv": _write_csv(
            os.path.join(out_dir, "patients.csv"),
            ["original_patient_id", "original_issuer", "original_nhs_number", "person_key_kind",
             "patient_key_hmac", "pseudo_patient_id", "date_offset_days"],
            sorted(([*k, v] for k, v in patients.items()), key=lambda x: [str(y) for y in x])),
        "uids.csv": _write_csv(os.path.join(out_dir, "uids.csv"), ["level", "original_uid", "new_uid"],
                               sorted([*k, v] for k, v in uids.items())),
        "files.csv": _write_csv(
            os.path.join(out_dir, "files.csv"),
            ["run_id", "input_key", "input_uri", "output_path", "sop_uid"],
            sorted([r["run_id"], r["input_key"], r["input_uri"], r.get("output_path"), r.get("sop_uid")]
                   for r in rows)),
    }
    return counts
