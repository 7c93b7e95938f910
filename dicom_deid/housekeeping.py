"""Housekeeping of what stopped runs leave behind: run leases and the garbage collector.

A run stages each object under ``{output}/.staging/run-{id}/`` before publishing it and
removes that folder when it ends. A run that is killed (SIGKILL, a lost machine) cannot, so
every run keeps a **lease** there while it works::

    {output}/.staging/run-{id}/_lease.json    {run_id, written, interval, host, boot_id, pid_ns, pid, pid_start}

The launcher rewrites it every ``interval`` seconds (:class:`RunLease`, default 60 s,
``DICOM_DEID_LEASE_HEARTBEAT``). :func:`collect` (run at the start of every run, and by
``dicom-deid gc``) removes the staging folder of a run only when that run is certainly gone:

* **same machine** (same host name, boot and PID namespace as the lease's writer): the
  launcher process is gone (its PID is not running, or runs a process started at another
  time). A live launcher is never collected, however old its heartbeat;
* **elsewhere** (another machine or container): the lease was not renewed for ``stale_after``
  (default 6 hours, ``DICOM_DEID_STALE_AFTER`` or ``gc --stale-after``), judged by the newer
  of the lease's own time and the store's modification time, and never sooner than three
  heartbeats of that run;
* a staging folder without a lease (left by a version before leases): when its newest
  object is older than ``stale_after``.

With a stopped run's staging it also removes the temporary parts the sinks left in that
run's manifest, linkage and dead-letter folders (``beam-temp-*``), which a reader of the
whole manifest folder would otherwise see, and (given the private prefix) an incremental
record compaction that run started but never committed. Published objects, manifests and
records are never touched. Nothing identifying is logged: run ids and counts only.

This module knows nothing of Beam.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
from typing import Optional

from . import storage

log = logging.getLogger("dicom_deid.housekeeping")

LEASE_NAME = "_lease.json"
#: seconds between two writes of a run's lease
HEARTBEAT_SECONDS = float(os.environ.get("DICOM_DEID_LEASE_HEARTBEAT", "60"))
#: a lease not renewed for this long belongs to a stopped run (unless judged on its machine)
DEFAULT_STALE_AFTER = float(os.environ.get("DICOM_DEID_STALE_AFTER", str(6 * 3600)))
#: never sooner than this many of the run's own heartbeats
MIN_MISSED_HEARTBEATS = 3


def staging_root(output: str) -> str:
    return f"{output.rstrip('/')}/.staging"


def lease_uri(output: str, run_id: str) -> str:
    return f"{staging_root(output)}/run-{run_id}/{LEASE_NAME}"


# --- who am I ---------------------------------------------------------------------------------
def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_start(pid: int) -> Optional[int]:
    """Start time of a process in clock ticks since boot (None: no such process)."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    try:
        return int(text.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _pid_ns() -> Optional[str]:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def identity() -> dict:
    """What lets a later process on the same machine tell whether this one still runs."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot_id": _read("/proc/sys/kernel/random/boot_id"),
            "pid_ns": _pid_ns(), "pid": pid, "pid_start": _pid_start(pid)}


def _same_machine(lease: dict) -> bool:
    me = identity()
    return all(lease.get(k) and lease.get(k) == me[k] for k in ("host", "boot_id", "pid_ns"))


def _process_alive(lease: dict) -> bool:
    try:
        pid = int(lease["pid"])
    except (KeyError, TypeError, ValueError):
        return True  # cannot tell: assume alive
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return False
    try:
        fields = text.rsplit(")", 1)[1].split()
        state, start = fields[0], int(fields[19])
    except (IndexError, ValueError):
        return True
    if state in ("Z", "X"):  # killed, not yet reaped by its parent
        return False
    return lease.get("pid_start") is None or start == lease.get("pid_start")


# --- the lease --------------------------------------------------------------------------------
class RunLease:
    """A run's heartbeat in its staging folder, rewritten by a daemon thread of the launcher
    while the run works (one small upload each time; removed with the staging folder)."""

    def __init__(self, output: str, run_id: str, interval: Optional[float] = None):
        self.uri = lease_uri(output, run_id)
        self.run_id = run_id
        self.interval = float(HEARTBEAT_SECONDS if interval is None else interval)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._ident = identity()

    def beat(self) -> None:
        body = dict(self._ident, run_id=self.run_id, written=time.time(), interval=self.interval)
        storage.write_bytes(self.uri, json.dumps(body, sort_keys=True).encode(),
                            content_type="application/json")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - a missed beat is retried at the next one
                log.warning("could not renew the lease of run %s", self.run_id)

    def start(self) -> "RunLease":
        self.beat()  # before any object is staged
        self._thread = threading.Thread(target=self._loop, name="run-lease", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# --- finding stopped runs ---------------------------------------------------------------------
@dataclasses.dataclass
class StagingRun:
    run_id: str
    prefix: str
    objects: int = 0
    newest: Optional[float] = None     # store mtime of the newest object
    lease: Optional[dict] = None
    lease_mtime: Optional[float] = None
    verdict: str = ""                  # live | stopped, and why (see :func:`judge`)


def staging_runs(output: str) -> list[StagingRun]:
    """Run folders under ``{output}/.staging/`` (streamed listing; one entry per run)."""
    root = staging_root(output)
    runs: dict[str, StagingRun] = {}
    for info in storage.iter_objects(f"{root}/**"):
        rel = info.uri[len(root) + 1:] if info.uri.startswith(root + "/") else ""
        folder, _, name = rel.partition("/")
        if not folder.startswith("run-") or not name:
            continue
        r = runs.get(folder)
        if r is None:
            r = runs[folder] = StagingRun(folder[len("run-"):], f"{root}/{folder}")
        r.objects += 1
        if info.mtime is not None and (r.newest is None or info.mtime > r.newest):
            r.newest = info.mtime
        if name == LEASE_NAME:
            r.lease_mtime = info.mtime
            try:
                r.lease = json.loads(b"".join(storage.iter_chunks(info.uri, info.size)).decode("utf-8"))
            except (storage.ObjectNotFound, ValueError, UnicodeDecodeError):
                r.lease = None  # being rewritten or gone: judged by age below
    return list(runs.values())


def judge(run: StagingRun, stale_after: float, now: Optional[float] = None) -> str:
    """``live:…`` or ``stopped:…`` for one staging folder (see the module docstring)."""
    now = time.time() if now is None else now
    lease = run.lease if isinstance(run.lease, dict) else None
    if lease is not None and _same_machine(lease):
        return "live:process_running" if _process_alive(lease) else "stopped:process_gone"
    if lease is not None or run.lease_mtime is not None:
        times = [t for t in ((lease or {}).get("written"), run.lease_mtime) if isinstance(t, (int, float))]
        if not times:
            return "live:unknown_age"
        try:
            interval = float((lease or {}).get("interval") or HEARTBEAT_SECONDS)
        except (TypeError, ValueError):
            interval = HEARTBEAT_SECONDS
        age = now - max(times)
        return "stopped:lease_expired" if age > max(stale_after, MIN_MISSED_HEARTBEATS * interval) \
            else "live:lease_fresh"
    if run.newest is None:
        return "live:unknown_age"
    return "stopped:no_lease_old" if now - run.newest > stale_after else "live:no_lease_recent"


def run_folders(output: str, private: Optional[str], run_id: str) -> list[str]:
    """Folders of one run where Beam's file sinks keep temporary files."""
    out = [f"{output.rstrip('/')}/manifest/run-{run_id}"]
    if private:
        out += [f"{private.rstrip('/')}/{k}/run-{run_id}" for k in ("linkage", "dead_letters")]
    return out


def remove_sink_temps(folders) -> int:
    """Delete ``beam-temp-*`` objects/folders directly inside the given folders."""
    n = 0
    for folder in folders:
        for info in storage.iter_objects(f"{folder.rstrip('/')}/beam-temp-*/**"):
            storage.delete(info.uri)
            n += 1
        for info in storage.iter_objects(f"{folder.rstrip('/')}/beam-temp-*"):
            storage.delete(info.uri)
            n += 1
        if storage.is_local(folder):  # empty local temp folders
            path = storage.local_path(folder)
            if os.path.isdir(path):
                for name in os.listdir(path):
                    full = os.path.join(path, name)
                    if name.startswith("beam-temp-") and os.path.isdir(full):
                        import shutil
                        shutil.rmtree(full, ignore_errors=True)
    return n


def collect(output: str, private: Optional[str] = None, stale_after: Optional[float] = None,
            dry_run: bool = False, exclude_run: Optional[str] = None, now: Optional[float] = None) -> dict:
    """Remove what stopped runs left under ``output`` (and ``private``); never a live run's.
    Returns counts and the run ids concerned (run ids are not identifying)."""
    stale_after = DEFAULT_STALE_AFTER if stale_after is None else float(stale_after)
    report = {"runs_live": [], "runs_stopped": [], "staged_objects_removed": 0,
              "sink_temp_objects_removed": 0, "uncommitted_compactions_removed": 0, "dry_run": dry_run}
    stopped = []
    for run in staging_runs(output):
        if run.run_id == exclude_run:
            continue
        run.verdict = judge(run, stale_after, now)
        (report["runs_stopped"] if run.verdict.startswith("stopped") else report["runs_live"]).append(run.run_id)
        if run.verdict.startswith("stopped"):
            stopped.append(run)
    for run in stopped:
        if dry_run:
            report["staged_objects_removed"] += run.objects
            continue
        report["staged_objects_removed"] += storage.delete_prefix(run.prefix)
        report["sink_temp_objects_removed"] += remove_sink_temps(run_folders(output, private, run.run_id))
    if private:
        from . import incremental
        live = set(report["runs_live"]) | ({exclude_run} if exclude_run else set())
        report["uncommitted_compactions_removed"] = incremental.remove_uncommitted_compactions(
            private, keep_runs=live, stale_after=stale_after, dry_run=dry_run, now=now)
    if storage.is_local(output) and not dry_run:  # drop an empty .staging folder
        try:
            os.rmdir(storage.local_path(staging_root(output)))
        except OSError:
            pass
    return report


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``6h``, ``2d`` -> seconds."""
    t = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    mult = units.get(t[-1:], None)
    num = t[:-1] if mult else t
    value = float(num) * (mult or 1)
    if value < 0:
        raise ValueError("negative duration")
    return value


def start_run(output: str, private: Optional[str], run_id: str, notify=None) -> RunLease:
    """At the start of a run: remove what stopped runs left (never fatal), then take this
    run's lease (its heartbeat runs until :meth:`RunLease.stop`)."""
    try:
        rep = collect(output, private, exclude_run=run_id)
        if notify is not None and (rep["runs_stopped"] or rep["uncommitted_compactions_removed"]):
            notify(f"note: removed what {len(rep['runs_stopped'])} stopped run(s) left: "
                   f"{rep['staged_objects_removed']} staged object(s), {rep['sink_temp_objects_removed']} "
                   f"temporary sink file(s), {rep['uncommitted_compactions_removed']} uncommitted "
                   f"record compaction file(s)")
    except Exception:  # noqa: BLE001 - housekeeping never stops a run
        log.warning("could not check for staging left by stopped runs")
    return RunLease(output, run_id).start()
