"""Thin Beam PTransforms over the engine: adapt, count, route errors.

Every content stage has a ``main`` output (the :class:`~dicom_deid.element.DicomObject`
going on) and ``outcome`` output (:class:`~dicom_deid.element.Outcome` rows: quarantined,
failed, skipped), plus ``dead_letter`` (private :class:`~dicom_deid.errors.DeadLetter`).
"""

from .common import DEAD_LETTER, MAIN, OUTCOME  # noqa: F401
