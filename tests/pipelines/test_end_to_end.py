"""End to end: real files, planted identifiers, broken inputs, duplicates, re-runs.

Runs the real CLI in a subprocess (default local runner: FnApiRunner, multi-processing),
so worker logs and stderr are captured exactly as a user would see them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest

from dicom_deid import sample
from tests.conftest import CORPUS, finish, make_broken_inputs, shared_dir, write_key

MALFORMED_NAME = "VELLACOTT^PRUDENCIA"


def start_cli(*args, env_extra=None) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "dicom_deid.cli", "run", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def run_cli(*args, env_extra=None):
    return finish(start_cli(*args, env_extra=env_extra))


def _planted_malformed(folder: Path) -> Path:
    """Identifiers planted in malformed values pydicom would quote in its messages."""
    ds = pydicom.dcmread(CORPUS / "highdicom" / "data" / "test_files" / "ct_image.dcm")
    ds.PatientName = MALFORMED_NAME
    ds.add_new(0x00181030, "LO", MALFORMED_NAME)                 # ProtocolName (free text)
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag
    for tag, vr, value in ((0x00200013, "IS", b"VELLACOTT "),      # InstanceNumber: not an IS
                           (0x00280030, "DS", b"PRUDENCIA\\1"),   # PixelSpacing: not a DS
                           (0x00081155, "UI", b"1.2.VELLACOTT\0")):  # a UI that is not a UID
        ds._dict[Tag(tag)] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    out = folder / "malformed-values.dcm"
    from pydicom import config
    old = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        ds.save_as(out, enforce_file_format=True)
    finally:
        config.settings.writing_validation_mode = old
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    inputs = root / "in"
    shutil.copytree(CORPUS, inputs / "corpus")
    s = sample.generate(inputs / "sample", n_files=16, n_patients=3, seed=11)
    # an identical copy of one sample file -> duplicate
    shutil.copy(s.files[0], inputs / "sample" / "copy-of-first.dcm")
    broken = make_broken_inputs(inputs / "broken", CORPUS / "dcm_qa_ts" / "1.dcm", MALFORMED_NAME)
    malformed = _planted_malformed(inputs / "broken")
    key_a = write_key(root / "a.key", "aa" * 32)
    key_b = write_key(root / "b.key", "bb" * 32)
    out, priv = root / "out", root / "priv"
    # the other key's run shares nothing with runs 1 and 2 (own prefixes, own key): it runs
    # beside them instead of after them (much of a run's time is start-up, not CPU)
    out_b, priv_b = root / "out_b", root / "priv_b"
    p3 = start_cli("--input", f"{inputs}/sample/**", "--output", out_b, "--private", priv_b, "--key", key_b,
                   "--direct_num_workers=1")
    try:
        r1 = run_cli("--input", f"{inputs}/**", "--output", out, "--private", priv, "--key", key_a)
        assert r1.returncode == 0, r1.stderr[-3000:]
        snap1 = {p: p.read_bytes() for p in out.rglob("*.dcm")}
        # the re-run with one worker: byte-identical outputs whatever the worker count
        r2 = run_cli("--input", f"{inputs}/**", "--output", out, "--private", priv, "--key", key_a,
                     "--direct_num_workers=1")
        assert r2.returncode == 0, r2.stderr[-3000:]
    finally:
        r3 = finish(p3)
    assert r3.returncode == 0, r3.stderr[-3000:]
    n_inputs = sum(1 for p in inputs.rglob("*") if p.is_file())
    return dict(root=root, inputs=inputs, sample=s, broken=broken, malformed=malformed, out=out,
                priv=priv, out_b=out_b, runs=(r1, r2, r3), snap1=snap1, n_inputs=n_inputs)


def manifest(out: Path):
    return pq.read_table(out / "manifest")


def runs_of(t):
    return sorted(set(t.column("run_id").to_pylist()))


def first_run(w):
    t = manifest(w["out"])
    rid = runs_of(t)[0]
    return [r for r in t.to_pylist() if r["run_id"] == rid]


def test_every_input_exactly_one_row_with_an_end(world):
    rows = first_run(world)
    assert len(rows) == world["n_inputs"]
    assert len({r["input_key"] for r in rows}) == len(rows)
    for r in rows:
        if r["status"] == "ok":
            assert r["output_path"] and Path(r["output_path"]).is_file()
            ds = pydicom.dcmread(r["output_path"])
            assert ds.SOPInstanceUID == r["sop_uid"] and ds.PatientIdentityRemoved == "YES"
            assert hashlib.sha256(Path(r["output_path"]).read_bytes()).hexdigest() == r["output_sha256"]
        else:
            assert r["output_path"] is None and r["reason"], r
    statuses = {r["status"] for r in rows}
    assert {"ok", "failed", "quarantined", "skipped", "duplicate"} <= statuses


def test_runner_was_the_local_fnapi_multiprocessing(world):
    rid = runs_of(manifest(world["out"]))[0]  # run 1: the defaults (run 2 has one worker)
    summary = json.loads((world["out"] / "summaries" / f"run-{rid}.json").read_text())
    assert summary["runner"] == "FnApiRunner" and summary["running_mode"] == "multi_processing"
    assert summary["num_workers"] == (os.cpu_count() or 1)
    assert summary["inputs"] == world["n_inputs"]
    assert "progress: " in world["runs"][0].stderr
    # Beam's start-up lines that do not apply here, and the workers' INFO, are not printed
    from dicom_deid.beamlogs import NOT_APPLICABLE
    for run in world["runs"]:
        assert not any(text in run.stderr for text in NOT_APPLICABLE + ("Logging handler created",))


def test_broken_inputs_become_distinct_dead_letters(world):
    rows = first_run(world)
    dls = [json.loads(line) for f in (world["priv"] / "dead_letters").rglob("*.jsonl")
           for line in f.read_text().splitlines() if line.strip()]
    by_uri = {d["input_uri"]: d for d in dls}
    classes = {name: by_uri[str(p)]["error_class"] for name, p in world["broken"].items()}
    assert classes["zero"].endswith("EmptyInput") and classes["random"].endswith("NotDicom")
    assert classes["truncated"].endswith("TruncatedInput") and classes["corrupt"].endswith("CorruptElement")
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) >= len(world["broken"])
    assert all(r["error_class"] for r in failed)


def test_duplicates_conflicts_and_dicomdir(world):
    rows = first_run(world)
    by_reason = {}
    for r in rows:
        by_reason.setdefault((r["status"], r["reason"]), []).append(r)
    assert len(by_reason[("duplicate", "identical_input")]) >= 1
    conflicts = by_reason[("quarantined", "sop_uid_conflict")]
    assert len(conflicts) >= 1  # e.g. GH538-jpeg1 / GH538-jpeg14sv1 share a SOP Instance UID
    assert len(by_reason[("skipped", "dicomdir")]) == 1
    for status_reason in (("quarantined", "pixel_stage_missing"), ("quarantined", "document_stage_missing")):
        assert by_reason.get(status_reason), status_reason
    # nothing in the staging area is left behind
    assert not (world["out"] / ".staging").exists() or not any((world["out"] / ".staging").rglob("*.dcm"))


def _all_public_and_logged_bytes(w) -> list[tuple[str, bytes]]:
    blobs = []
    for base in (w["out"], w["out_b"]):
        for p in base.rglob("*"):
            blobs.append((f"path:{p}", str(p.relative_to(base)).encode()))
            if p.is_file():
                blobs.append((str(p), p.read_bytes()))
    for f in (w["priv"] / "dead_letters").rglob("*"):
        if f.is_file():
            blobs.append((str(f), f.read_bytes()))
    for i, r in enumerate(w["runs"]):
        blobs.append((f"stdout{i}", r.stdout.encode()))
        blobs.append((f"stderr{i}", r.stderr.encode()))
    return blobs


def test_canary_no_planted_value_anywhere(world):
    planted = set(world["sample"].planted_values()) | {MALFORMED_NAME, "VELLACOTT", "PRUDENCIA"}
    # manifest columns decoded too (Parquet may compress strings)
    text = manifest(world["out"]).to_pandas().to_csv().upper()
    blobs = _all_public_and_logged_bytes(world)
    leaks = []
    for v in planted:
        vb = v.upper().encode()
        if v.upper() in text:
            leaks.append(("manifest", v))
        for name, blob in blobs:
            if vb in blob.upper():
                leaks.append((name, v))
    assert not leaks, leaks[:10]
    # the input paths themselves never reach the public side
    in_root = str(world["inputs"]).encode()
    public = [(n, b) for n, b in blobs if n.startswith(str(world["out"])) or n.startswith("path:")]
    assert public and not [n for n, b in public if in_root in b]


def test_manifest_readable_by_pyarrow_pandas_duckdb_and_latest_view(world):
    import duckdb
    import pandas as pd
    t = manifest(world["out"])
    df = pd.read_parquet(world["out"] / "manifest")
    assert len(df) == t.num_rows == 2 * world["n_inputs"]
    con = duckdb.connect()
    glob = str(world["out"] / "manifest" / "*" / "*.parquet")
    assert con.execute(f"select count(*) from read_parquet('{glob}')").fetchall()[0][0] == t.num_rows
    latest = con.execute(f"""select * from read_parquet('{glob}')
        qualify row_number() over (partition by input_key order by timestamp desc) = 1""").df()
    assert len(latest) == world["n_inputs"] and latest["input_key"].is_unique
    assert set(t.schema.names) >= {"input_key", "content_fingerprint", "status", "pseudo_patient_id",
                                   "sop_uid", "output_sha256", "pipeline_version", "run_id"}


def test_rerun_same_key_is_byte_identical_and_different_key_differs(world):
    snap2 = {p: p.read_bytes() for p in world["out"].rglob("*.dcm")}
    assert snap2 == world["snap1"]
    t = manifest(world["out"]).to_pylist()
    r1, r2 = runs_of(manifest(world["out"]))
    s1 = {r["input_key"]: (r["status"], r["sop_uid"], r["pseudo_patient_id"]) for r in t if r["run_id"] == r1}
    s2 = {r["input_key"]: (r["status"], r["sop_uid"], r["pseudo_patient_id"]) for r in t if r["run_id"] == r2}
    assert s1 == s2
    tb = manifest(world["out_b"]).to_pylist()
    ok_a = {r["pseudo_patient_id"] for r in t if r["status"] == "ok"}
    ok_b = {r["pseudo_patient_id"] for r in tb if r["status"] == "ok"}
    sop_a = {r["sop_uid"] for r in t if r["status"] == "ok"}
    sop_b = {r["sop_uid"] for r in tb if r["status"] == "ok"}
    assert ok_b and not (ok_a & ok_b) and not (sop_a & sop_b)


def test_linkage_table_is_private_and_complete(world):
    link = pq.read_table(world["priv"] / "linkage").to_pylist()
    rows = first_run(world)
    staged_keys = {r["input_key"] for r in rows if r["status"] in ("ok", "duplicate") or r["reason"] == "sop_uid_conflict"}
    link_keys = {r["input_key"] for r in link}
    assert staged_keys <= link_keys
    assert all(r["input_uri"].startswith(str(world["inputs"])) for r in link)


@pytest.mark.skipif(shared_dir() is None, reason="../shared/corpus not present")
def test_whole_shared_corpus(tmp_path, key_file):
    corpus = shared_dir() / "corpus"
    files = [p for p in corpus.rglob("*") if p.is_file()]
    r = run_cli("--input", f"{corpus}/**", "--output", tmp_path / "o", "--private", tmp_path / "p",
                "--key", key_file, "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = pq.read_table(tmp_path / "o" / "manifest").to_pylist()
    assert len(rows) == len(files) and len({r["input_key"] for r in rows}) == len(files)
    for row in rows:
        if row["status"] == "ok":
            pydicom.dcmread(row["output_path"])
        else:
            assert row["reason"]
