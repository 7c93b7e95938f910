"""Real local storage servers for the tests: moto (S3), a GCS emulator, and a small HTTP
proxy that injects faults (503 for a while, dropped connections, 403 on chosen objects,
latency). Every server listens on 127.0.0.1 on a free port and is stopped by its fixture.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# S3 test credentials: moto accepts anything; never real ones.
S3_KEY_ID, S3_SECRET, S3_REGION = "testing", "testing-secret", "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(port: int, proc: subprocess.Popen, path: str = "/", timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with code {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            c.getresponse().read()
            c.close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not start in time")


@contextlib.contextmanager
def _process(cmd, port, path="/", env=None, log_name="server"):
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"dicom-deid-{log_name}-{port}.log"), "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
        _wait_http(port, proc, path)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextlib.contextmanager
def moto_server():
    """``moto[server]`` on 127.0.0.1:<free port>; yields its endpoint URL."""
    port = free_port()
    with _process([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                  port, "/moto-api/", log_name="moto"):
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def gcs_emulator():
    """gcp-storage-emulator (PyPI, pinned in setup.py) on 127.0.0.1:<free port>, in memory;
    yields its base URL. Chosen over fake-gcs-server because it answers the JSON batch
    requests Beam's GcsIO sends for rename/delete (how WriteToParquet finalises its files);
    fake-gcs-server v1.56.1 rejects them ("not multi-part")."""
    port = free_port()
    cmd = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
           "--port", str(port), "--in-memory"]
    with _process(cmd, port, "/storage/v1/b", log_name="gcs-emulator"):
        yield f"http://127.0.0.1:{port}"


#: fake-gcs-server (Go), built from the Go module proxy when Go is present
FAKE_GCS_VERSION = "v1.56.1"
FAKE_GCS_BIN = Path(os.environ.get("DICOM_DEID_FAKE_GCS_BIN",
                                   Path.home() / ".cache" / "dicom-deid" / "fake-gcs-server" / FAKE_GCS_VERSION
                                   / "fake-gcs-server"))


def fake_gcs_binary(build: bool = True):
    """Path of fake-gcs-server, built once with ``go install`` into a cache folder, or None
    when Go is missing or the build fails (callers fall back to gcp-storage-emulator)."""
    if FAKE_GCS_BIN.is_file():
        return FAKE_GCS_BIN
    go = shutil.which("go")
    if not build or go is None:
        return None
    FAKE_GCS_BIN.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, GOBIN=str(FAKE_GCS_BIN.parent), GOFLAGS="-buildvcs=false")
    try:
        subprocess.run([go, "install", f"github.com/fsouza/fake-gcs-server@{FAKE_GCS_VERSION}"], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600, check=True)
    except (subprocess.SubprocessError, OSError):
        return None
    return FAKE_GCS_BIN if FAKE_GCS_BIN.is_file() else None


@contextlib.contextmanager
def fake_gcs_server(binary=None):
    """fake-gcs-server (in memory) on 127.0.0.1:<free port>; yields its base URL. Serves
    requests concurrently (gcp-storage-emulator handles one at a time). Its batch endpoint
    skips parts without a ``Content-ID`` header, which google-cloud-storage omits (GCS accepts
    them), so Beam's batched copy/delete needs :class:`FaultProxy` (``add_batch_ids``) in front."""
    binary = binary or fake_gcs_binary()
    if binary is None:
        raise RuntimeError("fake-gcs-server is not available (no Go toolchain?)")
    port = free_port()
    cmd = [str(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port),
           "-public-host", f"127.0.0.1:{port}", "-external-url", f"http://127.0.0.1:{port}", "-log-level", "error"]
    with _process(cmd, port, "/storage/v1/b", log_name="fake-gcs-server"):
        yield f"http://127.0.0.1:{port}"


def add_batch_content_ids(body: bytes, content_type: str) -> bytes:
    """Give every part of a JSON-API batch request a ``Content-ID`` (optional for GCS;
    fake-gcs-server answers only parts that have one)."""
    m = re.search(r'boundary="?([^";]+)"?', content_type or "")
    if not m:
        return body
    delim = b"--" + m.group(1).encode()
    pieces = body.split(delim)
    out = [pieces[0]]
    for i, piece in enumerate(pieces[1:], 1):
        if piece.startswith(b"--") or b"content-id:" in piece.split(b"\n\n", 1)[0].lower():
            out.append(piece)
            continue
        nl = b"\r\n" if piece.startswith(b"\r\n") else b"\n"
        out.append(nl + b"Content-ID: <item" + str(i).encode() + b">" + piece)
    return delim.join(out)


def s3_client(endpoint: str):
    import boto3
    from botocore.config import Config
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=S3_REGION, aws_access_key_id=S3_KEY_ID,
        aws_secret_access_key=S3_SECRET,
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=32))


def gcs_client(endpoint: str):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    return storage.Client(project="test", credentials=AnonymousCredentials(),
                          client_options={"api_endpoint": endpoint})


def point_storage_at(store, monkeypatch) -> None:
    """Point this process's storage clients (ours and Beam's FileSystems) at one test
    store, through its proxy; ``storage.reset_clients()`` undoes it."""
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions
    from dicom_deid import storage
    storage.reset_clients()
    monkeypatch.setattr(FileSystems, "_pipeline_options", PipelineOptions(store.beam_args()))
    if store.scheme == "gs":
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", store.proxy.url)
    store.proxy.reset()


def s3_beam_args(endpoint: str) -> list[str]:
    return [f"--s3_endpoint_url={endpoint}", f"--s3_region_name={S3_REGION}",
            f"--s3_access_key_id={S3_KEY_ID}", f"--s3_secret_access_key={S3_SECRET}"]


# --- fault-injecting proxy -----------------------------------------------------------------
class FaultProxy:
    """HTTP proxy in front of a storage server. Faults:

    * ``fail_for(seconds, status=503)``: every request gets ``status`` for that long after
      the first request that arrives once armed;
    * ``drop_next(n)``: the next ``n`` requests get their connection closed without answer;
    * ``deny(substring)``: reads (GET/HEAD) whose decoded path contains it get 403;
    * ``latency``: seconds added to every request.
    """

    def __init__(self, upstream: str, add_batch_ids: bool = False):
        u = urllib.parse.urlparse(upstream)
        self.add_batch_ids = add_batch_ids
        self.up_host, self.up_port = u.hostname, u.port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.latency = 0.0
        self._fail_seconds, self._fail_status, self._fail_start = 0.0, 503, None
        self._drop = 0
        self._deny: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self.served = {"total": 0, "failed": 0, "dropped": 0, "denied": 0}
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # TCP_NODELAY: an answer is written as headers then body; with Nagle's algorithm
            # the body waits for the client's delayed ACK of the headers (~40 ms a request)
            disable_nagle_algorithm = True

            def log_message(self, *a):  # quiet
                pass

            def _body(self):
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        line = self.rfile.readline().strip()
                        n = int(line.split(b";")[0], 16)
                        if n == 0:
                            while self.rfile.readline().strip():
                                pass
                            return out
                        out += self.rfile.read(n)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _answer(self, status, body=b""):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self):
                body = self._body()
                verdict = proxy._verdict(self.command, self.path)
                if proxy.latency:
                    time.sleep(proxy.latency)
                if verdict == "drop":
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                if verdict == "fail":
                    return self._answer(proxy._fail_status, b'{"error": {"code": 503, "message": "injected"}}')
                if verdict == "deny":
                    return self._answer(403, b'<?xml version="1.0"?><Error><Code>AccessDenied</Code>'
                                             b'<Message>injected</Message></Error>')
                conn = http.client.HTTPConnection(proxy.up_host, proxy.up_port, timeout=120)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("transfer-encoding", "content-length", "connection")}
                if proxy.add_batch_ids and self.command == "POST" and self.path.startswith("/batch/"):
                    body = add_batch_content_ids(body, self.headers.get("Content-Type", ""))
                headers["Content-Length"] = str(len(body))
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                except OSError:
                    self.close_connection = True
                    return
                finally:
                    conn.close()
                self.send_response(resp.status, resp.reason)
                length = str(len(data))
                for k, v in resp.getheaders():
                    if self.command == "HEAD" and k.lower() == "content-length":
                        length = v  # a HEAD answer's length is the object's, not the body's
                    elif k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _verdict(self, method: str, path: str) -> str:
        decoded = urllib.parse.unquote(path)
        with self._lock:
            self.served["total"] += 1
            self.requests.append((method, decoded))
            if self._drop > 0:
                self._drop -= 1
                self.served["dropped"] += 1
                return "drop"
            if self._fail_seconds:
                now = time.monotonic()
                if self._fail_start is None:
                    self._fail_start = now
                if now - self._fail_start < self._fail_seconds:
                    self.served["failed"] += 1
                    return "fail"
            if method in ("GET", "HEAD") and any(d in decoded for d in self._deny):
                # reads of the object's content or metadata, not listings of its prefix
                if "prefix=" not in decoded and "list-type" not in decoded:
                    self.served["denied"] += 1
                    return "deny"
        return "pass"

    def fail_for(self, seconds: float, status: int = 503) -> None:
        with self._lock:
            self._fail_seconds, self._fail_status, self._fail_start = seconds, status, None

    def drop_next(self, n: int) -> None:
        with self._lock:
            self._drop = n

    def deny(self, substring: str) -> None:
        with self._lock:
            self._deny.append(substring)

    def reset(self) -> None:
        with self._lock:
            self._fail_seconds, self._fail_start, self._drop, self._deny = 0.0, None, 0, []
            self.latency = 0.0
            for k in self.served:
                self.served[k] = 0
            self.requests.clear()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()


def which(name: str):
    return shutil.which(name)
