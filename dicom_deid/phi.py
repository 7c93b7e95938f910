"""Collect an object's original identifying values (its :class:`PhiContext`).

Run once, on the dataset as read, before any transform touches it. Later stages (pixels,
documents, verification) look for these values after the header is clean.
"""

from __future__ import annotations

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from .dsutil import MAX_DEPTH, PLAIN_VRS, element, is_bulk_element, text_parts, vr_of
from .element import PhiContext

# Identifying attributes whose values are collected, by kind. PN values are collected
# wherever they occur (any VR PN anywhere in the object, private blocks included).
ID_KEYWORDS = (
    "PatientID", "OtherPatientIDs", "IssuerOfPatientID", "AccessionNumber",
    "MedicalRecordLocator", "PatientInsurancePlanCodeSequence", "StudyID",
    "AdmissionID", "ServiceEpisodeID", "RequestedProcedureID", "FillerOrderNumberImagingServiceRequest",
    "PlacerOrderNumberImagingServiceRequest", "PerformedProcedureStepID", "ScheduledProcedureStepID",
    "MilitaryRank", "PatientTelephoneNumbers",
)
DATE_KEYWORDS = ("PatientBirthDate",)
ORG_KEYWORDS = ("InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
                "StationName", "DeviceSerialNumber")
TEXT_KEYWORDS = (
    "PatientAddress", "PatientMotherBirthName", "PatientBirthName", "RegionOfResidence",
    "CountryOfResidence", "BranchOfService", "PatientTelephoneNumbers", "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers", "PersonAddress", "PersonTelephoneNumbers",
)
_ID_TAGS = None


def _tags(keywords):
    from pydicom.datadict import tag_for_keyword
    return frozenset(t for t in (tag_for_keyword(k) for k in keywords) if t is not None)


def _values(value):
    if value is None:
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        out = []
        for v in value:
            out.extend(_values(v))
        return out
    if isinstance(value, bytes):
        try:
            value = value.decode("latin-1")
        except Exception:  # pragma: no cover
            return []
    s = str(value).strip().strip("\x00").strip()
    return [s] if s else []


def _name_components(pn_text: str) -> list[tuple[str, ...]]:
    """'Family^Given^Middle^Prefix^Suffix=ideographic=phonetic' -> components per group."""
    out = []
    for group in pn_text.split("="):
        comps = tuple(c.strip() for c in group.split("^") if c.strip())
        if comps:
            out.append(comps)
    return out


#: PatientID, IssuerOfPatientID, OtherPatientIDs: the person key reads them next (converted
#: there anyway), so they are converted here, on the shorter path
_PERSON_KEY_TAGS = frozenset({0x00100020, 0x00100021, 0x00101000})


def collected_tags() -> frozenset:
    """Every tag whose value :func:`extract` collects (besides any element of VR PN)."""
    global _ID_TAGS
    if _ID_TAGS is None:
        _ID_TAGS = (_tags(ID_KEYWORDS), _tags(DATE_KEYWORDS), _tags(TEXT_KEYWORDS), _tags(ORG_KEYWORDS))
    return frozenset().union(*_ID_TAGS)


def extract(ds: Dataset) -> PhiContext:
    global _ID_TAGS
    if _ID_TAGS is None:
        _ID_TAGS = (_tags(ID_KEYWORDS), _tags(DATE_KEYWORDS), _tags(TEXT_KEYWORDS), _tags(ORG_KEYWORDS))
    id_tags, date_tags, text_tags, org_tags = _ID_TAGS
    names: list[tuple[str, ...]] = []
    ids: list[str] = []
    dates: list[str] = []
    texts: list[str] = []
    orgs: list[str] = []
    kinds = {}
    for tags_, kind in ((org_tags, orgs), (text_tags, texts), (date_tags, dates), (id_tags, ids)):
        kinds.update(dict.fromkeys(tags_, kind))  # later sets win: ids, dates, texts, orgs
    _collect(ds, 0, kinds, names)
    # OtherPatientIDsSequence items carry PatientID and are reached by the walk
    dedup = lambda xs: tuple(dict.fromkeys(xs))  # noqa: E731
    return PhiContext(names=dedup(names), ids=dedup(ids), dates=dedup(dates), texts=dedup(texts), orgs=dedup(orgs))


def _collect(ds: Dataset, depth: int, kinds: dict, names: list) -> None:
    """The raw walk (:func:`dicom_deid.dsutil.walk`, same elements, same conversions, same
    order, same errors) fused with the collection: values are converted only for the
    elements collected; every other element is passed over as read."""
    if depth > MAX_DEPTH:
        raise ValueError("sequence nesting too deep")
    for tag, elem in list(ds._dict.items()):
        t = int(tag)
        vr = elem.VR
        if vr not in PLAIN_VRS:
            vr = vr_of(t, elem)
        if vr is None:
            if is_bulk_element(t, elem, "UN"):
                continue
            elem = ds[tag]
            vr = elem.VR
        elif vr == "PN" or vr == "SQ" or t in kinds:
            if is_bulk_element(t, elem, vr):
                continue
        else:  # not collected, not a sequence: nothing to do (and nothing converted)
            continue
        if vr == "SQ":
            if isinstance(elem, RawDataElement):
                elem = ds[tag]
            for item in elem.value or ():
                _collect(item, depth + 1, kinds, names)
            continue
        if vr == "PN":
            kind = names
        else:
            kind = kinds.get(t)
            if kind is None:
                continue
        # the values without converting the element where that gives the same strings (it
        # stays as read; the tag stage converts it if it keeps it, see tags._walk)
        parts = text_parts(ds, elem) if t not in _PERSON_KEY_TAGS else None
        if parts is not None:
            if kind is names:
                for p in parts:
                    for v in _values(p):
                        names.extend(_name_components(v))
            else:
                for p in parts:
                    kind.extend(_values(p))
            continue
        try:
            value = element(ds, tag).value
        except Exception:
            continue
        if kind is names:
            for v in _values(value):
                names.extend(_name_components(v))
        else:
            kind.extend(_values(value))
