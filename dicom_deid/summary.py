"""The run summary: counts by status, reason and modality, and where everything went.

Built from the run's own manifest after the run, so it agrees with it by construction;
written as JSON beside the manifest (``{output}/summaries/run-{run_id}.json``).
"""

from __future__ import annotations

import collections
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems


def read_run_manifest(run_dir: str) -> pa.Table:
    from . import manifest
    files = sorted(m.path for r in FileSystems.match([run_dir.rstrip("/") + "/*.parquet"])
                   for m in r.metadata_list)
    tables = []
    for f in files:
        with FileSystems.open(f, compression_type="uncompressed") as fh:
            tables.append(pq.read_table(io.BytesIO(fh.read())))
    if not tables:
        return manifest.SCHEMA.empty_table()
    return pa.concat_tables(tables)


def summarize(cfg, seconds: float, runner: str = "", running_mode=None, num_workers=None) -> dict:
    run = cfg.run
    t = read_run_manifest(run.manifest_dir())
    rows = t.select(["status", "reason", "modality", "input_size"]).to_pylist()
    by_status = collections.Counter(r["status"] for r in rows)
    by_reason = collections.Counter(f'{r["status"]}:{r["reason"]}' for r in rows if r["reason"])
    by_modality = collections.Counter((r["modality"] or "?") for r in rows)
    total_bytes = sum(r["input_size"] or 0 for r in rows)
    return {
        "run_id": run.run_id,
        "policy": f"{run.policy_name}@{run.policy_version}",
        "pipeline_version": run.pipeline_version,
        "runner": runner,
        "running_mode": running_mode,
        "num_workers": num_workers,
        "inputs": len(rows),
        "by_status": dict(sorted(by_status.items())),
        "by_reason": dict(sorted(by_reason.items())),
        "by_modality": dict(sorted(by_modality.items())),
        "options_not_applied": list(cfg.policy.unapplied_options),
        "seconds": round(seconds, 3),
        "objects_per_second": round(len(rows) / seconds, 2) if seconds > 0 else None,
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
