#!/usr/bin/env python
"""The 1 GB object of ``benchmarks/storage.py --only large`` in and out of S3 (moto, local):
input, output and private prefix in buckets, default local runner, 1 worker; peak RSS of the
run's process tree (same sampler as storage.py). Reuses storage.py's object (run its
``--only large`` first). Prints one JSON line.

Usage::

    flock /tmp/dicom-deid-bench.lock .venv/bin/python benchmarks/large_s3.py
"""
import json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import storage as bench
from tests.storage import servers
from boto3.s3.transfer import TransferConfig
path = bench.WORK / "large" / "big.dcm"
key = bench.WORK / "bench.key"; key.write_text(bench.KEY + "\n"); key.chmod(0o600)
res = {"object_bytes": path.stat().st_size, "loadavg_at_start": os.getloadavg()}
with servers.moto_server() as url:
    s3 = servers.s3_client(url)
    for b in ("large-in", "large-out", "large-priv"):
        s3.create_bucket(Bucket=b)
    t = time.perf_counter()
    s3.upload_file(str(path), "large-in", "big.dcm", Config=TransferConfig(multipart_threshold=1 << 40))
    res["upload_s"] = round(time.perf_counter() - t, 1)
    dt, rss, _ = bench.cli(["--input", "s3://large-in/big.dcm", "--output", "s3://large-out/out",
                            "--private", "s3://large-priv/p", "--key", key, "--direct_num_workers=1"],
                           bench.env_for(), servers.s3_beam_args(url))
    res.update(pipeline_seconds=round(dt, 1), pipeline_peak_rss_mb=round(rss / 2**20))
    objs = [o for o in s3.list_objects_v2(Bucket="large-out", Prefix="out/").get("Contents", []) if o["Key"].endswith(".dcm")]
    res["outputs"] = [(o["Key"].count("/"), o["Size"]) for o in objs]
res["loadavg_at_end"] = os.getloadavg()
print(json.dumps(res))
