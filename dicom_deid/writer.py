"""Serialise a de-identified dataset and name its output (no PHI in paths)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import struct
import tempfile

from pydicom import uid as pydicom_uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

from . import fastwrite
from .errors import DeidError
from .safety import quiet

IMPLEMENTATION_VERSION = "DICOMDEID01"


class MissingUid(DeidError):
    description = "object lacks a Study, Series or SOP Instance UID; it cannot be named"


def relative_path(pseudo_patient: str, study_uid: str, series_uid: str, sop_uid: str) -> str:
    """``{pseudo_patient}/{study_uid}/{series_uid}/{sop_uid}.dcm``: pseudonym and new UIDs only."""
    for v in (pseudo_patient, study_uid, series_uid, sop_uid):
        if not v or "/" in v or ".." == v:
            raise MissingUid()
    return f"{pseudo_patient}/{study_uid}/{series_uid}/{sop_uid}.dcm"


def serialize(ds: Dataset) -> bytes:
    """Write the dataset as a DICOM file (preamble, file meta) in its transfer syntax."""
    _prepare_meta(ds)
    data = fastwrite.serialize(ds)  # the same bytes, faster; None where it leaves it to pydicom
    if data is not None:
        return data
    return _pydicom_serialize(ds)


def _pydicom_serialize(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    with quiet():
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _prepare_meta(ds: Dataset) -> None:
    """File meta as written: transfer syntax, media storage UIDs, our implementation."""
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        new = FileMetaDataset()
        if meta is not None:
            for elem in meta:
                new.add(elem)
        implicit = getattr(ds, "original_encoding", (None, None))[0]
        new.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        ds.file_meta = meta = new
    # set only what differs: each assignment builds and validates a new element (the tag
    # stage has already set the media storage UIDs), and an equal value writes the same bytes
    if "SOPClassUID" in ds:
        _set_meta(meta, "MediaStorageSOPClassUID", ds.SOPClassUID)
    if "SOPInstanceUID" in ds:
        _set_meta(meta, "MediaStorageSOPInstanceUID", ds.SOPInstanceUID)
    _set_meta(meta, "ImplementationClassUID", PYDICOM_IMPLEMENTATION_UID)
    _set_meta(meta, "ImplementationVersionName", IMPLEMENTATION_VERSION)
    if "FileMetaInformationVersion" not in meta:
        meta.FileMetaInformationVersion = b"\x00\x01"


def _set_meta(meta: FileMetaDataset, keyword: str, value) -> None:
    if meta.get(keyword) != value:
        setattr(meta, keyword, value)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- large objects: serialise to a local file, deferred values copied in chunks ------------
#: deferred values are copied from the input's temp file in chunks of this size
COPY_CHUNK = 8 * 1024 * 1024
#: VRs whose value pydicom writes byte for byte (also after converting the element), so a
#: deferred value can be copied from the input file instead of loaded
_COPYABLE_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN", "OB or OW", "US or OW"})
_EXPLICIT_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN",
                                b"UR", b"UT", b"SV", b"UV"})
_UNDEFINED = 0xFFFFFFFF


class SourceChanged(DeidError):
    description = "a deferred value could not be read back from the local temp file"


@dataclasses.dataclass
class OutputFile:
    """A serialised object on local disk (large objects): the caller owns ``path``."""

    path: str
    size: int
    sha256: str
    #: tag -> length of each value copied from the input file instead of held in memory
    copied: dict = dataclasses.field(default_factory=dict)

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def has_deferred(ds: Dataset) -> bool:
    """Whether any top-level value was left in the input file (large inputs)."""
    return bool(_deferred(ds))


def _deferred(ds: Dataset) -> list:
    from pydicom.dataelem import RawDataElement
    # the elements as stored (what get_item(keep_deferred=True) returns), without its per-tag work
    return [e for e in ds._dict.values()
            if isinstance(e, RawDataElement) and e.value is None and e.length]


def serialize_to_file(ds: Dataset, tmp_dir: str) -> OutputFile:
    """:func:`serialize` into a local temp file (in ``tmp_dir``), byte for byte the same
    output, without holding large values in memory: deferred binary values (pixel data,
    large blobs) are copied from the input's temp file in chunks of :data:`COPY_CHUNK`, and
    sha256 and size are computed while writing. Everything else is written by pydicom as
    usual (to memory: it is the header). The temp file is removed if anything fails."""
    _prepare_meta(ds)
    fd, path = tempfile.mkstemp(prefix="dicom-deid-out-", suffix=".dcm", dir=tmp_dir)
    ok = False
    try:
        with os.fdopen(fd, "wb") as f:
            h = hashlib.sha256()
            size = 0

            def write(b) -> None:
                nonlocal size
                f.write(b)
                h.update(b)
                size += len(b)

            copied = _write_spliced(ds, write)
            if copied is None:  # nothing to copy (or not safely): the in-memory way
                write(serialize(ds))
                copied = {}
        ok = True
        return OutputFile(path, size, h.hexdigest(), copied)
    finally:
        if not ok:
            try:
                os.unlink(path)
            except OSError:
                pass


def _write_spliced(ds: Dataset, write) -> "dict | None":
    """Write ``ds`` with its copyable deferred values replaced by empty placeholders
    (small: in memory), then write that shell to ``write`` with each placeholder's length
    restored and its value copied from the input file. None when there is nothing to copy
    or a placeholder is not where it must be (the caller then writes the usual way)."""
    src_path = getattr(ds, "filename", None)
    if not isinstance(src_path, str) or not os.path.isfile(src_path):
        return None
    little = _little_endian(ds)
    if little is None:
        return None
    end = "<" if little else ">"
    item = struct.pack(end + "HHL", 0xFFFE, 0xE000, 0)
    delim = struct.pack(end + "HHL", 0xFFFE, 0xE0DD, 0)
    plan = []  # (deferred element, value length, undefined length)
    with open(src_path, "rb") as src:
        for raw in _deferred(ds):
            vr = raw.VR
            if vr is None:
                vr = _dictionary_vr(int(raw.tag))
            if vr not in _COPYABLE_VRS:
                continue  # e.g. a very long text: pydicom loads and writes it
            if raw.length == _UNDEFINED:
                n = _encapsulated_length(src, raw.value_tell, end)
                if n is None:
                    continue
                plan.append((raw, n, True))
            else:
                plan.append((raw, raw.length, False))
        if not plan:
            return None
        # placed in the element store directly, as read: ``ds[tag] = ...`` would convert a
        # private element (and restoring the deferred original that way would empty it)
        store = ds._dict
        originals = {}
        try:
            for raw, _n, undefined in plan:
                originals[raw.tag] = store[raw.tag]
                store[raw.tag] = raw._replace(length=_UNDEFINED if undefined else 0,
                                              value=item if undefined else b"")
            shell = serialize(ds)
        finally:
            store.update(originals)
        positions = _placeholder_positions(shell, [raw.tag for raw, _n, _u in plan])
        if positions is None:
            return None
        plan.sort(key=lambda p: positions[p[0].tag])
        pieces = []  # checked first, written after: a failed check writes nothing
        at = 0
        for raw, n, undefined in plan:
            vt = positions[raw.tag]
            tag_bytes = struct.pack(end + "HH", raw.tag.group, raw.tag.elem)
            if undefined:
                if shell[vt - 4:vt] != b"\xff\xff\xff\xff" or shell[vt:vt + 16] != item + delim:
                    return None
                pieces.append((shell[at:vt], raw.value_tell, n, None))
                at = vt + len(item)
            else:
                if shell[vt - 4:vt] != b"\x00\x00\x00\x00":
                    return None
                head = shell[vt - 12:vt - 4]
                if not (head[:4] == tag_bytes and head[4:6] in _EXPLICIT_LONG_VRS  # explicit VR
                        or shell[vt - 8:vt - 4] == tag_bytes):  # implicit VR
                    return None
                pieces.append((shell[at:vt - 4], raw.value_tell, n, struct.pack(end + "L", n)))
                at = vt
        for before, offset, n, length_field in pieces:
            write(before)
            if length_field is not None:
                write(length_field)
            _copy(src, offset, n, write)
        write(shell[at:])
    return {int(raw.tag): n for raw, n, _u in plan}


def _copy(src, offset: int, n: int, write) -> None:
    buf = bytearray(min(COPY_CHUNK, n))
    view = memoryview(buf)
    src.seek(offset)
    while n:
        k = src.readinto(view[:min(len(buf), n)])
        if not k:
            raise SourceChanged()
        write(view[:k])
        n -= k


def _encapsulated_length(src, offset: int, end: str) -> "int | None":
    """Length of an undefined-length value read as pydicom reads it (items up to the
    sequence delimiter, the delimiter excluded); None where pydicom would fall back to a
    byte scan (then the value is not copied but loaded)."""
    pos = offset
    while True:
        src.seek(pos)
        head = src.read(8)
        if len(head) < 8:
            return None
        group, elem, length = struct.unpack(end + "HHL", head)
        if (group, elem) == (0xFFFE, 0xE0DD):
            return pos - offset
        if (group, elem) != (0xFFFE, 0xE000):
            return None
        pos += 8 + length


def _placeholder_positions(shell: bytes, tags) -> "dict | None":
    """Where each placeholder's value starts in the written shell (top level)."""
    import pydicom
    with quiet():
        try:
            again = pydicom.dcmread(io.BytesIO(shell), defer_size=None)
        except Exception:  # noqa: BLE001 - cannot find them: the caller writes the usual way
            return None
    out = {}
    for tag in tags:
        elem = again.get_item(tag, keep_deferred=True) if tag in again else None
        vt = getattr(elem, "value_tell", None)
        if not isinstance(vt, int) or vt < 12:
            return None
        out[tag] = vt
    return out


def _little_endian(ds: Dataset) -> "bool | None":
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is None:
        return None
    try:
        return bool(pydicom_uid.UID(str(ts)).is_little_endian)
    except Exception:  # noqa: BLE001 - an unknown transfer syntax: write the usual way
        return None


def _dictionary_vr(tag: int) -> "str | None":
    if tag >> 16 & 1:
        return "UN"  # private, implicit VR: written as read
    from pydicom.datadict import dictionary_VR
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None
