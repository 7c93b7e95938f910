"""Walk a dataset without pulling bulk values (pixel data, waveforms, deferred blobs)
into memory: memory on the header-only path must not grow with object size."""

from __future__ import annotations

from typing import Iterator

from pydicom.dataelem import DataElement, RawDataElement
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


def is_bulk(ds: Dataset, tag) -> bool:
    t = int(tag)
    if t in BULK_TAGS or (t >> 16) & 0xFF01 == 0x6000 and t & 0xFFFF == 0x3000:
        return True
    raw = ds.get_item(tag, keep_deferred=True)
    vr = getattr(raw, "VR", None)
    length = getattr(raw, "length", None) if isinstance(raw, RawDataElement) else None
    if length is None and isinstance(raw, DataElement) and isinstance(raw.value, (bytes, bytearray)):
        length = len(raw.value)
    if length is None and isinstance(raw, DataElement) and raw.value is None:
        return vr in BINARY_VRS or vr == "UN"  # deferred, not read yet
    return (vr in BINARY_VRS or vr == "UN") and (length or 0) > BULK_BYTES


def iter_elements(ds: Dataset, path: tuple = (), depth: int = 0) -> Iterator[tuple[tuple, DataElement]]:
    """Yield ``(path, element)`` for every non-bulk element, sequences included (the
    sequence element itself is yielded before its items' elements)."""
    if depth > MAX_DEPTH:
        raise ValueError("sequence nesting too deep")
    for tag in list(ds.keys()):
        if is_bulk(ds, tag):
            continue
        elem = ds[tag]
        yield path, elem
        if elem.VR == "SQ":
            for item in elem.value or ():
                yield from iter_elements(item, path + (int(tag),), depth + 1)
