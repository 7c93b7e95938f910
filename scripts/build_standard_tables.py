#!/usr/bin/env python
"""Build ``dicom_deid/data/standard/`` from the shared reference data and highdicom.

Inputs (read-only):

* ``<shared>/reference/dicom-standard/PS3.15_2026d_Table_E.1-1.{csv,json}``
* ``<shared>/reference/dicom-standard/PS3.15_2026d_Table_E.3.10-1.{csv,json}``
* ``<shared>/reference/private-tags/TCIAPrivateTagKB-02-01-2024-formatted.csv``
* the installed ``highdicom`` package's ``_standard/*.json`` (MIT)

``<shared>`` is ``$DICOM_DEID_SHARED`` if set, else ``<repo>/../shared``; ``--reference``
overrides the reference directory itself.

Outputs (in ``dicom_deid/data/standard/``, deterministic: sorted keys, no timestamps,
gzip with mtime=0, zip members with a fixed date):

* ``table_e1_1.json``          all 657 rows of Table E.1-1 + provenance header
* ``safe_private.json``        Table E.3.10-1 rows + provenance header
* ``tcia_private_kb.json``     normalized TCIA private tag KB rows + ``dropped`` counts
* ``sop_class_iod_map.json``   verbatim copy from highdicom
* ``iod_module_map.json.gz``   gzip of the verbatim highdicom file
* ``module_attribute_map.zip``  the verbatim highdicom file split by module: one deflated
  member ``<module key>.json`` per module, holding the module's value bytes exactly as in
  the original, in the original's order (see :func:`split_module_map`); the run time reads
  only the modules an IOD needs
* ``README.md``                provenance note (generated, do not hand-edit)
* ``__init__.py``              makes the directory an importable resource package

Usage::

    /work/venv/bin/python scripts/build_standard_tables.py [--reference DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import hashlib
import io
import json
import os
import re
import sys
import zipfile
from importlib import metadata, resources
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "dicom_deid" / "data" / "standard"

E1_STEM = "PS3.15_2026d_Table_E.1-1"
E3101_STEM = "PS3.15_2026d_Table_E.3.10-1"
TCIA_NAME = "TCIAPrivateTagKB-02-01-2024-formatted.csv"

E1_COLUMNS = (
    "tag",
    "name",
    "retired",
    "in_std_comp_iod",
    "basic_profile",
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
OPTION_COLUMNS = E1_COLUMNS[5:]
E1_ROW_COUNT = 657
E1_PATTERN_TAGS = (
    "(50xx,xxxx)",
    "(60xx,3000)",
    "(60xx,4000)",
    "(gggg,eeee) where gggg is odd",
)
# Action codes of PS3.15 E.1.1 (Basic column) and the codes the Option columns use.
BASIC_CODES = {"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}
OPTION_CODES = {"K", "C"}

E3101_COLUMNS = ("tag", "private_creator", "vr", "vm", "meaning")
TCIA_DISPOSITIONS = ("k", "d", "h", "o")

HIGHDICOM_FILES = (
    # (source name in highdicom/_standard, output name, packaging: copy | gzip | split)
    ("sop_class_iod_map.json", "sop_class_iod_map.json", "copy"),
    ("iod_module_map.json", "iod_module_map.json.gz", "gzip"),
    ("module_attribute_map.json", "module_attribute_map.zip", "split"),
)
# Outputs of earlier versions of this script that a rerun removes from --out.
STALE_OUTPUTS = ("module_attribute_map.json.gz",)
# Module keys become zip member names: keep them plain.
MODULE_KEY_RE = re.compile(r"[a-z0-9][a-z0-9-]*")

CONCRETE_TAG_RE = re.compile(r"\(([0-9A-F]{4}),([0-9A-F]{4})\)")
SAFE_PRIVATE_TAG_RE = re.compile(r"\(([0-9A-Fa-f]{4}),xx([0-9A-Fa-f]{2})\)")
# TCIA signature: components "(gggg,eeee)" or "(gggg,<creator>,ee)" joined by "[<n>]".
TCIA_SEP_RE = re.compile(r"\[<\d+>\]")
TCIA_STD_RE = re.compile(r"\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)")
TCIA_PRIV_RE = re.compile(r"\(([0-9A-Fa-f]{4}),(.*),([0-9A-Fa-f]{2})\)")


class BuildError(RuntimeError):
    pass


# --------------------------------------------------------------------------- helpers


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dump_json(obj: dict, row_keys: tuple[str, ...] = ("rows",)) -> str:
    """Deterministic JSON: sorted keys; lists named in ``row_keys`` one item per line."""
    placeholders: dict[str, list] = {}
    shallow = dict(obj)
    for key in row_keys:
        if key in shallow:
            token = f"@@ROWS:{key}@@"
            placeholders[token] = shallow[key]
            shallow[key] = token
    text = json.dumps(shallow, indent=1, sort_keys=True, ensure_ascii=False)
    for token, rows in placeholders.items():
        if rows:
            body = ",\n".join(
                "  " + json.dumps(r, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
                for r in rows
            )
            rendered = "[\n" + body + "\n ]"
        else:
            rendered = "[]"
        text = text.replace(json.dumps(token), rendered, 1)
    return text + "\n"


def gzip_bytes(data: bytes) -> bytes:
    buf = io.BytesIO()
    # filename="" and mtime=0 keep the output byte-for-byte reproducible.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as fh:
        fh.write(data)
    return buf.getvalue()


# The original layout of module_attribute_map.json (json.dump with indent=2): the split
# form rebuilds it exactly as HEAD + SEP.join(ITEM % (key, value bytes)) + TAIL.
MODULE_MAP_HEAD, MODULE_MAP_SEP, MODULE_MAP_TAIL = b"{\n", b",\n", b"\n}"
MODULE_MAP_ITEM = b'  "%s": %s'


def split_module_map(data: bytes) -> list[tuple[str, bytes]]:
    """``(module key, value bytes)`` of highdicom's module_attribute_map.json, in file order.

    The value bytes are the exact slice of the original; :func:`join_module_map` of the
    result must give back ``data`` byte for byte (checked), so the zip of these members is a
    lossless repackaging of the original."""
    text = data.decode("utf-8")
    decoder = json.JSONDecoder()
    ws = re.compile(r"[ \t\n\r]*")
    parts: list[tuple[str, bytes]] = []
    i = ws.match(text, 0).end()
    if text[i] != "{":
        raise BuildError("module_attribute_map.json: not an object")
    i = ws.match(text, i + 1).end()
    while text[i] != "}":
        key, i = decoder.raw_decode(text, i)
        i = ws.match(text, i).end()
        if text[i] != ":":
            raise BuildError("module_attribute_map.json: malformed")
        start = ws.match(text, i + 1).end()
        _, i = decoder.raw_decode(text, start)
        if not isinstance(key, str) or not MODULE_KEY_RE.fullmatch(key):
            raise BuildError(f"module_attribute_map.json: unexpected module key {key!r}")
        parts.append((key, text[start:i].encode("utf-8")))
        i = ws.match(text, i).end()
        if text[i] == ",":
            i = ws.match(text, i + 1).end()
    if ws.match(text, i + 1).end() != len(text):
        raise BuildError("module_attribute_map.json: trailing data")
    if len({k for k, _ in parts}) != len(parts):
        raise BuildError("module_attribute_map.json: duplicate module keys")
    if join_module_map(parts) != data:
        raise BuildError(
            "module_attribute_map.json: layout changed, the split form would not rebuild "
            "the original; update MODULE_MAP_* in this script"
        )
    return parts


def join_module_map(parts: list[tuple[str, bytes]]) -> bytes:
    """Inverse of :func:`split_module_map`: the original file's bytes."""
    return (
        MODULE_MAP_HEAD
        + MODULE_MAP_SEP.join(MODULE_MAP_ITEM % (k.encode("utf-8"), v) for k, v in parts)
        + MODULE_MAP_TAIL
    )


def zip_members(members: list[tuple[str, bytes]]) -> bytes:
    """A deterministic zip (fixed dates and attributes, deflate level 9), members in order."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            info.external_attr = 0o644 << 16
            zf.writestr(info, data, compresslevel=9)
    return buf.getvalue()


def write_if_changed(path: Path, data: bytes) -> None:
    if path.exists() and path.read_bytes() == data:
        print(f"  unchanged {path.name} ({len(data):,} bytes)")
        return
    path.write_bytes(data)
    print(f"  wrote     {path.name} ({len(data):,} bytes)")


def read_csv_dicts(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


# ---------------------------------------------------------------------- Table E.1-1


def build_e1(ref: Path) -> tuple[dict, dict]:
    json_path = ref / "dicom-standard" / f"{E1_STEM}.json"
    csv_path = ref / "dicom-standard" / f"{E1_STEM}.csv"
    source = json.loads(json_path.read_text(encoding="utf-8"))
    rows = source["rows"]
    fields, csv_rows = read_csv_dicts(csv_path)

    if tuple(fields) != E1_COLUMNS:
        raise BuildError(f"E.1-1 CSV columns {fields} != {E1_COLUMNS}")
    if any(tuple(r.keys()) != E1_COLUMNS for r in rows):
        raise BuildError("E.1-1 JSON rows do not have the expected columns")
    if rows != csv_rows:
        raise BuildError("E.1-1 reference JSON and CSV disagree")
    if len(rows) != E1_ROW_COUNT:
        raise BuildError(f"E.1-1 has {len(rows)} rows, expected {E1_ROW_COUNT}")

    tags = [r["tag"] for r in rows]
    if len(set(tags)) != len(tags):
        raise BuildError("duplicate tags in E.1-1")
    patterns = [t for t in tags if not CONCRETE_TAG_RE.fullmatch(t)]
    if sorted(patterns) != sorted(E1_PATTERN_TAGS):
        raise BuildError(f"unexpected pattern rows in E.1-1: {patterns}")
    for r in rows:
        if r["retired"] not in ("Y", "N") or r["in_std_comp_iod"] not in ("Y", "N"):
            raise BuildError(f"bad Y/N flag in {r['tag']}")
        if r["basic_profile"] not in BASIC_CODES:
            raise BuildError(f"unknown basic code {r['basic_profile']!r} in {r['tag']}")
        for col in OPTION_COLUMNS:
            if r[col] and r[col] not in OPTION_CODES:
                raise BuildError(f"unknown option code {r[col]!r} in {r['tag']} {col}")

    stats = {
        "rows": len(rows),
        "concrete": len(rows) - len(patterns),
        "patterns": len(patterns),
        "basic": dict(sorted(collections.Counter(r["basic_profile"] for r in rows).items())),
        "options": {
            col: dict(sorted(collections.Counter(r[col] for r in rows if r[col]).items()))
            for col in OPTION_COLUMNS
        },
    }
    try:  # informational only
        from pydicom.datadict import dictionary_has_tag

        stats["tags_unknown_to_pydicom"] = sum(
            1
            for t in tags
            if CONCRETE_TAG_RE.fullmatch(t) and not dictionary_has_tag(int(t[1:5] + t[6:10], 16))
        )
    except ImportError:  # pragma: no cover
        pass

    out = {
        "table": source["table"],
        "edition": source["edition"],
        "acknowledgement": source["acknowledgement"],
        "transcribed_from": source["transcribed_from"],
        "copyright": "DICOM PS3.15 (c) NEMA",
        "columns": list(E1_COLUMNS),
        "option_columns": list(OPTION_COLUMNS),
        "row_count": len(rows),
        "source_files": {
            f"reference/dicom-standard/{json_path.name}": sha256_bytes(json_path.read_bytes()),
            f"reference/dicom-standard/{csv_path.name}": sha256_bytes(csv_path.read_bytes()),
        },
        "generated_by": "scripts/build_standard_tables.py",
        "rows": rows,  # reference order (alphabetical by attribute name), unchanged
    }
    return out, stats


# -------------------------------------------------------------------- Table E.3.10-1


def build_e3101(ref: Path) -> tuple[dict, dict]:
    json_path = ref / "dicom-standard" / f"{E3101_STEM}.json"
    csv_path = ref / "dicom-standard" / f"{E3101_STEM}.csv"
    source = json.loads(json_path.read_text(encoding="utf-8"))
    rows = source["rows"]
    fields, csv_rows = read_csv_dicts(csv_path)
    if tuple(fields) != E3101_COLUMNS:
        raise BuildError(f"E.3.10-1 CSV columns {fields} != {E3101_COLUMNS}")
    if rows != csv_rows:
        raise BuildError("E.3.10-1 reference JSON and CSV disagree")
    digest = sha256_bytes(json.dumps(rows, sort_keys=True, separators=(",", ":")).encode())
    if digest != source.get("content_sha256"):
        raise BuildError("E.3.10-1 content_sha256 does not match its rows")

    keys = set()
    for r in rows:
        m = SAFE_PRIVATE_TAG_RE.fullmatch(r["tag"])
        if not m:
            raise BuildError(f"unparseable E.3.10-1 tag {r['tag']!r}")
        group = int(m.group(1), 16)
        if group % 2 != 1:
            raise BuildError(f"E.3.10-1 tag {r['tag']} is not in an odd group")
        if not r["private_creator"].strip():
            raise BuildError(f"E.3.10-1 tag {r['tag']} has no private creator")
        key = (r["private_creator"].strip().lower(), group, int(m.group(2), 16))
        if key in keys:
            raise BuildError(f"duplicate E.3.10-1 entry {key}")
        keys.add(key)

    out_rows = [{c: r[c] for c in E3101_COLUMNS} for r in rows]
    out = {
        "table": source["table"],
        "edition": source["edition"],
        "acknowledgement": source["acknowledgement"],
        "copyright": "DICOM PS3.15 (c) NEMA",
        "schema": source.get("schema"),
        "sources": source.get("sources"),
        "content_sha256": source["content_sha256"],
        "transcribed_from": "github pymedphys/pymedphys "
        "lib/pymedphys/_dicom/deidentify/_standard/e3_10_1.json @985a1bd9",
        "columns": list(E3101_COLUMNS),
        "tag_format": "(gggg,xxee): gggg odd group, ee element byte within the creator's block",
        "row_count": len(out_rows),
        "source_files": {
            f"reference/dicom-standard/{json_path.name}": sha256_bytes(json_path.read_bytes()),
            f"reference/dicom-standard/{csv_path.name}": sha256_bytes(csv_path.read_bytes()),
        },
        "generated_by": "scripts/build_standard_tables.py",
        "rows": out_rows,  # reference order
    }
    stats = {
        "rows": len(out_rows),
        "creators": len({r["private_creator"] for r in rows}),
        "empty_vr": sum(1 for r in rows if not r["vr"]),
        "empty_meaning": sum(1 for r in rows if not r["meaning"]),
    }
    return out, stats


# ------------------------------------------------------------------- TCIA private KB


def _clean_creator(raw: str) -> str:
    """Strip whitespace and the stray quotes left by the KB's mangled CSV quoting."""
    return raw.strip().strip('"').strip()


def parse_tcia_signature(sig: str):
    """Split an element signature into components.

    Returns a list of ("std", group, element) / ("priv", group, raw_creator, element_byte)
    tuples, or None when a component does not parse.
    """
    parts = TCIA_SEP_RE.split(sig.strip())
    if parts and parts[-1] == "":
        parts = parts[:-1]
    if not parts:
        return None
    out = []
    for comp in parts:
        m = TCIA_STD_RE.fullmatch(comp)
        if m:
            out.append(("std", int(m.group(1), 16), int(m.group(2), 16)))
            continue
        m = TCIA_PRIV_RE.fullmatch(comp)
        if m:
            out.append(("priv", int(m.group(1), 16), m.group(2), int(m.group(3), 16)))
            continue
        return None
    return out


def _component_text(comp) -> str:
    if comp[0] == "std":
        return f"({comp[1]:04X},{comp[2]:04X})"
    return f'({comp[1]:04X},"{_clean_creator(comp[2])}",{comp[3]:02X})'


def build_tcia(ref: Path) -> tuple[dict, dict]:
    path = ref / "private-tags" / TCIA_NAME
    raw = path.read_bytes()
    text = raw.decode("utf-8-sig")
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader)
    expected = ["element_sig_pattern", "tag_name", "vr", "private_disposition"]
    if header != expected:
        raise BuildError(f"TCIA KB header {header} != {expected}")

    dropped: collections.Counter[str] = collections.Counter()
    dropped_values: dict[str, collections.Counter[str]] = collections.defaultdict(
        collections.Counter
    )
    normalized: collections.Counter[str] = collections.Counter()
    rows: list[dict] = []
    seen: set[tuple] = set()
    total = 0
    for rec in reader:
        if not rec or all(not f.strip() for f in rec):
            continue
        total += 1
        if len(rec) != 4:
            dropped["wrong_field_count"] += 1
            continue
        sig, _name, vr, disp_raw = rec
        comps = parse_tcia_signature(sig)
        if comps is None:
            dropped["unparseable_signature"] += 1
            continue
        leaf = comps[-1]
        if leaf[0] != "priv":
            # A standard attribute inside a private sequence: not a private element.
            dropped["leaf_not_private"] += 1
            continue
        _, group, creator_raw, element_byte = leaf
        if group % 2 != 1:
            dropped["group_not_odd"] += 1
            continue
        creator = _clean_creator(creator_raw)
        if not creator:
            dropped["empty_private_creator"] += 1
            continue
        disp = disp_raw.strip().lower()
        if disp not in TCIA_DISPOSITIONS:
            if disp == "":
                dropped["disposition_empty"] += 1
            elif disp == "na":
                dropped["disposition_na"] += 1
            else:
                dropped["disposition_unknown"] += 1
                dropped_values["disposition_unknown"][disp_raw] += 1
            continue
        vr = vr.strip().upper()
        if vr and not re.fullmatch(r"[A-Z]{2}", vr):
            dropped["bad_vr"] += 1
            dropped_values["bad_vr"][vr] += 1
            continue
        parent = [_component_text(c) for c in comps[:-1]]
        row = {
            "group": group,
            "private_creator": creator,
            "element_byte": element_byte,
            "vr": vr,
            "disposition": disp,
            "parent_path": parent,
        }
        key = (group, creator, element_byte, vr, disp, tuple(parent))
        if key in seen:
            dropped["duplicate_after_normalization"] += 1
            continue
        seen.add(key)
        rows.append(row)
        # Normalizations are counted for kept rows only.
        if creator != creator_raw:
            normalized["private_creator_quotes_or_space_stripped"] += 1
        if disp_raw.strip() != disp_raw:
            normalized[f"disposition_whitespace_stripped({disp_raw!r})"] += 1
        elif disp_raw != disp:
            normalized[f"disposition_lowercased({disp_raw!r})"] += 1

    rows.sort(
        key=lambda r: (
            r["group"],
            r["private_creator"].lower(),
            r["private_creator"],
            r["element_byte"],
            r["parent_path"],
            r["vr"],
            r["disposition"],
        )
    )
    if total != len(rows) + sum(dropped.values()):
        raise BuildError("TCIA row accounting does not add up")

    # Aggregate per (creator lower, group, element byte) the way standard.py does.
    agg: dict[tuple, set[str]] = collections.defaultdict(set)
    for r in rows:
        agg[(r["private_creator"].lower(), r["group"], r["element_byte"])].add(r["disposition"])
    conflicts = collections.Counter(
        "+".join(sorted(v)) for v in agg.values() if len(v) > 1
    )

    out = {
        "source": "The Cancer Imaging Archive (TCIA) private tag knowledge base, "
        "TCIAPrivateTagKB-02-01-2024-formatted.csv, mirrored in "
        "MIC-DKFZ/miccai2024_midi-b-submission docs/ @ e3e62bae",
        "licence": "none stated by the source; see README.md",
        "source_files": {f"reference/private-tags/{path.name}": sha256_bytes(raw)},
        "columns": ["group", "private_creator", "element_byte", "vr", "disposition", "parent_path"],
        "dispositions": {"k": "keep", "d": "delete", "h": "hash", "o": "offset date"},
        "notes": [
            "group: int (odd); element_byte: int 0x00-0xFF, the element's low byte within "
            "the private creator's block; private_creator: stripped of whitespace and the "
            "stray quotes of the source's mangled CSV quoting, case preserved",
            "parent_path: enclosing sequence items from the source signature, outermost "
            "first, as '(GGGG,EEEE)' or '(GGGG,\"creator\",EE)'; empty for top-level elements",
            "dispositions were stripped and lower-cased (' k' -> k, K -> k, D -> d); "
            "rows with na, empty or other dispositions (e.g. oi) are dropped, see 'dropped'",
            "rows can differ only by vr (TCIA often deletes the UN/OB form of an element it "
            "keeps when the VR is known); dicom_deid.standard.tcia_private_dispositions() "
            "resolves such conflicts to the most protective disposition d > h > o > k",
        ],
        "input_rows": total,
        "row_count": len(rows),
        "dropped": dict(sorted(dropped.items())),
        "dropped_values": {k: dict(sorted(v.items())) for k, v in sorted(dropped_values.items())},
        "normalized": dict(sorted(normalized.items())),
        "generated_by": "scripts/build_standard_tables.py",
        "rows": rows,
    }
    stats = {
        "input_rows": total,
        "kept_rows": len(rows),
        "dropped": out["dropped"],
        "dropped_values": out["dropped_values"],
        "normalized": out["normalized"],
        "keys": len(agg),
        "keys_with_conflicting_dispositions": dict(sorted(conflicts.items())),
        "dispositions_by_key": dict(
            sorted(
                collections.Counter(
                    next(d for d in ("d", "h", "o", "k") if d in v) for v in agg.values()
                ).items()
            )
        ),
    }
    return out, stats


# ------------------------------------------------------------------------ highdicom


def build_highdicom() -> tuple[dict[str, bytes], dict]:
    version = metadata.version("highdicom")
    base = resources.files("highdicom") / "_standard"
    outputs: dict[str, bytes] = {}
    info: dict = {"version": version, "files": {}}
    parsed = {}
    for src, dst, packaging in HIGHDICOM_FILES:
        data = (base / src).read_bytes()
        parsed[src] = json.loads(data)
        if packaging == "split":
            parts = split_module_map(data)
            if [k for k, _ in parts] != list(parsed[src]):
                raise BuildError(f"{src}: split keys differ from the parsed keys")
            outputs[dst] = zip_members([(f"{k}.json", v) for k, v in parts])
        elif packaging == "gzip":
            outputs[dst] = gzip_bytes(data)
        else:
            outputs[dst] = data
        info["files"][src] = {
            "output": dst,
            "packaging": packaging,
            "sha256": sha256_bytes(data),
            "bytes": len(data),
        }

    # Consistency report (informational).
    sop_map = parsed["sop_class_iod_map.json"]
    iod_map = parsed["iod_module_map.json"]
    mod_map = parsed["module_attribute_map.json"]
    from pydicom.datadict import RepeatersDictionary, tag_for_keyword

    repeaters = {v[4] for v in RepeatersDictionary.values()}
    unresolved = set()
    for attrs in mod_map.values():
        for a in attrs:
            for kw in [*a["path"], a["keyword"]]:
                if tag_for_keyword(kw) is None and kw not in repeaters:
                    unresolved.add(kw)
    info["sop_classes"] = len(sop_map)
    info["iods"] = len(iod_map)
    info["modules"] = len(mod_map)
    info["attribute_entries"] = sum(len(v) for v in mod_map.values())
    info["iods_without_module_list"] = sorted(set(sop_map.values()) - set(iod_map))
    info["modules_referenced_but_missing"] = sorted(
        {m["key"] for mods in iod_map.values() for m in mods} - set(mod_map)
    )
    info["iods_referencing_missing_modules"] = sorted(
        iod
        for iod, mods in iod_map.items()
        if any(m["key"] not in mod_map for m in mods)
    )
    info["type_values"] = dict(
        sorted(collections.Counter(a["type"] for v in mod_map.values() for a in v).items())
    )
    info["keywords_unknown_to_pydicom"] = sorted(unresolved)
    return outputs, info


# --------------------------------------------------------------------------- README


def render_readme(
    e1: dict, e3: dict, e3_stats: dict, tcia: dict, tcia_stats: dict, hd: dict
) -> str:
    def files(d: dict) -> str:
        return "\n".join(f"  - `{k}` sha256 `{v}`" for k, v in sorted(d.items()))

    packaging = {
        "copy": "verbatim copy",
        "gzip": "gzip of the original",
        "split": "zip split by module, see below",
    }
    hd_lines = "\n".join(
        f"  - `{src}` -> `{v['output']}` ({packaging[v['packaging']]}; {v['bytes']:,} bytes, "
        f"sha256 `{v['sha256']}` of the original)"
        for src, v in sorted(hd["files"].items())
    )
    dropped = "\n".join(f"  - {k}: {v}" for k, v in tcia["dropped"].items()) or "  - none"
    dropped_vals = "; ".join(
        f"{k}: " + ", ".join(f"{val!r} x{n}" for val, n in v.items())
        for k, v in tcia["dropped_values"].items()
    )
    normalized = "\n".join(f"  - {k}: {v}" for k, v in tcia["normalized"].items()) or "  - none"
    conflicts = ", ".join(
        f"{k} x{v}" for k, v in tcia_stats["keys_with_conflicting_dispositions"].items()
    )
    missing_mods = ", ".join(f"`{m}`" for m in hd["modules_referenced_but_missing"])
    missing_iods = ", ".join(f"`{m}`" for m in hd["iods_referencing_missing_modules"])
    return f"""# dicom_deid/data/standard: provenance

Generated by `scripts/build_standard_tables.py`. Do not edit these files by hand; change the
script or its inputs and regenerate:

```
/work/venv/bin/python scripts/build_standard_tables.py
# inputs: $DICOM_DEID_SHARED/reference (default <repo>/../shared/reference) and the
# installed highdicom; override with --reference DIR / --out DIR
```

The output is deterministic (sorted keys, fixed row order, gzip with mtime 0, zip members
with a fixed date), so a rerun on unchanged inputs rewrites nothing. Loaded at run time by
`dicom_deid/standard.py` via `importlib.resources` (package `dicom_deid.data.standard`);
nothing here depends on highdicom's private paths at run time.

## `table_e1_1.json`: DICOM PS3.15 {e1['edition']} Table E.1-1

Application Level Confidentiality Profile Attributes, all {e1['row_count']} rows (653 tags
and 4 patterns), columns and row order exactly as the reference (`columns` gives the column
order; rows are objects with sorted keys).

- Source: `/work/shared/reference/dicom-standard/{E1_STEM}.csv|json` (CSV and JSON checked
  identical by the build); the reference says: transcribed from
  {e1['transcribed_from']}. Cross-checks recorded in the reference README: identical to the
  2024b machine-readable table (innolitics/dicom-standard, MIT) on the 621 shared rows
  except three edition changes; Basic column identical to the 2026c table of
  dicom-anonymizer 2.1.0 on all 651 shared tags; the option columns of the 36 rows new since
  2024b were not independently cross-checked.
{files(e1['source_files'])}
- Copyright: DICOM PS3.15 tables are (c) NEMA; acknowledgement "{e1['acknowledgement']}".

## `safe_private.json`: DICOM PS3.15 {e3['edition']} Table E.3.10-1

Safe Private Attributes (the Retain Safe Private Option's list), {e3['row_count']} rows,
columns tag (`(gggg,xxee)`, ee = element byte within the creator's block),
private_creator, vr, vm, meaning, {e3_stats['creators']} private creators. {e3_stats['empty_vr']} rows
have an empty VR and {e3_stats['empty_meaning']} an empty meaning, as in the source. The source's `content_sha256` was verified against its rows.

- Source: `/work/shared/reference/dicom-standard/{E3101_STEM}.csv|json`, from
  pymedphys/pymedphys `lib/pymedphys/_dicom/deidentify/_standard/e3_10_1.json` @ 985a1bd9.
{files(e3['source_files'])}
- Copyright: (c) NEMA; acknowledgement "{e3['acknowledgement']}".

## `tcia_private_kb.json`: TCIA private tag knowledge base

The Cancer Imaging Archive's private tag KB (`TCIAPrivateTagKB-02-01-2024-formatted.csv`),
mirrored in MIC-DKFZ/miccai2024_midi-b-submission `docs/` @ e3e62bae. **No licence is
stated by that source**; it is used here as a de-identification knowledge base (which
private elements to keep, delete, hash or date-shift) and should be reviewed before
redistribution.

{files(tcia['source_files'])}

Parsed defensively: {tcia['input_rows']} data rows in, {tcia['row_count']} normalized rows
out (group int, private_creator stripped, element_byte 0x00-0xFF within the creator's
block, vr, disposition in k/d/h/o, parent_path for elements nested in sequences).

Dropped rows by reason:
{dropped}

Dropped values: {dropped_vals or 'none'}

Normalized (kept) rows:
{normalized}

Aggregated by (creator lower-cased, group, element byte) there are {tcia_stats['keys']}
keys; keys whose rows disagree (mostly by VR: TCIA deletes the UN/OB form of an element it
keeps under its real VR, or by nesting): {conflicts}. `standard.tcia_private_dispositions()`
resolves these to the most protective disposition (d > h > o > k); the per-row VR and
nesting detail stays in this file for VR-aware consumers.

## highdicom IOD tables (MIT)

Copied from highdicom {hd['version']} (`highdicom/_standard/`, PyPI `highdicom`,
https://github.com/ImagingDataCommons/highdicom, MIT licence, Copyright 2020 MGH
Computational Pathology; the licence text is reproduced below). The packaged forms keep
the upstream bytes unchanged (the zip as one byte slice per module, see below):

{hd_lines}

`module_attribute_map.zip` is `module_attribute_map.json` split by module so that
`dicom_deid/standard.py` can read the few modules an IOD needs without parsing all
{hd['modules']} (22 MB of JSON): one deflated member `<module key>.json` per module, in the
original's key order, each holding that module's value (the JSON array of attribute
objects) as the exact byte slice of the original. The original is rebuilt byte for byte as
`{{\\n` + `,\\n`.join(`  "<module key>": ` + member bytes, in member order) + `\\n}}` (`\\n` a
newline byte); the build checks this against the original, so the sha256 above is also the
sha256 of the text rebuilt from the zip (`tests/unit/test_standard.py` checks that too).

Contents: {hd['sop_classes']} SOP classes, {hd['iods']} IODs, {hd['modules']} modules,
{hd['attribute_entries']:,} module attribute entries (keyword, type, path of enclosing
sequence keywords). Type values: {hd['type_values']} (`None` marks attributes of
print/DIMSE-style modules without a type; they are ignored). Modules referenced by an IOD
but absent from the module map (ignored): {missing_mods or 'none'}; affected IODs:
{missing_iods or 'none'}. Keywords pydicom cannot resolve (neither dictionary nor repeating
group): {hd['keywords_unknown_to_pydicom'] or 'none'}; repeating-group (60xx overlay)
keywords are keyed at group 0x6000.

```
Copyright 2020 MGH Computational Pathology

Permission is hereby granted, free of charge, to any person obtaining a copy of this
software and associated documentation files (the "Software"), to deal in the Software
without restriction, including without limitation the rights to use, copy, modify, merge,
publish, distribute, sublicense, and/or sell copies of the Software, and to permit persons
to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED,
INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR
PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE
FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER
DEALINGS IN THE SOFTWARE.
```
"""


INIT_PY = '''"""Package data: DICOM standard tables (see README.md). Generated; do not edit."""
'''


# ----------------------------------------------------------------------------- main


def default_reference() -> Path:
    env = os.environ.get("DICOM_DEID_SHARED")
    shared = Path(env) if env else REPO.parent / "shared"
    return shared / "reference" if (shared / "reference").is_dir() else shared


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", type=Path, default=None, help="the reference/ directory")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    ref = (args.reference or default_reference()).resolve()
    if not (ref / "dicom-standard").is_dir():
        print(f"error: no dicom-standard/ under {ref}", file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    print(f"reference: {ref}")
    e1, e1_stats = build_e1(ref)
    e3, e3_stats = build_e3101(ref)
    tcia, tcia_stats = build_tcia(ref)
    hd_outputs, hd_info = build_highdicom()

    print(f"output: {out}")
    write_if_changed(out / "table_e1_1.json", dump_json(e1).encode("utf-8"))
    write_if_changed(out / "safe_private.json", dump_json(e3).encode("utf-8"))
    write_if_changed(out / "tcia_private_kb.json", dump_json(tcia).encode("utf-8"))
    for name, data in sorted(hd_outputs.items()):
        write_if_changed(out / name, data)
    for name in STALE_OUTPUTS:
        if name not in hd_outputs and (out / name).is_file():
            (out / name).unlink()
            print(f"  removed   {name} (no longer an output)")
    readme = render_readme(e1, e3, e3_stats, tcia, tcia_stats, hd_info)
    write_if_changed(out / "README.md", readme.encode("utf-8"))
    write_if_changed(out / "__init__.py", INIT_PY.encode("utf-8"))

    report = {"e1_1": e1_stats, "e3_10_1": e3_stats, "tcia": tcia_stats, "highdicom": hd_info}
    print(json.dumps(report, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
