"""Which objects need a stage this version does not have (fail closed).

An object that may carry burned-in text needs the pixel stage; an encapsulated document or
a structured report needs the document stage. Until those stages exist, or while a policy
switches them off, such objects are quarantined with the reason, never passed through with
their pixels or documents as they were.
"""

from __future__ import annotations

from typing import Optional

from pydicom.dataset import Dataset

from .dsutil import value_of

PIXEL_STAGE_MISSING = "pixel_stage_missing"
DOCUMENT_STAGE_MISSING = "document_stage_missing"

SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
ULTRASOUND = {"1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.6.2",
              "1.2.840.10008.5.1.4.1.1.3.1", "1.2.840.10008.5.1.4.1.1.6"}
VISIBLE_LIGHT_PREFIX = "1.2.840.10008.5.1.4.1.1.77.1"
VIDEO = {"1.2.840.10008.5.1.4.1.1.77.1.1.1", "1.2.840.10008.5.1.4.1.1.77.1.2.1",
         "1.2.840.10008.5.1.4.1.1.77.1.4.1"}
ENCAPSULATED_DOC_PREFIX = "1.2.840.10008.5.1.4.1.1.104."
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
PIXEL_RISK_MODALITIES = {"US", "OT", "SC", "XC", "ES", "GM", "DOC", "SM", "IVUS"}
SCREEN_TYPES = {"SCREEN SAVE", "SCREENSHOT", "SECONDARY CAPTURE"}


# tags of the attributes read here (by tag: a keyword look-up costs more than the check)
_ENCAPSULATED_DOCUMENT = 0x00420011
_PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float, Double Float
_BURNED_IN_ANNOTATION = 0x00280301
_RECOGNIZABLE_VISUAL_FEATURES = 0x00280302
_MODALITY = 0x00080060
_IMAGE_TYPE = 0x00080008


def _str(ds: Dataset, tag: int) -> str:
    v = value_of(ds, tag, "")
    return str(v or "").strip().upper()


def needs_stage(ds: Dataset, sop_class: Optional[str]) -> Optional[str]:
    """Return the quarantine reason when the object needs a stage we do not have."""
    sop = sop_class or ""
    d = ds._dict
    if sop.startswith(ENCAPSULATED_DOC_PREFIX) or sop.startswith(SR_PREFIX) or _ENCAPSULATED_DOCUMENT in d:
        return DOCUMENT_STAGE_MISSING
    has_pixels = any(t in d for t in _PIXEL_DATA_TAGS)
    if not has_pixels:
        return None
    if _str(ds, _BURNED_IN_ANNOTATION) == "YES" or _str(ds, _RECOGNIZABLE_VISUAL_FEATURES) == "YES":
        return PIXEL_STAGE_MISSING
    if sop.startswith(SECONDARY_CAPTURE_PREFIX) or sop in ULTRASOUND or sop.startswith(VISIBLE_LIGHT_PREFIX):
        return PIXEL_STAGE_MISSING
    if _str(ds, _MODALITY) in PIXEL_RISK_MODALITIES:
        return PIXEL_STAGE_MISSING
    image_type = value_of(ds, _IMAGE_TYPE, None)
    values = [str(v).upper() for v in (image_type or [])] if not isinstance(image_type, str) else [image_type.upper()]
    if any(v in SCREEN_TYPES for v in values):
        return PIXEL_STAGE_MISSING
    return None
