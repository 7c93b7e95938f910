"""Tests for dicom_deid.standard and its packaged data (dicom_deid/data/standard)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # no packaging config yet: make the repo importable
    sys.path.insert(0, str(REPO))

from dicom_deid import standard  # noqa: E402
from dicom_deid.standard import (  # noqa: E402
    OPTION_COLUMNS,
    ProfileRow,
    attribute_type,
    iod_attribute_types,
    load_table,
    pattern_rows,
    rules_by_tag,
    safe_private_elements,
    tcia_private_dispositions,
)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
E1_CSV = "dicom-standard/PS3.15_2026d_Table_E.1-1.csv"
E3101_CSV = "dicom-standard/PS3.15_2026d_Table_E.3.10-1.csv"
TCIA_CSV = "private-tags/TCIAPrivateTagKB-02-01-2024-formatted.csv"


def _reference_dir() -> Path | None:
    env = os.environ.get("DICOM_DEID_SHARED")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared")
    for shared in candidates:
        for ref in (shared / "reference", shared):
            if (ref / E1_CSV).is_file():
                return ref
    return None


@pytest.fixture(scope="module")
def reference() -> Path:
    ref = _reference_dir()
    if ref is None:
        pytest.skip("shared reference data not available (set DICOM_DEID_SHARED)")
    return ref


def _packaged_json(name: str):
    return json.loads(resources.files("dicom_deid.data.standard").joinpath(name).read_text("utf-8"))


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    return list(reader.fieldnames or []), rows


def _tag(group: int, element: int) -> int:
    return group << 16 | element


# ----------------------------------------------------------------------- Table E.1-1


def test_packaged_e1_equals_reference_csv_row_for_row(reference: Path) -> None:
    fields, ref_rows = _read_csv(reference / E1_CSV)
    packaged = _packaged_json("table_e1_1.json")
    assert packaged["columns"] == fields
    assert packaged["edition"] == "2026d"
    assert len(packaged["rows"]) == len(ref_rows) == 657
    for i, (got, want) in enumerate(zip(packaged["rows"], ref_rows)):
        assert got == want, f"row {i}: {got} != {want}"


def test_load_table_matches_reference_csv(reference: Path) -> None:
    _, ref_rows = _read_csv(reference / E1_CSV)
    table = load_table()
    assert len(table) == len(ref_rows)
    for row, ref in zip(table, ref_rows):
        assert row.tag == ref["tag"]
        assert row.name == ref["name"]
        assert row.retired is (ref["retired"] == "Y")
        assert row.in_std_comp_iod is (ref["in_std_comp_iod"] == "Y")
        assert row.basic == ref["basic_profile"]
        assert row.options == tuple((c, ref[c]) for c in OPTION_COLUMNS if ref[c])


def test_table_shape() -> None:
    table = load_table()
    assert len(table) == 657
    assert all(isinstance(r, ProfileRow) for r in table)
    assert len(rules_by_tag()) == 653
    assert len(pattern_rows()) == 4
    assert {r.tag for r in pattern_rows()} == {
        "(50xx,xxxx)",
        "(60xx,3000)",
        "(60xx,4000)",
        "(gggg,eeee) where gggg is odd",
    }
    assert set(rules_by_tag().values()).isdisjoint(pattern_rows())
    assert OPTION_COLUMNS == (
        "rtn_safe_private",
        "rtn_uids",
        "rtn_device_identity",
        "rtn_institution_identity",
        "rtn_patient_characteristics",
        "rtn_long_full_dates",
        "rtn_long_modified_dates",
        "clean_descriptors",
        "clean_structured_content",
        "clean_graphics",
    )


def test_rules_by_tag_keys_match_tag_strings() -> None:
    for key, row in rules_by_tag().items():
        assert row.tag == f"({key >> 16:04X},{key & 0xFFFF:04X})"


def test_codes_vocabulary() -> None:
    basic = {r.basic for r in load_table()}
    assert basic == {"D", "Z", "X", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}
    option_codes = {code for r in load_table() for _, code in r.options}
    assert option_codes == {"K", "C"}


@pytest.mark.parametrize(
    ("tag", "name", "basic", "options"),
    [
        (_tag(0x0010, 0x0010), "Patient's Name", "Z", ()),
        (_tag(0x0010, 0x0030), "Patient's Birth Date", "Z", ()),
        (_tag(0x0010, 0x0020), "Patient ID", "Z/D", ()),
        (_tag(0x0008, 0x0050), "Accession Number", "Z", ()),
        (_tag(0x0008, 0x0018), "SOP Instance UID", "U", (("rtn_uids", "K"),)),
        (_tag(0x0020, 0x000D), "Study Instance UID", "U", (("rtn_uids", "K"),)),
        (
            _tag(0x0008, 0x0020),
            "Study Date",
            "Z",
            (("rtn_long_full_dates", "K"), ("rtn_long_modified_dates", "C")),
        ),
        (_tag(0x0008, 0x1140), "Referenced Image Sequence", "X/Z/U*", (("rtn_uids", "K"),)),
        (_tag(0x0018, 0x1000), "Device Serial Number", "X/Z/D", (("rtn_device_identity", "K"),)),
        (
            _tag(0x0008, 0x0080),
            "Institution Name",
            "X/Z/D",
            (("rtn_institution_identity", "K"),),
        ),
        (_tag(0x0040, 0xA730), "Content Sequence", "D", (("clean_structured_content", "C"),)),
    ],
)
def test_spot_checks(tag: int, name: str, basic: str, options: tuple) -> None:
    row = rules_by_tag()[tag]
    assert row.name == name
    assert row.basic == basic
    assert row.options == options


def test_private_pattern_row() -> None:
    (private,) = [r for r in pattern_rows() if r.tag.startswith("(gggg")]
    assert private.basic == "X"
    assert private.options == (("rtn_safe_private", "C"),)
    assert private.action([]) == "X"
    assert private.action(["rtn_safe_private"]) == "C"


def test_action_options() -> None:
    study_date = rules_by_tag()[_tag(0x0008, 0x0020)]
    assert study_date.action([]) == "Z"
    assert study_date.action(["rtn_long_full_dates"]) == "K"
    assert study_date.action(["rtn_long_modified_dates"]) == "C"
    assert study_date.action(("rtn_uids", "clean_descriptors")) == "Z"  # no code -> basic
    # Conflict between options: K beats C.
    assert study_date.action(["rtn_long_modified_dates", "rtn_long_full_dates"]) == "K"
    # A bare string is one option name, not an iterable of characters.
    assert study_date.action("rtn_long_full_dates") == "K"
    # Unknown option names are ignored.
    assert study_date.action(["clean_pixel_data"]) == "Z"

    sop_uid = rules_by_tag()[_tag(0x0008, 0x0018)]
    assert sop_uid.action(set()) == "U"
    assert sop_uid.action({"rtn_uids"}) == "K"

    patient_name = rules_by_tag()[_tag(0x0010, 0x0010)]
    assert patient_name.action(OPTION_COLUMNS) == "Z"  # no option touches Patient's Name


def test_action_k_beats_c_across_options() -> None:
    row = ProfileRow(
        tag="(0000,0000)",
        name="synthetic",
        retired=False,
        in_std_comp_iod=True,
        basic="X",
        options=(("rtn_device_identity", "C"), ("rtn_long_full_dates", "K")),
    )
    assert row.action(["rtn_device_identity"]) == "C"
    assert row.action(["rtn_long_full_dates"]) == "K"
    assert row.action(["rtn_device_identity", "rtn_long_full_dates"]) == "K"
    assert row.action([]) == "X"


def test_profile_row_is_frozen() -> None:
    row = load_table()[0]
    with pytest.raises(AttributeError):
        row.basic = "K"  # type: ignore[misc]


# ------------------------------------------------------------------------ IOD tables


def test_ct_image_attribute_types() -> None:
    types = iod_attribute_types(CT_IMAGE_STORAGE)
    assert types[(_tag(0x0010, 0x0010),)] == "2"  # Patient's Name
    assert types[(_tag(0x0008, 0x0018),)] == "1"  # SOP Instance UID
    assert types[(_tag(0x0008, 0x0020),)] == "2"  # Study Date
    assert types[(_tag(0x0020, 0x000D),)] == "1"  # Study Instance UID
    assert types[(_tag(0x0008, 0x0050),)] == "2"  # Accession Number
    assert types[(_tag(0x0010, 0x0020),)] == "2"  # Patient ID
    assert set(types.values()) <= {"1", "1C", "2", "2C", "3"}
    assert all(isinstance(p, tuple) and p and all(isinstance(t, int) for t in p) for p in types)


def test_ct_nested_attribute_path() -> None:
    types = iod_attribute_types(CT_IMAGE_STORAGE)
    # Referenced Study Sequence (0008,1110) is type 3; its item's Referenced SOP Class UID
    # (0008,1150) is type 1 inside it.
    assert types[(_tag(0x0008, 0x1110),)] == "3"
    assert types[(_tag(0x0008, 0x1110), _tag(0x0008, 0x1150))] == "1"
    assert attribute_type(CT_IMAGE_STORAGE, (_tag(0x0008, 0x1110), _tag(0x0008, 0x1155))) == "1"
    assert any(len(p) > 2 for p in types)


def test_strongest_type_across_modules() -> None:
    types = iod_attribute_types(CT_IMAGE_STORAGE)
    # Image Type: type 3 in General Image, type 1 in CT Image.
    assert types[(_tag(0x0008, 0x0008),)] == "1"
    # Acquisition Number: type 3 in General Acquisition, type 2 in CT Image.
    assert types[(_tag(0x0020, 0x0012),)] == "2"
    # Instance Number: type 2 in General Image, type 3 in SOP Common.
    assert types[(_tag(0x0020, 0x0013),)] == "2"


def test_overlay_repeating_group_keyed_at_6000() -> None:
    types = iod_attribute_types(CT_IMAGE_STORAGE)  # Overlay Plane is a U module of CT
    assert types[(_tag(0x6000, 0x0010),)] == "1"  # Overlay Rows
    assert (_tag(0x6000, 0x3000),) in types  # Overlay Data


def test_attribute_type_helper() -> None:
    assert attribute_type(CT_IMAGE_STORAGE, (_tag(0x0010, 0x0010),)) == "2"
    assert attribute_type(CT_IMAGE_STORAGE, (_tag(0x0008, 0x0018),)) == "1"
    assert attribute_type(CT_IMAGE_STORAGE, (_tag(0x0009, 0x0010),)) is None  # private
    assert attribute_type(CT_IMAGE_STORAGE + "\x00", (_tag(0x0008, 0x0018),)) == "1"
    assert attribute_type("1.2.3.4.5.6.7", (_tag(0x0008, 0x0018),)) is None


def test_unknown_sop_class_is_empty() -> None:
    assert iod_attribute_types("1.2.3.4.5.6.7") == {}
    assert iod_attribute_types("") == {}


def test_u_modules_count() -> None:
    # Clinical Trial Subject is a U module of the CT IOD: its attributes must be present.
    types = iod_attribute_types(CT_IMAGE_STORAGE)
    assert types[(_tag(0x0012, 0x0010),)] == "1"  # Clinical Trial Sponsor Name


def test_ct_deeply_nested_paths() -> None:
    types = iod_attribute_types(CT_IMAGE_STORAGE)
    # Patient module: Issuer of Patient ID Qualifiers Sequence > Assigning Facility Sequence
    # > Local Namespace Entity ID is 1C.
    issuer, facility = _tag(0x0010, 0x0024), _tag(0x0040, 0x0036)
    assert types[(issuer,)] == "3"
    assert types[(issuer, facility)] == "3"
    assert types[(issuer, facility, _tag(0x0040, 0x0031))] == "1C"
    # Code Sequence Macro inside Equivalent Code Sequence, four levels down: Code Meaning 1.
    strain = (_tag(0x0010, 0x0216), _tag(0x0010, 0x0215), _tag(0x0008, 0x0121))
    assert types[(*strain, _tag(0x0008, 0x0104))] == "1"
    assert len(types) == 5762  # every typed (path, type) of the CT IOD's 25 M/C/U modules


def test_module_tables_are_read_per_module() -> None:
    """iod_attribute_types parses only the modules of the IOD asked for (a fresh process,
    since the caches are per process), and never the whole module table."""
    code = f"""
import json
from dicom_deid import standard as s
parsed = []
read_module = s._module_attributes
s._module_attributes = lambda key: parsed.append(key) or read_module(key)
resources = []
read_resource = s._read_resource
s._read_resource = lambda name: resources.append(name) or read_resource(name)
s.iod_attribute_types({CT_IMAGE_STORAGE!r})
iod = s._sop_class_iod_map()[{CT_IMAGE_STORAGE!r}]
wanted = [m["key"] for m in s._iod_module_map()[iod] if m["usage"] in ("M", "C", "U")]
print(json.dumps({{"parsed": parsed, "wanted": wanted, "resources": resources,
                  "members": len(s._module_zip().namelist())}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True, text=True
    )
    got = json.loads(out.stdout)
    assert got["members"] == 436
    assert sorted(got["parsed"]) == sorted(set(got["wanted"])), got["parsed"]
    assert 20 <= len(got["parsed"]) <= 40  # 25 modules for CT, not all 436
    assert sorted(got["resources"]) == [
        "iod_module_map.json.gz",
        "module_attribute_map.zip",
        "sop_class_iod_map.json",
    ]


def test_unknown_module_is_empty() -> None:
    assert standard._module_paths("no-such-module") == ()
    assert standard._module_attributes("no-such-module") is None


def test_packaged_module_zip_rebuilds_the_original() -> None:
    """module_attribute_map.zip is highdicom's module_attribute_map.json split by module:
    joined back as the data README says, it is the original, byte for byte (its sha256 is
    the one recorded in the README)."""
    import hashlib
    import io
    import zipfile

    pkg = resources.files("dicom_deid.data.standard")
    zf = zipfile.ZipFile(io.BytesIO(pkg.joinpath("module_attribute_map.zip").read_bytes()))
    infos = zf.infolist()
    assert all(i.filename.endswith(".json") for i in infos)
    assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in infos)
    text = (
        b"{\n"
        + b",\n".join(
            b'  "%s": %s' % (i.filename.removesuffix(".json").encode(), zf.read(i))
            for i in infos
        )
        + b"\n}"
    )
    sha = "9026a2f2037e868396bf74c55fef77183a7a69979b83e4cd3cc2b425e87f8fa6"
    assert len(text) == 22_657_586
    assert hashlib.sha256(text).hexdigest() == sha
    readme = pkg.joinpath("README.md").read_text("utf-8")
    assert (
        "`module_attribute_map.json` -> `module_attribute_map.zip` (zip split by module, "
        f"see below; 22,657,586 bytes, sha256 `{sha}` of the original)"
    ) in readme
    assert not pkg.joinpath("module_attribute_map.json.gz").is_file()


# -------------------------------------------------------------------- private tables


def test_safe_private_elements() -> None:
    safe = safe_private_elements()
    assert isinstance(safe, frozenset)
    assert len(safe) == 479
    assert ("philips pet private group", 0x7053, 0x00) in safe  # SUV Factor
    assert ("elscint1", 0x00E1, 0x21) in safe  # DLP
    assert ("gems_parm_01", 0x0043, 0x27) in safe  # Scan Pitch Ratio
    assert ("hologic, inc.", 0x7E01, 0x01) in safe  # Codec Version
    assert all(g % 2 == 1 and 0 <= e <= 0xFF and c == c.strip().lower() for c, g, e in safe)


def test_safe_private_matches_reference(reference: Path) -> None:
    _, rows = _read_csv(reference / E3101_CSV)
    want = {
        (r["private_creator"].strip().lower(), int(r["tag"][1:5], 16), int(r["tag"][8:10], 16))
        for r in rows
    }
    assert safe_private_elements() == want


def test_tcia_dispositions() -> None:
    tcia = tcia_private_dispositions()
    assert len(tcia) > 4000
    assert set(tcia.values()) == {"k", "d", "h", "o"}
    assert all(g % 2 == 1 and 0 <= e <= 0xFF and c == c.strip().lower() for c, g, e in tcia)
    assert tcia[("siemens medcom header", 0x0029, 0x31)] == "d"
    assert tcia[("gems_petd_01", 0x0009, 0x97)] == "d"  # LO/UI h, UN d -> most protective
    assert tcia[("hologic, inc.", 0x0019, 0x07)] == "k"  # creator with a comma
    assert tcia[("hologic, inc.", 0x0019, 0x05)] == "k"  # source disposition ' k' normalized
    assert ("", 0x0009, 0x02) not in tcia  # empty creator rows are dropped


def test_tcia_kb_accounting(reference: Path) -> None:
    kb = _packaged_json("tcia_private_kb.json")
    with (reference / TCIA_CSV).open(encoding="utf-8-sig", newline="") as fh:
        n_rows = sum(1 for _ in csv.reader(fh)) - 1
    assert kb["input_rows"] == n_rows
    assert kb["row_count"] == len(kb["rows"])
    assert kb["row_count"] + sum(kb["dropped"].values()) == n_rows
    assert kb["dropped"]["empty_private_creator"] > 0
    assert kb["dropped_values"]["disposition_unknown"] == {"oi": 9}
    for r in kb["rows"]:
        assert r["disposition"] in {"k", "d", "h", "o"}
        assert isinstance(r["group"], int) and r["group"] % 2 == 1
        assert isinstance(r["element_byte"], int) and 0 <= r["element_byte"] <= 0xFF
        assert r["private_creator"] == r["private_creator"].strip()
        assert r["private_creator"] and '"' not in r["private_creator"][:1] + r["private_creator"][-1:]


# ----------------------------------------------------------------- packaging / build


def test_module_does_not_import_beam_or_highdicom() -> None:
    code = (
        "import sys; from dicom_deid import standard as s; "
        f"s.iod_attribute_types({CT_IMAGE_STORAGE!r}); s.load_table(); "
        "s.safe_private_elements(); s.tcia_private_dispositions(); "
        "bad = [m for m in ('apache_beam', 'highdicom') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_build_script_is_deterministic_and_packaged_data_is_current(
    reference: Path, tmp_path: Path
) -> None:
    pytest.importorskip("highdicom")
    script = REPO / "scripts" / "build_standard_tables.py"
    subprocess.run(
        [sys.executable, str(script), "--reference", str(reference), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    packaged = Path(standard.__file__).parent / "data" / "standard"
    built = sorted(p.name for p in tmp_path.iterdir())
    assert built == sorted(
        p.name for p in packaged.iterdir() if p.is_file() and not p.name.endswith(".pyc")
    )
    for name in built:
        assert (tmp_path / name).read_bytes() == (packaged / name).read_bytes(), name
