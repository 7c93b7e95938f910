"""Storage fixtures: a moto S3 server and a GCS emulator (each behind a fault proxy), started
once per session on 127.0.0.1 free ports, plus helpers to run the CLI against them."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.storage import servers


class Store:
    """One server behind its proxy: upload, list, download; env/args for the CLI."""

    def __init__(self, scheme: str, direct: str, proxy: servers.FaultProxy):
        self.scheme, self.direct, self.proxy = scheme, direct, proxy
        self.client = servers.s3_client(direct) if scheme == "s3" else servers.gcs_client(direct)

    def new_bucket(self) -> str:
        name = f"dd-{uuid.uuid4().hex[:12]}"
        if self.scheme == "s3":
            self.client.create_bucket(Bucket=name)
        else:
            self.client.create_bucket(name)
        return name

    def put(self, bucket: str, key: str, data: bytes) -> None:
        if self.scheme == "s3":
            self.client.put_object(Bucket=bucket, Key=key, Body=data)
        else:
            self.client.bucket(bucket).blob(key).upload_from_string(data)

    def get(self, bucket: str, key: str) -> bytes:
        if self.scheme == "s3":
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        return self.client.bucket(bucket).blob(key).download_as_bytes()

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        if self.scheme == "s3":
            out, token = [], None
            while True:
                kw = {"Bucket": bucket, "Prefix": prefix}
                if token:
                    kw["ContinuationToken"] = token
                r = self.client.list_objects_v2(**kw)
                out += [c["Key"] for c in r.get("Contents", [])]
                token = r.get("NextContinuationToken")
                if not token:
                    return sorted(out)
        return sorted(b.name for b in self.client.list_blobs(bucket, prefix=prefix))

    def download(self, bucket: str, prefix: str, dest: Path) -> Path:
        for k in self.keys(bucket, prefix):
            p = dest / k
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(self.get(bucket, k))
        return dest

    def uri(self, bucket: str, key: str = "") -> str:
        return f"{self.scheme}://{bucket}/{key}"

    def env(self) -> dict:
        # GCS: the emulator host (through the proxy) means anonymous access, no credential search
        return {"STORAGE_EMULATOR_HOST": self.proxy.url} if self.scheme == "gs" else {}

    def beam_args(self) -> list[str]:
        return servers.s3_beam_args(self.proxy.url) if self.scheme == "s3" else []


@pytest.fixture(scope="session")
def s3_store():
    with servers.moto_server() as url, servers.FaultProxy(url) as proxy:
        yield Store("s3", url, proxy)


def gcs_server():
    """fake-gcs-server when Go can build it (concurrent, paginates listings), else
    gcp-storage-emulator; ``DICOM_DEID_GCS_SERVER=fake|python`` forces one."""
    choice = os.environ.get("DICOM_DEID_GCS_SERVER", "")
    if choice != "python" and (choice == "fake" or servers.fake_gcs_binary() is not None):
        return "fake-gcs-server", servers.fake_gcs_server()
    return "gcp-storage-emulator", servers.gcs_emulator()


@pytest.fixture(scope="session")
def gs_store():
    name, server = gcs_server()
    with server as url, servers.FaultProxy(url, add_batch_ids=True) as proxy:
        store = Store("gs", url, proxy)
        store.server = name
        yield store


@pytest.fixture
def clean_proxies(request):
    """Faults set by one test never leak into the next."""
    yield
    for name in ("s3_store", "gs_store"):
        if name in request.fixturenames:
            request.getfixturevalue(name).proxy.reset()


@pytest.fixture
def in_store(request, monkeypatch):
    """Point this process's storage clients at one store (through its proxy); undone, with
    the proxies' faults, after the test."""
    from dicom_deid import storage

    def use(store):
        servers.point_storage_at(store, monkeypatch)
        return store
    yield use
    storage.reset_clients()
    for name in ("s3_store", "gs_store"):
        if name in request.fixturenames:
            request.getfixturevalue(name).proxy.reset()


def base_env() -> dict:
    env = dict(os.environ)
    env.pop("STORAGE_EMULATOR_HOST", None)
    # never probe cloud metadata servers from a test (no network but loopback)
    env.update(NO_GCE_CHECK="true", AWS_EC2_METADATA_DISABLED="true",
               DICOM_DEID_STORAGE_BACKOFF="0.3")
    return env


def run_cli(args, env_extra=None, beam_args=(), timeout=600):
    env = base_env()
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "dicom_deid.cli", "run", *map(str, args), *beam_args],
                          capture_output=True, text=True, env=env, timeout=timeout)
