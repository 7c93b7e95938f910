"""The de-identification pipeline: ``build`` assembles it, ``run`` runs it.

::

    patterns -> MatchInputs (FileRef, Reshuffle) -> ReadDicom -> DeidentifyTags <- pseudonym map
        -> CleanPixels -> CleanAttachments -> VerifyNoPHI -> WriteDicom (stage; records to
        files in the staging folder, grouped by shard of the new SOP UID; commit)
    every stage: main + outcome + dead_letter -> WriteManifest (public) / WriteDeadLetters,
    WriteLinkage (private), each a temporary part per bundle -> PublishFiles (one step at the
    end moves every committed part to its final name; see transforms/sinks.py)

The pseudonym map comes one of two ways (``pseudonyms.Settings.needs_scan``):

* scanned (sequential IDs, a lookup table or an exclusion list): every input's header is
  read first (ScanHeaders -> BuildPseudonymMap); the map holds this run's patients, written
  to the store before any object is read.
* direct (plain HMAC, the default): no scan; the map is the store's exceptions only
  (StoreOverrides), objects are de-identified as soon as the store is read, DeidentifyTags
  reports patients the map lacks and CommitNewPatients stores them; WriteDicom publishes
  only after that. Both give the same outputs and the same store.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (DebugOptions, DirectOptions, PipelineOptions,
                                                  WorkerOptions, StandardOptions)

from .. import summary as summary_mod
from ..options import RunConfig
from ..transforms.attachments import CleanAttachments
from ..transforms.common import DEAD_LETTER, MAIN, OUTCOME
from ..pseudonyms import Settings as PseudonymSettings
from ..transforms.pixels import CleanPixels
from ..transforms.pseudonyms import (DONE as STORE_DONE, MAP as PSEUDONYM_MAP, NEW_PATIENTS,
                                     STORE as PSEUDONYM_STORE, BuildPseudonymMap, CommitNewPatients,
                                     ScanHeaders, StoreOverrides)
from ..transforms.read import MatchInputs, ReadDicom
from ..transforms.sinks import PublishFiles, WriteDeadLetters, WriteLinkage, WriteManifest
from ..transforms.tags import DeidentifyTags
from ..transforms.verify import VerifyNoPHI
from ..transforms.write import COMMIT_DEAD_LETTER, LINKAGE, STAGING_OUTCOME, WriteDicom
from ..transforms import incremental
from .. import housekeeping, memory, storage

log = logging.getLogger("dicom_deid")
LOCAL_RUNNER = "FnApiRunner"


def pipeline_options(beam_args: Sequence[str]) -> PipelineOptions:
    """Beam options; the default runner is the FnApiRunner in multi-processing mode on all
    cores (named explicitly: Beam's DirectRunner would first try to download Prism)."""
    opts = PipelineOptions(list(beam_args))
    std = opts.view_as(StandardOptions)
    direct = opts.view_as(DirectOptions)
    if not std.runner:
        std.runner = LOCAL_RUNNER
    if std.runner in (LOCAL_RUNNER, "FnApiRunner"):
        if "--direct_num_workers" not in " ".join(beam_args):
            direct.direct_num_workers = os.cpu_count() or 1
        if "default_sdk_harness_log_level" not in " ".join(beam_args):
            opts.view_as(WorkerOptions).default_sdk_harness_log_level = "WARNING"
        if direct.direct_running_mode in (None, "in_memory") and "--direct_running_mode" not in " ".join(beam_args):
            direct.direct_running_mode = "multi_processing"
    elif is_portable_runner(opts):
        fuse_in_sdk(opts)
    return opts


#: runners that hand the pipeline to a Beam job server (Flink, Spark, any --job_endpoint)
PORTABLE_RUNNERS = frozenset({"flink", "spark", "portable"})


def is_portable_runner(opts: PipelineOptions) -> bool:
    name = str(opts.view_as(StandardOptions).runner or "").rsplit(".", 1)[-1].lower()
    return name.removesuffix("runner") in PORTABLE_RUNNERS


def fuse_in_sdk(opts: PipelineOptions) -> None:
    """Fuse the graph in the Python SDK (``pre_optimize=all``), as the local runner does.

    Otherwise the job server fuses it with Beam's Java GreedyPipelineFuser, which starts a new
    stage at every ParDo that reads a side input (DeidentifyTags reads the pseudonym map): the
    DicomObjects between ReadDicom and DeidentifyTags would have to be encoded across a stage
    boundary, which InMemoryOnlyCoder refuses (seen on Flink). A job server runs a pipeline
    that arrives fused as it is. An explicit ``--experiments=pre_optimize=...`` wins.
    """
    debug = opts.view_as(DebugOptions)
    if debug.lookup_experiment("pre_optimize") is None:
        debug.add_experiment("pre_optimize=all")


def make_runner(opts: PipelineOptions):
    name = opts.view_as(StandardOptions).runner
    if name == LOCAL_RUNNER:
        # freed run-sized buffers go back to the system (dicom_deid.memory; the workers start
        # trimming in ReadDicom's setup)
        memory.configure_local_run()
        # Beam's FnApiRunner; its workers leave without interpreter finalisation (local_runner)
        from .local_runner import LocalRunner
        # FnApiRunner() alone gives its multi-processing workers *no* pipeline options
        # (Beam 2.77): hand them ours (storage endpoints, --beam_plugins, log level)
        return LocalRunner(provision_info=storage.worker_provision_info(opts))
    return None  # Beam resolves the runner named in the options


def stop_job_servers() -> None:
    """Stop the job servers Beam started for portable runs (Flink's is a JVM).

    Beam stops them only at interpreter exit (an ``atexit`` handler), which the CLI skips
    (``os._exit``, see ``cli.entry``): without this every Flink run left its job server running.
    """
    mod = sys.modules.get("apache_beam.runners.portability.job_server")
    if mod is None:
        return
    import gc
    for obj in gc.get_objects():
        if isinstance(obj, mod.StopOnExitJobServer):
            try:
                obj.stop()
            except Exception:  # noqa: BLE001 - best effort on the way out; nothing identifying
                log.warning("could not stop a Beam job server (%s)", type(obj).__name__)


def is_local_runner(opts: PipelineOptions) -> bool:
    return opts.view_as(StandardOptions).runner == LOCAL_RUNNER


def build(p: beam.Pipeline, cfg: RunConfig, progress_dir: Optional[str] = None, pseudonyms=None) -> dict:
    """Add the whole de-identification graph to ``p``; return its named PCollections (lists
    where a thing is written in several parts)."""
    run = cfg.run
    refs = p | "MatchInputs" >> MatchInputs(cfg.inputs)
    recovered = None
    if cfg.incremental:  # skip what earlier runs finished; recover rows of interrupted runs
        skipped = refs | "SkipFinished" >> incremental.SkipFinished(run, cfg.key_ref, cfg.policy.label)
        refs, recovered = skipped[MAIN], skipped[OUTCOME]
    settings = PseudonymSettings.from_run_config(cfg)
    require_entry = pseudonyms is None
    direct = pseudonyms is None and not settings.needs_scan
    if direct:
        # plain HMAC run: every entry is the store's or the derivation, so no input is
        # scanned first; the map holds only the store's exceptions, and the new patients
        # reach the store before anything is published (CommitNewPatients)
        known = p | "ReadPseudonymStore" >> StoreOverrides(cfg.key_ref, settings)
        pseudonyms, require_entry = known[PSEUDONYM_MAP], False
    elif pseudonyms is None:
        # stage 1: header scan -> pseudonym map (store, lookup table, exclusions; HMACs only)
        scanned = refs | "ScanHeaders" >> ScanHeaders(cfg.key_ref, cfg.policy.person_key)
        pseudonyms = (scanned | "BuildPseudonymMap" >> BuildPseudonymMap(
            run, cfg.key_ref, settings))[PSEUDONYM_MAP]
    # barrier: reading starts once the map is complete, so ReadDicom and DeidentifyTags fuse
    # into one stage after it (without it a runner would split them and try to encode the
    # objects, which their coder refuses); only FileRefs are materialised in between
    map_size = pseudonyms | "PseudonymMapSize" >> beam.combiners.Count.Globally()
    refs = refs | "AfterPseudonymMap" >> beam.Map(lambda ref, _n: ref, beam.pvalue.AsSingleton(map_size))
    read = refs | "ReadDicom" >> ReadDicom(run, cfg.key_ref, cfg.max_input_bytes)
    tagged = read[MAIN] | "DeidentifyTags" >> DeidentifyTags(run, cfg.policy, cfg.key_ref, pseudonyms,
                                                             require_entry=require_entry, report_new=direct)
    store_done = None
    if direct:
        store_done = ({"new": tagged[NEW_PATIENTS], "store": known[PSEUDONYM_STORE]}
                      | "CommitNewPatients" >> CommitNewPatients(run, cfg.key_ref, settings))[STORE_DONE]
    pixels = tagged[MAIN] | "CleanPixels" >> CleanPixels(run, cfg.policy)
    attach = pixels[MAIN] | "CleanAttachments" >> CleanAttachments(run, cfg.policy)
    verified = attach[MAIN] | "VerifyNoPHI" >> VerifyNoPHI(run)
    written = verified[MAIN] | "WriteDicom" >> WriteDicom(run, after=store_done)

    stages = (read, tagged, pixels, attach, verified)
    stage_parts = [s[OUTCOME] for s in stages] + [written[STAGING_OUTCOME]]
    if cfg.incremental:
        stage_parts.append(recovered)
        # recorded where each decision is made (before the Flatten), so it is durable early
        incremental.record_all(
            {**{f"Stage{i}": s[OUTCOME] for i, s in enumerate(stages)},
             "Staging": written[STAGING_OUTCOME],
             "Committed": written[OUTCOME],
             "Recovered": recovered}, run, cfg.policy.label)
        # one manifest writer after every part: an interrupted run publishes its rows only at
        # its end, and the run that resumes it writes them again from the record
        outcomes = [(stage_parts + [written[OUTCOME]]) | "AllOutcomes" >> beam.Flatten()]
        writers = {"WriteManifest": (outcomes[0], WriteManifest(run, progress_dir))}
    else:
        # the committed rows (nearly every row of a run) are written where Commit makes them,
        # so they never pass through the runner again (it holds every collection that crosses
        # a stage in memory); the stages' rows (failures, quarantines, skips) meet in a
        # Flatten fused with the stages that make them
        stage_rows = stage_parts | "StageOutcomes" >> beam.Flatten()
        outcomes = [stage_rows, written[OUTCOME]]
        writers = {"WriteManifest": (stage_rows, WriteManifest(run, progress_dir, part="stages")),
                   "WriteCommittedManifest": (written[OUTCOME],
                                              WriteManifest(run, progress_dir, part="committed"))}
    dead = ([s[DEAD_LETTER] for s in stages] + [written[DEAD_LETTER]]) | "AllDeadLetters" >> beam.Flatten()
    writers["WriteDeadLetters"] = (dead, WriteDeadLetters(run))
    # the commit's own (rare) failures, written where they happen (no Flatten across stages)
    writers["WriteCommitDeadLetters"] = (written[COMMIT_DEAD_LETTER], WriteDeadLetters(run, part="commit"))
    writers["WriteLinkage"] = (written[LINKAGE], WriteLinkage(run))
    # every sink's parts become visible together, in one step after everything else
    parts = [pcoll | label >> writer for label, (pcoll, writer) in writers.items()]
    files = ((parts | "AllParts" >> beam.Flatten())
             | "PublishFiles" >> PublishFiles([w.sink for _, w in writers.values()]))
    # files: one (sink name, [published URIs]) per sink, once the run's files are published
    return {"outcomes": outcomes, "dead_letters": [dead, written[COMMIT_DEAD_LETTER]], "files": files}


def count_inputs(patterns) -> Optional[int]:
    try:
        return storage.count(patterns)  # streamed: no list of every name
    except Exception:
        return None


class Progress:
    """Prints ``done/total, rate, ETA`` from the workers' side channel."""

    def __init__(self, total: Optional[int], stream=None, interval: float = 2.0):
        self.dir = tempfile.mkdtemp(prefix="dicom-deid-progress-")
        self.total, self.stream, self.interval = total, stream or sys.stderr, interval
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def done(self) -> int:
        n = 0
        for name in os.listdir(self.dir):
            try:
                n += os.path.getsize(os.path.join(self.dir, name))
            except OSError:
                pass
        return n

    def line(self) -> str:
        n = self.done()
        dt = max(time.monotonic() - self._t0, 1e-6)
        rate = n / dt
        if self.total:
            eta = (self.total - n) / rate if rate > 0 else float("nan")
            eta_s = f"{eta:,.0f}s" if eta == eta else "?"
            return f"progress: {n}/{self.total} objects, {rate:,.1f}/s, ETA {eta_s}"
        return f"progress: {n} objects, {rate:,.1f}/s"

    def _loop(self):
        last = None
        while not self._stop.wait(self.interval):
            text = self.line()
            if text != last:
                print(text, file=self.stream, flush=True)
                last = text

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        print(self.line() + " (done)", file=self.stream, flush=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def cleanup_staging(cfg: RunConfig) -> None:
    staging = cfg.run.staging_dir()
    try:
        if "://" not in staging:
            shutil.rmtree(staging, ignore_errors=True)
            parent = os.path.dirname(staging)
            if os.path.isdir(parent) and not os.listdir(parent):
                os.rmdir(parent)
        else:
            storage.delete_prefix(staging)
    except Exception:  # leftover staging never affects published outputs
        log.warning("could not remove the staging prefix of run %s", cfg.run_id)
    cleanup_sink_temps(cfg)


def cleanup_sink_temps(cfg: RunConfig) -> None:
    """Remove sink temp folders (``beam-temp-*``) left under this run's manifest, linkage and
    dead-letter folders (a publish that failed, or folders of a version that used Beam's
    sinks). Called only after the job finished, and only inside this run's own folders."""
    run = cfg.run
    for folder in (run.manifest_dir(), run.private_dir("linkage"), run.private_dir("dead_letters")):
        try:
            if "://" not in folder:
                if os.path.isdir(folder):
                    for name in os.listdir(folder):
                        if name.startswith("beam-temp-"):
                            path = os.path.join(folder, name)
                            if os.path.isdir(path):
                                shutil.rmtree(path, ignore_errors=True)
                            else:
                                os.unlink(path)
            else:
                storage.delete_prefix(folder.rstrip("/") + "/beam-temp-")
        except Exception:
            log.warning("could not remove temporary sink files of run %s", cfg.run_id)


def run(cfg: RunConfig, beam_args: Sequence[str] = (), stream=None) -> dict:
    """Run the pipeline to completion; return the run summary (also written as JSON)."""
    stream = stream or sys.stderr
    # storage: workers import dicom_deid.storage at start-up (anonymous GCS against an
    # emulator or with --no_auth, no credential search); the launcher uses the same options
    opts = pipeline_options(list(beam_args) + storage.beam_plugin_args(beam_args))
    FileSystems.set_options(opts)
    storage.configure(opts)
    for warning in storage.check_patterns(cfg.inputs):  # a missing path: ConfigError (exit 2)
        print(warning, file=stream)
    local = is_local_runner(opts)
    if cfg.policy.unapplied_options:
        print(f"note: policy {cfg.policy.label} names options this version cannot apply yet: "
              f"{', '.join(cfg.policy.unapplied_options)} (recorded per object; --strict refuses)",
              file=stream)
    # a store built with another key is refused before anything runs (a new key is a new
    # pseudonym space); a new store records this key's fingerprint
    from .. import keys as keys_mod, pseudonyms as pseudonyms_mod
    sdir = pseudonyms_mod.store_dir(cfg.private)
    # one run at a time per pseudonym store: a lease this launcher renews while it waits for
    # the job (another run waits, then fails naming the holder's run id; see StoreLock)
    lock = pseudonyms_mod.StoreLock(sdir, cfg.run_id).acquire(
        notify=lambda m: print(m, file=stream), require_exclusive=cfg.policy.strategy == "sequential")
    lease = None
    try:
        # remove what stopped runs left (their staging); this run's lease marks it alive
        lease = housekeeping.start_run(cfg.output, cfg.private, cfg.run_id, lambda m: print(m, file=stream))
        pseudonyms_mod.check_store(sdir, keys_mod.Deriver(keys_mod.resolve(cfg.key_ref)).key_fingerprint())
        progress = Progress(None, stream) if (local and cfg.progress) else None
        if progress and not cfg.incremental:  # counted beside the run: listing never delays it
            threading.Thread(target=lambda: setattr(progress, "total", count_inputs(cfg.inputs)),
                             daemon=True).start()
        t0 = time.time()
        p = beam.Pipeline(runner=make_runner(opts), options=opts)
        build(p, cfg, progress.dir if progress else None)
        if progress:
            with progress:
                result = p.run()
                result.wait_until_finish()
        else:
            result = p.run()
            result.wait_until_finish()
    finally:
        lock.release()
        if lease is not None:
            lease.stop()
    cleanup_staging(cfg)
    summary = summary_mod.summarize(cfg, time.time() - t0, runner=LOCAL_RUNNER if local else type(p.runner).__name__,
                                    running_mode=opts.view_as(DirectOptions).direct_running_mode if local else None,
                                    num_workers=opts.view_as(DirectOptions).direct_num_workers if local else None)
    if cfg.incremental:
        summary["incremental"] = incremental.summary_counts(result)
    summary_mod.write(cfg, summary)
    if cfg.incremental:  # the manifest is published: later runs need not recover its rows
        incremental.mark_complete(cfg.run, summary)
        incremental.commit_compaction(cfg.run)  # if this run compacted the record
    return summary


__all__ = ["build", "run", "pipeline_options", "json"]
