"""``--incremental``: unit rules of the record, then real runs: add objects (only the new
ones are processed), change one (it alone is reprocessed, ``content_changed``), rewrite one
with identical bytes (``content_unchanged``); the manifest stays one table for pyarrow,
pandas and DuckDB."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import duckdb
import pandas
import pyarrow.parquet as pq
import pydicom
import pytest

from dicom_deid import incremental as inc
from dicom_deid import sample
from tests.conftest import write_key
from tests.storage.conftest import run_cli

LATEST = """SELECT * FROM read_parquet('{m}/*/*.parquet')
QUALIFY row_number() OVER (PARTITION BY input_key ORDER BY timestamp DESC) = 1"""


# --- the rules ------------------------------------------------------------------------------
def _t(s):
    return dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=s)


def _rows(run, t, version="gen:1", status="ok", fp="f1", policy="basic@1"):
    lst = inc.listed_row(run, "k", "gs://b/name", version, policy)
    lst["timestamp"] = _t(t)
    fin = inc.finished_row(run, {"input_key": "k", "status": status, "content_fingerprint": fp,
                                 "timestamp": _t(t)}, policy)
    fin["timestamp"] = _t(t + 1)
    return [lst, fin]


def test_latest_needs_a_listed_and_a_finished_row_of_the_same_run():
    assert inc.latest([_rows("r1", 0)[0]], frozenset()) is None           # listed, never finished
    assert inc.latest([_rows("r1", 0)[1]], frozenset()) is None           # version unknown
    p = inc.latest(_rows("r1", 0) + _rows("r2", 10, version="gen:2", fp="f2"), frozenset({"r1"}))
    assert (p.run_id, p.version, p.fingerprint, p.complete) == ("r2", "gen:2", "f2", False)


@pytest.mark.parametrize("version,status,policy,complete,expected", [
    ("gen:1", "ok", "basic@1", True, inc.SKIP),
    ("gen:1", "quarantined", "basic@1", True, inc.SKIP),
    ("gen:1", "ok", "basic@1", False, inc.RECOVER),      # its run was killed: re-issue the row
    ("gen:2", "ok", "basic@1", True, inc.PROCESS),      # new version
    ("gen:1", "failed", "basic@1", True, inc.PROCESS),  # failures are tried again
    ("gen:1", "ok", "research@1", True, inc.PROCESS),   # another policy
])
def test_decide(version, status, policy, complete, expected):
    prior = inc.latest(_rows("r1", 0, status=status, policy=policy), frozenset({"r1"} if complete else ()))
    action, fp = inc.decide(version, "basic@1", prior)
    assert action == expected and fp == "f1"
    assert inc.decide("gen:1", "basic@1", None) == (inc.PROCESS, "")


def test_record_round_trip_keeps_the_manifest_row_and_drops_uris():
    row = {"input_key": "k", "status": "ok", "content_fingerprint": "f", "timestamp": _t(5),
           "output_path": "gs://o/x.dcm"}
    data = inc.to_parquet_bytes([inc.listed_row("r", "k", "gs://in/Smith^John.dcm", "gen:3", "p"),
                                 inc.finished_row("r", row, "p")])
    back = inc.from_parquet_bytes(data)
    assert all("input_uri" not in r for r in back)
    assert inc.manifest_row_from_json(back[1]["manifest_row"]) == row
    assert inc.change_reason("a", "a") == inc.CONTENT_UNCHANGED and inc.change_reason("a", "b") == inc.CONTENT_CHANGED


# --- real runs --------------------------------------------------------------------------------
def _record_files(priv: Path) -> list[str]:
    return sorted(str(p.relative_to(priv / "incremental" / "records"))
                  for p in (priv / "incremental" / "records").rglob("*") if p.is_file())


def _run(world, *extra, compact_files=None):
    env = {"DICOM_DEID_RECORD_COMPACT_FILES": str(compact_files)} if compact_files is not None else None
    proc = run_cli(["--input", f"{world['inputs']}/**", "--output", world["out"], "--private", world["priv"],
                    "--key", world["key"], "--incremental", "--no-progress", *extra], env_extra=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    world.setdefault("records", []).append(_record_files(world["priv"]))
    summaries = sorted((world["out"] / "summaries").glob("*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(summaries[-1].read_text())


def _run_rows(out: Path, run_id: str):
    return pq.read_table(out / "manifest" / f"run-{run_id}").to_pylist()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("incremental")
    inputs = root / "in"
    first = sample.generate(inputs / "a", n_files=8, n_patients=2, seed=31)
    w = {"root": root, "inputs": inputs, "out": root / "out", "priv": root / "priv",
         "key": write_key(root / "k.hex", "cd" * 32), "first": first, "summaries": []}
    w["summaries"].append(_run(w))                                     # 1: everything is new
    # runs 2-4 with one worker: their decisions do not depend on the worker count (run 1 has
    # the default, one per core), and a worker fewer is seconds less start-up per run
    one = "--direct_num_workers=1"
    more = sample.generate(root / "staging-b", n_files=4, n_patients=1, seed=32)
    shutil.copytree(root / "staging-b", inputs / "b")
    w["more"] = more
    w["summaries"].append(_run(w, one))                                # 2: four objects added
    # 3: one object changed (a corrected re-send: other content, new SOP Instance UID)
    changed = sorted((inputs / "a").rglob("*.dcm"))[0]
    ds = pydicom.dcmread(changed)
    ds.SeriesDescription = "corrected"
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".9"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(changed, enforce_file_format=True)
    w["changed"] = changed
    # runs 3 and 4 also compact the record (more than 1 record file): decisions must not change
    w["summaries"].append(_run(w, one, compact_files=1))
    # 4: one object rewritten with identical bytes (new mtime, same content)
    touched = sorted((inputs / "a").rglob("*.dcm"))[1]
    touched.write_bytes(touched.read_bytes())
    w["summaries"].append(_run(w, one, compact_files=1))
    return w


def test_first_run_processes_everything(world):
    s = world["summaries"][0]
    assert s["inputs"] == 8 and s["incremental"]["new"] == 8 and s["incremental"]["unchanged_skipped"] == 0


def test_only_new_objects_are_processed(world):
    s = world["summaries"][1]
    assert s["inputs"] == 4, s
    assert s["incremental"] == {"new": 4, "reprocessed": 0, "unchanged_skipped": 8, "recovered": 0}
    rows = _run_rows(world["out"], s["run_id"])
    first_keys = {r["input_key"] for r in _run_rows(world["out"], world["summaries"][0]["run_id"])}
    assert len(rows) == 4 and not ({r["input_key"] for r in rows} & first_keys)


def test_a_changed_object_alone_is_reprocessed_and_says_so(world):
    s = world["summaries"][2]
    assert s["inputs"] == 1 and s["incremental"]["reprocessed"] == 1 and s["incremental"]["unchanged_skipped"] == 11
    (row,) = _run_rows(world["out"], s["run_id"])
    before = [r for r in _run_rows(world["out"], world["summaries"][0]["run_id"]) if r["input_key"] == row["input_key"]]
    assert len(before) == 1
    assert row["status"] == "ok" and row["reason"] == inc.CONTENT_CHANGED
    assert row["content_fingerprint"] != before[0]["content_fingerprint"]
    assert row["sop_uid"] != before[0]["sop_uid"] and Path(row["output_path"]).is_file()


def test_same_bytes_under_a_new_version_are_reprocessed_as_unchanged_content(world):
    s = world["summaries"][3]
    assert s["inputs"] == 1 and s["incremental"]["reprocessed"] == 1
    (row,) = _run_rows(world["out"], s["run_id"])
    assert row["status"] == "ok" and row["reason"] == inc.CONTENT_UNCHANGED


def test_manifest_is_one_table_for_pyarrow_pandas_duckdb(world):
    m = world["out"] / "manifest"
    t = pq.read_table(m)
    df = pandas.read_parquet(m)
    total = 8 + 4 + 1 + 1
    assert t.num_rows == total and len(df) == total
    assert len(set(t.column("run_id").to_pylist())) == 4
    latest = duckdb.sql(LATEST.format(m=m)).fetchall()
    assert len(latest) == 12                       # one current row per input
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{m}/*/*.parquet')").fetchall()[0][0] == total


def test_record_is_compacted_past_the_threshold(world):
    ids = [s["run_id"] for s in world["summaries"]]
    before, third, fourth = world["records"][1], world["records"][2], world["records"][3]
    # runs 1 and 2 did not compact (default threshold): one folder each
    assert {f.split("/")[0] for f in before} == {f"run-{ids[0]}", f"run-{ids[1]}"}
    # run 3 replaced them with its compaction (committed), and wrote its own part(s)
    assert {f.split("/")[0] for f in third} == {f"compact-{ids[2]}", f"run-{ids[2]}"}
    assert f"compact-{ids[2]}/{inc.REPLACES}" in third
    # run 4 replaced run 3's compaction and parts with its own
    assert {f.split("/")[0] for f in fourth} == {f"compact-{ids[3]}", f"run-{ids[3]}"}
    parts = [f for f in fourth if f.startswith("compact-") and f.endswith(".parquet")]
    rows = [r for f in parts for r in pq.read_table(world["priv"] / "incremental" / "records" / f).to_pylist()]
    # 12 inputs known before run 4, two rows each (latest decision + its listing); no URI kept
    assert len(rows) == 24 and len({r["input_key"] for r in rows}) == 12
    assert all(r["input_uri"] is None for r in rows)


def test_record_lives_under_the_private_prefix_only(world):
    assert list((world["priv"] / "incremental" / "records").glob("*/*.parquet"))
    assert len(list((world["priv"] / "incremental" / "complete").glob("run-*.json"))) == 4
    assert not list(world["out"].rglob("*incremental*"))
    names = {p.name for p in world["inputs"].rglob("*.dcm")}
    public = b"".join(p.read_bytes() for p in (world["out"] / "manifest").rglob("*.parquet"))
    assert not any(n.encode() in public for n in names)
