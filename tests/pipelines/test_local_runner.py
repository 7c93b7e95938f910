"""The local runner's workers: Beam's harness started through ``dicom_deid.worker``.

A real multi-processing run checks that the workers' main module is ours (so Beam's own
worker command is still the one ``use_own_workers`` looks for); real subprocesses check
that a clean exit keeps the ``atexit`` handlers and stdio, and that a harness that cannot
start still exits non-zero.
"""

from __future__ import annotations

import os
import subprocess
import sys

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability import python_urns
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.testing.util import assert_that, equal_to

from dicom_deid.pipelines import local_runner


def _main_module(_element) -> str:
    main = sys.modules["__main__"]
    return getattr(getattr(main, "__spec__", None), "name", None) or "?"


def test_workers_run_dicom_deid_worker_and_the_run_ends_cleanly():
    opts = PipelineOptions(["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    p = beam.Pipeline(runner=local_runner.LocalRunner(), options=opts)
    names = p | beam.Create(range(6)) | beam.Map(_main_module)
    assert_that(names, equal_to(["dicom_deid.worker"] * 6))
    result = p.run()
    assert result.wait_until_finish() == "DONE"


def _env(command: str) -> beam_runner_api_pb2.Environment:
    return beam_runner_api_pb2.Environment(urn=python_urns.SUBPROCESS_SDK, payload=command.encode())


def test_only_beams_own_worker_command_is_replaced():
    proto = beam_runner_api_pb2.Pipeline()
    envs = proto.components.environments
    envs["beam"].CopyFrom(_env(local_runner.beam_worker_command()))
    envs["user"].CopyFrom(_env("/opt/python -m my.worker"))
    envs["docker"].CopyFrom(beam_runner_api_pb2.Environment(urn="beam:env:docker:v1", payload=b"x"))
    assert local_runner.use_own_workers(proto) == 1
    assert envs["beam"].payload.decode().endswith("-m dicom_deid.worker")
    assert envs["user"].payload == b"/opt/python -m my.worker"
    assert envs["docker"].payload == b"x"
    assert local_runner.use_own_workers(proto) == 0  # already ours: nothing to do


def test_clean_exit_runs_atexit_handlers_and_flushes_stdio():
    code = ("import atexit, sys\n"
            "from dicom_deid import worker\n"
            "atexit.register(lambda: print('atexit handler ran'))\n"
            "print('buffered', end='')\n"
            "sys.stderr.write('err-buffered')\n"
            "worker.leave()\n"
            "print('never printed')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    assert r.stdout == "bufferedatexit handler ran\n"
    assert r.stderr == "err-buffered"


def test_a_harness_that_cannot_start_exits_non_zero():
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_SERVICE_DESCRIPTOR")}
    env["PIPELINE_OPTIONS"] = "{}"
    r = subprocess.run([sys.executable, "-m", "dicom_deid.worker"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode != 0
    assert "Traceback" in r.stderr
