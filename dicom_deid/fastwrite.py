"""A faster serialiser for the common case, byte for byte what pydicom writes.

``pydicom.dcmwrite(..., enforce_file_format=True)`` spends most of its time per element:
a buffer object per element, endianness lookups, a deep copy of the file meta. Most
elements of a de-identified object were never touched (pydicom still holds them as the
raw bytes it read) and are written back unchanged. :func:`serialize` writes those
directly and hands every other element to pydicom's own value writers, so the output is
the same bytes; ``tests/unit/test_fastwrite.py`` checks that on every test and corpus file.

It covers little-endian transfer syntaxes (not deflated) whose dataset is written in the
encoding and character set it was read in, i.e. where pydicom would write raw elements
as they are. Anything else (and any exception on the way) returns None: the caller then
writes with pydicom, which also raises what it raises for invalid datasets.
"""

from __future__ import annotations

import struct

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_OBvalue, write_OWvalue, writers
from pydicom.uid import DeflatedExplicitVRLittleEndian, UID
from pydicom.valuerep import CUSTOMIZABLE_CHARSET_VR, EXPLICIT_VR_LENGTH_32

from .safety import quiet

_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
_LONG_VRS = frozenset(str(v) for v in EXPLICIT_VR_LENGTH_32)
_CHARSET_VRS = frozenset(str(v) for v in CUSTOMIZABLE_CHARSET_VR)
_SEQ_DELIMITER = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
_ITEM = b"\xfe\xff\x00\xe0"
#: values at least this long are written as pieces of their own (see _write_elements)
_PIECE = 64 * 1024
_BINARY_WRITERS = (write_OBvalue, write_OWvalue)
_pack_tag = struct.Struct("<HH").pack
_pack_ul = struct.Struct("<L").pack
_pack_us = struct.Struct("<H").pack
#: the file meta elements pydicom requires non-empty (dataset.validate_file_meta)
_META_TYPE1 = (0x00020002, 0x00020003, 0x00020010)


class _Unsupported(Exception):
    """Internal: a case this writer leaves to pydicom."""


def serialize(ds: Dataset) -> "bytes | None":
    """The file pydicom would write for ``ds`` (preamble, file meta, dataset), or None
    when this writer does not cover the case. ``ds.file_meta`` must be prepared
    (``writer._prepare_meta``)."""
    try:
        with quiet():
            return _serialize(ds)
    except Exception:  # noqa: BLE001 - pydicom writes it (and raises what it raises)
        return None


def _serialize(ds: Dataset) -> bytes:
    meta = getattr(ds, "file_meta", None)
    preamble = getattr(ds, "preamble", None)
    if meta is None or (preamble and len(preamble) != 128):
        raise _Unsupported()
    for tag in ds._dict:
        if tag >> 16 <= 2:  # command or file meta elements in the dataset: pydicom refuses
            raise _Unsupported()
    ts = meta.get("TransferSyntaxUID")
    if not ts:
        raise _Unsupported()
    ts = UID(ts)
    if ts.is_private or not ts.is_transfer_syntax or not ts.is_little_endian \
            or ts == DeflatedExplicitVRLittleEndian:
        raise _Unsupported()
    implicit = ts.is_implicit_VR
    if ds.original_encoding != (implicit, True) or ds.original_character_set != ds._character_set:
        raise _Unsupported()  # pydicom re-encodes every element: its way
    head = _file_meta(meta)
    if "PixelData" in ds:  # as dcmwrite does (it also converts the element)
        ds["PixelData"].is_undefined_length = ts.is_compressed
    chunks = [preamble or b"\x00" * 128, b"DICM", head]
    chunks += _write_elements(ds, ds.get("SpecificCharacterSet", default_encoding), implicit)
    return b"".join(chunks)


def _file_meta(meta) -> bytes:
    """Group 2 as pydicom's ``write_file_meta_info`` writes it (explicit VR little endian,
    group length first), without changing ``meta``."""
    if meta.original_encoding not in ((False, True), (None, None)) \
            or meta.original_character_set != meta._character_set:
        raise _Unsupported()
    if meta.original_encoding == (None, None) and any(
            isinstance(e, RawDataElement) for e in meta._dict.values()):
        raise _Unsupported()  # pydicom would convert them first
    for tag in meta._dict:
        if tag >> 16 != 2:
            raise _Unsupported()
    for tag in (*_META_TYPE1, 0x00020001, 0x00020012):
        if tag not in meta or meta[tag].is_empty:
            raise _Unsupported()  # pydicom adds or refuses: its way
    if 0x00020013 not in meta:
        raise _Unsupported()
    group_length = meta._dict.get(0x00020000)
    if group_length is not None and (isinstance(group_length, RawDataElement)
                                     and group_length.length != 4 or group_length.VR != "UL"):
        raise _Unsupported()
    data = b"".join(_write_elements(meta, meta.get("SpecificCharacterSet", default_encoding), False,
                                    skip=0x00020000))
    return b"\x02\x00\x00\x00UL\x04\x00" + _pack_ul(len(data)) + data


def _buffer(implicit: bool) -> DicomBytesIO:
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, True
    return fp


def _cut(chunks: list, fp: DicomBytesIO, head: bytes, value: bytes, implicit: bool) -> DicomBytesIO:
    """End the current buffer, add ``head`` and the large ``value`` as pieces of their own;
    returns the buffer to go on with."""
    chunks += (fp.getvalue(), head, value)
    return _buffer(implicit)


def _write_elements(ds: Dataset, charset, implicit: bool, skip: int = -1) -> list:
    """``pydicom.filewriter.write_dataset``'s loop for a dataset written in the encoding
    it was read in: raw elements as read, others by pydicom's value writers. Returns the
    pieces in order: large binary values (pixel data) are pieces of their own, never copied
    into a growing buffer."""
    chunks = []
    encodings = None
    store = ds._dict
    fp = _buffer(implicit)
    write = fp.write
    for tag in sorted(store):
        if (tag & 0xFFFF == 0 and tag >> 16 > 6) or tag == skip:
            continue  # retired group lengths are not written
        elem = store[tag]
        if isinstance(elem, RawDataElement):
            if elem.value is None:
                elem = ds[tag]  # a deferred value: get_item reads and converts it
            else:
                value = elem.value
                undefined = elem.length == _UNDEFINED
                vr = elem.VR
                if not implicit and (not vr or len(vr) != 2):
                    raise _Unsupported()
                head = _header(tag, vr, len(value), undefined, implicit)
                if len(value) >= _PIECE:
                    fp = _cut(chunks, fp, head, value, implicit)
                    write = fp.write
                else:
                    write(head)
                    write(value)
                if undefined:
                    write(_SEQ_DELIMITER)
                continue
        vr = elem.VR
        if vr == "SQ" or elem.is_buffered or vr not in writers:
            write_data_element(fp, elem, charset)  # pydicom's own way, in place
            continue
        if not implicit and len(vr) != 2:
            raise _Unsupported()  # ambiguous VR: pydicom raises
        undefined = elem.is_undefined_length
        if undefined and (tag != _PIXEL_DATA or elem.value[:4] != _ITEM):
            raise _Unsupported()  # pydicom raises, or writes a short VR's length oddly
        fn, param = writers[vr]
        value = elem.value
        if fn in _BINARY_WRITERS and type(value) is bytes and len(value) >= _PIECE:
            # what write_OBvalue / write_OWvalue write: the bytes, padded to even length
            pad = b"\x00" if len(value) % 2 else b""
            fp = _cut(chunks, fp, _header(tag, vr, len(value) + len(pad), undefined, implicit), value,
                      implicit)
            write = fp.write
            write(pad)
            if undefined:
                write(_SEQ_DELIMITER)
            continue
        # the value goes straight after a placeholder header, which is then filled in
        start = fp.tell()
        long_vr = vr in _LONG_VRS
        size = 8 if implicit or not long_vr else 12
        write(b"\x00" * size)
        if not elem.is_empty:
            if vr in _CHARSET_VRS:
                if encodings is None:
                    encodings = convert_encodings(charset or [default_encoding])
                fn(fp, elem, encodings=encodings)
            elif param is not None:
                fn(fp, elem, param)
            else:
                fn(fp, elem)
        end = fp.tell()
        fp.seek(start)
        write(_header(tag, vr, end - start - size, undefined, implicit))
        fp.seek(end)
        if undefined:
            write(_SEQ_DELIMITER)
    chunks.append(fp.getvalue())
    return chunks


def _header(tag: int, vr, length: int, undefined: bool, implicit: bool) -> bytes:
    t = _pack_tag(tag >> 16, tag & 0xFFFF)
    if implicit:
        return t + _pack_ul(_UNDEFINED if undefined else length)
    if vr in _LONG_VRS:
        return t + vr.encode("ascii") + b"\x00\x00" + _pack_ul(_UNDEFINED if undefined else length)
    if undefined or length > 0xFFFF:
        raise _Unsupported()  # pydicom switches the VR to UN (with a warning)
    return t + vr.encode("ascii") + _pack_us(length)
