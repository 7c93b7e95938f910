"""A real standalone Flink cluster on 127.0.0.1 for the session (``scripts/flink-local.sh``).

The script fetches and caches Flink (PyPI artifacts) and Beam's Flink job server (assembled
from Maven Central) under ``~/.cache/dicom-deid/flink`` on first use; each test session runs
its own cluster on free ports with its own state directory, and stops exactly that cluster.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "flink-local.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, state_dir):
        self.state = Path(state_dir)
        self.env = dict(os.environ, FLINK_LOCAL_STATE=str(state_dir), PYTHON=sys.executable,
                        FLINK_REST_PORT=str(free_port()), FLINK_RPC_PORT=str(free_port()),
                        FLINK_WORKER_POOL_PORT=str(free_port()))
        self.master = self.jar = self.boot = self.worker_pool = None

    def script(self, *args, timeout=900) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def start(self):
        t0 = time.monotonic()
        r = self.script("start")
        assert r.returncode == 0, f"flink-local.sh start failed:\n{r.stderr[-4000:]}"
        out = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
        self.master, self.jar = out["FLINK_MASTER"], out["FLINK_JOB_SERVER_JAR"]
        # PROCESS / EXTERNAL: Beam's SDK boot program (built with the Go toolchain) and the
        # worker pool next to the TaskManager; absent where no `go` could build the boot
        self.boot, self.worker_pool = out.get("BEAM_SDK_BOOT"), out.get("BEAM_WORKER_POOL")
        self.start_seconds = time.monotonic() - t0
        return self

    def rest(self, path: str):
        import json
        import urllib.request
        with urllib.request.urlopen(f"http://{self.master}{path}", timeout=5) as r:
            return json.load(r)

    def stop(self):
        return self.script("stop", timeout=120)

    def sdk_boots(self) -> list[str]:
        """Lines of the boot wrapper's log: one 'start' and one 'end' per SDK environment."""
        log = self.state / "log" / "sdk-boot.log"
        return log.read_text().splitlines() if log.exists() else []

    def leftover_processes(self) -> list[str]:
        """Processes whose command line or working directory is in this cluster's state
        directory (JobManager, TaskManager, worker pool, SDK boots and their SDK workers)."""
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
            if str(self.state) in cmd or cwd.startswith(str(self.state)):
                found.append(f"{pid} {cmd[:200]}")
        return found


@pytest.fixture(scope="session")
def flink_cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("flink-state"))
    try:
        yield cluster.start()
    finally:
        r = cluster.stop()
        assert r.returncode == 0, r.stderr[-2000:]
        assert cluster.leftover_processes() == []
