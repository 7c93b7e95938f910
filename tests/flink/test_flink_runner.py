"""The whole pipeline on a real Apache Flink, compared with the local runner.

Inputs: the vendored corpus, generated files with fake identifiers (several patients, an
identical copy -> duplicate), broken files (empty, random, text, truncated, corrupt with a
planted name). The local runner (FnApiRunner, multi-processing) runs once on them; then

- the standalone cluster from ``scripts/flink-local.sh`` (``--flink_master 127.0.0.1:PORT``),
- Flink's embedded mini cluster (``--flink_master [local]``),
- the standalone cluster with its TaskManager killed while the job runs (and a new one started),
- the standalone cluster with SDK workers from the EXTERNAL worker pool that
  ``flink-local.sh`` runs next to the TaskManager (``--environment_type EXTERNAL``),

must give the same object bytes at the same paths, and the same manifest rows, dead letters,
linkage rows and pseudonym store rows once run id, timestamps and shard names are set aside.
Each run is the real CLI in a subprocess with ``--runner FlinkRunner ...``, as a user would type
it. Worker environments: LOOPBACK (SDK workers as threads of the launcher) on the standalone
cluster and in the failover test; PROCESS (Beam's SDK boot program started by the mini
cluster for each environment) on ``[local]``; EXTERNAL as above. PROCESS and EXTERNAL run
separate SDK worker processes with the pipeline options the runner provisions, as on a real
cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dicom_deid import sample
from tests.conftest import CORPUS, make_broken_inputs, write_key

PLANTED = "QUARTERMAINE^ISOLDE"
FLINK_VERSION = "1.19"  # the newest Flink whose Beam runner Maven Central serves (see the script)

pytestmark = pytest.mark.timeout(1200)


def start_cli(*args) -> subprocess.Popen:
    """The CLI in its own session (see ``finish_cli``)."""
    cmd = [sys.executable, "-m", "dicom_deid.cli", "run", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish_cli(proc: subprocess.Popen, timeout=900) -> subprocess.CompletedProcess:
    """Waits for the CLI; afterwards nothing it started may still run (Beam's job server JVM,
    SDK environments of [local]): such processes are killed and the test fails."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        left = session_leftovers(proc.pid)
    assert not left, f"processes left behind by the CLI: {left}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def cli(*args, timeout=900) -> subprocess.CompletedProcess:
    return finish_cli(start_cli(*args), timeout=timeout)


def _session_pids(sid: int) -> dict:
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != b"Z":
            found[int(pid)] = cmd[:160]
    return found


def session_leftovers(sid: int, grace: float = 15.0) -> list[str]:
    """Processes of session ``sid`` still running after ``grace`` seconds (then killed)."""
    deadline = time.monotonic() + grace
    found = _session_pids(sid)
    while found and time.monotonic() < deadline:
        time.sleep(0.5)
        found = _session_pids(sid)
    for pid in found:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    return [f"{pid} {cmd}" for pid, cmd in found.items()]


def cli_args(w, out: Path, priv: Path, run_id: str) -> list:
    return ["--input", f"{w['inputs']}/**", "--output", out, "--private", priv, "--key", w["key"],
            "--run-id", run_id, "--no-progress"]


def flink_args(master: str, jar: str, environment: str = "LOOPBACK", config: str | None = None) -> list:
    args = ["--runner", "FlinkRunner", "--flink_master", master, "--flink_version", FLINK_VERSION,
            "--flink_job_server_jar", jar, "--environment_type", environment]
    return args + (["--environment_config", config] if config else [])


def needs_boot(cluster):
    if not cluster.boot:
        pytest.skip("no Beam SDK boot program (flink-local.sh builds it with `go`; none on PATH)")


@pytest.fixture(scope="module")
def world(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("flink-e2e")
    inputs = root / "in"
    shutil.copytree(CORPUS, inputs / "corpus")
    s = sample.generate(inputs / "sample", n_files=12, n_patients=3, seed=7)
    shutil.copy(s.files[0], inputs / "sample" / "copy-of-first.dcm")
    make_broken_inputs(inputs / "broken", CORPUS / "dcm_qa_ts" / "1.dcm", PLANTED)
    w = dict(root=root, inputs=inputs, key=write_key(root / "k.hex", "5a" * 32),
             n_inputs=sum(1 for p in inputs.rglob("*") if p.is_file()))
    out, priv = root / "local-out", root / "local-priv"
    # the local reference runs while the session's cluster starts (JVMs starting, mostly
    # waiting); one worker: the outputs do not depend on the worker count
    proc = start_cli(*cli_args(w, out, priv, "reference"), "--direct_num_workers=1")
    try:
        request.getfixturevalue("flink_cluster")
    finally:
        r = finish_cli(proc)
    assert r.returncode == 0, r.stderr[-3000:]
    w["reference"] = snapshot(out, priv)
    return w


# --- what must be equal ---------------------------------------------------------------------

def _rows(folder: Path, drop: set, rel_to: Path | None = None) -> list[str]:
    files = sorted(folder.rglob("*.parquet")) if folder.exists() else []
    rows = []
    for f in files:
        if any(part.startswith((".", "_")) for part in f.relative_to(folder).parts):
            continue  # Beam temp files are not part of the table
        for r in pq.read_table(f).to_pylist():
            for k in drop:
                r.pop(k, None)
            if rel_to is not None and r.get("output_path"):
                r["output_path"] = str(Path(r["output_path"]).relative_to(rel_to))
            rows.append(json.dumps(r, sort_keys=True, default=str))
    return sorted(rows)


def snapshot(out: Path, priv: Path) -> dict:
    objects = {}
    for p in out.rglob("*.dcm"):
        rel = p.relative_to(out)
        if rel.parts[0] not in ("manifest", "summaries") and not rel.parts[0].startswith("."):
            objects[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    dead = sorted(line for f in (priv / "dead_letters").rglob("*.jsonl")
                  for line in f.read_text().splitlines() if line.strip())
    return {
        "objects": objects,
        "manifest": _rows(out / "manifest", {"run_id", "timestamp"}, out),
        "dead_letters": [json.dumps(json.loads(d), sort_keys=True) for d in dead],
        "linkage": _rows(priv / "linkage", {"run_id"}, out),
        "pseudonyms": _rows(priv / "pseudonyms", {"run_id", "created"}),
        "leftovers": sorted(str(p.relative_to(root)) for root in (out, priv) for p in root.rglob("*")
                            if p.name.startswith((".temp", ".staging", "beam-temp"))),
    }


def assert_same_as_local(w, got: dict):
    ref = w["reference"]
    assert len(ref["manifest"]) == w["n_inputs"] and len(ref["objects"]) > 10
    statuses = {json.loads(r)["status"] for r in ref["manifest"]}
    assert {"ok", "failed", "quarantined", "duplicate"} <= statuses  # the inputs exercise all paths
    assert got["objects"] == ref["objects"]
    assert got["manifest"] == ref["manifest"]
    assert len({json.loads(r)["input_key"] for r in got["manifest"]}) == w["n_inputs"]  # no duplicate row
    assert got["dead_letters"] == ref["dead_letters"] and len(got["dead_letters"]) >= 5
    assert got["linkage"] == ref["linkage"]
    assert got["pseudonyms"] == ref["pseudonyms"]
    assert got["leftovers"] == [] and ref["leftovers"] == []


def assert_nothing_identifying(text: str):
    assert PLANTED not in text and PLANTED.split("^")[0] not in text


def flink_logs(cluster) -> str:
    logs = Path(cluster.env["FLINK_LOCAL_STATE"]) / "log"
    return "\n".join(p.read_text(errors="replace") for p in logs.glob("*") if p.is_file())


# --- the tests ------------------------------------------------------------------------------

def test_standalone_cluster_gives_the_local_runners_outputs(world, flink_cluster):
    out, priv = world["root"] / "standalone-out", world["root"] / "standalone-priv"
    r = cli(*cli_args(world, out, priv, "flink-standalone"), *flink_args(flink_cluster.master, flink_cluster.jar))
    assert r.returncode == 0, r.stderr[-4000:]
    assert_same_as_local(world, snapshot(out, priv))
    summary = json.loads((out / "summaries" / "run-flink-standalone.json").read_text())
    assert summary["runner"] == "FlinkRunner" and summary["inputs"] == world["n_inputs"]
    # the job really ran on this cluster
    jobs = flink_cluster.rest("/jobs/overview")["jobs"]
    assert any(j["state"] == "FINISHED" and j["name"].startswith("BeamApp") for j in jobs)
    assert_nothing_identifying(r.stdout + r.stderr + flink_logs(flink_cluster))


def test_embedded_mini_cluster_with_process_workers_gives_the_local_runners_outputs(world, flink_cluster):
    needs_boot(flink_cluster)
    out, priv = world["root"] / "mini-out", world["root"] / "mini-priv"
    before = len(flink_cluster.sdk_boots())
    r = cli(*cli_args(world, out, priv, "flink-mini"),
            *flink_args("[local]", flink_cluster.jar, "PROCESS", json.dumps({"command": flink_cluster.boot})))
    assert r.returncode == 0, r.stderr[-4000:]
    assert_same_as_local(world, snapshot(out, priv))
    # the SDK work ran in processes started through Beam's boot program, and they all ended
    boots = flink_cluster.sdk_boots()[before:]
    assert any(" start " in b for b in boots)
    assert_environments_ended(boots)
    assert_nothing_identifying(r.stdout + r.stderr + flink_logs(flink_cluster))


def assert_environments_ended(boots: list[str], timeout: float = 30.0):
    """Every SDK environment (boot wrapper pid) started during the run has ended."""
    started = {b.split(" pid=")[1].split()[0] for b in boots if " start " in b}
    running = started
    deadline = time.monotonic() + timeout  # the runner stops environments just after the job
    while running and time.monotonic() < deadline:
        time.sleep(0.5)
        running = {p for p in started if os.path.exists(f"/proc/{p}")}
    assert not running, f"SDK environments still running: {sorted(running)}"


def test_external_worker_pool_gives_the_local_runners_outputs(world, flink_cluster):
    needs_boot(flink_cluster)
    assert flink_cluster.worker_pool, "flink-local.sh started no worker pool"
    out, priv = world["root"] / "external-out", world["root"] / "external-priv"
    log_start = len(flink_cluster.sdk_boots())
    r = cli(*cli_args(world, out, priv, "flink-external"),
            *flink_args(flink_cluster.master, flink_cluster.jar, "EXTERNAL", flink_cluster.worker_pool))
    assert r.returncode == 0, r.stderr[-4000:]
    assert_same_as_local(world, snapshot(out, priv))
    boots = flink_cluster.sdk_boots()[log_start:]
    assert any(" start " in b for b in boots)  # SDK workers came from the pool, not the launcher
    assert_environments_ended(boots)
    assert_nothing_identifying(r.stdout + r.stderr + flink_logs(flink_cluster))


def _running_job(cluster, known: set):
    for j in cluster.rest("/jobs/overview")["jobs"]:
        if j["jid"] not in known and j["state"] == "RUNNING":
            return j["jid"]
    return None


def test_taskmanager_killed_midway_job_recovers_with_identical_outputs(world, flink_cluster):
    out, priv = world["root"] / "failover-out", world["root"] / "failover-priv"
    known = {j["jid"] for j in flink_cluster.rest("/jobs/overview")["jobs"]}
    proc = subprocess.Popen([sys.executable, "-m", "dicom_deid.cli", "run",
                             *map(str, cli_args(world, out, priv, "flink-failover")),
                             *flink_args(flink_cluster.master, flink_cluster.jar)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        # wait until the job runs and part of it is done, then kill the TaskManager
        deadline, jid, injected = time.monotonic() + 300, None, False
        while time.monotonic() < deadline and proc.poll() is None:
            jid = jid or _running_job(flink_cluster, known)
            if jid:
                vertices = flink_cluster.rest(f"/jobs/{jid}")["vertices"]
                done = sum(v["status"] == "FINISHED" for v in vertices)
                if 0 < done < len(vertices):
                    k = flink_cluster.script("kill-taskmanager", timeout=60)
                    assert k.returncode == 0, k.stderr
                    time.sleep(1)
                    s = flink_cluster.script("start-taskmanager", timeout=120)
                    assert s.returncode == 0, s.stderr
                    injected = True
                    break
            time.sleep(0.2)
        assert injected, "the job finished (or never ran) before the TaskManager could be killed"
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
        left = session_leftovers(proc.pid)
    assert proc.returncode == 0, stderr[-4000:]
    assert not left, f"processes left behind by the CLI: {left}"
    # Flink saw the failure and restarted the job
    history = flink_cluster.rest(f"/jobs/{jid}/exceptions")
    assert history.get("exceptionHistory", {}).get("entries") or history.get("root-exception")
    assert flink_cluster.rest(f"/jobs/{jid}")["state"] == "FINISHED"
    assert_same_as_local(world, snapshot(out, priv))
    assert_nothing_identifying(stdout + stderr + flink_logs(flink_cluster))
