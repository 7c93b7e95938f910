"""ScanHeaders + BuildPseudonymMap under Beam's FnApiRunner: the map holds only this run's
patients, the store grows by immutable part files only for new patients, strategies, and
no plaintext identifier in any grouped or side-input PCollection."""

from __future__ import annotations

import collections
import glob
import os

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from dicom_deid import keys, pseudonyms as ps, sample
from dicom_deid.manifest import RunInfo
from dicom_deid.transforms.pseudonyms import MAP, BuildPseudonymMap, ScanHeaders

Ref = collections.namedtuple("Ref", "uri size")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pseudo")
    s = sample.generate(root / "in", n_files=12, n_patients=4, seed=5)
    key = root / "k.hex"
    key.write_text("33" * 32 + "\n")
    return dict(root=root, sample=s, key=keys.KeyRef(str(key)), deriver=keys.Deriver(b"\x33" * 32))


def _refs(files):
    return [Ref(str(f), os.path.getsize(f)) for f in files]


def _run_map(world, priv, run_id, settings_kw=None, files=None, dump=None):
    """Run scan + map building; return (map as dict, counters). ``dump``: folder where every
    intermediate PCollection is written as text (for plaintext scans)."""
    settings = ps.Settings(store_dir=ps.store_dir(str(priv)), **(settings_kw or {}))
    ps.check_store(settings.store_dir, world["deriver"].key_fingerprint())
    run = RunInfo(run_id, "basic", "1", "0", str(priv.parent / "out"), str(priv))
    out = priv.parent / f"map-{run_id}"
    p = beam.Pipeline(runner=FnApiRunner())
    refs = p | beam.Create(_refs(files or world["sample"].files))
    scanned = refs | ScanHeaders(world["key"], settings.person_key)
    built = scanned | BuildPseudonymMap(run, world["key"], settings)
    built[MAP] | "MapText" >> beam.Map(repr) | "WriteMap" >> beam.io.WriteToText(str(out))
    if dump:
        for name, pc in built.items():
            pc | f"Repr{name}" >> beam.Map(repr) | f"Dump{name}" >> beam.io.WriteToText(f"{dump}/{name}")
    result = p.run()
    result.wait_until_finish()
    entries = {}
    for f in glob.glob(f"{out}*"):
        for line in open(f):
            k, v = eval(line)  # our own repr of (str, dict)
            entries[k] = v
    counters = {r.key.metric.name: r.committed for r in result.metrics().query(
        MetricsFilter().with_namespace("dicom_deid.pseudonyms"))["counters"]}
    return entries, counters


def _fill_store(world, priv, n):
    d = world["deriver"]
    rows = [ps.store_row(d.patient_key(f"EARLIER{i}", "X"), f"DD{i}", -400, "hmac", d.key_fingerprint(), "old")
            for i in range(n)]
    sdir = ps.store_dir(str(priv))
    ps.check_store(sdir, d.key_fingerprint())
    for j in range(0, n, 25_000):
        ps.write_store_part(sdir, f"part-old-{j}.parquet", rows[j:j + 25_000], d.key_fingerprint())


def test_map_holds_only_this_runs_patients_and_rerun_adds_nothing(world, tmp_path):
    priv = tmp_path / "priv"
    _fill_store(world, priv, 5_000)
    entries, c = _run_map(world, priv, "r1")
    assert len(entries) == 4                          # 4 patients, not 5,004
    assert c["store_rows_read"] == 5_000 and c["store_rows_written"] == 4
    d = world["deriver"]
    for p in world["sample"].patients:
        pk = d.patient_key(p.patient_id, _issuer_of(world, p))
        assert entries[pk] == {"pseudonym": d.pseudonym(pk), "date_offset_days": d.date_offset_days(pk)}
    parts = sorted(glob.glob(f"{ps.store_dir(str(priv))}/part-*.parquet"))
    again, c2 = _run_map(world, priv, "r2")
    assert again == entries
    assert c2.get("store_rows_written", 0) == 0
    assert sorted(glob.glob(f"{ps.store_dir(str(priv))}/part-*.parquet")) == parts   # nothing added


def _issuer_of(world, patient):
    import pydicom
    for f in world["sample"].files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if ds.PatientID == patient.patient_id:
            return str(ds.IssuerOfPatientID)
    raise AssertionError("patient not found")


def test_sequential_same_numbers_on_rerun_new_numbers_only_for_new(world, tmp_path):
    priv = tmp_path / "priv"
    kw = dict(strategy="sequential", sequential_prefix="STUDY", sequential_digits=4)
    by_patient = collections.defaultdict(list)
    import pydicom
    for f in world["sample"].files:
        by_patient[pydicom.dcmread(f, stop_before_pixels=True).PatientID].append(f)
    pids = sorted(by_patient)
    first_files = [f for pid in pids[:2] for f in by_patient[pid]]
    m1, _ = _run_map(world, priv, "r1", kw, files=first_files)
    assert sorted(e["pseudonym"] for e in m1.values()) == ["STUDY0001", "STUDY0002"]
    m2, c2 = _run_map(world, priv, "r2", kw)                          # all four patients
    assert {k: m2[k] for k in m1} == m1                               # same numbers again
    assert sorted(e["pseudonym"] for k, e in m2.items() if k not in m1) == ["STUDY0003", "STUDY0004"]
    assert c2["store_rows_written"] == 2
    m3, c3 = _run_map(world, priv, "r3", kw)
    assert m3 == m2 and c3.get("store_rows_written", 0) == 0


def _tables(world, tmp_path):
    """A lookup table for patient 0 (by NHS number), an exclusion for patient 1 (by NHS
    number) and for patient 2 (by hospital number without issuer)."""
    pts = world["sample"].patients
    nhs = [next(v for v in p.other_values if v.isdigit() and len(v) == 10) for p in pts]
    lookup = tmp_path / "lookup.csv"
    lookup.write_text(f"nhs_number,research_id,date_offset_days\n{nhs[0]},RESEARCH-0001,-777\n")
    excl = tmp_path / "optout.csv"
    excl.write_text(f"nhs_number,patient_id\n{nhs[1][:3]} {nhs[1][3:6]} {nhs[1][6:]},\n,{pts[2].patient_id}\n")
    return str(lookup), str(excl), nhs


def test_lookup_wins_exclusions_and_lookup_strategy(world, tmp_path):
    lookup, excl, _ = _tables(world, tmp_path)
    d, pts = world["deriver"], world["sample"].patients
    pk = [d.patient_key(p.patient_id, _issuer_of(world, p)) for p in pts]
    m, c = _run_map(world, tmp_path / "priv", "r1", dict(lookup_table=lookup, exclusions=excl))
    assert m[pk[0]] == {"pseudonym": "RESEARCH-0001", "date_offset_days": -777}
    assert m[pk[1]]["status"] == "excluded" and m[pk[2]]["status"] == "excluded"
    assert m[pk[3]]["pseudonym"] == d.pseudonym(pk[3])
    assert c["patients_excluded"] == 2
    store = ps.read_store(ps.store_dir(str(tmp_path / "priv")), d.key_fingerprint())
    assert set(store) == {pk[0], pk[3]}                # excluded patients are not recorded
    assert store[pk[0]]["source"] == "lookup"
    ml, _ = _run_map(world, tmp_path / "priv2", "r1", dict(strategy="lookup", lookup_table=lookup))
    assert ml[pk[0]]["pseudonym"] == "RESEARCH-0001"
    assert all(ml[k] == {"status": "quarantined", "reason": "not_in_lookup_table"} for k in pk[1:])


def test_nhs_number_person_key_merges_hospital_numbers(world, tmp_path):
    """Two files of one person under two hospital numbers: one entry with nhs_number."""
    import pydicom
    f0 = world["sample"].files[0]
    ds = pydicom.dcmread(f0)
    ds.PatientID, ds.IssuerOfPatientID = "OTHERHOSP1", "SQH"
    copy = tmp_path / "other-hospital.dcm"
    ds.save_as(copy)
    m_pid, _ = _run_map(world, tmp_path / "a", "r1", files=[f0, copy])
    m_nhs, _ = _run_map(world, tmp_path / "b", "r1", dict(person_key="nhs_number"), files=[f0, copy])
    assert len(m_pid) == 2 and len(m_nhs) == 1


def test_no_plaintext_in_grouped_or_side_input_pcollections(world, tmp_path):
    lookup, excl, nhs = _tables(world, tmp_path)
    dump = tmp_path / "dump"
    priv = tmp_path / "priv"
    _fill_store(world, priv, 10)
    _run_map(world, priv, "r1", dict(lookup_table=lookup, exclusions=excl), dump=str(dump))
    planted = set(world["sample"].planted_values()) | set(nhs)
    files = [f for f in glob.glob(f"{dump}/*")]
    names = {os.path.basename(f).split("-")[0] for f in files}
    assert {"scanned", "candidates", "lookup", "exclusions", "matched", "store", "decided", "grouped"} <= names
    text = "".join(open(f, encoding="utf-8", errors="replace").read() for f in files)
    assert "RESEARCH-0001" in text                    # the dump really holds the map data
    hits = sorted(v for v in planted if v in text or v.upper() in text.upper())
    assert hits == [], f"{len(hits)} planted values found in grouped/side-input collections"
    # the store and the map files, too
    store_text = "".join(str(r) for r in pq.read_table(ps.store_dir(str(priv))).to_pylist())
    assert not [v for v in planted if v in store_text]


def test_mixed_key_store_fails_the_job(world, tmp_path):
    priv = tmp_path / "priv"
    other = keys.Deriver(b"\x44" * 32)
    sdir = ps.store_dir(str(priv))
    ps.write_store_part(sdir, "part-x-00.parquet",
                        [ps.store_row("ab" * 32, "DDX", -400, "hmac", other.key_fingerprint(), "x")],
                        other.key_fingerprint())
    with pytest.raises(ps.MixedKeyError):
        ps.check_store(sdir, world["deriver"].key_fingerprint())
    settings = ps.Settings(store_dir=sdir)
    run = RunInfo("r", "basic", "1", "0", str(tmp_path / "out"), str(priv))
    p = beam.Pipeline(runner=FnApiRunner())
    _ = (p | beam.Create(_refs(world["sample"].files[:1])) | ScanHeaders(world["key"])
         | BuildPseudonymMap(run, world["key"], settings))
    with pytest.raises(Exception, match="another key"):
        p.run().wait_until_finish()


def test_store_writes_fenced_by_another_runs_live_lease(world, tmp_path):
    """A run whose lease lapsed and was taken over (or a pipeline built without the
    launcher's lock) never writes store parts while another run holds the store."""
    priv = tmp_path / "priv"
    sdir = ps.store_dir(str(priv))
    other = ps.StoreLock(sdir, "other-run", lease=60).acquire()
    try:
        with pytest.raises(Exception, match="held by another run"):
            _run_map(world, priv, "r1")
        assert not glob.glob(f"{sdir}/part-*.parquet")
    finally:
        other.release()
    entries, c = _run_map(world, priv, "r1")          # released: the same run now writes
    assert len(entries) == 4 and c["store_rows_written"] == 4
