#!/usr/bin/env python
"""Engine CPU per object, two source trees side by side (old code against new code).

Each measurement is a child process that imports ``dicom_deid`` from one tree (through
``PYTHONPATH``), runs the engine chain the pipeline runs on every object over the same files,
and reports the process CPU time (``time.process_time``) of each step:

    read       reader.parse (bytes in hand; dcmread, length check, raw walk + PHI context,
               sha256, keyed fingerprint)
      dcmread       pydicom.dcmread inside it
      lengths       reader._check_lengths inside it (when the tree has it)
      walk_phi      phi.extract inside it (the raw walk)
    person     tags.patient_key_of + pseudonyms.original_person_ids (what the tag stage does
               before the rules)
    tags       tags.deidentify
    classify   classify.needs_stage (pixel and attachment stages)
    serialize  writer.serialize
    verify     verify.find_residuals

plus, in the same child, a bare ``dcmread`` + ``save_as`` of the same bytes (the
throughput benchmark's bare loop, without file I/O) as the yardstick.

The driver alternates the trees (A B B A ...) for ``--rounds`` rounds per policy, so both
see the same machine load, and reports medians of the per-round means (ms per object) and
the ratio new / old. Run it under the shared benchmark lock::

    git worktree add /tmp/engine-base <commit>
    flock /tmp/dicom-deid-bench.lock .venv/bin/python benchmarks/engine_cpu.py \\
        --base /tmp/engine-base --out benchmarks/results/engine_cpu.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS = ("read", "dcmread", "lengths", "walk_phi", "person", "tags", "classify", "serialize",
         "verify", "engine", "bare")


def _files(root: Path, objects: int, stride: int) -> list[Path]:
    return sorted(root.rglob("*.dcm"))[::stride][:objects]


def child(a) -> int:
    import io

    import pydicom

    from dicom_deid import classify, keys, phi, policy, reader, tags, verify, writer
    from dicom_deid.element import InputRef
    from dicom_deid.pseudonyms import original_person_ids

    files = _files(Path(a.corpus), a.objects, a.stride)
    datas = [(str(f), f.read_bytes()) for f in files]
    key = bytes.fromhex("5a" * 32)
    pol = policy.load(a.policy)
    rules = tags.compile_rules(pol, key)
    deriver = keys.Deriver(key)
    pt = time.process_time
    acc = {s: 0.0 for s in STEPS}

    def timed(name, fn):
        def wrapper(*args, **kw):
            t0 = pt()
            try:
                return fn(*args, **kw)
            finally:
                acc[name] += pt() - t0
        return wrapper

    orig_dcmread = pydicom.dcmread
    pydicom.dcmread = timed("dcmread", orig_dcmread)
    if hasattr(reader, "_check_lengths"):
        reader._check_lengths = timed("lengths", reader._check_lengths)
    phi.extract = timed("walk_phi", phi.extract)

    def chain(uri, data):
        t0 = pt()
        obj = reader.parse(InputRef(uri, deriver.input_key(uri), len(data)), deriver, data=data)
        t1 = pt()
        obj.patient_key = tags.patient_key_of(obj.dataset, rules.deriver, pol.person_key)
        obj.private.update(original_person_ids(obj.dataset, pol.person_key))
        t2 = pt()
        tags.deidentify(obj, rules, None)
        t3 = pt()
        classify.needs_stage(obj.dataset, obj.facts.get("sop_class_uid"))
        t4 = pt()
        out = writer.serialize(obj.dataset)
        t5 = pt()
        verify.find_residuals(obj, out)
        t6 = pt()
        obj.release()
        for s, v in zip(("read", "person", "tags", "classify", "serialize", "verify"),
                        (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
            acc[s] += v
        acc["engine"] += t6 - t0

    def bare(data):
        t0 = pt()
        ds = orig_dcmread(io.BytesIO(data))
        buf = io.BytesIO()
        ds.save_as(buf)
        acc["bare"] += pt() - t0

    for uri, data in datas[: a.warmup]:
        chain(uri, data)
        bare(data)
    for s in acc:
        acc[s] = 0.0
    for uri, data in datas:
        chain(uri, data)
        bare(data)
    n = len(datas)
    print(json.dumps({"n": n, "ms_per_object": {s: 1e3 * v / n for s, v in acc.items()}}))
    return 0


def run_child(tree: str, a, policy: str) -> dict:
    env = dict(os.environ, PYTHONPATH=tree)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--policy", policy,
           "--corpus", str(a.corpus), "--objects", str(a.objects), "--stride", str(a.stride),
           "--warmup", str(a.warmup)]
    # run from a neutral folder so that only PYTHONPATH decides which tree is imported
    out = subprocess.run(cmd, env=env, cwd="/", check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", help="tree with the old code (e.g. a git worktree)")
    ap.add_argument("--new", default=str(HERE.parent), help="tree with the new code")
    ap.add_argument("--corpus", type=Path,
                    default=HERE / "_work" / "corpus-n2000-ct0.6-p100-s0")
    ap.add_argument("--objects", type=int, default=400)
    ap.add_argument("--stride", type=int, default=5, help="every k-th file (mix of kinds)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--policies", default="basic,research")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--policy", default="basic", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child(a)
    if not a.base:
        ap.error("--base is required")
    trees = {"old": a.base, "new": a.new}
    started = _dt.datetime.now(_dt.timezone.utc)
    t0, load0 = time.time(), os.getloadavg()
    runs: dict = {p: {"old": [], "new": []} for p in a.policies.split(",")}
    for r in range(a.rounds):
        for pol in runs:
            order = ("old", "new") if r % 2 == 0 else ("new", "old")
            for name in order:
                res = run_child(trees[name], a, pol)
                runs[pol][name].append(res["ms_per_object"])
                print(f"round {r + 1} {pol} {name}: engine {res['ms_per_object']['engine']:.2f} ms, "
                      f"bare {res['ms_per_object']['bare']:.2f} ms", file=sys.stderr)
    summary = {}
    for pol, by in runs.items():
        summary[pol] = {}
        for name in ("old", "new"):
            summary[pol][name] = {s: statistics.median(x[s] for x in by[name]) for s in STEPS}
        summary[pol]["new_over_old"] = {
            s: (summary[pol]["new"][s] / summary[pol]["old"][s]) if summary[pol]["old"][s] else None
            for s in STEPS}
    doc = {"benchmark": "engine_cpu", "started_utc": started.isoformat(timespec="seconds"),
           "elapsed_s": round(time.time() - t0, 1), "loadavg_before": load0,
           "loadavg_after": os.getloadavg(), "trees": trees, "objects": a.objects,
           "stride": a.stride, "rounds": a.rounds, "corpus": str(a.corpus),
           "unit": "CPU ms per object (time.process_time), median of per-round means",
           "summary": summary, "runs": runs}
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(report(doc))
    return 0


def report(doc: dict) -> str:
    lines = []
    for pol, s in doc["summary"].items():
        lines += [f"policy {pol}: CPU ms per object", "", "| step | old | new | new / old |",
                  "|---|---:|---:|---:|"]
        for step in STEPS:
            ratio = s["new_over_old"][step]
            lines.append(f"| {step} | {s['old'][step]:.3f} | {s['new'][step]:.3f} | "
                         f"{'-' if ratio is None else f'{ratio:.2f}'} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
