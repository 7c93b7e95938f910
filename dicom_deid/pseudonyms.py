"""Pseudonyms beyond the keyed function: person keys, the pseudonym store, user lookup
tables, sequential IDs and exclusion (opt-out) lists. Engine module: no Beam.

Everything here turns plaintext identifiers into **HMACs of the person key** as early as
possible; only HMACs (and pseudonyms) ever leave this module towards a shuffle or a side
input. Error messages name rows and columns, never values.

Person key
    ``patient_id`` (default): PatientID + IssuerOfPatientID (no PatientID: the study, so a
    study stays together and is never merged with other unidentified patients).
    ``nhs_number``: a valid NHS number (modulus-11 check digit) found in
    OtherPatientIDsSequence (issuer naming NHS, or the NHS number OID) or in PatientID with
    such an issuer; objects without one fall back to ``patient_id``. One person with several
    hospital numbers then gets one pseudonym.

Store
    ``{private}/pseudonyms/part-{run_id}-{shard}.parquet``: immutable part files, one row
    per patient entry (:data:`STORE_SCHEMA`), plus ``_store.json`` naming the key
    fingerprint. A store built with another key is refused (a new key is a new pseudonym
    space). Re-running the same inputs adds nothing.

Lookup table (CSV or Parquet, private)
    columns ``research_id`` and either ``nhs_number`` or ``patient_id`` (+ optional
    ``issuer``), optional ``date_offset_days``. Hashed with the key when loaded.

Exclusions (CSV or Parquet, private)
    columns ``nhs_number`` and/or ``patient_id`` (+ optional ``issuer``). An object is
    excluded when *any* of its identifiers matches (PatientID with and without issuer,
    other patient IDs, every valid NHS number it carries): over-matching costs data, never
    privacy.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import io
import json
import logging
import os
import random
import re
import threading
import time
from typing import Iterable, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ConfigError, DeidError
from .text import nhs_check_digit, nhs_valid  # noqa: F401 (re-exported)
from .keys import Deriver

STRATEGIES = ("hmac", "sequential", "lookup")
PERSON_KEYS = ("patient_id", "nhs_number")
NHS_ISSUER = "NHS"
#: OID of the NHS number (England and Wales) as an issuer's UniversalEntityID
NHS_NUMBER_OID = "2.16.840.1.113883.2.1.4.1"

# entry statuses carried by the map instead of a pseudonym
EXCLUDED = "excluded"
QUARANTINED = "quarantined"
NOT_IN_LOOKUP = "not_in_lookup_table"
LOOKUP_CONFLICT = "lookup_conflict"
PSEUDONYM_MISSING = "pseudonym_missing"
EXCLUDED_REASON = "exclusion_list"

STORE_DIR = "pseudonyms"
STORE_META = "_store.json"  # "_": parquet readers of the folder skip it
STORE_SCHEMA_VERSION = 1
STORE_SCHEMA = pa.schema([
    pa.field("patient_key_hmac", pa.string(), nullable=False),
    pa.field("pseudonym", pa.string(), nullable=False),
    pa.field("date_offset_days", pa.int32(), nullable=False),
    pa.field("source", pa.string(), nullable=False),       # hmac | sequential | lookup
    pa.field("sequence", pa.int64()),                      # number of a sequential ID
    pa.field("key_fingerprint", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),       # run that first needed the entry
    pa.field("created", pa.timestamp("us", tz="UTC"), nullable=False),
])
SHARDS = 16


class MixedKeyError(ConfigError):
    """The pseudonym store was built with another key."""


class TableError(ConfigError):
    """A lookup table or exclusion list is unusable (row/column named, never a value)."""


class StoreError(DeidError):
    description = "pseudonym store entry is invalid"


# ----------------------------------------------------------------------------- NHS numbers

_NHS_SEP = re.compile(r"[\s-]")


def normalise_nhs_number(value) -> Optional[str]:
    """Ten digits with a valid modulus-11 check digit (spaces/hyphens allowed), else None."""
    if value is None:
        return None
    digits = _NHS_SEP.sub("", str(value).strip())
    if len(digits) != 10 or not digits.isdigit() or not digits.isascii():
        return None
    return digits if nhs_valid(digits) else None


def _text(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bytes):
        v = v.decode("latin-1", "replace")
    return str(v).strip().strip("\x00").strip()


def _issuer_is_nhs(item) -> bool:
    issuer = _text(item.get("IssuerOfPatientID", "")).upper()
    if "NHS" in issuer.split() or issuer.startswith("NHS"):
        return True
    for q in item.get("IssuerOfPatientIDQualifiersSequence", None) or ():
        if _text(q.get("UniversalEntityID", "")) == NHS_NUMBER_OID:
            return True
    return False


def nhs_numbers_of(ds, any_issuer: bool = False) -> list[str]:
    """Valid NHS numbers the object names as such: PatientID and OtherPatientIDsSequence
    items whose issuer is the NHS (``any_issuer``: every valid 10-digit ID, for exclusions)."""
    out = []
    items = [ds] + list(ds.get("OtherPatientIDsSequence", None) or ())
    for item in items:
        n = normalise_nhs_number(_text(item.get("PatientID", "")))
        if n and (any_issuer or _issuer_is_nhs(item)) and n not in out:
            out.append(n)
    return out


# ----------------------------------------------------------------------------- person keys

@dataclasses.dataclass(frozen=True)
class PersonKey:
    """HMAC of the person key, how it was formed, and every HMAC an exclusion may match."""

    hmac: str
    kind: str  # nhs_number | patient_id | study | unknown
    candidates: tuple[str, ...]

    def __repr__(self) -> str:  # HMACs only, but keep reprs short
        return f"PersonKey(kind={self.kind}, candidates={len(self.candidates)})"


def _patient_id_key(ds, deriver: Deriver) -> tuple[str, str]:
    # exactly the expressions the keyed derivation has always used (stores stay valid)
    pid = str(ds.get("PatientID", "") or "").strip()
    issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
    if not pid:
        # no patient ID: fall back to the study so a study stays together, never merged
        # with other unidentified patients
        study = str(ds.get("StudyInstanceUID", "") or "").strip()
        kind = "study" if study else "unknown"
        return deriver.patient_key("study:" + study if study else "unknown:", issuer), kind
    return deriver.patient_key(pid, issuer), "patient_id"


def person_key(ds, deriver: Deriver, mode: str = "patient_id") -> PersonKey:
    """The person key of one dataset (full or header-only) as HMACs."""
    if mode not in PERSON_KEYS:
        raise ConfigError(f"unknown person key {mode!r}")
    key, kind = _patient_id_key(ds, deriver)
    if mode == "nhs_number":
        nhs = nhs_numbers_of(ds)
        if nhs:
            key, kind = deriver.patient_key(nhs[0], NHS_ISSUER), "nhs_number"
    cands = [key]
    pid = str(ds.get("PatientID", "") or "").strip()
    issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
    if pid:
        cands += [deriver.patient_key(pid, issuer), deriver.patient_key(pid, "")]
    for item in ds.get("OtherPatientIDsSequence", None) or ():
        opid = _text(item.get("PatientID", ""))
        if opid:
            cands += [deriver.patient_key(opid, _text(item.get("IssuerOfPatientID", ""))),
                      deriver.patient_key(opid, "")]
    cands += [deriver.patient_key(n, NHS_ISSUER) for n in nhs_numbers_of(ds, any_issuer=True)]
    return PersonKey(key, kind, tuple(dict.fromkeys(cands)))


def original_person_ids(ds, mode: str = "patient_id") -> dict:
    """Plaintext person identifiers for the *private* linkage table only."""
    nhs = nhs_numbers_of(ds)
    return {"original_issuer": _text(ds.get("IssuerOfPatientID", "")) or None,
            "original_nhs_number": nhs[0] if nhs else None,
            "person_key_kind": "nhs_number" if (mode == "nhs_number" and nhs) else "patient_id"}


# ----------------------------------------------------------------------------- settings

@dataclasses.dataclass(frozen=True)
class Settings:
    """What BuildPseudonymMap needs: plain values (references and URIs, never a key)."""

    store_dir: str
    strategy: str = "hmac"
    person_key: str = "patient_id"
    date_offset_days: tuple[int, int] = (-3650, -365)
    sequential_prefix: str = "P"
    sequential_digits: int = 6
    lookup_table: Optional[str] = None
    exclusions: Optional[str] = None
    #: scan every header first even where the strategy does not need it (--pseudonym-map scan)
    force_scan: bool = False

    @property
    def needs_scan(self) -> bool:
        """Whether the map must be built from a scan of every input before any object is
        de-identified. Only a run whose every entry is either already in the store or the
        keyed derivation can skip it (plain ``hmac``, no lookup table, no exclusion list):
        sequential numbers, lookup tables and exclusions need all of the run's patients
        first."""
        return (self.force_scan or self.strategy != "hmac" or bool(self.lookup_table)
                or bool(self.exclusions))

    @classmethod
    def from_run_config(cls, cfg) -> "Settings":
        pol = cfg.policy
        return cls(store_dir=store_dir(cfg.private), strategy=getattr(pol, "strategy", "hmac"),
                   person_key=getattr(pol, "person_key", "patient_id"),
                   date_offset_days=tuple(pol.date_offset_days),
                   sequential_prefix=getattr(pol, "sequential_prefix", "P"),
                   sequential_digits=getattr(pol, "sequential_digits", 6),
                   lookup_table=getattr(cfg, "lookup_table", None),
                   exclusions=getattr(cfg, "exclusions", None),
                   force_scan=getattr(cfg, "pseudonym_map", "auto") == "scan")


def store_dir(private: str) -> str:
    return f"{private.rstrip('/')}/{STORE_DIR}"


# ----------------------------------------------------------------------------- I/O helpers

def read_bytes(uri: str) -> bytes:
    """A whole (small) store, lookup or metadata file, from any scheme."""
    from . import storage
    return b"".join(storage.iter_chunks(uri))


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Written whole or not at all (local: temp + fsync + rename; object stores: one upload)."""
    from . import storage
    storage.write_bytes(uri, data, durable=True)


def exists(uri: str) -> bool:
    from . import storage
    return storage.exists(uri)


def list_store_parts(sdir: str) -> list[str]:
    from . import storage
    return sorted(i.uri for i in storage.iter_objects(f"{sdir.rstrip('/')}/part-*.parquet"))


# ----------------------------------------------------------------------------- tables

def _read_rows(uri: str, what: str) -> tuple[list[str], Iterator[dict]]:
    """(columns, rows) of a CSV or Parquet file; values as stripped strings."""
    data = read_bytes(uri)
    if uri.lower().endswith(".parquet") or data[:4] == b"PAR1":
        try:
            t = pq.read_table(io.BytesIO(data))
        except Exception:
            raise TableError(f"{what}: not a readable Parquet file") from None
        cols = [c.lower() for c in t.column_names]
        t = t.rename_columns(cols)

        def rows():
            for r in t.to_pylist():
                yield {k: ("" if v is None else str(v).strip()) for k, v in r.items()}
        return cols, rows()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise TableError(f"{what}: CSV must be UTF-8") from None
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    reader = csv.DictReader(io.StringIO(text), dialect=dialect)
    cols = [c.strip().lower() for c in (reader.fieldnames or [])]

    def rows():
        for r in reader:
            yield {(k or "").strip().lower(): ("" if v is None else str(v).strip())
                   for k, v in r.items() if k is not None}
    return cols, rows()


@dataclasses.dataclass(frozen=True)
class LookupEntry:
    research_id: str
    date_offset_days: Optional[int]


_BAD_ID = re.compile(r"[\\\x00-\x1f]")


def _row_key(row: dict, n: int, what: str, deriver: Optional[Deriver]) -> Optional[str]:
    nhs_raw = row.get("nhs_number", "")
    if nhs_raw:
        nhs = normalise_nhs_number(nhs_raw)
        if nhs is None:
            raise TableError(f"{what}: row {n}: nhs_number is not a valid NHS number (modulus-11)")
        return deriver.patient_key(nhs, NHS_ISSUER) if deriver else "x"
    pid = row.get("patient_id", "")
    if pid:
        return deriver.patient_key(pid, row.get("issuer", "")) if deriver else "x"
    return None


def iter_lookup(uri: str, deriver: Optional[Deriver] = None) -> Iterator[tuple[str, LookupEntry]]:
    """(patient key HMAC, entry) for every row; validates completely before yielding
    (``deriver=None``: validation only, as the launcher does before a run)."""
    what = "lookup table"
    cols, rows = _read_rows(uri, what)
    if "research_id" not in cols or not ({"nhs_number", "patient_id"} & set(cols)):
        raise TableError(f"{what}: needs columns research_id and nhs_number or patient_id "
                         f"(found {len(cols)} columns)")
    out: dict[str, LookupEntry] = {}
    used_ids: dict[str, str] = {}
    for n, row in enumerate(rows, start=2 if not uri.lower().endswith(".parquet") else 1):
        key = _row_key(row, n, what, deriver)
        if key is None:
            raise TableError(f"{what}: row {n}: no nhs_number or patient_id")
        rid = row.get("research_id", "")
        if not rid or len(rid) > 64 or _BAD_ID.search(rid):
            raise TableError(f"{what}: row {n}: research_id must be 1-64 characters without "
                             "backslash or control characters")
        off = row.get("date_offset_days", "")
        offset = None
        if off:
            try:
                offset = int(off)
            except ValueError:
                raise TableError(f"{what}: row {n}: date_offset_days must be whole days") from None
            if offset == 0:
                raise TableError(f"{what}: row {n}: date_offset_days must not be 0")
        entry = LookupEntry(rid, offset)
        if deriver is None:
            continue
        if key in out and out[key] != entry:
            raise TableError(f"{what}: row {n}: the same patient has two different entries")
        if rid in used_ids and used_ids[rid] != key:
            raise TableError(f"{what}: row {n}: research_id already given to another patient")
        out[key] = entry
        used_ids[rid] = key
    yield from out.items()


def iter_exclusions(uri: str, deriver: Optional[Deriver] = None) -> Iterator[str]:
    """Patient key HMACs of every excluded person (``deriver=None``: validate only)."""
    what = "exclusion list"
    cols, rows = _read_rows(uri, what)
    if not ({"nhs_number", "patient_id"} & set(cols)):
        raise TableError(f"{what}: needs a column nhs_number or patient_id")
    seen = set()
    for n, row in enumerate(rows, start=2 if not uri.lower().endswith(".parquet") else 1):
        keys_ = []
        nhs_raw = row.get("nhs_number", "")
        if nhs_raw:
            nhs = normalise_nhs_number(nhs_raw)
            if nhs is None:
                raise TableError(f"{what}: row {n}: nhs_number is not a valid NHS number (modulus-11)")
            if deriver:
                keys_.append(deriver.patient_key(nhs, NHS_ISSUER))
        pid = row.get("patient_id", "")
        if pid and deriver:
            keys_.append(deriver.patient_key(pid, row.get("issuer", "")))
            # without an issuer the ID matches whatever issuer an object names (see
            # person_key: its candidates include the ID without issuer)
        if not nhs_raw and not pid:
            continue  # blank line
        for k in keys_:
            if k not in seen:
                seen.add(k)
                yield k


def validate_tables(lookup: Optional[str], exclusions: Optional[str]) -> None:
    """Launcher-side check, before any pipeline: files exist and every row is usable."""
    for uri, fn in ((lookup, iter_lookup), (exclusions, iter_exclusions)):
        if uri is None:
            continue
        if not exists(uri):
            raise TableError(f"{'lookup table' if fn is iter_lookup else 'exclusion list'}: file not found")
        for _ in fn(uri, None):
            pass


# ----------------------------------------------------------------------------- the store

def check_store(sdir: str, fingerprint: str, create: bool = True) -> None:
    """Refuse a store built with another key; record this key's fingerprint when new."""
    meta_uri = f"{sdir.rstrip('/')}/{STORE_META}"
    if exists(meta_uri):
        try:
            meta = json.loads(read_bytes(meta_uri).decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise ConfigError("pseudonym store: _store.json is unreadable") from None
        if meta.get("key_fingerprint") != fingerprint:
            raise MixedKeyError(
                f"pseudonym store {sdir} was built with another key (fingerprint "
                f"{meta.get('key_fingerprint')}, this key {fingerprint}). A new key is a new "
                "pseudonym space: use the key the store was built with, or a new --private prefix")
        return
    parts = list_store_parts(sdir)
    if parts:  # parts copied in without _store.json: check the first one
        fp = part_fingerprint(parts[0])
        if fp is not None and fp != fingerprint:
            raise MixedKeyError(f"pseudonym store {sdir} was built with another key (fingerprint "
                                f"{fp}, this key {fingerprint})")
    if create:
        from . import storage
        meta = json.dumps({"schema": STORE_SCHEMA_VERSION, "key_fingerprint": fingerprint,
                           "created": _dt.datetime.now(_dt.timezone.utc).isoformat()}, indent=1).encode()
        if not storage.create_if_absent(meta_uri, meta):  # another run made it first: its key?
            check_store(sdir, fingerprint, create=False)


def part_fingerprint(uri: str) -> Optional[str]:
    md = pq.read_schema(io.BytesIO(read_bytes(uri))).metadata or {}
    v = md.get(b"key_fingerprint")
    return v.decode() if v else None


def read_store_part(uri: str, fingerprint: str) -> Iterator[tuple[str, dict]]:
    """(patient key HMAC, store row) of one part file; refuses rows of another key."""
    t = pq.read_table(io.BytesIO(read_bytes(uri)))
    for r in t.to_pylist():
        if r.get("key_fingerprint") != fingerprint:
            raise MixedKeyError("pseudonym store holds entries made with another key")
        yield r["patient_key_hmac"], r


def store_table(rows: Iterable[dict], fingerprint: str) -> pa.Table:
    t = pa.Table.from_pylist(list(rows), schema=STORE_SCHEMA)
    return t.replace_schema_metadata({b"key_fingerprint": fingerprint.encode(),
                                      b"schema": str(STORE_SCHEMA_VERSION).encode()})


def write_store_part(sdir: str, name: str, rows: list[dict], fingerprint: str) -> str:
    buf = io.BytesIO()
    pq.write_table(store_table(rows, fingerprint), buf, compression="zstd")
    uri = f"{sdir.rstrip('/')}/{name}"
    write_bytes_atomic(uri, buf.getvalue())
    return uri


def read_store(sdir: str, fingerprint: str) -> dict[str, dict]:
    """The whole store as {HMAC: latest row} (tools and tests; the pipeline reads per part)."""
    out: dict[str, dict] = {}
    for part in list_store_parts(sdir):
        for k, r in read_store_part(part, fingerprint):
            if k not in out or r["created"] >= out[k]["created"]:
                out[k] = r
    return out


def latest(rows: Iterable[dict]) -> Optional[dict]:
    best = None
    for r in rows:
        if best is None or (r["created"], r["run_id"]) > (best["created"], best["run_id"]):
            best = r
    return best


# ----------------------------------------------------------------------------- decisions

def sequential_id(prefix: str, digits: int, n: int) -> str:
    return f"{prefix}{n:0{digits}d}"


def store_row(pk: str, pseudonym: str, offset: int, source: str, fingerprint: str, run_id: str,
              sequence: Optional[int] = None, created: Optional[_dt.datetime] = None) -> dict:
    return {"patient_key_hmac": pk, "pseudonym": pseudonym, "date_offset_days": int(offset),
            "source": source, "sequence": sequence, "key_fingerprint": fingerprint,
            "run_id": run_id, "created": created or _dt.datetime.now(_dt.timezone.utc)}


def entry_of(row: dict) -> dict:
    """The side-input entry (what DeidentifyTags needs) of a store row."""
    return {"pseudonym": row["pseudonym"], "date_offset_days": int(row["date_offset_days"])}


def decide(pk: str, stored: list[dict], lookup: list[tuple[bool, LookupEntry]], excluded: bool,
           settings: Settings, deriver: Deriver, run_id: str):
    """Decide one patient of this run: ``(entry, new_store_row, pending_sequential)``.

    ``lookup`` holds ``(matched on the person key itself, entry)`` for every table row that
    matched one of the patient's identifiers. Precedence: exclusion > lookup table > store >
    strategy (hmac derives; sequential is numbered later by a single writer; lookup
    quarantines, never guesses).
    """
    fp = deriver.key_fingerprint()
    if excluded:
        return {"status": EXCLUDED, "reason": EXCLUDED_REASON}, None, False
    have = latest(stored)
    if lookup:
        exact = {e for is_exact, e in lookup if is_exact}
        found = exact or {e for _, e in lookup}
        if len(found) > 1:  # two rows (say an NHS number and a hospital number) disagree
            return {"status": QUARANTINED, "reason": LOOKUP_CONFLICT}, None, False
        le = next(iter(found))
        offset = le.date_offset_days
        if offset is None:
            offset = have["date_offset_days"] if have else deriver.date_offset_days(pk)
        entry = {"pseudonym": le.research_id, "date_offset_days": int(offset)}
        if have and have["pseudonym"] == entry["pseudonym"] and int(have["date_offset_days"]) == offset:
            return entry, None, False
        return entry, store_row(pk, le.research_id, offset, "lookup", fp, run_id), False
    if have:
        return entry_of(have), None, False
    if settings.strategy == "lookup":
        return {"status": QUARANTINED, "reason": NOT_IN_LOOKUP}, None, False
    if settings.strategy == "sequential":
        return None, None, True
    pseud, offset = deriver.pseudonym(pk), deriver.date_offset_days(pk)
    return ({"pseudonym": pseud, "date_offset_days": offset},
            store_row(pk, pseud, offset, "hmac", fp, run_id), False)


def number_new(pending: Iterable[str], start_after: int, settings: Settings, deriver: Deriver,
               run_id: str) -> Iterator[tuple[str, dict, dict]]:
    """Sequential IDs for new patients, in HMAC order (stable, reveals nothing)."""
    fp = deriver.key_fingerprint()
    n = start_after
    for pk in sorted(set(pending)):
        n += 1
        pseud = sequential_id(settings.sequential_prefix, settings.sequential_digits, n)
        offset = deriver.date_offset_days(pk)
        yield pk, {"pseudonym": pseud, "date_offset_days": offset}, store_row(
            pk, pseud, offset, "sequential", fp, run_id, sequence=n)


def shard_of(pk: str) -> int:
    return int(pk[:2], 16) % SHARDS


# ----------------------------------------------------------------------------- store lock

LOCK_DIR = "_lock"  # "_": parquet readers of the store folder skip it
#: a holder renews its lease every quarter of it; another run may take over a lease that
#: was not renewed for this long (crash, lost launcher)
LOCK_LEASE_SECONDS = float(os.environ.get("DICOM_DEID_STORE_LOCK_LEASE", "300"))
#: how long a run waits for another run's lease before it fails (backoff up to 15 s)
LOCK_WAIT_SECONDS = float(os.environ.get("DICOM_DEID_STORE_LOCK_WAIT", "900"))
#: tolerated difference between the clocks of two machines judging a lease's expiry
LOCK_CLOCK_SKEW = 30.0
_TICKET = re.compile(r"(\d{12})\.json")

log = logging.getLogger("dicom_deid.pseudonyms")


class StoreLocked(ConfigError):
    """Another run holds the pseudonym store and did not let go in time."""


class StoreLockUnsupported(ConfigError):
    """The storage ignores conditional writes, so runs cannot be kept apart."""


class StoreLockLost(RuntimeError):
    """Raised inside the pipeline when another run took the store over: nothing is written."""

    def __init__(self):
        super().__init__("the pseudonym store is held by another run (this run's lease "
                         "lapsed): no store entry written; run again when it has finished")


def _lock_dir(sdir: str) -> str:
    return f"{sdir.rstrip('/')}/{LOCK_DIR}"


def _ticket_uri(sdir: str, seq: int) -> str:
    return f"{_lock_dir(sdir)}/{seq:012d}.json"


def _tickets(sdir: str) -> list[int]:
    """Sequence numbers of the lock tickets present, newest first."""
    from . import storage
    out = []
    for info in storage.iter_objects(f"{_lock_dir(sdir)}/*.json"):
        m = _TICKET.fullmatch(info.uri.rsplit("/", 1)[-1])
        if m:
            out.append(int(m.group(1)))
    return sorted(out, reverse=True)


def latest_ticket(sdir: str) -> Optional[tuple[int, Optional[dict]]]:
    """The newest lock ticket as ``(seq, content)`` (content None when unreadable), or None
    when the store was never locked. Tickets are immutable; a run that holds the store
    writes a newer one to renew or release it, and cleans up all but the last two."""
    from . import storage
    for _ in range(5):
        seqs = _tickets(sdir)
        if not seqs:
            return None
        try:
            raw = read_bytes(_ticket_uri(sdir, seqs[0]))
        except storage.ObjectNotFound:  # cleaned up between listing and reading: list again
            continue
        try:
            t = json.loads(raw.decode("utf-8"))
            return seqs[0], (t if isinstance(t, dict) else None)
        except (ValueError, UnicodeDecodeError):
            return seqs[0], None
    return None


def _ticket_live(t: Optional[dict], now: float) -> bool:
    """Held and not expired by the clock (skew tolerated in the holder's favour)."""
    if t is None:
        return True
    return t.get("state") == "held" and now <= float(t.get("expires", 0)) + LOCK_CLOCK_SKEW


def release_from_pipeline(sdir: str, run_id: str) -> bool:
    """Release the lease of run ``run_id`` once its new store entries are written (called
    inside the pipeline after the last part file): other runs on the store may start their
    own stage 1 while this run reads and writes objects. Writes a ``released`` ticket with
    the holder's token, so the launcher sees its own lease released. False when the newest
    ticket is not this run's live lease (no lock taken, already released)."""
    from . import storage
    for _ in range(20):
        latest = latest_ticket(sdir)
        if latest is None:
            return False
        seq, t = latest
        if not t or t.get("run_id") != run_id or t.get("state") != "held":
            return False
        now = time.time()
        data = json.dumps({"seq": seq + 1, "state": "released", "run_id": run_id, "token": t.get("token"),
                           "lease_seconds": t.get("lease_seconds"), "written": now, "expires": now,
                           "by": "pipeline"}, sort_keys=True).encode()
        if storage.create_if_absent(_ticket_uri(sdir, seq + 1), data):
            return True
        # the launcher renewed meanwhile: look again
    return False


def check_store_holder(sdir: str, run_id: str) -> None:
    """Fence for writers inside the pipeline: refuse when another run's live lease is the
    newest ticket. A store never locked, released or expired is writable (pipelines built
    without the launcher, as tests do, hold no lease)."""
    latest = latest_ticket(sdir)
    if latest is None:
        return
    _seq, t = latest
    if t is not None and t.get("run_id") == run_id:
        return
    if _ticket_live(t, time.time()):
        raise StoreLockLost()


class StoreLock:
    """One run at a time per pseudonym store, on local disks, gs:// and s3:// alike.

    The lock is a series of immutable **tickets** ``{store}/_lock/{seq:012d}.json``; the
    newest one says who holds the store until when. Every change (take, renew, release) is
    writing ticket ``seq + 1`` with :func:`storage.create_if_absent`, a precondition the
    store decides (local ``link(2)``, GCS ``ifGenerationMatch=0``, S3 ``If-None-Match: *``),
    so of two runs racing for the same number exactly one wins, and a holder whose lease
    was taken over learns it on its next renewal. A lease is free when released, expired
    by the clock (plus :data:`LOCK_CLOCK_SKEW`), or not renewed for a whole lease while we
    watched (clock-independent): a crashed run blocks others for one lease at most.

    The launcher takes the lock before the pipeline starts and a daemon thread renews it
    every quarter lease; the pipeline releases it (:func:`release_from_pipeline`) as soon
    as its new store entries are written: with the scanned map at the end of stage 1, so
    runs on one store take turns for the store read, decisions and part files and overlap
    for the content stages; with the direct map after the content stages (its decisions are
    made while objects are de-identified), so such runs take turns for the whole run.
    Store writes are fenced (:func:`check_store_holder`). The part files stay immutable and
    appear whole, so readers (``link export``, tools, a run's store read) need no lock.
    Tickets carry the run id, a random token and times only.
    """

    def __init__(self, sdir: str, run_id: str, lease: Optional[float] = None,
                 wait: Optional[float] = None):
        import secrets
        self.sdir, self.run_id = sdir.rstrip("/"), run_id
        self.lease = float(LOCK_LEASE_SECONDS if lease is None else lease)
        self.wait = float(LOCK_WAIT_SECONDS if wait is None else wait)
        self.token = f"{run_id}.{secrets.token_hex(8)}"
        self.seq: Optional[int] = None
        self.exclusive = True   # False: the storage ignored the precondition (probe)
        self.lost = False
        self.released_early = False  # by the pipeline, once its store entries were written
        self.waited = 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._expires = 0.0

    # -- tickets
    def _write(self, seq: int, state: str) -> bool:
        """Create ticket ``seq``; True when it is ours."""
        from . import storage
        uri = _ticket_uri(self.sdir, seq)
        now = time.time()
        expires = now + self.lease if state == "held" else now
        data = json.dumps({"seq": seq, "state": state, "run_id": self.run_id, "token": self.token,
                           "lease_seconds": self.lease, "written": now, "expires": expires},
                          sort_keys=True).encode()
        ok = storage.create_if_absent(uri, data)
        if not ok:
            try:  # ours after all (an earlier attempt whose answer was lost)?
                t = json.loads(read_bytes(uri).decode("utf-8"))
                ok = isinstance(t, dict) and t.get("token") == self.token and t.get("state") == state
            except Exception:  # noqa: BLE001 - unreadable or gone: not ours
                ok = False
        if ok:
            self._expires = expires
        return ok

    def _cleanup(self) -> None:
        from . import storage
        try:
            for seq in _tickets(self.sdir):
                if self.seq is not None and seq < self.seq - 1:
                    storage.delete(_ticket_uri(self.sdir, seq))
        except Exception:  # noqa: BLE001 - old tickets are harmless
            pass

    # -- taking, renewing, releasing
    def acquire(self, notify=None, require_exclusive: bool = False) -> "StoreLock":
        """Take the store, waiting (backoff with jitter) up to ``wait`` seconds; raises
        :class:`StoreLocked` with the holder's run id and lease when it stays taken."""
        start = time.monotonic()
        first_seen: dict[int, float] = {}
        delay, told = 0.25, False
        while True:
            latest = latest_ticket(self.sdir)
            now_m = time.monotonic()
            if latest is None:
                target, t, free = 1, None, True
            else:
                seq, t = latest
                target = seq + 1
                seen = first_seen.setdefault(seq, now_m)
                lease = float((t or {}).get("lease_seconds", self.lease))
                free = (not _ticket_live(t, time.time())) or (now_m - seen > lease)
            if free and self._write(target, "held"):
                self.seq = target
                self.waited = time.monotonic() - start
                self._probe(require_exclusive, notify)
                self._cleanup()
                self._thread = threading.Thread(target=self._renew_loop, name="store-lock-renew",
                                                daemon=True)
                self._thread.start()
                return self
            if free:
                continue  # another run won this number: look again at once
            waited = time.monotonic() - start
            holder = (t or {}).get("run_id", "unknown")
            until = _dt.datetime.fromtimestamp(float((t or {}).get("expires", 0)), _dt.timezone.utc)
            if waited >= self.wait:
                raise StoreLocked(
                    f"the pseudonym store under --private is in use by run {holder} (lease until "
                    f"{until:%Y-%m-%d %H:%M:%S} UTC, renewed while it runs); waited {waited:.0f} s. "
                    "Runs sharing a --private prefix take turns: start this one when that run "
                    "has finished (a crashed run's lease lapses by itself; "
                    "DICOM_DEID_STORE_LOCK_WAIT sets the wait in seconds)")
            if not told and notify is not None:
                notify(f"note: the pseudonym store is in use by run {holder}; waiting up to "
                       f"{self.wait:.0f} s for it")
                told = True
            time.sleep(min(delay * random.uniform(0.7, 1.3), max(0.05, self.wait - waited)))
            delay = min(delay * 2, 15.0, max(0.05, self.lease / 4))  # a few looks per lease

    def _probe(self, require_exclusive: bool, notify) -> None:
        """A second create of our own ticket must be refused: else the storage ignores
        conditional writes (emulators do) and the lock cannot keep runs apart."""
        from . import storage
        uri = _ticket_uri(self.sdir, self.seq)
        if storage.create_if_absent(uri, read_bytes(uri)):
            self.exclusive = False
            msg = ("the storage under --private ignores conditional writes, so the pseudonym "
                   "store lock cannot keep concurrent runs apart")
            if require_exclusive:
                self.release()
                raise StoreLockUnsupported(msg + " (refused for the sequential strategy)")
            log.warning("%s", msg)
            if notify is not None:
                notify("warning: " + msg)

    def _renew_loop(self) -> None:
        interval = max(0.05, self.lease / 4)
        while not self._stop.wait(interval):
            try:
                if self._write(self.seq + 1, "held"):
                    self.seq += 1
                    latest = latest_ticket(self.sdir)
                    if latest is not None and latest[0] > self.seq:
                        # a number freed by another run's clean-up: that run holds the store
                        # (ours was released by our pipeline, or taken over)
                        self.lost = not self.released_early
                        log.warning("pseudonym store lease of run %s: another run holds the store",
                                    self.run_id)
                        return
                    self._cleanup()
                    continue
                try:
                    t = json.loads(read_bytes(_ticket_uri(self.sdir, self.seq + 1)).decode("utf-8"))
                except Exception:  # noqa: BLE001 - gone or unreadable
                    t = None
                if isinstance(t, dict) and t.get("token") == self.token and t.get("state") == "released":
                    self.released_early = True   # the pipeline let go after its store commit
                    return
                latest = latest_ticket(self.sdir)
                if latest is None or latest[0] > self.seq:  # someone took it over
                    self.lost = True
                    log.warning("pseudonym store lease of run %s was taken over by another run",
                                self.run_id)
                    return
            except Exception:  # noqa: BLE001 - storage trouble: try again, unless it lapsed
                if time.time() > self._expires:
                    self.lost = True
                    log.warning("pseudonym store lease of run %s lapsed (storage errors)", self.run_id)
                    return

    def release(self) -> None:
        """Let go (a ``released`` ticket); never fails the run: a lease we cannot release
        lapses by itself."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, self.lease))
        if self.seq is None or self.lost:
            return
        try:
            if self._write(self.seq + 1, "released"):
                self.seq += 1
                self._cleanup()
        except Exception:  # noqa: BLE001
            log.warning("could not release the pseudonym store lease of run %s; it lapses by itself",
                        self.run_id)
        self.seq = None

    def __enter__(self):
        return self if self.seq is not None else self.acquire()

    def __exit__(self, *exc):
        self.release()
