"""Engine tests for pseudonyms: NHS numbers, person keys, tables, store, strategies, dates."""

from __future__ import annotations

import datetime as dt
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_deid import keys, policy, pseudonyms as ps, tags
from dicom_deid.errors import ConfigError

K1, K2 = b"\x01" * 32, b"\x02" * 32
NHS = "9434765919"          # valid modulus-11 (test range style)
NHS2 = "9990001235"


def _ds(pid="RX1234567", issuer="PRI", nhs=None, nhs_issuer="NHS", other=None):
    ds = Dataset()
    ds.PatientID = pid
    if issuer is not None:
        ds.IssuerOfPatientID = issuer
    ds.StudyInstanceUID = "1.2.3.4"
    items = []
    if nhs:
        it = Dataset()
        it.PatientID = nhs
        it.IssuerOfPatientID = nhs_issuer
        items.append(it)
    if other:
        it = Dataset()
        it.PatientID, it.IssuerOfPatientID = other
        items.append(it)
    if items:
        ds.OtherPatientIDsSequence = Sequence(items)
    return ds


def test_nhs_number_modulus_11():
    assert ps.normalise_nhs_number("943 476 5919") == NHS
    assert ps.normalise_nhs_number("943-476-5919") == NHS
    assert ps.normalise_nhs_number("9434765918") is None          # wrong check digit
    assert ps.normalise_nhs_number("943476591") is None           # nine digits
    assert ps.normalise_nhs_number(NHS2) == NHS2
    from dicom_deid import sample                                  # agrees with the generator
    for first9 in ("999000123", "401023213", "123456789"):
        assert ps.nhs_check_digit(first9) == sample.nhs_check_digit(first9)


def test_person_key_patient_id_matches_previous_derivation():
    d = keys.Deriver(K1)
    ds = _ds(nhs=NHS)
    assert ps.person_key(ds, d).hmac == d.patient_key("RX1234567", "PRI")
    assert tags.patient_key_of(ds, d) == d.patient_key("RX1234567", "PRI")
    ds.PatientID = ""
    assert ps.person_key(ds, d).kind == "study"


def test_nhs_person_key_unifies_hospital_numbers():
    d = keys.Deriver(K1)
    a = _ds("RX1", "PRI", nhs=NHS)
    b = _ds("SQ9", "SQH", nhs="943 476 5919")
    assert ps.person_key(a, d).hmac != ps.person_key(b, d).hmac       # patient_id mode
    ka, kb = ps.person_key(a, d, "nhs_number"), ps.person_key(b, d, "nhs_number")
    assert ka.hmac == kb.hmac and ka.kind == "nhs_number"
    assert tags.patient_key_of(a, d, "nhs_number") == ka.hmac
    # invalid check digit or non-NHS issuer: not a person key, falls back to PatientID
    bad = _ds("RX1", "PRI", nhs="9434765918")
    assert ps.person_key(bad, d, "nhs_number").kind == "patient_id"
    other_issuer = _ds("RX1", "PRI", nhs=NHS, nhs_issuer="PRI")
    assert ps.person_key(other_issuer, d, "nhs_number").kind == "patient_id"
    # ... but exclusions still match it (over-matching is safe)
    assert d.patient_key(NHS, "NHS") in ps.person_key(other_issuer, d).candidates


def test_person_key_repr_and_candidates_hold_no_plaintext():
    d = keys.Deriver(K1)
    pk = ps.person_key(_ds(nhs=NHS, other=("HOSP77", "SQH")), d)
    text = repr(pk) + json.dumps(pk.candidates)
    for v in ("RX1234567", NHS, "HOSP77", "PRI", "SQH"):
        assert v not in text
    assert d.patient_key("HOSP77", "") in pk.candidates


def _csv(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_lookup_table_csv_and_parquet_hashed(tmp_path):
    d = keys.Deriver(K1)
    uri = _csv(tmp_path, "l.csv", f"NHS_Number,research_id,date_offset_days\n{NHS},STUDY-1,-400\n"
                                  f",STUDY-2,\n".replace(",STUDY-2,", "") + "")
    rows = dict(ps.iter_lookup(uri, d))
    assert rows == {d.patient_key(NHS, "NHS"): ps.LookupEntry("STUDY-1", -400)}
    pq.write_table(pa.table({"patient_id": ["RX1"], "issuer": ["PRI"], "research_id": ["S9"]}),
                   tmp_path / "l.parquet")
    rows = dict(ps.iter_lookup(str(tmp_path / "l.parquet"), d))
    assert rows == {d.patient_key("RX1", "PRI"): ps.LookupEntry("S9", None)}


@pytest.mark.parametrize("text, match", [
    ("nhs_number,research_id\n9434765918,S1\n", "row 2: nhs_number is not a valid"),
    ("patient_id,research_id\nRX1,\n", "row 2: research_id"),
    ("patient_id,research_id,date_offset_days\nRX1,S1,0\n", "must not be 0"),
    ("patient_id,research_id\nRX1,S1\nRX2,S1\n", "already given to another patient"),
    ("patient_id,research_id\nRX1,S1\nRX1,S2\n", "two different entries"),
    ("who,research_id\nRX1,S1\n", "needs columns"),
])
def test_lookup_table_errors_name_rows_never_values(tmp_path, text, match):
    uri = _csv(tmp_path, "l.csv", text)
    with pytest.raises(ps.TableError, match=match) as ei:
        list(ps.iter_lookup(uri, keys.Deriver(K1)))
    for v in ("9434765918", "RX1", "RX2", "S1", "S2"):
        assert v not in str(ei.value)


def test_exclusions_and_launcher_validation(tmp_path):
    d = keys.Deriver(K1)
    uri = _csv(tmp_path, "x.csv", f"nhs_number,patient_id,issuer\n{NHS},,\n,RX5,PRI\n\n")
    assert set(ps.iter_exclusions(uri, d)) == {d.patient_key(NHS, "NHS"), d.patient_key("RX5", "PRI")}
    ps.validate_tables(None, uri)
    with pytest.raises(ps.TableError, match="not found"):
        ps.validate_tables(str(tmp_path / "nope.csv"), None)
    bad = _csv(tmp_path, "bad.csv", "nhs_number\n1234567890\n")
    with pytest.raises(ConfigError, match="row 2"):
        ps.validate_tables(None, bad)


def _settings(tmp_path, **kw):
    return ps.Settings(store_dir=str(tmp_path / "store"), **kw)


def test_decide_precedence(tmp_path):
    d = keys.Deriver(K1)
    s = _settings(tmp_path)
    pk = d.patient_key("RX1", "PRI")
    # new patient, hmac: derived values and a new store row
    entry, row, pending = ps.decide(pk, [], [], False, s, d, "r1")
    assert entry == {"pseudonym": d.pseudonym(pk), "date_offset_days": d.date_offset_days(pk)}
    assert row["source"] == "hmac" and row["key_fingerprint"] == d.key_fingerprint() and not pending
    # in the store: the stored entry, nothing new
    entry2, row2, _ = ps.decide(pk, [row], [], False, s, d, "r2")
    assert entry2 == entry and row2 is None
    # lookup wins over hmac (and over the store), recorded as a new row
    le = ps.LookupEntry("STUDY-7", None)
    entry3, row3, _ = ps.decide(pk, [row], [(True, le)], False, s, d, "r3")
    assert entry3 == {"pseudonym": "STUDY-7", "date_offset_days": row["date_offset_days"]}
    assert row3["source"] == "lookup"
    # ... and once stored, nothing new
    assert ps.decide(pk, [row, row3], [(True, le)], False, s, d, "r4")[1] is None
    # an exact match wins over a match through another identifier; disagreement quarantines
    other = ps.LookupEntry("STUDY-8", None)
    assert ps.decide(pk, [], [(True, le), (False, other)], False, s, d, "r")[0]["pseudonym"] == "STUDY-7"
    assert ps.decide(pk, [], [(False, le), (False, other)], False, s, d, "r")[0] == {
        "status": "quarantined", "reason": "lookup_conflict"}
    # exclusion beats everything and records nothing
    assert ps.decide(pk, [row], [(True, le)], True, s, d, "r")[:2] == (
        {"status": "excluded", "reason": "exclusion_list"}, None)
    # lookup strategy: unknown patients are quarantined, never guessed
    sl = _settings(tmp_path, strategy="lookup")
    assert ps.decide(pk, [], [], False, sl, d, "r")[0] == {"status": "quarantined",
                                                           "reason": "not_in_lookup_table"}
    # sequential: pending for the single writer
    assert ps.decide(pk, [], [], False, _settings(tmp_path, strategy="sequential"), d, "r")[2] is True


def test_sequential_numbers_stable_and_continue(tmp_path):
    d = keys.Deriver(K1)
    s = _settings(tmp_path, strategy="sequential", sequential_prefix="STUDY", sequential_digits=4)
    pks = [d.patient_key(f"RX{i}", "") for i in range(5)]
    first = {pk: e["pseudonym"] for pk, e, _ in ps.number_new(reversed(pks), 0, s, d, "r1")}
    again = {pk: e["pseudonym"] for pk, e, _ in ps.number_new(pks, 0, s, d, "r1")}
    assert first == again and sorted(first.values()) == [f"STUDY{n:04d}" for n in range(1, 6)]
    new = list(ps.number_new([d.patient_key("RX99", "")], 5, s, d, "r2"))
    assert new[0][1]["pseudonym"] == "STUDY0006" and new[0][2]["sequence"] == 6


def test_store_roundtrip_and_mixed_key_refused(tmp_path):
    d1, d2 = keys.Deriver(K1), keys.Deriver(K2)
    sdir = str(tmp_path / "store")
    ps.check_store(sdir, d1.key_fingerprint())
    ps.check_store(sdir, d1.key_fingerprint())                     # same key: fine
    with pytest.raises(ps.MixedKeyError, match="another key"):
        ps.check_store(sdir, d2.key_fingerprint())
    pk = d1.patient_key("RX1", "")
    ps.write_store_part(sdir, "part-r1-00.parquet",
                        [ps.store_row(pk, "DDX", -400, "hmac", d1.key_fingerprint(), "r1")], d1.key_fingerprint())
    assert ps.read_store(sdir, d1.key_fingerprint())[pk]["pseudonym"] == "DDX"
    with pytest.raises(ps.MixedKeyError):
        ps.read_store(sdir, d2.key_fingerprint())
    # a store copied in without _store.json is still checked through its part files
    (tmp_path / "store" / "_store.json").unlink()
    with pytest.raises(ps.MixedKeyError):
        ps.check_store(sdir, d2.key_fingerprint(), create=False)
    # pyarrow reads the store folder as one table (the metadata file is skipped)
    ps.check_store(sdir, d1.key_fingerprint())
    assert pq.read_table(sdir).num_rows == 1


def test_policy_pseudonym_section():
    pol = policy.parse("schema: 1\nname: x\nversion: 1\npseudonyms: {strategy: sequential, prefix: STUDY, "
                       "digits: 5, person_key: nhs_number, date_offset_days: [-100, -10]}")
    assert (pol.strategy, pol.sequential_prefix, pol.sequential_digits, pol.person_key) == (
        "sequential", "STUDY", 5, "nhs_number")
    for bad, where in (("{strategy: guess}", "strategy"), ("{person_key: name}", "person_key"),
                       ("{prefix: 'A B'}", "prefix"), ("{colour: red}", "colour")):
        with pytest.raises(ConfigError, match=where):
            policy.parse(f"schema: 1\nname: x\nversion: 1\npseudonyms: {bad}")


# ----------------------------------------------------------------------------- dates

def test_shift_date_da_dt_offsets_partial_and_multivalued():
    assert tags.shift_date("20200301", -1) == "20200229"
    assert tags.shift_date("20200301120000.123456+0100", -1) == "20200229120000.123456+0100"
    assert tags.shift_date("20200301-0500", -366) == "20190301-0500"  # DT date + UTC offset only
    assert tags.shift_date("garbage", -10) == ""
    from pydicom.dataelem import DataElement
    e = DataElement(0x00181202, "DA", ["20200101", "20200102"])
    tags._shift(e, -1)
    assert list(e.value) == ["20191231", "20200101"]


def test_shift_dt_year_and_year_month_keep_precision_and_offsets():
    # whole years / months: the offset rounded (half away from zero), precision kept
    assert tags.shift_date("2020", -400) == "2019"            # -1.10 y -> -1
    assert tags.shift_date("2020", -3650) == "2010"           # -9.99 y -> -10
    assert tags.shift_date("2020", -365) == "2019"            # never left unshifted in the default range
    assert tags.shift_date("202003", -400) == "201902"        # -13.1 months -> -13
    assert tags.shift_date("202001", -31) == "201912"         # across a year end
    assert tags.shift_date("2020+0100", -400) == "2019+0100"  # UTC offset kept
    assert tags.shift_date("202003-0530", -400) == "201902-0530"
    assert tags.shift_date("202003 ", -400) == "201902"       # padding
    # fractional seconds and offsets of full DTs kept digit for digit
    assert tags.shift_date("20200301235959.5+1400", -1) == "20200229235959.5+1400"
    assert tags.shift_date("2020030112-1200", -1) == "2020022912-1200"
    # the leap-year jitter a literal "shift the mid-point day" would have: 2020 and 2021
    # moved by different amounts for one patient (-183 d from 2 July lands in 2020 both
    # times); whole-year rounding keeps the one-year interval
    assert (tags.shift_date("2020", -183), tags.shift_date("2021", -183)) == ("2019", "2020")


@pytest.mark.parametrize("days", [-3650, -2000, -1001, -400, -365, -183, -30, -1, 1, 45, 200])
def test_partial_dt_intervals_exact_and_error_at_most_one_unit(days):
    def ym(s):
        return int(s[:4]) * 12 + int(s[4:6]) - 1
    months = [f"{y:04d}{m:02d}" for y in (1999, 2000, 2023, 2024) for m in range(1, 13)]
    shifted = {m: tags.shift_date(m, days) for m in months}
    for a in months:  # intervals between values of the same precision kept exactly
        for b in months[::7]:
            assert ym(shifted[b]) - ym(shifted[a]) == ym(b) - ym(a)
    for m in months:  # every day of the month, shifted exactly, lands within one month
        y, mo = int(m[:4]), int(m[4:])
        day = dt.date(y, mo, 1)
        while day.month == mo:
            exact = day + dt.timedelta(days=days)
            assert abs((exact.year * 12 + exact.month - 1) - ym(shifted[m])) <= 1
            day += dt.timedelta(days=1)
    for y in (1999, 2000, 2023, 2024):
        out = int(tags.shift_date(str(y), days))
        assert out - y == int(tags.shift_date("2001", days)) - 2001
        for doy in (0, 182, 364):
            assert abs((dt.date(y, 1, 1) + dt.timedelta(days=doy + days)).year - out) <= 1


def test_multivalued_dt_with_offsets_and_nothing_unshifted_passes():
    from pydicom.dataelem import DataElement
    e = DataElement(0x0040A120, "DT", ["20200301120000+0100", "202003-0500", "2020", "20200301"])
    tags._shift(e, -366)
    assert list(e.value) == ["20190301120000+0100", "201903-0500", "2019", "20190301"]
    e = DataElement(0x0040A120, "DT", "2020+0000\\20200229000000.000001-1200")
    tags._shift(e, -1)  # one day is less than half a year: the year-only value stays
    assert list(e.value) == ["2020+0000", "20200228000000.000001-1200"]
    e = DataElement(0x0040A120, "DT", b"202003+0100\\20200301")  # raw bytes, as read
    tags._shift(e, -400)
    assert list(e.value) == ["201902+0100", "20190126"]
    # ranges (queries only): both ends shifted, never one passed through as it was
    assert tags.shift_date("20200101-20201231", -10) == "20191222-20201221"
    assert tags.shift_date("-20201231", -10) == "-20201221"
    assert tags.shift_date("2019-2021", -365) == "2018-2020"
    assert tags.shift_date("20200301-0500-20200401-0500", -1) == "20200229-0500-20200331-0500"
    # legacy ACR-NEMA DA form normalised; everything else emptied, never passed through
    assert tags.shift_date("2020.03.01", -1) == "20200229"
    for bad in ("20200301 DOE", "20200301^SMITH", "20200230", "2020031", "202013",
                "20200301250000", "20200301+1500", "20200301.5", "0001", "DOE 2020"):
        assert tags.shift_date(bad, -400) == "", bad


def test_offsets_in_range_never_zero_and_intervals_kept():
    d = keys.Deriver(K1, (-30, 30))
    offs = {d.date_offset_days(d.patient_key(f"P{i}", "")) for i in range(2000)}
    assert 0 not in offs and min(offs) >= -30 and max(offs) <= 30 and len(offs) > 50
    off = d.date_offset_days(d.patient_key("P1", ""))
    a, b = tags.shift_date("20190107", off), tags.shift_date("20230615", off)
    days = lambda s: dt.date(int(s[:4]), int(s[4:6]), int(s[6:8]))  # noqa: E731
    assert (days(b) - days(a)) == (dt.date(2023, 6, 15) - dt.date(2019, 1, 7))


# ----------------------------------------------------------------------------- key references

def test_gcp_secret_manager_key_reference(monkeypatch):
    import sys
    import types
    calls = []

    class _Client:
        def access_secret_version(self, request):
            calls.append(request["name"])
            return types.SimpleNamespace(payload=types.SimpleNamespace(data=b"cd" * 32))

    monkeypatch.setitem(sys.modules, "google.cloud.secretmanager",
                        types.SimpleNamespace(SecretManagerServiceClient=_Client))
    key = keys.resolve(keys.KeyRef("gcpsm://projects/p1/secrets/deid-key"))
    assert key == bytes.fromhex("cd" * 32)
    assert calls == ["projects/p1/secrets/deid-key/versions/latest"]
    with pytest.raises(ConfigError, match="must be gcpsm://projects"):
        keys.resolve(keys.KeyRef("gcpsm://deid-key"))

    class _Failing:
        def access_secret_version(self, request):
            raise PermissionError("denied for projects/p1/secrets/deid-key")

    monkeypatch.setitem(sys.modules, "google.cloud.secretmanager",
                        types.SimpleNamespace(SecretManagerServiceClient=_Failing))
    with pytest.raises(ConfigError, match=r"\(PermissionError\)$"):
        keys.resolve(keys.KeyRef("gcpsm://projects/p1/secrets/deid-key/versions/3"))


# ----------------------------------------------------------------------------- store lock

def test_store_lock_take_wait_release_and_clear_error(tmp_path):
    sdir = ps.store_dir(str(tmp_path / "priv"))
    a = ps.StoreLock(sdir, "20260101T000000Z-aaaaaa", lease=5).acquire()
    assert a.exclusive and a.seq == 1
    ticket = json.loads(open(f"{sdir}/_lock/000000000001.json").read())
    assert set(ticket) == {"seq", "state", "run_id", "token", "lease_seconds", "written", "expires"}
    notes = []
    b = ps.StoreLock(sdir, "20260101T000001Z-bbbbbb", lease=5, wait=0.6)
    with pytest.raises(ps.StoreLocked, match="in use by run 20260101T000000Z-aaaaaa") as err:
        b.acquire(notify=notes.append)
    assert str(tmp_path) not in str(err.value)        # no path in the message
    assert notes and "waiting up to" in notes[0]
    # the fence inside the pipeline: another run's live lease refuses writes
    ps.check_store_holder(sdir, a.run_id)
    with pytest.raises(ps.StoreLockLost):
        ps.check_store_holder(sdir, b.run_id)
    a.release()
    ps.check_store_holder(sdir, b.run_id)              # released: writable
    with ps.StoreLock(sdir, b.run_id, lease=5, wait=1) as held:
        assert held.seq == 3                          # 1 held, 2 released, 3 held
    names = sorted(os.listdir(f"{sdir}/_lock"))
    assert names == ["000000000003.json", "000000000004.json"]   # older tickets cleaned up
    # parquet readers of the store folder skip the lock folder
    ps.check_store(sdir, keys.Deriver(K1).key_fingerprint())
    d = keys.Deriver(K1)
    ps.write_store_part(sdir, "part-x-00.parquet", [ps.store_row("ab" * 32, "DDX", -400, "hmac",
                                                                 d.key_fingerprint(), "x")], d.key_fingerprint())
    assert pq.read_table(sdir).num_rows == 1


def test_store_lock_renews_and_a_stalled_lease_is_taken_over(tmp_path):
    import time
    sdir = ps.store_dir(str(tmp_path / "priv"))
    a = ps.StoreLock(sdir, "run-a", lease=0.4).acquire()
    time.sleep(1.0)                                   # renewed every 0.1 s meanwhile
    assert a.seq > 3 and not a.lost
    assert len(os.listdir(f"{sdir}/_lock")) <= 3
    a._stop.set()                                     # a crash: renewals stop, no release
    a._thread.join()
    b = ps.StoreLock(sdir, "run-b", lease=0.4, wait=10)
    t0 = time.monotonic()
    b.acquire()                                       # not renewed for a lease while watched
    assert time.monotonic() - t0 < 3
    assert not a._write(a.seq + 1, "held")            # the old holder cannot renew ...
    with pytest.raises(ps.StoreLockLost):
        ps.check_store_holder(sdir, "run-a")          # ... nor write store parts
    b.release()


def test_store_lock_unsupported_storage_is_detected(tmp_path, monkeypatch):
    from dicom_deid import storage
    real = storage.create_if_absent

    def ignoring(uri, data, on_retry=None):          # a store that ignores the precondition
        storage.write_bytes(uri, data)
        return True
    sdir = ps.store_dir(str(tmp_path / "priv"))
    monkeypatch.setattr(storage, "create_if_absent", ignoring)
    lk = ps.StoreLock(sdir, "r", lease=5).acquire()
    assert not lk.exclusive
    lk.release()
    with pytest.raises(ps.StoreLockUnsupported, match="sequential"):
        ps.StoreLock(sdir, "r2", lease=5).acquire(require_exclusive=True)
    monkeypatch.setattr(storage, "create_if_absent", real)


def test_pipeline_releases_the_lease_after_its_store_commit(tmp_path):
    import time
    sdir = ps.store_dir(str(tmp_path / "priv"))
    a = ps.StoreLock(sdir, "run-a", lease=0.4).acquire()
    assert not ps.release_from_pipeline(sdir, "run-b")          # not b's lease: nothing
    assert ps.release_from_pipeline(sdir, "run-a")
    assert not ps.release_from_pipeline(sdir, "run-a")          # already released
    b = ps.StoreLock(sdir, "run-b", lease=5, wait=1).acquire()  # at once
    time.sleep(0.3)
    assert a.released_early and not a.lost                     # a's launcher saw it, quietly
    a.release()                                                # and never releases b's lease
    with pytest.raises(ps.StoreLockLost):
        ps.check_store_holder(sdir, "run-a")
    b.release()
