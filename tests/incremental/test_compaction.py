"""Compaction of the incremental record: which rows survive (``reduce_rows``), what a reader
reads (``select``) while a compaction is half done, commit, and a reader whose files vanish
under it (``_ReadRecordsFn`` against a compaction committed meanwhile), on a local disk and
on the real S3 and GCS servers. Real runs that compact are in ``test_incremental.py``."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from dicom_deid import incremental as inc
from dicom_deid import storage
from dicom_deid.transforms.incremental import _ReadRecordsFn


def _t(s):
    return dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=s)


def _pair(run, key, t, status="ok", version="gen:1"):
    lst = inc.listed_row(run, key, f"gs://in/{key}", version, "basic@1")
    lst["timestamp"] = _t(t)
    fin = inc.finished_row(run, {"input_key": key, "status": status, "content_fingerprint": f"fp-{run}"}, "basic@1")
    fin["timestamp"] = _t(t + 1)
    return [lst, fin]


def _key(rows):
    return sorted((r["run_id"], r["kind"]) for r in rows)


# --- which rows survive -------------------------------------------------------------------------
def test_reduce_keeps_the_latest_decision_and_unpaired_rows_of_unfinished_runs():
    rows = (_pair("r1", "k", 0) + _pair("r2", "k", 10) + _pair("r3", "k", 20, status="failed")
            + [_pair("r4", "k", 30)[0]]          # killed after listing: its decision may still come
            + [_pair("r5", "k", 40)[1]]          # a finished row whose listing is not visible (yet)
            + [_pair("r6", "k", 50)[0]])         # completed run that listed but never finished: useless
    complete = frozenset({"r1", "r2", "r3", "r6"})
    kept = inc.reduce_rows(rows, complete)
    assert _key(kept) == [("r3", "finished"), ("r3", "listed"), ("r4", "listed"), ("r5", "finished")]
    # the decision is the same before and after, and after any later rows are added
    later = _pair("r7", "k", 60, status="ok", version="gen:2")
    for extra in ([], later, [later[0]], [_pair("r5", "k", 40)[0]]):
        a, b = inc.latest(rows + extra, complete), inc.latest(kept + extra, complete)
        assert a == b
    # compacting twice changes nothing; duplicates (a reader seeing both) change nothing
    assert _key(inc.reduce_rows(kept, complete)) == _key(kept)
    assert inc.latest(rows + kept, complete) == inc.latest(rows, complete)


def test_reduce_of_an_input_without_a_decision_keeps_only_unpaired_rows_of_unfinished_runs():
    only_listed = [_pair("r1", "k", 0)[0]]
    assert inc.reduce_rows(only_listed, frozenset({"r1"})) == []
    assert len(inc.reduce_rows(only_listed, frozenset())) == 1


# --- reading and committing on every store -------------------------------------------------------
@pytest.fixture
def private(request, tmp_path, monkeypatch):
    where = request.param
    if where == "local":
        yield str(tmp_path / "priv")
        return
    store = request.getfixturevalue(f"{where}_store")
    storage.reset_clients()
    monkeypatch.setattr(FileSystems, "_pipeline_options", PipelineOptions(store.beam_args()))
    if where == "gs":
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", store.proxy.url)
    store.proxy.reset()
    yield store.uri(store.new_bucket(), "priv").rstrip("/")
    storage.reset_clients()


def _write_part(private, run, rows):
    uri = inc.part_name(inc.records_dir(private, run))
    storage.write_bytes(uri, inc.to_parquet_bytes(rows))
    return uri


def _compact(private, run, complete):
    """What an incremental run that compacts does: plan, reduced parts (the pipeline), commit."""
    sel = inc.select(private)
    rows = [r for u in sel.files for r in inc.from_parquet_bytes(b"".join(storage.iter_chunks(u)))]
    by_key = {}
    for r in rows:
        by_key.setdefault(r["input_key"], []).append(r)
    d = inc.compaction_dir(private, run)
    storage.write_bytes(f"{d}/{inc.PLAN}", inc.compaction_plan(private, run, sel))
    reduced = [r for recs in by_key.values() for r in inc.reduce_rows(recs, complete)]
    storage.write_bytes(inc.part_name(d), inc.to_parquet_bytes(reduced))
    return sel


def _read_all(private, files):
    fn = _ReadRecordsFn(private)
    fn.setup()
    return [row for u in files for _, row in fn.process(u)]


def _decisions(rows, complete):
    by_key = {}
    for r in rows:
        by_key.setdefault(r["input_key"], []).append(r)
    return {k: inc.latest(v, complete) for k, v in by_key.items()}


@pytest.mark.parametrize("private", ["local", "s3", "gs"], indirect=True)
def test_compaction_commit_and_readers_on_every_side_of_it(private):
    complete = frozenset({"r1", "r2"})
    parts = [_write_part(private, "r1", _pair("r1", "a", 0) + _pair("r1", "b", 0)),
             _write_part(private, "r1", _pair("r1", "c", 2)),
             _write_part(private, "r2", _pair("r2", "a", 10))]
    want = _decisions(_read_all(private, parts), complete)
    assert set(want) == {"a", "b", "c"} and want["a"].run_id == "r2"

    early = inc.select(private)                      # a reader lists before the compaction...
    assert sorted(early.files) == sorted(parts)
    sel = _compact(private, "r3", complete)
    assert sorted(sel.replaces) == sorted(parts)
    # ... written but not committed: readers ignore the compaction and read the parts
    mid = inc.select(private)
    assert sorted(mid.files) == sorted(parts) and not mid.markers
    assert _decisions(_read_all(private, mid.files), complete) == want

    result = inc.commit_compaction(private, "r3")
    assert result == {"files_replaced": 3, "compactions_superseded": 0}
    after = inc.select(private)
    assert len(after.files) == 1 and "/compact-r3/" in after.files[0] and not after.leftovers
    assert _decisions(_read_all(private, after.files), complete) == want
    # the early reader's files are gone: it falls back to the committed compaction
    assert _decisions(_read_all(private, early.files), complete) == want
    assert inc.commit_compaction(private, "r3") is None  # committed: nothing left to do

    # a newer run, then a second compaction superseding the first
    _write_part(private, "r4", _pair("r4", "d", 30))
    complete = complete | {"r4"}
    want = _decisions(_read_all(private, inc.select(private).files), complete)
    _compact(private, "r5", complete)
    assert inc.commit_compaction(private, "r5") == {"files_replaced": 2, "compactions_superseded": 1}
    final = inc.select(private)
    assert len(final.files) == 1 and "/compact-r5/" in final.files[0] and len(final.markers) == 1
    assert _decisions(_read_all(private, final.files), complete) == want
    names = {i.uri.rsplit("/records/", 1)[1] for i in storage.iter_objects(f"{inc.records_root(private)}/**")}
    assert all(n.startswith("compact-r5/") for n in names), names


@pytest.mark.parametrize("private", ["local"], indirect=True)
def test_a_commit_killed_before_its_deletions_leaves_readers_consistent(private):
    complete = frozenset({"r1"})
    part = _write_part(private, "r1", _pair("r1", "a", 0))
    want = _decisions(_read_all(private, [part]), complete)
    _compact(private, "r2", complete)
    # commit point written, the killed launcher deleted nothing
    d = inc.compaction_dir(private, "r2")
    plan = json.loads(b"".join(storage.iter_chunks(f"{d}/{inc.PLAN}")))
    storage.write_bytes(f"{d}/{inc.REPLACES}", json.dumps({"run_id": "r2", "replaces": plan["replaces"]}).encode())
    sel = inc.select(private)
    assert sel.leftovers == [part] and all("/compact-r2/" in f for f in sel.files)
    assert _decisions(_read_all(private, sel.files), complete) == want
    # the next compaction replaces the leftover too and removes the old marker
    _compact(private, "r3", complete)
    inc.commit_compaction(private, "r3")
    sel = inc.select(private)
    assert not sel.leftovers and all("/compact-r3/" in f for f in sel.files)
    assert not storage.exists(part) and not storage.exists(f"{d}/{inc.REPLACES}")
    assert _decisions(_read_all(private, sel.files), complete) == want


@pytest.mark.parametrize("private", ["local"], indirect=True)
def test_uncommitted_compactions_of_stopped_runs_are_removed_when_old(private):
    _write_part(private, "r1", _pair("r1", "a", 0))
    _compact(private, "r2", frozenset({"r1"}))          # never committed (run killed)
    d = inc.compaction_dir(private, "r2")
    import time
    assert inc.remove_uncommitted_compactions(private, stale_after=3600) == 0          # recent
    assert inc.remove_uncommitted_compactions(private, keep_runs={"r2"}, now=time.time() + 30000) == 0
    assert inc.remove_uncommitted_compactions(private, now=time.time() + 30000, dry_run=True) == 2
    assert inc.remove_uncommitted_compactions(private, now=time.time() + 30000) == 2
    assert not list(storage.iter_objects(f"{d}/*"))
    assert len(inc.select(private).files) == 1
