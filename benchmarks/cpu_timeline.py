#!/usr/bin/env python
"""Where the CPUs go during one command: a per-process CPU timeline of its process tree,
and the machine's split (user, system, idle, iowait, steal) over the whole run.

Every ``--interval`` seconds it prints one line: seconds since start, then for every
process of the tree ``{role}{pid % 1000}:{CPUs used in the interval}``, where the role is
``M`` for the command itself, ``W`` for a Beam SDK worker and ``o`` for anything else.
At the end it prints the machine's ``/proc/stat`` split over the run and the processes
(of the whole machine) that used the most CPU while it ran.

Usage (what the Session 7 section of RESULTS.md ran)::

    python benchmarks/cpu_timeline.py -- dicom-deid run --input 'CORPUS/**' --output OUT \\
        --private PRIV --key KEY --no-progress --direct_num_workers=2

The command's own output is discarded. Reading ``/proc`` twice a second costs this
process a few per cent of one CPU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")
STAT_NAMES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def _stat(pid: int):
    """(command name, parent pid, CPU ticks) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    name = text[text.index("(") + 1:text.rindex(")")]
    fields = text.rsplit(")", 1)[1].split()
    return name, int(fields[1]), int(fields[11]) + int(fields[12])


def processes() -> dict:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            s = _stat(int(d))
            if s is not None:
                out[int(d)] = s
    return out


def tree(root: int, procs: dict) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack += children.get(pid, [])
    return out


def machine_split() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:len(STAT_NAMES) + 1]]


def role(pid: int, root: int) -> str:
    if pid == root:
        return "M"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
            return "W" if b"sdk_worker_main" in cmd or b"dicom_deid.worker" in cmd else "o"
    except OSError:
        return "o"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        ap.error("no command")
    start_procs, start_split, t0 = processes(), machine_split(), time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last: dict[int, int] = {}
    roles: dict[int, str] = {}
    seen: dict[int, tuple] = {}
    while proc.poll() is None:
        time.sleep(a.interval)
        procs = processes()
        seen.update(procs)
        cells = []
        for pid in tree(proc.pid, procs):
            ticks = procs[pid][2]
            used = (ticks - last.get(pid, 0)) / TICK / a.interval  # every one started after t0
            last[pid] = ticks
            roles.setdefault(pid, role(pid, proc.pid))
            cells.append(f"{roles[pid]}{pid % 1000}:{used:.2f}")
        print(f"{time.monotonic() - t0:6.1f} " + " ".join(cells), flush=True)
    seen.update(processes())
    wall = time.monotonic() - t0
    split = [b - a_ for a_, b in zip(start_split, machine_split())]
    total = sum(split) or 1
    print(f"wall {wall:.1f} s, exit {proc.returncode}")
    print("machine: " + ", ".join(f"{n} {v / total:.3f}" for n, v in zip(STAT_NAMES, split)))
    used = sorted(((ticks - start_procs.get(pid, (None, None, 0))[2]) / TICK, name, pid)
                  for pid, (name, _, ticks) in seen.items())
    for cpu_s, name, pid in reversed(used[-a.top:]):
        print(f"  {cpu_s:7.2f} CPU s  {name} ({pid})")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
