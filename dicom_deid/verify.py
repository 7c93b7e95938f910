"""An independent second look at each de-identified object before it is written.

Matches the object's original identifying values (its :class:`PhiContext`) against every
decoded text value of the output (private and UN included) and the raw output bytes
outside the pixel data; checks that no original UID survived. Matching is tokenised and
case-insensitive, with minimum lengths so short name parts ("M", "ANN") do not match
noise. Findings quarantine the object; the finding names the attribute *tag* and the kind
of value, never the value.
"""

from __future__ import annotations

import re
from typing import Iterable

from pydicom.dataset import Dataset

from .dsutil import iter_elements
from .element import DicomObject, PhiContext

MIN_NAME = 4
MIN_ALNUM_ID = 4
MIN_NUMERIC_ID = 6
# Placeholder words seen in names of test/phantom objects and our own dummies; matching
# them would only produce false findings.
STOP_TOKENS = frozenset({
    "ANONYMIZED", "ANONYMOUS", "ANON", "PATIENT", "UNKNOWN", "NONE", "TEST", "PHANTOM",
    "NAME", "ANONYMISED", "REMOVED", "DEIDENTIFIED", "NULL", "DICOM", "DEID",
})
RESIDUAL_PHI = "residual_phi"
ORIGINAL_UID = "original_uid"


def tokens(phi: PhiContext) -> tuple[frozenset, frozenset]:
    """(word tokens, id tokens) to look for, upper-case."""
    words = set()
    for name in phi.names:
        for comp in name:
            for part in re.split(r"[\s,]+", comp.upper()):
                if len(part) >= MIN_NAME and part not in STOP_TOKENS:
                    words.add(part)
    for text in phi.texts:
        t = text.upper().strip()
        if len(t) >= 6 and t not in STOP_TOKENS:
            words.add(t)
    ids = set()
    for v in list(phi.ids) + list(phi.dates):
        v = v.upper().strip()
        if v in STOP_TOKENS:
            continue
        if v.isdigit() and len(v) >= MIN_NUMERIC_ID or not v.isdigit() and len(v) >= MIN_ALNUM_ID:
            ids.add(v)
    return frozenset(words), frozenset(ids)


def _pattern(values: Iterable[str]):
    vals = sorted(values, key=len, reverse=True)
    if not vals:
        return None
    return re.compile(r"(?<![A-Z0-9])(?:" + "|".join(re.escape(v) for v in vals) + r")(?![A-Z0-9])")


#: the conformance markers we write ourselves (their text is ours, not the object's)
OWN_MARKERS = frozenset({0x00120062, 0x00120063, 0x00120064})


def _text_values(ds: Dataset):
    for path, elem in iter_elements(ds):
        if elem.VR == "SQ" or int(elem.tag) in OWN_MARKERS or any(t in OWN_MARKERS for t in path):
            continue
        v = elem.value
        if v is None:
            continue
        if isinstance(v, (bytes, bytearray)):
            yield path, elem.tag, bytes(v).decode("latin-1", "replace")
        elif isinstance(v, (list, tuple)) or (hasattr(v, "__iter__") and not isinstance(v, str)):
            yield path, elem.tag, "\\".join(str(x) for x in v)
        else:
            yield path, elem.tag, str(v)


def find_residuals(obj: DicomObject, output_bytes: bytes) -> list[str]:
    """Return findings as ``"<kind>:<tag>"`` strings (no values)."""
    words, ids = tokens(obj.phi)
    pat = _pattern(words | ids)
    findings: list[str] = []
    ds = obj.dataset
    if pat is not None:
        for _path, tag, text in _text_values(ds):
            if pat.search(text.upper()):
                findings.append(f"{RESIDUAL_PHI}:{int(tag):08X}")
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            for elem in meta:
                if pat.search(str(elem.value).upper()):
                    findings.append(f"{RESIDUAL_PHI}:{int(elem.tag):08X}")
        if not findings:
            region = _non_pixel_region(ds, output_bytes)
            if pat.search(region.decode("latin-1").upper()):
                findings.append(f"{RESIDUAL_PHI}:raw")
    originals = {v for k, v in obj.private.items() if k.startswith("original_") and k.endswith("_uid") and v}
    if originals:
        for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            if str(ds.get(k, "") or "") in originals:
                findings.append(f"{ORIGINAL_UID}:{k}")
    return findings


def _non_pixel_region(ds: Dataset, data: bytes) -> bytes:
    px = ds.get_item(0x7FE00010, keep_deferred=True) if 0x7FE00010 in ds else None
    if px is None:
        return data
    n = getattr(px, "length", None)
    if not isinstance(n, int) or n <= 0 or n == 0xFFFFFFFF:
        v = ds.PixelData
        n = len(v) if v is not None else 0
    return data[: max(0, len(data) - n)]
