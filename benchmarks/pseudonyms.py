"""Benchmark: cost of the header scan and pseudonym-map building relative to the whole run.

    python benchmarks/pseudonyms.py [--objects 10000] [--patients 1000] [--store 100000]
                                    [--full-run-objects 1000] [--workers 2]

1. makes ``--objects`` small synthetic objects of ``--patients`` patients (clones of
   ``dicom_deid.sample`` files with new patient IDs and UIDs; fake identifiers only),
2. fills a pseudonym store with ``--store`` earlier patients,
3. times stage 1 alone (MatchInputs -> ScanHeaders -> BuildPseudonymMap, map counted) on
   all objects, then on the first ``--full-run-objects`` objects, and the whole run
   (``dicom-deid run`` pipeline) on those same objects against the same store size.

Results are appended to ``benchmarks/RESULTS-pseudonyms.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import apache_beam as beam
import pydicom

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from dicom_deid import keys, pseudonyms as ps, sample  # noqa: E402
from dicom_deid.manifest import RunInfo  # noqa: E402
from dicom_deid.options import make_config  # noqa: E402
from dicom_deid.pipelines import deidentify  # noqa: E402
from dicom_deid.transforms.pseudonyms import MAP, BuildPseudonymMap, ScanHeaders  # noqa: E402
from dicom_deid.transforms.read import MatchInputs  # noqa: E402


def make_objects(folder: Path, n: int, patients: int) -> None:
    marker = folder / f".done-{n}-{patients}"
    if marker.exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    s = sample.generate(folder / "_tpl", n_files=8, n_patients=2, seed=1)
    templates = [pydicom.dcmread(f) for f in s.files]
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


def fill_store(private: Path, n: int, d: keys.Deriver) -> None:
    sdir = ps.store_dir(str(private))
    shutil.rmtree(sdir, ignore_errors=True)
    ps.check_store(sdir, d.key_fingerprint())
    fp = d.key_fingerprint()
    for j in range(0, n, 25_000):
        rows = [ps.store_row(d.patient_key(f"EARLIER{i}", "X"), f"DDE{i}", -500, "hmac", fp, "earlier")
                for i in range(j, min(n, j + 25_000))]
        ps.write_store_part(sdir, f"part-earlier-{j:07d}.parquet", rows, fp)


def stage1(pattern: str, private: Path, key_ref, workers: int, run_id: str) -> tuple[float, int]:
    opts = deidentify.pipeline_options([f"--direct_num_workers={workers}"])
    run = RunInfo(run_id, "basic", "1", "bench", str(private.parent / "out-stage1"), str(private))
    p = beam.Pipeline(runner=deidentify.make_runner(opts), options=opts)
    refs = p | MatchInputs([pattern])
    built = refs | ScanHeaders(key_ref) | BuildPseudonymMap(run, key_ref, ps.Settings(ps.store_dir(str(private))))
    out = private.parent / f"mapsize-{run_id}"
    built[MAP] | beam.combiners.Count.Globally() | beam.Map(str) | beam.io.WriteToText(str(out))
    t0 = time.perf_counter()
    p.run().wait_until_finish()
    took = time.perf_counter() - t0
    size = sum(int(open(f).read().strip() or 0) for f in map(str, private.parent.glob(f"mapsize-{run_id}*")))
    return took, size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=10_000)
    ap.add_argument("--patients", type=int, default=1_000)
    ap.add_argument("--store", type=int, default=100_000)
    ap.add_argument("--full-run-objects", type=int, default=1_000)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    work = ROOT / "_work" / "pseudonyms"
    work.mkdir(parents=True, exist_ok=True)
    key_path = work / "bench.key"
    key_path.write_text("5a" * 32 + "\n")
    key_ref, d = keys.KeyRef(str(key_path)), keys.Deriver(bytes.fromhex("5a" * 32))
    t0 = time.perf_counter()
    make_objects(work / "data", a.objects, a.patients)
    gen = time.perf_counter() - t0
    results = []
    # stage 1 on everything
    priv = work / "priv-all"
    fill_store(priv, a.store, d)
    t_all, size_all = stage1(str(work / "data" / "in" / "**"), priv, key_ref, a.workers, "s1all")
    results.append(("stage 1 (scan + map), all objects", a.objects, t_all, size_all))
    # subset: stage 1 alone vs the whole run
    n_sub = min(a.full_run_objects, a.objects)
    sub = work / f"subset-{n_sub}"
    if not sub.exists():
        files = sorted((work / "data" / "in").rglob("*.dcm"))[:n_sub]
        for f in files:
            dst = sub / f.parent.name / f.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(f, dst)
    priv_s = work / "priv-sub"
    fill_store(priv_s, a.store, d)
    t_sub, size_sub = stage1(str(sub / "**"), priv_s, key_ref, a.workers, "s1sub")
    results.append(("stage 1 (scan + map), subset", n_sub, t_sub, size_sub))
    priv_r = work / "priv-run"
    out_r = work / "out-run"
    shutil.rmtree(out_r, ignore_errors=True)
    fill_store(priv_r, a.store, d)
    cfg = make_config([str(sub / "**")], str(out_r), str(priv_r), key=str(key_path), progress=False)
    t1 = time.perf_counter()
    summary = deidentify.run(cfg, [f"--direct_num_workers={a.workers}"], stream=open(os.devnull, "w"))
    t_run = time.perf_counter() - t1
    results.append(("whole run (stage 1 + read ... write)", n_sub, t_run, summary["inputs"]))
    share = t_sub / t_run
    lines = [f"\n## {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node() and 'host'}: "
             f"{os.cpu_count()} cores, {a.workers} workers (FnApiRunner multi-processing), "
             f"store of {a.store:,} earlier patients, {a.patients:,} patients in the data\n",
             f"data generation: {gen:.0f}s (not counted)\n",
             "| what | objects | seconds | objects/s | map entries / inputs |", "|---|---|---|---|---|"]
    for what, n, secs, size in results:
        lines.append(f"| {what} | {n:,} | {secs:.1f} | {n / secs:.1f} | {size:,} |")
    lines.append(f"\nstage 1 share of the whole run at {n_sub:,} objects: {share:.0%} "
                 f"(stage 1 time / whole-run time; the whole run includes stage 1)\n")
    text = "\n".join(lines)
    print(text)
    with open(ROOT / "RESULTS-pseudonyms.md", "a") as f:
        if f.tell() == 0:
            f.write("# Pseudonym stage benchmark (benchmarks/pseudonyms.py)\n")
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
