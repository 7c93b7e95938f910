"""The first stage of the two-stage pipeline: ``ScanHeaders`` and ``BuildPseudonymMap``.

::

    FileRef ─ScanHeaders (header bytes only)─> {person HMAC, candidate HMACs}
        ├─ Count.PerKey(person) ───────────────────────────────┐
        └─ Distinct(candidate, person) ─┐                      │
    lookup table ─(load + HMAC)─────────┼─CoGroupByKey─> per person: lookup rows, excluded
    exclusion list ─(load + HMAC)───────┘                      │
    store part files ─(read, key fingerprint checked)──────────┤
                                                CoGroupByKey(person HMAC) ─> Decide
        ─> sequential: GroupByKey(None) ─> Number (single writer, store max as side input)
        ─> GroupByKey(shard) ─> CommitStore (new immutable part files) ─> (HMAC, entry)
                                                      └─> (all committed) ReleaseStoreLock

Everything grouped or broadcast here is keyed by an HMAC of the person key and carries
HMACs, pseudonyms, offsets and counts only: plaintext identifiers are hashed inside the
DoFn that reads them (headers, lookup table, exclusion list) and never leave it. The map
holds only this run's patients and reaches ``DeidentifyTags`` as ``AsMultiMap``; it is
produced *after* its new entries are written to the store, so every pseudonym an output
carries is in the store.
"""

from __future__ import annotations

import io
from typing import Optional

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.fileio import EmptyMatchTreatment
from apache_beam.io.filesystems import FileSystems

from .. import keys, manifest
from .. import pseudonyms as ps
from ..element import EXCLUDED, Outcome
from ..safety import configure_pydicom, quiet
from .common import OUTCOME, TRANSIENT, counter, quarantine

MAP = "map"
#: header elements the scan reads (everything else is skipped by seeking past it)
SCAN_TAGS = (0x00080005, 0x00080016, 0x00100020, 0x00100021, 0x00101002, 0x0020000D)
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
SCAN_BUFFER = 16 * 1024


# ----------------------------------------------------------------------------- ScanHeaders

class _CountingRaw(io.RawIOBase):
    """Counts the bytes the parser actually pulls from the source."""

    name = "<header scan>"  # pydicom reads .name; never the URI (paths may hold names)

    def __init__(self, src):
        self._src, self.count = src, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, b):
        data = self._src.read(len(b))
        n = len(data)
        b[:n] = data
        self.count += n
        return n

    def seek(self, pos, whence=0):
        return self._src.seek(pos, whence)

    def tell(self):
        return self._src.tell()


def scan_header(uri: str, deriver: keys.Deriver, mode: str) -> tuple[Optional[dict], int]:
    """Read one object's header (up to pixel data, listed elements only) -> scan record
    (HMACs only) and the number of bytes read. ``None`` for DICOMDIR."""
    import pydicom
    configure_pydicom()
    # local file, or ranged reads on object stores: only the first blocks are fetched, and
    # nothing logs the object's name on an HTTP error (Beam's s3io would)
    from .. import storage
    if storage.is_local(uri):
        # a plain buffered file: pydicom asks for tell() at every element, and a Python
        # counting wrapper made that a large share of the scan; bytes read ~ final position
        with open(storage.local_path(uri), "rb", buffering=SCAN_BUFFER) as fp, quiet():
            record = _scan(fp, deriver, mode)
            return record, fp.tell()
    src = storage.open_read(uri)
    raw = _CountingRaw(src)
    try:
        with io.BufferedReader(raw, buffer_size=SCAN_BUFFER) as fp, quiet():
            record = _scan(fp, deriver, mode)
    finally:
        src.close()
    return record, raw.count


def _scan(fp, deriver: keys.Deriver, mode: str) -> Optional[dict]:
    import pydicom
    ds = pydicom.dcmread(fp, force=True, stop_before_pixels=True, specific_tags=list(SCAN_TAGS))
    meta = getattr(ds, "file_meta", None)
    sop = str(ds.get("SOPClassUID", "") or "") or (
        str(meta.get("MediaStorageSOPClassUID", "") or "") if meta is not None else "")
    if sop == DICOMDIR_SOP_CLASS:
        return None
    pk = ps.person_key(ds, deriver, mode)
    return {"person": pk.hmac, "kind": pk.kind, "candidates": pk.candidates}


class ScanHeaders(beam.PTransform):
    """FileRef -> ``{"person": HMAC, "kind": str, "candidates": (HMAC, ...)}`` per object.

    Reads headers only (``stop_before_pixels``, only the listed elements' values, a 16 KiB
    buffer): on object stores the bytes before pixel data, not the object. Objects it
    cannot read are skipped here (``ReadDicom`` reports them) and counted.
    """

    def __init__(self, key_ref: keys.KeyRef, person_key: str = "patient_id"):
        super().__init__()
        self._key_ref, self._mode = key_ref, person_key

    def expand(self, refs):
        return refs | "ReadHeaders" >> beam.ParDo(_ScanHeadersFn(self._key_ref, self._mode))


class _ScanHeadersFn(beam.DoFn):
    def __init__(self, key_ref, mode):
        self._key_ref, self._mode = key_ref, mode

    def setup(self):
        self._deriver = keys.Deriver(keys.resolve(self._key_ref))
        self._scanned = counter("pseudonyms", "headers_scanned")
        self._bytes = counter("pseudonyms", "header_bytes_read")
        self._input_bytes = counter("pseudonyms", "scanned_input_bytes")
        self._failed = counter("pseudonyms", "header_scan_failures")

    def process(self, fref):
        try:
            record, n = scan_header(fref.uri, self._deriver, self._mode)
        except TRANSIENT:
            raise
        except Exception:  # unreadable: ReadDicom fails it with a dead letter
            self._failed.inc()
            return
        self._bytes.inc(n)
        self._input_bytes.inc(int(fref.size or 0))
        if record is not None:
            self._scanned.inc()
            yield record


# ----------------------------------------------------------------------------- sources

class _LoadLookupFn(beam.DoFn):
    """Lookup table URI -> (HMAC, LookupEntry): hashed here, plaintext never emitted."""

    def __init__(self, key_ref):
        self._key_ref = key_ref

    def setup(self):
        self._deriver = keys.Deriver(keys.resolve(self._key_ref))

    def process(self, uri):
        n = 0
        for k, entry in ps.iter_lookup(uri, self._deriver):
            n += 1
            yield k, entry
        counter("pseudonyms", "lookup_rows").inc(n)


class _LoadExclusionsFn(beam.DoFn):
    """Exclusion list URI -> (HMAC, True)."""

    def __init__(self, key_ref):
        self._key_ref = key_ref

    def setup(self):
        self._deriver = keys.Deriver(keys.resolve(self._key_ref))

    def process(self, uri):
        n = 0
        for k in ps.iter_exclusions(uri, self._deriver):
            n += 1
            yield k, True
        counter("pseudonyms", "exclusion_keys").inc(n)


class _ReadStoreFn(beam.DoFn):
    """Store part file -> (HMAC, row); a row made with another key fails the job."""

    def __init__(self, key_ref):
        self._key_ref = key_ref

    def setup(self):
        self._fp = keys.Deriver(keys.resolve(self._key_ref)).key_fingerprint()
        self._rows = counter("pseudonyms", "store_rows_read")

    def process(self, path):
        for k, row in ps.read_store_part(path, self._fp):
            self._rows.inc()
            yield k, row


def _matches(kv):
    """(candidate HMAC, {cand: [(person, exact)], lookup: [...], excl: [...]}) ->
    per person: ("lookup", (exact, entry)) / ("excluded", True)."""
    _cand, g = kv
    persons = g["cand"]
    if not persons:
        return
    for person, exact in persons:
        for entry in g["lookup"]:
            yield person, ("lookup", (exact, entry))
        if g["excl"]:
            yield person, ("excluded", True)


# ----------------------------------------------------------------------------- decisions

class _DecideFn(beam.DoFn):
    PENDING = "pending"

    def __init__(self, run_id, key_ref, settings: ps.Settings):
        self._run_id, self._key_ref, self._settings = run_id, key_ref, settings

    def setup(self):
        self._deriver = keys.Deriver(keys.resolve(self._key_ref), self._settings.date_offset_days)
        self._excluded = counter("pseudonyms", "patients_excluded")
        self._found = counter("pseudonyms", "patients_in_store")
        self._new = counter("pseudonyms", "patients_new")
        self._quarantined = counter("pseudonyms", "patients_quarantined")

    def process(self, kv):
        pk, g = kv
        if not g["seen"]:  # store entries of patients not in this run: not in the map
            return
        matched = g["matched"]
        lookup = [v for kind, v in matched if kind == "lookup"]
        excluded = any(kind == "excluded" for kind, _ in matched)
        entry, row, pending = ps.decide(pk, list(g["store"]), lookup, excluded, self._settings,
                                        self._deriver, self._run_id)
        if pending:
            self._new.inc()
            yield beam.pvalue.TaggedOutput(self.PENDING, pk)
            return
        if entry.get("status") == ps.EXCLUDED:
            self._excluded.inc()
        elif entry.get("status"):
            self._quarantined.inc()
        elif row is None:
            self._found.inc()
        else:
            self._new.inc()
        yield pk, entry, row


class _NumberFn(beam.DoFn):
    """The single writer of sequential IDs: every new patient of the run, in HMAC order,
    numbered after the store's highest number."""

    def __init__(self, run_id, key_ref, settings):
        self._run_id, self._key_ref, self._settings = run_id, key_ref, settings

    def setup(self):
        self._deriver = keys.Deriver(keys.resolve(self._key_ref), self._settings.date_offset_days)

    def process(self, kv, start_after):
        _, pks = kv
        yield from ps.number_new(pks, int(start_after or 0), self._settings, self._deriver, self._run_id)


class _CommitStoreFn(beam.DoFn):
    """One shard of decided patients: new rows -> one immutable part file (deterministic
    name, so a retried bundle rewrites the same file), then the map entries."""

    def __init__(self, run_id, key_ref, store_dir):
        self._run_id, self._key_ref, self._dir = run_id, key_ref, store_dir

    def setup(self):
        self._fp = keys.Deriver(keys.resolve(self._key_ref)).key_fingerprint()
        self._written = counter("pseudonyms", "store_rows_written")
        self._entries = counter("pseudonyms", "map_entries")

    def process(self, kv):
        shard, items = kv
        items = sorted(items, key=lambda t: t[0])
        rows = [row for _pk, _entry, row in items if row is not None]
        if rows:
            # fence: never write while another run's live lease is the newest (this run's
            # launcher holds one; see pseudonyms.StoreLock)
            ps.check_store_holder(self._dir, self._run_id)
            ps.write_store_part(self._dir, f"part-{self._run_id}-{shard:02d}.parquet", rows, self._fp)
            self._written.inc(len(rows))
        for pk, entry, _row in items:
            self._entries.inc()
            yield pk, entry


class _ReleaseStoreLockFn(beam.DoFn):
    """After the last store part of the run: release the launcher's lease (a no-op when
    this run holds none, as in pipelines built without the launcher)."""

    def __init__(self, run_id, store_dir):
        self._run_id, self._dir = run_id, store_dir

    def process(self, _count):
        if ps.release_from_pipeline(self._dir, self._run_id):
            counter("pseudonyms", "store_lock_released").inc()
        return []


class BuildPseudonymMap(beam.PTransform):
    """Scan records -> ``{"map": (HMAC, entry)}`` plus the intermediate collections (for
    tests that scan every grouped PCollection for plaintext).

    ``entry`` is ``{"pseudonym", "date_offset_days"}`` or ``{"status": "excluded" |
    "quarantined", "reason"}``. The map holds this run's patients only.
    """

    def __init__(self, run: manifest.RunInfo, key_ref: keys.KeyRef, settings: ps.Settings):
        super().__init__()
        self._run, self._key_ref, self._s = run, key_ref, settings

    def expand(self, scanned):
        p = scanned.pipeline
        s, run_id, ref = self._s, self._run.run_id, self._key_ref
        persons = (scanned | "PersonOf" >> beam.Map(lambda r: r["person"])
                   | "ObjectsPerPerson" >> beam.combiners.Count.PerElement())
        cands = (scanned
                 | "CandidatesOf" >> beam.FlatMap(lambda r: [(c, (r["person"], c == r["person"]))
                                                             for c in r["candidates"]])
                 | "DistinctCandidates" >> beam.Distinct())
        if s.lookup_table:
            lookup = (p | "LookupUri" >> beam.Create([s.lookup_table])
                      | "LoadLookup" >> beam.ParDo(_LoadLookupFn(ref)))
        else:
            lookup = p | "NoLookup" >> beam.Create([]).with_output_types(tuple[str, ps.LookupEntry])
        if s.exclusions:
            excl = (p | "ExclusionsUri" >> beam.Create([s.exclusions])
                    | "LoadExclusions" >> beam.ParDo(_LoadExclusionsFn(ref)))
        else:
            excl = p | "NoExclusions" >> beam.Create([]).with_output_types(tuple[str, bool])
        matched = ({"cand": cands, "lookup": lookup, "excl": excl}
                   | "JoinCandidates" >> beam.CoGroupByKey()
                   | "MatchesPerPerson" >> beam.FlatMap(_matches))
        store = (p | "MatchStore" >> fileio.MatchFiles(f"{s.store_dir}/part-*.parquet",
                                                       empty_match_treatment=EmptyMatchTreatment.ALLOW)
                 | "StorePaths" >> beam.Map(lambda m: m.path)
                 | "SpreadParts" >> beam.Reshuffle()
                 | "ReadStore" >> beam.ParDo(_ReadStoreFn(ref)))
        decided = ({"seen": persons, "store": store, "matched": matched}
                   | "JoinStore" >> beam.CoGroupByKey()
                   | "Decide" >> beam.ParDo(_DecideFn(run_id, ref, s)).with_outputs(
                       _DecideFn.PENDING, main="decided"))
        seq_max = (store | "Sequences" >> beam.Map(lambda kv: int(kv[1].get("sequence") or 0))
                   | "MaxSequence" >> beam.CombineGlobally(lambda xs: max(xs, default=0)))
        numbered = (decided[_DecideFn.PENDING]
                    | "ToSingleWriter" >> beam.Map(lambda pk: (None, pk))
                    | "AllNew" >> beam.GroupByKey()
                    | "NumberNew" >> beam.ParDo(_NumberFn(run_id, ref, s),
                                                start_after=beam.pvalue.AsSingleton(seq_max)))
        all_decided = (decided["decided"], numbered) | "AllDecided" >> beam.Flatten()
        grouped = (all_decided | "ByShard" >> beam.Map(lambda t: (ps.shard_of(t[0]), t))
                   | "GroupShards" >> beam.GroupByKey())
        the_map = grouped | "CommitStore" >> beam.ParDo(_CommitStoreFn(run_id, ref, s.store_dir))
        # every new entry is in the store: let the next run on this store start its stage 1
        _ = (the_map | "MapEntriesCommitted" >> beam.combiners.Count.Globally()
             | "ReleaseStoreLock" >> beam.ParDo(_ReleaseStoreLockFn(run_id, s.store_dir)))
        return {MAP: the_map, "scanned": scanned, "persons": persons, "candidates": cands,
                "lookup": lookup, "exclusions": excl, "matched": matched, "store": store,
                "decided": decided["decided"], "pending": decided[_DecideFn.PENDING],
                "numbered": numbered, "grouped": grouped}


# ----------------------------------------------------------------------------- direct mode

#: DeidentifyTags' output of ``(patient key HMAC, entry)`` for patients without a store entry
NEW_PATIENTS = "new_patients"
STORE = "store"
DONE = "done"


def _latest_kv(kv):
    pk, rows = kv
    return pk, ps.latest(rows)


class _OverridesFn(beam.DoFn):
    """(HMAC, latest store row) -> (HMAC, entry) only where the entry is not what the keyed
    derivation gives today (lookup or sequential history, another offset range)."""

    def __init__(self, key_ref, settings: ps.Settings):
        self._key_ref, self._settings = key_ref, settings

    def setup(self):
        self._deriver = keys.Deriver(keys.resolve(self._key_ref), self._settings.date_offset_days)
        self._n = counter("pseudonyms", "store_overrides")

    def process(self, kv):
        pk, row = kv
        entry = ps.entry_of(row)
        if (entry["pseudonym"] != self._deriver.pseudonym(pk)
                or entry["date_offset_days"] != self._deriver.date_offset_days(pk)):
            self._n.inc()
            yield pk, entry


class StoreOverrides(beam.PTransform):
    """Direct mode (``Settings.needs_scan`` is false): the store -> ``{"map": (HMAC, entry)
    for the stored patients whose entry the derivation would not give, "store": (HMAC,
    row)}``. No input is read: the map is ready as soon as the store is, so de-identification
    starts without a header scan of every input, and the side input holds only exceptions
    (empty for a store of plain HMAC entries, however large). ``store`` is the latest row
    per stored patient (shuffled once, joined with the run's new patients later)."""

    def __init__(self, key_ref: keys.KeyRef, settings: ps.Settings):
        super().__init__()
        self._key_ref, self._s = key_ref, settings

    def expand(self, pbegin):
        s = self._s
        store = (pbegin | "MatchStore" >> fileio.MatchFiles(f"{s.store_dir}/part-*.parquet",
                                                            empty_match_treatment=EmptyMatchTreatment.ALLOW)
                 | "StorePaths" >> beam.Map(lambda m: m.path)
                 | "SpreadParts" >> beam.Reshuffle()
                 | "ReadStore" >> beam.ParDo(_ReadStoreFn(self._key_ref)))
        latest = store | "RowsPerPatient" >> beam.GroupByKey() | "Latest" >> beam.Map(_latest_kv)
        overrides = latest | "NotDerivable" >> beam.ParDo(_OverridesFn(self._key_ref, s))
        return {MAP: overrides, STORE: latest}


def _first_entry(entries):
    return next(iter(entries), None)


def _unstored(kv):
    """(HMAC, {new: [entry], store: [row]}) -> (HMAC, entry) when the store has none."""
    pk, g = kv
    if g["store"]:
        return
    entries = list(g["new"])
    if entries:
        yield pk, entries[0]


class _NewRowFn(beam.DoFn):
    def __init__(self, run_id, key_ref):
        self._run_id, self._key_ref = run_id, key_ref

    def setup(self):
        self._fp = keys.Deriver(keys.resolve(self._key_ref)).key_fingerprint()

    def process(self, kv):
        pk, entry = kv
        row = ps.store_row(pk, entry["pseudonym"], entry["date_offset_days"], "hmac", self._fp, self._run_id)
        yield ps.shard_of(pk), (pk, entry, row)


class CommitNewPatients(beam.PTransform):
    """Direct mode: ``{"new": (HMAC, entry) from DeidentifyTags, "store": (HMAC, row)}`` ->
    the store's new part files (patients not stored yet), then the lease is released.
    Returns ``{"map": committed (HMAC, entry), "done": their count}``: ``WriteDicom``
    publishes only after ``done``, so every pseudonym an output carries is in the store
    (the same invariant as the scanned map's, moved from before reading to before publishing).
    """

    def __init__(self, run: manifest.RunInfo, key_ref: keys.KeyRef, settings: ps.Settings):
        super().__init__()
        self._run, self._key_ref, self._s = run, key_ref, settings

    def expand(self, pcolls):
        run_id, ref, s = self._run.run_id, self._key_ref, self._s
        new = (pcolls["new"] | "OnePerPatient" >> beam.CombinePerKey(_first_entry))
        committed = ({"new": new, "store": pcolls["store"]}
                     | "JoinStore" >> beam.CoGroupByKey()
                     | "NotInStore" >> beam.FlatMap(_unstored)
                     | "StoreRows" >> beam.ParDo(_NewRowFn(run_id, ref))
                     | "GroupShards" >> beam.GroupByKey()
                     | "CommitStore" >> beam.ParDo(_CommitStoreFn(run_id, ref, s.store_dir)))
        done = committed | "MapEntriesCommitted" >> beam.combiners.Count.Globally()
        _ = done | "ReleaseStoreLock" >> beam.ParDo(_ReleaseStoreLockFn(run_id, s.store_dir))
        return {MAP: committed, DONE: done}


# ----------------------------------------------------------------------------- routing

def route_by_map(run: manifest.RunInfo, obj, entry: Optional[dict], required: bool):
    """What ``DeidentifyTags`` does with a map entry: ``None`` = de-identify; otherwise the
    tagged outcome to emit (the object is released, nothing identifying recorded)."""
    if entry is None:
        if not required:
            return None
        counter("pseudonyms", "objects_without_entry").inc()
        return quarantine(run, obj, "tags", ps.PSEUDONYM_MISSING)
    status = entry.get("status")
    if not status:
        return None
    if status == ps.EXCLUDED:
        counter("pseudonyms", "objects_excluded").inc()
        row = manifest.row(run, obj.ref.input_key, EXCLUDED, stage="tags", reason=ps.EXCLUDED_REASON)
        obj.release()
        return beam.pvalue.TaggedOutput(OUTCOME, Outcome(row, {}))
    counter("pseudonyms", "objects_quarantined").inc()
    return quarantine(run, obj, "tags", entry.get("reason") or ps.PSEUDONYM_MISSING)


__all__ = ["ScanHeaders", "BuildPseudonymMap", "StoreOverrides", "CommitNewPatients", "route_by_map",
           "scan_header", "MAP", "NEW_PATIENTS", "STORE", "DONE"]
