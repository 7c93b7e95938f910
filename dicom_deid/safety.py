"""Configure pydicom so that nothing it warns or logs can carry a value.

pydicom puts offending values into warnings, log records and exception messages
(``Invalid value for VR UI: '...'``).  We (1) stop value validation on read, (2) silence its
logger below ERROR and make its handlers value-free, and (3) turn its warnings off inside
the engine calls.  Exception messages cannot be controlled, which is why dead letters carry
the exception class only (see :mod:`dicom_deid.errors`).
"""

from __future__ import annotations

import contextlib
import logging
import warnings

_configured = False


def configure_pydicom() -> None:
    global _configured
    if _configured:
        return
    import pydicom
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE
    config.settings.writing_validation_mode = config.IGNORE
    config.convert_wrong_length_to_UN = True
    config.replace_un_with_known_vr = True
    try:
        config.disable_debugging()
    except AttributeError:  # pragma: no cover - older pydicom
        pass
    log = logging.getLogger("pydicom")
    log.setLevel(logging.CRITICAL + 1)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
    log.addHandler(logging.NullHandler())
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
    warnings.filterwarnings("ignore", module=r"highdicom(\..*)?")
    _configured = True
    del pydicom


@contextlib.contextmanager
def quiet():
    """No warnings escape while engine code touches object values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
