"""Header de-identification per PS3.15 Annex E Table E.1-1.

Pure engine: :func:`compile_rules` builds a :class:`Rules` object once per worker (in
``setup()``), :func:`deidentify` applies it to one :class:`~dicom_deid.element.DicomObject`.

Resolution of the table's action codes:

* ``D`` replace with a dummy of the VR (UIDs: keyed remap; patient name/ID: pseudonym),
  ``Z`` empty, ``X`` remove, ``K`` keep, ``C`` clean, ``U`` keyed UID remap.
* Combinations (``X/Z``, ``X/D``, ``Z/D``, ``X/Z/D``, ``X/Z/U*``) are resolved per IOD with
  the attribute's type in the object's IOD (its path inside sequences included): type 1/1C
  -> D (U for ``U*``), type 2/2C -> Z (D where Z is not allowed), type 3 or absent -> X
  (or the weakest allowed action when X is not allowed).
* Sequences that are kept (K, D, U, C, or a resolved D/Z that keeps items) are recursed into
  and each nested attribute gets its own rule; removed or emptied sequences drop their items.
* Private groups: removed, except with Retain Safe Private where (private creator, group,
  element byte) is on the safe list, matched through the creator's actual block.
* Attributes the table does not name are kept, except any UI value that is not a registry
  UID (remapped, so references stay consistent) and curve/overlay pattern groups.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from typing import Optional

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from . import __version__, standard
from .dsutil import BULK_TAGS, PLAIN_VRS, element, replace_value, value_of, vr_of
from .element import DicomObject
from .keys import Deriver, REGISTRY_UID_ROOT
from .policy import BASIC_CODE, OPTION_CODES, Policy

# Tags handled specially regardless of the table code.
PATIENT_ID = 0x00100020
PATIENT_NAME = 0x00100010
ISSUER_OF_PATIENT_ID = 0x00100021
SOP_INSTANCE_UID = 0x00080018
SOP_CLASS_UID = 0x00080016
STUDY_UID = 0x0020000D
SERIES_UID = 0x0020000E
FRAME_OF_REFERENCE_UID = 0x00200052
SPECIFIC_CHARSET = 0x00080005
PATIENT_IDENTITY_REMOVED = 0x00120062
DEID_METHOD = 0x00120063
DEID_METHOD_CODES = 0x00120064
LONGITUDINAL_MODIFIED = 0x00280303
# markers we write ourselves; an input's own values are replaced
_MARKERS = {PATIENT_IDENTITY_REMOVED, DEID_METHOD, DEID_METHOD_CODES, LONGITUDINAL_MODIFIED}

_DUMMY = {
    "AE": "ANONYMIZED", "AS": "000Y", "CS": "ANONYMIZED", "DA": "19000101",
    "DS": "0", "DT": "19000101000000", "IS": "0", "LO": "ANONYMIZED", "LT": "ANONYMIZED",
    "PN": "ANONYMIZED", "SH": "ANONYMIZED", "ST": "ANONYMIZED", "TM": "000000",
    "UC": "ANONYMIZED", "UR": "ANONYMIZED", "UT": "ANONYMIZED",
}
#: pixel data elements (deleting one resets pydicom's pixel array cache: `del ds[tag]`)
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
#: VRs _dummy shifts (when dates are shifted) instead of replacing
_DATES = frozenset({"DA", "DT"})
_NUMERIC_ZERO = {"US": 0, "SS": 0, "UL": 0, "SL": 0, "UV": 0, "SV": 0, "FL": 0.0, "FD": 0.0}
_TYPE_RANK = {"1": 0, "1C": 1, "2": 2, "2C": 3, "3": 4}


@dataclasses.dataclass
class Counts:
    removed: int = 0
    emptied: int = 0
    replaced: int = 0
    kept: int = 0
    cleaned: int = 0


class Rules:
    """Compiled, per-worker rules for one policy and key."""

    def __init__(self, policy: Policy, deriver: Deriver):
        self.policy = policy
        self.deriver = deriver
        opts = set(policy.applied_options)
        self.options = opts
        #: tag -> (effective code, basic code); C falls back to the basic code wherever a
        #: value cannot be cleaned (never weaker than Basic)
        self.by_tag: dict[int, tuple[str, str]] = {}
        for tag, row in standard.rules_by_tag().items():
            self.by_tag[tag] = (row.action(opts), row.basic)
        self.safe_private = safe_private_list() if "rtn_safe_private" in opts else frozenset()
        # private dates (TCIA KB 'o'): kept private dates are shifted, never left as they were
        self.private_dates = frozenset(k for k, disp in standard.tcia_private_dispositions().items()
                                       if disp == "o")
        if self.private_dates and "rtn_safe_private" in opts:
            self.safe_private = frozenset(self.safe_private | self.private_dates)
        self.shift_dates = "rtn_long_modified_dates" in opts
        self.keep_dates = "rtn_long_full_dates" in opts
        self.retain_uids = "rtn_uids" in opts
        self.allowlist = policy.allowlist if policy.mode == "allowlist" else None
        self.overrides_std: dict[int, list] = {}
        self.overrides_private: dict[tuple, list] = {}
        for o in policy.overrides:
            if o.tag is not None:
                self.overrides_std.setdefault(o.tag, []).append(o)
            else:
                self.overrides_private.setdefault(o.private, []).append(o)
        self._iod_cache: dict[str, dict] = {}
        self._resolved: dict[str, dict] = {}

    def resolved(self, sop_class_uid: str) -> dict:
        """Memo of :func:`_resolve` for one SOP class: (code, path, tag) -> action. The
        resolution depends only on the code, the path and the IOD; bounded (cleared when
        large, e.g. objects with unusual nesting)."""
        memo = self._resolved.get(sop_class_uid)
        if memo is None or len(memo) > 20_000:
            if len(self._resolved) > 200:
                self._resolved.clear()
            memo = self._resolved[sop_class_uid] = {}
        return memo

    def iod_types(self, sop_class_uid: str) -> dict:
        types = self._iod_cache.get(sop_class_uid)
        if types is None:
            types = standard.iod_attribute_types(sop_class_uid)
            self._iod_cache[sop_class_uid] = types
        return types


def safe_private_list() -> frozenset:
    """Retain Safe Private: PS3.15 Table E.3.10-1 plus the TCIA private tag knowledge base's
    keep ('k') entries, as (creator lower-case, group, element byte within the block)."""
    tcia_keep = {k for k, disp in standard.tcia_private_dispositions().items() if disp == "k"}
    return frozenset(standard.safe_private_elements() | tcia_keep)


def compile_rules(policy: Policy, key: bytes) -> Rules:
    return Rules(policy, Deriver(key, policy.date_offset_days))


@dataclasses.dataclass(frozen=True)
class PatientMapping:
    """What the pseudonym map (side input) or the keyed derivation gives for one patient."""

    pseudonym: str
    date_offset_days: int


def patient_key_of(ds: Dataset, deriver: Deriver, person_key: str = "patient_id") -> str:
    """HMAC of the person key (PatientID + Issuer, or by policy a valid NHS number);
    one definition shared with ScanHeaders (see :mod:`dicom_deid.pseudonyms`)."""
    from .pseudonyms import person_key as _person_key
    return _person_key(ds, deriver, person_key).hmac


def mapping_for(patient_key: str, deriver: Deriver, entry: Optional[dict]) -> PatientMapping:
    if entry:
        return PatientMapping(entry["pseudonym"], int(entry["date_offset_days"]))
    return PatientMapping(deriver.pseudonym(patient_key), deriver.date_offset_days(patient_key))


def deidentify(obj: DicomObject, rules: Rules, entry: Optional[dict] = None,
                log: Optional[list] = None, show_values: bool = False) -> DicomObject:
    """De-identify ``obj.dataset`` in place; fill ``obj.facts`` and ``obj.private``."""
    ds = obj.dataset
    d = rules.deriver
    pkey = obj.patient_key or patient_key_of(ds, d)
    obj.patient_key = pkey
    mapping = mapping_for(pkey, d, entry)
    sop_class = str(value_of(ds, SOP_CLASS_UID, "") or "")
    ctx = _Ctx(rules, d, mapping, rules.iod_types(sop_class), Counts(), phi=obj.phi, log=log,
               show_values=show_values, resolved=rules.resolved(sop_class))

    original_pid = str(value_of(ds, PATIENT_ID, "") or "")
    orig = {k: str(value_of(ds, t, "") or "") for k, t in
            (("StudyInstanceUID", STUDY_UID), ("SeriesInstanceUID", SERIES_UID),
             ("SOPInstanceUID", SOP_INSTANCE_UID), ("FrameOfReferenceUID", FRAME_OF_REFERENCE_UID))}

    _walk(ds, (), ctx)

    # Patient identity: pseudonym in ID and name whatever the profile code (Z permits it
    # only as an empty value; the pseudonym is a research-grade replacement, so record it
    # as replaced).
    _set(ds, PATIENT_ID, "PatientID", mapping.pseudonym)
    _set(ds, PATIENT_NAME, "PatientName", mapping.pseudonym)
    if ISSUER_OF_PATIENT_ID in ds._dict:
        del ds[ISSUER_OF_PATIENT_ID]

    _file_meta(ds, ctx)
    _markers(ds, rules, ctx)

    c = ctx.counts
    obj.facts.update(
        pseudo_patient_id=mapping.pseudonym,
        study_uid=str(value_of(ds, STUDY_UID, "") or "") or None,
        series_uid=str(value_of(ds, SERIES_UID, "") or "") or None,
        sop_uid=str(value_of(ds, SOP_INSTANCE_UID, "") or "") or None,
        attrs_removed=c.removed, attrs_emptied=c.emptied, attrs_replaced=c.replaced,
        attrs_kept=c.kept, attrs_cleaned=c.cleaned,
        options_not_applied=list(rules.policy.unapplied_options),
        deid_method_codes=[code for code, _ in _method_codes(rules)],
    )
    obj.private.update(
        original_study_uid=orig["StudyInstanceUID"] or None,
        original_series_uid=orig["SeriesInstanceUID"] or None,
        original_sop_uid=orig["SOPInstanceUID"] or None,
        original_frame_of_reference_uid=orig["FrameOfReferenceUID"] or None,
        frame_of_reference_uid=str(value_of(ds, FRAME_OF_REFERENCE_UID, "") or "") or None,
        patient_key_hmac=pkey,
        original_patient_id=original_pid or None,
        pseudo_patient_id=mapping.pseudonym,
    )
    return obj


@dataclasses.dataclass
class _Ctx:
    rules: Rules
    deriver: Deriver
    mapping: PatientMapping
    iod: dict
    counts: Counts
    phi: object = None
    #: when a list, every decision is recorded as (path, tag, vr, action) for `inspect`
    log: Optional[list] = None
    show_values: bool = False
    _cleaner: object = None
    #: memo of _resolve for this object's IOD (Rules.resolved)
    resolved: dict = dataclasses.field(default_factory=dict)

    def cleaner(self):
        if self._cleaner is None:
            from .text import Cleaner
            from .element import PhiContext
            self._cleaner = Cleaner(self.phi if self.phi is not None else PhiContext())
        return self._cleaner

    def note(self, path, tag, vr, action, ds=None):
        if self.log is not None:
            value = None
            if self.show_values and ds is not None and vr != "SQ":
                try:
                    value = repr(ds[tag].value)[:80]
                except Exception:
                    value = "<unreadable>"
            self.log.append((path, int(tag), vr, action, value))


#: text VRs that Clean (C) rewrites, with their maximum lengths
_TEXT_VRS = {"SH": 16, "LO": 64, "ST": 1024, "LT": 10240, "UT": None, "UC": None}


def _walk(ds: Dataset, path: tuple, ctx: _Ctx, cleaning: bool = False) -> None:
    rules = ctx.rules
    d = ds._dict
    has_private = False
    for t in d:
        if t >> 16 & 1:
            has_private = True
            break
    # creators are needed to keep (safe private) or override private elements; without
    # either, every private element goes and none is converted (`inspect` shows them converted)
    need_creators = rules.safe_private or rules.overrides_private or ctx.log is not None
    creators = _private_creators(ds) if has_private and need_creators else {}
    keep_private = _kept_private_tags(ds, rules, creators) if (rules.safe_private and creators) else frozenset()
    if creators and rules.overrides_private:
        # a block with an element an override keeps needs its creator element too
        extra = set()
        for tag in ds.keys():
            t = int(tag)
            if t >> 16 & 1:
                ov = _private_override(t, creators, path, rules)
                if ov is not None and ov.action != "remove":
                    extra.add((t >> 16 << 16) | ((t & 0xFFFF) >> 8))
        keep_private = frozenset(keep_private | extra)
    # no override and nothing kept here: every private element goes, unconverted
    drop_private = not keep_private and not rules.overrides_private
    log = ctx.log
    fast = log is None  # `inspect` notes every value: no shortcuts there
    top = path == ()
    by_tag, overrides_std, allowlist = rules.by_tag, rules.overrides_std, rules.allowlist
    resolved = ctx.resolved
    removed = kept = 0
    dropped_creator = False
    if has_private and drop_private and fast:
        # every private element goes: all at once, before the others (nothing the others
        # do looks at them)
        private = [t for t in d if t >> 16 & 1]
        for t in private:
            del d[t]  # what `del ds[t]` does for a private element, see the end
        removed = len(private)
        dropped_creator = any(0x0010 <= t & 0xFFFF <= 0x00FF for t in private)
    for tag, raw in list(d.items()):
        t = int(tag)
        if top and (t == PATIENT_ID or t == PATIENT_NAME or t in _MARKERS):
            continue
        group = t >> 16
        if group & 1:
            if drop_private:
                if log is not None:
                    ctx.note(path, t, ds.get_item(tag, keep_deferred=True).VR, "X (private)", ds)
                del d[tag]  # what `del ds[tag]` does for a private element, see below
                dropped_creator = dropped_creator or 0x0010 <= t & 0xFFFF <= 0x00FF
                removed += 1
                continue
            ov = _private_override(t, creators, path, rules)
            if ov is not None:
                _override(ds, ds[tag], ov, path, ctx)
                continue
            if t in keep_private:
                elem = ds[tag]
                if elem.VR in ("DA", "DT") and rules.shift_dates and _private_date(t, creators, rules):
                    # a kept private date (TCIA KB 'o'): shifted like every other date
                    ctx.note(path, t, elem.VR, "C (private date shifted)", ds)
                    _shift(elem, ctx.mapping.date_offset_days)
                    ctx.counts.cleaned += 1
                    continue
                kept += 1
                ctx.note(path, t, elem.VR, "K (safe private)", ds)
                if elem.VR == "SQ":
                    # safe private sequences keep their structure; identifiers inside are
                    # still governed by the standard rules for their own tags
                    for item in elem.value or ():
                        _walk(item, path + (t,), ctx, cleaning)
            else:
                if log is not None:
                    ctx.note(path, t, ds.get_item(tag, keep_deferred=True).VR, "X (private)", ds)
                del d[tag]
                dropped_creator = dropped_creator or 0x0010 <= t & 0xFFFF <= 0x00FF
                removed += 1
            continue
        if 0x5000 <= group <= 0x501E or 0x6000 <= group <= 0x601E:  # (group is even here)
            # curve data; overlays (their data and comments are X in Table E.1-1: graphics
            # may carry burned-in text). The whole overlay group goes, so no overlay is left
            # with its description but without its data (invalid for the IOD).
            if log is not None:
                ctx.note(path, t, ds.get_item(tag, keep_deferred=True).VR, "X (curve/overlay)")
            del ds[tag]
            removed += 1
            continue
        if t == SPECIFIC_CHARSET or group == 0x0002:
            if fast and raw.VR in _PHI_TEXT_VRS:
                _keep_converted(ds, tag, t, raw)
            continue
        if overrides_std:
            ovs = overrides_std.get(t)
            if ovs:
                ov = next((o for o in ovs if o.within is None or o.within == path), None)
                if ov is not None:
                    _override(ds, ds[tag], ov, path, ctx)
                    continue
        # the VR without converting the value; values are converted only where an action
        # needs them (dsutil.walk), every other element is written back as its raw bytes
        if fast:
            vr = raw.VR
            if vr not in PLAIN_VRS:
                vr = vr_of(t, raw)
        else:
            vr = None
        codes = by_tag.get(t)
        if codes is None:
            if (allowlist is not None and t not in allowlist and top
                    and _TYPE_RANK.get(ctx.iod.get((t,)), 9) > 3):
                # not on the allowlist and not required (type 1/2) by the object's IOD
                if log is not None:
                    ctx.note(path, t, ds.get_item(tag, keep_deferred=True).VR, "X (not on allowlist)", ds)
                del ds[tag]
                removed += 1
                continue
            if vr is not None and vr not in _UNLISTED_NEEDS_VALUE and not (
                    cleaning and (vr in _TEXT_VRS or vr == "PN")):
                kept += 1  # what _unlisted does for such an element, unconverted
                if vr in _PHI_TEXT_VRS:
                    _keep_converted(ds, tag, t, raw)
                continue
            if fast and vr is None and t in BULK_TAGS:
                # pixel/waveform data read with implicit VR ("OB or OW"): kept as read;
                # converting would load a deferred value (a large object) into memory
                kept += 1
                continue
            _unlisted(ds, element(ds, tag), path, ctx, cleaning)
            continue
        code, basic = codes
        if vr is None:
            elem = element(ds, tag)
            vr = elem.VR
        else:
            elem = None
        action = resolved.get((code, path, t))
        if action is None:
            action = resolved[(code, path, t)] = _resolve(code, path + (t,), ctx)
        if action == "C" and not _cleanable_vr(vr, ctx):
            # cannot clean this value: Basic applies
            action = resolved.get((basic, path, t))
            if action is None:
                action = resolved[(basic, path, t)] = _resolve(basic, path + (t,), ctx)
        if fast and elem is None:
            if action == "X" or action == "K" and vr != "SQ":
                if action == "X":
                    if t in _PIXEL_TAGS:
                        del ds[tag]
                    else:
                        del d[tag]  # what `del ds[tag]` does for a standard, non-pixel element
                    removed += 1
                else:
                    kept += 1
                    if vr in _PHI_TEXT_VRS:
                        _keep_converted(ds, tag, t, raw)
                continue
            if action == "Z" or action == "D" and vr in _DUMMY and not (vr in _DATES and rules.shift_dates):
                # emptied or a dummy: the old value is not needed (what _apply does, unconverted)
                if replace_value(ds, tag, "" if action == "Z" else _DUMMY[vr]):
                    if action == "Z":
                        ctx.counts.emptied += 1
                    else:
                        ctx.counts.replaced += 1
                    continue
        _apply(ds, elem if elem is not None else element(ds, tag), action, path, ctx)
    if dropped_creator and ds._private_blocks:
        ds._private_blocks = {}  # as Dataset.__delitem__ does when a private creator goes
    c = ctx.counts
    c.removed += removed
    c.kept += kept


#: VRs whose identifying values the read collects without converting them (dsutil.text_parts)
_PHI_TEXT_VRS = frozenset({"PN", "LO", "SH"})
_PHI_TAGS: Optional[frozenset] = None


def _keep_converted(ds: Dataset, tag, t: int, raw) -> None:
    """A kept element whose identifying value the read collected: converted as the read did
    before it collected values without converting (dsutil.text_parts), so that the element
    is written as it always was (pydicom writes a converted element from its value)."""
    global _PHI_TAGS
    if _PHI_TAGS is None:
        from .phi import collected_tags
        _PHI_TAGS = collected_tags()
    vr = raw.VR
    if vr is None:
        vr = vr_of(t, raw)
    if vr == "PN" or t in _PHI_TAGS and vr in _PHI_TEXT_VRS:
        element(ds, tag)


#: unlisted elements whose value _unlisted must see (remapped UIDs, shifted dates, items)
_UNLISTED_NEEDS_VALUE = frozenset({"SQ", "UI", "DA", "DT"})


def _cleanable_vr(vr: str, ctx: _Ctx) -> bool:
    if vr in ("DA", "DT", "TM"):
        return ctx.rules.shift_dates
    return vr == "SQ" or vr in _TEXT_VRS or vr == "PN"


def _private_creators(ds: Dataset) -> dict:
    creators = {}
    for tag in ds.keys():
        t = int(tag)
        g, e = t >> 16, t & 0xFFFF
        if g & 1 and 0x0010 <= e <= 0x00FF:
            val = ds[tag].value
            if isinstance(val, bytes):
                val = val.decode("latin-1", "replace")
            creators[(g, e)] = str(val or "").strip().lower()
    return creators


def _private_date(t: int, creators: dict, rules: Rules) -> bool:
    g, e = t >> 16, t & 0xFFFF
    creator = creators.get((g, e >> 8)) if e >= 0x1000 else None
    return bool(creator) and (creator, g, e & 0xFF) in rules.private_dates


def _private_override(t: int, creators: dict, path: tuple, rules: Rules):
    if not rules.overrides_private:
        return None
    g, e = t >> 16, t & 0xFFFF
    if e < 0x1000:
        return None
    creator = creators.get((g, e >> 8))
    for o in rules.overrides_private.get((creator, g, e & 0xFF), ()) if creator else ():
        if o.within is None or o.within == path:
            return o
    return None


def _kept_private_tags(ds: Dataset, rules: Rules, creators: dict) -> frozenset:
    """Private elements on the safe list, found through each creator's actual block."""
    keep = set()
    for tag in ds.keys():
        t = int(tag)
        g, e = t >> 16, t & 0xFFFF
        if not g & 1 or e < 0x1000:
            continue
        creator = creators.get((g, e >> 8))
        if creator and (creator, g, e & 0xFF) in rules.safe_private:
            keep.add(t)
            keep.add((g << 16) | (e >> 8))  # the creator element of a kept block
    return frozenset(keep)


def _resolve(code: str, path: tuple, ctx: _Ctx) -> str:
    if code.endswith("U*"):
        # X/Z/U* (sequences of references): keep the structure with every UID remapped by
        # the keyed derivation. Allowed by the code, and unlike X it keeps references
        # between objects (SEG -> CT, RT -> images) intact and the IOD's cross-checks valid.
        return "U"
    code = code.replace("*", "")
    choices = code.split("/")
    if len(choices) == 1:
        return choices[0]
    typ = ctx.iod.get(path)
    rank = _TYPE_RANK.get(typ, 9)
    replace = "U" if "U" in choices else ("D" if "D" in choices else None)
    if rank <= 1 and replace:
        return replace
    if rank <= 3:
        if "Z" in choices:
            return "Z"
        if replace:
            return replace
    if "X" in choices:
        return "X"
    return "Z" if "Z" in choices else choices[-1]


def _apply(ds: Dataset, elem: DataElement, action: str, path: tuple, ctx: _Ctx) -> None:
    c = ctx.counts
    if ctx.log is not None:
        ctx.note(path, elem.tag, elem.VR, action, ds)
    if action == "X":
        del ds[elem.tag]
        c.removed += 1
    elif action == "Z":
        elem.value = Sequence() if elem.VR == "SQ" else ("" if elem.VR not in _NUMERIC_ZERO else None)
        c.emptied += 1
    elif action == "K":
        c.kept += 1
        if elem.VR == "SQ":
            _recurse(elem, path, ctx)
    elif action == "U":
        if elem.VR == "SQ":
            _recurse(elem, path, ctx, cleaning=True)
            c.replaced += 1
        elif ctx.rules.retain_uids:
            c.kept += 1
        else:
            _remap_uid(elem, ctx)
            c.replaced += 1
    elif action == "D":
        if elem.VR == "SQ":
            # D on a sequence: keep the items, but every value inside that the table does not
            # name is treated as content to clean (text rid of identifiers, names emptied)
            _recurse(elem, path, ctx, cleaning=True)
            c.replaced += 1
        else:
            _dummy(elem, ctx)
            c.replaced += 1
    elif action == "C":
        _clean(elem, path, ctx)
        c.cleaned += 1
    else:  # unknown code: fail safe
        del ds[elem.tag]
        c.removed += 1


def _clean(elem: DataElement, path: tuple, ctx: _Ctx) -> None:
    """C: dates shifted (times kept, intervals preserved); free text rid of identifiers;
    person names emptied; sequences recursed with every text value inside cleaned."""
    vr = elem.VR
    if vr in ("DA", "DT"):
        _shift(elem, ctx.mapping.date_offset_days)
    elif vr == "TM":
        pass
    elif vr == "SQ":
        for item in elem.value or ():
            _walk(item, path + (int(elem.tag),), ctx, cleaning=True)
    elif vr == "PN":
        elem.value = ""  # a role placeholder would need the role; never the patient's pseudonym
    elif vr in _TEXT_VRS:
        _clean_text(elem, ctx)


def _clean_text(elem: DataElement, ctx: _Ctx) -> None:
    v = elem.value
    if v is None or v == "":
        return
    limit = _TEXT_VRS.get(elem.VR)
    cleaner = ctx.cleaner()

    def one(x):
        out, _n = cleaner.clean(str(x))
        return out[:limit] if limit else out

    if isinstance(v, (list, tuple)) or (hasattr(v, "__iter__") and not isinstance(v, (str, bytes))):
        elem.value = [one(x) for x in v]
    else:
        if isinstance(v, bytes):
            v = v.decode("latin-1", "replace")
        elem.value = one(v)


def _override(ds: Dataset, elem: DataElement, ov, path: tuple, ctx: _Ctx) -> None:
    """A policy's per-attribute override: keep, remove, empty, replace, hash, shift."""
    c = ctx.counts
    ctx.note(path, elem.tag, elem.VR, f"override:{ov.action}", ds)
    a = ov.action
    if a == "keep":
        c.kept += 1
        if elem.VR == "SQ":
            _recurse(elem, path, ctx)
    elif a == "remove":
        del ds[elem.tag]
        c.removed += 1
    elif a == "empty":
        elem.value = Sequence() if elem.VR == "SQ" else ("" if elem.VR not in _NUMERIC_ZERO else None)
        c.emptied += 1
    elif a == "replace":
        elem.value = ov.value
        c.replaced += 1
    elif a == "hash":
        if elem.VR == "UI":
            _remap_uid(elem, ctx)
        else:
            raw = elem.value
            text = raw.decode("latin-1") if isinstance(raw, bytes) else str(raw if raw is not None else "")
            limit = {"SH": 16, "AE": 16, "CS": 16}.get(elem.VR, 64)
            digest = ctx.deriver.mac("override-hash", f"{int(elem.tag):08X}\x1f{text}").hex().upper()
            elem.value = digest[:limit]
        c.replaced += 1
    elif a == "shift":
        if elem.VR in ("DA", "DT"):
            _shift(elem, ctx.mapping.date_offset_days)
            c.cleaned += 1
        else:
            del ds[elem.tag]  # a shift of a non-date cannot be honoured safely
            c.removed += 1


def _recurse(elem: DataElement, path: tuple, ctx: _Ctx, cleaning: bool = False) -> None:
    for item in elem.value or ():
        _walk(item, path + (int(elem.tag),), ctx, cleaning)


def _unlisted(ds: Dataset, elem: DataElement, path: tuple, ctx: _Ctx, cleaning: bool = False) -> None:
    if elem.VR == "SQ":
        ctx.note(path, elem.tag, elem.VR, "K")
        for item in elem.value or ():
            _walk(item, path + (int(elem.tag),), ctx, cleaning)
        ctx.counts.kept += 1
        return
    if elem.VR == "UI" and not ctx.rules.retain_uids and int(elem.tag) != SOP_CLASS_UID:
        before = elem.value
        _remap_uid(elem, ctx)
        if elem.value != before:
            ctx.note(path, elem.tag, elem.VR, "U (unlisted UID)")  # value already replaced
            ctx.counts.replaced += 1
            return
    if elem.VR in ("DA", "DT") and ctx.rules.shift_dates:
        # a date the table does not name: shifted too, so every date of the patient moves
        # by the same offset and intervals hold
        ctx.note(path, elem.tag, elem.VR, "C (unlisted date shifted)", ds)
        _shift(elem, ctx.mapping.date_offset_days)
        ctx.counts.cleaned += 1
        return
    if cleaning and (elem.VR in _TEXT_VRS or elem.VR == "PN"):
        # inside a structure being cleaned (C on a sequence): clean every text value
        ctx.note(path, elem.tag, elem.VR, "C (in cleaned sequence)", ds)
        _clean(elem, path, ctx)
        ctx.counts.cleaned += 1
        return
    ctx.note(path, elem.tag, elem.VR, "K", ds)
    ctx.counts.kept += 1


def _remap_uid(elem: DataElement, ctx: _Ctx) -> None:
    v = elem.value
    if v is None or v == "":
        return
    if isinstance(v, (list, tuple)) or hasattr(v, "__iter__") and not isinstance(v, (str, bytes)):
        elem.value = [ctx.deriver.uid(str(x)) for x in v]
    else:
        if isinstance(v, bytes):
            v = v.decode("ascii", "replace")
        elem.value = ctx.deriver.uid(str(v))


def _dummy(elem: DataElement, ctx: _Ctx) -> None:
    vr = elem.VR
    if vr == "UI":
        _remap_uid(elem, ctx)
    elif vr in ("DA", "DT") and ctx.rules.shift_dates:
        _shift(elem, ctx.mapping.date_offset_days)
    elif vr in _DUMMY:
        elem.value = _DUMMY[vr]
    elif vr in _NUMERIC_ZERO:
        elem.value = _NUMERIC_ZERO[vr]
    elif vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
        elem.value = b"\x00\x00"
    else:
        elem.value = "ANONYMIZED"


import re as _re  # noqa: E402 (date grammar, used by shift_date only)


def shift_date(value: str, days: int) -> str:
    """Shift one DA or DT value by whole ``days``; anything unparsable becomes empty.

    * Full dates (DA ``YYYYMMDD``; DT ``YYYYMMDD`` + optional ``HH[MM[SS[.F{1,6}]]]``):
      the date moves by ``days``; time, fraction and UTC offset ``&ZZXX`` are kept as they
      were.
    * DT with year-month (``YYYYMM``) or year only (``YYYY``), optionally with ``&ZZXX``:
      moved by the offset rounded to whole months (``days / 30.436875``) or whole years
      (``days / 365.2425``), half away from zero, and kept at their precision. That is
      shifting the middle of the month/year and truncating, without the calendar jitter
      (month lengths, leap years) that would move two values of one patient by different
      amounts: intervals between values of the same precision are kept exactly, and a
      shifted partial value is at most one unit (month/year) from the period the exact
      day shift of any day in it lands in.
    * Legacy ACR-NEMA dates ``YYYY.MM.DD`` come out as ``YYYYMMDD``; query ranges
      ``A-B``, ``-B``, ``A-`` have both ends shifted. Anything else (bad digits, impossible
      dates, trailing text) is emptied: nothing unshifted is ever passed through.
    """
    v = value.strip(" \x00")
    if not v:
        return ""
    out = _shift_one(v, days)
    if out is not None:
        return out
    # a range: the first '-' where both sides (one may be empty) are valid values
    for i, ch in enumerate(v):
        if ch == "-":
            left, right = v[:i], v[i + 1:]
            if not (left or right):
                continue
            a = _shift_one(left, days) if left else ""
            b = _shift_one(right, days) if right else ""
            if a is not None and b is not None:
                return f"{a}-{b}"
    return ""


_DT_RE = _re.compile(r"(\d{4})(\d{2})?(\d{2})?((?:\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?)"
                    r"([+-]\d{4})?")
_LEGACY_DA_RE = _re.compile(r"(\d{4})\.(\d{2})\.(\d{2})")
_DAYS_PER_YEAR, _DAYS_PER_MONTH = 365.2425, 365.2425 / 12


def _round_away(x: float) -> int:
    return int(abs(x) + 0.5) * (1 if x >= 0 else -1)


def _shift_one(v: str, days: int) -> Optional[str]:
    """One DA/DT value (no range) shifted, or None when it is not a valid value."""
    m = _LEGACY_DA_RE.fullmatch(v)
    if m:
        v = "".join(m.groups())
    m = _DT_RE.fullmatch(v)
    if not m:
        return None
    y, mo, d, time, tz = m.groups()
    if (time and d is None) or (d is not None and mo is None):
        return None
    if tz and (int(tz[1:3]) > 14 or int(tz[3:5]) > 59):
        return None
    if time and (int(time[0:2]) > 23 or (len(time) >= 4 and int(time[2:4]) > 59)
                 or (len(time) >= 6 and int(time[4:6]) > 60)):
        return None
    year = int(y)
    try:
        if d is not None:
            nd = _dt.date(year, int(mo), int(d)) + _dt.timedelta(days=days)
            return f"{nd:%Y%m%d}{time}{tz or ''}"
        if mo is not None:
            month = int(mo)
            if not 1 <= month <= 12:
                return None
            n = year * 12 + (month - 1) + _round_away(days / _DAYS_PER_MONTH)
            year, month = divmod(n, 12)
            month += 1
            if not 1 <= year <= 9999:
                return None
            return f"{year:04d}{month:02d}{tz or ''}"
        year += _round_away(days / _DAYS_PER_YEAR)
        if not 1 <= year <= 9999:
            return None
        return f"{year:04d}{tz or ''}"
    except (ValueError, OverflowError):  # impossible date, or shifted out of 0001..9999
        return None


def _shift(elem: DataElement, days: int) -> None:
    v = elem.value
    if v is None or v == "":
        return
    if isinstance(v, bytes):
        v = v.decode("ascii", "replace")
    if isinstance(v, str):
        parts = v.split("\\")
        elem.value = "\\".join(shift_date(p, days) for p in parts)
    elif hasattr(v, "__iter__"):  # MultiValue / list
        elem.value = [shift_date(str(p), days) for p in v]
    else:  # a single pydicom DA/DT object (datetime conversion on): its original text
        elem.value = shift_date(str(v), days)


def _set(ds: Dataset, tag: int, keyword: str, value) -> None:
    """``setattr(ds, keyword, value)`` for a standard attribute, by tag: the same element
    (new with the dictionary VR, or the existing one converted and given the value)."""
    raw = ds._dict.get(tag)
    if raw is None:
        elem = DataElement(tag, _DICTIONARY_VR[keyword], value)
        if tag >> 16 == 0x0002 or elem.VR == "SQ":
            ds[tag] = elem  # file meta checks, sequence parents: pydicom's own path
        else:
            ds._dict[elem.tag] = elem
        return
    if replace_value(ds, tag, value):  # the old value is not needed
        return
    elem = element(ds, tag, raw)
    if elem.VR == "SQ":
        setattr(ds, keyword, value)
    else:
        elem.value = value


#: file meta elements that can carry identifying or site values (removed)
_META_DROP = tuple(Tag(kw) for kw in (
    "SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
    "ReceivingApplicationEntityTitle", "PrivateInformationCreatorUID",
    "PrivateInformation", "SourcePresentationAddress", "SendingPresentationAddress",
    "ReceivingPresentationAddress", "RTVMetaInformationVersion",
    "RTVCommunicationSOPClassUID", "RTVCommunicationSOPInstanceUID",
    "RTVSourceIdentifier", "RTVFlowIdentifier", "RTVFlowRTPSamplingRate",
    "RTVFlowActualFrameDuration"))
_MEDIA_SOP_INSTANCE_UID, _MEDIA_SOP_CLASS_UID = 0x00020003, 0x00020002
_DICTIONARY_VR = {kw: dictionary_VR(tag_for_keyword(kw)) for kw in (
    "PatientID", "PatientName", "PatientIdentityRemoved", "DeidentificationMethod",
    "LongitudinalTemporalInformationModified", "CodeValue", "CodingSchemeDesignator",
    "CodeMeaning", "MediaStorageSOPInstanceUID", "MediaStorageSOPClassUID")}


def _file_meta(ds: Dataset, ctx: _Ctx) -> None:
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return
    d = ds._dict
    if SOP_INSTANCE_UID in d:
        _set(meta, _MEDIA_SOP_INSTANCE_UID, "MediaStorageSOPInstanceUID", value_of(ds, SOP_INSTANCE_UID))
    if SOP_CLASS_UID in d:
        _set(meta, _MEDIA_SOP_CLASS_UID, "MediaStorageSOPClassUID", value_of(ds, SOP_CLASS_UID))
    md = meta._dict
    for tag in _META_DROP:
        if tag in md:
            del meta[tag]


def _method_codes(rules: Rules) -> list[tuple[str, str]]:
    codes = [BASIC_CODE]
    for o in rules.policy.applied_options:
        codes.append(OPTION_CODES[o])
    return codes


def _markers(ds: Dataset, rules: Rules, ctx: _Ctx) -> None:
    _set(ds, PATIENT_IDENTITY_REMOVED, "PatientIdentityRemoved", "YES")
    method = f"dicom-deid {__version__} {rules.policy.label}"
    _set(ds, DEID_METHOD, "DeidentificationMethod", method[:64])
    seq = Sequence()
    for code, meaning in _method_codes(rules):
        item = Dataset()
        _set(item, 0x00080100, "CodeValue", code)
        _set(item, 0x00080102, "CodingSchemeDesignator", "DCM")
        _set(item, 0x00080104, "CodeMeaning", meaning)
        seq.append(item)
    ds.DeidentificationMethodCodeSequence = seq
    if rules.keep_dates:
        value = "UNMODIFIED"
    elif rules.shift_dates:
        value = "MODIFIED"
    else:
        value = "REMOVED"
    _set(ds, LONGITUDINAL_MODIFIED, "LongitudinalTemporalInformationModified", value)


def effective_actions(pol: Policy) -> list[dict]:
    """The action this version applies to every Table E.1-1 row under ``pol``: what
    ``dicom-deid policy show`` prints and the README's action table is generated from."""
    opts = set(pol.applied_options)
    out = []
    for row in standard.load_table():
        code = row.action(opts)
        note = ""
        if code == "C":
            note = ("dates shifted per patient, times kept; " if "rtn_long_modified_dates" in opts else "") + \
                "text cleaned of identifiers; where a value cannot be cleaned the basic action applies"
        if row.tag in ("(0010,0010)", "(0010,0020)"):
            note = "replaced by the keyed pseudonym"
        elif "U" in code and "rtn_uids" not in opts:
            note = note or "UIDs: keyed remap to 2.25.<uuid v8>"
        if "/" in code:
            note = note or "resolved per IOD: type 1/1C -> D/U, 2/2C -> Z, else X"
        out.append({"tag": row.tag, "name": row.name, "basic": row.basic, "action": code, "note": note})
    return out
