"""CLI parse-only tests: arguments become a RunConfig and a pipeline graph; nothing runs."""

import apache_beam as beam
import pytest

from dicom_deid import cli
from dicom_deid.errors import ConfigError
from dicom_deid.pipelines import deidentify


def test_parse_run_and_beam_passthrough(tmp_path, key_file):
    cfg, beam_args = cli.parse_run([
        "--input", str(tmp_path / "a/**"), str(tmp_path / "b/*.dcm"), "--output", str(tmp_path / "o"),
        "--private", str(tmp_path / "p"), "--key", str(key_file), "--policy", "research",
        "--runner", "FlinkRunner", "--flink_master", "localhost:8081", "--environment_type=LOOPBACK"])
    assert cfg.inputs == (str(tmp_path / "a/**"), str(tmp_path / "b/*.dcm"))
    assert cfg.policy.name == "research" and cfg.key_ref.ref == str(key_file)
    assert beam_args == ["--runner", "FlinkRunner", "--flink_master", "localhost:8081",
                         "--environment_type=LOOPBACK"]
    opts = deidentify.pipeline_options(beam_args)
    assert opts.get_all_options()["runner"] == "FlinkRunner"
    assert opts.get_all_options()["flink_master"] == "localhost:8081"


def test_default_runner_is_fnapi_multiprocessing_on_all_cores():
    import os
    opts = deidentify.pipeline_options([]).get_all_options()
    assert opts["runner"] == "FnApiRunner"
    assert opts["direct_running_mode"] == "multi_processing"
    assert opts["direct_num_workers"] == (os.cpu_count() or 1)
    assert deidentify.pipeline_options(["--direct_num_workers=1"]).get_all_options()["direct_num_workers"] == 1


def test_build_graph_without_running(tmp_path, key_file):
    cfg, _ = cli.parse_run(["--input", str(tmp_path / "*"), "--output", str(tmp_path / "o"),
                            "--private", str(tmp_path / "p"), "--key", str(key_file)])
    p = beam.Pipeline()
    outs = deidentify.build(p, cfg)
    assert set(outs) >= {"outcomes", "dead_letters", "files"}
    labels = {t.full_label for t in p.transforms_stack[0].parts}
    for step in ("MatchInputs", "ReadDicom", "DeidentifyTags", "CleanPixels", "CleanAttachments",
                 "VerifyNoPHI", "WriteDicom", "WriteManifest", "WriteDeadLetters", "WriteLinkage", "PublishFiles"):
        assert step in labels
    # the key bytes are nowhere in the pipeline graph
    proto = p.to_runner_api(use_fake_coders=True).SerializeToString()
    assert bytes.fromhex("11" * 32) not in proto and ("11" * 32).encode() not in proto


@pytest.mark.parametrize("argv, match", [
    (["--output", "X", "--private", "X/priv"], "separate"),
    (["--output", "X", "--private", "gs://bucket/priv"], "refusing to invent"),
    (["--output", "X", "--private", "Y", "--policy", "nope"], "not a built-in"),
])
def test_bad_arguments_fail_before_running(tmp_path, argv, match):
    argv = [a.replace("X", str(tmp_path / "o")).replace("Y", str(tmp_path / "p")) for a in argv]
    with pytest.raises(ConfigError, match=match):
        cli.parse_run(["--input", str(tmp_path / "*"), *argv])


def test_main_reports_config_errors(tmp_path, capsys):
    rc = cli.main(["run", "--input", str(tmp_path), "--output", str(tmp_path / "o"),
                   "--private", str(tmp_path / "o" / "p")])
    assert rc == 2 and "separate" in capsys.readouterr().err


def test_inspect_hides_values_unless_asked(tmp_path, key_file, capsys):
    import pydicom
    from tests.conftest import CORPUS
    ds = pydicom.dcmread(CORPUS / "dcm_qa_ts" / "1.dcm")
    ds.PatientName = "FENWICKSHAW^ISOLDE"
    f = tmp_path / "x.dcm"
    ds.save_as(f)
    assert cli.main(["inspect", str(f), "--key", str(key_file)]) == 0
    out = capsys.readouterr()
    assert "FENWICKSHAW" not in out.out + out.err
    assert "PatientBirthDate" in out.out and "removed=" in out.out
    assert cli.main(["inspect", str(f), "--key", str(key_file), "--policy", "research", "--show-values"]) == 0
    out = capsys.readouterr()
    assert "PHI" in out.err and "StudyDate" in out.out
