"""Allocator settings of local runs (dicom_deid.memory)."""

from __future__ import annotations

import os
import threading

import pytest

from dicom_deid import memory
from dicom_deid.pipelines import deidentify

ENV = ("MALLOC_ARENA_MAX", "ARROW_DEFAULT_MEMORY_POOL", memory.TRIM_ENV)


@pytest.fixture
def clean_env(monkeypatch):
    for k in ENV:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def _trimmers():
    return [t for t in threading.enumerate() if t.name == "dicom-deid-malloc-trim"]


def test_nothing_is_trimmed_unless_a_local_run_asked(clean_env):
    assert memory.start_trimming() is False


def test_a_local_run_sets_its_workers_environment_and_trims_once(clean_env):
    clean_env.setenv("MALLOC_ARENA_MAX", "4")  # an explicit setting wins
    deidentify.make_runner(deidentify.pipeline_options(["--direct_num_workers=1"]))
    assert os.environ["MALLOC_ARENA_MAX"] == "4"
    assert os.environ["ARROW_DEFAULT_MEMORY_POOL"] == "system"
    assert float(os.environ[memory.TRIM_ENV]) > 0
    assert memory.start_trimming() is True  # what a worker's ReadDicom setup does
    assert len(_trimmers()) == 1 and _trimmers()[0].daemon


def test_other_runners_leave_the_environment_alone(clean_env):
    deidentify.make_runner(deidentify.pipeline_options(["--runner=PortableRunner", "--job_endpoint=localhost:1"]))
    assert not any(k in os.environ for k in ENV)
