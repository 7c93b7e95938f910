"""dicom_deid.storage against the real local servers (in process): error classes, retries,
listing semantics and streaming, ranged reads, anonymous GCS without a credential search."""

from __future__ import annotations

import hashlib
import io
import os

import pydicom
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from dicom_deid import sample, storage
from dicom_deid.errors import StorageError

TREE = ["a/1.dcm", "a/2.dcm", "a/x.txt", "a/b/3.dcm", "a/b/c/4.dcm", "ab/5.dcm", "z.dcm",
        "a/Smith^John 6.dcm"]


# --- classification ---------------------------------------------------------------------------
def _client_error(code, status):
    from botocore.exceptions import ClientError
    return ClientError({"Error": {"Code": code, "Message": "x"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


@pytest.mark.parametrize("make,kind", [
    (lambda: __import__("google.api_core.exceptions", fromlist=["x"]).NotFound("x"), storage.NOT_FOUND),
    (lambda: __import__("google.api_core.exceptions", fromlist=["x"]).Forbidden("x"), storage.DENIED),
    (lambda: __import__("google.api_core.exceptions", fromlist=["x"]).ServiceUnavailable("x"), storage.TRANSIENT),
    (lambda: __import__("google.api_core.exceptions", fromlist=["x"]).TooManyRequests("x"), storage.TRANSIENT),
    (lambda: __import__("google.api_core.exceptions", fromlist=["x"]).BadRequest("x"), storage.PERMANENT),
    (lambda: _client_error("NoSuchKey", 404), storage.NOT_FOUND),
    (lambda: _client_error("AccessDenied", 403), storage.DENIED),
    (lambda: _client_error("SlowDown", 503), storage.TRANSIENT),
    (lambda: _client_error("InternalError", 500), storage.TRANSIENT),
    (lambda: _client_error("InvalidArgument", 400), storage.PERMANENT),
    (lambda: __import__("botocore.exceptions", fromlist=["x"]).EndpointConnectionError(endpoint_url="http://h"),
     storage.TRANSIENT),
    (lambda: __import__("requests").exceptions.ConnectionError("x"), storage.TRANSIENT),
    (lambda: ConnectionResetError(), storage.TRANSIENT),
    (lambda: TimeoutError(), storage.TRANSIENT),
    (lambda: FileNotFoundError(), storage.NOT_FOUND),
    (lambda: PermissionError(), storage.DENIED),
    (lambda: ValueError("x"), storage.PERMANENT),
    (lambda: __import__("apache_beam.io.filesystem", fromlist=["x"]).BeamIOError(
        "x", {"gs://b/o": __import__("google.api_core.exceptions", fromlist=["x"]).Forbidden("x")}), storage.DENIED),
])
def test_classify(make, kind):
    assert storage.classify(make()) == kind


def test_transient_errors_are_retried_then_raised_without_the_stores_message(monkeypatch):
    monkeypatch.setattr(storage, "BACKOFF", 0.001)
    calls = []

    def flaky():
        calls.append(1)
        raise _client_error("SlowDown", 503)
    with pytest.raises(StorageError) as e:
        storage.with_retries(flaky, retries=3)
    assert len(calls) == 4 and "SlowDown" not in str(e.value)
    assert e.value.__context__ is None and e.value.__cause__ is None

    calls.clear()
    ok = iter([ConnectionResetError(), TimeoutError(), "done"])

    def recovers():
        calls.append(1)
        v = next(ok)
        if isinstance(v, Exception):
            raise v
        return v
    assert storage.with_retries(recovers, retries=3) == "done" and len(calls) == 3

    calls.clear()

    def missing():
        calls.append(1)
        raise _client_error("NoSuchKey", 404)
    with pytest.raises(storage.ObjectNotFound) as e:
        storage.with_retries(missing)
    assert len(calls) == 1 and e.value.__context__ is None


# --- listing --------------------------------------------------------------------------------
def _tree(tmp_path):
    root = tmp_path / "tree"
    for k in TREE:
        (root / k).parent.mkdir(parents=True, exist_ok=True)
        (root / k).write_bytes(k.encode() * 10)
    return root


@pytest.mark.parametrize("scheme", ["s3", "gs"])
@pytest.mark.parametrize("pattern", ["**", "a/*", "a/**", "a/*.dcm", "a/?.dcm", "a/b/3.dcm", "a/[12].dcm",
                                     "nothing/**"])
def test_listing_matches_beams_local_semantics_on_every_scheme(scheme, pattern, request, in_store, tmp_path):
    store = in_store(request.getfixturevalue(f"{scheme}_store"))
    root = _tree(tmp_path)
    local = {os.path.relpath(i.uri, root) for i in storage.iter_objects(f"{root}/{pattern}")}
    beam = {os.path.relpath(m.path, root) for r in FileSystems.match([f"{root}/{pattern}"])
            for m in r.metadata_list} if "nothing" not in pattern else set()
    assert local == beam
    bucket = store.new_bucket()
    for k in TREE:
        store.put(bucket, f"p/{k}", k.encode() * 10)
    remote = {i.uri.split("/p/", 1)[1] for i in storage.iter_objects(store.uri(bucket, f"p/{pattern}"))}
    assert remote == local
    infos = list(storage.iter_objects(store.uri(bucket, "p/**")))
    assert all(i.size == len(i.uri.split("/p/", 1)[1].encode()) * 10 for i in infos)
    assert all(i.version.startswith("gen:" if scheme == "gs" else "etag:") for i in infos)


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_listing_streams_page_by_page(scheme, request, in_store, monkeypatch):
    store = in_store(request.getfixturevalue(f"{scheme}_store"))
    if getattr(store, "server", "") == "gcp-storage-emulator":
        pytest.skip("gcp-storage-emulator ignores maxResults (one page); fake-gcs-server paginates")
    bucket = store.new_bucket()
    for i in range(23):
        store.put(bucket, f"many/{i:03d}.dcm", b"x")
    monkeypatch.setattr(storage, "LIST_PAGE", 5)
    store.proxy.reset()
    it = storage.iter_objects(store.uri(bucket, "many/**"))
    first = next(it)
    lists = lambda: [p for m, p in store.proxy.requests if "prefix=" in p]  # noqa: E731
    assert first.uri.endswith("000.dcm") and len(lists()) == 1, store.proxy.requests  # one page so far
    rest = list(it)
    assert len(rest) == 22 and len(lists()) == 5, store.proxy.requests


# --- reading ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_dicom(tmp_path_factory):
    """A sample object given 8 frames of 512x512 16-bit pixels (4 MiB), uncompressed."""
    from pydicom.uid import ExplicitVRLittleEndian
    s = sample.generate(tmp_path_factory.mktemp("big") / "in", n_files=1, n_patients=1, seed=5)
    ds = pydicom.dcmread(s.files[0])
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames, ds.SamplesPerPixel, ds.PhotometricInterpretation = 8, 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.PixelData = os.urandom(512 * 512 * 2 * 8)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_header_reads_fetch_only_the_first_bytes(scheme, request, in_store, big_dicom):
    store = in_store(request.getfixturevalue(f"{scheme}_store"))
    bucket = store.new_bucket()
    store.put(bucket, "big.dcm", big_dicom)
    uri = store.uri(bucket, "big.dcm")
    assert storage.read_head(uri, 132)[128:] == b"DICM"
    raw = storage.open_read(uri)
    with io.BufferedReader(raw, buffer_size=16 * 1024) as fp:
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
    assert ds.SOPInstanceUID and raw.bytes_read < len(big_dicom) / 4, (raw.bytes_read, len(big_dicom))


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_large_objects_stream_to_a_temp_file_in_retried_chunks(scheme, request, in_store, monkeypatch, tmp_path):
    store = in_store(request.getfixturevalue(f"{scheme}_store"))
    monkeypatch.setattr(storage, "CHUNK", 256 * 1024)
    monkeypatch.setattr(storage, "BACKOFF", 0.05)
    data = os.urandom(3 * 1024 * 1024 + 17)
    bucket = store.new_bucket()
    store.put(bucket, "large.bin", data)
    store.proxy.drop_next(2)                    # two dropped connections
    store.proxy.fail_for(0.5, 503)              # then 503 for half a second
    out, path, sha = storage.fetch(store.uri(bucket, "large.bin"), len(data), 1 << 30, 1 << 20, str(tmp_path))
    try:
        assert out is None and path and open(path, "rb").read() == data
        assert sha == hashlib.sha256(data).hexdigest()
        assert store.proxy.served["dropped"] == 2 and store.proxy.served["failed"] >= 1
    finally:
        os.unlink(path)
    with pytest.raises(storage.TooLarge):
        storage.fetch(store.uri(bucket, "large.bin"), len(data), 1 << 20, 1 << 19, str(tmp_path))
    assert not [p for p in os.listdir(tmp_path) if p.startswith("dicom-deid-")]   # no temp file left
    store.proxy.deny("large.bin")
    with pytest.raises(storage.AccessDenied) as e:
        storage.fetch(store.uri(bucket, "large.bin"), len(data), 1 << 30, 1 << 20, str(tmp_path))
    assert "large.bin" not in str(e.value) and e.value.__context__ is None
    with pytest.raises(storage.ObjectNotFound):
        storage.fetch(store.uri(bucket, "absent.bin"), 10, 1 << 30, 1 << 20, str(tmp_path))


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_write_copy_delete(scheme, request, in_store):
    store = in_store(request.getfixturevalue(f"{scheme}_store"))
    bucket = store.new_bucket()
    src, dst = store.uri(bucket, "s/x.dcm"), store.uri(bucket, "d/y.dcm")
    storage.write_bytes(src, b"abc" * 1000)
    storage.copy(src, dst)
    assert storage.sha256_of(dst) == hashlib.sha256(b"abc" * 1000).hexdigest()
    storage.delete(src)
    storage.delete(src)                          # absent is fine
    assert storage.stat(src) is None and storage.exists(dst)
    assert storage.delete_prefix(store.uri(bucket, "d")) == 1 and store.keys(bucket) == []


@pytest.mark.parametrize("scheme", ["file", "s3", "gs"])
def test_write_file_uploads_from_disk_in_pieces_and_retries(scheme, request, in_store, monkeypatch, tmp_path):
    """A large staged object is written from a local file: S3 multipart above the threshold,
    GCS resumable in CHUNK pieces, local copy + rename; transient failures start it again."""
    monkeypatch.setattr(storage, "CHUNK", 1024 * 1024)
    monkeypatch.setattr(storage, "S3_MULTIPART_THRESHOLD", 6 * 1024 * 1024)
    monkeypatch.setattr(storage, "S3_PART", 5 * 1024 * 1024)
    monkeypatch.setattr(storage, "BACKOFF", 0.05)
    data = os.urandom(12 * 1024 * 1024 + 17)
    src = tmp_path / "out.dcm"
    src.write_bytes(data)
    if scheme == "file":
        uri = str(tmp_path / "dest" / "sub" / "x.dcm")
        storage.write_file(uri, str(src), content_type="application/dicom")
        assert open(uri, "rb").read() == data and os.listdir(tmp_path / "dest" / "sub") == ["x.dcm"]
        assert src.exists()
        storage.write_file(str(tmp_path / "dest" / "moved.dcm"), str(src), move=True)  # a rename
        assert open(tmp_path / "dest" / "moved.dcm", "rb").read() == data and not src.exists()
        assert os.stat(tmp_path / "dest" / "moved.dcm").st_mode & 0o777 == os.stat(uri).st_mode & 0o777
        return
    store = in_store(request.getfixturevalue(f"{scheme}_store"))
    bucket = store.new_bucket()
    uri = store.uri(bucket, "staged/x.dcm")
    store.proxy.fail_for(0.3, 503)
    storage.write_file(uri, str(src), content_type="application/dicom")
    assert storage.sha256_of(uri) == hashlib.sha256(data).hexdigest()
    assert store.keys(bucket) == ["staged/x.dcm"] and store.proxy.served["failed"] >= 1
    pieces = [p for m, p in store.proxy.requests if m in ("PUT", "POST") and
              ("partNumber=" in p if scheme == "s3" else "upload_id=" in p)]
    assert len(pieces) >= 3, store.proxy.requests  # in pieces, not one request of the whole


# --- GCS credentials --------------------------------------------------------------------------
def test_emulator_host_means_anonymous_without_a_credential_search(monkeypatch):
    import google.auth
    from apache_beam.internal.gcp import auth
    from apache_beam.io.gcp import gcsio

    def no_search(*a, **k):
        raise AssertionError("google.auth.default() was called")
    monkeypatch.setattr(google.auth, "default", no_search)
    monkeypatch.setattr(FileSystems, "_pipeline_options", None)
    monkeypatch.setattr(auth._Credentials, "_credentials_init", False)
    monkeypatch.setattr(auth._Credentials, "_credentials", None)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    storage.configure(PipelineOptions([]))
    assert auth.get_service_credentials(PipelineOptions([])) is None
    client = gcsio.GcsIO(pipeline_options=PipelineOptions([])).client
    assert client.api_endpoint == "http://127.0.0.1:9"


def test_without_emulator_or_no_auth_beams_lookup_is_left_alone(monkeypatch):
    from apache_beam.internal.gcp import auth
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setattr(auth._Credentials, "_credentials_init", False)
    monkeypatch.setattr(auth._Credentials, "_credentials", None)
    monkeypatch.setattr(FileSystems, "_pipeline_options", None)
    storage.configure(PipelineOptions([]))
    assert auth._Credentials._credentials_init is False
    storage.configure(PipelineOptions(["--no_auth"]))
    assert auth._Credentials._credentials_init is True


def test_beam_plugin_args_make_workers_import_this_module():
    assert storage.beam_plugin_args([]) == ["--beam_plugins=dicom_deid.storage"]
    assert storage.beam_plugin_args(["--beam_plugins=dicom_deid.storage"]) == []
    info = storage.worker_provision_info(PipelineOptions(["--s3_endpoint_url=http://127.0.0.1:1",
                                                          "--beam_plugins=dicom_deid.storage"]))
    opts = dict(info.provision_info.pipeline_options)
    assert opts["beam:option:s3_endpoint_url:v1"] == "http://127.0.0.1:1"
    assert list(opts["beam:option:beam_plugins:v1"]) == ["dicom_deid.storage"]
