#!/usr/bin/env python
"""Engine-only cost per object (no Beam) of each step the pipeline runs on an object.

For each of the first ``--objects`` files (sorted by path) of the throughput corpus
(``benchmarks/_work/``, generated when missing), in one process and for both the
``basic`` and ``research`` policies (alternating which goes first, file by file):

    parse        reader.parse(InputRef, Deriver, data=bytes)   (incl. sha256 + PHI context)
    deidentify   tags.deidentify(obj, rules)
    serialize    writer.serialize(obj.dataset)
    verify       verify.find_residuals(obj, output_bytes)

Each step is timed with ``time.perf_counter``; reported in microseconds per object as
median, p90 and mean, and as each step's share of the chain's total time. Reading the
file bytes is not timed (the throughput benchmark covers I/O). A few files are run
untimed first to warm imports and caches.

Usage::

    .venv/bin/python benchmarks/tag_cost.py [--objects 500] [--out benchmarks/results/tag_cost.json]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import secrets
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from throughput import RESULTS, WORK, corpus, machine, source_digest, wait_quiet  # noqa: E402

STEPS = ("parse", "deidentify", "serialize", "verify")
POLICIES = ("basic", "research")


def stats(us: list[float]) -> dict:
    q = statistics.quantiles(us, n=10, method="inclusive") if len(us) > 1 else [us[0]] * 9
    return {"median_us": statistics.median(us), "p90_us": q[8], "mean_us": statistics.fmean(us),
            "n": len(us)}


def kind_of(ds) -> str:
    return f"{ds.get('Modality', '?')}{int(ds.get('Rows', 0) or 0)}"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=500, help="first N files of the corpus")
    ap.add_argument("--files", type=int, default=2000, help="corpus size (same corpus as throughput.py)")
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--ct512-share", type=float, default=0.6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--quiet-wait", type=float, default=120.0, metavar="S",
                    help="first wait up to S seconds for other load to drop below 0.5 CPUs")
    ap.add_argument("--out", type=Path, default=RESULTS / "tag_cost.json")
    a = ap.parse_args(argv)

    root, cmeta = corpus(a.files, a.ct512_share, min(a.patients, a.files), a.seed)
    files = sorted(root.rglob("*.dcm"))[: a.objects]
    info = machine()

    from dicom_deid import keys, policy, reader, tags, verify, writer
    from dicom_deid.element import InputRef

    key = bytes.fromhex(secrets.token_hex(32))
    deriver = keys.Deriver(key)
    rules = {p: tags.compile_rules(policy.load(p), key) for p in POLICIES}
    pc, ct = time.perf_counter, time.process_time

    def chain(path: Path, data: bytes, pol: str):
        uri = str(path)
        t0, c0 = pc(), ct()
        obj = reader.parse(InputRef(uri, deriver.input_key(uri), len(data)), deriver, data=data)
        t1, c1 = pc(), ct()
        tags.deidentify(obj, rules[pol])
        t2, c2 = pc(), ct()
        out = writer.serialize(obj.dataset)
        t3, c3 = pc(), ct()
        findings = verify.find_residuals(obj, out)
        t4, c4 = pc(), ct()
        kind = kind_of(obj.dataset)
        obj.release()
        wall = [(t1 - t0) * 1e6, (t2 - t1) * 1e6, (t3 - t2) * 1e6, (t4 - t3) * 1e6]
        cpu = [(c1 - c0) * 1e6, (c2 - c1) * 1e6, (c3 - c2) * 1e6, (c4 - c3) * 1e6]
        return wall, cpu, findings, kind

    for f in files[: a.warmup]:
        data = f.read_bytes()
        for pol in POLICIES:
            chain(f, data, pol)

    times = {p: {s: [] for s in STEPS} for p in POLICIES}
    cpu_times = {p: {s: [] for s in STEPS} for p in POLICIES}
    by_kind: dict[str, dict[str, list[float]]] = {}
    findings_count = {p: 0 for p in POLICIES}
    finding_kinds: dict[str, int] = {}
    waited, load_before = wait_quiet(a.quiet_wait, 0.5)
    started = _dt.datetime.now(_dt.timezone.utc)
    t_all, c_all = pc(), time.process_time()
    for i, f in enumerate(files):
        data = f.read_bytes()
        for pol in (POLICIES if i % 2 == 0 else POLICIES[::-1]):
            us, cus, findings, kind = chain(f, data, pol)
            for s, v, c in zip(STEPS, us, cus):
                times[pol][s].append(v)
                cpu_times[pol][s].append(c)
            by_kind.setdefault(kind, {p: [] for p in POLICIES})[pol].append(sum(us))
            if findings:
                findings_count[pol] += 1
                for x in findings:
                    k = f"{pol}:{x}"
                    finding_kinds[k] = finding_kinds.get(k, 0) + 1
    elapsed, cpu = pc() - t_all, time.process_time() - c_all

    results = {}
    for pol in POLICIES:
        total = [sum(v) for v in zip(*(times[pol][s] for s in STEPS))]
        grand = sum(total)
        steps = {}
        for s in STEPS:
            st = stats(times[pol][s])
            st["share"] = sum(times[pol][s]) / grand
            # process CPU time of the step: unaffected by waiting for a CPU on a busy machine
            st["cpu_median_us"] = statistics.median(cpu_times[pol][s])
            st["cpu_share"] = sum(cpu_times[pol][s]) / sum(sum(cpu_times[pol][x]) for x in STEPS)
            steps[s] = st
        cpu_total = [sum(v) for v in zip(*(cpu_times[pol][s] for s in STEPS))]
        tot = stats(total)
        tot["cpu_median_us"] = statistics.median(cpu_total)
        results[pol] = {"steps": steps, "total": tot,
                        "objects_per_s_engine_cpu": len(cpu_total) / (sum(cpu_total) / 1e6),
                        "objects_per_s_engine": len(total) / (grand / 1e6),
                        "objects_with_findings": findings_count[pol]}
    kinds = {k: {"n": len(v["basic"]), **{f"{p}_total_median_us": statistics.median(v[p]) for p in POLICIES}}
             for k, v in sorted(by_kind.items())}
    doc = {
        "benchmark": "tag_cost",
        "started_utc": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "benchmarks/tag_cost.py", *argv]),
        "machine": info,
        "loadavg_at_end": os.getloadavg(),
        "corpus": cmeta,
        "objects": len(files),
        "input_mb": sum(f.stat().st_size for f in files) / 1e6,
        "source_digest": source_digest(),
        "waited_for_quiet_s": waited,
        "other_load_cpus_before": load_before,
        "elapsed_s": elapsed,
        "cpu_s": cpu,
        # < 1 means the process was waiting for a CPU (other load) part of the time
        "cpu_over_wall": cpu / elapsed,
        "results": results,
        "by_kind": kinds,
        "finding_kinds": finding_kinds,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(report(doc))
    print(f"\nwritten: {a.out}", file=sys.stderr)
    return 0


def report(doc: dict) -> str:
    lines = [f"{doc['objects']} objects ({doc['input_mb']:.1f} MB), microseconds per object", "",
             "| step | basic median | basic p90 | basic share | basic CPU median | research median "
             "| research p90 | research share | research CPU median |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    r = doc["results"]
    for s in (*STEPS, "total"):
        cells = []
        for p in POLICIES:
            st = r[p]["total"] if s == "total" else r[p]["steps"][s]
            share = "100 %" if s == "total" else f"{100 * st['share']:.1f} %"
            cells += [f"{st['median_us']:,.0f}", f"{st['p90_us']:,.0f}", share, f"{st['cpu_median_us']:,.0f}"]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"- loop CPU/wall: {doc['cpu_over_wall']:.2f} (1.00 = never waited for a CPU)")
    for p in POLICIES:
        lines.append(f"- {p}: {r[p]['objects_per_s_engine']:.1f} objects/s engine-only by wall time, "
                     f"{r[p]['objects_per_s_engine_cpu']:.1f} by CPU time (1 core), "
                     f"objects with verify findings: {r[p]['objects_with_findings']}")
    lines += ["", "| kind (Modality+Rows) | n | basic total median us | research total median us |",
              "|---|---:|---:|---:|"]
    for k, v in doc["by_kind"].items():
        lines.append(f"| {k} | {v['n']} | {v['basic_total_median_us']:,.0f} | "
                     f"{v['research_total_median_us']:,.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
