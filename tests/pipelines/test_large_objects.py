"""Large objects take the streamed path: read to a local temp file with deferred values,
serialised to a local temp file (deferred values copied in chunks), verified without
loading pixel data, staged from disk. Its output is byte for byte the in-memory path's, and
memory does not grow with the object.

Runs are in subprocesses with Beam's in-memory runner (one process, so its peak RSS is the
pipeline's), the threshold between the two paths lowered where a test says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

from dicom_deid import verify, writer
from tests.conftest import CORPUS, REPO, write_key

MR = CORPUS / "vendors" / "toshiba" / "Galan" / "10006_DTI_ALL_20d" / "0001.dcm"
NAME = "QUILLFEATHER^ARABELLA"  # planted: must never leave the header checks unseen

# One pipeline run per line of input: {"in": file, "out": dir, "private": dir, "key": file,
# "in_memory_max": int or null}; prints one JSON line per run: peak RSS so far and how many
# objects took the streamed path.
RUNNER = r"""
import json, resource, sys
from dicom_deid import cli, writer
from dicom_deid.transforms import read
streamed = []
_orig = writer.serialize_to_file
def counting(ds, tmp_dir):
    out = _orig(ds, tmp_dir)
    streamed.append(out.size)
    return out
writer.serialize_to_file = counting
for line in sys.stdin:
    job = json.loads(line)
    read.IN_MEMORY_MAX = job["in_memory_max"] or (64 * 1024 * 1024)
    code = cli.main(["run", "--input", job["in"], "--output", job["out"], "--private", job["private"],
                     "--key", job["key"], "--no-progress", "--direct_running_mode=in_memory",
                     "--direct_num_workers=1", *job.get("args", [])])
    print(json.dumps({"code": code, "streamed": len(streamed),
                      "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}), flush=True)
import os
os._exit(0)  # as the CLI does: Beam's gRPC threads can abort interpreter teardown
"""


def _make(path: Path, megabytes: float, ts=ExplicitVRLittleEndian, planted_blob: bool = False) -> Path:
    """A multi-frame MR object of about ``megabytes`` MB (native, or encapsulated fragments
    for a compressed transfer syntax: never decoded by the pipeline). Pixel data is written
    streamed, frame by frame, for the large ones."""
    ds = pydicom.dcmread(MR)
    ds.PatientName = NAME
    if planted_blob:  # a large binary value (deferred, copied, never decoded) holding the name
        ds.ICCProfile = b"\x01" * 150_000 + f" {NAME.split('^')[0]} ".encode() + b"\x02" * 150_000
    ds.file_meta.TransferSyntaxUID = ts
    frame = 256 * 256 * 2
    frames = max(1, int(megabytes * 1e6 // frame))
    ds.Rows = ds.Columns = 256
    ds.NumberOfFrames, ds.SamplesPerPixel, ds.PhotometricInterpretation = frames, 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    for tag in [t for t in ds.keys() if t >= 0x7FE00000]:
        del ds[tag]
    block = bytes((i * 7919 + 13) % 251 for i in range(frame))
    path.parent.mkdir(parents=True, exist_ok=True)
    if ts == JPEGBaseline8Bit:
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelData = encapsulate([block[: 60000 + (i % 7) * 2] for i in range(frames)])
        ds["PixelData"].VR = "OB"
        ds.save_as(path, enforce_file_format=True)
        return path
    with open(path, "wb") as f:
        import io
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        f.write(buf.getvalue())
        if ts == ImplicitVRLittleEndian:
            f.write(struct.pack("<HHI", 0x7FE0, 0x0010, frame * frames))
        else:
            f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, frame * frames))
        for _ in range(frames):
            f.write(block)
    return path


def _run(jobs: list[dict], tmp: Path, env_extra: dict | None = None, with_proc: bool = False):
    env = dict(os.environ, DICOM_DEID_TMPDIR=str(tmp), PYTHONPATH=str(REPO), **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-c", RUNNER], input="".join(json.dumps(j) + "\n" for j in jobs),
                          capture_output=True, text=True, env=env, timeout=900, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(jobs) and all(r["code"] == 0 for r in results), proc.stderr[-3000:]
    assert NAME not in proc.stdout + proc.stderr and NAME.split("^")[0] not in proc.stderr
    return (results, proc) if with_proc else results


def _outputs(out: Path) -> dict:
    files = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*.dcm") if ".staging" not in p.parts}
    rows = pq.read_table(out / "manifest").to_pylist()
    return {"files": files, "rows": [(r["status"], r["reason"], r["output_size"], r["output_sha256"]) for r in rows]}


def _job(tmp: Path, name: str, src: Path, key: Path, in_memory_max=None) -> dict:
    return {"in": str(src), "out": str(tmp / name / "out"), "private": str(tmp / name / "private"),
            "key": str(key), "in_memory_max": in_memory_max}


TS = {"explicit": ExplicitVRLittleEndian, "implicit": ImplicitVRLittleEndian, "encapsulated": JPEGBaseline8Bit}


@pytest.fixture(scope="module")
def streamed_runs(tmp_path_factory):
    """All runs of the tests below that compare the in-memory and the streamed path, in ONE
    runner process (each pipeline run is independent; one Beam start-up instead of four):
    per transfer syntax a 5 MB object run in memory then streamed, and an object with a name
    in a kept large binary value (policy keeps ICCProfile) in memory then streamed. The
    runner's ``streamed`` count is cumulative, so each run's own count is the difference."""
    root = tmp_path_factory.mktemp("streamed")
    key = write_key(root / "key.hex", "11" * 32)
    temp = root / "temp"
    temp.mkdir()
    jobs = []
    for name, ts in TS.items():
        src = _make(root / name / "in" / "mid.dcm", 5, ts)
        jobs += [_job(root / name, "memory", src, key), _job(root / name, "streamed", src, key, in_memory_max=1024 * 1024)]
    src = _make(root / "blob" / "in" / "mid.dcm", 3, planted_blob=True)
    pol = root / "blob" / "keep.yaml"
    pol.write_text("schema: 1\nname: keep-icc\nversion: '1'\noverrides:\n"
                   "  - {attribute: ICCProfile, action: keep}\n")
    for name, limit in (("memory", None), ("streamed", 1024 * 1024)):
        jobs.append(dict(_job(root / "blob", name, src, key, in_memory_max=limit), args=["--policy", str(pol)]))
    res, proc = _run(jobs, temp, with_proc=True)
    counts = [r["streamed"] - (res[i - 1]["streamed"] if i else 0) for i, r in enumerate(res)]
    return dict(root=root, temp=temp, counts=counts, proc=proc,
                index={n: i for i, n in enumerate([f"{t}/{m}" for t in (*TS, "blob") for m in ("memory", "streamed")])})


@pytest.mark.parametrize("ts", list(TS))
def test_streamed_path_writes_the_same_bytes_as_the_in_memory_path(streamed_runs, ts):
    w = streamed_runs
    i = w["index"][f"{ts}/memory"]
    assert w["counts"][i] == 0 and w["counts"][i + 1] == 1  # each took the path meant
    mem, streamed = _outputs(w["root"] / ts / "memory" / "out"), _outputs(w["root"] / ts / "streamed" / "out")
    assert mem["rows"][0][0] == "ok" and len(mem["files"]) == 1
    assert streamed == mem
    data = next(iter(mem["files"].values()))
    assert mem["rows"][0][2:] == (len(data), hashlib.sha256(data).hexdigest())
    assert list(w["temp"].iterdir()) == []  # input and output temp files removed


def test_streamed_verification_still_finds_a_name_in_raw_bytes(streamed_runs):
    """A name inside a large binary value the policy keeps (deferred on the streamed path,
    copied, never decoded: only the raw-byte search sees it) is found on the streamed path as
    on the in-memory one (quarantined, no output), and the temp files still go."""
    w = streamed_runs
    for name, streamed in (("memory", 0), ("streamed", 1)):
        assert w["counts"][w["index"][f"blob/{name}"]] == streamed
        rows = pq.read_table(w["root"] / "blob" / name / "out" / "manifest").to_pylist()
        assert [(r["status"], r["reason"]) for r in rows] == [("quarantined", "residual_phi")]
        assert not [p for p in (w["root"] / "blob" / name / "out").rglob("*.dcm")]
    assert NAME.split("^")[0] not in w["proc"].stdout + w["proc"].stderr
    assert list(w["temp"].iterdir()) == []


def test_windowed_search_is_the_whole_search():
    """Every occurrence is judged once with both neighbours, whatever the window size."""
    import io
    m = verify._Matcher(["SMITHSON", "123456"])
    cases = [b"x" * 50 + b"SMITHSON" + b"y" * 50, b"a SMITHSON b", b"SMITHSONS", b"ASMITHSON",
             b"..123456", b"1234567", b"SMITHSON", b"zz" * 40 + b" 123456", b"\x00SMITHSON\x00" * 3]
    for data in cases:
        whole = m.search(data.decode("latin-1").upper())
        for window in (1, 2, 3, 5, 8, 9, 16, 1000):
            assert m.search_file(io.BytesIO(data), len(data), window) == whole, (data, window)
        assert m.search_file(io.BytesIO(data + b"SMITHSON"), len(data), 4) == whole  # length respected


def test_serialize_to_file_equals_serialize_and_removes_its_file_on_failure(tmp_path, monkeypatch):
    from dicom_deid import reader
    for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit):
        src = _make(tmp_path / f"{ts}.dcm", 2, ts)
        whole = writer.serialize(pydicom.dcmread(src))
        ds = pydicom.dcmread(src, defer_size=reader.DEFER_SIZE)
        assert writer.has_deferred(ds)
        out = writer.serialize_to_file(ds, str(tmp_path))
        try:
            assert Path(out.path).read_bytes() == whole
            assert (out.size, out.sha256) == (len(whole), hashlib.sha256(whole).hexdigest())
            assert 0x7FE00010 in out.copied and writer.has_deferred(ds)  # nothing was loaded
        finally:
            out.remove()
    # a large private value (and a small one after it) is copied like pixel data
    ds = pydicom.dcmread(src)
    block = ds.private_block(0x0099, "DEID TEST", create=True)
    block.add_new(0x10, "OB", bytes(range(256)) * 1200)
    block.add_new(0x11, "LO", "after")
    src = tmp_path / "private.dcm"
    ds.save_as(src, enforce_file_format=True)
    whole = writer.serialize(pydicom.dcmread(src))
    ds = pydicom.dcmread(src, defer_size=reader.DEFER_SIZE)
    out = writer.serialize_to_file(ds, str(tmp_path))
    try:
        assert Path(out.path).read_bytes() == whole and set(out.copied) == {0x7FE00010, 0x00991010}
        assert ds.get_item(0x00991010, keep_deferred=True).value is None  # still deferred, not emptied
    finally:
        out.remove()
    monkeypatch.setattr(writer, "_copy", lambda *a: (_ for _ in ()).throw(writer.SourceChanged()))
    before = set(tmp_path.iterdir())
    with pytest.raises(writer.SourceChanged):
        writer.serialize_to_file(ds, str(tmp_path))
    assert set(tmp_path.iterdir()) == before


def test_large_object_memory_stays_flat(tmp_path, key_file):
    """96 MB object (above the 64 MiB in-memory limit): peak RSS of the whole pipeline
    process grows by far less than the object after a warm-up run on a small object (the
    earlier in-memory serialisation grew it by 261 MB for this object, measured)."""
    small = _make(tmp_path / "in-small" / "small.dcm", 2)
    big = _make(tmp_path / "in-big" / "big.dcm", 96)
    size = big.stat().st_size
    assert size > 64 * 1024 * 1024
    temp = tmp_path / "temp"
    temp.mkdir()
    res = _run([_job(tmp_path, "small", small, key_file), _job(tmp_path, "big", big, key_file)], temp)
    assert res[0]["streamed"] == 0 and res[1]["streamed"] == 1
    growth = (res[1]["maxrss_kb"] - res[0]["maxrss_kb"]) * 1024
    rows = pq.read_table(tmp_path / "big" / "out" / "manifest").to_pylist()
    assert [r["status"] for r in rows] == ["ok"] and rows[0]["output_size"] > size - 1024 * 1024
    print(f"peak RSS growth for a {size / 2**20:.0f} MiB object: {growth / 2**20:.1f} MiB")
    assert growth < size / 4, growth
    assert list(temp.iterdir()) == []
