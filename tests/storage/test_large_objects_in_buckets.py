"""The streamed (large-object) path against object stores: input fetched to a local temp
file in ranged chunks, output serialised to a local temp file and staged from it (S3 PUT
from the file / GCS resumable upload), then published by server-side copy. The published
bytes equal a local in-memory run's."""

from __future__ import annotations

import hashlib

import pyarrow.parquet as pq
import pytest

from tests.conftest import write_key
from tests.pipelines.test_large_objects import _job, _make, _outputs, _run


SCHEMES = ("s3", "gs")


@pytest.fixture(scope="module")
def bucket_runs(s3_store, gs_store, tmp_path_factory):
    """One runner process (one Beam start-up) for the local in-memory reference and the
    streamed run through each store, in that order; the runner's ``streamed`` count is
    cumulative, so each run's own count is the difference."""
    tmp = tmp_path_factory.mktemp("large-in-buckets")
    key = write_key(tmp / "key.hex", "11" * 32)
    src = _make(tmp / "in" / "mid.dcm", 5)
    temp = tmp / "temp"
    temp.mkdir()
    jobs, where = [_job(tmp, "local", src, key)], {}
    for scheme, store in zip(SCHEMES, (s3_store, gs_store)):
        store.proxy.reset()
        bucket, out_bucket, priv_bucket = store.new_bucket(), store.new_bucket(), store.new_bucket()
        store.put(bucket, "site/mid.dcm", src.read_bytes())
        jobs.append({"in": store.uri(bucket, "site/*.dcm"), "out": store.uri(out_bucket, "out"),
                     "private": store.uri(priv_bucket, "private"), "key": str(key),
                     "in_memory_max": 1024 * 1024, "args": store.beam_args()})
        where[scheme] = (store, out_bucket)
    # the GCS emulator's host in the environment only concerns gs:// (the s3 run has its args)
    res = _run(jobs, temp, env_extra=gs_store.env())
    counts = [r["streamed"] - (res[i - 1]["streamed"] if i else 0) for i, r in enumerate(res)]
    return dict(tmp=tmp, temp=temp, counts=counts, where=where)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_streamed_path_through_a_bucket_publishes_the_in_memory_bytes(scheme, bucket_runs, tmp_path):
    w = bucket_runs
    store, out_bucket = w["where"][scheme]
    assert w["counts"][0] == 0 and w["counts"][1 + SCHEMES.index(scheme)] == 1
    local = _outputs(w["tmp"] / "local" / "out")
    (rel, data), = local["files"].items()
    published = store.get(out_bucket, f"out/{rel}")
    assert published == data
    rows = pq.read_table(store.download(out_bucket, "out/manifest", tmp_path / "dl") / "out" / "manifest").to_pylist()
    assert [(r["status"], r["output_size"], r["output_sha256"]) for r in rows] == \
        [("ok", len(data), hashlib.sha256(data).hexdigest())]
    assert not [k for k in store.keys(out_bucket, "out") if "/.staging/" in k]
    assert list(w["temp"].iterdir()) == []
