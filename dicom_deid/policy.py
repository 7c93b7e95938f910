"""Policies: which PS3.15 Annex E options apply, and how pixels, attachments and
pseudonyms are handled. Versioned YAML/JSON; built-ins ship as package data.

A policy is validated completely before a pipeline is built: a bad one raises
:class:`~dicom_deid.errors.ConfigError` naming the file, the key and the reason.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
from pathlib import Path
from typing import Optional

import yaml

from .errors import ConfigError

SCHEMA_VERSION = 1

# Annex E options (Table E.1-1 columns) and their CID 7050 codes, plus Clean Pixel Data
# which has no column in the table.
OPTION_CODES = {
    "rtn_safe_private": ("113111", "Retain Safe Private Option"),
    "rtn_uids": ("113110", "Retain UIDs Option"),
    "rtn_device_identity": ("113109", "Retain Device Identity Option"),
    "rtn_institution_identity": ("113112", "Retain Institution Identity Option"),
    "rtn_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "rtn_long_full_dates": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "rtn_long_modified_dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "clean_structured_content": ("113104", "Clean Structured Content Option"),
    "clean_graphics": ("113103", "Clean Graphics Option"),
    "clean_pixel_data": ("113101", "Clean Pixel Data Option"),
}
BASIC_CODE = ("113100", "Basic Application Confidentiality Profile")

# Options whose semantics this version implements completely.
IMPLEMENTED_OPTIONS = frozenset({
    "rtn_safe_private", "rtn_uids", "rtn_device_identity", "rtn_institution_identity",
    "rtn_patient_characteristics", "rtn_long_full_dates", "rtn_long_modified_dates",
    "clean_descriptors", "clean_structured_content", "clean_graphics",
})
OVERRIDE_ACTIONS = ("keep", "remove", "empty", "replace", "hash", "shift")
MODES = ("profile", "allowlist")


@dataclasses.dataclass(frozen=True)
class Override:
    """A per-attribute override. Exactly one of ``tag`` (standard attribute) or ``private``
    ((creator lower-case, group, element byte within the creator's block)) is set.
    ``within`` (a sequence path of tags) restricts it to that nesting; None = any depth."""

    action: str
    tag: Optional[int] = None
    private: Optional[tuple[str, int, int]] = None
    within: Optional[tuple[int, ...]] = None
    value: Optional[str] = None

PIXEL_MODES = ("quarantine",)
ATTACHMENT_MODES = ("quarantine",)
STRATEGIES = ("hmac", "sequential", "lookup")
PERSON_KEYS = ("patient_id", "nhs_number")
_PSEUDONYM_KEYS = {"strategy", "date_offset_days", "person_key", "prefix", "digits"}
_KEYS = {"schema", "name", "version", "description", "options", "pixels", "attachments",
         "pseudonyms", "overrides", "mode", "allowlist"}


@dataclasses.dataclass(frozen=True)
class Policy:
    name: str
    version: str
    options: tuple[str, ...] = ()
    pixels: str = "quarantine"
    attachments: str = "quarantine"
    strategy: str = "hmac"
    date_offset_days: tuple[int, int] = (-3650, -365)
    #: pseudonyms: person key (patient_id or nhs_number) and sequential ID format
    person_key: str = "patient_id"
    sequential_prefix: str = "P"
    sequential_digits: int = 6
    description: str = ""
    source: str = "<built-in>"
    overrides: tuple = ()
    mode: str = "profile"
    #: with mode 'allowlist': the only attributes not named by Table E.1-1 that are kept
    allowlist: frozenset = frozenset()

    @property
    def unapplied_options(self) -> tuple[str, ...]:
        """Options named by the policy that this version cannot apply yet."""
        return tuple(o for o in self.options if o not in IMPLEMENTED_OPTIONS)

    @property
    def applied_options(self) -> tuple[str, ...]:
        return tuple(o for o in self.options if o in IMPLEMENTED_OPTIONS)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


def builtin_names() -> tuple[str, ...]:
    files = importlib.resources.files("dicom_deid.data.policies")
    return tuple(sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml")))


def load(name_or_path: Optional[str] = None) -> Policy:
    """Load a built-in policy by name or a policy file (YAML or JSON) by path."""
    name_or_path = name_or_path or "basic"
    if name_or_path in builtin_names():
        res = importlib.resources.files("dicom_deid.data.policies") / f"{name_or_path}.yaml"
        return parse(res.read_text(encoding="utf-8"), source=f"<built-in {name_or_path}>")
    path = Path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"policy {name_or_path!s}: not a built-in policy "
                          f"({', '.join(builtin_names())}) and no such file")
    return parse(path.read_text(encoding="utf-8"), source=str(path))


def parse(text: str, source: str = "<string>") -> Policy:
    def fail(where: str, why: str):
        raise ConfigError(f"policy {source}: {where}: {why}")

    try:
        doc = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        fail(f"line {mark.line + 1}" if mark else "document", "not valid YAML")
    except json.JSONDecodeError as exc:
        fail(f"line {exc.lineno}", "not valid JSON")
    if not isinstance(doc, dict):
        fail("document", "must be a mapping")
    unknown = sorted(set(doc) - _KEYS)
    if unknown:
        fail(f"key '{unknown[0]}'", f"unknown key (allowed: {', '.join(sorted(_KEYS))})")
    if doc.get("schema") != SCHEMA_VERSION:
        fail("key 'schema'", f"must be {SCHEMA_VERSION}")
    for k in ("name", "version"):
        if not isinstance(doc.get(k), (str, int)) or not str(doc.get(k)).strip():
            fail(f"key '{k}'", "required, a non-empty string")
    options = doc.get("options") or []
    if not isinstance(options, list):
        fail("key 'options'", "must be a list")
    for i, o in enumerate(options):
        if o not in OPTION_CODES:
            fail(f"key 'options[{i}]'", f"unknown option {o!r} (known: {', '.join(OPTION_CODES)})")
    if "rtn_long_full_dates" in options and "rtn_long_modified_dates" in options:
        fail("key 'options'", "rtn_long_full_dates and rtn_long_modified_dates exclude each other")
    pixels = doc.get("pixels", "quarantine")
    if pixels not in PIXEL_MODES:
        fail("key 'pixels'", f"must be one of {PIXEL_MODES} in this version")
    attachments = doc.get("attachments", "quarantine")
    if attachments not in ATTACHMENT_MODES:
        fail("key 'attachments'", f"must be one of {ATTACHMENT_MODES} in this version")
    pseud = doc.get("pseudonyms") or {}
    if not isinstance(pseud, dict):
        fail("key 'pseudonyms'", "must be a mapping")
    strategy = pseud.get("strategy", "hmac")
    if strategy not in STRATEGIES:
        fail("key 'pseudonyms.strategy'", f"must be one of {STRATEGIES} in this version")
    unknown_p = sorted(set(pseud) - _PSEUDONYM_KEYS)
    if unknown_p:
        fail(f"key 'pseudonyms.{unknown_p[0]}'", f"unknown key (allowed: {', '.join(sorted(_PSEUDONYM_KEYS))})")
    person_key = pseud.get("person_key", "patient_id")
    if person_key not in PERSON_KEYS:
        fail("key 'pseudonyms.person_key'", f"must be one of {PERSON_KEYS}")
    seq_prefix = pseud.get("prefix", "P")
    if not isinstance(seq_prefix, str) or not seq_prefix.isascii() or not seq_prefix.isalnum() or len(seq_prefix) > 16:
        fail("key 'pseudonyms.prefix'", "must be 1-16 ASCII letters or digits")
    seq_digits = pseud.get("digits", 6)
    if not isinstance(seq_digits, int) or not 3 <= seq_digits <= 12:
        fail("key 'pseudonyms.digits'", "must be a whole number from 3 to 12")
    rng = pseud.get("date_offset_days", [-3650, -365])
    if (not isinstance(rng, list) or len(rng) != 2 or not all(isinstance(x, int) for x in rng)
            or rng[0] > rng[1] or rng == [0, 0]):
        fail("key 'pseudonyms.date_offset_days'", "must be [low, high] whole days, low <= high, not [0, 0]")
    overrides = tuple(_override(o, i, fail) for i, o in enumerate(doc.get("overrides") or []))
    mode = doc.get("mode", "profile")
    if mode not in MODES:
        fail("key 'mode'", f"must be one of {MODES}")
    allow = doc.get("allowlist") or []
    if not isinstance(allow, list):
        fail("key 'allowlist'", "must be a list of attribute keywords or tags")
    allowlist = frozenset(_tag(a, f"allowlist[{i}]", fail) for i, a in enumerate(allow))
    if mode == "allowlist" and not allowlist:
        fail("key 'allowlist'", "mode 'allowlist' needs a non-empty allowlist")
    return Policy(
        name=str(doc["name"]), version=str(doc["version"]), options=tuple(options),
        pixels=pixels, attachments=attachments, strategy=strategy,
        date_offset_days=(int(rng[0]), int(rng[1])),
        person_key=person_key, sequential_prefix=seq_prefix, sequential_digits=seq_digits,
        description=str(doc.get("description") or ""), source=source,
        overrides=overrides, mode=mode, allowlist=allowlist,
    )


def _tag(value, where: str, fail) -> int:
    """A keyword ('StudyDescription') or a tag ('(0008,1030)', '00081030', 0x00081030)."""
    from pydicom.datadict import tag_for_keyword
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        v = value.strip()
        t = tag_for_keyword(v)
        if t is not None:
            return int(t)
        hexv = v.strip("()").replace(",", "")
        if len(hexv) == 8:
            try:
                return int(hexv, 16)
            except ValueError:
                pass
    fail(f"key '{where}'", f"not a DICOM keyword or tag: {value!r}")


def _override(o, i: int, fail) -> Override:
    where = f"overrides[{i}]"
    if not isinstance(o, dict):
        fail(f"key '{where}'", "must be a mapping")
    unknown = sorted(set(o) - {"attribute", "private", "within", "action", "value"})
    if unknown:
        fail(f"key '{where}.{unknown[0]}'", "unknown key")
    action = o.get("action")
    if action not in OVERRIDE_ACTIONS:
        fail(f"key '{where}.action'", f"must be one of {OVERRIDE_ACTIONS}")
    if ("attribute" in o) == ("private" in o):
        fail(where, "give exactly one of 'attribute' or 'private'")
    tag = private = None
    if "attribute" in o:
        tag = _tag(o["attribute"], f"{where}.attribute", fail)
        if (tag >> 16) & 1:
            fail(f"key '{where}.attribute'", "private attributes are addressed with 'private' (creator, group, element)")
    else:
        pv = o["private"]
        if not isinstance(pv, dict) or not {"creator", "group", "element"} <= set(pv):
            fail(f"key '{where}.private'", "needs creator, group and element (element byte within the block)")
        group, elem = pv["group"], pv["element"]
        try:
            group = int(group, 16) if isinstance(group, str) else int(group)
            elem = int(elem, 16) if isinstance(elem, str) else int(elem)
        except ValueError:
            fail(f"key '{where}.private'", "group and element must be numbers (hex strings allowed)")
        if not group & 1 or not 0 <= elem <= 0xFF:
            fail(f"key '{where}.private'", "group must be odd and element a byte (0x00-0xFF)")
        private = (str(pv["creator"]).strip().lower(), group, elem)
    within = None
    if o.get("within") is not None:
        if not isinstance(o["within"], list):
            fail(f"key '{where}.within'", "must be a list of sequence keywords or tags")
        within = tuple(_tag(w, f"{where}.within", fail) for w in o["within"])
    value = o.get("value")
    if action == "replace" and (value is None or not isinstance(value, (str, int, float))):
        fail(f"key '{where}.value'", "action 'replace' needs a value")
    return Override(action=action, tag=tag, private=private, within=within,
                    value=None if value is None else str(value))
