"""Serialise a de-identified dataset and name its output (no PHI in paths)."""

from __future__ import annotations

import hashlib
import io

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

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
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        new = FileMetaDataset()
        if meta is not None:
            for elem in meta:
                new.add(elem)
        implicit = getattr(ds, "original_encoding", (None, None))[0]
        new.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        ds.file_meta = meta = new
    if "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    if "FileMetaInformationVersion" not in meta:
        meta.FileMetaInformationVersion = b"\x00\x01"
    buf = io.BytesIO()
    with quiet():
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
