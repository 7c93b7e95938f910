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
    for tag, elem in list(ds._dict.items()):
        t = int(tag)
        vr = elem.VR
        if vr not in PLAIN_VRS:  # the common case (explicit, known, not UN) needs no lookup
            vr = vr_of(t, elem)
        if vr is None:
            if is_bulk_element(t, elem, "UN"):
                continue
            elem = ds[tag]
            vr = elem.VR
        elif (vr in _BULK_CHECK_VRS or t in BULK_TAGS or t & 0xFF01FFFF == 0x60003000) \
                and is_bulk_element(t, elem, vr):  # (is_bulk_element is False for all others)
            continue
        if vr == "SQ":
            if isinstance(elem, RawDataElement):
                elem = ds[tag]
            yield path, t, vr, elem, ds
            for item in elem.value or ():
                yield from walk(item, path + (t,), depth + 1)
        else:
            yield path, t, vr, elem, ds


# --- cheaper access to single elements ----------------------------------------------------
#: VRs that are their own answer in :func:`vr_of` (explicit, known, not UN)
PLAIN_VRS = frozenset(KNOWN_VRS - {"UN"})
_BULK_CHECK_VRS = frozenset(BINARY_VRS | {"UN"})
#: text VRs whose conversion never changes the VR (no length checks, never ambiguous, never
#: a sequence): :func:`element` converts them without pydicom's item access around it
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST",
                       "TM", "UC", "UI", "UR", "UT"})


def _plain_text(raw) -> "str | None":
    """The VR of a raw element that :func:`element` may convert itself, else None: an
    in-memory, non-private, defined-length text element (not Specific Character Set)."""
    t = int(raw.tag)
    if t >> 16 & 1 or t == 0x00080005 or raw.value is None or raw.length == 0xFFFFFFFF:
        return None
    vr = raw.VR
    if vr is None:  # implicit VR: the dictionary's (what the conversion looks up)
        vr = _DICT_VR.get(t, _MISSING)
        if vr is _MISSING:
            vr = _DICT_VR[t] = _dictionary_vr(t)
    return vr if vr in _TEXT_VRS else None


def _default_conversion() -> bool:
    """pydicom's own raw-element hooks and no data element callback (nothing customised)."""
    return (_hooks.raw_element_vr is _DEFAULT_VR_HOOK and _hooks.raw_element_value is _DEFAULT_VALUE_HOOK
            and not _hooks.raw_element_kwargs and _config.data_element_callback is None)


def element(ds: Dataset, tag: int, raw=None):
    """``ds[tag]`` (the element, converted and stored in ``ds``), the same object state for
    the same input, with a shorter path for the common case: an in-memory, non-private text
    element read from the file. Everything else goes through ``ds[tag]``. ``raw`` is the
    element as stored (saves the look-up when the caller has it). KeyError when absent."""
    d = ds._dict
    if raw is None:
        raw = d[tag]
    if not isinstance(raw, RawDataElement):  # converted already (or created)
        return raw
    vr = _plain_text(raw)
    if vr is None:
        return ds[raw.tag]
    # What Dataset.__getitem__ does for such an element: convert with the dataset's character
    # set (pydicom.dataelem.convert_raw_data_element: the VR stays, the value is
    # convert_value's) and store the result; no deferred read, private creator, pixel,
    # sequence or ambiguous-VR step applies to it.
    encoding = ds.original_character_set or ds._character_set
    if _default_conversion():
        elem = DataElement(raw.tag, vr, _convert_value(vr, raw, encoding), raw.value_tell, False, True)
    else:
        elem = _convert(raw, encoding=encoding, ds=ds)
    d[raw.tag] = elem
    return elem


def replace_value(ds: Dataset, tag: int, value) -> bool:
    """``ds[tag].value = value`` without converting the old value, where that gives the same
    element (a text element :func:`element` would convert itself: the VR is known without
    conversion and setting a value replaces the converted one whole). Returns False, doing
    nothing, for any other element."""
    raw = ds._dict[tag]
    if not isinstance(raw, RawDataElement):
        return False
    vr = _plain_text(raw)
    if vr is None or not _default_conversion():
        return False
    ds._dict[raw.tag] = DataElement(raw.tag, vr, value, raw.value_tell, False)
    return True


#: character sets whose decoding of printable ASCII is that ASCII (pydicom's codec names)
_PLAIN_CHARSETS = frozenset({"iso8859", "latin_1"})


def text_parts(ds: Dataset, raw) -> "list[str] | None":
    """The values pydicom's conversion of ``raw`` would give, as plain strings, without
    converting it (the element stays as read), for PN, LO and SH elements of printable
    ASCII in a dataset with the default or Latin-1 character set: LO/SH as
    ``convert_text`` splits and strips them; PN as ``convert_PN`` splits them (each part is
    the text of the PersonName, up to empty trailing component groups). None for anything
    else: the caller converts."""
    if not isinstance(raw, RawDataElement):
        return None
    vr = _plain_text(raw)
    if vr is None or vr not in _PARTS_VRS:
        return None
    if _config.settings.reading_validation_mode != _config.IGNORE or not _default_conversion():
        return None
    encoding = ds.original_character_set or ds._character_set
    if not isinstance(encoding, str):
        if len(encoding) != 1:
            return None
        encoding = encoding[0]
    if encoding not in _PLAIN_CHARSETS:
        return None
    value = raw.value
    if vr == "PN":
        value = value.rstrip(b"\x00 ")
        if not value.isascii():
            return None
        text = value.decode("ascii")
        if not text.isprintable():
            return None
        return text.split("\\")
    if not value.isascii() or b"\x1b" in value:
        return None
    return [v.rstrip("\0 ") for v in value.decode("ascii").split("\\")]


_PARTS_VRS = frozenset({"PN", "LO", "SH"})


def value_of(ds: Dataset, tag: int, default=None):
    """``ds.get(keyword, default)`` by tag: the converted value, or ``default`` when absent."""
    raw = ds._dict.get(tag)
    if raw is None:
        return default
    return element(ds, tag, raw).value


from pydicom import config as _config  # noqa: E402
from pydicom import hooks as _hooks_module  # noqa: E402
from pydicom.dataelem import DataElement  # noqa: E402
from pydicom.dataelem import convert_raw_data_element as _convert  # noqa: E402
from pydicom.values import convert_value as _convert_value  # noqa: E402

_hooks = _hooks_module.hooks
_DEFAULT_VR_HOOK, _DEFAULT_VALUE_HOOK = _hooks_module.raw_element_vr, _hooks_module.raw_element_value
