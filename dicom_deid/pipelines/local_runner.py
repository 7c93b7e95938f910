"""The local runner: Beam's FnApiRunner, with its worker processes started by ``dicom_deid.worker``.

In multi-processing mode the FnApiRunner starts every SDK worker with the command
``{python} -m apache_beam.runners.worker.sdk_worker_main`` (a ``SUBPROCESS_SDK`` environment
in the pipeline proto). :class:`LocalRunner` swaps that one command for
``{python} -m dicom_deid.worker``, which runs the same harness and then exits without
interpreter finalisation (see :mod:`dicom_deid.worker` for why and what it keeps). Nothing
else changes: the stages, the fusion, the bundles, the worker count and the options the
workers receive are the FnApiRunner's. An environment with any other command (a user's own
``--environment_config``, a future Beam default) is left as it is.

The workers import the ``dicom_deid`` the launcher imported. Where that came from a folder
a new interpreter would not search (a checkout that is not installed, found through the
launcher's script folder or a ``sys.path`` entry), the command puts that folder on the
workers' ``PYTHONPATH``. Without it such a worker could not even start: Beam only logs a
worker process that exits early, and the run would wait for it for ever.
"""

from __future__ import annotations

import os
import shlex
import site
import sys

from apache_beam.portability import python_urns
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

WORKER_MODULE = "dicom_deid.worker"


def beam_worker_command() -> str:
    """The command Beam 2.77's FnApiRunner gives multi-processing workers (fn_runner.py)."""
    return "%s -m apache_beam.runners.worker.sdk_worker_main" % sys.executable


def package_root() -> str:
    """The folder the launcher imported ``dicom_deid`` from."""
    import dicom_deid
    return os.path.dirname(os.path.dirname(os.path.abspath(dicom_deid.__file__)))


def _searched_anyway(folder: str) -> bool:
    """Whether a new interpreter of this Python searches ``folder`` without being told."""
    user = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    default = {os.path.realpath(p) for p in [*site.getsitepackages(), user] if p}
    return os.path.realpath(folder) in default


def worker_command() -> str:
    if os.name != "posix":
        return f"{sys.executable} -m {WORKER_MODULE}"
    # Beam runs it with shell=True: quoted for a POSIX shell (Beam's own is not quoted at all);
    # exec, so the process Beam waits for (and would kill) is the worker, not a shell over it
    cmd = f"exec {shlex.quote(sys.executable)} -m {WORKER_MODULE}"
    root = package_root()
    if _searched_anyway(root) or os.pathsep in root:
        return cmd
    return f'export PYTHONPATH={shlex.quote(root)}"${{PYTHONPATH:+{os.pathsep}$PYTHONPATH}}"; {cmd}'


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
