"""Shared fixtures: paths, keys, builders of broken inputs, a pipeline runner."""

from __future__ import annotations

import os
import secrets
import struct
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
CORPUS = DATA / "corpus"


def shared_dir():
    env = os.environ.get("DICOM_DEID_SHARED")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared", REPO.parent.parent / "shared"]:
        if (cand / "corpus" / "INDEX.tsv").is_file():
            return cand
    return None


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path_factory, monkeypatch):
    # a generated key never lands in the real user's config directory
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.getbasetemp() / "xdg"))


def write_key(path: Path, hexkey: str | None = None) -> Path:
    path.write_text((hexkey or secrets.token_hex(32)) + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def key_file(tmp_path) -> Path:
    return write_key(tmp_path / "key.hex", "11" * 32)


def make_broken_inputs(folder: Path, valid: Path, planted: str) -> dict[str, Path]:
    """Broken inputs, each a different failure: name -> path. ``planted`` is an identifier
    placed in malformed values, to prove it never reaches logs or dead letters."""
    folder.mkdir(parents=True, exist_ok=True)
    data = valid.read_bytes()
    out = {}
    out["zero"] = folder / "zero.dcm"
    out["zero"].write_bytes(b"")
    out["random"] = folder / "random.dcm"
    out["random"].write_bytes(secrets.token_bytes(4096) if False else bytes((i * 37 + 11) % 251 for i in range(4096)))
    out["text"] = folder / "notes.txt"
    out["text"].write_text(f"Patient {planted} seen today\n")
    out["truncated"] = folder / "truncated.dcm"
    out["truncated"].write_bytes(data[: len(data) // 3])
    # a corrupt element: an explicit-VR element claiming a length far beyond the file,
    # right after the file meta, carrying the planted value
    import pydicom
    ds = pydicom.dcmread(valid)
    ds.PatientName = planted
    ds.PatientID = planted
    import io
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = bytearray(buf.getvalue())
    needle = planted.encode()
    i = raw.find(needle)
    # PatientName element header is 8 bytes before the value in explicit VR LE: set length
    raw[i - 2:i] = struct.pack("<H", 0xFFF0)
    out["corrupt"] = folder / "corrupt.dcm"
    out["corrupt"].write_bytes(bytes(raw))
    return out


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    """Wait for a CLI subprocess (10 minutes at most); killed if the wait fails."""
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
