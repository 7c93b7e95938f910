"""Outputs stay valid DICOM: the dicom3tools validator finds no error in an output that it
did not already find in the input, for every built-in policy."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from dicom_deid import classify, keys, policy, reader, tags, writer
from dicom_deid.element import InputRef
from tests.conftest import CORPUS, shared_dir

DCIODVFY = shutil.which("dciodvfy")
KEY = b"\x42" * 32


def _errors(path) -> set[str]:
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60,
                          encoding="latin-1")
    lines = (proc.stdout + proc.stderr).splitlines()
    out = set()
    for line in lines:
        if line.startswith("Error"):
            # drop values (<...>) and element indices so input and output compare
            out.add(re.sub(r"<[^>]*>|\[\d+\]|=\s*\S+", "", line).strip())
    return out


def _deidentify(path, pol):
    d = keys.Deriver(KEY)
    obj = reader.parse(InputRef(str(path), d.input_key(str(path))), d, data=path.read_bytes())
    if obj.facts.get("reason") == "dicomdir":
        return None
    if classify.needs_stage(obj.dataset, obj.facts.get("sop_class_uid")) == classify.DOCUMENT_STAGE_MISSING:
        return None  # never written by this version (quarantined)
    tags.deidentify(obj, tags.compile_rules(policy.load(pol), KEY))
    return writer.serialize(obj.dataset)


def _image_files():
    files = []
    for p in sorted(CORPUS.rglob("*")):
        if not p.is_file() or p.suffix in (".tsv", ".txt", ".md") or "LICENSE" in p.name:
            continue
        files.append(p)
    return files


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian dicom3tools) not installed")
@pytest.mark.parametrize("pol", ["basic", "research", "allowlist"])
def test_no_new_validator_errors(tmp_path, pol):
    checked = 0
    new_errors = {}
    for src in _image_files():
        try:
            out = _deidentify(src, pol)
        except Exception:
            continue  # broken inputs are the read stage's business (dead letters)
        if out is None:
            continue
        dst = tmp_path / f"{checked}.dcm"
        dst.write_bytes(out)
        added = _errors(dst) - _errors(src)
        if added:
            new_errors[str(src.relative_to(CORPUS))] = sorted(added)[:3]
        checked += 1
    assert checked >= 40
    assert not new_errors, new_errors


@pytest.mark.skipif(shared_dir() is None, reason="../shared/corpus not present")
@pytest.mark.parametrize("pol", ["basic", "research", "allowlist"])
def test_every_shared_corpus_file_processes(pol):
    """Every parsable file of the shared corpus de-identifies and re-serialises."""
    corpus = shared_dir() / "corpus"
    failures = {}
    ok = 0
    for p in sorted(corpus.rglob("*")):
        if not p.is_file() or p.suffix in (".tsv", ".md") or "LICENSE" in p.name:
            continue
        d = keys.Deriver(KEY)
        try:
            obj = reader.parse(InputRef(str(p), d.input_key(str(p))), d, data=p.read_bytes())
        except Exception:
            continue  # unreadable inputs: dead letters, covered elsewhere
        if obj.facts.get("reason") == "dicomdir":
            continue
        try:
            tags.deidentify(obj, tags.compile_rules(policy.load(pol), KEY))
            classify.needs_stage(obj.dataset, obj.facts.get("sop_class_uid"))
            writer.serialize(obj.dataset)
            ok += 1
        except Exception as exc:
            failures[str(p.relative_to(corpus))] = type(exc).__name__
    assert ok >= 150
    assert not failures, failures
