"""The run summary: counts by status, reason and modality, and where everything went.

Built from the run's own manifest after the run, so it agrees with it by construction;
written as JSON beside the manifest (``{output}/summaries/run-{run_id}.json``).
"""

from __future__ import annotations

import collections
import io
import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems


def iter_run_manifest(run_dir: str, columns=None):
    """The run's manifest files as tables, one at a time (``columns``: only these)."""
    files = sorted(m.path for r in FileSystems.match([run_dir.rstrip("/") + "/*.parquet"])
                   for m in r.metadata_list)
    for f in files:
        with FileSystems.open(f, compression_type="uncompressed") as fh:
            yield pq.read_table(io.BytesIO(fh.read()), columns=columns)


def read_run_manifest(run_dir: str) -> pa.Table:
    from . import manifest
    tables = list(iter_run_manifest(run_dir))
    if not tables:
        return manifest.SCHEMA.empty_table()
    return pa.concat_tables(tables)


def _value_counts(column) -> dict:
    """{value: count} of a column (nulls counted under None)."""
    out = {}
    for item in pc.value_counts(column).to_pylist():
        out[item["values"]] = out.get(item["values"], 0) + item["counts"]
    return out


#: the columns the summary counts
SUMMARY_COLUMNS = ["status", "reason", "modality", "input_size"]


def summarize(cfg, seconds: float, runner: str = "", running_mode=None, num_workers=None) -> dict:
    run = cfg.run
    by_status, by_reason, by_modality = collections.Counter(), collections.Counter(), collections.Counter()
    n = total_bytes = 0
    # counted one manifest file at a time and only the columns counted: the launcher never
    # holds the run's rows (at 8000 rows, whole-table rows as dicts cost it 50 MB)
    for t in iter_run_manifest(run.manifest_dir(), SUMMARY_COLUMNS):
        n += t.num_rows
        total_bytes += pc.sum(t["input_size"]).as_py() or 0
        by_status.update(_value_counts(t["status"]))
        for k, v in _value_counts(t["modality"]).items():
            by_modality[k or "?"] += v
        with_reason = t.filter(pc.greater(pc.utf8_length(t["reason"]), 0))  # null and "" out
        pairs = pc.binary_join_element_wise(with_reason["status"], with_reason["reason"], ":")
        by_reason.update(_value_counts(pairs))
    return {
        "run_id": run.run_id,
        "policy": f"{run.policy_name}@{run.policy_version}",
        "pipeline_version": run.pipeline_version,
        "runner": runner,
        "running_mode": running_mode,
        "num_workers": num_workers,
        "inputs": n,
        "by_status": dict(sorted(by_status.items())),
        "by_reason": dict(sorted(by_reason.items())),
        "by_modality": dict(sorted(by_modality.items())),
        "options_not_applied": list(cfg.policy.unapplied_options),
        "seconds": round(seconds, 3),
        "objects_per_second": round(n / seconds, 2) if seconds > 0 else None,
        "input_megabytes": round(total_bytes / 1e6, 3),
        "where": {
            "objects": run.output,
            "manifest": run.manifest_dir(),
            "linkage (private)": run.private_dir("linkage"),
            "dead letters (private)": run.private_dir("dead_letters"),
        },
    }


def summary_path(run) -> str:
    return f"{run.output.rstrip('/')}/summaries/run-{run.run_id}.json"


def write(cfg, summary: dict) -> str:
    path = summary_path(cfg.run)
    data = json.dumps(summary, indent=2, sort_keys=True).encode()
    with FileSystems.create(path, mime_type="application/json") as f:
        f.write(data)
    return path


def format_text(summary: dict) -> str:
    lines = [f"run {summary['run_id']}: {summary['inputs']} inputs in {summary['seconds']}s "
             f"({summary['objects_per_second']}/s) on {summary['runner']}"
             + (f" [{summary['running_mode']}, {summary['num_workers']} workers]" if summary.get("running_mode") else "")]
    lines.append("  by status:   " + ", ".join(f"{k}={v}" for k, v in summary["by_status"].items()))
    if summary["by_reason"]:
        lines.append("  by reason:   " + ", ".join(f"{k}={v}" for k, v in summary["by_reason"].items()))
    lines.append("  by modality: " + ", ".join(f"{k}={v}" for k, v in summary["by_modality"].items()))
    if summary["options_not_applied"]:
        lines.append("  options not applied: " + ", ".join(summary["options_not_applied"]))
    if summary.get("incremental"):
        lines.append("  incremental: " + ", ".join(f"{k}={v}" for k, v in summary["incremental"].items()))
    for k, v in summary["where"].items():
        lines.append(f"  {k}: {v}")
    return "\n".join(lines)
