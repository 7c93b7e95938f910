#!/usr/bin/env bash
# A standalone Apache Flink cluster on 127.0.0.1 for running dicom-deid with Beam's FlinkRunner,
# built from registry artifacts only, plus Beam's Flink job server.
#
#   scripts/flink-local.sh start     fetch (first use, cached) and start; prints
#                                    FLINK_MASTER=host:port and FLINK_JOB_SERVER_JAR=path
#   scripts/flink-local.sh stop      stop the processes this script started (pid files), nothing else
#   scripts/flink-local.sh status    running or not, with the REST address
#   scripts/flink-local.sh fetch     only fetch/build the cached distribution and job server
#   scripts/flink-local.sh kill-taskmanager | start-taskmanager    failure injection (tests)
#
# Where things come from (all cached under $DICOM_DEID_CACHE, default ~/.cache/dicom-deid/flink):
#   - Flink: the PyPI artifacts apache-flink (pyflink/bin, pyflink/conf) and apache-flink-libraries
#     (deps/lib, deps/bin/bash-java-utils.jar), fetched with `pip download --no-deps` and unpacked
#     into one FLINK_HOME. Nothing is installed into any Python environment (PyFlink pins an
#     older apache-beam than ours).
#   - Beam's Flink job server: the prebuilt shaded jar beam-runners-flink-<flink>-job-server is
#     not served by Maven Central for any Beam/Flink version this machine can reach, so the job
#     server is assembled from the artifacts that are served: Maven resolves
#     org.apache.beam:beam-runners-flink-1.19:2.62.0 (it contains FlinkJobServerDriver) with its
#     runtime dependencies into lib/, and a small launcher jar whose manifest names the main
#     class, the class path and the Java 17 module opens makes it `java -jar`-runnable, which is
#     what Beam's Python FlinkRunner (--flink_job_server_jar) runs.
#   Hence Flink 1.19 (the newest Flink whose Beam runner is served) and `--flink_version 1.19`.
#   - Beam's Python SDK harness boot program (what /opt/apache/beam/boot is in Beam's SDK
#     containers), for the PROCESS and EXTERNAL worker environments: built once with
#     `go install github.com/apache/beam/sdks/v2/python/container@v<apache-beam version of $PYTHON>`
#     from the Go module proxy (needs `go`; ~30 s). A wrapper in the state directory runs it with
#     $PYTHON's bin/ first on PATH and RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT=1 (no per-worker venv):
#     the boot fetches the pipeline options from the runner's provision service, retrieves the
#     staged artifacts and starts `python -m apache_beam.runners.worker.sdk_worker_main`.
#
# Worker environments (`start` prints a line for each):
#   LOOPBACK  nothing to start; the SDK workers are threads of the launching process.
#   PROCESS   --environment_type PROCESS --environment_config '{"command": "<BEAM_SDK_BOOT>"}':
#             the TaskManager starts the boot itself (one SDK process per environment; with
#             --sdk_worker_parallelism N, N of them per TaskManager).
#   EXTERNAL  --environment_type EXTERNAL --environment_config <BEAM_WORKER_POOL>: `start` also runs
#             Beam's worker pool (apache_beam.runners.worker.worker_pool_main's servicer, bound to
#             127.0.0.1 only) next to the TaskManager; it starts one boot, hence one SDK worker
#             process, per environment the runner asks for. FLINK_WORKER_POOL=0 skips it.
#
# Settings (environment): FLINK_LOCAL_STATE (pid files, config, logs; default $CACHE/run),
# FLINK_REST_PORT (8081), FLINK_RPC_PORT (6123), FLINK_SLOTS (2), FLINK_TM_MEMORY (3072m),
# FLINK_JM_MEMORY (1024m), FLINK_RESTART_ATTEMPTS (10; a lost TaskManager fails
# several regions at once, which the exponential-delay strategy counts as one attempt), FLINK_START_TIMEOUT (90 s),
# FLINK_WORKER_POOL (1: start the EXTERNAL worker pool), FLINK_WORKER_POOL_PORT (50000),
# PYTHON (python3; must be the Python that has apache-beam and dicom-deid installed: the SDK
# workers of PROCESS/EXTERNAL run with it).
set -euo pipefail

FLINK_VERSION="${FLINK_LOCAL_VERSION:-1.19.3}"
BEAM_JOB_SERVER_VERSION="${BEAM_JOB_SERVER_VERSION:-2.62.0}"
BEAM_FLINK_ARTIFACT="beam-runners-flink-1.19"
CACHE="${DICOM_DEID_CACHE:-$HOME/.cache/dicom-deid}/flink"
FLINK_HOME="$CACHE/flink-$FLINK_VERSION"
JOB_SERVER_DIR="$CACHE/beam-flink-job-server-$BEAM_JOB_SERVER_VERSION"
JOB_SERVER_JAR="$JOB_SERVER_DIR/beam-runners-flink-1.19-job-server-$BEAM_JOB_SERVER_VERSION.jar"
STATE="${FLINK_LOCAL_STATE:-$CACHE/run}"
HOST=127.0.0.1
REST_PORT="${FLINK_REST_PORT:-8081}"
RPC_PORT="${FLINK_RPC_PORT:-6123}"
SLOTS="${FLINK_SLOTS:-2}"
TM_MEMORY="${FLINK_TM_MEMORY:-3072m}"
JM_MEMORY="${FLINK_JM_MEMORY:-1024m}"
RESTART_ATTEMPTS="${FLINK_RESTART_ATTEMPTS:-10}"
START_TIMEOUT="${FLINK_START_TIMEOUT:-90}"
PY="${PYTHON:-python3}"
IDENT=dicomdeid
WORKER_POOL="${FLINK_WORKER_POOL:-1}"
WORKER_POOL_PORT="${FLINK_WORKER_POOL_PORT:-50000}"
BOOT_WRAPPER="$STATE/beam-sdk-boot"

log() { echo "flink-local: $*" >&2; }

# a running cluster's ports, remembered by start, so status/stop need no settings
if [ -z "${FLINK_REST_PORT:-}" ] && [ -f "$STATE/endpoint" ]; then
  REST_PORT="$(sed -n 1p "$STATE/endpoint")"
fi
if [ -z "${FLINK_WORKER_POOL_PORT:-}" ] && [ -f "$STATE/worker-pool-endpoint" ]; then
  WORKER_POOL_PORT="$(sed -n 1p "$STATE/worker-pool-endpoint")"
fi

fetch_flink() {
  [ -x "$FLINK_HOME/bin/jobmanager.sh" ] && [ -f "$FLINK_HOME/lib/flink-dist-$FLINK_VERSION.jar" ] && return 0
  log "fetching Flink $FLINK_VERSION from PyPI (apache-flink, apache-flink-libraries; ~230 MB, once)"
  local dl="$CACHE/downloads/flink-$FLINK_VERSION" tmp="$FLINK_HOME.tmp.$$"
  mkdir -p "$dl"
  # the wheel only for its bin/ and conf/ (any CPython wheel has them); the libraries are an sdist
  "$PY" -m pip download --quiet --no-deps --dest "$dl" --only-binary=:all: --implementation cp \
    --python-version 3.11 --platform manylinux2014_x86_64 "apache-flink==$FLINK_VERSION" >&2
  "$PY" -m pip download --quiet --no-deps --no-build-isolation --dest "$dl" \
    "apache-flink-libraries==$FLINK_VERSION" >&2
  rm -rf "$tmp" && mkdir -p "$tmp/unpack" "$tmp/home/log"
  "$PY" - "$dl" "$tmp/unpack" <<'EOF'
import glob, sys, tarfile, zipfile
dl, dest = sys.argv[1], sys.argv[2]
whl = glob.glob(f"{dl}/apache_flink-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    z.extractall(dest, [n for n in z.namelist() if n.startswith(("pyflink/bin/", "pyflink/conf/"))])
sdist = glob.glob(f"{dl}/apache-flink-libraries-*.tar.gz")[0]
with tarfile.open(sdist) as t:
    t.extractall(dest, [m for m in t.getmembers() if "/deps/lib/" in m.name or "/deps/bin/" in m.name
                        or "/deps/opt/" in m.name or "/deps/plugins/" in m.name],
                 filter="data")
EOF
  local libs; libs="$(echo "$tmp"/unpack/apache-flink-libraries-*/deps)"
  mv "$tmp/unpack/pyflink/bin" "$tmp/home/bin"
  mv "$tmp/unpack/pyflink/conf" "$tmp/home/conf"
  mv "$libs/lib" "$tmp/home/lib"
  mv "$libs/opt" "$tmp/home/opt"
  mv "$libs/plugins" "$tmp/home/plugins"
  cp "$libs/bin/bash-java-utils.jar" "$tmp/home/bin/"
  chmod +x "$tmp/home/bin/"*.sh "$tmp/home/bin/flink"
  rm -rf "$FLINK_HOME" && mv "$tmp/home" "$FLINK_HOME" && rm -rf "$tmp"
}

fetch_job_server() {
  [ -f "$JOB_SERVER_JAR" ] && return 0
  log "assembling Beam's Flink job server $BEAM_JOB_SERVER_VERSION from Maven Central (once)"
  local tmp="$JOB_SERVER_DIR.tmp.$$"
  rm -rf "$tmp" && mkdir -p "$tmp/build"
  cat > "$tmp/build/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.dicom-deid</groupId>
  <artifactId>flink-job-server-deps</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.beam</groupId>
      <artifactId>$BEAM_FLINK_ARTIFACT</artifactId>
      <version>$BEAM_JOB_SERVER_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-simple</artifactId>
      <version>1.7.30</version>
    </dependency>
  </dependencies>
</project>
EOF
  (cd "$tmp/build" && mvn -q -B dependency:copy-dependencies -DincludeScope=runtime \
      -DoutputDirectory="$tmp/lib" >&2)
  local cp="" f
  for f in "$tmp"/lib/*.jar; do cp="$cp lib/$(basename "$f")"; done
  "$PY" - "$tmp/build/MANIFEST.MF" "$cp" <<'EOF'
import sys
path, cp = sys.argv[1], sys.argv[2].split()
def wrap(line):  # manifest lines are at most 72 bytes; continuation lines start with a space
    out = [line[:70]]
    line = line[70:]
    while line:
        out.append(" " + line[:69]); line = line[69:]
    return "\n".join(out)
opens = ("java.base/java.lang java.base/java.net java.base/java.io java.base/java.nio "
         "java.base/sun.nio.ch java.base/java.lang.reflect java.base/java.text java.base/java.time "
         "java.base/java.util java.base/java.util.concurrent java.base/java.util.concurrent.atomic "
         "java.base/java.util.concurrent.locks")
lines = ["Manifest-Version: 1.0",
         "Main-Class: org.apache.beam.runners.flink.FlinkJobServerDriver",
         "Class-Path: " + " ".join(cp),
         "Add-Opens: " + opens,
         "Add-Exports: java.base/sun.net.util java.rmi/sun.rmi.registry java.security.jgss/sun.security.krb5"]
open(path, "w").write("\n".join(wrap(l) for l in lines) + "\n")
EOF
  jar --create --file "$tmp/$(basename "$JOB_SERVER_JAR")" --manifest "$tmp/build/MANIFEST.MF"
  rm -rf "$tmp/build" "$JOB_SERVER_DIR" && mv "$tmp" "$JOB_SERVER_DIR"
}

beam_sdk_version() {
  "$PY" -c 'import importlib.metadata as m; print(m.version("apache-beam"))'
}

boot_path() { echo "$CACHE/beam-sdk-boot-$1/boot"; }

fetch_boot() {  # Beam's Python SDK harness boot program, built from the Go module proxy (once)
  local v; v="$(beam_sdk_version)" || { log "no apache-beam in $PY (set PYTHON)"; return 1; }
  local boot; boot="$(boot_path "$v")"
  [ -x "$boot" ] && return 0
  if ! command -v go >/dev/null 2>&1; then
    log "no 'go' on PATH: cannot build Beam's SDK boot program (PROCESS/EXTERNAL unavailable)"
    return 1
  fi
  log "building Beam's Python SDK boot program $v with the Go module proxy (once, ~30 s)"
  local tmp="$CACHE/beam-sdk-boot-$v.tmp.$$"
  rm -rf "$tmp" && mkdir -p "$tmp"
  # (called from `if`: set -e does not apply here, so every step is checked)
  if ! GOBIN="$tmp" GOFLAGS=-trimpath go install "github.com/apache/beam/sdks/v2/python/container@v$v" >&2 \
      || ! mv "$tmp/container" "$tmp/boot"; then
    log "could not build Beam's SDK boot program (PROCESS/EXTERNAL unavailable)"
    rm -rf "$tmp"
    return 1
  fi
  rm -rf "$(dirname "$boot")" && mv "$tmp" "$(dirname "$boot")" && [ -x "$boot" ]
}

write_boot_wrapper() {  # the command for PROCESS and the worker pool's container executable
  local boot pybin
  boot="$(boot_path "$(beam_sdk_version)")"
  pybin="$(dirname "$(command -v "$PY")")"
  mkdir -p "$STATE/sdk" "$STATE/log"
  cat > "$BOOT_WRAPPER.tmp" <<EOF
#!/usr/bin/env bash
# Beam Python SDK harness boot for PROCESS / EXTERNAL environments (written by flink-local.sh).
# The boot runs 'python' from PATH: this project's Python, without a per-worker venv. Each
# environment gets its own working and semi-persistent directory (pipeline_options.json, staged
# artifacts) under the state directory, removed when it ends; a --semi_persist_dir given by the
# runner comes later on the command line and wins. TERM/INT/HUP are passed on to the boot,
# which stops its SDK worker processes.
id=worker
for a in "\$@"; do case "\$a" in --id=*) id="\${a#--id=}" ;; esac; done
dir="$STATE/sdk/\${id//[^A-Za-z0-9_.-]/_}-\$\$"
mkdir -p "\$dir" && cd "\$dir" || exit 1
export PATH="$pybin:\$PATH" RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT=1
echo "\$(date -u +%FT%T.%3NZ) start id=\$id pid=\$\$" >> "$STATE/log/sdk-boot.log"
"$boot" --semi_persist_dir="\$dir" "\$@" &
child=\$!
trap 'kill -TERM "\$child" 2>/dev/null' TERM INT HUP
rc=0
while kill -0 "\$child" 2>/dev/null; do wait "\$child"; rc=\$?; done
cd / && rm -rf "\$dir"
echo "\$(date -u +%FT%T.%3NZ) end id=\$id pid=\$\$ rc=\$rc" >> "$STATE/log/sdk-boot.log"
exit "\$rc"
EOF
  chmod +x "$BOOT_WRAPPER.tmp" && mv "$BOOT_WRAPPER.tmp" "$BOOT_WRAPPER"
}

# Beam's worker pool servicer (as `python -m apache_beam.runners.worker.worker_pool_main`, which
# binds every interface) on 127.0.0.1 only, starting the boot wrapper per worker; on TERM it
# stops the SDK workers it started before it exits
WORKER_POOL_PY='
import logging, signal, sys, threading
import grpc
from apache_beam.portability.api import beam_fn_api_pb2_grpc
from apache_beam.runners.worker.worker_pool_main import (
    BeamFnExternalWorkerPoolServicer, kill_process_gracefully)
from apache_beam.utils import thread_pool_executor
host, port, boot = sys.argv[1], int(sys.argv[2]), sys.argv[3]
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
server = grpc.server(thread_pool_executor.shared_unbounded_instance(),
                     options=[("grpc.http2.max_pings_without_data", 0), ("grpc.http2.max_ping_strikes", 0)])
pool = BeamFnExternalWorkerPoolServicer(use_process=True, container_executable=boot)
beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(pool, server)
if not server.add_insecure_port(f"{host}:{port}"):
    sys.exit(f"worker pool: cannot bind {host}:{port}")
server.start()
logging.info("worker pool listening on %s:%s", host, port)
done = threading.Event()
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: done.set())
while not done.wait(1):
    pass
server.stop(0)
for proc in list(pool._worker_processes.values()):
    kill_process_gracefully(proc, timeout=8)
logging.info("worker pool stopped")
'

port_open() {
  "$PY" -c 'import socket, sys
s = socket.socket(); s.settimeout(1)
sys.exit(0 if s.connect_ex((sys.argv[1], int(sys.argv[2]))) == 0 else 1)' "$HOST" "$1"
}

worker_pool_pid() { [ -f "$STATE/pid/worker-pool.pid" ] && cat "$STATE/pid/worker-pool.pid" || true; }

worker_pool_alive() { local p; p="$(worker_pool_pid)"; [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }

start_worker_pool() {
  if worker_pool_alive && port_open "$WORKER_POOL_PORT"; then return 0; fi
  mkdir -p "$STATE/pid" "$STATE/log"
  echo "$WORKER_POOL_PORT" > "$STATE/worker-pool-endpoint"
  printf '%s' "$WORKER_POOL_PY" > "$STATE/worker-pool.py"
  (cd "$STATE" && exec setsid "$PY" "$STATE/worker-pool.py" "$HOST" "$WORKER_POOL_PORT" "$BOOT_WRAPPER" \
      >> "$STATE/log/worker-pool.log" 2>&1 < /dev/null) &
  echo $! > "$STATE/pid/worker-pool.pid"
  local t=0
  until port_open "$WORKER_POOL_PORT"; do
    sleep 0.5; t=$((t + 1))
    if ! worker_pool_alive || [ "$t" -ge 60 ]; then
      log "worker pool did not come up; log: $STATE/log/worker-pool.log"
      tail -n 20 "$STATE/log/worker-pool.log" >&2 || true
      return 1
    fi
  done
}

descendants() {  # pids of the processes below $1, recursively
  local c
  for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do echo "$c"; descendants "$c"; done
}

stop_worker_pool() {
  local p tree q
  p="$(worker_pool_pid)"
  if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then
    tree="$(descendants "$p")"   # boots and their SDK workers: the pool ends them itself first
    kill "$p" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$p" 2>/dev/null || true
    for q in $tree; do kill -9 "$q" 2>/dev/null || true; done
  fi
  rm -f "$STATE/pid/worker-pool.pid"
}

write_conf() {
  local conf="$STATE/conf"
  mkdir -p "$conf" "$STATE/log" "$STATE/tmp" "$STATE/pid"
  cp "$FLINK_HOME/conf/log4j.properties" "$FLINK_HOME/conf/log4j-console.properties" \
     "$FLINK_HOME/conf/log4j-cli.properties" "$conf/"
  echo "$HOST" > "$conf/workers"
  echo "$HOST:$REST_PORT" > "$conf/masters"
  # Java 17 needs these module opens (as in Flink's own config.yaml)
  local opens="--add-exports=java.base/sun.net.util=ALL-UNNAMED --add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED --add-exports=java.security.jgss/sun.security.krb5=ALL-UNNAMED --add-opens=java.base/java.lang=ALL-UNNAMED --add-opens=java.base/java.net=ALL-UNNAMED --add-opens=java.base/java.io=ALL-UNNAMED --add-opens=java.base/java.nio=ALL-UNNAMED --add-opens=java.base/sun.nio.ch=ALL-UNNAMED --add-opens=java.base/java.lang.reflect=ALL-UNNAMED --add-opens=java.base/java.text=ALL-UNNAMED --add-opens=java.base/java.time=ALL-UNNAMED --add-opens=java.base/java.util=ALL-UNNAMED --add-opens=java.base/java.util.concurrent=ALL-UNNAMED --add-opens=java.base/java.util.concurrent.atomic=ALL-UNNAMED --add-opens=java.base/java.util.concurrent.locks=ALL-UNNAMED"
  # sized for 2 cores / 24 GiB: the Python SDK workers run outside the TaskManager, so its JVM
  # stays small; 2 slots = one per core
  cat > "$conf/config.yaml" <<EOF
env:
  java:
    opts:
      all: $opens
jobmanager:
  bind-host: $HOST
  rpc:
    address: $HOST
    port: $RPC_PORT
  memory:
    process:
      size: $JM_MEMORY
  execution:
    failover-strategy: region
taskmanager:
  bind-host: $HOST
  host: $HOST
  numberOfTaskSlots: $SLOTS
  memory:
    process:
      size: $TM_MEMORY
  # batch exchanges use sort-shuffle, which reserves 512 network buffers per result partition
  # by default: with parallelism 2 the ~90 tasks of this pipeline ran out of the TaskManager's
  # 8,028 buffers ("Insufficient number of network buffers"); 64 is plenty at this size
  network:
    sort-shuffle:
      min-buffers: 64
parallelism:
  default: $SLOTS
rest:
  address: $HOST
  bind-address: $HOST
  port: $REST_PORT
blob:
  server:
    port: "0"
io:
  tmp:
    dirs: $STATE/tmp
heartbeat:
  interval: 2000
  timeout: 12000
restart-strategy:
  type: exponential-delay
  exponential-delay:
    initial-backoff: 1 s
    max-backoff: 10 s
    backoff-multiplier: 2.0
    reset-backoff-threshold: 5 min
    jitter-factor: 0.1
    attempts-before-reset-backoff: $RESTART_ATTEMPTS
EOF
}

flink_env() {
  export FLINK_CONF_DIR="$STATE/conf" FLINK_LOG_DIR="$STATE/log" FLINK_PID_DIR="$STATE/pid"
  export FLINK_HOME FLINK_IDENT_STRING="$IDENT"
}

rest_up() {
  "$PY" - "$HOST" "$REST_PORT" <<'EOF'
import json, sys, urllib.request
try:
    with urllib.request.urlopen(f"http://{sys.argv[1]}:{sys.argv[2]}/overview", timeout=2) as r:
        ov = json.load(r)
    sys.exit(0 if ov.get("taskmanagers", 0) >= 1 and ov.get("slots-total", 0) >= 1 else 1)
except Exception:
    sys.exit(1)
EOF
}

pids_of() {  # pids recorded by flink-daemon.sh in our own pid dir
  local f="$STATE/pid/flink-$IDENT-$1.pid"
  [ -f "$f" ] && cat "$f" || true
}

alive() { local p; for p in $(pids_of "$1"); do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }

cmd_start() {
  fetch_flink
  fetch_job_server
  local have_boot=0
  if fetch_boot; then have_boot=1; write_boot_wrapper; fi
  if alive standalonesession && rest_up; then
    log "already running"
  else
    write_conf
    echo "$REST_PORT" > "$STATE/endpoint"
    flink_env
    "$FLINK_HOME/bin/jobmanager.sh" start >&2
    "$FLINK_HOME/bin/taskmanager.sh" start >&2
    local t=0
    until rest_up; do
      sleep 1; t=$((t + 1))
      if [ "$t" -ge "$START_TIMEOUT" ]; then
        log "cluster did not come up within ${START_TIMEOUT}s; logs in $STATE/log"
        tail -n 30 "$STATE"/log/*.log >&2 || true
        cmd_stop || true
        exit 1
      fi
    done
    log "up in ${t}s (logs: $STATE/log)"
  fi
  if [ "$have_boot" = 1 ] && [ "$WORKER_POOL" = 1 ]; then
    start_worker_pool || { cmd_stop || true; exit 1; }
  fi
  echo "FLINK_MASTER=$HOST:$REST_PORT"
  echo "FLINK_JOB_SERVER_JAR=$JOB_SERVER_JAR"
  if [ "$have_boot" = 1 ]; then
    echo "BEAM_SDK_BOOT=$BOOT_WRAPPER"
    [ "$WORKER_POOL" = 1 ] && echo "BEAM_WORKER_POOL=$HOST:$WORKER_POOL_PORT"
  fi
  return 0
}

kill_recorded() {  # TERM then KILL the pids in one pid file; only ours
  local kind="$1" p pids
  pids="$(pids_of "$kind")"
  for p in $pids; do kill "$p" 2>/dev/null || true; done
  for _ in $(seq 1 30); do
    alive "$kind" || break
    sleep 0.5
  done
  for p in $pids; do kill -9 "$p" 2>/dev/null || true; done
  rm -f "$STATE/pid/flink-$IDENT-$kind.pid"
}

cmd_stop() {
  stop_worker_pool
  kill_recorded taskexecutor
  kill_recorded standalonesession
  rm -rf "$STATE/sdk"
  log "stopped"
}

cmd_status() {
  if alive standalonesession && rest_up; then
    echo "running: FLINK_MASTER=$HOST:$REST_PORT (jobmanager pid $(pids_of standalonesession | tr '\n' ' ')taskmanager pid $(pids_of taskexecutor | tr '\n' ' '))"
    if worker_pool_alive; then echo "worker pool: BEAM_WORKER_POOL=$HOST:$WORKER_POOL_PORT (pid $(worker_pool_pid))"; fi
  else
    echo "not running"
    return 3
  fi
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  fetch) fetch_flink; fetch_job_server; echo "FLINK_HOME=$FLINK_HOME"; echo "FLINK_JOB_SERVER_JAR=$JOB_SERVER_JAR"
         if fetch_boot; then echo "BEAM_SDK_BOOT_BINARY=$(boot_path "$(beam_sdk_version)")"; fi ;;
  kill-taskmanager) for p in $(pids_of taskexecutor); do kill -9 "$p" 2>/dev/null || true; done
                    rm -f "$STATE/pid/flink-$IDENT-taskexecutor.pid" ;;
  start-taskmanager) flink_env; "$FLINK_HOME/bin/taskmanager.sh" start >&2 ;;
  *) echo "usage: $0 start|stop|status|fetch|kill-taskmanager|start-taskmanager" >&2; exit 2 ;;
esac
