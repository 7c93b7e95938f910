"""Entry point of the local runner's SDK worker processes: Beam's harness, then a prompt exit.

Beam's FnApiRunner in multi-processing mode starts each worker as ``python -m
apache_beam.runners.worker.sdk_worker_main``. When the job ends it stops the workers one
after the other: it tells a worker to stop, waits for that *process* to exit, and only then
tells the next one. A Python process that has imported Beam spends about 0.6 s of CPU in
interpreter finalisation (garbage collection over the module graph) on its way out, so the
end of a local run waited 0.6 s per worker for nothing (benchmarks/RESULTS.md, Session 8).

This module runs the same harness, ``sdk_worker_main.main``. When it returns normally the
harness has stopped: every bundle has been answered, every DoFn torn down, its log handler
closed. It then runs the ``atexit`` handlers (what Beam, gRPC, the standard library and we
registered), flushes stdio and leaves with ``os._exit(0)``: only the finalisation is skipped.
What ``os._exit`` does skip besides: joining non-daemon threads (the worker has none; every
thread Beam starts there is a daemon, and our DoFns start none that outlive their bundle)
and flushing C-level stdio buffers. A DoFn that ever starts background work must finish it
in ``teardown``, which the harness runs before it returns. A harness that raises is not touched: the exception propagates and the interpreter exits the
usual way, with a traceback and a non-zero status, which the runner reports.

The local runner (:class:`dicom_deid.pipelines.local_runner.LocalRunner`) starts workers
with this module; any other runner starts its own workers and never imports it.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> None:
    from . import beamlogs
    beamlogs.configure_worker()  # before Beam's import logs anything (see beamlogs)
    from apache_beam.runners.worker import sdk_worker_main
    sdk_worker_main.main(list(sys.argv if argv is None else argv))
    leave()


def leave() -> None:
    """Exit at once after a clean harness run, without interpreter finalisation."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing left to say on it
            pass
    os._exit(0)


if __name__ == "__main__":  # pragma: no cover - the worker process itself
    main()
