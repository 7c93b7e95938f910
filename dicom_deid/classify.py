"""Which objects need a stage this version does not have (fail closed).

An object that may carry burned-in text needs the pixel stage; an encapsulated document or
a structured report needs the document stage. Until those stages exist, or while a policy
switches them off, such objects are quarantined with the reason, never passed through with
their pixels or documents as they were.
"""

from __future__ import annotations

from typing import Optional

from pydicom.dataset import Dataset

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


def _str(ds: Dataset, kw: str) -> str:
    v = ds.get(kw, "")
    return str(v or "").strip().upper()


def needs_stage(ds: Dataset, sop_class: Optional[str]) -> Optional[str]:
    """Return the quarantine reason when the object needs a stage we do not have."""
    sop = sop_class or ""
    if sop.startswith(ENCAPSULATED_DOC_PREFIX) or sop.startswith(SR_PREFIX) or "EncapsulatedDocument" in ds:
        return DOCUMENT_STAGE_MISSING
    has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    if not has_pixels:
        return None
    if _str(ds, "BurnedInAnnotation") == "YES" or _str(ds, "RecognizableVisualFeatures") == "YES":
        return PIXEL_STAGE_MISSING
    if sop.startswith(SECONDARY_CAPTURE_PREFIX) or sop in ULTRASOUND or sop.startswith(VISIBLE_LIGHT_PREFIX):
        return PIXEL_STAGE_MISSING
    if _str(ds, "Modality") in PIXEL_RISK_MODALITIES:
        return PIXEL_STAGE_MISSING
    image_type = ds.get("ImageType", None)
    values = [str(v).upper() for v in (image_type or [])] if not isinstance(image_type, str) else [image_type.upper()]
    if any(v in SCREEN_TYPES for v in values):
        return PIXEL_STAGE_MISSING
    return None
