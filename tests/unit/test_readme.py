"""The README documents the manifest schema the code writes; this fails when they drift."""

import re

from dicom_deid import manifest
from tests.conftest import REPO


def test_readme_manifest_table_matches_schema():
    text = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \| ([^|]+) \|$", text, re.M)
    assert [r[0] for r in rows] == list(manifest.COLUMNS)
    for name, typ, desc in rows:
        assert typ.strip() == str(manifest.SCHEMA.field(name).type)
        assert desc.strip() == manifest.DESCRIPTIONS[name]


def test_readme_names_the_two_commands_and_ci_uses_the_second():
    text = (REPO / "README.md").read_text()
    assert "bash scripts/demo.sh" in text and "bash scripts/test.sh" in text
    assert "scripts/test.sh" in (REPO / ".ci" / "run").read_text()
