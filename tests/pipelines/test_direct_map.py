"""Direct pseudonym mode (plain HMAC, no lookup table or exclusion list): no header scan of
the inputs, the map holds only the store's exceptions, new patients reach the store before
anything is published. Same outputs and the same store as the scanned map."""

from __future__ import annotations

import glob

import pyarrow.parquet as pq
import pytest

from dicom_deid import cli, keys, pseudonyms as ps, sample
from tests.conftest import write_key


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("direct")
    s = sample.generate(root / "in", n_files=10, n_patients=3, seed=31, ct512_share=0.5)
    key = write_key(root / "k.key", "5c" * 32)
    return dict(root=root, sample=s, key=key, deriver=keys.Deriver(bytes.fromhex("5c" * 32)))


def _run(w, name, *extra, workers=2):
    """One in-process CLI run (the local runner's workers are subprocesses)."""
    out, priv = w["root"] / name / "out", w["root"] / name / "priv"
    code = cli.main(["run", "--input", f"{w['root']}/in/**", "--output", str(out), "--private", str(priv),
                     "--key", str(w["key"]), "--no-progress", f"--direct_num_workers={workers}", *extra])
    assert code == 0
    return out, priv


def _outputs(out):
    return {p.relative_to(out): p.read_bytes() for p in out.rglob("*.dcm") if ".staging" not in p.parts}


def _store(w, priv):
    return {k: (r["pseudonym"], r["date_offset_days"], r["source"])
            for k, r in ps.read_store(ps.store_dir(str(priv)), w["deriver"].key_fingerprint()).items()}


def _counters(out, run_id):
    import json
    return json.loads((out / "summary" / f"run-{run_id}.json").read_text()) if (
        out / "summary" / f"run-{run_id}.json").exists() else None


def test_settings_decide_the_mode():
    assert not ps.Settings(store_dir="x").needs_scan
    assert ps.Settings(store_dir="x", force_scan=True).needs_scan
    assert ps.Settings(store_dir="x", strategy="sequential").needs_scan
    assert ps.Settings(store_dir="x", strategy="lookup").needs_scan
    assert ps.Settings(store_dir="x", lookup_table="t.csv").needs_scan
    assert ps.Settings(store_dir="x", exclusions="e.csv").needs_scan


@pytest.fixture(scope="module")
def direct_run(inputs):
    """One direct run (2 workers) on fresh prefixes, shared: its outputs are compared with a
    scanned run's, and a copy of its prefixes is run again."""
    out, priv = _run(inputs, "d", "--run-id", "d1")
    return dict(out=out, priv=priv, outputs=_outputs(out), store=_store(inputs, priv),
                parts=sorted(glob.glob(f"{ps.store_dir(str(priv))}/part-*.parquet")))


def test_direct_and_scanned_give_identical_outputs_and_store(inputs, direct_run):
    out_d, direct_store = direct_run["out"], direct_run["store"]
    assert len(direct_store) == 3 and {v[2] for v in direct_store.values()} == {"hmac"}
    # one worker: the map mode, not the worker count, is compared (the direct run has 2)
    out_s, priv_s = _run(inputs, "s", "--run-id", "s1", "--pseudonym-map", "scan", workers=1)
    rows = [r for r in pq.read_table(out_d / "manifest").to_pylist() if r["run_id"] == "d1"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) >= 5 and len(direct_run["outputs"]) == len(ok)
    assert direct_run["outputs"] == _outputs(out_s)
    cols = ("input_key", "status", "reason", "pseudo_patient_id", "sop_uid", "output_sha256")
    scanned_rows = pq.read_table(out_s / "manifest").to_pylist()
    assert sorted(tuple(r[c] for c in cols) for r in rows) == sorted(tuple(r[c] for c in cols) for r in scanned_rows)
    assert _store(inputs, priv_s) == direct_store
    # every published output carries a stored pseudonym
    assert {r["pseudo_patient_id"] for r in ok} <= {v[0] for v in direct_store.values()}


def test_direct_rerun_adds_nothing_and_keeps_outputs(inputs, direct_run):
    # the first run is the shared direct run (2 workers, fresh prefixes); the re-run (1 worker)
    # goes to a copy of its prefixes, so the shared run's own files stay as they were
    import shutil
    for name in ("out", "priv"):
        shutil.copytree(direct_run[name], inputs["root"] / "again" / name)
    out, priv = inputs["root"] / "again" / "out", inputs["root"] / "again" / "priv"
    parts = sorted(glob.glob(f"{ps.store_dir(str(priv))}/part-*.parquet"))
    first = _outputs(out)
    assert len(parts) >= 1 and len(parts) == len(direct_run["parts"]) and first == direct_run["outputs"]
    _run(inputs, "again", "--run-id", "a2", workers=1)
    assert sorted(glob.glob(f"{ps.store_dir(str(priv))}/part-*.parquet")) == parts
    assert _outputs(out) == first
    rows = pq.read_table(out / "manifest").to_pylist()
    first_run = sorted((r["input_key"], r["status"]) for r in rows if r["run_id"] == "d1")
    assert len(first_run) == 10
    assert sorted((r["input_key"], r["status"]) for r in rows if r["run_id"] == "a2") == first_run


def test_direct_uses_stored_exceptions(inputs, tmp_path):
    """A patient given a research ID by an earlier lookup-table run keeps it in a later
    plain run (the store's exception reaches the direct map); the others get the
    derivation, and only they are new in the store."""
    import pydicom
    ds = next(d for d in (pydicom.dcmread(f, stop_before_pixels=True) for f in inputs["sample"].files)
              if d.Modality == "CT")  # CT: published by the basic policy (NM waits for pixels)
    table = tmp_path / "lookup.csv"
    table.write_text(f"patient_id,issuer,research_id\n{ds.PatientID},{ds.IssuerOfPatientID},"
                     "RESEARCH-7\n")
    d = inputs["deriver"]
    pk = d.patient_key(str(ds.PatientID), str(ds.IssuerOfPatientID))
    out, priv = _run(inputs, "exc", "--run-id", "e1", "--lookup-table", str(table), workers=1)
    assert _store(inputs, priv)[pk][0] == "RESEARCH-7"
    out2 = inputs["root"] / "exc" / "out2"
    assert cli.main(["run", "--input", f"{inputs['root']}/in/**", "--output", str(out2), "--private", str(priv),
                     "--key", str(inputs["key"]), "--no-progress", "--run-id", "e2"]) == 0
    rows = [r for r in pq.read_table(out2 / "manifest").to_pylist() if r["status"] == "ok"]
    by_pseud = {r["pseudo_patient_id"] for r in rows}
    assert "RESEARCH-7" in by_pseud
    others = by_pseud - {"RESEARCH-7"}
    assert others and others <= {d.pseudonym(k) for k in _store(inputs, priv) if k != pk}
    # the lookup run stored every patient of the run; the plain run added none
    assert {r["run_id"] for r in pq.read_table(ps.store_dir(str(priv))).to_pylist()} == {"e1"}
