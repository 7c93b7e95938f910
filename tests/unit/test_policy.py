import pytest

from dicom_deid import policy
from dicom_deid.errors import ConfigError
from dicom_deid.options import make_config


def test_builtins_load():
    assert {"basic", "research"} <= set(policy.builtin_names())
    b = policy.load("basic")
    assert b.options == () and b.unapplied_options == ()
    r = policy.load("research")
    assert "rtn_long_modified_dates" in r.applied_options
    assert "clean_descriptors" in r.applied_options
    assert r.unapplied_options == ("clean_pixel_data",)  # no pixel stage yet: reported


@pytest.mark.parametrize("text, where", [
    ("schema: 1\nname: x\nversion: 1\noptions: [retain_everything]\n", "options[0]"),
    ("schema: 1\nname: x\nversion: 1\nbogus: 3\n", "bogus"),
    ("schema: 2\nname: x\nversion: 1\n", "schema"),
    ("schema: 1\nname: x\nversion: 1\noptions: [\n", "line"),
    ("schema: 1\nname: x\nversion: 1\npseudonyms: {date_offset_days: [0, 0]}\n", "date_offset_days"),
])
def test_bad_policy_names_key_and_file(tmp_path, text, where):
    f = tmp_path / "p.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        policy.load(str(f))
    assert str(f) in str(e.value) and where in str(e.value)


def test_strict_refuses_unapplied_options(tmp_path, key_file):
    with pytest.raises(ConfigError, match="--strict"):
        make_config([str(tmp_path)], str(tmp_path / "o"), str(tmp_path / "p"), policy="research",
                    key=str(key_file), strict=True)
    cfg = make_config([str(tmp_path)], str(tmp_path / "o"), str(tmp_path / "p"), policy="basic",
                      key=str(key_file), strict=True)
    assert cfg.policy.name == "basic"
