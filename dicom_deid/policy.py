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
})

PIXEL_MODES = ("quarantine",)
ATTACHMENT_MODES = ("quarantine",)
STRATEGIES = ("hmac",)
_KEYS = {"schema", "name", "version", "description", "options", "pixels", "attachments",
         "pseudonyms", "overrides"}


@dataclasses.dataclass(frozen=True)
class Policy:
    name: str
    version: str
    options: tuple[str, ...] = ()
    pixels: str = "quarantine"
    attachments: str = "quarantine"
    strategy: str = "hmac"
    date_offset_days: tuple[int, int] = (-3650, -365)
    description: str = ""
    source: str = "<built-in>"

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
    rng = pseud.get("date_offset_days", [-3650, -365])
    if (not isinstance(rng, list) or len(rng) != 2 or not all(isinstance(x, int) for x in rng)
            or rng[0] > rng[1] or rng == [0, 0]):
        fail("key 'pseudonyms.date_offset_days'", "must be [low, high] whole days, low <= high, not [0, 0]")
    overrides = doc.get("overrides") or []
    if overrides:
        fail("key 'overrides'", "per-attribute overrides are not supported in this version")
    return Policy(
        name=str(doc["name"]), version=str(doc["version"]), options=tuple(options),
        pixels=pixels, attachments=attachments, strategy=strategy,
        date_offset_days=(int(rng[0]), int(rng[1])),
        description=str(doc.get("description") or ""), source=source,
    )
