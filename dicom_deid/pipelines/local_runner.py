"""The local runner: Beam's FnApiRunner, with its worker processes started by ``dicom_deid.worker``.

In multi-processing mode the FnApiRunner starts every SDK worker with the command
``{python} -m apache_beam.runners.worker.sdk_worker_main`` (a ``SUBPROCESS_SDK`` environment
in the pipeline proto). :class:`LocalRunner` swaps that one command for
``{python} -m dicom_deid.worker``, which runs the same harness and then exits without
interpreter finalisation (see :mod:`dicom_deid.worker` for why and what it keeps). Nothing
else changes: the stages, the fusion, the bundles, the worker count and the options the
workers receive are the FnApiRunner's. An environment with any other command (a user's own
``--environment_config``, a future Beam default) is left as it is.
"""

from __future__ import annotations

import os
import shlex
import sys

from apache_beam.portability import python_urns
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

WORKER_MODULE = "dicom_deid.worker"


def beam_worker_command() -> str:
    """The command Beam 2.77's FnApiRunner gives multi-processing workers (fn_runner.py)."""
    return "%s -m apache_beam.runners.worker.sdk_worker_main" % sys.executable


def worker_command() -> str:
    # Beam runs it with shell=True: quoted for a POSIX shell (Beam's own is not quoted at all)
    exe = shlex.quote(sys.executable) if os.name == "posix" else sys.executable
    return f"{exe} -m {WORKER_MODULE}"


def use_own_workers(pipeline_proto) -> int:
    """Point the FnApiRunner's default worker command at :data:`WORKER_MODULE`, in place;
    return how many environments were changed."""
    beam_cmd, ours = beam_worker_command().encode(), worker_command().encode()
    changed = 0
    for env in pipeline_proto.components.environments.values():
        if env.urn == python_urns.SUBPROCESS_SDK and env.payload == beam_cmd:
            env.payload = ours
            changed += 1
    return changed


class LocalRunner(FnApiRunner):
    """Beam's FnApiRunner; its multi-processing workers run :mod:`dicom_deid.worker`."""

    def run_via_runner_api(self, pipeline_proto, options):
        use_own_workers(pipeline_proto)
        return super().run_via_runner_api(pipeline_proto, options)


__all__ = ["LocalRunner", "WORKER_MODULE", "use_own_workers", "worker_command"]
