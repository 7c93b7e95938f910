"""Input patterns at the edge: a path without wildcards that names nothing (or a folder) is an
error naming the pattern by position only; a glob matching nothing is a warning; and an
input's identity (``input_key``) does not depend on how its pattern was spelled."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from dicom_deid import keys, sample, storage
from tests.conftest import write_key
from tests.storage.conftest import base_env

NAME = "Smith^John 1970"  # paths can hold names: never echoed


def cli(args, cwd=None, beam_args=(), env_extra=None):
    env = base_env()
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "dicom_deid.cli", "run", *map(str, args), "--no-progress",
                           *beam_args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("patterns")
    s = sample.generate(root / "in", n_files=5, n_patients=2, seed=61)
    (root / NAME).mkdir()
    return {"root": root, "sample": s, "key": write_key(root / "k.hex", "6a" * 32)}


def _err_checks(proc, expected):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert expected in proc.stderr, proc.stderr[-3000:]
    assert NAME not in proc.stderr + proc.stdout and "Smith" not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_a_missing_path_is_an_error_naming_its_position_only(world, tmp_path):
    root = world["root"]
    proc = cli(["--input", f"{root}/in/**", f"{root}/{NAME}/scan 1.dcm", "--output", tmp_path / "o",
                "--private", tmp_path / "p", "--key", world["key"]])
    _err_checks(proc, "input pattern 2 of 2 matched nothing")
    assert not (tmp_path / "o").exists()  # nothing started


def test_a_folder_without_wildcards_is_an_error_with_a_hint(world, tmp_path):
    proc = cli(["--input", f"{world['root']}/{NAME}", "--output", tmp_path / "o", "--private", tmp_path / "p",
                "--key", world["key"]])
    _err_checks(proc, "input pattern 1 of 1 names a folder or prefix, not an object: add '/**'")


def test_globs_that_match_nothing_at_all_are_an_error(world, tmp_path):
    proc = cli(["--input", f"{world['root']}/{NAME}/*.dcm", f"{world['root']}/{NAME}/**", "--output",
                tmp_path / "o", "--private", tmp_path / "p", "--key", world["key"]])
    _err_checks(proc, "none of the 2 input pattern(s) matched any object")


@pytest.fixture
def s3(s3_store, monkeypatch):
    storage.reset_clients()
    monkeypatch.setattr(FileSystems, "_pipeline_options", PipelineOptions(s3_store.beam_args()))
    yield s3_store
    storage.reset_clients()


def test_probe_on_a_bucket(s3):
    b = s3.new_bucket()
    s3.put(b, f"site/{NAME}/1.dcm", b"x")
    u = lambda k: s3.uri(b, k)  # noqa: E731
    assert storage.probe_pattern(u(f"site/{NAME}/1.dcm")) == storage.MATCHED
    assert storage.probe_pattern(u("site/**")) == storage.MATCHED
    assert storage.probe_pattern(u("site/*.txt")) == storage.EMPTY
    assert storage.probe_pattern(u("site/nothing.dcm")) == storage.MISSING
    assert storage.probe_pattern(u("site")) == storage.FOLDER
    assert storage.probe_pattern(u(f"site/{NAME}/")) == storage.FOLDER
    with pytest.raises(Exception) as e:
        storage.check_patterns([u("site/**"), u("gone.dcm")])
    assert "input pattern 2 of 2 matched nothing" in str(e.value) and NAME not in str(e.value)
    assert storage.check_patterns([u("site/**"), u("site/*.txt")]) == [
        "warning: 1 of 2 input patterns matched no object (pattern 2); 1 matched objects"]


def test_canonical_identity_of_local_inputs():
    cwd = os.getcwd()
    assert storage.canonical_uri("in/a.dcm") == f"{cwd}/in/a.dcm"
    assert storage.canonical_uri("file:///data/./in//x/../a.dcm") == "/data/in/a.dcm"
    assert storage.canonical_uri("gs://b/a//x/../c") == "gs://b/a//x/../c"  # object keys are opaque
    assert storage.canonical_pattern("./in/**") == f"{cwd}/in/**"
    assert storage.canonical_pattern("s3://b/in/**") == "s3://b/in/**"


def test_relative_and_absolute_patterns_give_the_same_input_keys(world, tmp_path):
    """A relative pattern run from the data's parent folder, then an absolute file:// pattern
    with a detour and a glob that matches nothing: the second run recognises every input as
    already finished (same input keys), and warns about the empty glob by position."""
    root, key = world["root"], world["key"]
    out, priv = tmp_path / "out", tmp_path / "priv"
    one = "--direct_num_workers=1"  # 5 inputs: one worker is enough (the keys do not depend on it)
    first = cli(["--input", "in/**", "--output", out, "--private", priv, "--key", key, "--incremental", one],
                cwd=root)
    assert first.returncode == 0, first.stderr[-3000:]
    second = cli(["--input", f"file://{root}/./in/../in/**", f"{root}/{NAME}/*.dcm", "--output", out,
                  "--private", priv, "--key", key, "--incremental", one], cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "warning: 1 of 2 input patterns matched no object (pattern 2); 1 matched objects" in second.stderr
    assert NAME not in second.stderr + second.stdout
    summaries = sorted((json.loads(p.read_text()) for p in (out / "summaries").glob("*.json")),
                       key=lambda s: s["run_id"])
    assert summaries[0]["inputs"] == 5 and summaries[0]["incremental"]["new"] == 5
    assert summaries[1]["inputs"] == 0 and summaries[1]["incremental"]["unchanged_skipped"] == 5, summaries[1]
    # the keys are the HMAC of each input's absolute, normalised path
    rows = pq.read_table(out / "manifest").to_pylist()
    d = keys.Deriver(keys.resolve(keys.KeyRef(str(key))))
    expected = {d.input_key(os.path.abspath(p)) for p in world["sample"].files}
    assert {r["input_key"] for r in rows} == expected
