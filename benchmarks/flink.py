#!/usr/bin/env python
"""Files/s of ``dicom-deid run`` on a standalone Apache Flink cluster against the local runner.

One invocation, one corpus (the 2,000 generated files of ``throughput.py``, cached under
``benchmarks/_work/``), each run the real CLI in its own subprocess:

    local_w1        local runner (FnApiRunner, multi-processing), 1 worker
    local_w2        local runner, 2 workers
    flink_s1        standalone Flink (scripts/flink-local.sh), 1 task slot, parallelism 1,
                    EXTERNAL environment: SDK workers from the worker pool next to the TaskManager
    flink_s2        the same cluster set up with 2 slots, parallelism 2, --sdk_worker_parallelism 2
                    (two SDK worker processes, so the Python work really runs on two cores)
    flink_s2_loopback   2 slots, LOOPBACK (SDK workers are threads of the launching process:
                    one Python process, so bound to one core by the GIL), for comparison
    *_tiny          the same on 10 files: the fixed cost of a run

For Flink runs the time is split with the cluster's REST API (job start/end, per-vertex
start/end) and the boot wrapper's log (one line per SDK environment started):

    outside_job_s   wall time outside the Flink job: CLI and Beam start-up, starting the job
                    server (a JVM), translating and submitting the job (jar upload), fetching
                    the result, shutting the job server down
    job_s           the Flink job, first scheduling to FINISHED
    main_stage_s    the fused stage that reads, de-identifies, verifies and writes objects
                    (the vertex containing ReadDicom)
    environments    SDK environments started (each a boot + Python SDK process start)

and the per-object rate is also given as (files - 10) / (wall_N - wall_10) (the tiny run's
fixed cost taken out), as ``throughput.py`` does.

CPU: the CLI's process tree (rusage/sampled, as throughput.py) plus the cluster's processes
(JobManager, TaskManager, worker pool with its reaped SDK workers: utime+stime+cutime+cstime
deltas from /proc); "other load" is the machine's busy CPU time minus both, per wall second.

Run it under the shared benchmark lock, so benchmarks never overlap::

    flock /tmp/dicom-deid-bench.lock .venv/bin/python benchmarks/flink.py [--files 2000]
        [--only local_w1,flink_s2,...] [--out benchmarks/results/flink.json]

Compare runs of one invocation (ratios), never timings across invocations: the machine is
shared and has 2 cores.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import throughput as tp  # noqa: E402  (corpus cache, measured runs, machine facts)

REPO = HERE.parent
SCRIPT = REPO / "scripts" / "flink-local.sh"
WORK = tp.WORK
TINY = tp.TINY
FLINK_VERSION = "1.19"

#: name -> (kind, slots, environment, input)
PLAN = {
    "local_w1": ("local", 1, None, "full"),
    "local_w2": ("local", 2, None, "full"),
    "flink_s1": ("flink", 1, "EXTERNAL", "full"),
    "flink_s2": ("flink", 2, "EXTERNAL", "full"),
    "flink_s2_loopback": ("flink", 2, "LOOPBACK", "full"),
    "local_w1_tiny": ("local", 1, None, "tiny"),
    "local_w2_tiny": ("local", 2, None, "tiny"),
    "flink_s1_tiny": ("flink", 1, "EXTERNAL", "tiny"),
    "flink_s2_tiny": ("flink", 2, "EXTERNAL", "tiny"),
}
#: the order runs are made in: local runs between the clusters to spread drift
ORDER = ["local_w1", "flink_s1_tiny", "flink_s1", "local_w2", "flink_s2_tiny", "flink_s2",
         "flink_s2_loopback", "local_w1_tiny", "local_w2_tiny"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------------------


class Cluster:
    """A standalone cluster from scripts/flink-local.sh with its own state dir and ports."""

    def __init__(self, slots: int):
        self.slots = slots
        self.state = WORK / f"flink-state-s{slots}"
        self.env = dict(os.environ, FLINK_LOCAL_STATE=str(self.state), PYTHON=sys.executable,
                        FLINK_SLOTS=str(slots), FLINK_REST_PORT=str(free_port()),
                        FLINK_RPC_PORT=str(free_port()), FLINK_WORKER_POOL_PORT=str(free_port()))
        self.out: dict = {}

    def script(self, *args, timeout=900):
        return subprocess.run(["bash", str(SCRIPT), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def start(self) -> float:
        shutil.rmtree(self.state, ignore_errors=True)
        t0 = time.perf_counter()
        r = self.script("start")
        if r.returncode != 0:
            raise RuntimeError(f"flink-local.sh start failed:\n{r.stderr[-3000:]}")
        self.out = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
        return time.perf_counter() - t0

    def stop(self) -> float:
        t0 = time.perf_counter()
        r = self.script("stop", timeout=180)
        if r.returncode != 0:
            print(f"flink-local.sh stop: {r.stderr[-2000:]}", file=sys.stderr)
        return time.perf_counter() - t0

    @property
    def master(self) -> str:
        return self.out["FLINK_MASTER"]

    def rest(self, path: str):
        with urllib.request.urlopen(f"http://{self.master}{path}", timeout=10) as r:
            return json.load(r)

    def job_ids(self) -> set:
        return {j["jid"] for j in self.rest("/jobs/overview")["jobs"]}

    def boot_lines(self) -> list[str]:
        p = self.state / "log" / "sdk-boot.log"
        return p.read_text().splitlines() if p.exists() else []

    def daemon_pids(self) -> list[int]:
        pids = []
        for f in (self.state / "pid").glob("*.pid"):
            for line in f.read_text().split():
                if line.strip().isdigit():
                    pids.append(int(line))
        return pids

    def cpu_s(self) -> float:
        """CPU seconds of the cluster's daemons and the worker pool, including reaped children."""
        total = 0
        for pid in self.daemon_pids():
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    rest = f.read().rsplit(b")", 1)[1].split()
                total += sum(int(x) for x in rest[11:15])  # utime stime cutime cstime
            except (OSError, IndexError, ValueError):
                pass
        return total / tp.TICK

    def leftovers(self) -> list[str]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
            if str(self.state) in cmd or cwd.startswith(str(self.state)):
                found.append(f"{pid} {cmd[:160]}")
        return found


def job_split(cluster: Cluster, jid: str) -> dict:
    job = cluster.rest(f"/jobs/{jid}")
    main = [v for v in job["vertices"] if "ReadDicom" in v["name"]]
    out = {"job_id": jid, "job_state": job["state"], "job_s": job["duration"] / 1000,
           "vertices": len(job["vertices"])}
    if main:
        v = main[0]
        out["main_stage_s"] = v["duration"] / 1000
        out["main_stage_parallelism"] = v["parallelism"]
        out["main_stage_starts_after_job_start_s"] = (v["start-time"] - job["start-time"]) / 1000
    return out


# --------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------


def do_run(name: str, src: Path, n: int, nbytes: int, key: Path, cluster: Cluster | None) -> dict:
    kind, slots, environment, _ = PLAN[name]
    base = WORK / "runs" / f"flink-bench-{name}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    cmd = [*tp.cli_cmd(), "run", "--input", f"{src}/**", "--output", str(base / "out"),
           "--private", str(base / "private"), "--key", str(key), "--no-progress"]
    if kind == "local":
        cmd.append(f"--direct_num_workers={slots}")
    else:
        cmd += ["--runner", "FlinkRunner", "--flink_master", cluster.master,
                "--flink_version", FLINK_VERSION, "--flink_job_server_jar", cluster.out["FLINK_JOB_SERVER_JAR"],
                "--parallelism", str(slots), "--environment_type", environment]
        if environment == "EXTERNAL":
            cmd += ["--environment_config", cluster.out["BEAM_WORKER_POOL"],
                    "--sdk_worker_parallelism", str(slots)]
    known = cluster.job_ids() if cluster else set()
    boots0 = len(cluster.boot_lines()) if cluster else 0
    ccpu0 = cluster.cpu_s() if cluster else 0.0
    busy0 = tp._machine_busy_ticks()
    r = tp.run_measured(cmd, WORK / "logs" / f"flink-bench-{name}.log")
    if cluster:  # SDK environments end just after the job: let the pool reap them (CPU)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            lines = cluster.boot_lines()[boots0:]
            if sum(" start " in x for x in lines) == sum(" end " in x for x in lines):
                break
            time.sleep(0.5)
    busy = (tp._machine_busy_ticks() - busy0) / tp.TICK
    r.update(name=name, kind=kind, slots=slots, environment=environment, files=n, input_bytes=nbytes,
             source_digest=tp.source_digest(), git_head=tp.git_head())
    if cluster:
        r["cluster_cpu_s"] = cluster.cpu_s() - ccpu0
        new = [j for j in cluster.job_ids() if j not in known]
        if len(new) == 1:
            r.update(job_split(cluster, new[0]))
            r["outside_job_s"] = r["wall_s"] - r["job_s"]
        lines = cluster.boot_lines()[boots0:]
        r["environments"] = sum(" start " in x for x in lines)
    else:
        r["cluster_cpu_s"] = 0.0
    r["total_cpu_s"] = r["cpu_s"] + r["cluster_cpu_s"]
    r["other_load_cpus"] = max(busy - r["total_cpu_s"], 0.0) / r["wall_s"]
    summaries = sorted((base / "out" / "summaries").glob("run-*.json"))
    s = json.loads(summaries[-1].read_text()) if summaries else {}
    r["summary"] = {k: s.get(k) for k in ("inputs", "by_status", "seconds", "runner")}
    r["outputs_written"] = sum(1 for _ in (base / "out").rglob("*.dcm"))
    r.pop("stdout", None)
    shutil.rmtree(base, ignore_errors=True)
    return r


# --------------------------------------------------------------------------------------
# Summary and report
# --------------------------------------------------------------------------------------


def summarise(runs: list[dict]) -> dict:
    rows = {}
    for r in runs:
        row = {k: r.get(k) for k in ("kind", "slots", "environment", "files", "wall_s", "job_s",
                                      "outside_job_s", "main_stage_s", "main_stage_parallelism",
                                      "environments", "vertices", "cpu_s", "cluster_cpu_s",
                                      "total_cpu_s", "other_load_cpus", "peak_tree_rss_mb",
                                      "returncode", "outputs_written")}
        row["input_mb"] = r["input_bytes"] / 1e6
        row["files_per_s"] = r["files"] / r["wall_s"]
        row["cpus_used"] = r["total_cpu_s"] / r["wall_s"]
        row["cpu_ms_per_file"] = 1000 * r["total_cpu_s"] / r["files"]
        if r.get("main_stage_s"):
            row["main_stage_files_per_s"] = r["files"] / r["main_stage_s"]
        row["by_status"] = (r.get("summary") or {}).get("by_status")
        rows[r["name"]] = row
    out: dict = {"rows": rows, "marginal": {}, "ratios": {}}
    for big in ("local_w1", "local_w2", "flink_s1", "flink_s2"):
        tiny = big + "_tiny"
        if big in rows and tiny in rows:
            dn = rows[big]["files"] - rows[tiny]["files"]
            dt = rows[big]["wall_s"] - rows[tiny]["wall_s"]
            out["marginal"][big] = {
                "fixed_s": rows[tiny]["wall_s"] - rows[tiny]["files"] * dt / dn if dt > 0 else None,
                "files_per_s": dn / dt if dt > 0 else None,
                "cpu_ms_per_file": 1000 * (rows[big]["total_cpu_s"] - rows[tiny]["total_cpu_s"]) / dn,
            }
    ref = rows.get("local_w1")
    if ref:
        for name, row in rows.items():
            if row["files"] == ref["files"]:
                out["ratios"][f"{name}_vs_local_w1"] = row["files_per_s"] / ref["files_per_s"]
    for a, b in (("local_w2", "local_w1"), ("flink_s2", "flink_s1"), ("flink_s2", "flink_s2_loopback"),
                 ("flink_s2", "local_w2"), ("flink_s1", "local_w1")):
        if a in rows and b in rows:
            out["ratios"][f"{a}_vs_{b}"] = rows[a]["files_per_s"] / rows[b]["files_per_s"]
            ma, mb = out["marginal"].get(a, {}), out["marginal"].get(b, {})
            if ma.get("files_per_s") and mb.get("files_per_s"):
                out["ratios"][f"{a}_vs_{b}_marginal"] = ma["files_per_s"] / mb["files_per_s"]
            if rows[a].get("main_stage_files_per_s") and rows[b].get("main_stage_files_per_s"):
                out["ratios"][f"{a}_vs_{b}_main_stage"] = (rows[a]["main_stage_files_per_s"]
                                                           / rows[b]["main_stage_files_per_s"])
    return out


def _f(v, fmt=".1f"):
    return "" if v is None else format(v, fmt)


def report(doc: dict) -> str:
    res = doc["results"]
    lines = ["| run | env | slots/workers | files | wall s | files/s | outside job s | job s | "
             "main stage s (files/s) | SDK envs | CPU s (launcher + cluster) | CPUs used | other load CPUs |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ORDER:
        r = res["rows"].get(name)
        if not r:
            continue
        main = (f"{_f(r.get('main_stage_s'))} ({_f(r.get('main_stage_files_per_s'))})"
                if r.get("main_stage_s") else "")
        lines.append(f"| {name} | {r['environment'] or 'local'} | {r['slots']} | {r['files']} | "
                     f"{r['wall_s']:.1f} | {r['files_per_s']:.2f} | {_f(r.get('outside_job_s'))} | "
                     f"{_f(r.get('job_s'))} | {main} | {_f(r.get('environments'), 'd') if r.get('environments') is not None else ''} | "
                     f"{r['cpu_s']:.1f} + {r['cluster_cpu_s']:.1f} | {r['cpus_used']:.2f} | "
                     f"{r['other_load_cpus']:.2f} |")
    if res["marginal"]:
        lines += ["", "| run | fixed cost s | marginal files/s | marginal CPU ms/file |", "|---|---:|---:|---:|"]
        for name, m in res["marginal"].items():
            lines.append(f"| {name} | {_f(m['fixed_s'])} | {_f(m['files_per_s'], '.2f')} | "
                         f"{_f(m['cpu_ms_per_file'])} |")
    if res["ratios"]:
        lines.append("")
        lines += [f"- {k}: {v:.2f}" for k, v in res["ratios"].items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--ct512-share", type=float, default=0.6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", metavar="NAMES", help="comma separated subset of: " + ",".join(ORDER))
    ap.add_argument("--quiet-wait", type=float, default=60.0, metavar="S",
                    help="before each run wait up to S s for other load to drop below --quiet-cpus")
    ap.add_argument("--quiet-cpus", type=float, default=0.5)
    ap.add_argument("--out", type=Path, default=tp.RESULTS / "flink.json")
    ap.add_argument("--resummarise", type=Path, metavar="JSON", help="recompute an earlier results file")
    a = ap.parse_args(argv)
    if a.resummarise:
        doc = json.loads(a.resummarise.read_text())
        doc["results"] = summarise(doc["runs"])
        a.resummarise.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(report(doc))
        return 0
    order = ORDER
    if a.only:
        wanted = set(a.only.split(","))
        if wanted - set(ORDER):
            ap.error(f"unknown run names: {', '.join(sorted(wanted - set(ORDER)))}")
        order = [n for n in ORDER if n in wanted]

    WORK.mkdir(parents=True, exist_ok=True)
    key = WORK / "bench.key"
    if not key.exists():
        key.write_text(secrets.token_hex(32) + "\n")
        key.chmod(0o600)
    root, cmeta = tp.corpus(a.files, a.ct512_share, min(a.patients, a.files), a.seed)
    inputs = {"full": (root, cmeta["n_files"], cmeta["bytes"]), "tiny": tp.subset(root, TINY)}
    started = _dt.datetime.now(_dt.timezone.utc)
    info = tp.machine()
    tp.warm_cache(root)
    print("warm-up (untimed local tiny run) ...", file=sys.stderr, flush=True)
    do_run("local_w1_tiny", *inputs["tiny"], key, None)

    runs, failed, clusters = [], [], {}
    cluster: Cluster | None = None
    try:
        for name in order:
            kind, slots, _env, inp = PLAN[name]
            if kind == "flink" and (cluster is None or cluster.slots != slots):
                if cluster is not None:
                    clusters[cluster.slots]["stop_s"] = cluster.stop()
                    clusters[cluster.slots]["leftovers"] = cluster.leftovers()
                cluster = Cluster(slots)
                clusters[slots] = {"start_s": cluster.start(), "state": str(cluster.state)}
                print(f"cluster with {slots} slot(s) up in {clusters[slots]['start_s']:.1f}s",
                      file=sys.stderr, flush=True)
            waited, before = tp.wait_quiet(a.quiet_wait, a.quiet_cpus)
            res = do_run(name, *inputs[inp], key, cluster if kind == "flink" else None)
            res.update(waited_for_quiet_s=waited, other_load_cpus_before=before,
                       loadavg_1m_after=os.getloadavg()[0])
            (runs if res["returncode"] == 0 else failed).append(res)
            partial = a.out.with_suffix(".partial.json")  # survives a crash later in the invocation
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"runs": runs, "failed_runs": failed, "clusters": clusters},
                                          indent=1, default=str) + "\n")
            print(f"{name:18s} {res['files']:5d} files  wall {res['wall_s']:7.1f}s  job {_f(res.get('job_s'))}s  "
                  f"main {_f(res.get('main_stage_s'))}s  envs {res.get('environments', '')}  "
                  f"other load {res['other_load_cpus']:.2f} (before {before:.2f}, waited {waited:.0f}s)  "
                  f"rc={res['returncode']} by_status={res['summary'].get('by_status')}",
                  file=sys.stderr, flush=True)
    finally:
        if cluster is not None:
            clusters[cluster.slots]["stop_s"] = cluster.stop()
            clusters[cluster.slots]["leftovers"] = cluster.leftovers()

    doc = {
        "benchmark": "flink",
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["flock /tmp/dicom-deid-bench.lock", Path(sys.executable).name,
                             "benchmarks/flink.py", *argv]),
        "machine": info,
        "loadavg_at_end": os.getloadavg(),
        "corpus": cmeta,
        "flink": {"version": "1.19.3", "job_server": "beam-runners-flink-1.19 2.62.0 (assembled)",
                  "flink_version_option": FLINK_VERSION, "clusters": clusters},
        "quiet_wait": {"max_s": a.quiet_wait, "threshold_cpus": a.quiet_cpus},
        "source_digests_seen": sorted({r["source_digest"] for r in runs}),
        "git_heads_seen": sorted({r["git_head"] for r in runs}),
        "results": summarise(runs),
        "runs": runs,
        "failed_runs": failed,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    a.out.with_suffix(".partial.json").unlink(missing_ok=True)
    print(report(doc))
    print(f"\nwritten: {a.out}", file=sys.stderr)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
