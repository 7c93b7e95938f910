"""Keyed, coordination-free derivation of pseudonyms, UIDs and date offsets.

Every derived value is an HMAC-SHA256 of a secret key and the original value, with a
domain label so that the same original never yields related outputs in two domains. Every
worker, run and site holding the key agrees without talking to each other.

The key is passed around as a :class:`KeyRef` (a *reference*: a file path or ``env:VAR``)
and resolved on the worker (``DoFn.setup``).  The key bytes are never a DoFn field that is
pickled into the job graph, never a pipeline option, never logged.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import os
import secrets
import stat
import uuid
from pathlib import Path
from typing import Optional

from .errors import ConfigError

REGISTRY_UID_ROOT = "1.2.840.10008."
MIN_KEY_BYTES = 16


@dataclasses.dataclass(frozen=True)
class KeyRef:
    """A reference to the secret key: ``/path/to/file``, ``file:/path`` or ``env:VAR``."""

    ref: str

    def __post_init__(self):
        if not self.ref or not isinstance(self.ref, str):
            raise ConfigError("key reference is empty")

    def __repr__(self) -> str:  # the reference is not secret, but keep it short and plain
        return f"KeyRef({self.ref!r})"


def _decode_key_text(raw: bytes) -> bytes:
    text = raw.strip()
    try:
        decoded = bytes.fromhex(text.decode("ascii"))
        if len(decoded) >= MIN_KEY_BYTES:
            return decoded
    except (ValueError, UnicodeDecodeError):
        pass
    if len(text) >= MIN_KEY_BYTES:
        return text
    raise ConfigError(f"key must hold at least {MIN_KEY_BYTES} bytes")


def resolve(ref: KeyRef) -> bytes:
    """Return the key bytes for a reference. Runs on the worker."""
    r = ref.ref
    if r.startswith("env:"):
        name = r[4:]
        value = os.environ.get(name)
        if value is None:
            raise ConfigError(f"key environment variable {name} is not set on this worker")
        return _decode_key_text(value.encode("utf-8"))
    if r.startswith(GCP_SECRET_SCHEME):
        return _decode_key_text(_gcp_secret(r[len(GCP_SECRET_SCHEME):]))
    path = r[5:] if r.startswith("file:") else r
    if "://" in path:
        raise ConfigError("key references of this scheme are not supported yet (use a file or env:VAR)")
    try:
        return _decode_key_text(Path(path).expanduser().read_bytes())
    except FileNotFoundError:
        raise ConfigError("key file not found") from None


GCP_SECRET_SCHEME = "gcpsm://"


def _gcp_secret(name: str) -> bytes:
    """``projects/P/secrets/S[/versions/V]`` from GCP Secret Manager (the gcp extra).
    Works on any worker with credentials for the secret (Dataflow's service account,
    Flink task managers with application default credentials)."""
    import importlib
    try:
        sm = importlib.import_module("google.cloud.secretmanager")
    except ImportError:
        raise ConfigError("gcpsm:// key references need the gcp extra "
                          "(pip install 'dicom-deid[gcp]')") from None
    if not name.startswith("projects/") or "/secrets/" not in name:
        raise ConfigError("gcpsm:// reference must be gcpsm://projects/P/secrets/S[/versions/V]")
    if "/versions/" not in name:
        name += "/versions/latest"
    try:
        resp = _secret_manager_client(sm).access_secret_version(request={"name": name})
        return bytes(resp.payload.data)
    except Exception as exc:  # never the message: keep the class only
        raise ConfigError(f"could not read the key from GCP Secret Manager ({type(exc).__name__})") from None


#: ``host:port`` of a local Secret Manager server (tests; plaintext gRPC, no credentials)
SECRET_MANAGER_EMULATOR_ENV = "DICOM_DEID_SECRET_MANAGER_EMULATOR_HOST"


def _secret_manager_client(sm):
    """The Secret Manager client: Google's endpoint with application default credentials,
    or, when :data:`SECRET_MANAGER_EMULATOR_ENV` is set, a local server over plaintext gRPC
    (as ``STORAGE_EMULATOR_HOST`` does for GCS)."""
    host = os.environ.get(SECRET_MANAGER_EMULATOR_ENV)
    if not host:
        return sm.SecretManagerServiceClient()
    import grpc
    from google.cloud.secretmanager_v1.services.secret_manager_service.transports import (
        SecretManagerServiceGrpcTransport)
    return sm.SecretManagerServiceClient(
        transport=SecretManagerServiceGrpcTransport(channel=grpc.insecure_channel(host)))


def default_key_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "dicom-deid" / "key"


def ensure_local_key(path: Optional[Path] = None) -> tuple[KeyRef, bool]:
    """Create (if missing) an owner-only key file; return (reference, created)."""
    path = Path(path or default_key_path())
    if path.exists():
        return KeyRef(str(path)), False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return KeyRef(str(path)), True


#: entries of :meth:`Deriver.uid`'s cache before it starts again (a few hundred series per
#: worker fit; see ``Deriver.__init__``)
_UID_CACHE_MAX = 4096


class Deriver:
    """All keyed derivations for one key. Cheap to build; build it in ``setup()``."""

    def __init__(self, key: bytes, date_offset_range: tuple[int, int] = (-3650, -365)):
        if len(key) < MIN_KEY_BYTES:
            raise ConfigError(f"key must hold at least {MIN_KEY_BYTES} bytes")
        lo, hi = date_offset_range
        if lo > hi or (lo <= 0 <= hi and lo == hi == 0):
            raise ConfigError("date offset range is empty")
        self._key = key
        self._lo, self._hi = lo, hi
        # the UID cache serves the study, series and frame-of-reference UIDs that recur across
        # a worker's objects; SOP Instance UIDs never recur, so a large cap only grows the
        # worker by about 250 bytes per object (25 MB at 100,000) for no hits
        self._uid_cache: dict[str, str] = {}
        #: patient key HMAC -> (pseudonym, date offset): HMAC outputs only, bounded
        self._patient_cache: dict[str, tuple] = {}

    def __reduce__(self):  # never pickle key material
        raise TypeError("Deriver holds key material and must not be serialized")

    def mac(self, domain: str, value: str) -> bytes:
        return hmac.new(self._key, domain.encode() + b"\x00" + value.encode("utf-8", "surrogateescape"),
                        hashlib.sha256).digest()

    # -- identifiers of inputs and content -------------------------------------------------
    def input_key(self, uri: str) -> str:
        """Keyed reference of an input URI (public: manifest, progress, shuffles)."""
        return self.mac("input", uri)[:16].hex()

    def content_fingerprint(self, sha256_hex: str) -> str:
        """Keyed fingerprint of the input bytes (a plain sha256 could be matched by anyone)."""
        return self.mac("content", sha256_hex)[:16].hex()

    def key_fingerprint(self) -> str:
        """Identifies the key without revealing it (for stores refusing mixed keys)."""
        return self.mac("key-fingerprint", "dicom-deid")[:8].hex()

    # -- patients --------------------------------------------------------------------------
    def patient_key(self, patient_id: str, issuer: str = "") -> str:
        """HMAC of the patient key; what shuffles and side inputs are keyed by."""
        return self.mac("patient", f"{issuer}\x1f{patient_id}").hex()

    def pseudonym(self, patient_key: str) -> str:
        return self._per_patient(patient_key)[0]

    def date_offset_days(self, patient_key: str) -> int:
        return self._per_patient(patient_key)[1]

    def _per_patient(self, patient_key: str) -> tuple:
        """Pseudonym and date offset of a patient key, computed once per worker (objects of
        one patient come together; the cache holds HMAC outputs only, bounded)."""
        cached = self._patient_cache.get(patient_key)
        if cached is None:
            cached = (self._pseudonym(patient_key), self._date_offset_days(patient_key))
            if len(self._patient_cache) >= 10_000:
                self._patient_cache.clear()
            self._patient_cache[patient_key] = cached
        return cached

    def _pseudonym(self, patient_key: str) -> str:
        digest = self.mac("pseudonym", patient_key)[:10]
        return "DD" + base64.b32encode(digest).decode("ascii").rstrip("=")

    def _date_offset_days(self, patient_key: str) -> int:
        span = self._hi - self._lo + 1
        n = int.from_bytes(self.mac("date-offset", patient_key)[:8], "big") % span
        off = self._lo + n
        if off == 0:  # never zero: a zero shift would leave the real dates
            off = self._lo if self._lo != 0 else self._hi
        return off

    # -- UIDs ------------------------------------------------------------------------------
    def uid(self, original: str) -> str:
        """``2.25.`` + integer of an RFC 9562 version-8 UUID made from the HMAC (PS3.5 B.2).

        Registry UIDs (``1.2.840.10008.*``: SOP classes, transfer syntaxes...) are kept.
        """
        original = original.strip().rstrip("\x00")
        if original.startswith(REGISTRY_UID_ROOT) or not original:
            return original
        cached = self._uid_cache.get(original)
        if cached is not None:
            return cached
        raw = bytearray(self.mac("uid", original)[:16])
        raw[6] = (raw[6] & 0x0F) | 0x80  # version 8
        raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 9562 variant
        new = "2.25." + str(uuid.UUID(bytes=bytes(raw)).int)
        if len(self._uid_cache) >= _UID_CACHE_MAX:
            self._uid_cache.clear()
        self._uid_cache[original] = new
        return new
