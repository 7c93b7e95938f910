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
from pydicom.errors import InvalidDicomError

from . import phi
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
        sop_class = str(ds.get("SOPClassUID", "") or "")
        meta = getattr(ds, "file_meta", None)
        if not sop_class and meta is not None:
            sop_class = str(meta.get("MediaStorageSOPClassUID", "") or "")
    obj = DicomObject(ref, ds, context, sha, deriver.content_fingerprint(sha), temp_path=temp_path)
    ts = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
    obj.facts.update(
        sop_class_uid=sop_class or None,
        modality=str(ds.get("Modality", "") or "") or None,
        transfer_syntax_in=ts or None,
        input_size=size,
    )
    if sop_class == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        obj.facts["reason"] = "dicomdir"
    return obj


def _check_lengths(ds, size: int) -> None:
    """pydicom reads short values without complaint; a value shorter than its declared
    length means the data ended early: truncated (bulk data at the end) or corrupt."""
    from pydicom.dataelem import RawDataElement

    from .dsutil import BULK_TAGS
    for tag, raw in ds.items():  # elements as read: nothing converted or loaded
        if not isinstance(raw, RawDataElement) or raw.length in (None, 0xFFFFFFFF):
            continue
        if isinstance(raw.value, (bytes, bytearray)):
            short = len(raw.value) < raw.length
        else:  # deferred: compare with the file size
            short = raw.value_tell is not None and raw.value_tell + raw.length > size
        if short:
            if int(tag) in BULK_TAGS:
                raise TruncatedInput()
            raise CorruptElement()
