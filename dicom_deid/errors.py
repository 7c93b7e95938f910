"""The error model.

Two kinds of failure exist and nothing else:

* **Transient storage errors** (:class:`StorageError` and the I/O errors of the storage
  clients) propagate out of a DoFn so the runner retries the bundle.
* **Permanent errors** are anything raised while working on bytes already in hand: pydicom's
  ``ValueError``/``InvalidDicomError``, ``struct.error``, ``UnicodeDecodeError``, a codec
  crash, a missing attribute.  They become a :class:`DeadLetter` that carries the input's
  keyed reference, the stage, the exception *class* and a fixed description, never the
  exception's message: pydicom embeds offending values (often names or IDs) in it.

Engine code raises :class:`DeidError` subclasses with fixed, value-free messages when it
rejects an object for a reason it understands (``NotDicom``, ``UnsupportedObject``...).
"""

from __future__ import annotations

import dataclasses
from typing import Optional


class DeidError(Exception):
    """Base of the project's own permanent errors. Messages are fixed text, never values."""

    description = "de-identification failed"

    def __init__(self, description: Optional[str] = None):
        super().__init__(description or self.description)


class NotDicom(DeidError):
    description = "input is not a DICOM object (no preamble/DICM and no parsable header)"


class EmptyInput(DeidError):
    description = "input is empty (zero bytes)"


class TruncatedInput(DeidError):
    description = "input ends before its declared content"


class CorruptElement(DeidError):
    description = "an element's declared length runs past the end of the data"


class UnsupportedObject(DeidError):
    description = "object kind is not supported by this pipeline"


class InputTooLarge(DeidError):
    description = "input exceeds the configured maximum size"


class VerificationFailed(DeidError):
    description = "residual identifying content found after de-identification"


class StorageError(IOError):
    """A transient storage failure: propagates so the runner retries."""


class ConfigError(ValueError):
    """Bad configuration detected before the pipeline starts (policy, key, options)."""


# Fixed descriptions for exception classes we know; anything else gets the generic text.
_KNOWN = {
    "InvalidDicomError": "input is not a DICOM object",
    "EOFError": "input ends before its declared content",
    "error": "malformed binary structure (struct error)",
    "UnicodeDecodeError": "text value not decodable in its character set",
    "UnicodeEncodeError": "text value not encodable in its character set",
    "ValueError": "invalid value in the object",
    "KeyError": "required attribute missing",
    "AttributeError": "required attribute missing",
    "TypeError": "unexpected value type in the object",
    "NotImplementedError": "unsupported encoding or feature",
    "OverflowError": "numeric value out of range",
    "MemoryError": "object too large for worker memory",
    "IndexError": "malformed value multiplicity",
    "OSError": "malformed or unreadable object content",
}


def describe(exc: BaseException) -> str:
    """A fixed, value-free description for an exception."""
    if isinstance(exc, DeidError):
        return type(exc).description
    return _KNOWN.get(type(exc).__name__, "unexpected error while processing the object")


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """A permanent failure of one input at one stage. Private output; still value-free.

    ``input_uri`` is the input reference (private: paths may contain names); it is written
    only to the private dead-letter file and never to the public manifest.
    """

    input_key: str
    input_uri: str
    stage: str
    error_class: str
    description: str

    @classmethod
    def of(cls, ref, stage: str, exc: BaseException) -> "DeadLetter":
        return cls(
            input_key=ref.input_key,
            input_uri=ref.uri,
            stage=stage,
            error_class=_qualified(exc),
            description=describe(exc),
        )

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _qualified(exc: BaseException) -> str:
    t = type(exc)
    mod = t.__module__
    if mod in ("builtins", "__main__"):
        return t.__name__
    if mod == "struct":
        return "struct.error"
    return f"{mod}.{t.__qualname__}"
