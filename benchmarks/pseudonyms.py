"""Benchmark: cost of the header scan and pseudonym-map building relative to the whole run.

    flock /tmp/dicom-deid-bench.lock .venv/bin/python benchmarks/pseudonyms.py \\
        [--objects 10000] [--patients 1000] [--store 100000] [--workers 2] [--repeats 1]

1. makes ``--objects`` small synthetic objects of ``--patients`` patients (clones of
   ``dicom_deid.sample`` files with new patient IDs and UIDs; fake identifiers only; kept
   in ``benchmarks/_work/pseudonyms/data`` and reused),
2. before every measured run fills a fresh pseudonym store with ``--store`` earlier
   patients (4 Parquet part files of 25,000 rows),
3. runs, each in its own process on all objects (``--workers`` FnApiRunner workers,
   multi-processing):

   * ``stage1``: stage 1 alone, MatchInputs -> ScanHeaders -> BuildPseudonymMap (the map
     is counted and written, so the store join, decisions and new part files all happen);
   * ``full``: the whole run, ``dicom-deid run``'s pipeline (stage 1, then read ... write);
   * ``no_stage1``: the same whole run with stage 1 left out (an empty map: pseudonyms from
     the keyed function), i.e. everything but the header scan and the map.

   Share of stage 1 = ``stage1 / full`` (stage 1 run alone, start-up included) and
   ``(full - no_stage1) / full`` (what stage 1 adds to a run). Both are reported: on a
   shared 2-core machine neither is exact.

Each run's process tree is sampled from /proc (CPU, peak RSS) with the helpers of
``benchmarks/throughput.py``, and the CPU used by everything else on the machine meanwhile
is recorded (``other_load_cpus``). Results: ``benchmarks/results/pseudonyms-{objects}.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

WORK = ROOT / "_work" / "pseudonyms"
KEY_HEX = "5a" * 32
TEMPLATE_MODALITIES = ("CT", "MR", "RTDOSE")


def make_objects(folder: Path, n: int, patients: int) -> None:
    import pydicom
    from dicom_deid import sample
    marker = folder / f".done-v2-{n}-{patients}"
    if marker.exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    s = sample.generate(folder / "_tpl", n_files=24, n_patients=4, seed=1)
    # only kinds the pipeline finishes as `ok` (NM secondary captures would be quarantined
    # for want of a pixel stage and skip the later stages: a smaller whole run)
    templates = [ds for ds in (pydicom.dcmread(f) for f in s.files) if ds.Modality in TEMPLATE_MODALITIES]
    for i in range(n):
        p = i % patients
        ds = templates[i % len(templates)]
        ds.PatientID = f"BM{p:07d}"
        ds.IssuerOfPatientID = "BENCH"
        ds.StudyInstanceUID = f"2.25.{10**30 + p}"
        ds.SeriesInstanceUID = f"2.25.{2 * 10**30 + p}"
        ds.SOPInstanceUID = f"2.25.{3 * 10**30 + i}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        sub = folder / "in" / f"{p // 100:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        ds.save_as(sub / f"{i:06d}.dcm", enforce_file_format=True)
    shutil.rmtree(folder / "_tpl")
    marker.touch()


def fill_store(private: Path, n: int) -> float:
    """A fresh store of ``n`` earlier patients under ``private``; returns seconds taken."""
    from dicom_deid import keys, pseudonyms as ps
    t0 = time.perf_counter()
    d = keys.Deriver(bytes.fromhex(KEY_HEX))
    sdir = ps.store_dir(str(private))
    shutil.rmtree(sdir, ignore_errors=True)
    ps.check_store(sdir, d.key_fingerprint())
    fp = d.key_fingerprint()
    for j in range(0, n, 25_000):
        rows = [ps.store_row(d.patient_key(f"EARLIER{i}", "X"), f"DDE{i}", -500, "hmac", fp, "earlier")
                for i in range(j, min(n, j + 25_000))]
        ps.write_store_part(sdir, f"part-earlier-{j:07d}.parquet", rows, fp)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- children

def _counters(result, namespace="dicom_deid.pseudonyms") -> dict:
    from apache_beam.metrics.metric import MetricsFilter
    try:
        q = result.metrics().query(MetricsFilter().with_namespace(namespace))["counters"]
        return {r.key.metric.name: r.committed for r in q}
    except Exception:  # noqa: BLE001 - counters are a bonus
        return {}


def child(mode: str, pattern: str, private: str, out: str, key_path: str, workers: int) -> dict:
    import apache_beam as beam
    from dicom_deid import keys, pseudonyms as ps
    from dicom_deid.manifest import RunInfo
    from dicom_deid.options import make_config
    from dicom_deid.pipelines import deidentify
    from dicom_deid.transforms.pseudonyms import MAP, BuildPseudonymMap, ScanHeaders
    from dicom_deid.transforms.read import MatchInputs
    beam_args = [f"--direct_num_workers={workers}"]
    t_start = time.perf_counter()
    if mode == "full":
        cfg = make_config([pattern], out, private, key=key_path, progress=False, run_id="bench-full")
        summary = deidentify.run(cfg, beam_args, stream=open(os.devnull, "w"))
        return {"pipeline_s": time.perf_counter() - t_start, "inputs": summary["inputs"],
                "status_counts": summary.get("status_counts") or summary.get("by_status")}
    opts = deidentify.pipeline_options(beam_args)
    p = beam.Pipeline(runner=deidentify.make_runner(opts), options=opts)
    key_ref = keys.KeyRef(key_path)
    if mode == "stage1":
        run = RunInfo("bench-s1", "basic", "1", "bench", out, private)
        refs = p | MatchInputs([pattern])
        built = refs | ScanHeaders(key_ref) | BuildPseudonymMap(run, key_ref, ps.Settings(ps.store_dir(private)))
        (built[MAP] | beam.combiners.Count.Globally() | beam.Map(str)
         | beam.io.WriteToText(f"{out}/mapsize", shard_name_template=""))
    elif mode == "no_stage1":
        cfg = make_config([pattern], out, private, key=key_path, progress=False, run_id="bench-ns1")
        empty = p | "NoMap" >> beam.Create([]).with_output_types(tuple[str, dict])
        deidentify.build(p, cfg, None, pseudonyms=empty)
    else:
        raise SystemExit(f"unknown mode {mode}")
    t_run = time.perf_counter()
    result = p.run()
    result.wait_until_finish()
    rec = {"pipeline_s": time.perf_counter() - t_run, "graph_s": t_run - t_start,
           "counters": _counters(result)}
    if mode == "stage1":
        rec["map_entries"] = int(open(f"{out}/mapsize").read().strip() or 0)
    return rec


# ----------------------------------------------------------------------------- driver

def measure(mode: str, data: Path, store: int, workers: int, tag: str) -> dict:
    import throughput as tp  # benchmarks/throughput.py: /proc sampling helpers
    base = WORK / "runs" / f"{mode}-{tag}"
    shutil.rmtree(base, ignore_errors=True)
    (base / "out").mkdir(parents=True)
    fill_s = fill_store(base / "priv", store) if mode != "no_stage1" else 0.0
    key_path = WORK / "bench.key"
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", mode, f"{data}/**", str(base / "priv"),
           str(base / "out"), str(key_path), str(workers)]
    res = tp.run_measured(cmd, base / "stderr.log")
    res["mode"], res["store_fill_s"] = mode, fill_s
    try:
        res["child"] = json.loads(res.pop("stdout").strip().splitlines()[-1])
    except (ValueError, IndexError):
        res["child"] = None
    res.pop("rss_timeline_s_main_workers_mb", None)
    print(f"{mode:10s} rc={res['returncode']} wall {res['wall_s']:.1f}s "
          f"pipeline {((res['child'] or {}).get('pipeline_s') or 0):.1f}s "
          f"other load {res['other_load_cpus']:.2f} CPUs", file=sys.stderr, flush=True)
    return res


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_child":
        mode, pattern, private, out, key_path, workers = argv[1:7]
        print(json.dumps(child(mode, pattern, private, out, key_path, int(workers)), default=str), flush=True)
        sys.stderr.flush()
        os._exit(0)  # as the CLI does: gRPC threads abort interpreter teardown after a run
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=10_000)
    ap.add_argument("--patients", type=int, default=1_000)
    ap.add_argument("--store", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--modes", default="stage1,full,no_stage1")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    import throughput as tp
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "bench.key").write_text(KEY_HEX + "\n")
    (WORK / "bench.key").chmod(0o600)
    t0 = time.perf_counter()
    data_root = WORK / ("data" if a.objects == 10_000 and a.patients == 1_000 else f"data-{a.objects}-{a.patients}")
    make_objects(data_root, a.objects, a.patients)
    gen_s = time.perf_counter() - t0
    files = list((data_root / "in").rglob("*.dcm"))
    doc = {"benchmark": "pseudonyms", "started": dt.datetime.now(dt.timezone.utc).isoformat(),
           "machine": tp.machine(), "git_head": tp.git_head(), "source_digest": tp.source_digest(),
           "objects": len(files), "input_bytes": sum(f.stat().st_size for f in files),
           "patients": a.patients, "store_earlier_patients": a.store, "workers": a.workers,
           "template_modalities": TEMPLATE_MODALITIES,
           "data_generation_s": gen_s, "runs": []}
    modes = a.modes.split(",")
    for r in range(a.repeats):
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            res = measure(mode, data_root / "in", a.store, a.workers, f"r{r}")
            res["repeat"] = r
            doc["runs"].append(res)
    doc["finished"] = dt.datetime.now(dt.timezone.utc).isoformat()
    doc["summary"] = summarise(doc["runs"])
    out = a.out or (ROOT / "results" / f"pseudonyms-{a.objects}.json")
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(json.dumps(doc["summary"], indent=2))
    return 0


def summarise(runs: list[dict]) -> dict:
    import statistics
    ok = [r for r in runs if r["returncode"] == 0]
    by = {m: [r for r in ok if r["mode"] == m] for m in ("stage1", "full", "no_stage1")}
    med = {m: statistics.median([r["wall_s"] for r in rs]) if rs else None for m, rs in by.items()}
    pipe = {m: statistics.median([(r["child"] or {}).get("pipeline_s") or r["wall_s"] for r in rs]) if rs else None
            for m, rs in by.items()}
    out = {"wall_s_median": med, "pipeline_s_median": pipe,
           "other_load_cpus": {m: [round(r["other_load_cpus"], 2) for r in rs] for m, rs in by.items()},
           "failed_runs": len(runs) - len(ok)}
    if med["stage1"] and med["full"]:
        out["share_stage1_alone_over_full"] = med["stage1"] / med["full"]
    if med["no_stage1"] and med["full"]:
        out["share_added_by_stage1"] = (med["full"] - med["no_stage1"]) / med["full"]
    return out


if __name__ == "__main__":
    sys.exit(main())
