"""End to end through the CLI: pseudonyms, date offsets and UIDs agree across runs and
worker counts, differ across keys; references stay consistent; exclusions and lookup
tables; the store grows only for new patients; nothing public recomputes a pseudonym."""

from __future__ import annotations

import contextlib
import datetime as dt
import glob
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_deid import keys, pseudonyms as ps, sample, tags
from tests.conftest import write_key


def start_cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dicom_deid.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(*procs: subprocess.Popen) -> list[subprocess.CompletedProcess]:
    """Wait for every process (killed if one outlives the timeout), then check each."""
    done = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    for c in done:
        assert c.returncode == 0, c.stderr[-3000:]
    return done


def run_cli(*args):
    return finish(start_cli(*args))[0]


def _referencing_copy(src: Path, dst: Path) -> None:
    """A second object of the same series that references the first one in every way."""
    a = pydicom.dcmread(src)
    b = pydicom.dcmread(src)
    b.SOPInstanceUID = a.SOPInstanceUID + ".1"
    b.file_meta.MediaStorageSOPInstanceUID = b.SOPInstanceUID
    b.InstanceNumber = 99
    img = Dataset()
    img.ReferencedSOPClassUID = a.SOPClassUID
    img.ReferencedSOPInstanceUID = a.SOPInstanceUID
    b.ReferencedImageSequence = Sequence([img])
    inst = Dataset()
    inst.ReferencedSOPClassUID = a.SOPClassUID
    inst.ReferencedSOPInstanceUID = a.SOPInstanceUID
    ser = Dataset()
    ser.SeriesInstanceUID = a.SeriesInstanceUID
    ser.ReferencedInstanceSequence = Sequence([inst])
    b.ReferencedSeriesSequence = Sequence([ser])
    b.save_as(dst, enforce_file_format=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pse2e")
    inputs = root / "in"
    s = sample.generate(inputs, n_files=12, n_patients=4, seed=21)
    _referencing_copy(s.files[0], inputs / "p000" / "ref.dcm")
    by_pid = {}
    for f in sorted(inputs.rglob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        by_pid.setdefault(str(ds.PatientID), []).append(f)
    pids = sorted(by_pid)
    nhs = {}
    for pid, files in by_pid.items():
        nhs[pid] = str(pydicom.dcmread(files[0], stop_before_pixels=True).OtherPatientIDsSequence[0].PatientID)
    excluded_pid = pids[1]
    optout = root / "optout.csv"
    optout.write_text(f"nhs_number\n{nhs[excluded_pid]}\n")
    key_a = write_key(root / "a.key", "a1" * 32)
    key_b = write_key(root / "b.key", "b2" * 32)
    out, priv = root / "out", root / "priv"
    common = ["--input", f"{inputs}/**", "--output", out, "--private", priv, "--policy", "research",
              "--exclusions", optout, "--no-progress"]
    # another key, sequential IDs
    seq_policy = root / "seq.yaml"
    seq_policy.write_text("schema: 1\nname: seq\nversion: '1'\noptions: [rtn_long_modified_dates]\n"
                          "pseudonyms: {strategy: sequential, prefix: STUDY, digits: 4, "
                          "date_offset_days: [-400, -100]}\n")
    out_b, priv_b = root / "out_b", root / "priv_b"
    # lookup strategy: only patient 0 is in the table
    look_policy = root / "look.yaml"
    look_policy.write_text("schema: 1\nname: look\nversion: '1'\npseudonyms: {strategy: lookup}\n")
    table = root / "lookup.csv"
    table.write_text(f"patient_id,research_id\n{pids[0]},RESEARCH-0042\n")
    out_l, priv_l = root / "out_l", root / "priv_l"
    # rb and rl share no prefix with r1/r2 (nor with each other): each runs beside one of
    # r1 -> r2 instead of after them (part of a run's time is start-up, not CPU); rl with one
    # worker (no assertion depends on its worker count), rb with the default (one per core)
    side = [start_cli("run", "--input", f"{inputs}/**", "--output", out_b, "--private", priv_b, "--policy",
                      seq_policy, "--key", key_b, "--no-progress", "--run-id", "rb")]
    try:
        run_cli("run", *common, "--key", key_a, "--direct_num_workers=2", "--run-id", "r1")
        parts1 = sorted(glob.glob(f"{priv}/pseudonyms/part-*.parquet"))
        bytes1 = {p: p.read_bytes() for p in out.rglob("*.dcm")}
        side.append(start_cli("run", "--input", f"{inputs}/**", "--output", out_l, "--private", priv_l,
                              "--policy", look_policy, "--lookup-table", table, "--key", key_a, "--no-progress",
                              "--run-id", "rl", "--direct_num_workers=1"))
        run_cli("run", *common, "--key", key_a, "--direct_num_workers=1", "--run-id", "r2")
        parts2 = sorted(glob.glob(f"{priv}/pseudonyms/part-*.parquet"))
    finally:
        finish(*side)
    return dict(root=root, inputs=inputs, sample=s, by_pid=by_pid, pids=pids, nhs=nhs,
                excluded_pid=excluded_pid, out=out, priv=priv, parts1=parts1, parts2=parts2,
                bytes1=bytes1, out_b=out_b, priv_b=priv_b, out_l=out_l, priv_l=priv_l,
                deriver_a=keys.Deriver(bytes.fromhex("a1" * 32)))


def _manifest(out, run_id):
    return pq.read_table(f"{out}/manifest/run-{run_id}").to_pylist()


def _linkage(priv, run_id):
    return pq.read_table(f"{priv}/linkage/run-{run_id}").to_pylist()


def test_two_runs_and_worker_counts_agree(world):
    m1 = {r["input_key"]: r for r in _manifest(world["out"], "r1")}
    m2 = {r["input_key"]: r for r in _manifest(world["out"], "r2")}
    assert set(m1) == set(m2) and len(m1) == 13
    cols = ("status", "pseudo_patient_id", "study_uid", "series_uid", "sop_uid", "output_path", "output_sha256")
    assert {k: tuple(r[c] for c in cols) for k, r in m1.items()} == {k: tuple(r[c] for c in cols) for k, r in m2.items()}
    assert {p: p.read_bytes() for p in world["out"].rglob("*.dcm")} == world["bytes1"]
    # re-running the same inputs adds nothing to the store
    assert world["parts1"] and world["parts2"] == world["parts1"]


def test_pseudonyms_and_offsets_come_from_the_store_and_shift_dates(world):
    d = world["deriver_a"]
    store = ps.read_store(f"{world['priv']}/pseudonyms", d.key_fingerprint())
    assert len(store) == 3                                       # 4 patients, one opted out
    for link in _linkage(world["priv"], "r1"):
        entry = store[link["patient_key_hmac"]]
        assert link["pseudo_patient_id"] == entry["pseudonym"]
        src = pydicom.dcmread(link["input_uri"], stop_before_pixels=True)
        out = pydicom.dcmread(link["output_path"], stop_before_pixels=True)
        off = entry["date_offset_days"]
        assert -3650 <= off <= -365
        assert out.StudyDate == tags.shift_date(src.StudyDate, off) != src.StudyDate
        assert out.AcquisitionDate == tags.shift_date(src.AcquisitionDate, off)
        # PatientAge kept (Retain Patient Characteristics) and consistent with the shift:
        # shifted study date minus the equally shifted birth date gives the same age
        born = tags.shift_date(src.PatientBirthDate, off)
        sd = out.StudyDate
        age = int(sd[:4]) - int(born[:4]) - (sd[4:] < born[4:])
        assert out.PatientAge == src.PatientAge == f"{age:03d}Y"
        assert out.PatientID == out.PatientName == entry["pseudonym"]


def test_references_stay_consistent(world):
    links = {l["original_sop_uid"]: l for l in _linkage(world["priv"], "r1")}
    ref_src = pydicom.dcmread(world["inputs"] / "p000" / "ref.dcm", stop_before_pixels=True)
    a = links[ref_src.ReferencedImageSequence[0].ReferencedSOPInstanceUID]
    b = pydicom.dcmread(links[ref_src.SOPInstanceUID]["output_path"], stop_before_pixels=True)
    assert b.ReferencedImageSequence[0].ReferencedSOPInstanceUID == a["sop_uid"]
    item = b.ReferencedSeriesSequence[0]
    assert item.SeriesInstanceUID == a["series_uid"] == b.SeriesInstanceUID
    assert item.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == a["sop_uid"]
    assert b.FrameOfReferenceUID == a["frame_of_reference_uid"]
    assert b.file_meta.MediaStorageSOPInstanceUID == b.SOPInstanceUID
    assert b.StudyInstanceUID == a["study_uid"]


def test_exclusions_give_excluded_rows_and_nothing_else(world):
    d = world["deriver_a"]
    excluded_files = {str(f) for f in world["by_pid"][world["excluded_pid"]]}
    keys_of = {d.input_key(str(f)): str(f) for fs in world["by_pid"].values() for f in fs}
    rows = _manifest(world["out"], "r1")
    excl = [r for r in rows if r["status"] == "excluded"]
    assert {keys_of[r["input_key"]] for r in excl} == excluded_files
    for r in excl:
        assert r["pseudo_patient_id"] is None and r["study_uid"] is None and r["output_path"] is None
        assert r["modality"] is None and r["content_fingerprint"] is None
    assert not [l for l in _linkage(world["priv"], "r1") if l["input_uri"] in excluded_files]
    n_ok = sum(r["status"] == "ok" for r in rows)
    assert n_ok == 13 - len(excluded_files)
    assert len([p for p in world["out"].rglob("*.dcm")]) == n_ok


def test_another_key_gives_other_values_and_sequential_ids(world):
    m1 = _manifest(world["out"], "r1")
    mb = _manifest(world["out_b"], "rb")
    assert sorted({r["pseudo_patient_id"] for r in mb}) == ["STUDY0001", "STUDY0002", "STUDY0003", "STUDY0004"]
    assert not ({r["sop_uid"] for r in m1} & {r["sop_uid"] for r in mb})
    assert not ({r["study_uid"] for r in m1} & {r["study_uid"] for r in mb})


def test_lookup_strategy_uses_table_and_quarantines_unknown_patients(world):
    d = world["deriver_a"]
    keys_of = {d.input_key(str(f)): pid for pid, fs in world["by_pid"].items() for f in fs}
    for r in _manifest(world["out_l"], "rl"):
        if keys_of[r["input_key"]] == world["pids"][0]:
            assert r["status"] == "ok" and r["pseudo_patient_id"] == "RESEARCH-0042"
        else:
            assert (r["status"], r["reason"], r["output_path"]) == ("quarantined", "not_in_lookup_table", None)


def test_nothing_public_recomputes_a_pseudonym(world):
    """The public side (objects, manifest, summaries) holds no patient key HMAC and no
    unkeyed digest of an identifier; without the key the pseudonym cannot be recomputed."""
    d = world["deriver_a"]
    store = ps.read_store(f"{world['priv']}/pseudonyms", d.key_fingerprint())
    needles = set(store)
    for pid in world["pids"]:
        for v in (pid, world["nhs"][pid]):
            for h in (hashlib.sha256, hashlib.sha1, hashlib.md5):
                needles.add(h(v.encode()).hexdigest())
    blob = b"".join(p.read_bytes() for p in world["out"].rglob("*") if p.is_file())
    assert not [n for n in needles if n.encode() in blob or n.upper().encode() in blob]
    cols = set(pq.read_table(f"{world['out']}/manifest/run-r1").column_names)
    assert not cols & {"patient_key_hmac", "original_patient_id", "input_uri"}


def test_link_export_writes_mapping_csvs(world, tmp_path):
    proc = run_cli("link", "export", "--private", world["priv"], "--out", tmp_path / "x", "--run-id", "r1")
    assert "patients.csv: 3 rows" in proc.stdout
    import csv
    rows = list(csv.DictReader(open(tmp_path / "x" / "patients.csv")))
    assert {r["original_patient_id"] for r in rows} == set(world["pids"]) - {world["excluded_pid"]}
    assert all(int(r["date_offset_days"]) < 0 for r in rows)
    uids = list(csv.DictReader(open(tmp_path / "x" / "uids.csv")))
    assert {u["level"] for u in uids} == {"study", "series", "sop", "frame_of_reference"}
    assert oct(os.stat(tmp_path / "x" / "files.csv").st_mode)[-3:] == "600"


# ----------------------------------------------------------------------------- store lock

def test_two_concurrent_runs_take_turns_on_one_store(world):
    """Two real `dicom-deid run` processes, started together on one private prefix with
    the sequential strategy and different patients: the second waits for the first's lease,
    so every patient gets its own number (without the lock both would number from 1)."""
    root = world["root"]
    priv, seq_policy = root / "priv_conc", root / "seq.yaml"
    procs = []
    for name, folders in (("ca", ("p000", "p001")), ("cb", ("p002", "p003"))):
        args = ["run", "--input", *[f"{world['inputs']}/{f}/**" for f in folders], "--output", root / f"out_{name}",
                "--private", priv, "--policy", seq_policy, "--key", root / "b.key", "--no-progress",
                "--run-id", name, "--direct_num_workers=1"]  # the lease, not the workers, is under test
        procs.append(subprocess.Popen([sys.executable, "-m", "dicom_deid.cli", *map(str, args)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    stderr = "".join(e for _o, e in outs)
    assert "pseudonym store is in use by run c" in stderr          # one of them waited
    for pid in world["pids"]:
        assert pid not in stderr and world["nhs"][pid] not in stderr
    d = keys.Deriver(bytes.fromhex("b2" * 32))
    rows = list(ps.read_store(f"{priv}/pseudonyms", d.key_fingerprint()).values())
    assert sorted(r["sequence"] for r in rows) == [1, 2, 3, 4]
    assert len({r["pseudonym"] for r in rows}) == 4
    ma, mb = _manifest(root / "out_ca", "ca"), _manifest(root / "out_cb", "cb")
    assert not ({r["pseudo_patient_id"] for r in ma} & {r["pseudo_patient_id"] for r in mb})
    tickets = json.loads(sorted((priv / "pseudonyms" / "_lock").glob("*.json"))[-1].read_text())
    assert tickets["state"] == "released"


_LOCK_WORKER = r'''
import os, signal, sys, time
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
sdir, me, rounds, log_path, lease, crash = sys.argv[1:7]
opts = PipelineOptions(sys.argv[7:])
FileSystems.set_options(opts)
from dicom_deid import pseudonyms as ps, storage
storage.configure(opts)
counter = sdir + "/counter"
for i in range(int(rounds)):
    lk = ps.StoreLock(sdir, me, lease=float(lease), wait=120).acquire()
    if crash == "1":
        open(log_path, "a").write("held\n")
        os.kill(os.getpid(), signal.SIGKILL)      # dies holding the lease
    t0 = time.time()
    n = int(ps.read_bytes(counter)) if storage.exists(counter) else 0
    time.sleep(0.05)                              # read-modify-write: loses updates unless exclusive
    storage.write_bytes(counter, str(n + 1).encode())
    t1 = time.time()
    lk.release()
    with open(log_path, "a") as f:
        f.write(f"{t0} {t1} {int(lk.exclusive)} {lk.waited:.3f}\n")
'''


def _lock_workers(tmp_path, sdir, n, rounds, env=None, beam_args=(), lease=3.0, crash=False):
    script = tmp_path / "lock_worker.py"
    script.write_text(_LOCK_WORKER)
    e = dict(os.environ, NO_GCE_CHECK="true", AWS_EC2_METADATA_DISABLED="true", **(env or {}))
    e["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), e.get("PYTHONPATH", "")])
    procs, logs = [], []
    for i in range(n):
        log = tmp_path / f"w{i}.log"
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(script), sdir, f"worker{i}", str(rounds), str(log),
                                       str(lease), "1" if crash else "0", *beam_args], env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _out, err = p.communicate(timeout=300)
        if not crash:
            assert p.returncode == 0, err[-3000:]
    return logs


def _assert_exclusive(counter, logs, expected):
    spans = sorted(tuple(map(float, line.split()[:2])) for log in logs for line in log.read_text().split("\n") if line)
    assert len(spans) == expected
    for (_a0, a1), (b0, _b1) in zip(spans, spans[1:]):
        assert a1 <= b0, "two processes held the store at once"
    assert all(line.split()[2] == "1" for log in logs for line in log.read_text().split("\n") if line)
    assert int(counter()) == expected                                # no lost update


def _crash_then_take_over(tmp_path, sdir, **kw):
    import time
    crashed = _lock_workers(tmp_path / "crash", sdir, 1, 1, lease=1.0, crash=True, **kw)
    assert crashed[0].read_text() == "held\n"
    t0 = time.monotonic()
    logs = _lock_workers(tmp_path / "after", sdir, 1, 1, lease=1.0, **kw)
    assert time.monotonic() - t0 < 30                 # one lease (plus start-up), not forever
    assert float(logs[0].read_text().split()[3]) >= 0.5   # it did wait for the dead lease


@pytest.fixture
def lock_tmp(tmp_path):
    for sub in ("crash", "after"):
        (tmp_path / sub).mkdir()
    return tmp_path


def test_store_lock_two_processes_local(lock_tmp):
    sdir = str(lock_tmp / "priv" / "pseudonyms")
    _assert_exclusive(lambda: open(f"{sdir}/counter").read(), _lock_workers(lock_tmp, sdir, 2, 4), 8)
    _crash_then_take_over(lock_tmp, sdir)


def test_store_lock_two_processes_s3_moto(lock_tmp):
    from tests.storage import servers
    with servers.moto_server() as url:
        s3 = servers.s3_client(url)
        s3.create_bucket(Bucket="lock-bucket")
        sdir, args = "s3://lock-bucket/priv/pseudonyms", servers.s3_beam_args(url)
        counter = lambda: s3.get_object(Bucket="lock-bucket", Key="priv/pseudonyms/counter")["Body"].read()  # noqa: E731
        _assert_exclusive(counter, _lock_workers(lock_tmp, sdir, 2, 3, beam_args=args), 6)
        _crash_then_take_over(lock_tmp, sdir, beam_args=args)
        keys_left = [o["Key"] for o in servers.s3_client(url).list_objects_v2(Bucket="lock-bucket")["Contents"]]
        assert len([k for k in keys_left if "/_lock/" in k]) <= 2


def test_store_lock_two_processes_gcs(lock_tmp):
    """fake-gcs-server honours ifGenerationMatch; gcp-storage-emulator (the bucket tests'
    GCS server) ignores it, which the lock detects and reports instead of trusting."""
    from tests.storage import servers
    binary = getattr(servers, "fake_gcs_binary", lambda: None)()
    if binary is not None:
        with servers.fake_gcs_server(binary) as url:
            gcs = servers.gcs_client(url)
            gcs.create_bucket("lock-bucket")
            sdir, env = "gs://lock-bucket/priv/pseudonyms", {"STORAGE_EMULATOR_HOST": url}
            counter = lambda: gcs.bucket("lock-bucket").blob("priv/pseudonyms/counter").download_as_bytes()  # noqa: E731
            _assert_exclusive(counter, _lock_workers(lock_tmp, sdir, 2, 3, env=env), 6)
    with servers.gcs_emulator() as url:
        servers.gcs_client(url).create_bucket("lock-bucket")
        sdir, env = "gs://lock-bucket/priv/pseudonyms", {"STORAGE_EMULATOR_HOST": url}
        logs = _lock_workers(lock_tmp / "after", sdir, 1, 1, env=env)
        assert logs[0].read_text().split()[2] == "0"   # not exclusive: detected, warned
    if binary is None:
        pytest.skip("fake-gcs-server not available (needs Go): only the emulator's missing "
                    "precondition support was checked")


# ----------------------------------------------------------------------------- gcpsm:// keys

@contextlib.contextmanager
def _secret_manager_server(values: dict):
    """A local gRPC server on 127.0.0.1 speaking Secret Manager v1's AccessSecretVersion
    (there is no Secret Manager emulator to install here). It checks the real client
    library and wire format end to end; it is not Google's service (no IAM, no versions
    beyond what ``values`` names). Records the names asked for."""
    from concurrent import futures

    import grpc
    from google.cloud.secretmanager_v1 import types as smt
    asked = []

    def access(request, context):
        asked.append(request.name)
        if request.name.startswith("projects/denied/"):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"Permission denied on {request.name}")
        if request.name not in values:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Secret [{request.name}] not found")
        return smt.AccessSecretVersionResponse(name=request.name, payload=smt.SecretPayload(data=values[request.name]))

    handler = grpc.method_handlers_generic_handler("google.cloud.secretmanager.v1.SecretManagerService", {
        "AccessSecretVersion": grpc.unary_unary_rpc_method_handler(
            access, request_deserializer=smt.AccessSecretVersionRequest.deserialize,
            response_serializer=smt.AccessSecretVersionResponse.serialize)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", asked
    finally:
        server.stop(grace=None)


def test_gcpsm_key_through_the_real_client_and_every_worker(world, tmp_path, monkeypatch):
    hexkey = "c3" * 32
    latest = "projects/p1/secrets/deid-key/versions/latest"
    with _secret_manager_server({latest: hexkey.encode() + b"\n",
                                 "projects/p1/secrets/deid-key/versions/2": hexkey.encode()}) as (host, asked):
        monkeypatch.setenv(keys.SECRET_MANAGER_EMULATOR_ENV, host)
        assert keys.resolve(keys.KeyRef("gcpsm://projects/p1/secrets/deid-key")) == bytes.fromhex(hexkey)
        assert keys.resolve(keys.KeyRef("gcpsm://projects/p1/secrets/deid-key/versions/2")) == bytes.fromhex(hexkey)
        for ref, cls in (("gcpsm://projects/p1/secrets/missing", "NotFound"),
                         ("gcpsm://projects/denied/secrets/deid-key", "PermissionDenied")):
            with pytest.raises(keys.ConfigError) as err:
                keys.resolve(keys.KeyRef(ref))
            assert f"({cls})" in str(err.value) and "projects/" not in str(err.value)
        n_before = len(asked)
        # the CLI: launcher and every worker process read the key from the server
        out, priv = tmp_path / "out", tmp_path / "priv"
        proc = run_cli("run", "--input", f"{world['inputs']}/p000/**", "--output", out, "--private", priv,
                       "--key", "gcpsm://projects/p1/secrets/deid-key", "--no-progress", "--run-id", "sm",
                       "--direct_num_workers=2")
        assert len(asked) - n_before >= 3 and set(asked[n_before:]) == {latest}
    d = keys.Deriver(bytes.fromhex(hexkey))
    rows = _manifest(out, "sm")
    src = pydicom.dcmread(sorted((world["inputs"] / "p000").glob("*.dcm"))[0], stop_before_pixels=True)
    pk = d.patient_key(str(src.PatientID), str(src.IssuerOfPatientID))
    assert {r["pseudo_patient_id"] for r in rows} == {d.pseudonym(pk)}
    assert hexkey not in proc.stderr and hexkey not in proc.stdout
