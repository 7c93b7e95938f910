"""gs://, s3:// and mixed runs end to end against real local servers (gcp-storage-emulator,
moto), through the CLI with the default local runner (FnApiRunner, multi-processing), with
faults injected by a proxy: 503 for a while, dropped connections, a 403 on one object."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest

from dicom_deid import sample
from tests.conftest import write_key
from tests.storage.conftest import run_cli

DENIED_NAME = "denied-object.dcm"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bucket-data")
    s = sample.generate(root / "in", n_files=10, n_patients=3, seed=21)
    files = {f"site/{p.relative_to(root / 'in')}": p.read_bytes() for p in s.files}
    files["site/broken/empty.dcm"] = b""
    files["site/broken/notes.txt"] = b"not a dicom object at all\n" * 10
    key = write_key(root / "key.hex", "ab" * 32)
    return {"root": root, "sample": s, "files": files, "key": key,
            "planted": [v for v in s.planted_values() if len(v) >= 4]}


def upload(store, files) -> str:
    bucket = store.new_bucket()
    for k, v in files.items():
        store.put(bucket, k, v)
    return bucket


def manifest_of(store, bucket, prefix, dest: Path):
    local = store.download(bucket, prefix, dest)
    return pq.read_table(local / prefix.rstrip("/") / "manifest").to_pylist()


def check_run(proc, rows, data, store_out, out_bucket, out_prefix, n_ok):
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(rows) == len(data["files"]) and len({r["input_key"] for r in rows}) == len(rows)
    ok = [r for r in rows if r["status"] == "ok"]
    # the sample's 10 objects: ok, or quarantined by the fail-closed pixel/document stages
    held = [r for r in rows if r["status"] == "quarantined"]
    assert len(ok) + len(held) == n_ok and len(ok) >= n_ok // 2, sorted((r["status"], r["reason"]) for r in rows)
    assert {r["reason"] for r in held} <= {"pixel_stage_missing", "document_stage_missing"}
    for r in ok:
        scheme, rest = r["output_path"].split("://", 1)
        bucket, key = rest.split("/", 1)
        assert scheme == store_out.scheme and bucket == out_bucket and key.startswith(out_prefix)
        blob = store_out.get(bucket, key)
        assert hashlib.sha256(blob).hexdigest() == r["output_sha256"]
        ds = pydicom.dcmread(io.BytesIO(blob))
        assert ds.PatientIdentityRemoved == "YES" and ds.SOPInstanceUID == r["sop_uid"]
        for v in data["planted"]:
            assert v.encode() not in blob
    # nothing left in staging, no partial objects
    assert not [k for k in store_out.keys(out_bucket, out_prefix) if "/.staging/" in k]
    # no credential search (Beam warns when it had to look), no identifier on stderr
    assert "Unable to find default credentials" not in proc.stderr
    for v in data["planted"]:
        assert v not in proc.stderr and v not in proc.stdout
    failed = {r["error_class"].rsplit(".", 1)[-1] for r in rows if r["status"] == "failed"}
    return failed


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_bucket_end_to_end(scheme, request, data, tmp_path):
    store = request.getfixturevalue(f"{scheme}_store")
    bucket = upload(store, data["files"])
    out_bucket, priv_bucket = store.new_bucket(), store.new_bucket()
    proc = run_cli(["--input", store.uri(bucket, "site/**"), "--output", store.uri(out_bucket, "out"),
                    "--private", store.uri(priv_bucket, "priv"), "--key", data["key"]],
                   env_extra=store.env(), beam_args=store.beam_args())
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = manifest_of(store, out_bucket, "out/", tmp_path)
    failed = check_run(proc, rows, data, store, out_bucket, "out/", n_ok=10)
    assert failed == {"EmptyInput", "NotDicom"}
    # private outputs in the private bucket only: linkage, dead letters (input URIs there)
    priv = store.keys(priv_bucket)
    assert any(k.startswith("priv/linkage/") and k.endswith(".parquet") for k in priv)
    dls = [json.loads(line) for k in priv if k.startswith("priv/dead_letters/")
           for line in store.get(priv_bucket, k).decode().splitlines() if line.strip()]
    assert sorted(d["input_uri"] for d in dls) == sorted(store.uri(bucket, k) for k in
                                                         ("site/broken/empty.dcm", "site/broken/notes.txt"))
    assert bucket not in json.dumps(rows, default=str)  # no input reference in the public manifest
    summary = json.loads(store.get(out_bucket, next(k for k in store.keys(out_bucket, "out/summaries/"))))
    assert summary["inputs"] == len(data["files"]) and summary["running_mode"] == "multi_processing"


def test_mixed_schemes_inputs_s3_output_gs_private_local(s3_store, gs_store, data, tmp_path):
    # one worker: the schemes, not the worker count, are under test (the single-scheme runs
    # above have the default, one per core)
    in_bucket = upload(s3_store, data["files"])
    out_bucket = gs_store.new_bucket()
    priv = tmp_path / "private"
    proc = run_cli(["--input", s3_store.uri(in_bucket, "site/**"), "--output", gs_store.uri(out_bucket, "o"),
                    "--private", priv, "--key", data["key"]],
                   env_extra=gs_store.env(), beam_args=[*s3_store.beam_args(), "--direct_num_workers=1"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = manifest_of(gs_store, out_bucket, "o/", tmp_path / "dl")
    check_run(proc, rows, data, gs_store, out_bucket, "o/", n_ok=10)
    link = pq.read_table(priv / "linkage").to_pylist()
    assert len(link) == sum(r["status"] == "ok" for r in rows) and all(r["input_uri"].startswith(f"s3://{in_bucket}/") for r in link)


@pytest.fixture(scope="module", params=["gs", "s3"])
def faulty_run(request, data, tmp_path_factory):
    """One run per store through the proxy: 3 dropped connections, then 503 on every request
    for 4 s, and 403 on every read of one object."""
    store = request.getfixturevalue(f"{request.param}_store")
    tmp = tmp_path_factory.mktemp(f"faults-{request.param}")
    files = dict(data["files"])
    denied_key = f"site/{DENIED_NAME}"
    files[denied_key] = next(v for k, v in data["files"].items() if k.endswith(".dcm") and v)
    bucket = upload(store, files)
    out_bucket = store.new_bucket()
    priv = tmp / "private"
    store.proxy.reset()
    store.proxy.deny(DENIED_NAME)
    store.proxy.drop_next(3)
    store.proxy.fail_for(4.0, 503)
    try:
        proc = run_cli(["--input", store.uri(bucket, "site/**"), "--output", store.uri(out_bucket, "out"),
                        "--private", priv, "--key", data["key"], "--no-progress"],
                       env_extra=store.env(), beam_args=store.beam_args())
        served = dict(store.proxy.served)
    finally:
        store.proxy.reset()
    rows = manifest_of(store, out_bucket, "out/", tmp / "dl") if proc.returncode == 0 else []
    return dict(store=store, proc=proc, served=served, rows=rows, files=files, bucket=bucket,
                denied_key=denied_key, priv=priv)


def test_transient_errors_are_retried_and_a_403_is_one_dead_letter(faulty_run):
    f = faulty_run
    proc, served, rows, store = f["proc"], f["served"], f["rows"], f["store"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert served["failed"] > 0 and served["denied"] > 0 and served["dropped"] == 3, served
    assert len(rows) == len(f["files"])
    failed = [r for r in rows if r["status"] == "failed"]
    classes = sorted(r["error_class"] for r in failed)
    assert classes == sorted(["dicom_deid.storage.AccessDenied", "dicom_deid.errors.EmptyInput",
                              "dicom_deid.errors.NotDicom"]), classes
    denied = next(r for r in failed if r["error_class"].endswith("AccessDenied"))
    assert denied["stage"] == "read" and "403" in denied["reason"]
    assert sum(r["status"] in ("ok", "quarantined") for r in rows) == 10
    dls = [json.loads(line) for p in (f["priv"] / "dead_letters").rglob("*.jsonl")
           for line in p.read_text().splitlines()]
    assert [d["input_uri"] for d in dls if d["error_class"].endswith("AccessDenied")] == [
        store.uri(f["bucket"], f["denied_key"])]


def test_faults_never_log_object_names(faulty_run, request):
    proc = faulty_run["proc"]
    assert DENIED_NAME not in proc.stderr and DENIED_NAME not in proc.stdout


def test_s3_run_without_dead_letters_finishes(s3_store, data, tmp_path):
    """Beam's S3 writer cannot finish an empty object: a run with no dead letters must not
    try to write an empty dead-letter file to an s3:// private prefix."""
    good = {k: v for k, v in data["files"].items() if k.endswith(".dcm") and v}
    bucket = upload(s3_store, dict(list(good.items())[:3]))
    out_bucket, priv_bucket = s3_store.new_bucket(), s3_store.new_bucket()
    proc = run_cli(["--input", s3_store.uri(bucket, "site/**"), "--output", s3_store.uri(out_bucket, "o"),
                    "--private", s3_store.uri(priv_bucket, "p"), "--key", data["key"], "--no-progress"],
                   beam_args=[*s3_store.beam_args(), "--direct_num_workers=1"])  # 3 inputs: one worker
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [k for k in s3_store.keys(priv_bucket) if "dead_letters" in k]
    assert len(manifest_of(s3_store, out_bucket, "o/", tmp_path)) == 3
