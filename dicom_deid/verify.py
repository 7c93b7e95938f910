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
from typing import TYPE_CHECKING, Iterable

from pydicom.dataset import Dataset

from .dsutil import walk
from .element import DicomObject, PhiContext

if TYPE_CHECKING:
    from .writer import OutputFile

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


class _Matcher:
    """Finds any of the tokens as a whole word: not preceded or followed by an ASCII letter
    or digit (the text is upper-cased first). Plain substring search per token, boundaries
    checked at each occurrence: no regular expression compiled per object."""

    def __init__(self, values: Iterable[str]):
        self.tokens = sorted(set(values), key=len, reverse=True)

    def __bool__(self):
        return bool(self.tokens)

    def search(self, text: str, open_left: bool = False, open_right: bool = False) -> bool:
        """``open_left``/``open_right``: ``text`` is a window of a longer text, so a match
        touching that edge cannot be judged here (an overlapping window judges it)."""
        for tok in self.tokens:
            start = text.find(tok)
            while start >= 0:
                end = start + len(tok)
                if ((start > 0 and text[start - 1] not in _WORD or start == 0 and not open_left)
                        and (end < len(text) and text[end] not in _WORD or end == len(text) and not open_right)):
                    return True
                start = text.find(tok, start + 1)
        return False

    def search_file(self, f, length: int, window: int) -> bool:
        """:meth:`search` over the first ``length`` bytes of a binary file, decoded as
        Latin-1 and upper-cased, ``window`` bytes at a time: windows overlap by more than
        the longest token, so every occurrence is judged whole, with both neighbours, in
        one window (the same answer as one search over the whole text)."""
        if length <= window:
            f.seek(0)
            return self.search(f.read(length).decode("latin-1").upper())
        overlap = max(len(t) for t in self.tokens) + 1
        for start in range(0, length, window):
            lo, hi = max(0, start - overlap), min(length, start + window + overlap)
            f.seek(lo)
            if self.search(f.read(hi - lo).decode("latin-1").upper(), open_left=lo > 0, open_right=hi < length):
                return True
        return False


_WORD = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


#: the conformance markers we write ourselves (their text is ours, not the object's)
OWN_MARKERS = frozenset({0x00120062, 0x00120063, 0x00120064})


#: character sets whose text decodes byte for byte without escape sequences (the default
#: repertoire, Latin-1, UTF-8); other sets are decoded by pydicom, element by element
_DIRECT_CHARSETS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8",
                    "ISO 2022 IR 6": "latin-1", "ISO 2022 IR 100": "latin-1"}
#: binary numbers too small to hold an identifier of MIN_NUMERIC_ID digits
_SHORT_NUMBERS = frozenset({"US", "SS", "AT"})


def _text_values(ds: Dataset):
    """Every decoded text value (private and UN included) as ``(path, tag, text)``; raw
    elements are decoded from their bytes, without pydicom's value conversion."""
    from pydicom.dataelem import RawDataElement
    codec = None
    for path, tag, vr, elem, parent in walk(ds):
        if vr == "SQ" or tag in OWN_MARKERS or any(t in OWN_MARKERS for t in path):
            continue
        if isinstance(elem, RawDataElement) and elem.value is None:
            elem = parent[tag]  # deferred (large inputs read from a temp file): load it
        if isinstance(elem, RawDataElement):
            if vr in _SHORT_NUMBERS:
                continue
            if vr in _BINARY_NUMBERS:
                elem = parent[tag]  # a number as its digits
            else:
                if codec is None:
                    cs = ds.get("SpecificCharacterSet", "") or ""
                    cs = cs if isinstance(cs, str) else (cs[0] if len(cs) == 1 else "\\")
                    codec = _DIRECT_CHARSETS.get(cs.strip(), "")
                b = elem.value or b""
                if not codec and vr in _CHARSET_VRS and b:
                    elem = parent[tag]  # escape sequences / multi-byte sets: pydicom decodes
                else:
                    yield path, tag, bytes(b).decode((codec or "latin-1") if vr in _CHARSET_VRS else "latin-1", "replace")
                    continue
        v = elem.value
        if v is None:
            continue
        if isinstance(v, (bytes, bytearray)):
            yield path, tag, bytes(v).decode("latin-1", "replace")
        elif isinstance(v, (list, tuple)) or (hasattr(v, "__iter__") and not isinstance(v, str)):
            yield path, tag, "\\".join(str(x) for x in v)
        else:
            yield path, tag, str(v)


_BINARY_NUMBERS = frozenset({"UL", "SL", "UV", "SV", "FL", "FD"})
#: VRs whose bytes are text in the object's character set (PS3.5 6.1.2.2)
_CHARSET_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})


#: the raw bytes of a serialised file are searched this many bytes at a time
FILE_WINDOW = 8 * 1024 * 1024


def find_residuals(obj: DicomObject, output: "bytes | OutputFile") -> list[str]:
    """Return findings as ``"<kind>:<tag>"`` strings (no values). ``output`` is the
    serialised object: bytes, or (large objects) a :class:`~dicom_deid.writer.OutputFile`
    on local disk, searched in windows, pixel data never loaded: the same checks."""
    words, ids = tokens(obj.phi)
    pat = _Matcher(words | ids)
    findings: list[str] = []
    ds = obj.dataset
    if pat:
        values = list(_text_values(ds))
        # one search over every value (NUL-separated: a boundary); per value only on a hit
        if pat.search("\0".join(text for _p, _t, text in values).upper()):
            for _path, tag, text in values:
                if pat.search(text.upper()):
                    findings.append(f"{RESIDUAL_PHI}:{int(tag):08X}")
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            for elem in meta:
                if pat.search(str(elem.value).upper()):
                    findings.append(f"{RESIDUAL_PHI}:{int(elem.tag):08X}")
        if not findings:
            if isinstance(output, (bytes, bytearray, memoryview)):
                region = _non_pixel_region(ds, output)
                hit = pat.search(bytes(region).decode("latin-1").upper())
            else:
                length = max(0, output.size - _pixel_length(ds, output.copied))
                with open(output.path, "rb") as f:
                    hit = pat.search_file(f, length, FILE_WINDOW)
            if hit:
                findings.append(f"{RESIDUAL_PHI}:raw")
    originals = {v for k, v in obj.private.items() if k.startswith("original_") and k.endswith("_uid") and v}
    if originals:
        for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            if str(ds.get(k, "") or "") in originals:
                findings.append(f"{ORIGINAL_UID}:{k}")
    return findings


def _non_pixel_region(ds: Dataset, data: bytes) -> bytes:
    return data[: max(0, len(data) - _pixel_length(ds))]


def _pixel_length(ds: Dataset, copied: "dict | None" = None) -> int:
    """Length of the Pixel Data value (0 when absent); ``copied``: lengths of values the
    writer copied from the input file (an encapsulated one is not loaded to measure it)."""
    px = ds.get_item(0x7FE00010, keep_deferred=True) if 0x7FE00010 in ds else None
    if px is None:
        return 0
    n = getattr(px, "length", None)
    if not isinstance(n, int) or n <= 0 or n == 0xFFFFFFFF:
        if copied and 0x7FE00010 in copied:
            return copied[0x7FE00010]
        v = ds.PixelData
        n = len(v) if v is not None else 0
    return n
