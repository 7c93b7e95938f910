"""End to end through the CLI: pseudonyms, date offsets and UIDs agree across runs and
worker counts, differ across keys; references stay consistent; exclusions and lookup
tables; the store grows only for new patients; nothing public recomputes a pseudonym."""

from __future__ import annotations

import datetime as dt
import glob
import hashlib
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


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "dicom_deid.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


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
    run_cli("run", *common, "--key", key_a, "--direct_num_workers=2", "--run-id", "r1")
    parts1 = sorted(glob.glob(f"{priv}/pseudonyms/part-*.parquet"))
    bytes1 = {p: p.read_bytes() for p in out.rglob("*.dcm")}
    run_cli("run", *common, "--key", key_a, "--direct_num_workers=1", "--run-id", "r2")
    parts2 = sorted(glob.glob(f"{priv}/pseudonyms/part-*.parquet"))
    # another key, sequential IDs
    seq_policy = root / "seq.yaml"
    seq_policy.write_text("schema: 1\nname: seq\nversion: '1'\noptions: [rtn_long_modified_dates]\n"
                          "pseudonyms: {strategy: sequential, prefix: STUDY, digits: 4, "
                          "date_offset_days: [-400, -100]}\n")
    out_b, priv_b = root / "out_b", root / "priv_b"
    run_cli("run", "--input", f"{inputs}/**", "--output", out_b, "--private", priv_b, "--policy", seq_policy,
            "--key", key_b, "--no-progress", "--run-id", "rb")
    # lookup strategy: only patient 0 is in the table
    look_policy = root / "look.yaml"
    look_policy.write_text("schema: 1\nname: look\nversion: '1'\npseudonyms: {strategy: lookup}\n")
    table = root / "lookup.csv"
    table.write_text(f"patient_id,research_id\n{pids[0]},RESEARCH-0042\n")
    out_l, priv_l = root / "out_l", root / "priv_l"
    run_cli("run", "--input", f"{inputs}/**", "--output", out_l, "--private", priv_l, "--policy", look_policy,
            "--lookup-table", table, "--key", key_a, "--no-progress", "--run-id", "rl")
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
