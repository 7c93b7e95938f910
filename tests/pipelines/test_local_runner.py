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
from pathlib import Path

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability import python_urns
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.testing.util import assert_that, equal_to

from dicom_deid.pipelines import local_runner

REPO = str(Path(__file__).resolve().parents[2])


def _main_module(_element) -> str:
    main = sys.modules["__main__"]
    return getattr(getattr(main, "__spec__", None), "name", None) or "?"


class _MarkTeardown(beam.DoFn):
    """Writes a file in teardown: proof the worker ran its DoFns' teardown before it left."""

    def __init__(self, folder: str):
        self.folder = folder

    def process(self, element):
        yield element

    def teardown(self):
        with open(os.path.join(self.folder, f"teardown-{os.getpid()}"), "w") as f:
            f.write("done")


def test_workers_run_dicom_deid_worker_exit_zero_after_teardown(tmp_path, monkeypatch):
    # the workers unpickle this module's functions: they must find it whatever the cwd
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    # Beam only logs a worker's non-zero exit (in the thread that waits for it): record it
    from apache_beam.runners.portability import local_job_service
    outcomes = []
    original = local_job_service.SubprocessSdkWorker.run

    def run(self):
        try:
            original(self)
        except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised as Beam would
            outcomes.append(type(exc).__name__)
            raise
        outcomes.append("exit 0")

    monkeypatch.setattr(local_job_service.SubprocessSdkWorker, "run", run)
    opts = PipelineOptions(["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    p = beam.Pipeline(runner=local_runner.LocalRunner(), options=opts)
    names = (p | beam.Create(range(6)) | beam.ParDo(_MarkTeardown(str(tmp_path)))
             | beam.Map(_main_module))
    assert_that(names, equal_to(["dicom_deid.worker"] * 6))
    result = p.run()
    assert result.wait_until_finish() == "DONE"
    assert outcomes == ["exit 0", "exit 0"]
    marks = sorted(tmp_path.glob("teardown-*"))
    assert len(marks) == 2 and all(m.read_text() == "done" for m in marks)


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


def _python(*lines: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True,
                          timeout=120)


def test_clean_exit_runs_atexit_handlers_and_flushes_stdio():
    r = _python("import atexit, sys",
                "from dicom_deid import worker",
                "atexit.register(lambda: print('atexit handler ran'))",
                "print('buffered', end='')",
                "sys.stderr.write('err-buffered')",
                "worker.leave()",
                "print('never printed')")
    assert r.returncode == 0
    assert r.stdout == "bufferedatexit handler ran\n"
    assert r.stderr == "err-buffered"


def test_a_harness_that_fails_exits_non_zero():
    """No control address: Beam's harness raises while it starts; the error is not swallowed."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_SERVICE_DESCRIPTOR")}
    env["PIPELINE_OPTIONS"] = "{}"
    r = subprocess.run([sys.executable, "-m", "dicom_deid.worker"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode != 0
    assert "Traceback" in r.stderr


def test_worker_logging_errors_on_stderr_beams_inapplicable_lines_dropped():
    harness = "logging.getLogger('apache_beam.runners.worker.sdk_worker_main')"
    r = _python("import logging",
                "from dicom_deid import beamlogs",
                "beamlogs.configure_worker()",
                "logging.warning('apitools not found, and bigquery client libraries are not available x')",
                f"{harness}.warning('No semi_persistent_directory found: %s', 'y')",
                "logging.getLogger('some.module').info('an info line')",
                "logging.getLogger('some.module').warning('a warning line')",
                "logging.getLogger('some.module').error('an error line')",
                f"{harness}.error('harness error')")
    assert r.returncode == 0
    assert r.stderr.splitlines() == ["ERROR some.module: an error line",
                                     "ERROR apache_beam.runners.worker.sdk_worker_main: harness error"]


def test_workers_import_the_dicom_deid_the_launcher_imported(tmp_path):
    """A launcher that found the package through a folder new interpreters do not search
    (here a copy put on ``sys.path`` by hand) gets workers that import that same copy."""
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(Path(REPO) / "dicom_deid", copy / "dicom_deid",
                    ignore=shutil.ignore_patterns("__pycache__"))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "\n".join([
        "import sys",
        f"sys.path.insert(0, {str(copy)!r})",
        "import apache_beam as beam",
        "from apache_beam.options.pipeline_options import PipelineOptions",
        "import dicom_deid",
        "from dicom_deid.pipelines import local_runner",
        "assert dicom_deid.__file__.startswith(sys.path[0]), dicom_deid.__file__",
        "cmd = local_runner.worker_command()",
        "assert cmd.startswith('export PYTHONPATH=') and 'exec ' in cmd, cmd",
        "opts = PipelineOptions(['--direct_num_workers=1', '--direct_running_mode=multi_processing'])",
        "p = beam.Pipeline(runner=local_runner.LocalRunner(), options=opts)",
        "seen = []",
        "(p | beam.Create([0]) | beam.Map(lambda _: (__import__('sys').modules['dicom_deid'].__file__,",
        "                                             __import__('sys').modules['__main__'].__spec__.name))",
        "   | beam.Map(lambda v: print('WORKER', *v, flush=True)))",
        "p.run().wait_until_finish()",
    ])
    r = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [line.split() for line in (r.stdout + r.stderr).splitlines() if line.startswith("WORKER ")]
    assert lines == [["WORKER", str(copy / "dicom_deid" / "__init__.py"), "dicom_deid.worker"]]


def test_an_installed_package_needs_no_path():
    r = _python("import site",
                "from dicom_deid.pipelines import local_runner",
                "root = local_runner.package_root()",
                "site.getsitepackages = lambda: [root]",
                "print(local_runner.worker_command())")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"exec {sys.executable} -m dicom_deid.worker"
