"""DICOM standard tables for de-identification (engine module; never imports apache_beam).

Data comes from the package ``dicom_deid.data.standard`` (built by
``scripts/build_standard_tables.py``; provenance in its README.md):

* PS3.15 2026d Table E.1-1 (Application Level Confidentiality Profile Attributes):
  :func:`load_table`, :func:`rules_by_tag`, :func:`pattern_rows`, :class:`ProfileRow`.
* PS3.15 Table E.3.10-1 (Safe Private Attributes): :func:`safe_private_elements`.
* The TCIA private tag knowledge base: :func:`tcia_private_dispositions`.
* highdicom's IOD/module tables (MIT): :func:`iod_attribute_types`, :func:`attribute_type`,
  used to resolve the conditional codes X/Z, X/D, Z/D, X/Z/D and X/Z/U* per IOD
  (type 1 -> D, type 2 -> Z, type 3 or absent -> X).

All loaders are cached (``functools.cache``); the returned dicts are shared cached objects
and must be treated as read-only.

Option precedence (:meth:`ProfileRow.action`): PS3.15 E.3 says an Option's action, where
the Option's column gives one, replaces the Basic Profile action. When several active
Options give a code for the same row we take K over C ("keep" beats "clean"): each retain
option exists to retain that information, so the most retentive requested option wins. In
the 2026d table the only multi-option rows are three rows where both options say C, 13
where both say K, and the 169 date/time rows where "Retain Longitudinal Temporal
Information with Full Dates" (K) and "... with Modified Dates" (C) both have a code; those
two options are mutually exclusive in the standard and a caller that activates both gets K.
Option names outside :data:`OPTION_COLUMNS` (e.g. a Clean Pixel Data option, which has no
column in Table E.1-1) are ignored.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import re
import threading
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

__all__ = [
    "OPTION_COLUMNS",
    "ProfileRow",
    "load_table",
    "rules_by_tag",
    "pattern_rows",
    "iod_attribute_types",
    "attribute_type",
    "safe_private_elements",
    "tcia_private_dispositions",
]

_DATA_PACKAGE = "dicom_deid.data.standard"

OPTION_COLUMNS: tuple[str, ...] = (
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

# Precedence among option codes: earlier wins. Every option code in Table E.1-1 2026d is
# K or C (checked by the build script and again on load).
_OPTION_CODE_PRECEDENCE: tuple[str, ...] = ("K", "C")

# Attribute type strength for iod_attribute_types: lower rank = stronger.
_TYPE_RANK: dict[str, int] = {"1": 0, "1C": 1, "2": 2, "2C": 3, "3": 4}
_MODULE_USAGES = frozenset({"M", "C", "U"})

_CONCRETE_TAG_RE = re.compile(r"\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)")
_SAFE_PRIVATE_TAG_RE = re.compile(r"\(([0-9A-Fa-f]{4}),xx([0-9A-Fa-f]{2})\)")


# --------------------------------------------------------------------------- loading


def _read_resource(name: str) -> bytes:
    return resources.files(_DATA_PACKAGE).joinpath(name).read_bytes()


def _load_json(name: str) -> Any:
    """Load ``name`` from the data package, transparently using ``name + '.gz'``."""
    pkg = resources.files(_DATA_PACKAGE)
    if name.endswith(".gz"):
        return json.loads(gzip.decompress(_read_resource(name)))
    if pkg.joinpath(name).is_file():
        return json.loads(_read_resource(name))
    return json.loads(gzip.decompress(_read_resource(name + ".gz")))


# ------------------------------------------------------------------------ Table E.1-1


@dataclass(frozen=True)
class ProfileRow:
    """One row of PS3.15 Table E.1-1.

    ``tag`` is as printed in the table: ``"(0008,0050)"`` or a pattern such as
    ``"(50xx,xxxx)"`` / ``"(gggg,eeee) where gggg is odd"``. ``basic`` is the Basic Profile
    action code (D, Z, X, K, C, U, Z/D, X/Z, X/D, X/Z/D or X/Z/U*). ``options`` holds
    ``(option column, code)`` pairs, in :data:`OPTION_COLUMNS` order, for the non-empty
    option cells only.
    """

    tag: str
    name: str
    retired: bool
    in_std_comp_iod: bool
    basic: str
    options: tuple[tuple[str, str], ...] = ()

    def action(self, active_options: Iterable[str]) -> str:
        """Effective action code given the active option column names.

        An active option with a code for this row overrides the Basic Profile code; among
        several, K beats C (see the module docstring). Otherwise the basic code is returned.
        Unknown option names are ignored. A bare string is treated as one option name.
        """
        if isinstance(active_options, str):
            active = {active_options}
        else:
            active = set(active_options)
        if not self.options or not active:
            return self.basic
        codes = {code for column, code in self.options if column in active}
        for code in _OPTION_CODE_PRECEDENCE:
            if code in codes:
                return code
        if codes:  # not reachable with the 2026d table; kept deterministic regardless
            return sorted(codes)[0]
        return self.basic

    @property
    def is_pattern(self) -> bool:
        """True for the 4 pattern rows (curve, overlay data/comments, private)."""
        return _CONCRETE_TAG_RE.fullmatch(self.tag) is None


def _flag(value: str, tag: str, column: str) -> bool:
    if value == "Y":
        return True
    if value == "N":
        return False
    raise ValueError(f"Table E.1-1 {tag}: {column} is {value!r}, expected Y or N")


@functools.cache
def load_table() -> tuple[ProfileRow, ...]:
    """All 657 rows of Table E.1-1, in table order."""
    data = _load_json("table_e1_1.json")
    out = []
    for r in data["rows"]:
        options = tuple((c, r[c]) for c in OPTION_COLUMNS if r.get(c))
        for column, code in options:
            if code not in _OPTION_CODE_PRECEDENCE:
                raise ValueError(f"Table E.1-1 {r['tag']}: unexpected {column} code {code!r}")
        out.append(
            ProfileRow(
                tag=r["tag"],
                name=r["name"],
                retired=_flag(r["retired"], r["tag"], "retired"),
                in_std_comp_iod=_flag(r["in_std_comp_iod"], r["tag"], "in_std_comp_iod"),
                basic=r["basic_profile"],
                options=options,
            )
        )
    return tuple(out)


@functools.cache
def rules_by_tag() -> dict[int, ProfileRow]:
    """Concrete-tag rows keyed by ``group << 16 | element`` (653 in 2026d). Read-only."""
    out: dict[int, ProfileRow] = {}
    for row in load_table():
        m = _CONCRETE_TAG_RE.fullmatch(row.tag)
        if m:
            out[int(m.group(1), 16) << 16 | int(m.group(2), 16)] = row
    return out


@functools.cache
def pattern_rows() -> tuple[ProfileRow, ...]:
    """The pattern rows: (50xx,xxxx) curve data, (60xx,3000) overlay data,
    (60xx,4000) overlay comments and private attributes, in table order."""
    return tuple(row for row in load_table() if row.is_pattern)


# ----------------------------------------------------------------------- IOD tables


@functools.cache
def _sop_class_iod_map() -> dict[str, str]:
    return _load_json("sop_class_iod_map.json")


@functools.cache
def _iod_module_map() -> dict[str, list[dict[str, str]]]:
    return _load_json("iod_module_map.json")


@functools.cache
def _tag_for_keyword(keyword: str) -> int | None:
    """Keyword -> int tag; repeating-group keywords (60xx overlays) map to group 0x6000."""
    from pydicom.datadict import RepeatersDictionary, tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is not None:
        return tag
    for mask, entry in RepeatersDictionary.items():
        if entry[4] == keyword:
            return int(mask.replace("x", "0"), 16)
    return None


#: highdicom's module_attribute_map.json split by module: one deflated member
#: ``<module key>.json`` per module holding that module's JSON array verbatim (see the
#: data README), so that one module is read without parsing the other ~435.
_MODULE_ZIP = "module_attribute_map.zip"
# ZipFile reads seek a shared file object; SDK workers call in from several threads.
_MODULE_ZIP_LOCK = threading.Lock()


@functools.cache
def _module_zip() -> zipfile.ZipFile:
    """The packaged module tables as an open zip over their bytes (~0.7 MB, compressed)."""
    return zipfile.ZipFile(io.BytesIO(_read_resource(_MODULE_ZIP)))


def _module_attributes(module_key: str) -> list[dict[str, Any]] | None:
    """The attribute dicts (keyword, type, path) of one module, parsed from its own zip
    member; None for a module the tables do not have.

    Only modules an IOD actually uses are ever parsed, one at a time, and only their compact
    form (:func:`_module_paths`) is kept: the tables parsed whole are about 100,000 dicts
    (~60 MB of Python objects), which a worker's resident memory must never hold (its
    allocator would keep the pages after they are freed)."""
    zf = _module_zip()
    with _MODULE_ZIP_LOCK:
        try:
            raw = zf.read(module_key + ".json")
        except KeyError:
            return None
    return json.loads(raw)


#: the type strings, shared
_TYPES = {t: t for t in ("1", "1C", "2", "2C", "3")}
#: one tuple per distinct attribute path, shared by all modules loaded in this process
_PATHS: dict[tuple[int, ...], tuple[int, ...]] = {}


@functools.cache
def _module_paths(module_key: str) -> tuple[tuple[tuple[int, ...], str], ...]:
    """(path of int tags, type) for every typed attribute of a module, in table order
    (empty for an unknown module). Built on first use, once per module and process."""
    attrs = _module_attributes(module_key)
    if attrs is None:
        return ()
    entries = []
    for attr in attrs:
        typ = attr.get("type")
        if typ not in _TYPE_RANK:  # "None": print/DIMSE modules without attribute types
            continue
        tags = tuple(_tag_for_keyword(kw) for kw in (*attr.get("path", ()), attr["keyword"]))
        if any(t is None for t in tags):
            continue
        entries.append((_PATHS.setdefault(tags, tags), _TYPES[typ]))
    return tuple(entries)


def _normalize_uid(uid: str) -> str:
    return str(uid).strip().rstrip("\x00").strip()


@functools.lru_cache(maxsize=512)
def _iod_attribute_types(sop_class_uid: str) -> dict[tuple[int, ...], str]:
    iod = _sop_class_iod_map().get(sop_class_uid)
    if iod is None:
        return {}
    result: dict[tuple[int, ...], str] = {}
    for module in _iod_module_map().get(iod, ()):
        if module.get("usage") not in _MODULE_USAGES:
            continue
        for path, typ in _module_paths(module["key"]):
            old = result.get(path)
            if old is None or _TYPE_RANK[typ] < _TYPE_RANK[old]:
                result[path] = typ
    return result


def iod_attribute_types(sop_class_uid: str) -> dict[tuple[int, ...], str]:
    """Attribute types ('1', '1C', '2', '2C', '3') of the IOD of ``sop_class_uid``.

    Keys are attribute paths: the tags of the enclosing sequences, outermost first, then
    the attribute's own tag (a top-level attribute is a 1-tuple). All modules the IOD lists
    as M, C or U contribute; an attribute present in several modules gets its strongest
    type (1 > 1C > 2 > 2C > 3). Repeating-group (60xx) overlay attributes are keyed at
    group 0x6000. Unknown SOP class -> empty dict. The result is cached: do not mutate.
    """
    return _iod_attribute_types(_normalize_uid(sop_class_uid))


def attribute_type(sop_class_uid: str, path: tuple[int, ...]) -> str | None:
    """Type of the attribute at ``path`` in the IOD of ``sop_class_uid``, or None when the
    attribute is not in that IOD (or the SOP class is unknown). An int is taken as a
    top-level path."""
    if isinstance(path, int):
        path = (path,)
    return iod_attribute_types(sop_class_uid).get(tuple(int(t) for t in path))


# -------------------------------------------------------------------- private tables


def _private_key(creator: str, group: int, element_byte: int) -> tuple[str, int, int]:
    return (creator.strip().lower(), group, element_byte)


@functools.cache
def safe_private_elements() -> frozenset[tuple[str, int, int]]:
    """Table E.3.10-1 as (private creator lower-cased and stripped, group, element byte
    within the creator's block)."""
    data = _load_json("safe_private.json")
    out = set()
    for r in data["rows"]:
        m = _SAFE_PRIVATE_TAG_RE.fullmatch(r["tag"])
        if not m:
            raise ValueError(f"Table E.3.10-1: unparseable tag {r['tag']!r}")
        out.add(_private_key(r["private_creator"], int(m.group(1), 16), int(m.group(2), 16)))
    return frozenset(out)


# Most protective first: delete, hash, offset (shift) date, keep.
_TCIA_PRECEDENCE: Mapping[str, int] = {"d": 0, "h": 1, "o": 2, "k": 3}


@functools.cache
def tcia_private_dispositions() -> dict[tuple[str, int, int], str]:
    """TCIA private tag KB as (creator lower-cased and stripped, group, element byte) ->
    disposition in {'k', 'd', 'h', 'o'}.

    Rows for the same key can disagree (by VR, e.g. TCIA deletes the UN form of an element
    it keeps under its real VR, or by the sequence the element was seen in); such conflicts
    resolve to the most protective disposition, d > h > o > k. Read-only.
    """
    data = _load_json("tcia_private_kb.json")
    out: dict[tuple[str, int, int], str] = {}
    for r in data["rows"]:
        disp = r["disposition"]
        if disp not in _TCIA_PRECEDENCE:
            raise ValueError(f"TCIA KB: unexpected disposition {disp!r}")
        key = _private_key(r["private_creator"], int(r["group"]), int(r["element_byte"]))
        old = out.get(key)
        if old is None or _TCIA_PRECEDENCE[disp] < _TCIA_PRECEDENCE[old]:
            out[key] = disp
    return out
