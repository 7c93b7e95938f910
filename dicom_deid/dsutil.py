"""Walk a dataset without pulling bulk values (pixel data, waveforms, deferred blobs)
into memory: memory on the header-only path must not grow with object size."""

from __future__ import annotations

from typing import Iterator

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

BULK_TAGS = frozenset({
    0x7FE00010, 0x7FE00008, 0x7FE00009,  # pixel data (int, float, double)
    0x54001010,  # waveform data
    0x00420011,  # encapsulated document
    0x56000020,  # spectroscopy data
})
BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV"})
#: binary values above this many bytes are not materialised by walkers
BULK_BYTES = 64 * 1024
MAX_DEPTH = 64


# --- walking without converting values ------------------------------------------------------
# pydicom keeps each element as it was read (a RawDataElement: tag, VR, bytes) until someone
# asks for its value; converting is the most expensive part of reading a header. The hot path
# converts only the elements whose value it needs (names, identifiers, dates, UIDs, text to
# clean, sequences to recurse into) and writes every other element back as its raw bytes.

from pydicom.valuerep import VR as _VR  # noqa: E402

KNOWN_VRS = frozenset(v.value for v in _VR)


def vr_of(tag: int, elem) -> "str | None":
    """The element's VR without converting it; ``None`` when only conversion can tell
    (implicit VR private elements, ``UN`` that pydicom may resolve, ambiguous VRs)."""
    vr = elem.VR
    if not isinstance(elem, RawDataElement):
        return vr
    if vr is not None and vr not in KNOWN_VRS:
        # what pydicom's conversion would raise (e.g. a stray item tag read as an element)
        raise NotImplementedError("unknown value representation")
    if vr is None:  # implicit VR: the dictionary's
        if tag >> 16 & 1:
            return None
        vr = _DICT_VR.get(tag, _MISSING)
        if vr is _MISSING:
            vr = _DICT_VR[tag] = _dictionary_vr(tag)
        if vr == "?":
            raise NotImplementedError("unknown value representation")
        return vr
    return None if vr == "UN" else vr


_MISSING = object()
#: tag -> dictionary VR for implicit VR elements (None: ambiguous or unknown, "?": invalid)
_DICT_VR: dict = {}


def _dictionary_vr(tag: int) -> "str | None":
    from pydicom.datadict import dictionary_VR
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return None
    if vr not in KNOWN_VRS:
        return "?"
    return None if " or " in vr else vr


def is_bulk_element(tag: int, elem, vr: "str | None") -> bool:
    """Pixel data, waveforms, overlays, deferred values and binary values above
    BULK_BYTES: never materialised by the walkers."""
    if tag in BULK_TAGS or (tag >> 16) & 0xFF01 == 0x6000 and tag & 0xFFFF == 0x3000:
        return True
    if vr is None:
        vr = elem.VR or "UN"
    if vr not in BINARY_VRS and vr != "UN":
        return False
    if isinstance(elem, RawDataElement):
        length = elem.length
        if elem.value is None:  # deferred: not read yet
            return True
        return length not in (None, 0xFFFFFFFF) and length > BULK_BYTES
    value = elem.value
    if value is None:
        return True
    return isinstance(value, (bytes, bytearray)) and len(value) > BULK_BYTES


def walk(ds: Dataset, path: tuple = (), depth: int = 0) -> Iterator[tuple[tuple, int, "str | None", object, Dataset]]:
    """Yield ``(path, tag, vr, element, parent)`` for every non-bulk element without
    converting values, except sequences (converted to reach their items; the sequence is
    yielded as a converted DataElement before its items' elements) and elements whose VR only
    conversion can tell (yielded converted). ``element`` may be a RawDataElement."""
    if depth > MAX_DEPTH:
        raise ValueError("sequence nesting too deep")
    for tag, elem in list(ds.items()):
        t = int(tag)
        vr = vr_of(t, elem)
        if vr is None:
            if is_bulk_element(t, elem, "UN"):
                continue
            elem = ds[tag]
            vr = elem.VR
        elif is_bulk_element(t, elem, vr):
            continue
        if vr == "SQ":
            if isinstance(elem, RawDataElement):
                elem = ds[tag]
            yield path, t, vr, elem, ds
            for item in elem.value or ():
                yield from walk(item, path + (t,), depth + 1)
        else:
            yield path, t, vr, elem, ds
