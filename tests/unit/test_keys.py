import os
import pickle
import stat
import uuid

import pytest

from dicom_deid import keys
from dicom_deid.errors import ConfigError

K1, K2 = b"\x01" * 32, b"\x02" * 32


def test_uid_is_2_25_version8_uuid_and_deterministic():
    d = keys.Deriver(K1)
    new = d.uid("1.2.826.0.1.3680043.2.1125.1.12345")
    assert new.startswith("2.25.") and len(new) <= 64
    u = uuid.UUID(int=int(new[5:]))
    assert u.version == 8 and u.variant == uuid.RFC_4122
    assert keys.Deriver(K1).uid("1.2.826.0.1.3680043.2.1125.1.12345") == new
    assert keys.Deriver(K2).uid("1.2.826.0.1.3680043.2.1125.1.12345") != new
    assert d.uid("1.2.826.0.1.3680043.2.1125.1.12346") != new


def test_uid_cache_is_bounded_and_does_not_change_results():
    d = keys.Deriver(K1)
    first = [d.uid(f"1.2.3.{i}") for i in range(3)]
    for i in range(2 * keys._UID_CACHE_MAX + 5):  # one per object, like SOP Instance UIDs
        d.uid(f"1.2.826.0.1.{i}")
        assert len(d._uid_cache) <= keys._UID_CACHE_MAX
    assert [d.uid(f"1.2.3.{i}") for i in range(3)] == first  # recomputed after a clear
    assert first == [keys.Deriver(K1).uid(f"1.2.3.{i}") for i in range(3)]


def test_registry_uids_never_remapped():
    d = keys.Deriver(K1)
    for uid in ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"):
        assert d.uid(uid) == uid


def test_date_offset_in_range_never_zero():
    d = keys.Deriver(K1, (-3650, -365))
    offs = {d.date_offset_days(d.patient_key(f"P{i}")) for i in range(500)}
    assert all(-3650 <= o <= -365 for o in offs) and len(offs) > 100
    z = keys.Deriver(K1, (-1, 1))
    assert all(z.date_offset_days(z.patient_key(f"P{i}")) != 0 for i in range(200))


def test_pseudonym_depends_on_key_and_patient():
    a, b = keys.Deriver(K1), keys.Deriver(K2)
    pk = a.patient_key("RX123456", "HOSP")
    assert a.pseudonym(pk) == keys.Deriver(K1).pseudonym(pk)
    assert a.pseudonym(pk) != b.pseudonym(b.patient_key("RX123456", "HOSP"))
    assert a.patient_key("RX123456", "HOSP") != a.patient_key("RX123456", "OTHER")
    assert len(a.pseudonym(pk)) <= 64 and "RX123456" not in a.pseudonym(pk)


def test_deriver_refuses_pickling():
    with pytest.raises(TypeError):
        pickle.dumps(keys.Deriver(K1))


def test_keyref_resolution(tmp_path, monkeypatch):
    f = tmp_path / "k"
    f.write_text("ab" * 32 + "\n")
    assert keys.resolve(keys.KeyRef(str(f))) == bytes.fromhex("ab" * 32)
    monkeypatch.setenv("DD_TEST_KEY", "cd" * 32)
    assert keys.resolve(keys.KeyRef("env:DD_TEST_KEY")) == bytes.fromhex("cd" * 32)
    with pytest.raises(ConfigError):
        keys.resolve(keys.KeyRef("env:DD_MISSING_KEY"))
    with pytest.raises(ConfigError):
        keys.resolve(keys.KeyRef(str(tmp_path / "missing")))
    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(ConfigError):
        keys.resolve(keys.KeyRef(str(short)))
    # a key reference is just a reference: pickling it carries no key bytes
    assert b"ab" * 4 not in pickle.dumps(keys.KeyRef(str(f)))


def test_generated_key_is_owner_only(tmp_path):
    ref, created = keys.ensure_local_key(tmp_path / "cfg" / "key")
    assert created
    mode = stat.S_IMODE(os.stat(ref.ref).st_mode)
    assert mode == 0o600
    again, created2 = keys.ensure_local_key(tmp_path / "cfg" / "key")
    assert not created2 and again == ref
    assert len(keys.resolve(ref)) == 32
