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

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from . import __version__, standard
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
        self.by_tag: dict[int, str] = {}
        for tag, row in standard.rules_by_tag().items():
            code = row.action(opts)
            # an option we cannot apply must not weaken the result: use the Basic code
            if code.startswith("C") and not _can_clean(row, opts):
                code = row.basic
            self.by_tag[tag] = code
        self.safe_private = standard.safe_private_elements() if "rtn_safe_private" in opts else frozenset()
        self.shift_dates = "rtn_long_modified_dates" in opts
        self.keep_dates = "rtn_long_full_dates" in opts
        self.retain_uids = "rtn_uids" in opts
        self._iod_cache: dict[str, dict] = {}

    def iod_types(self, sop_class_uid: str) -> dict:
        types = self._iod_cache.get(sop_class_uid)
        if types is None:
            types = standard.iod_attribute_types(sop_class_uid)
            self._iod_cache[sop_class_uid] = types
        return types


def _can_clean(row, opts) -> bool:
    """Which 'C' codes this version can honour: date cleaning (shift) only."""
    return "rtn_long_modified_dates" in opts and dict(row.options).get("rtn_long_modified_dates") == "C"


def compile_rules(policy: Policy, key: bytes) -> Rules:
    return Rules(policy, Deriver(key, policy.date_offset_days))


@dataclasses.dataclass(frozen=True)
class PatientMapping:
    """What the pseudonym map (side input) or the keyed derivation gives for one patient."""

    pseudonym: str
    date_offset_days: int


def patient_key_of(ds: Dataset, deriver: Deriver) -> str:
    pid = str(ds.get("PatientID", "") or "").strip()
    issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
    if not pid:
        # no patient ID: fall back to the study so a study stays together, never merged
        # with other unidentified patients
        study = str(ds.get("StudyInstanceUID", "") or "").strip()
        return deriver.patient_key("study:" + study if study else "unknown:", issuer)
    return deriver.patient_key(pid, issuer)


def mapping_for(patient_key: str, deriver: Deriver, entry: Optional[dict]) -> PatientMapping:
    if entry:
        return PatientMapping(entry["pseudonym"], int(entry["date_offset_days"]))
    return PatientMapping(deriver.pseudonym(patient_key), deriver.date_offset_days(patient_key))


def deidentify(obj: DicomObject, rules: Rules, entry: Optional[dict] = None) -> DicomObject:
    """De-identify ``obj.dataset`` in place; fill ``obj.facts`` and ``obj.private``."""
    ds = obj.dataset
    d = rules.deriver
    pkey = obj.patient_key or patient_key_of(ds, d)
    obj.patient_key = pkey
    mapping = mapping_for(pkey, d, entry)
    sop_class = str(ds.get("SOPClassUID", "") or "")
    ctx = _Ctx(rules, d, mapping, rules.iod_types(sop_class), Counts())

    original_pid = str(ds.get("PatientID", "") or "")
    orig = {k: str(ds.get(k, "") or "") for k in
            ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")}

    _walk(ds, (), ctx)

    # Patient identity: pseudonym in ID and name whatever the profile code (Z permits it
    # only as an empty value; the pseudonym is a research-grade replacement, so record it
    # as replaced).
    ds.PatientID = mapping.pseudonym
    ds.PatientName = mapping.pseudonym
    if "IssuerOfPatientID" in ds:
        del ds.IssuerOfPatientID

    _file_meta(ds, ctx)
    _markers(ds, rules, ctx)

    c = ctx.counts
    obj.facts.update(
        pseudo_patient_id=mapping.pseudonym,
        study_uid=str(ds.get("StudyInstanceUID", "") or "") or None,
        series_uid=str(ds.get("SeriesInstanceUID", "") or "") or None,
        sop_uid=str(ds.get("SOPInstanceUID", "") or "") or None,
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
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or "") or None,
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


def _walk(ds: Dataset, path: tuple, ctx: _Ctx) -> None:
    rules = ctx.rules
    keep_private = _kept_private_tags(ds, rules) if rules.safe_private else frozenset()
    for tag in list(ds.keys()):
        t = int(tag)
        if path == () and t in (PATIENT_ID, PATIENT_NAME) or t in _MARKERS and path == ():
            continue
        group = t >> 16
        if group & 1:
            if t in keep_private:
                ctx.counts.kept += 1
                elem = ds[tag]
                if elem.VR == "SQ":
                    # safe private sequences keep their structure; identifiers inside are
                    # still governed by the standard rules for their own tags
                    for item in elem.value or ():
                        _walk(item, path + (t,), ctx)
            else:
                del ds[tag]
                ctx.counts.removed += 1
            continue
        if 0x5000 <= group <= 0x501E or (0x6000 <= group <= 0x601E and (t & 0xFFFF) in (0x3000, 0x4000)):
            # curve data; overlay data and comments (burned-in graphics may carry text)
            del ds[tag]
            ctx.counts.removed += 1
            continue
        if t == SPECIFIC_CHARSET or group == 0x0002:
            continue
        code = rules.by_tag.get(t)
        elem = ds[tag]
        if code is None:
            _unlisted(ds, elem, path, ctx)
            continue
        action = _resolve(code, path + (t,), ctx)
        _apply(ds, elem, action, path, ctx)


def _kept_private_tags(ds: Dataset, rules: Rules) -> frozenset:
    """Private elements on the safe list, found through each creator's actual block."""
    keep = set()
    creators = {}
    for tag in ds.keys():
        t = int(tag)
        g, e = t >> 16, t & 0xFFFF
        if g & 1 and 0x0010 <= e <= 0x00FF:
            val = ds[tag].value
            if isinstance(val, bytes):
                val = val.decode("latin-1", "replace")
            creators[(g, e)] = str(val or "").strip().lower()
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
    t = int(elem.tag)
    c = ctx.counts
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
            _recurse(elem, path, ctx)
            c.replaced += 1
        elif ctx.rules.retain_uids:
            c.kept += 1
        else:
            _remap_uid(elem, ctx)
            c.replaced += 1
    elif action == "D":
        if elem.VR == "SQ":
            _recurse(elem, path, ctx)
            c.replaced += 1
        else:
            _dummy(elem, ctx)
            c.replaced += 1
    elif action == "C":
        if elem.VR in ("DA", "DT") and ctx.rules.shift_dates:
            _shift(elem, ctx.mapping.date_offset_days)
            c.cleaned += 1
        elif elem.VR == "SQ":
            _recurse(elem, path, ctx)
            c.cleaned += 1
        elif elem.VR == "TM" and ctx.rules.shift_dates:
            c.kept += 1  # times are kept with modified dates (intervals preserved)
        else:  # fail safe: an unsupported clean removes
            del ds[elem.tag]
            c.removed += 1
    else:  # unknown code: fail safe
        del ds[elem.tag]
        c.removed += 1
    del t


def _recurse(elem: DataElement, path: tuple, ctx: _Ctx) -> None:
    for item in elem.value or ():
        _walk(item, path + (int(elem.tag),), ctx)


def _unlisted(ds: Dataset, elem: DataElement, path: tuple, ctx: _Ctx) -> None:
    if elem.VR == "SQ":
        _recurse(elem, path, ctx)
        ctx.counts.kept += 1
        return
    if elem.VR == "UI" and not ctx.rules.retain_uids and int(elem.tag) != SOP_CLASS_UID:
        before = elem.value
        _remap_uid(elem, ctx)
        if elem.value != before:
            ctx.counts.replaced += 1
            return
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


def shift_date(value: str, days: int) -> str:
    """Shift a DA (YYYYMMDD) or the date part of a DT; unparsable values become empty."""
    v = value.strip()
    if len(v) < 8 or not v[:8].isdigit():
        return ""
    try:
        d = _dt.date(int(v[:4]), int(v[4:6]), int(v[6:8])) + _dt.timedelta(days=days)
    except ValueError:
        return ""
    return d.strftime("%Y%m%d") + v[8:]


def _shift(elem: DataElement, days: int) -> None:
    v = elem.value
    if v is None or v == "":
        return
    if isinstance(v, bytes):
        v = v.decode("ascii", "replace")
    if isinstance(v, str):
        parts = v.split("\\")
        elem.value = "\\".join(shift_date(p, days) for p in parts)
    else:
        elem.value = [shift_date(str(p), days) for p in v]


def _file_meta(ds: Dataset, ctx: _Ctx) -> None:
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return
    if "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    for kw in ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
               "ReceivingApplicationEntityTitle", "PrivateInformationCreatorUID",
               "PrivateInformation", "SourcePresentationAddress", "SendingPresentationAddress",
               "ReceivingPresentationAddress", "RTVMetaInformationVersion",
               "RTVCommunicationSOPClassUID", "RTVCommunicationSOPInstanceUID",
               "RTVSourceIdentifier", "RTVFlowIdentifier", "RTVFlowRTPSamplingRate",
               "RTVFlowActualFrameDuration"):
        if kw in meta:
            delattr(meta, kw)


def _method_codes(rules: Rules) -> list[tuple[str, str]]:
    codes = [BASIC_CODE]
    for o in rules.policy.applied_options:
        codes.append(OPTION_CODES[o])
    return codes


def _markers(ds: Dataset, rules: Rules, ctx: _Ctx) -> None:
    ds.PatientIdentityRemoved = "YES"
    method = f"dicom-deid {__version__} {rules.policy.label}"
    ds.DeidentificationMethod = method[:64]
    seq = Sequence()
    for code, meaning in _method_codes(rules):
        item = Dataset()
        item.CodeValue = code
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        seq.append(item)
    ds.DeidentificationMethodCodeSequence = seq
    if rules.keep_dates:
        ds.LongitudinalTemporalInformationModified = "UNMODIFIED"
    elif rules.shift_dates:
        ds.LongitudinalTemporalInformationModified = "MODIFIED"
    else:
        ds.LongitudinalTemporalInformationModified = "REMOVED"


def effective_actions(pol: Policy) -> list[dict]:
    """The action this version applies to every Table E.1-1 row under ``pol``: what
    ``dicom-deid policy show`` prints and the README's action table is generated from."""
    opts = set(pol.applied_options)
    out = []
    for row in standard.load_table():
        code = row.action(opts)
        note = ""
        if code.startswith("C") and not _can_clean(row, opts):
            code, note = row.basic, "option C not applied yet: basic action"
        if row.tag in ("(0010,0010)", "(0010,0020)"):
            note = "replaced by the keyed pseudonym"
        elif "U" in code and "rtn_uids" not in opts:
            note = note or "UIDs: keyed remap to 2.25.<uuid v8>"
        if "/" in code:
            note = note or "resolved per IOD: type 1/1C -> D/U, 2/2C -> Z, else X"
        out.append({"tag": row.tag, "name": row.name, "basic": row.basic, "action": code, "note": note})
    return out
