#!/usr/bin/env python
"""End-to-end throughput and memory of ``dicom-deid run`` against a bare pydicom loop.

One invocation measures, each run in its own subprocess (so start-up and peak memory
are per run), with the runs interleaved to spread machine drift across them:

    baseline   a bare pydicom loop: dcmread + save_as every file, one process
    baseline2  the same loop on two processes at once, each over every other file (an even
               split, as each of the local runner's two workers gets half): what this machine gives two
               perfectly independent processes, the ceiling for p2 / p1
    p1         dicom-deid run, 1 worker (basic policy), N files
    p2         dicom-deid run, 2 workers, N files
    p1_tiny    dicom-deid run, 1 worker, 10 files   (fixed start-up cost of p1)
    p2_tiny    dicom-deid run, 2 workers, 10 files  (fixed start-up cost of p2)
    p1_500     dicom-deid run, 1 worker, 500 files  (memory flatness vs p1)
    p1x2       two whole ``dicom-deid run``s of 1 worker at once, over the even and the odd
               files (each half the work of one of p2's workers): what this machine gives two independent
               pipelines, so whether two workers in one run lose anything that two separate
               runs do not

The corpus (``dicom_deid.sample.generate``: N files, 60 % 512x512 CT slices, 100
patients) is generated once and cached under ``benchmarks/_work/``; the smaller inputs are
hard-linked subsets that take every k-th file, so their mix of kinds matches the corpus.

Peak memory is measured for the whole process tree (the pipeline launches SDK worker
subprocesses): a sampler thread walks ``/proc`` every 0.2 s, finds every descendant of the
run's process and sums their RSS (and PSS from ``/proc/PID/smaps_rollup``, which splits
shared pages fairly). The largest single process (``ru_maxrss`` from ``os.wait4`` of the
run) is recorded as a cross-check.

Usage::

    .venv/bin/python benchmarks/throughput.py [--files 2000] [--repeats 1]
        [--out benchmarks/results/throughput.json]

Timings on a shared machine are noisy: compare runs of one invocation (ratios), never
timings across invocations.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
RESULTS = HERE / "results"
PAGE = os.sysconf("SC_PAGE_SIZE")
TINY = 10
MID = 500
#: memory counts as flat when the peak grows by at most this much per 1000 more files
FLAT_MB_PER_1000 = 5.0

# --------------------------------------------------------------------------------------
# Process-tree memory sampling (/proc; no psutil needed)
# --------------------------------------------------------------------------------------


def _ppid_map() -> dict[int, int]:
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ..." - comm may contain spaces and parentheses
        rest = stat[stat.rfind(b")") + 2:].split()
        out[int(name)] = int(rest[1])
    return out


def tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in _ppid_map().items():
        children.setdefault(ppid, []).append(pid)
    todo, seen = [root], []
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo.extend(children.get(pid, ()))
    return seen


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def _cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` in clock ticks (0 when gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            rest = f.read().rsplit(b")", 1)[1].split()
        return int(rest[11]) + int(rest[12])
    except (OSError, IndexError, ValueError):
        return 0


def _machine_busy_ticks() -> int:
    """Busy clock ticks of all CPUs (everything but idle and iowait) from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v[:8]) - v[3] - v[4]  # user nice system idle iowait irq softirq steal


TICK = os.sysconf("SC_CLK_TCK")


class TreeSampler(threading.Thread):
    """Samples the summed RSS/PSS of a process and all its descendants.

    Also keeps the peak per role (``main``: the launched process; ``worker``: Beam SDK
    worker subprocesses; ``other``), the last seen CPU time of every process in the tree
    and a coarse timeline of (seconds, main MB, workers MB).
    """

    def __init__(self, root: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak_rss = self.peak_pss = 0
        self.peak_role: dict[str, int] = {}
        self.peak_role_at: dict[str, float] = {}
        self.max_procs = 0
        self.samples = 0
        self.cpu_ticks: dict[int, int] = {}
        self.timeline: list[tuple[float, float, float]] = []
        self._roles: dict[int, str] = {}
        self._t0 = time.perf_counter()
        self._halt = threading.Event()

    def _role(self, pid: int) -> str:
        if pid not in self._roles:
            if pid == self.root:
                role = "main"
            else:
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read()
                except OSError:
                    cmd = b""
                if b"sdk_worker_main" in cmd or b"dicom_deid.worker" in cmd:
                    role = "worker"
                elif b"stage_times.py" in cmd:  # a launcher below p1x2's parent
                    role = "main"
                else:
                    role = "other"
            self._roles[pid] = role
        return self._roles[pid]

    def sample(self) -> None:
        pids = tree_pids(self.root)
        by_role: dict[str, int] = {}
        rss = 0
        for p in pids:
            r = _rss_bytes(p)
            rss += r
            role = self._role(p)
            by_role[role] = by_role.get(role, 0) + r
            t = _cpu_ticks(p)
            if t:
                self.cpu_ticks[p] = max(self.cpu_ticks.get(p, 0), t)
        pss = sum(_pss_bytes(p) for p in pids)
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        now = round(time.perf_counter() - self._t0, 2)
        for role, v in by_role.items():
            if v > self.peak_role.get(role, 0):
                self.peak_role[role] = v
                self.peak_role_at[role] = now
        self.max_procs = max(self.max_procs, len(pids))
        self.samples += 1
        self.timeline.append((round(time.perf_counter() - self._t0, 2),
                              round(by_role.get("main", 0) / 2**20, 1),
                              round(by_role.get("worker", 0) / 2**20, 1)))

    def role_cpu(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, ticks in self.cpu_ticks.items():
            role = self._roles.get(pid, "other")
            out[role] = out.get(role, 0.0) + ticks / TICK
        return dict(sorted(out.items()))

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _thin(points: list, keep: int = 40, tail: int = 25) -> list:
    """``keep`` evenly spaced points plus the last ``tail`` points at full resolution."""
    if len(points) <= keep + tail:
        return points
    head = points[:-tail]
    step = len(head) / keep
    return [head[int(i * step)] for i in range(keep)] + points[-tail:]


def run_measured(cmd: list[str], log_path: Path, env=None) -> dict:
    """Run ``cmd``; wall time, peak tree RSS/PSS, max single-process RSS, CPU, stdout."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    with open(log_path, "wb") as log:
        busy0 = _machine_busy_ticks()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        stdout = proc.stdout.read()
        _pid, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        busy = (_machine_busy_ticks() - busy0) / TICK
        sampler.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)
    text = log_path.read_text(errors="replace")
    # CPU of the tree: rusage of the run (includes descendants it reaped) or, if larger,
    # the sum of the last sampled CPU time of every process seen in the tree
    cpu_ru = ru.ru_utime + ru.ru_stime
    cpu_sampled = sum(sampler.cpu_ticks.values()) / TICK
    cpu = max(cpu_ru, cpu_sampled)
    return {
        "cmd": cmd,
        "returncode": proc.returncode,
        "wall_s": wall,
        "cpu_s": cpu,
        "cpu_s_rusage": cpu_ru,
        "cpu_s_sampled": cpu_sampled,
        "machine_busy_cpu_s": busy,
        "other_load_cpus": max(busy - cpu, 0.0) / wall,  # CPUs kept busy by everything else
        "loadavg_1m_before": load,
        "peak_tree_rss_mb": sampler.peak_rss / 2**20,
        "peak_tree_pss_mb": sampler.peak_pss / 2**20,
        "peak_role_rss_mb": {k: v / 2**20 for k, v in sorted(sampler.peak_role.items())},
        "cpu_role_s_sampled": sampler.role_cpu(),
        "peak_role_at_s": dict(sorted(sampler.peak_role_at.items())),
        "max_process_rss_mb": ru.ru_maxrss / 1024,  # KiB on Linux; largest single process
        "max_processes": sampler.max_procs,
        "rss_samples": sampler.samples,
        "rss_timeline_s_main_workers_mb": _thin(sampler.timeline),
        "stdout": stdout.decode(errors="replace"),
        "stderr_log": str(log_path),
        "stderr_error_lines": sum(1 for line in text.splitlines()
                                  if "Traceback" in line or line.startswith("ERROR")
                                  or " ERROR " in line),
    }


# --------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------


def corpus(n_files: int, share: float, patients: int, seed: int) -> tuple[Path, dict]:
    """The cached corpus directory and its description (generated when missing)."""
    name = f"corpus-n{n_files}-ct{share:g}-p{patients}-s{seed}"
    root, meta_path = WORK / name, WORK / f"{name}.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        files = sorted(root.rglob("*.dcm")) if root.exists() else []
        if len(files) == meta["n_files"] and sum(f.stat().st_size for f in files) == meta["bytes"]:
            return root, meta
    shutil.rmtree(root, ignore_errors=True)
    # in a subprocess: keeps this (parent) process small, because a child's ru_maxrss
    # starts from the parent's high-water mark at fork
    print(f"generating corpus {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dicom_deid.sample", str(root), "--files", str(n_files),
                    "--patients", str(patients), "--seed", str(seed), "--ct512-share", str(share)],
                   check=True, stdout=sys.stderr)
    files = sorted(root.rglob("*.dcm"))
    meta = {
        "name": name, "n_files": len(files), "ct512_share": share, "patients": patients,
        "seed": seed, "bytes": sum(f.stat().st_size for f in files),
        "generated_in_s": round(time.perf_counter() - t0, 1),
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    return root, meta


def linked(root: Path, dest: Path, picked: list[Path]) -> Path:
    """``dest`` as a tree of hard links (copies where linking fails) to ``picked``, files
    of ``root`` at the same relative paths; kept when it already holds as many files."""
    have = sorted(dest.rglob("*.dcm")) if dest.exists() else []
    if len(have) != len(picked):
        shutil.rmtree(dest, ignore_errors=True)
        for f in picked:
            target = dest / f.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)
    return dest


def subset(root: Path, m: int) -> tuple[Path, int, int]:
    """A directory of ``m`` hard links taking every k-th file of ``root`` (cached)."""
    files = sorted(root.rglob("*.dcm"))
    if m >= len(files):
        return root, len(files), sum(f.stat().st_size for f in files)
    picked = [files[(i * len(files)) // m] for i in range(m)]
    return linked(root, WORK / f"{root.name}-subset{m}", picked), m, sum(f.stat().st_size for f in picked)


def halves(root: Path) -> tuple[Path, Path]:
    """Two directories of hard links: the even and the odd files of ``root`` in sorted
    order (cached). An even split with the same mix of kinds, as each of the local runner's
    two workers gets half of the (shuffled) inputs."""
    files = sorted(root.rglob("*.dcm"))
    return (linked(root, WORK / f"{root.name}-half0", files[0::2]),
            linked(root, WORK / f"{root.name}-half1", files[1::2]))


def warm_cache(root: Path) -> None:
    for f in sorted(root.rglob("*.dcm")):
        with open(f, "rb") as fh:
            while fh.read(1 << 20):
                pass


# --------------------------------------------------------------------------------------
# The runs
# --------------------------------------------------------------------------------------


def cli_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "dicom-deid"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dicom_deid.cli"]


def baseline_child(src: str, dst: str, part: int = 0, parts: int = 1) -> int:
    """The bare loop: read every file with pydicom, write it with save_as (one process);
    with ``parts`` > 1, only every ``parts``-th file from ``part`` on."""
    import warnings

    import pydicom
    warnings.simplefilter("ignore")
    src_p, dst_p = Path(src), Path(dst)
    files = sorted(src_p.rglob("*.dcm"))[part::parts]
    t0 = time.perf_counter()
    n = nbytes = 0
    for f in files:
        ds = pydicom.dcmread(f)
        out = dst_p / f.relative_to(src_p)
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out)
        n += 1
        nbytes += f.stat().st_size
    loop = time.perf_counter() - t0
    print(json.dumps({"files": n, "bytes": nbytes, "loop_s": loop}))
    return 0


def baseline2_child(src: str, dst: str) -> int:
    """Two bare loops at once, over the even and the odd files; prints the longer loop time
    and the files and bytes of both."""
    me = [sys.executable, str(Path(__file__).resolve()), "_baseline"]
    procs = [subprocess.Popen([*me, src, dst, str(k), "2"], stdout=subprocess.PIPE, text=True)
             for k in range(2)]
    stdouts = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        return 1
    outs = [json.loads(out.strip().splitlines()[-1]) for out in stdouts]
    print(json.dumps({"files": sum(o["files"] for o in outs), "bytes": sum(o["bytes"] for o in outs),
                      "loop_s": max(o["loop_s"] for o in outs), "loop_s_each": [o["loop_s"] for o in outs]}))
    return 0


def pipeline_cmd(src: Path, base: Path, key: Path, workers: int, tag: str = "") -> list[str]:
    """The CLI through stage_times.py: the same run, with each stage's start and end logged
    to ``{base}/stages{tag}.jsonl``."""
    return [sys.executable, str(HERE / "stage_times.py"), str(base / f"stages{tag}.jsonl"), "run",
            "--input", f"{src}/**", "--output", str(base / f"out{tag}"),
            "--private", str(base / f"private{tag}"), "--key", str(key), "--no-progress",
            f"--direct_num_workers={workers}"]


def pipeline2_child(base: str, key: str, half0: str, half1: str) -> int:
    """Two one-worker pipeline runs at once, one per half; each one's output and stage log
    under ``base`` with the suffix 0 or 1."""
    procs = [subprocess.Popen(pipeline_cmd(Path(src), Path(base), Path(key), 1, str(k)))
             for k, src in enumerate((half0, half1))]
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c), 0)  # a run killed by a signal has a negative code


def source_digest() -> str:
    """Short digest of dicom_deid/ (*.py, data): the repo is edited concurrently, so each run
    records which code it ran."""
    import hashlib
    h = hashlib.sha256()
    pkg = package_dir()
    for f in sorted(pkg.rglob("*")):
        if f.is_file() and "__pycache__" not in f.parts:
            h.update(str(f.relative_to(pkg)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def package_dir() -> Path:
    """The dicom_deid the runs import (``PYTHONPATH`` first, as in the children), not imported here.

    Run from the root of the tree you measure: the SDK workers start with ``python -m``, which
    puts their working directory first on ``sys.path``."""
    from importlib.util import find_spec
    spec = find_spec("dicom_deid")
    return Path(spec.origin).parent if spec and spec.origin else HERE.parent / "dicom_deid"


def git_head() -> str:
    try:
        return subprocess.run(["git", "-C", str(package_dir().parent), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def do_run(name: str, repeat: int, src: Path, n: int, nbytes: int, key: Path) -> dict:
    base = WORK / "runs" / f"{name}-r{repeat}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    logs = WORK / "logs"
    tags = ["0", "1"] if name == "p1x2" else [""]
    if name in ("baseline", "baseline2"):
        cmd = [sys.executable, str(Path(__file__).resolve()), f"_{name}", str(src), str(base / "out")]
    elif name == "p1x2":
        cmd = [sys.executable, str(Path(__file__).resolve()), "_pipeline2", str(base), str(key),
               *(str(h) for h in halves(src))]
    else:
        cmd = pipeline_cmd(src, base, key, 2 if name.startswith("p2") else 1)
    r = run_measured(cmd, logs / f"{name}-r{repeat}.log")
    r.update(name=name, repeat=repeat, files=n, input_bytes=nbytes, source_digest=source_digest(),
             git_head=git_head())
    if name in ("baseline", "baseline2"):
        try:
            r["internal"] = json.loads(r["stdout"].strip().splitlines()[-1])
        except (ValueError, IndexError):
            r["internal"] = None
        r["internal_s"] = (r["internal"] or {}).get("loop_s")
    else:
        sys.path.insert(0, str(HERE))
        from stage_times import split
        each = []
        for tag in tags:
            summaries = sorted((base / f"out{tag}" / "summaries").glob("run-*.json"))
            s = json.loads(summaries[-1].read_text()) if summaries else {}
            stage_log = base / f"stages{tag}.jsonl"
            each.append(({k: s.get(k) for k in ("inputs", "by_status", "by_reason", "by_modality",
                                                 "seconds", "objects_per_second", "num_workers",
                                                 "running_mode", "runner")},
                          split(str(stage_log)) if stage_log.exists() else {}))
        if len(each) == 1:
            r["summary"], r["stages"] = each[0]
        else:  # p1x2: the pair ends with its slower run
            r["summary"] = {"inputs": sum(s.get("inputs") or 0 for s, _ in each),
                            "by_status": _add_counts(s.get("by_status") for s, _ in each),
                            "seconds": max((s.get("seconds") or 0 for s, _ in each), default=None),
                            "each": [s for s, _ in each]}
            r["stages"] = {k: max(st[k] for _, st in each) if all(st.get(k) is not None for _, st in each)
                           else None for k in ("before_main_s", "main_stage_s", "after_main_s")}
            r["stages"]["each"] = [st for _, st in each]
        r["internal_s"] = r["summary"].get("seconds")
    r["outputs_written"] = sum(1 for tag in tags for _ in (base / f"out{tag}").rglob("*.dcm"))
    r.pop("stdout", None)
    shutil.rmtree(base, ignore_errors=True)
    return r


def _add_counts(dicts) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in (d or {}).items():
            out[k] = out.get(k, 0) + v
    return out


def plateau_mb(run: dict) -> float | None:
    """Median main+workers RSS over the middle of the run (20-80 % of its wall time): the
    steady state while objects flow, as opposed to the start-up and end-of-run peaks."""
    tl = run.get("rss_timeline_s_main_workers_mb") or []
    lo, hi = 0.2 * run["wall_s"], 0.8 * run["wall_s"]
    mid = [m + w for t, m, w in tl if lo <= t <= hi]
    return statistics.median(mid) if mid else None


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def machine() -> dict:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    from importlib.metadata import version  # no imports of the packages themselves (RSS)
    from importlib.util import find_spec

    def installed(name: str) -> bool:
        try:
            return find_spec(name) is not None
        except (ImportError, ValueError):
            return False
    return {"nproc": os.cpu_count(), "cpu_model": model, "ram_gib": round(mem_kb / 2**20, 1),
            "python": platform.python_version(), "pydicom": version("pydicom"),
            "apache_beam": version("apache-beam"), "dicom_deid": version("dicom-deid"), "platform": platform.platform(),
            # which environment ran: optional packages Beam imports when they are there (pandas
            # from the tests extra, the GCP and AWS clients) make every process start slower
            "python_executable": sys.executable,
            "optional_packages_installed": {m: installed(m) for m in ("pandas", "google.cloud.storage", "boto3")},
            "loadavg_at_start": os.getloadavg()}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_baseline":
        return baseline_child(argv[1], argv[2], *(int(v) for v in argv[3:5]))
    if argv and argv[0] == "_baseline2":
        return baseline2_child(argv[1], argv[2])
    if argv and argv[0] == "_pipeline2":
        return pipeline2_child(*argv[1:5])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--ct512-share", type=float, default=0.6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up runs")
    ap.add_argument("--quiet-wait", type=float, default=90.0, metavar="S",
                    help="before each run wait up to S seconds for other load on the machine to "
                         "drop below --quiet-cpus (0: never wait)")
    ap.add_argument("--quiet-cpus", type=float, default=0.5)
    ap.add_argument("--retries", type=int, default=2,
                    help="re-run a failed run up to this many times (the repo may be mid-edit)")
    ap.add_argument("--only", default="", metavar="NAMES",
                    help="comma separated subset of runs: baseline,baseline2,p1,p2,p1x2,p1_tiny,"
                         "p1_500,p2_tiny")
    ap.add_argument("--out", type=Path, default=RESULTS / "throughput.json")
    ap.add_argument("--resummarise", type=Path, metavar="JSON",
                    help="recompute results and the report of an earlier results file, run nothing")
    a = ap.parse_args(argv)
    if a.resummarise:
        doc = json.loads(a.resummarise.read_text())
        doc["results"] = summarise(doc["runs"])
        a.resummarise.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(report(doc))
        return 0

    WORK.mkdir(parents=True, exist_ok=True)
    key = WORK / "bench.key"
    if not key.exists():
        key.write_text(secrets.token_hex(32) + "\n")
        key.chmod(0o600)
    root, cmeta = corpus(a.files, a.ct512_share, min(a.patients, a.files), a.seed)
    inputs = {"full": (root, cmeta["n_files"], cmeta["bytes"]),
              "tiny": subset(root, TINY), "mid": subset(root, MID)}
    plan = [("baseline", "full"), ("baseline2", "full"), ("p1", "full"), ("p2", "full"),
            ("p1x2", "full"), ("p1_tiny", "tiny"), ("p1_500", "mid"), ("p2_tiny", "tiny")]
    if a.only:
        wanted = set(a.only.split(","))
        unknown = wanted - {n for n, _ in plan}
        if unknown:
            ap.error(f"unknown run names: {', '.join(sorted(unknown))}")
        plan = [(n, i) for n, i in plan if n in wanted]
    started = _dt.datetime.now(_dt.timezone.utc)
    info = machine()
    warm_cache(root)
    if not a.no_warmup:  # untimed: fills the page cache and the bytecode/import caches
        print("warm-up ...", file=sys.stderr, flush=True)
        for name in ("baseline", "p1_tiny"):
            w = do_run(name, -1, *inputs["tiny"], key)
            if w["returncode"] != 0:
                print(f"warm-up {name} failed (rc={w['returncode']}); see {w['stderr_log']}",
                      file=sys.stderr)
                return 2

    runs, failed = [], []
    for r in range(a.repeats):
        order = plan if r % 2 == 0 else plan[::-1]  # alternate direction to spread drift
        for name, inp in order:
            for attempt in range(a.retries + 1):
                waited, before = wait_quiet(a.quiet_wait, a.quiet_cpus)
                res = do_run(name, r, *inputs[inp], key)
                res.update(attempt=attempt, waited_for_quiet_s=waited, other_load_cpus_before=before)
                if res["returncode"] == 0:
                    break
                failed.append(res)
                print(f"[{r}] {name} failed (rc={res['returncode']}), log {res['stderr_log']}",
                      file=sys.stderr, flush=True)
                if attempt < a.retries:
                    shutil.copy(res["stderr_log"], res["stderr_log"] + f".failed{attempt}")
                    time.sleep(30)
            else:
                continue
            runs.append(res)
            st = res.get("summary", {}).get("by_status") if "summary" in res else None
            print(f"[{r}] {name:9s} {res['files']:5d} files  wall {res['wall_s']:7.2f}s  "
                  f"tree RSS {res['peak_tree_rss_mb']:7.1f} MB  CPU {res['cpu_s']:6.1f}s  "
                  f"other load {res['other_load_cpus']:.2f} CPUs (before {res['other_load_cpus_before']:.2f}, "
                  f"waited {res['waited_for_quiet_s']:.0f}s)"
                  + (f"  by_status={st}" if st is not None else ""), file=sys.stderr, flush=True)

    results = summarise(runs)
    doc = {
        "benchmark": "throughput",
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "benchmarks/throughput.py", *argv]),
        "machine": info,
        "loadavg_at_end": os.getloadavg(),
        "corpus": cmeta,
        "inputs": {k: {"dir": str(v[0]), "files": v[1], "bytes": v[2]} for k, v in inputs.items()},
        "repeats": a.repeats,
        "memory_method": "sum of RSS (and PSS) over the run's process tree, sampled from /proc "
                         "every 0.2 s; max_process_rss_mb = ru_maxrss from os.wait4",
        "quiet_wait": {"max_s": a.quiet_wait, "threshold_cpus": a.quiet_cpus},
        "source_digests_seen": sorted({r["source_digest"] for r in runs}),
        "git_heads_seen": sorted({r["git_head"] for r in runs}),
        "results": results,
        "runs": runs,
        "failed_runs": failed,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(report(doc))
    print(f"\nwritten: {a.out}", file=sys.stderr)
    return 0 if not failed else 1


def other_load(seconds: float = 2.0) -> float:
    """CPUs kept busy by other processes over ``seconds`` (this process is idle meanwhile)."""
    b0, t0 = _machine_busy_ticks(), time.perf_counter()
    time.sleep(seconds)
    return (_machine_busy_ticks() - b0) / TICK / (time.perf_counter() - t0)


def wait_quiet(max_s: float, threshold: float) -> tuple[float, float]:
    """Wait (at most ``max_s``) until other load < ``threshold`` CPUs; (waited s, last load)."""
    t0 = time.perf_counter()
    load = other_load(1.0)
    while load >= threshold and time.perf_counter() - t0 < max_s:
        load = other_load(2.0)
    return time.perf_counter() - t0, load


def summarise(runs: list[dict]) -> dict:
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["name"], []).append(r)
    rows = {}
    for name, rs in by.items():
        wall = med(r["wall_s"] for r in rs)
        n, nbytes = rs[0]["files"], rs[0]["input_bytes"]
        rows[name] = {
            "files": n, "input_mb": nbytes / 1e6, "repeats": len(rs),
            "wall_s": wall, "wall_s_all": [round(r["wall_s"], 3) for r in rs],
            "files_per_s": n / wall, "mb_per_s": nbytes / 1e6 / wall,
            "internal_s": med(r.get("internal_s") for r in rs),
            "peak_tree_rss_mb": med(r["peak_tree_rss_mb"] for r in rs),
            "peak_tree_pss_mb": med(r["peak_tree_pss_mb"] for r in rs),
            "max_process_rss_mb": med(r["max_process_rss_mb"] for r in rs),
            "max_processes": max(r["max_processes"] for r in rs),
            "cpu_s": med(r["cpu_s"] for r in rs),
            "cpu_ms_per_file": 1000 * med(r["cpu_s"] for r in rs) / n,
            "cpus_used": med(r["cpu_s"] / r["wall_s"] for r in rs),
            "other_load_cpus": med(r["other_load_cpus"] for r in rs),
            "cpu_main_s": med(r["cpu_role_s_sampled"].get("main", 0.0) for r in rs),
            "cpu_workers_s": med(r["cpu_role_s_sampled"].get("worker", 0.0) for r in rs),
            "plateau_rss_mb": med(plateau_mb(r) for r in rs),
            "peak_main_rss_mb": med(r["peak_role_rss_mb"].get("main", 0) for r in rs),
            "peak_workers_rss_mb": med(r["peak_role_rss_mb"].get("worker", 0) for r in rs),
            "by_status": [r.get("summary", {}).get("by_status") for r in rs] if "summary" in rs[0] else None,
            "outputs_written": [r["outputs_written"] for r in rs],
            "returncodes": [r["returncode"] for r in rs],
            # the local runner's stages (stage_times.py): start-up, the main stage, the rest
            "main_stage_s": med(r.get("stages", {}).get("main_stage_s") for r in rs),
            "before_main_s": med(r.get("stages", {}).get("before_main_s") for r in rs),
            "after_main_s": med(r.get("stages", {}).get("after_main_s") for r in rs),
            "outside_main_s": med((r["wall_s"] - r["stages"]["main_stage_s"]) if r.get("stages") else None
                                  for r in rs),
            "source_digests": sorted({r["source_digest"] for r in rs}),
        }
    out = {"rows": rows}
    g = rows.get
    if g("baseline") and g("p1") and g("p2"):
        a, b, c = rows["baseline"], rows["p1"], rows["p2"]
        ratio = {"b_over_a": b["files_per_s"] / a["files_per_s"],
                 "c_over_b": c["files_per_s"] / b["files_per_s"],
                 # noise-robust companion: CPU cost per file of the whole tree, a over b
                 "cpu_efficiency_b_vs_a": a["cpu_s"] / b["cpu_s"]}
        # marginal rates: the fixed start-up cost (tiny run) taken out
        marg = {}
        base_loop = a["internal_s"]
        if base_loop:
            marg["baseline_files_per_s"] = a["files"] / base_loop
        marg["baseline_cpu_ms_per_file"] = a["cpu_ms_per_file"]
        for big, tiny in (("p1", "p1_tiny"), ("p2", "p2_tiny")):
            if g(tiny):
                dn = rows[big]["files"] - rows[tiny]["files"]
                dt = rows[big]["wall_s"] - rows[tiny]["wall_s"]
                marg[f"{big}_fixed_s"] = rows[tiny]["wall_s"] - rows[tiny]["files"] * dt / dn
                marg[f"{big}_files_per_s"] = dn / dt if dt > 0 else None
                marg[f"{big}_mb_per_s"] = ((rows[big]["input_mb"] - rows[tiny]["input_mb"]) / dt
                                           if dt > 0 else None)
                marg[f"{big}_cpu_ms_per_file"] = 1000 * (rows[big]["cpu_s"] - rows[tiny]["cpu_s"]) / dn
        if marg.get("baseline_files_per_s") and marg.get("p1_files_per_s"):
            ratio["b_over_a_marginal"] = marg["p1_files_per_s"] / marg["baseline_files_per_s"]
        if marg.get("p1_cpu_ms_per_file"):
            ratio["cpu_efficiency_b_vs_a_marginal"] = (marg["baseline_cpu_ms_per_file"]
                                                      / marg["p1_cpu_ms_per_file"])
        if marg.get("p1_files_per_s") and marg.get("p2_files_per_s"):
            ratio["c_over_b_marginal"] = marg["p2_files_per_s"] / marg["p1_files_per_s"]
        if g("baseline2"):
            # the machine's own two-process scaling: the ceiling for c_over_b on this machine
            a2 = rows["baseline2"]
            ratio["machine_2proc_over_1proc"] = a2["files_per_s"] / a["files_per_s"]
            if a.get("internal_s") and a2.get("internal_s"):
                ratio["machine_2proc_over_1proc_loop"] = a["internal_s"] / a2["internal_s"]
            ratio["c_over_b_share_of_machine"] = ratio["c_over_b"] / ratio["machine_2proc_over_1proc"]
            if "c_over_b_marginal" in ratio and "machine_2proc_over_1proc_loop" in ratio:
                ratio["c_over_b_marginal_share_of_machine"] = (ratio["c_over_b_marginal"]
                                                               / ratio["machine_2proc_over_1proc_loop"])
        if b.get("main_stage_s") and c.get("main_stage_s"):
            # the stage that reads and de-identifies every object, alone: how the work itself
            # scales, without the fixed start-up and end of a run (which do not scale)
            ratio["c_over_b_main_stage"] = b["main_stage_s"] / c["main_stage_s"]
            if "machine_2proc_over_1proc_loop" in ratio:
                ratio["c_over_b_main_stage_share_of_machine"] = (ratio["c_over_b_main_stage"]
                                                                 / ratio["machine_2proc_over_1proc_loop"])
            if c.get("outside_main_s") is not None and "machine_2proc_over_1proc_loop" in ratio:
                # the best p2 / p1 this machine allows with the time this run spent outside
                # the main stage: the main stage scaled as two independent bare loops do
                ratio["c_over_b_ceiling"] = b["wall_s"] / (
                    b["main_stage_s"] / ratio["machine_2proc_over_1proc_loop"] + c["outside_main_s"])
        # CPU of the same work on two busy CPUs against one: the bare loop, two whole
        # pipelines (p1x2) and two workers of one pipeline (p2), each against its single run
        if g("baseline2"):
            ratio["cpu_baseline2_over_baseline"] = rows["baseline2"]["cpu_s"] / a["cpu_s"]
        if b.get("cpu_workers_s"):
            ratio["cpu_workers_p2_over_p1"] = c["cpu_workers_s"] / b["cpu_workers_s"]
        if g("p1x2"):
            d = rows["p1x2"]
            # two independent one-worker pipelines, each over half the files: what this
            # machine gives the pipeline's own work on two processes
            ratio["pipeline_2proc_over_1proc"] = d["files_per_s"] / b["files_per_s"]
            ratio["c_over_pipeline_2proc"] = c["files_per_s"] / d["files_per_s"]
            if b.get("main_stage_s") and d.get("main_stage_s"):
                ratio["pipeline_2proc_over_1proc_main_stage"] = b["main_stage_s"] / d["main_stage_s"]
            if b.get("cpu_workers_s"):
                ratio["cpu_workers_p1x2_over_p1"] = d["cpu_workers_s"] / b["cpu_workers_s"]
        out["marginal"] = marg
        out["ratios"] = ratio
        targets = {
            "p1_vs_baseline_min_0.75": ratio["b_over_a"] >= 0.75,
            "p1_vs_baseline_goal_0.90": ratio["b_over_a"] >= 0.90,
            "p2_vs_p1_min_1.8": ratio["c_over_b"] >= 1.8,
        }
        if "b_over_a_marginal" in ratio:
            targets["p1_vs_baseline_min_0.75_marginal"] = ratio["b_over_a_marginal"] >= 0.75
            targets["p1_vs_baseline_goal_0.90_marginal"] = ratio["b_over_a_marginal"] >= 0.90
        if "c_over_b_marginal" in ratio:
            targets["p2_vs_p1_min_1.8_marginal"] = ratio["c_over_b_marginal"] >= 1.8
        out["targets"] = targets
    if g("p1") and g("p1_500"):
        growth = rows["p1"]["peak_tree_rss_mb"] / rows["p1_500"]["peak_tree_rss_mb"]
        slope = 1000 * (rows["p1"]["peak_tree_rss_mb"] - rows["p1_500"]["peak_tree_rss_mb"]) / (
            rows["p1"]["files"] - rows["p1_500"]["files"])
        out["memory"] = {
            "files_small": rows["p1_500"]["files"], "files_large": rows["p1"]["files"],
            "peak_tree_rss_mb_small": rows["p1_500"]["peak_tree_rss_mb"],
            "peak_tree_rss_mb_large": rows["p1"]["peak_tree_rss_mb"],
            "peak_tree_pss_mb_small": rows["p1_500"]["peak_tree_pss_mb"],
            "peak_tree_pss_mb_large": rows["p1"]["peak_tree_pss_mb"],
            "peak_main_rss_mb_small": rows["p1_500"]["peak_main_rss_mb"],
            "peak_main_rss_mb_large": rows["p1"]["peak_main_rss_mb"],
            "peak_workers_rss_mb_small": rows["p1_500"]["peak_workers_rss_mb"],
            "peak_workers_rss_mb_large": rows["p1"]["peak_workers_rss_mb"],
            "rss_growth_ratio": growth,
            "plateau_rss_mb_small": rows["p1_500"]["plateau_rss_mb"],
            "plateau_rss_mb_large": rows["p1"]["plateau_rss_mb"],
            "peak_growth_mb_per_1000_files": slope,
            "criterion": f"flat if the peak tree RSS grows by <= {FLAT_MB_PER_1000} MB per 1000 "
                         "more files (<= 0.5 GB per 100k files)",
            "flat": slope <= FLAT_MB_PER_1000,
        }
        out.setdefault("targets", {})["memory_flat"] = slope <= FLAT_MB_PER_1000
    return out


def report(doc: dict) -> str:
    res = doc["results"]
    rows = res["rows"]
    label = {"baseline": "a) bare pydicom loop", "baseline2": "a2) bare loop, 2 processes", "p1": "b) pipeline, 1 worker",
             "p2": "c) pipeline, 2 workers", "p1_tiny": "b) pipeline, 1 worker (tiny)",
             "p2_tiny": "c) pipeline, 2 workers (tiny)", "p1_500": "b) pipeline, 1 worker (500)",
             "p1x2": "d) two 1-worker pipelines at once"}
    lines = ["| run | files | input MB | wall s | files/s | MB/s | peak tree RSS MB | peak tree PSS MB "
             "| max proc RSS MB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("baseline", "baseline2", "p1", "p2", "p1x2", "p1_tiny", "p2_tiny", "p1_500"):
        if name not in rows:
            continue
        r = rows[name]
        lines.append(f"| {label[name]} | {r['files']} | {r['input_mb']:.1f} | {r['wall_s']:.2f} | "
                     f"{r['files_per_s']:.1f} | {r['mb_per_s']:.1f} | {r['peak_tree_rss_mb']:.0f} | "
                     f"{r['peak_tree_pss_mb']:.0f} | {r['max_process_rss_mb']:.0f} |")
    lines += ["", "| run | CPU s (tree) | CPU s main / workers | CPU ms/file | CPUs used | other load (CPUs) "
              "| peak main RSS MB | peak workers RSS MB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("baseline", "baseline2", "p1", "p2", "p1x2", "p1_tiny", "p2_tiny", "p1_500"):
        if name not in rows:
            continue
        r = rows[name]
        lines.append(f"| {label[name]} | {r['cpu_s']:.1f} | {r['cpu_main_s']:.1f} / {r['cpu_workers_s']:.1f} | "
                     f"{r['cpu_ms_per_file']:.1f} | {r['cpus_used']:.2f} | "
                     f"{r['other_load_cpus']:.2f} | {r['peak_main_rss_mb']:.0f} | {r['peak_workers_rss_mb']:.0f} |")
    if "ratios" in res:
        lines.append("")
        for k, v in res["ratios"].items():
            lines.append(f"- {k}: {v:.3f}")
        for k, v in res.get("marginal", {}).items():
            lines.append(f"- marginal {k}: {v:.2f}" if v is not None else f"- marginal {k}: n/a")
    if "memory" in res:
        m = res["memory"]
        lines.append(f"- memory: peak tree RSS {m['peak_tree_rss_mb_small']:.0f} MB at {m['files_small']} "
                     f"files vs {m['peak_tree_rss_mb_large']:.0f} MB at {m['files_large']} files "
                     f"(x{m['rss_growth_ratio']:.2f}); main {m['peak_main_rss_mb_small']:.0f} -> "
                     f"{m['peak_main_rss_mb_large']:.0f} MB, workers {m['peak_workers_rss_mb_small']:.0f} -> "
                     f"{m['peak_workers_rss_mb_large']:.0f} MB; +{m['peak_growth_mb_per_1000_files']:.0f} MB "
                     f"per 1000 files; plateau (20-80 % of the run, main+workers) "
                     f"{m['plateau_rss_mb_small'] or 0:.0f} -> {m['plateau_rss_mb_large'] or 0:.0f} MB")
    for k, v in res.get("targets", {}).items():
        lines.append(f"- target {k}: {'met' if v else 'NOT met'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
