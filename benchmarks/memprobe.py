"""Where does the memory of a local run go? Runs ``dicom-deid run`` in this process with
Beam's FnApiRunner instrumented: one line per executed bundle (fused stage) with the
launcher's and the SDK workers' RSS before and after, the bytes the runner holds between
stages (queued stage inputs, side-input state) and, with ``--trace``, the launcher's
tracemalloc growth by source line after each stage.

    .venv/bin/python benchmarks/memprobe.py --files-dir DIR --out JSON [--trace] [-- run args]

Diagnostics only: nothing identifying is printed (stage names, sizes and source lines).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import TreeSampler  # noqa: E402

MB = 2**20


def _buffer_bytes(buf) -> tuple[int, int]:
    """(encoded bytes, decoded values) a runner buffer holds."""
    from apache_beam.runners.portability.fn_api_runner import execution
    if isinstance(buf, execution.ListBuffer):
        n = sum(len(b) for b in buf._inputs)
        if buf._grouped_output:
            n += sum(len(b) for part in buf._grouped_output for b in part)
        return n, 0
    if isinstance(buf, execution.GroupingBuffer):
        vals = sum(len(v) for v in buf._table.values())
        enc = sum(len(b) for part in (buf._grouped_output or []) for b in part)
        return enc, vals
    return 0, 0


def held(ctx) -> dict:
    seen, enc, vals = set(), 0, 0
    bufs = list(ctx.pcoll_buffers.values())
    for q in (ctx.queues.ready_inputs, ctx.queues.watermark_pending_inputs, ctx.queues.time_pending_inputs):
        for _key, data_input in list(q._q):
            bufs.extend(data_input.data.values())
    for b in bufs:
        if id(b) in seen:
            continue
        seen.add(id(b))
        e, v = _buffer_bytes(b)
        enc += e
        vals += v
    state = 0
    st = ctx.worker_handler_manager.state_servicer._state
    under = getattr(st, "_underlying", st)
    for v in under.values():
        state += sum(len(x) for x in v if isinstance(x, (bytes, bytearray)))
    return {"buffers_mb": round(enc / MB, 2), "grouped_values": vals, "state_mb": round(state / MB, 2)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files-dir", required=True)
    ap.add_argument("--key", default=str(Path(__file__).resolve().parent / "_work" / "bench.key"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--trace", action="store_true", help="tracemalloc in the launcher")
    ap.add_argument("rest", nargs="*")
    a = ap.parse_args()
    if a.trace:
        tracemalloc.start(6)

    from apache_beam.runners.portability.fn_api_runner import fn_runner
    sampler = TreeSampler(os.getpid(), 0.2)
    events: list[dict] = []
    stage_now = {"name": "start"}
    marks: list[tuple[float, str]] = []

    def mem():
        by = {}
        from throughput import tree_pids, _rss_bytes
        for p in tree_pids(os.getpid()):
            role = sampler._role(p)
            by[role] = by.get(role, 0) + _rss_bytes(p)
        return {k: round(v / MB, 1) for k, v in by.items()}

    orig = fn_runner.FnApiRunner._execute_bundle
    last_snap = [None]

    def execute(self, ctx, bcm, bundle_input):
        name = bcm.stage.name
        t0 = time.perf_counter() - sampler._t0
        stage_now["name"] = name
        marks.append((round(t0, 2), name))
        inputs = {k: _buffer_bytes(v) for k, v in bundle_input.data.items()}
        before = {"mem": mem(), **held(ctx)}
        r = orig(self, ctx, bcm, bundle_input)
        after = {"mem": mem(), **held(ctx)}
        ev = {"stage": name[:160], "t": round(t0, 2), "s": round(time.perf_counter() - sampler._t0 - t0, 2),
              "input_mb": round(sum(e for e, _ in inputs.values()) / MB, 2),
              "input_grouped_values": sum(v for _, v in inputs.values()),
              "before": before, "after": after}
        if a.trace:
            snap = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)])
            if last_snap[0] is not None:
                top = snap.compare_to(last_snap[0], "lineno")[:6]
                ev["launcher_growth"] = [f"{s.size_diff / MB:+.2f} MB {s.count_diff:+d} "
                                         f"{s.traceback[0].filename.rsplit('site-packages/', 1)[-1]}:{s.traceback[0].lineno}"
                                         for s in top]
            ev["launcher_traced_mb"] = round(tracemalloc.get_traced_memory()[0] / MB, 1)
            last_snap[0] = snap
        events.append(ev)
        print(json.dumps(ev), file=sys.stderr, flush=True)
        return r

    fn_runner.FnApiRunner._execute_bundle = execute

    phases: list[dict] = []

    def phase(mod, name):
        f = getattr(mod, name)

        def wrapped(*args, **kwargs):
            t = round(time.perf_counter() - sampler._t0, 2)
            before = mem()
            try:
                return f(*args, **kwargs)
            finally:
                ev = {"phase": name, "t": t, "s": round(time.perf_counter() - sampler._t0 - t, 2),
                      "before": before, "after": mem()}
                phases.append(ev)
                print(json.dumps(ev), file=sys.stderr, flush=True)
        setattr(mod, name, wrapped)

    from dicom_deid import summary as summary_mod
    from dicom_deid.pipelines import deidentify
    phase(fn_runner.FnApiRunner, "run_stages")
    phase(deidentify, "cleanup_staging")
    phase(summary_mod, "summarize")
    phase(summary_mod, "write")
    sampler.start()
    work = Path(tempfile.mkdtemp(prefix="memprobe-"))
    from dicom_deid import cli
    t0 = time.perf_counter()
    code = cli.main(["run", "--input", f"{a.files_dir}/**", "--output", str(work / "out"),
                     "--private", str(work / "private"), "--key", a.key, "--no-progress",
                     "--direct_num_workers=1", *a.rest])
    wall = time.perf_counter() - t0
    sampler.stop()
    shutil.rmtree(work, ignore_errors=True)
    doc = {"files_dir": a.files_dir, "code": code, "wall_s": round(wall, 1),
           "peak_main_mb": round(sampler.peak_role.get("main", 0) / MB, 1),
           "peak_workers_mb": round(sampler.peak_role.get("worker", 0) / MB, 1),
           "peak_at": sampler.peak_role_at, "peak_tree_mb": round(sampler.peak_rss / MB, 1), "loadavg": os.getloadavg(),
           "events": events, "phases": phases, "marks": marks, "timeline": sampler.timeline[::5] + sampler.timeline[-30:]}
    Path(a.out).write_text(json.dumps(doc, indent=1))
    print(json.dumps({k: doc[k] for k in ("code", "wall_s", "peak_tree_mb", "peak_main_mb", "peak_workers_mb", "peak_at")}),
          file=sys.stderr)
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
