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


def test_generated_policy_tables_match_code():
    """docs/policy-*.md are `dicom-deid policy show --format markdown` output; regenerate
    them when the rules change (the command is in the README)."""
    from dicom_deid import cli
    for name in ("basic", "research", "allowlist"):
        text = (REPO / "docs" / f"policy-{name}.md").read_text()
        assert text.rstrip("\n") == cli.policy_table(name, "markdown")
        assert text.count("\n| (") >= 657


def test_policy_show_resolves_known_rows():
    from dicom_deid import policy, tags
    basic = {r["tag"]: r for r in tags.effective_actions(policy.load("basic"))}
    assert basic["(0010,0010)"]["note"] == "replaced by the keyed pseudonym"
    assert basic["(0008,0050)"]["action"] == "Z"
    research = {r["tag"]: r for r in tags.effective_actions(policy.load("research"))}
    assert research["(0008,0020)"]["action"] == "C"                 # study date shifted
    assert research["(0008,1030)"]["action"] == "C"                 # study description cleaned
