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
import re
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

    @classmethod
    def from_run_config(cls, cfg) -> "Settings":
        pol = cfg.policy
        return cls(store_dir=store_dir(cfg.private), strategy=getattr(pol, "strategy", "hmac"),
                   person_key=getattr(pol, "person_key", "patient_id"),
                   date_offset_days=tuple(pol.date_offset_days),
                   sequential_prefix=getattr(pol, "sequential_prefix", "P"),
                   sequential_digits=getattr(pol, "sequential_digits", 6),
                   lookup_table=getattr(cfg, "lookup_table", None),
                   exclusions=getattr(cfg, "exclusions", None))


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
        write_bytes_atomic(meta_uri, json.dumps(
            {"schema": STORE_SCHEMA_VERSION, "key_fingerprint": fingerprint,
             "created": _dt.datetime.now(_dt.timezone.utc).isoformat()}, indent=1).encode())


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
