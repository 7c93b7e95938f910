#!/usr/bin/env python
"""Storage benchmark: local vs gs:// vs s3:// on the same files, listing at scale, and
memory for one large object. Servers are local on 127.0.0.1: moto (S3) and fake-gcs-server
(GCS, Go, built with ``go install`` from the Go module proxy; gcp-storage-emulator when Go is
missing). fake-gcs-server sits behind the tests' proxy (``tests/storage/servers.FaultProxy``,
no faults) only to add the ``Content-ID`` headers its batch endpoint needs.

One invocation measures, each pipeline run in its own subprocess (default local runner,
FnApiRunner multi-processing on all cores), so the numbers compare within one run:

    throughput   the same N files (the throughput corpus, default 2,000) de-identified from
                 local disk, from gs:// and from s3:// (input, output and private prefix on
                 that scheme; the local run writes local). files/s, MB/s, ratios to local.
    listing      100,000 tiny local files: the lister before the split (frozen copy in
                 listing_before.py) vs storage.iter_objects vs the split listing
                 (plan_listing + iter_task on 2 processes) vs Beam's FileSystems.match,
                 interleaved rounds, timed without tracemalloc (heap in a separate pass);
                 the same as pipelines (MatchInputs vs one DoFn per pattern); and
                 --bucket-names objects in a moto bucket seeded directly in the server's
                 memory, listed unsplit and split (4 threads).
    first        time from launch to the first processed object (first staged output) for
                 a pipeline over 100,000 local names (small valid DICOM objects; killed then).
    large        one multi-frame object of --large-mb (default 1,024 MB; written streamed):
                 peak RSS of the run's process tree, and of a header-only read
                 (storage.open_read: ranged requests) from S3.

Usage::

    .venv/bin/python benchmarks/storage.py [--files 2000] [--names 100000] [--large-mb 1024]
        [--out benchmarks/results/storage.json]

Writes the JSON and a Markdown table (same name, .md). Timings on a shared 2-core machine
are noisy: read ratios within one invocation, not absolute numbers across invocations.
"""

from __future__ import annotations

import argparse
import contextlib
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

import threading  # noqa: E402

import throughput as tp  # noqa: E402  (process-tree sampler, cached corpus)
from tests.storage import servers  # noqa: E402

WORK = HERE / "_work" / "storage"
KEY = "5a" * 32


class LoadSampler(threading.Thread):
    """Machine load while the benchmark runs: load average and the share of CPU time used
    by processes outside this benchmark's own process tree (other people's work)."""

    def __init__(self, interval: float = 10.0):
        super().__init__(daemon=True)
        self.interval, self.samples, self._halt = interval, [], threading.Event()

    @staticmethod
    def _cpu():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    @staticmethod
    def _own_ticks():
        total = 0
        for pid in tp.tree_pids(os.getpid()):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    parts = f.read().rsplit(")", 1)[1].split()
                total += sum(int(x) for x in parts[11:15])  # utime stime cutime cstime
            except (OSError, IndexError, ValueError):
                pass
        return total

    def run(self):
        t0, i0 = self._cpu()
        o0 = self._own_ticks()
        while not self._halt.wait(self.interval):
            t1, i1 = self._cpu()
            o1 = self._own_ticks()
            busy = max(0, (t1 - t0) - (i1 - i0))
            own = max(0, o1 - o0)
            self.samples.append({"load1": os.getloadavg()[0], "busy": busy / max(1, t1 - t0),
                                 "others": max(0, busy - own) / max(1, t1 - t0)})
            t0, i0, o0 = t1, i1, o1

    def stop(self) -> dict:
        self._halt.set()
        self.join(timeout=5)
        if not self.samples:
            return {}
        loads = sorted(x["load1"] for x in self.samples)
        others = sorted(x["others"] for x in self.samples)
        return {"samples": len(self.samples), "load1_median": round(loads[len(loads) // 2], 2),
                "load1_max": round(loads[-1], 2),
                "cpu_share_used_by_other_processes_median": round(others[len(others) // 2], 3),
                "cpu_share_used_by_other_processes_max": round(others[-1], 3),
                "note": "share of all cores' time over 10 s windows; own = this benchmark's process tree "
                        "(children counted when they exit, so 'others' can be overstated during a run)"}


@contextlib.contextmanager
def gcs_server():
    """(name, URL for clients of the pipeline, direct URL): fake-gcs-server behind the
    batch-fixing proxy, or gcp-storage-emulator direct when Go is missing."""
    if servers.fake_gcs_binary() is not None:
        with servers.fake_gcs_server() as direct, servers.FaultProxy(direct, add_batch_ids=True) as proxy:
            yield f"fake-gcs-server {servers.FAKE_GCS_VERSION} (behind a Python proxy)", proxy.url, direct
    else:
        with servers.gcs_emulator() as direct:
            yield "gcp-storage-emulator (direct)", direct, direct


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
def bench_throughput(n_files: int, s3_url: str, gcs_url: str, key: Path, gcs_direct: str) -> dict:
    root, meta = tp.corpus(n_files, 0.6, max(1, n_files // 20), 0)
    mb = meta["bytes"] / 1e6
    s3 = servers.s3_client(s3_url)
    gcs = servers.gcs_client(gcs_direct)
    for b in ("tin", "tout", "tpriv"):
        s3.create_bucket(Bucket=b)
        gcs.create_bucket(b)
    t0 = time.perf_counter()
    upload_tree(lambda k, v: s3.put_object(Bucket="tin", Key=k, Body=v), root, "c")
    # gcp-storage-emulator is a single-threaded HTTPServer (listen backlog 5): few uploaders
    upload_tree(lambda k, v: gcs.bucket("tin").blob(k).upload_from_string(v), root, "c",
                threads=16 if gcs_direct != gcs_url else 3)
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


# --- where gs:// time goes ------------------------------------------------------------------
def bench_fetch(n: int = 200) -> dict:
    """storage.fetch of the same n corpus files, one process, sequential: fake-gcs-server
    direct vs behind the Python proxy the pipeline runs need, and moto direct."""
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions
    from dicom_deid import storage
    files = sorted(tp.corpus(2000, 0.6, 100, 0)[0].rglob("*.dcm"))[:n]
    res = {"objects": len(files)}
    with servers.fake_gcs_server() as direct, servers.FaultProxy(direct, add_batch_ids=True) as proxy, \
            servers.moto_server() as s3url:
        g = servers.gcs_client(direct)
        g.create_bucket("fetch")
        s3 = servers.s3_client(s3url)
        s3.create_bucket(Bucket="fetch")
        for f in files:
            g.bucket("fetch").blob(f.name).upload_from_string(f.read_bytes())
            s3.put_object(Bucket="fetch", Key=f.name, Body=f.read_bytes())
        for name, url, sch in (("gs direct", direct, "gs"), ("gs via proxy", proxy.url, "gs"),
                               ("s3 direct", s3url, "s3")):
            if sch == "gs":
                os.environ["STORAGE_EMULATOR_HOST"] = url
            FileSystems.set_options(PipelineOptions(servers.s3_beam_args(s3url)))
            storage.reset_clients()
            t0 = time.perf_counter()
            for f in files:
                storage.fetch(f"{sch}://fetch/{f.name}", f.stat().st_size, 1 << 30, 64 << 20, "/tmp")
            dt = time.perf_counter() - t0
            res[name] = {"seconds": round(dt, 2), "objects_per_s": round(len(files) / dt, 1)}
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
    storage.reset_clients()
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
    """Time to the first and to all names, without tracemalloc (it slows allocation-heavy
    code several times over: the numbers of the first invocation were taken under it)."""
    t0 = time.perf_counter()
    first = None
    n = 0
    for _ in fn():
        if first is None:
            first = time.perf_counter() - t0
        n += 1
    total = time.perf_counter() - t0
    return {"names": n, "first_name_s": round(first or 0, 3), "all_names_s": round(total, 2)}


def peak_heap_mb(fn) -> float:
    """Peak Python heap while listing (a separate pass, under tracemalloc)."""
    tracemalloc.start()
    for _ in fn():
        pass
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return round(peak / 2**20, 1)


def _count_task(args) -> int:
    from dicom_deid import storage
    pattern, task = args
    return sum(1 for _ in storage.iter_task(pattern, task))


def split_listing(pattern: str, workers: int, processes: bool):
    """storage.plan_listing in this process, its tasks listed by ``workers`` processes (local
    disk) or threads (buckets: I/O bound); yields once per name (tasks report counts only)."""
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
    from dicom_deid import storage
    tasks = []
    for item in storage.plan_listing(pattern):
        if isinstance(item, str):
            tasks.append((pattern, item))
        else:
            yield item
    pool = ProcessPoolExecutor(workers) if processes else ThreadPoolExecutor(workers)
    with pool:
        for n in pool.map(_count_task, tasks):
            for _ in range(n):
                yield None


def rounds(listers: dict, repeats: int) -> dict:
    """Each lister ``repeats`` times, interleaved (so load changes hit all alike); median."""
    runs = {k: [] for k in listers}
    for _ in range(repeats):
        for k, fn in listers.items():
            runs[k].append(measure_listing(fn))
    out = {}
    for k, rs in runs.items():
        rs.sort(key=lambda r: r["all_names_s"])
        med = dict(rs[len(rs) // 2])
        med["all_names_s_runs"] = [r["all_names_s"] for r in runs[k]] if len(rs) > 1 else None
        out[k] = med
    return out


def pipeline_listing(pattern: str, mode: str) -> dict:
    """A pipeline that only lists (default runner, all cores): ``split`` = MatchInputs as the
    pipeline runs it (plan, fan out tasks, list, fan out refs); ``unsplit`` = the shape before
    (one DoFn lists the whole pattern, then the refs are fanned out), with today's lister.
    Wall time of the whole subprocess, Beam start-up included."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--listing-pipeline", mode, pattern],
                         env=env_for(), capture_output=True, text=True, timeout=1800)
    dt = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return {"names": int(out.stdout.strip().splitlines()[-1]), "seconds": round(dt, 1)}


def _listing_pipeline_child(mode: str, pattern: str) -> None:
    import apache_beam as beam
    from dicom_deid import storage
    from dicom_deid.transforms.read import FileRef, MatchInputs

    def unsplit(p):
        for i in storage.iter_objects(p):
            yield FileRef(i.uri, i.size, i.version)
    res = Path(tempfile_dir()) / f"count-{os.getpid()}"
    with beam.Pipeline() as p:
        if mode == "split":
            refs = p | MatchInputs([pattern])
        else:
            refs = p | beam.Create([pattern]) | beam.FlatMap(unsplit) | beam.Reshuffle()
        _ = refs | beam.combiners.Count.Globally() | beam.Map(lambda n: res.write_text(str(n)))
    print(res.read_text())
    res.unlink()


def tempfile_dir() -> str:
    d = WORK / "listing-pipeline"
    d.mkdir(parents=True, exist_ok=True)
    return str(d)


def bench_listing(n: int, s3_url: str, gcs_url: str, gcs_direct: str, nb: int = 0, repeats: int = 3,
                  ngs: int = 0, stores=("local", "s3", "gs")) -> dict:
    """``n`` names on local disk: before (the lister at fdf2a77, frozen in listing_before.py)
    vs after (storage.iter_objects) vs the split listing vs Beam's FileSystems.match, in one
    process, interleaved ``repeats`` times; then the same as pipelines (MatchInputs vs the
    old one-DoFn shape). ``nb`` names in a moto bucket seeded directly in the server's
    memory (uploading them one by one took ~25 minutes for 100,000), listed unsplit and
    split. ``ngs`` names in a fake-gcs-server bucket (filesystem backend: files and their
    ``user.metadata`` xattr written straight to its root; its memory backend fills
    quadratically), listed direct (no proxy), unsplit and split. The filesystem backend walks
    the whole bucket on every page request, so its listing is quadratic too: keep ngs small."""
    import listing_before
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions
    from dicom_deid import storage
    res = {"local": {}, "repeats": repeats}
    if "local" not in stores:
        n = 0
    d = make_names(WORK, n) if n else WORK
    pat = f"{d}/**"
    if "local" in stores:
        for _ in storage.iter_objects(pat):  # warm the page cache for everyone
            pass
    listers = {
        "before: iter_objects (fdf2a77), one process": lambda: listing_before.iter_local(pat),
        "after: iter_objects, one process": lambda: storage.iter_objects(pat),
        "after: plan_listing + tasks on 2 processes": lambda: split_listing(pat, 2, True),
        "beam FileSystems.match, one process": lambda: (m for r in FileSystems.match([pat]) for m in r.metadata_list),
    }
    if "local" in stores:
        local = rounds(listers, repeats)
        for k in ("before: iter_objects (fdf2a77), one process", "after: iter_objects, one process",
                  "beam FileSystems.match, one process"):
            local[k]["peak_heap_mb"] = peak_heap_mb(listers[k])
        res["local"] = local
        print("listing: pipelines ...", file=sys.stderr, flush=True)
        res["local_pipeline"] = {"MatchInputs (split)": pipeline_listing(pat, "split"),
                                 "one DoFn per pattern (the shape before)": pipeline_listing(pat, "unsplit")}
    if ngs and "gs" in stores:
        with seeded_fake_gcs(ngs) as (url, seed_s):
            res["gs_seed_s"] = seed_s
            os.environ["STORAGE_EMULATOR_HOST"] = url
            storage.reset_clients()
            try:
                gp = "gs://names/n/**"
                res["gs"] = rounds({"after: iter_objects, one process": lambda: storage.iter_objects(gp),
                                    "after: plan_listing + tasks on 4 threads": lambda: split_listing(gp, 4, False)},
                                   1)
            finally:
                os.environ.pop("STORAGE_EMULATOR_HOST", None)
                storage.reset_clients()
    if nb and "s3" in stores:
        with seeded_moto(nb) as (url, seed_s):
            res["s3_seed_s"] = seed_s
            FileSystems.set_options(PipelineOptions(servers.s3_beam_args(url)))
            storage.reset_clients()
            bp = "s3://names/n/**"
            res["s3"] = rounds({"after: iter_objects, one process": lambda: storage.iter_objects(bp),
                                "after: plan_listing + tasks on 4 threads": lambda: split_listing(bp, 4, False)},
                               1)
            storage.reset_clients()
    if not res["local"]:
        res.pop("local")
    res["stores"] = list(stores)
    return res


@contextlib.contextmanager
def seeded_fake_gcs(n: int):
    """fake-gcs-server with ``-backend filesystem`` whose bucket ``names`` holds ``n``
    objects ``n/dNNN/obj-NNNNNN.dcm`` (1,000 per folder): one uploaded through the API,
    the rest copied on disk with its metadata (the backend reads disk on every request)."""
    root = WORK / "fake-gcs-root"
    shutil.rmtree(root, ignore_errors=True)
    port = servers.free_port()
    cmd = [str(servers.fake_gcs_binary()), "-scheme", "http", "-backend", "filesystem", "-filesystem-root",
           str(root), "-host", "127.0.0.1", "-port", str(port), "-public-host", f"127.0.0.1:{port}",
           "-external-url", f"http://127.0.0.1:{port}", "-log-level", "error"]
    with servers._process(cmd, port, "/storage/v1/b", log_name="fake-gcs-fs"):
        url = f"http://127.0.0.1:{port}"
        c = servers.gcs_client(url)
        c.create_bucket("names")
        c.bucket("names").blob("n/d000/obj-000000.dcm").upload_from_string(b"x")
        first = root / "names" / "n" / "d000" / "obj-000000.dcm"
        meta = os.getxattr(first, "user.metadata")
        t0 = time.perf_counter()
        for i in range(1, n):
            d = root / "names" / "n" / f"d{i // 1000:03d}"
            if i % 1000 == 0:
                d.mkdir(parents=True, exist_ok=True)
            p = d / f"obj-{i:06d}.dcm"
            p.write_bytes(b"x")
            os.setxattr(p, "user.metadata", meta)
        try:
            yield url, round(time.perf_counter() - t0, 1)
        finally:
            shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def seeded_moto(n: int):
    """A moto server (its own process) whose bucket ``names`` holds ``n`` objects
    ``n/dNNN/obj-NNNNNN.dcm`` (1,000 per folder) written straight into its memory."""
    port = servers.free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--seeded-moto", str(port), str(n)],
                            env=env_for(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().split()
        if not line or line[0] != "ready":
            raise RuntimeError("seeded moto did not start")
        yield f"http://127.0.0.1:{port}", float(line[1])
    finally:
        proc.kill()
        proc.wait()


def _seeded_moto_child(port: int, n: int) -> None:
    import logging
    logging.disable(logging.CRITICAL)
    import werkzeug.serving  # noqa: F401  (quiet request log)
    logging.getLogger("werkzeug").disabled = True
    import boto3
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    c = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="x",
                     aws_secret_access_key="x", region_name="us-east-1")
    c.create_bucket(Bucket="names")
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    t0 = time.perf_counter()
    for i in range(n):
        backend.put_object("names", f"n/d{i // 1000:03d}/obj-{i:06d}.dcm", b"x")
    print(f"ready {time.perf_counter() - t0:.1f}", flush=True)
    sys.stdin.read()
    server.stop()


def ct_source() -> Path:
    """A CT slice of the throughput corpus (CT is published, not quarantined)."""
    import pydicom
    for f in sorted(tp.corpus(2000, 0.6, 100, 0)[0].rglob("*.dcm")):
        if pydicom.dcmread(f, stop_before_pixels=True).Modality == "CT":
            return f
    raise RuntimeError("no CT in the corpus")


def tiny_ct() -> bytes:
    """The corpus CT with 16x16 pixels: a small valid object that is published (not
    quarantined), so 100,000 of them fit on a small disk."""
    import io
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian
    ds = pydicom.dcmread(ct_source())
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.SamplesPerPixel = 16, 16, 15, 1
    ds.PixelData = bytes(16 * 16 * 2)
    ds["PixelData"].VR = "OW"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def bench_first_processed(n: int, key: Path) -> dict:
    """Launch over n local names (all small valid DICOM); stop at the first staged output."""
    d = WORK / f"tiny-dicom-names-{n}"
    done = WORK / f"tiny-dicom-names-{n}.complete"
    if not done.exists():
        shutil.rmtree(d, ignore_errors=True)
        data = tiny_ct()
        print(f"creating {n} small DICOM files ({len(data)} bytes each) ...", file=sys.stderr, flush=True)
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
    map_written = None
    sampler = tp.TreeSampler(proc.pid)
    sampler.start()
    first = None
    try:
        while proc.poll() is None and time.perf_counter() - t0 < 1800:
            if map_written is None and any((WORK / "first-priv" / "pseudonyms").glob("part-*.parquet")):
                map_written = time.perf_counter() - t0
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
            "pseudonym_map_written_s": round(map_written, 1) if map_written else None,
            "object_bytes": len(tiny_ct()),
            "peak_rss_mb_until_then": round(sampler.peak_rss / 2**20),
            "note": ("the pseudonym map was written before the first object: the header scan of every "
                     "input preceded reading" if map_written and first and map_written <= first else
                     "the first object was staged before any pseudonym map part was written "
                     "(no header-scan barrier on this run)")}


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
    t = r.get("throughput") or {}
    lines = [f"# Storage benchmark ({r['date']}, {r['machine']}, load average at start/end "
             f"{r['loadavg_at_start'][0]:.1f}/{r['loadavg_at_end'][0]:.1f} on a shared machine)", "",
             f"Same {t['files']} files ({t['megabytes']} MB), default local runner "
             "(FnApiRunner multi-processing, all cores); servers on 127.0.0.1 "
             f"(GCS: {r.get('gcs_server', 'gcp-storage-emulator')}; S3: moto, direct).", "",
             "| scheme | seconds | files/s | MB/s | ratio to local | peak RSS (tree) MB |",
             "|---|---|---|---|---|---|"]
    for k in ("local", "gs", "s3"):
        v = t[k]
        lines.append(f"| {k} | {v['seconds']} | {v['files_per_s']} | {v['mb_per_s']} | "
                     f"{v.get('ratio_to_local', 1.0)} | {v['peak_rss_mb']} |")
    li = r.get("listing") or {}
    lines += ["", f"Listing in one process or split (medians of {li.get('repeats', 1)} interleaved rounds; "
              "no tracemalloc while timed, heap in a separate pass):", "",
              "| store | lister | names | first name s | all names s | names/s | peak Python heap MB |",
              "|---|---|---|---|---|---|---|"]
    for store in ("local", "s3", "gs"):
        for lister, v in li.get(store, {}).items():
            if not isinstance(v, dict) or "names" not in v:
                continue
            rate = round(v["names"] / v["all_names_s"]) if v["all_names_s"] else None
            lines.append(f"| {store} | {lister} | {v['names']:,} | {v['first_name_s']} | {v['all_names_s']} | "
                         f"{rate} | {v.get('peak_heap_mb', '')} |")
    for lister, v in (li.get("local_pipeline") or {}).items():
        lines.append(f"| local, pipeline (all cores, Beam start-up included) | {lister} | {v['names']:,} | | "
                     f"{v['seconds']} | {round(v['names'] / v['seconds'])} | |")
    f = r["first_processed"]
    lines += ["", f"Pipeline over {f['names']:,} local names: pseudonym map written after "
              f"{f.get('pseudonym_map_written_s')} s, first processed object after "
              f"**{f['first_processed_s']} s** (peak RSS of the run until then {f['peak_rss_mb_until_then']} MB; "
              f"{f['note']}).", ""]
    lg = r["large"]
    h = lg["header_only_read_from_s3"]
    lines += [f"One {lg['object_mb']} MB multi-frame object: pipeline {lg['pipeline_seconds']} s, peak RSS of "
              f"the run's process tree **{lg['pipeline_peak_rss_mb']} MB**. Header-only read from S3 "
              f"(storage.open_read): {h['bytes_read']:,} bytes in {h['seconds']} s, RSS growth {h['rss_growth_mb']} MB.", ""]
    fe = r.get("fetch")
    if fe:
        lines += [f"storage.fetch of {fe['objects']} corpus objects, one process: " + ", ".join(
            f"{k} {v['objects_per_s']}/s" for k, v in fe.items() if isinstance(v, dict) and "objects_per_s" in v)
            + ".", ""]
    ld = r.get("load") or {}
    if ld:
        lines += [f"Machine load during the benchmark: 1-min load average median {ld['load1_median']}, max "
                  f"{ld['load1_max']}; CPU share used by other processes median "
                  f"{ld['cpu_share_used_by_other_processes_median']}, max {ld['cpu_share_used_by_other_processes_max']}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--listing-pipeline"]:  # child processes of the listing section
        _listing_pipeline_child(argv[1], argv[2])
        return 0
    if argv[:1] == ["--seeded-moto"]:
        _seeded_moto_child(int(argv[1]), int(argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--names", type=int, default=100_000)
    ap.add_argument("--large-mb", type=int, default=1024)
    ap.add_argument("--out", default=str(HERE / "results" / "storage.json"))
    ap.add_argument("--only", default="", help="comma-separated: throughput,listing,first,large,fetch "
                                               "(fetch only when named)")
    ap.add_argument("--bucket-names", type=int, default=50_000,
                    help="names in the (directly seeded) moto bucket for the listing; 0: none")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the local listers (median)")
    ap.add_argument("--gcs-names", type=int, default=20_000,
                    help="names in the (seeded on disk) fake-gcs-server bucket for the listing; 0: none")
    ap.add_argument("--listing-stores", default="local,s3,gs", help="which stores the listing section measures")
    ap.add_argument("--merge", default="", help="an earlier results JSON whose sections this run "
                                                "does not measure are kept (the table says so)")
    args = ap.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    key = WORK / "bench.key"
    key.write_text(KEY + "\n")
    key.chmod(0o600)
    os.environ.update(NO_GCE_CHECK="true", AWS_EC2_METADATA_DISABLED="true")
    earlier = json.loads(Path(args.merge).read_text()) if args.merge else {}
    result = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{os.cpu_count()} cores, {platform.python_version()}",
              "args": vars(args), "loadavg_at_start": os.getloadavg()}
    load = LoadSampler()
    load.start()
    only = set(args.only.split(",")) if args.only else {"throughput", "listing", "first", "large"}
    with servers.moto_server() as s3_url, gcs_server() as (gcs_name, gcs_url, gcs_direct):
        result["gcs_server"] = gcs_name
        for name, fn in (("throughput", lambda: bench_throughput(args.files, s3_url, gcs_url, key, gcs_direct)),
                         ("listing", lambda: bench_listing(args.names, s3_url, gcs_url, gcs_direct,
                                                           args.bucket_names, args.repeats, args.gcs_names,
                                                           args.listing_stores.split(","))),
                         ("first_processed", lambda: bench_first_processed(args.names, key)),
                         ("large", lambda: bench_large(args.large_mb, s3_url, key)),
                         ("fetch", lambda: bench_fetch())):
            if name.split("_")[0] not in only or (name == "fetch" and not args.only):
                continue
            t0 = time.perf_counter()
            print(f"== {name}", file=sys.stderr, flush=True)
            result[name] = fn()
            result[name]["section_seconds"] = round(time.perf_counter() - t0, 1)
            out_partial = Path(args.out).with_suffix(".partial.json")
            out_partial.parent.mkdir(parents=True, exist_ok=True)
            out_partial.write_text(json.dumps(result, indent=2, default=str))
    result["load"] = load.stop()
    result["loadavg_at_end"] = os.getloadavg()
    measured = [n for n in ("throughput", "listing", "first_processed", "large", "fetch") if n in result]
    if "listing" in measured and "listing" in earlier:
        # stores this invocation did not list keep their earlier numbers (said so per store)
        when = (earlier["listing"].get("measured_in_earlier_invocation") or {}).get("date") or earlier.get("date")
        for k, v in earlier["listing"].items():
            if k not in result["listing"] and k not in ("section_seconds", "stores", "measured_in_earlier_invocation"):
                result["listing"][k] = v
                if k in ("local", "s3", "gs", "local_pipeline"):
                    result["listing"].setdefault("stores_from_earlier_invocation", {})[k] = when
    for name in ("throughput", "listing", "first_processed", "large", "fetch"):
        if name not in result and name in earlier:
            result[name] = earlier[name] if "measured_in_earlier_invocation" in earlier[name] else dict(
                earlier[name], measured_in_earlier_invocation={
                    k: earlier.get(k) for k in ("date", "loadavg_at_start", "load", "gcs_server")})
    if earlier.get("listing_earlier") and "listing" not in measured:
        result["listing_earlier"] = earlier["listing_earlier"]
    if "listing" in earlier and "listing" in measured:
        # the numbers before this invocation's listing (e.g. before the split listing) stay on record
        result["listing_earlier"] = earlier.get("listing_earlier") or dict(
            earlier["listing"], measured_in_earlier_invocation={k: earlier.get(k) for k in ("date", "load")})
    result["invocations"] = list(earlier.get("invocations") or []) + [
        {"sections": measured, "date": result["date"], "args": vars(args)}]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
