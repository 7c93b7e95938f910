"""Static checks of templates/ (Dataflow Flex Template) and terraform/ (GCP).

- the template parameters, the options of ``dicom-deid run`` and the Terraform pipeline
  variables are one list (names mapped ``max_input_bytes`` <-> ``--max-input-bytes``);
- every template parameter has a label, help text and a validation regex that accepts the
  documented example and rejects junk; the launcher turns parameters into the CLI's argv;
- the Dockerfile's Beam SDK image is the apache-beam version pinned in setup.py;
- every Terraform variable is documented and used; the buckets have uniform access,
  public access prevention, versioning and CMEK; the private bucket has a retention policy;
- ``terraform fmt -check`` when a terraform binary is on PATH (this machine image ships one;
  none is installable from the registries CI reaches, so elsewhere only the HCL parse checks
  run). ``terraform validate`` cannot run: ``init`` needs the google provider from
  registry.terraform.io, which is not reachable (see docs/running-at-scale.md).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import hcl2
import pytest

from dicom_deid import cli
from tests.conftest import REPO

TEMPLATES, TERRAFORM = REPO / "templates", REPO / "terraform"
#: `run` options that are not pipeline parameters: hidden test hook, and progress lines that
#: only local runs print (the launcher always passes --no-progress)
LAUNCHER_ONLY = {"run_id", "no_progress"}


def metadata() -> dict:
    return json.loads((TEMPLATES / "metadata.json").read_text())


def run_parser():
    return cli.build_parser()._subparsers._group_actions[0].choices["run"]


def cli_options() -> set[str]:
    return {a.dest for a in run_parser()._actions if a.option_strings and a.dest != "help"} - LAUNCHER_ONLY


def _unquote(x):
    """python-hcl2 keeps the quotes of block labels and string literals: drop them."""
    if isinstance(x, dict):
        return {_unquote(k): _unquote(v) for k, v in x.items() if k not in ("__is_block__", "__comments__")}
    if isinstance(x, list):
        return [_unquote(v) for v in x]
    if isinstance(x, str) and len(x) >= 2 and x[0] == x[-1] == '"':
        return x[1:-1]
    return x


def tf(name: str) -> dict:
    with open(TERRAFORM / name) as f:
        return _unquote(hcl2.load(f))


def tf_text() -> str:
    return "\n".join(p.read_text() for p in sorted(TERRAFORM.glob("*.tf")))


def launcher():
    spec = importlib.util.spec_from_file_location("dicom_deid_template_launcher", TEMPLATES / "launcher.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pipeline_parameters() -> dict:
    return next(l["pipeline_parameters"] for l in tf("main.tf")["locals"] if "pipeline_parameters" in l)


def test_template_parameters_cli_options_and_terraform_variables_are_one_list():
    params = [p["name"] for p in metadata()["parameters"]]
    assert len(params) == len(set(params))
    variables = {k for v in tf("variables.tf")["variable"] for k in v}
    assert set(params) == cli_options()
    assert set(pipeline_parameters()) == set(params)
    assert set(params) <= variables
    # each parameter is fed by the Terraform variable of the same name
    for name, expr in pipeline_parameters().items():
        assert re.search(rf"\bvar\.{name}\b", expr), (name, expr)


def test_every_parameter_has_help_and_a_regex_that_validates():
    examples = {
        "input": ("gs://incoming/2026/**,gs://more-data/a/*.dcm", "/local/path"),
        "output": ("gs://deid-public/registry", "s3://elsewhere/x"),
        "private": ("gs://deid-private/registry", "gs://"),
        "policy": ("research", "lenient"),
        "key": ("gcpsm://projects/p1/secrets/dicom-deid-key/versions/latest", "/home/me/key.hex"),
        "strict": ("true", "yes"),
        "max_input_bytes": ("8589934592", "-1"),
        "lookup_table": ("gs://deid-private/tables/ids.csv", "gs://deid-private/tables/ids.xlsx"),
        "exclusions": ("gs://deid-private/tables/opt-outs.parquet", "opt-outs.csv"),
        "incremental": ("false", "1"),
        "pseudonym_map": ("scan", "always"),
    }
    required = {a.dest for a in run_parser()._actions
                if getattr(a, "required", False)}
    for p in metadata()["parameters"]:
        assert p["label"] and len(p["helpText"]) > 20 and p["regexes"], p["name"]
        good, bad = examples[p["name"]]
        assert any(re.fullmatch(r, good) for r in p["regexes"]), (p["name"], good)
        assert not any(re.fullmatch(r, bad) for r in p["regexes"]), (p["name"], bad)
        # optional in the template where the CLI has a default (key: required on Dataflow,
        # where no local key can be created)
        assert p["isOptional"] == (p["name"] not in required | {"key"}), p["name"]


def test_launcher_turns_template_arguments_into_the_cli():
    argv = launcher().to_cli_argv([
        "--input=gs://a/x/**,gs://b/*.dcm", "--output=gs://o/p", "--private=gs://q/p",
        "--key=gcpsm://projects/p/secrets/k/versions/1", "--strict=true", "--incremental=false",
        "--max_input_bytes=1000", "--runner=DataflowRunner", "--project=p1", "--region=europe-west2"])
    assert argv == ["run", "--input", "gs://a/x/**", "gs://b/*.dcm", "--output", "gs://o/p",
                    "--private", "gs://q/p", "--key", "gcpsm://projects/p/secrets/k/versions/1",
                    "--strict", "--max-input-bytes", "1000", "--no-progress",
                    "--runner=DataflowRunner", "--project=p1", "--region=europe-west2"]
    # every parameter name maps onto an option the CLI parser knows
    parser_opts = {o for a in run_parser()._actions
                   for o in a.option_strings}
    for name in launcher().parameter_names():
        assert "--" + name.replace("_", "-") in parser_opts


def test_dockerfile_pins_the_beam_sdk_image_of_setup_py():
    docker = (TEMPLATES / "Dockerfile").read_text()
    beam = re.search(r'"apache-beam==([0-9.]+)"', (REPO / "setup.py").read_text()).group(1)
    m = re.search(r"^ARG BEAM_SDK_IMAGE=apache/beam_python(\d+\.\d+)_sdk:([0-9.]+)$", docker, re.M)
    assert m and m.group(2) == beam
    assert "FLEX_TEMPLATE_PYTHON_PY_FILE=/template/templates/launcher.py" in docker
    assert re.search(r"^FROM \$\{BEAM_SDK_IMAGE\}$", docker, re.M)


def test_every_terraform_variable_is_documented_and_used():
    text = tf_text()
    for block in tf("variables.tf")["variable"]:
        for name, spec in block.items():
            assert len(spec.get("description", "")) > 15, name
            assert "type" in spec, name
            assert re.search(rf"\bvar\.{name}\b", text), f"variable {name} is never used"


def test_buckets_are_locked_down_and_encrypted():
    res = {k: v for r in tf("main.tf")["resource"] for k, v in r.items()}
    bucket = res["google_storage_bucket"]["this"]
    assert bucket["uniform_bucket_level_access"] is True
    assert bucket["public_access_prevention"] == "enforced"
    assert bucket["versioning"][0]["enabled"] is True
    assert "google_kms_crypto_key.data.id" in bucket["encryption"][0]["default_kms_key_name"]
    retention = bucket["dynamic"][0]["retention_policy"]
    assert "private" in retention["for_each"]
    assert set(tf("main.tf")["locals"][0]["buckets"]) == {"input", "output", "private", "temp"}
    # least privilege: no project-wide storage or owner/editor roles for the workers
    text = tf_text()
    assert not re.search(r'roles/(owner|editor|storage\.admin)"', text)
    assert "roles/secretmanager.secretAccessor" in text and "google_secret_manager_secret_version" not in text
    assert "google_cloud_scheduler_job" in res and "google_dataflow_flex_template_job" in res


@pytest.mark.skipif(shutil.which("terraform") is None, reason="no terraform binary on PATH")
def test_terraform_fmt_check():
    r = subprocess.run(["terraform", "fmt", "-check", "-diff", "-recursive", str(TERRAFORM)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
