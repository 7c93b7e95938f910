"""The element that flows through the content stages, and the outcomes they end in.

``ReadDicom`` turns a file reference into one :class:`DicomObject`.  Every content stage
(tags, pixels, attachments, verification, staging write) is a ParDo fused after the
fan-out, so a ``DicomObject`` is only ever handed from one DoFn to the next in memory.  It
holds the original identifiers (the dataset before cleaning and the :class:`PhiContext`),
so it refuses to be pickled: if a runner ever tried to move it across a shuffle or into a
side input, the job fails loudly instead of leaking.

Every input ends in exactly one :class:`Outcome`: ``ok``, ``duplicate``, ``quarantined``,
``failed``, ``skipped``, ``removed`` or ``excluded``. The outcome carries the public manifest
row and, separately, the private record (input path, original UIDs) for the linkage table.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

# Manifest statuses (schema v1).
OK = "ok"
DUPLICATE = "duplicate"
QUARANTINED = "quarantined"
FAILED = "failed"
SKIPPED = "skipped"
REMOVED = "removed"
EXCLUDED = "excluded"
STATUSES = (OK, QUARANTINED, FAILED, SKIPPED, DUPLICATE, REMOVED, EXCLUDED)


@dataclasses.dataclass(frozen=True)
class InputRef:
    """Where an input came from (private ``uri``) and its keyed, public ``input_key``."""

    uri: str
    input_key: str
    size: int = 0


class PhiContext:
    """The object's original identifying values, for the stages that run after the tags
    are clean (pixels, documents, verification). Memory only: it cannot be pickled, is
    never logged (its repr shows counts only) and is never written anywhere.
    """

    __slots__ = ("names", "ids", "dates", "texts", "orgs")

    def __init__(self, names=(), ids=(), dates=(), texts=(), orgs=()):
        #: each name as a tuple of its components (family, given, middle, prefix, suffix)
        self.names: tuple[tuple[str, ...], ...] = tuple(names)
        #: identifiers: patient IDs, other IDs, NHS numbers, accession numbers
        self.ids: tuple[str, ...] = tuple(ids)
        #: dates of birth and other identifying dates (YYYYMMDD)
        self.dates: tuple[str, ...] = tuple(dates)
        #: other identifying strings: addresses, phones, institutions, stations
        self.texts: tuple[str, ...] = tuple(texts)
        #: institution, department and station names (for pixel/document stages; not
        #: matched by header verification, where they collide with device names)
        self.orgs: tuple[str, ...] = tuple(orgs)

    def __reduce__(self):
        raise TypeError("PhiContext must never be serialized")

    def __repr__(self) -> str:
        return (f"PhiContext(names={len(self.names)}, ids={len(self.ids)}, "
                f"dates={len(self.dates)}, texts={len(self.texts)}, orgs={len(self.orgs)})")

    def is_empty(self) -> bool:
        return not (self.names or self.ids or self.dates or self.texts or self.orgs)


class DicomObject:
    """One input object in flight. Mutable; stages fill ``facts`` for the manifest row."""

    __slots__ = ("ref", "dataset", "phi", "sha256", "fingerprint", "temp_path", "facts",
                 "private", "output_bytes", "output_file", "patient_key")

    def __init__(self, ref: InputRef, dataset, phi: PhiContext, sha256: str, fingerprint: str,
                 temp_path: Optional[str] = None):
        self.ref = ref
        self.dataset = dataset
        self.phi = phi
        self.sha256 = sha256
        self.fingerprint = fingerprint
        self.temp_path = temp_path
        #: public facts -> manifest columns (see manifest.SCHEMA)
        self.facts: dict[str, Any] = {}
        #: private facts -> linkage table (original UIDs, patient key)
        self.private: dict[str, Any] = {}
        self.output_bytes: Optional[bytes] = None
        #: large objects: the serialised output on local disk instead of ``output_bytes``
        #: (a :class:`~dicom_deid.writer.OutputFile`; its file is removed by release())
        self.output_file = None
        #: HMAC of the patient key (hex); what side inputs are looked up by
        self.patient_key: Optional[str] = None

    def __reduce__(self):
        raise TypeError("DicomObject holds original identifiers and must never be serialized")

    def __repr__(self) -> str:
        return f"DicomObject(input_key={self.ref.input_key})"

    def release(self) -> None:
        """Drop the dataset and delete any temp files (deferred values live in the input's;
        a large object's serialised output in the other)."""
        self.dataset = None
        self.output_bytes = None
        if self.output_file is not None:
            self.output_file.remove()
            self.output_file = None
        if self.temp_path:
            try:
                os.unlink(self.temp_path)
            except FileNotFoundError:
                pass
            self.temp_path = None


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How one input ended. ``row`` is public (manifest); ``private`` is not.

    Both are plain dicts of plain values so outcomes can cross shuffles: ``row`` carries
    no original identifier; ``private`` goes only to the private prefix.
    """

    row: dict
    private: dict

    @property
    def status(self) -> str:
        return self.row["status"]

    def __reduce__(self):
        # encoded (pickled) when it crosses a stage boundary: the row goes as its values in
        # column order, compressed (``manifest.pack_row``), a third of a pickled dict
        from . import manifest
        packed = manifest.pack_row(self.row)
        if packed is None:
            return (Outcome, (self.row, self.private))
        return (_outcome_from_packed, (packed, self.private))


def _outcome_from_packed(packed: bytes, private: dict) -> Outcome:
    from . import manifest
    return Outcome(manifest.unpack_row(packed), private)
