"""Parse one input's bytes into a :class:`~dicom_deid.element.DicomObject`.

The transform layer fetches the bytes (transient storage errors are its business); this
module only ever sees bytes in hand or a local temp file, so everything it raises is a
permanent error for that input.
"""

from __future__ import annotations

import hashlib
import io
import struct
from typing import Optional

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError

from . import phi
from .dsutil import BULK_TAGS, value_of
from .element import DicomObject, InputRef
from .errors import CorruptElement, EmptyInput, NotDicom, TruncatedInput, UnsupportedObject
from .keys import Deriver
from .safety import configure_pydicom, quiet

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: values larger than this stay in the file (read on demand) instead of memory
DEFER_SIZE = 256 * 1024


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _looks_like_raw_dataset(head: bytes) -> bool:
    """A file without preamble must start with a group 0002 or 0008 element."""
    if len(head) < 8:
        return False
    for fmt in ("<HH", ">HH"):
        group, _elem = struct.unpack(fmt, head[:4])
        if group in (0x0002, 0x0008):
            return True
    return False


def parse(ref: InputRef, deriver: Deriver, data: Optional[bytes] = None,
          path: Optional[str] = None, sha256: Optional[str] = None,
          temp_path: Optional[str] = None) -> DicomObject:
    """Parse from ``data`` (small objects) or a local ``path`` (large ones, deferred)."""
    configure_pydicom()
    if data is not None:
        size = len(data)
        head = data[:132]
        sha = sha256 or hashlib.sha256(data).hexdigest()
    else:
        import os
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(132)
        sha = sha256 or sha256_file(path)
    if size == 0:
        raise EmptyInput()
    has_preamble = len(head) >= 132 and head[128:132] == b"DICM"
    if not has_preamble and not _looks_like_raw_dataset(head):
        raise NotDicom()
    src = io.BytesIO(data) if data is not None else path
    with quiet():
        try:
            ds = pydicom.dcmread(src, force=not has_preamble,
                                 defer_size=None if data is not None else DEFER_SIZE)
        except InvalidDicomError:
            raise NotDicom() from None
        except EOFError:
            raise TruncatedInput() from None
        if len(ds) == 0:
            raise NotDicom()
        _check_lengths(ds, size)
        # One walk over the header: sequences are parsed (corrupt structure fails here, in
        # the read stage, not halfway through the tag transform) and identifying values
        # collected. Other values stay raw bytes until a stage needs them (dsutil.walk).
        try:
            context = phi.extract(ds)
        except NotImplementedError:
            raise UnsupportedObject() from None
        sop_class = str(value_of(ds, 0x00080016, "") or "")  # SOPClassUID
        meta = getattr(ds, "file_meta", None)
        if not sop_class and meta is not None:
            sop_class = str(value_of(meta, 0x00020002, "") or "")  # MediaStorageSOPClassUID
    obj = DicomObject(ref, ds, context, sha, deriver.content_fingerprint(sha), temp_path=temp_path)
    ts = str(value_of(meta, 0x00020010, "") or "") if meta is not None else ""  # TransferSyntaxUID
    obj.facts.update(
        sop_class_uid=sop_class or None,
        modality=str(value_of(ds, 0x00080060, "") or "") or None,  # Modality
        transfer_syntax_in=ts or None,
        input_size=size,
    )
    if sop_class == DICOMDIR_SOP_CLASS or 0x00041220 in ds._dict:  # DirectoryRecordSequence
        obj.facts["reason"] = "dicomdir"
    return obj


def _check_lengths(ds, size: int) -> None:
    """pydicom reads short values without complaint; a value shorter than its declared
    length means the data ended early: truncated (bulk data at the end) or corrupt."""
    for tag, raw in ds._dict.items():  # elements as read: nothing converted or loaded
        if not isinstance(raw, RawDataElement):
            continue
        length = raw.length
        if length is None or length == 0xFFFFFFFF:
            continue
        value = raw.value
        if isinstance(value, (bytes, bytearray)):
            if len(value) >= length:
                continue
        elif raw.value_tell is None or raw.value_tell + length <= size:  # deferred: the file size
            continue
        if int(tag) in BULK_TAGS:
            raise TruncatedInput()
        raise CorruptElement()
