"""Portable runners get the pipeline fused by the Python SDK (see ``fuse_in_sdk``): without it
Beam's Java fuser in the job server splits ReadDicom from DeidentifyTags (a ParDo with a side
input always starts a new stage there) and the job fails on the DicomObject coder, as seen on
Flink. No cluster needed."""

from apache_beam.options.pipeline_options import DebugOptions

from dicom_deid.pipelines.deidentify import pipeline_options


def experiments(args):
    return pipeline_options(args).view_as(DebugOptions).experiments or []


def test_flink_and_other_portable_runners_fuse_in_the_sdk():
    for runner in ("FlinkRunner", "flink", "SparkRunner", "PortableRunner",
                   "apache_beam.runners.portability.flink_runner.FlinkRunner"):
        assert "pre_optimize=all" in experiments(["--runner", runner]), runner


def test_an_explicit_choice_wins_and_other_runners_are_left_alone():
    assert experiments(["--runner", "FlinkRunner", "--experiments=pre_optimize=default"]) == ["pre_optimize=default"]
    assert "pre_optimize=all" not in experiments([])  # local FnApiRunner fuses by itself
    assert "pre_optimize=all" not in experiments(["--runner", "DataflowRunner"])


def test_a_relative_key_file_reaches_workers_as_an_absolute_path(tmp_path, monkeypatch):
    """SDK workers of PROCESS/EXTERNAL environments run in another working directory (the
    worker pool's, the TaskManager's): a relative --key would not be found there."""
    from dicom_deid.options import make_config
    (tmp_path / "k.hex").write_text("ab" * 32)
    monkeypatch.chdir(tmp_path)
    cfg = make_config(["in/**"], "out", "priv", key="k.hex", run_id="r")
    assert cfg.key_ref.ref == str(tmp_path / "k.hex")
    assert make_config(["in/**"], "out", "priv", key="file:k.hex", run_id="r").key_ref.ref == str(tmp_path / "k.hex")
    monkeypatch.setenv("DD_TEST_KEY", "cd" * 32)
    assert make_config(["in/**"], "out", "priv", key="env:DD_TEST_KEY", run_id="r").key_ref.ref == "env:DD_TEST_KEY"
