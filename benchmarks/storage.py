#!/usr/bin/env python
"""Storage benchmark: local vs gs:// vs s3:// on the same files, listing at scale, and
memory for one large object. Servers are local (gcp-storage-emulator, moto) on 127.0.0.1.

One invocation measures, each pipeline run in its own subprocess (default local runner,
FnApiRunner multi-processing on all cores), so the numbers compare within one run:

    throughput   the same N files (the throughput corpus, default 2,000) de-identified from
                 local disk, from gs:// and from s3:// (input, output and private prefix on
                 that scheme; the local run writes local). files/s, MB/s, ratios to local.
    listing      100,000 tiny objects: time to the first name and to all names with
                 storage.iter_objects (streamed) vs Beam's FileSystems.match (collects), and
                 the Python heap each holds (tracemalloc); local disk and S3 (moto).
    first        time from launch to the first processed object (first staged output) for
                 a pipeline over the 100,000 local names (killed then).
    large        one multi-frame object of --large-mb (default 1,024 MB; written streamed):
                 peak RSS of the run's process tree, and of a header-only read
                 (storage.open_read: ranged requests) from S3.

Usage::

    /work/venv/bin/python benchmarks/storage.py [--files 2000] [--names 100000] [--large-mb 1024]
        [--out benchmarks/results/storage.json]

Writes the JSON and a Markdown table (same name, .md). Timings on a shared 2-core machine
are noisy: read ratios within one invocation, not absolute numbers across invocations.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import throughput as tp  # noqa: E402  (process-tree sampler, cached corpus)
from tests.storage import servers  # noqa: E402

WORK = HERE / "_work" / "storage"
KEY = "5a" * 32


def env_for(gcs_url=None):
    env = dict(os.environ)
    env.update(NO_GCE_CHECK="true", AWS_EC2_METADATA_DISABLED="true")
    env.pop("STORAGE_EMULATOR_HOST", None)
    if gcs_url:
        env["STORAGE_EMULATOR_HOST"] = gcs_url
    return env


def cli(args, env, beam_args=()):
    cmd = [sys.executable, "-m", "dicom_deid.cli", "run", *map(str, args), "--no-progress", *beam_args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = tp.TreeSampler(proc.pid)
    sampler.start()
    out, err = proc.communicate()
    sampler.stop()
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"run failed: {err[-3000:]}")
    return dt, sampler.peak_rss, out


def upload_tree(store_put, root: Path, prefix: str, threads: int = 16):
    from concurrent.futures import ThreadPoolExecutor
    files = sorted(p for p in root.rglob("*") if p.is_file())
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(lambda p: store_put(f"{prefix}/{p.relative_to(root)}", p.read_bytes()), files))
    return len(files)


# --- throughput ------------------------------------------------------------------------------
def bench_throughput(n_files: int, s3_url: str, gcs_url: str, key: Path) -> dict:
    root, meta = tp.corpus(n_files, 0.6, max(1, n_files // 20), 0)
    mb = meta["bytes"] / 1e6
    s3 = servers.s3_client(s3_url)
    gcs = servers.gcs_client(gcs_url)
    for b in ("tin", "tout", "tpriv"):
        s3.create_bucket(Bucket=b)
        gcs.create_bucket(b)
    t0 = time.perf_counter()
    upload_tree(lambda k, v: s3.put_object(Bucket="tin", Key=k, Body=v), root, "c")
    # gcp-storage-emulator is a single-threaded HTTPServer (listen backlog 5): few uploaders
    upload_tree(lambda k, v: gcs.bucket("tin").blob(k).upload_from_string(v), root, "c", threads=3)
    upload_s = time.perf_counter() - t0
    res = {"files": meta["n_files"], "megabytes": round(mb, 1), "upload_both_s": round(upload_s, 1)}
    shutil.rmtree(WORK / "tp", ignore_errors=True)
    runs = {
        "local": (["--input", f"{root}/**", "--output", WORK / "tp/out", "--private", WORK / "tp/priv"],
                  env_for(), []),
        "gs": (["--input", "gs://tin/c/**", "--output", "gs://tout/o", "--private", "gs://tpriv/p"],
               env_for(gcs_url), []),
        "s3": (["--input", "s3://tin/c/**", "--output", "s3://tout/o", "--private", "s3://tpriv/p"],
               env_for(), servers.s3_beam_args(s3_url)),
    }
    for name, (args, env, beam) in runs.items():
        print(f"throughput: {name} ...", file=sys.stderr, flush=True)
        dt, rss, _ = cli([*args, "--key", key], env, beam)
        res[name] = {"seconds": round(dt, 1), "files_per_s": round(meta["n_files"] / dt, 2),
                     "mb_per_s": round(mb / dt, 2), "peak_rss_mb": round(rss / 2**20)}
    for name in ("gs", "s3"):
        res[name]["ratio_to_local"] = round(res[name]["files_per_s"] / res["local"]["files_per_s"], 3)
    return res


# --- listing -------------------------------------------------------------------------------
def make_names(root: Path, n: int) -> Path:
    d = root / f"names-{n}"
    marker = root / f"names-{n}.complete"
    if marker.exists():
        return d
    shutil.rmtree(d, ignore_errors=True)
    print(f"creating {n} tiny files ...", file=sys.stderr, flush=True)
    for i in range(n):
        sub = d / f"d{i // 1000:03d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"obj-{i:06d}.dcm").write_bytes(b"x")
    marker.write_text("ok")
    return d


def measure_listing(fn) -> dict:
    tracemalloc.start()
    t0 = time.perf_counter()
    first = None
    n = 0
    for _ in fn():
        if first is None:
            first = time.perf_counter() - t0
        n += 1
    total = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"names": n, "first_name_s": round(first or 0, 3), "all_names_s": round(total, 2),
            "peak_heap_mb": round(peak / 2**20, 1)}


def bench_listing(n: int, s3_url: str) -> dict:
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions
    from dicom_deid import storage
    d = make_names(WORK, n)
    res = {"local": {
        "storage.iter_objects": measure_listing(lambda: storage.iter_objects(f"{d}/**")),
        "beam FileSystems.match": measure_listing(
            lambda: (m for r in FileSystems.match([f"{d}/**"]) for m in r.metadata_list)),
    }}
    s3 = servers.s3_client(s3_url)
    s3.create_bucket(Bucket="names")
    print(f"uploading {n} tiny objects to moto ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda i: s3.put_object(Bucket="names", Key=f"n/d{i // 1000:03d}/obj-{i:06d}.dcm", Body=b"x"),
                    range(n)))
    res["s3_upload_s"] = round(time.perf_counter() - t0, 1)
    FileSystems.set_options(PipelineOptions(servers.s3_beam_args(s3_url)))
    storage.reset_clients()
    res["s3"] = {
        "storage.iter_objects": measure_listing(lambda: storage.iter_objects("s3://names/n/**")),
        "beam FileSystems.match": measure_listing(
            lambda: (m for r in FileSystems.match(["s3://names/n/**"]) for m in r.metadata_list)),
    }
    return res


def ct_source() -> Path:
    """A CT slice of the throughput corpus (CT is published, not quarantined)."""
    import pydicom
    for f in sorted(tp.corpus(2000, 0.6, 100, 0)[0].rglob("*.dcm")):
        if pydicom.dcmread(f, stop_before_pixels=True).Modality == "CT":
            return f
    raise RuntimeError("no CT in the corpus")


def bench_first_processed(n: int, key: Path) -> dict:
    """Launch over n local names (all small valid DICOM); stop at the first staged output."""
    d = WORK / f"dicom-names-{n}"
    done = WORK / f"dicom-names-{n}.complete"
    if not done.exists():
        shutil.rmtree(d, ignore_errors=True)
        data = ct_source().read_bytes()
        print(f"creating {n} small DICOM files ...", file=sys.stderr, flush=True)
        for i in range(n):
            sub = d / f"d{i // 1000:03d}"
            if i % 1000 == 0:
                sub.mkdir(parents=True, exist_ok=True)
            (sub / f"{i:06d}.dcm").write_bytes(data)
        done.write_text("ok")
    out = WORK / "first-out"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(WORK / "first-priv", ignore_errors=True)
    cmd = [sys.executable, "-m", "dicom_deid.cli", "run", "--input", f"{d}/**", "--output", str(out),
           "--private", str(WORK / "first-priv"), "--key", str(key), "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env_for(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    sampler = tp.TreeSampler(proc.pid)
    sampler.start()
    first = None
    try:
        while proc.poll() is None and time.perf_counter() - t0 < 1800:
            staging = out / ".staging"
            if staging.exists() and any(staging.rglob("*.dcm")):
                first = time.perf_counter() - t0
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        sampler.stop()
    return {"names": n, "first_processed_s": round(first, 1) if first else None,
            "peak_rss_mb_until_then": round(sampler.peak_rss / 2**20),
            "note": "includes the pseudonym header scan of every input, which precedes reading"}


# --- one large object ----------------------------------------------------------------------------
def make_large(path: Path, megabytes: int) -> Path:
    """A multi-frame 16-bit object of about ``megabytes`` MB, written streamed."""
    if path.exists() and path.stat().st_size > megabytes * 1e6 * 0.99:
        return path
    import io
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian
    ds = pydicom.dcmread(ct_source())
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    frame = 1024 * 1024 * 2
    frames = max(1, int(megabytes * 1e6 // frame))
    ds.Rows = ds.Columns = 1024
    ds.NumberOfFrames, ds.SamplesPerPixel, ds.PhotometricInterpretation = frames, 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    for tag in [t for t in ds.keys() if t >= 0x7FE00000]:
        del ds[tag]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, frame * frames))
        chunk = os.urandom(frame)
        for _ in range(frames):
            f.write(chunk)
    return path


def bench_large(megabytes: int, s3_url: str, key: Path) -> dict:
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions
    from dicom_deid import storage
    path = make_large(WORK / "large" / "big.dcm", megabytes)
    size = path.stat().st_size
    shutil.rmtree(WORK / "large-out", ignore_errors=True)
    dt, rss, _ = cli(["--input", str(path), "--output", WORK / "large-out", "--private", WORK / "large-priv",
                      "--key", key, "--direct_num_workers=1"], env_for())
    s3 = servers.s3_client(s3_url)
    s3.create_bucket(Bucket="large")
    from boto3.s3.transfer import TransferConfig
    s3.upload_file(str(path), "large", "big.dcm", Config=TransferConfig(multipart_threshold=1 << 40))
    FileSystems.set_options(PipelineOptions(servers.s3_beam_args(s3_url)))
    storage.reset_clients()
    import io
    import resource
    import pydicom
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    raw = storage.open_read("s3://large/big.dcm")
    t0 = time.perf_counter()
    with io.BufferedReader(raw, buffer_size=64 * 1024) as fp:
        pydicom.dcmread(fp, stop_before_pixels=True)
    head_s = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"object_mb": round(size / 1e6), "pipeline_seconds": round(dt, 1),
            "pipeline_peak_rss_mb": round(rss / 2**20),
            "header_only_read_from_s3": {"bytes_read": raw.bytes_read, "seconds": round(head_s, 3),
                                         "rss_growth_mb": round((after - before) / 1024, 1)}}


def to_markdown(r: dict) -> str:
    t = r["throughput"]
    lines = [f"# Storage benchmark ({r['date']}, {r['machine']}, load average at start/end "
             f"{r['loadavg_at_start'][0]:.1f}/{r['loadavg_at_end'][0]:.1f} on a shared machine)", "",
             f"Same {t['files']} files ({t['megabytes']} MB), default local runner "
             "(FnApiRunner multi-processing, all cores); servers on 127.0.0.1 "
             "(gcp-storage-emulator, moto).", "",
             "| scheme | seconds | files/s | MB/s | ratio to local | peak RSS (tree) MB |",
             "|---|---|---|---|---|---|"]
    for k in ("local", "gs", "s3"):
        v = t[k]
        lines.append(f"| {k} | {v['seconds']} | {v['files_per_s']} | {v['mb_per_s']} | "
                     f"{v.get('ratio_to_local', 1.0)} | {v['peak_rss_mb']} |")
    li = r["listing"]
    lines += ["", f"Listing {li['local']['storage.iter_objects']['names']:,} names:", "",
              "| store | lister | first name s | all names s | peak Python heap MB |", "|---|---|---|---|---|"]
    for store in ("local", "s3"):
        for lister, v in li[store].items():
            lines.append(f"| {store} | {lister} | {v['first_name_s']} | {v['all_names_s']} | {v['peak_heap_mb']} |")
    f = r["first_processed"]
    lines += ["", f"Pipeline over {f['names']:,} local names: first processed object after "
              f"**{f['first_processed_s']} s** (peak RSS of the run until then {f['peak_rss_mb_until_then']} MB; "
              f"{f['note']}).", ""]
    lg = r["large"]
    h = lg["header_only_read_from_s3"]
    lines += [f"One {lg['object_mb']} MB multi-frame object: pipeline {lg['pipeline_seconds']} s, peak RSS of "
              f"the run's process tree **{lg['pipeline_peak_rss_mb']} MB**. Header-only read from S3 "
              f"(storage.open_read): {h['bytes_read']:,} bytes in {h['seconds']} s, RSS growth {h['rss_growth_mb']} MB.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--names", type=int, default=100_000)
    ap.add_argument("--large-mb", type=int, default=1024)
    ap.add_argument("--out", default=str(HERE / "results" / "storage.json"))
    args = ap.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    key = WORK / "bench.key"
    key.write_text(KEY + "\n")
    key.chmod(0o600)
    os.environ.update(NO_GCE_CHECK="true", AWS_EC2_METADATA_DISABLED="true")
    result = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{os.cpu_count()} cores, {platform.python_version()}",
              "args": vars(args), "loadavg_at_start": os.getloadavg()}
    with servers.moto_server() as s3_url, servers.gcs_emulator() as gcs_url:
        result["throughput"] = bench_throughput(args.files, s3_url, gcs_url, key)
        result["listing"] = bench_listing(args.names, s3_url)
        result["first_processed"] = bench_first_processed(args.names, key)
        result["large"] = bench_large(args.large_mb, s3_url, key)
    result["loadavg_at_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
