"""Allocator settings for local runs: the launcher and its SDK worker processes.

Why: the local runner hands each stage its whole input as one bundle, so the buffers that
carry collections across stages (file references, staged records, grouped values, gRPC
messages) grow with the run. They are freed after the stage, but glibc keeps freed pages in
its heaps (one heap per arena, up to eight arenas per core, and Beam's and gRPC's threads
each take one), so peak memory rose with the file count although the live Python objects
did not (measured with tracemalloc, pymalloc and glibc statistics; benchmarks/RESULTS.md).

What: at most :data:`ARENAS` arenas per process, pyarrow on the system allocator (so its
freed pages are returned the same way), and one background thread per process that calls
``malloc_trim`` every :data:`TRIM_INTERVAL_S` seconds. Only for the local runner
(``pipelines.deidentify.make_runner``); the workers learn it from the environment they
inherit (:data:`TRIM_ENV`). Nothing happens where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from typing import Optional

ARENAS = 2
TRIM_INTERVAL_S = 0.5
#: set by the launcher of a local run; its worker processes start trimming when they see it
TRIM_ENV = "DICOM_DEID_MALLOC_TRIM_S"
_M_ARENA_MAX = -8  # mallopt parameter (malloc.h)

_lock = threading.Lock()
_trimmer: Optional[threading.Thread] = None


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - both must exist
        return libc
    except (OSError, AttributeError):
        return None


def configure_local_run() -> None:
    """In the launcher of a local run, before its workers start: limit this process's arenas,
    and have every process it starts from now on do the same and trim (explicit settings in
    the environment win)."""
    arenas = os.environ.setdefault("MALLOC_ARENA_MAX", str(ARENAS))
    # read by pyarrow when it first allocates: reaches the workers through the environment
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    os.environ.setdefault(TRIM_ENV, str(TRIM_INTERVAL_S))
    libc = _glibc()
    if libc is not None:
        try:
            libc.mallopt(_M_ARENA_MAX, int(arenas))
        except ValueError:
            pass
    start_trimming()


def start_trimming() -> bool:
    """Once per process, when :data:`TRIM_ENV` asks for it: a daemon thread giving freed heap
    pages back every that many seconds. Returns whether a trimming thread runs."""
    global _trimmer
    try:
        interval = float(os.environ.get(TRIM_ENV) or 0)
    except ValueError:
        interval = 0.0
    libc = _glibc()
    if libc is None or interval <= 0:
        return False
    with _lock:
        if _trimmer is None or not _trimmer.is_alive():
            def loop():
                while True:
                    time.sleep(interval)
                    libc.malloc_trim(0)

            _trimmer = threading.Thread(target=loop, name="dicom-deid-malloc-trim", daemon=True)
            _trimmer.start()
    return True
