"""Staging left by stopped runs: leases, ``housekeeping.judge``/``collect`` on a local disk
and on the real S3/GCS servers, ``dicom-deid gc``, and a live run whose staging must survive
a collection running beside it. (A run killed with SIGKILL and cleaned up by the next run is
in ``test_resume.py``.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from dicom_deid import housekeeping as hk
from dicom_deid import sample, storage
from tests.conftest import write_key
from tests.storage import servers
from tests.storage.conftest import base_env

HOUR = 3600.0


def _dead_pid() -> tuple[int, int]:
    """PID and start time of a process that has exited (and was reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    start = None
    for _ in range(100):
        start = hk._pid_start(p.pid)
        if start is not None:
            break
    p.wait()
    return p.pid, start or 1


def _run(lease=None, lease_mtime=None, newest=None) -> hk.StagingRun:
    return hk.StagingRun("r", "x", objects=1, newest=newest, lease=lease, lease_mtime=lease_mtime)


# --- judging ---------------------------------------------------------------------------------------
def test_same_machine_live_process_is_live_however_old_its_heartbeat():
    lease = dict(hk.identity(), written=0.0, interval=60)
    assert hk.judge(_run(lease, lease_mtime=0.0), stale_after=1.0) == "live:process_running"


def test_same_machine_gone_process_is_stopped_at_once():
    pid, start = _dead_pid()
    lease = dict(hk.identity(), pid=pid, pid_start=start, written=time.time(), interval=60)
    assert hk.judge(_run(lease, lease_mtime=time.time()), stale_after=HOUR) == "stopped:process_gone"
    # a recycled PID (another process start time) is not the launcher either
    lease = dict(hk.identity(), pid=os.getpid(), pid_start=-5, written=time.time())
    assert hk.judge(_run(lease, lease_mtime=time.time()), stale_after=HOUR) == "stopped:process_gone"


def test_another_machine_is_judged_by_the_lease_age():
    now = 1_000_000.0
    other = {"host": "elsewhere", "boot_id": "b", "pid_ns": "pid:[1]", "pid": 1, "interval": 60}
    fresh = dict(other, written=now - 600)
    old = dict(other, written=now - 2 * HOUR)
    assert hk.judge(_run(fresh, lease_mtime=now - 600), HOUR, now) == "live:lease_fresh"
    assert hk.judge(_run(old, lease_mtime=now - 2 * HOUR), HOUR, now) == "stopped:lease_expired"
    # the newer of the writer's clock and the store's clock counts (a skewed writer is safe)
    assert hk.judge(_run(old, lease_mtime=now - 60), HOUR, now) == "live:lease_fresh"
    # never sooner than three of that run's own heartbeats, whatever --stale-after says
    slow = dict(other, written=now - 600, interval=300)
    assert hk.judge(_run(slow, lease_mtime=now - 600), 1.0, now) == "live:lease_fresh"
    # a lease being rewritten (unreadable) is judged by the store's time alone
    assert hk.judge(_run(None, lease_mtime=now - 10), HOUR, now) == "live:lease_fresh"


def test_staging_without_a_lease_is_judged_by_its_newest_object():
    now = 1_000_000.0
    assert hk.judge(_run(newest=now - 2 * HOUR), HOUR, now) == "stopped:no_lease_old"
    assert hk.judge(_run(newest=now - 60), HOUR, now) == "live:no_lease_recent"
    assert hk.judge(_run(newest=None), HOUR, now) == "live:unknown_age"


def test_durations():
    assert [hk.parse_duration(t) for t in ("90", "90s", "15m", "6h", "2d")] == [90, 90, 900, 21600, 172800]
    with pytest.raises(ValueError):
        hk.parse_duration("soon")


# --- collecting on every store ---------------------------------------------------------------------
def _lay_out(put, out: str, priv: str, live_lease: dict, dead_lease: dict):
    """Two runs' staging (one live, one stopped), sink temp files of the stopped one, and a
    published object and manifest file that must never be touched."""
    put(f"{out}/.staging/run-live/_lease.json", json.dumps(live_lease).encode())
    put(f"{out}/.staging/run-live/k1.dcm", b"staged-live")
    put(f"{out}/.staging/run-dead/_lease.json", json.dumps(dead_lease).encode())
    put(f"{out}/.staging/run-dead/k2.dcm", b"staged-dead")
    put(f"{out}/.staging/run-dead/k3.dcm", b"staged-dead")
    put(f"{out}/manifest/run-dead/beam-temp-part-0123/abc.part.parquet", b"partial")
    put(f"{out}/manifest/run-done/part-00000-of-00001.parquet", b"published manifest")
    put(f"{priv}/linkage/run-dead/beam-temp-part-0456/def.part.parquet", b"partial")
    put(f"{out}/P1/S/S/o.dcm", b"published object")


def _names(prefix: str) -> set:
    return {i.uri[len(prefix) + 1:] for i in storage.iter_objects(f"{prefix}/**")}


@pytest.fixture
def point_at(monkeypatch):
    def use(store):
        servers.point_storage_at(store, monkeypatch)
    yield use
    storage.reset_clients()


@pytest.mark.parametrize("where", ["local", "s3", "gs"])
def test_collect_removes_a_stopped_runs_leftovers_only(where, request, tmp_path, point_at):
    now = time.time()
    other = {"host": "elsewhere", "boot_id": "b", "pid_ns": "pid:[1]", "pid": 1, "interval": 60}
    if where == "local":
        out, priv = str(tmp_path / "out"), str(tmp_path / "priv")
    else:
        store = request.getfixturevalue(f"{where}_store")
        point_at(store)
        out, priv = store.uri(store.new_bucket(), "o").rstrip("/"), store.uri(store.new_bucket(), "p").rstrip("/")
    later = now + 2 * HOUR  # judged two hours from now; the live run kept beating until then
    _lay_out(lambda u, d: storage.write_bytes(u, d), out, priv,
             live_lease=dict(other, run_id="live", written=later),
             dead_lease=dict(other, run_id="dead", written=now - 3 * HOUR))
    # now, the store's clock says the dead lease was just written: not stale yet
    rep = hk.collect(out, priv, stale_after=HOUR, now=now + 60)
    assert rep["runs_stopped"] == [] and sorted(rep["runs_live"]) == ["dead", "live"]
    dry = hk.collect(out, priv, stale_after=HOUR, dry_run=True, now=later)
    assert dry["runs_stopped"] == ["dead"] and dry["runs_live"] == ["live"]
    assert ".staging/run-dead/k2.dcm" in _names(out)  # a dry run removes nothing
    rep = hk.collect(out, priv, stale_after=HOUR, now=later)
    assert rep["runs_stopped"] == ["dead"] and rep["staged_objects_removed"] == 3
    assert rep["sink_temp_objects_removed"] == 2
    assert _names(out) == {".staging/run-live/_lease.json", ".staging/run-live/k1.dcm",
                           "manifest/run-done/part-00000-of-00001.parquet", "P1/S/S/o.dcm"}
    assert _names(priv) == set()


# --- the CLI and a live run ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("gc")
    s = sample.generate(root / "in", n_files=6, n_patients=2, seed=51)
    return {"root": root, "sample": s, "key": write_key(root / "k.hex", "5e" * 32)}


def test_gc_never_touches_a_live_runs_staging(small_world, tmp_path):
    """A collection with --stale-after 0s beside a running run: the run's lease names a live
    process on this machine, so its staging stays and the run completes."""
    out, priv = tmp_path / "out", tmp_path / "priv"
    env = base_env()
    env["DICOM_DEID_LEASE_HEARTBEAT"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "dicom_deid.cli", "run", "--input",
                             f"{small_world['root']}/in/**", "--output", str(out), "--private", str(priv),
                             "--key", str(small_world["key"]), "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        leases = []
        while time.monotonic() < deadline and proc.poll() is None and not leases:
            leases = list((out / ".staging").glob("run-*/_lease.json"))
            time.sleep(0.05)
        assert leases, "the run never wrote its lease"
        gc = subprocess.run([sys.executable, "-m", "dicom_deid.cli", "gc", "--output", str(out),
                             "--private", str(priv), "--stale-after", "0s"],
                            env=base_env(), capture_output=True, text=True, timeout=120)
        assert gc.returncode == 0, gc.stderr[-3000:]
        assert "0 stopped run(s); 1 live run(s) left alone" in gc.stdout, gc.stdout
        out_text, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(next((out / "summaries").glob("*.json")).read_text())
    assert summary["inputs"] == 6 and "failed" not in summary["by_status"], summary
    assert not (out / ".staging").exists()  # its own staging went at its end


def test_gc_cli_removes_a_stopped_runs_staging_and_says_only_run_ids(small_world, tmp_path):
    out = tmp_path / "out"
    pid, start = _dead_pid()
    lease = dict(hk.identity(), pid=pid, pid_start=start, run_id="20260101T000000Z-abcdef",
                 written=time.time(), interval=60)
    stage = out / ".staging" / "run-20260101T000000Z-abcdef"
    stage.mkdir(parents=True)
    (stage / "_lease.json").write_text(json.dumps(lease))
    planted = small_world["sample"].files[0].name
    (stage / f"{planted}.dcm").write_bytes(b"x")
    proc = subprocess.run([sys.executable, "-m", "dicom_deid.cli", "gc", "--output", str(out)],
                          env=base_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 stopped run(s) 20260101T000000Z-abcdef" in proc.stdout and "removed 2 staged" in proc.stdout
    assert planted not in proc.stdout + proc.stderr
    assert not stage.exists()
    bad = subprocess.run([sys.executable, "-m", "dicom_deid.cli", "gc", "--output", str(out), "--stale-after", "soon"],
                         env=base_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--stale-after" in bad.stderr

