"""A backfill from S3 (moto) killed for real midway (SIGKILL to the launcher and its worker
processes) resumes on re-run: finished objects are skipped (their manifest rows recovered
from the record), every input has exactly one manifest row, and the published objects are
byte-identical to an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dicom_deid import incremental as inc
from dicom_deid import sample
from tests.conftest import finish, write_key
from tests.storage import servers
from tests.storage.conftest import base_env, run_cli

N_FILES = 24


def _finished(priv: Path, statuses) -> int:
    """Distinct inputs with a recorded final decision in one of ``statuses``."""
    keys = set()
    for f in (priv / "incremental" / "records").glob("run-*/*.parquet"):
        rows = inc.from_parquet_bytes(f.read_bytes())  # each part appears atomically
        keys |= {r["input_key"] for r in rows if r["kind"] == inc.FINISHED and r["status"] in statuses}
    return len(keys)


def _published(root_files: dict) -> dict:
    return {k: v for k, v in root_files.items()
            if not k.startswith(("manifest/", "summaries/", ".staging/"))}


@pytest.fixture(scope="module")
def backfill(s3_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    s = sample.generate(root / "in", n_files=N_FILES, n_patients=4, seed=41)
    bucket = s3_store.new_bucket()
    for p in s.files:
        s3_store.put(bucket, f"in/{p.relative_to(root / 'in')}", p.read_bytes())
    key = write_key(root / "k.hex", "ef" * 32)
    pattern = s3_store.uri(bucket, "in/**")

    # the reference: one uninterrupted run, straight to the S3 server (not through the proxy,
    # so none of attempt 1's latency), with one worker; it runs beside attempt 1, which mostly
    # waits on that latency
    ref_out = root / "ref-out"
    ref_proc = subprocess.Popen([sys.executable, "-m", "dicom_deid.cli", "run", "--input", pattern, "--output",
                                 str(ref_out), "--private", str(root / "ref-priv"), "--key", str(key),
                                 "--no-progress", "--direct_num_workers=1",
                                 *servers.s3_beam_args(s3_store.direct)],
                                env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    out_bucket = s3_store.new_bucket()
    out, priv = s3_store.uri(out_bucket, "o"), root / "priv"
    args = ["--input", pattern, "--output", out, "--private", priv, "--key", key, "--incremental",
            "--no-progress"]
    # attempt 1: slowed storage (latency per request), the record flushed row by row; killed
    # with SIGKILL once a few objects are committed and recorded
    s3_store.proxy.reset()
    s3_store.proxy.latency = 0.15  # slow enough that commits spread over seconds on an idle machine
    env = base_env()
    env["DICOM_DEID_RECORD_FLUSH_ROWS"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "dicom_deid.cli", "run", *map(str, args),
                             *s3_store.beam_args()], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    killed_at = None
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            done = _finished(priv, {"ok"})  # committed objects
            if done >= 1:
                os.killpg(proc.pid, signal.SIGKILL)
                killed_at = done
                break
            time.sleep(0.1)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        s3_store.proxy.reset()
        ref = finish(ref_proc)
    assert ref.returncode == 0, ref.stderr[-4000:]
    assert killed_at is not None, f"run ended (rc={proc.returncode}) before it could be killed midway"
    assert proc.returncode == -signal.SIGKILL
    recorded_before = _finished(priv, inc.FINAL_STATUSES)
    # the killed run's staging (its lease at least) is still there; gc --dry-run sees a stopped run
    staged_after_kill = s3_store.keys(out_bucket, "o/.staging/")
    dry = subprocess.run([sys.executable, "-m", "dicom_deid.cli", "gc", "--output", out, "--private", str(priv),
                          "--dry-run", *s3_store.beam_args()], env=base_env(), capture_output=True, text=True,
                         timeout=300)

    # attempt 2: resume (its housekeeping removes the killed run's staging first)
    again = run_cli(args, beam_args=s3_store.beam_args())
    assert again.returncode == 0, again.stderr[-4000:]
    files = {k[len("o/"):]: s3_store.get(out_bucket, k) for k in s3_store.keys(out_bucket, "o/")}
    ref_files = {str(p.relative_to(ref_out)): p.read_bytes() for p in ref_out.rglob("*") if p.is_file()}
    local_manifest = s3_store.download(out_bucket, "o/manifest/", root / "dl")
    return dict(files=files, ref_files=ref_files, staged_after_kill=staged_after_kill, dry=dry,
                resume_stderr=again.stderr, manifest=pq.read_table(local_manifest / "o" / "manifest").to_pylist(),
                summary=json.loads(next(v for k, v in files.items() if k.startswith("summaries/"))),
                recorded_before=recorded_before, ref_rows=pq.read_table(ref_out / "manifest").to_pylist())


def test_the_kill_was_midway(backfill):
    assert 1 <= backfill["recorded_before"] < N_FILES


def test_resumed_run_skips_what_was_finished_and_accounts_for_every_input(backfill):
    s = backfill["summary"]
    assert s["inputs"] == N_FILES, s          # recovered rows + newly processed ones
    assert s["incremental"]["recovered"] >= 1 and s["incremental"]["recovered"] == backfill["recorded_before"]
    assert s["incremental"]["new"] == N_FILES - s["incremental"]["recovered"]


def test_no_manifest_row_is_duplicated(backfill):
    rows = backfill["manifest"]
    keys = [r["input_key"] for r in rows]
    assert len(keys) == N_FILES and len(set(keys)) == N_FILES   # the killed run published none
    ref = {r["input_key"]: (r["status"], r["output_sha256"]) for r in backfill["ref_rows"]}
    assert {r["input_key"]: (r["status"], r["output_sha256"]) for r in rows} == ref


def test_outputs_are_byte_identical_to_an_uninterrupted_run(backfill):
    got, want = _published(backfill["files"]), _published(backfill["ref_files"])
    assert want and got.keys() == want.keys()
    assert all(got[k] == want[k] for k in want)


def test_the_killed_runs_staging_is_removed_by_the_next_run(backfill):
    killed = {k.split("/")[2] for k in backfill["staged_after_kill"]}
    assert len(killed) == 1 and any(k.endswith("/_lease.json") for k in backfill["staged_after_kill"])
    dry = backfill["dry"]
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert f"1 stopped run(s) {killed.pop()[len('run-'):]}" in dry.stdout and "would remove" in dry.stdout
    assert "note: removed what 1 stopped run(s) left" in backfill["resume_stderr"]
    assert not [k for k in backfill["files"] if k.startswith(".staging/")]
