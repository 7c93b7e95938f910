"""The streamed (large-object) path against object stores: input fetched to a local temp
file in ranged chunks, output serialised to a local temp file and staged from it (S3 PUT
from the file / GCS resumable upload), then published by server-side copy. The published
bytes equal a local in-memory run's."""

from __future__ import annotations

import hashlib

import pyarrow.parquet as pq
import pytest

from tests.pipelines.test_large_objects import _job, _make, _outputs, _run


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_streamed_path_through_a_bucket_publishes_the_in_memory_bytes(scheme, request, tmp_path, key_file):
    store = request.getfixturevalue(f"{scheme}_store")
    store.proxy.reset()
    src = _make(tmp_path / "in" / "mid.dcm", 5)
    bucket, out_bucket, priv_bucket = store.new_bucket(), store.new_bucket(), store.new_bucket()
    store.put(bucket, "site/mid.dcm", src.read_bytes())
    temp = tmp_path / "temp"
    temp.mkdir()
    remote = {"in": store.uri(bucket, "site/*.dcm"), "out": store.uri(out_bucket, "out"),
              "private": store.uri(priv_bucket, "private"), "key": str(key_file),
              "in_memory_max": 1024 * 1024, "args": store.beam_args()}
    res = _run([_job(tmp_path, "local", src, key_file), remote], temp, env_extra=store.env())
    assert res[0]["streamed"] == 0 and res[1]["streamed"] == 1
    local = _outputs(tmp_path / "local" / "out")
    (rel, data), = local["files"].items()
    published = store.get(out_bucket, f"out/{rel}")
    assert published == data
    rows = pq.read_table(store.download(out_bucket, "out/manifest", tmp_path / "dl") / "out" / "manifest").to_pylist()
    assert [(r["status"], r["output_size"], r["output_sha256"]) for r in rows] == \
        [("ok", len(data), hashlib.sha256(data).hexdigest())]
    assert not [k for k in store.keys(out_bucket, "out") if "/.staging/" in k]
    assert list(temp.iterdir()) == []
