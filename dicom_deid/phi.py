"""Collect an object's original identifying values (its :class:`PhiContext`).

Run once, on the dataset as read, before any transform touches it. Later stages (pixels,
documents, verification) look for these values after the header is clean.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from .dsutil import walk as iter_raw
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

    def walk(d: Dataset):
        # values converted only for the elements collected (see dsutil.walk)
        for _path, tag, vr, elem, parent in iter_raw(d):
            if vr == "SQ":
                continue
            if vr == "PN":
                kind = names
            elif tag in id_tags:
                kind = ids
            elif tag in date_tags:
                kind = dates
            elif tag in text_tags:
                kind = texts
            elif tag in org_tags:
                kind = orgs
            else:
                continue
            try:
                value = parent[tag].value
            except Exception:
                continue
            if kind is names:
                for v in _values(value):
                    names.extend(_name_components(v))
            else:
                kind.extend(_values(value))

    walk(ds)
    # OtherPatientIDsSequence items carry PatientID and are reached by iterall
    dedup = lambda xs: tuple(dict.fromkeys(xs))  # noqa: E731
    return PhiContext(names=dedup(names), ids=dedup(ids), dates=dedup(dates), texts=dedup(texts), orgs=dedup(orgs))
