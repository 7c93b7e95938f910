"""The de-identification pipeline: ``build`` assembles it, ``run`` runs it.

::

    patterns -> MatchInputs (FileRef, Reshuffle) -> ReadDicom -> DeidentifyTags <- pseudonym map
        -> CleanPixels -> CleanAttachments -> VerifyNoPHI -> WriteDicom (stage, group by new
        SOP UID, commit)
    every stage: main + outcome + dead_letter -> WriteManifest (public) / WriteDeadLetters,
    WriteLinkage (private)
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
from apache_beam.options.pipeline_options import (DirectOptions, PipelineOptions, WorkerOptions,
                                                  StandardOptions)

from .. import summary as summary_mod
from ..options import RunConfig
from ..transforms.attachments import CleanAttachments
from ..transforms.common import DEAD_LETTER, MAIN, OUTCOME
from ..transforms.pixels import CleanPixels
from ..transforms.read import MatchInputs, ReadDicom
from ..transforms.sinks import WriteDeadLetters, WriteLinkage, WriteManifest
from ..transforms.tags import DeidentifyTags
from ..transforms.verify import VerifyNoPHI
from ..transforms.write import LINKAGE, WriteDicom

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
    return opts


def make_runner(opts: PipelineOptions):
    name = opts.view_as(StandardOptions).runner
    if name == LOCAL_RUNNER:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner
        return FnApiRunner()
    return None  # Beam resolves the runner named in the options


def is_local_runner(opts: PipelineOptions) -> bool:
    return opts.view_as(StandardOptions).runner == LOCAL_RUNNER


def build(p: beam.Pipeline, cfg: RunConfig, progress_dir: Optional[str] = None, pseudonyms=None) -> dict:
    """Add the whole de-identification graph to ``p``; return its named PCollections."""
    run = cfg.run
    if pseudonyms is None:
        pseudonyms = p | "EmptyPseudonymMap" >> beam.Create([]).with_output_types(tuple[str, dict])
    refs = p | "MatchInputs" >> MatchInputs(cfg.inputs)
    read = refs | "ReadDicom" >> ReadDicom(run, cfg.key_ref, cfg.max_input_bytes)
    tagged = read[MAIN] | "DeidentifyTags" >> DeidentifyTags(run, cfg.policy, cfg.key_ref, pseudonyms)
    pixels = tagged[MAIN] | "CleanPixels" >> CleanPixels(run, cfg.policy)
    attach = pixels[MAIN] | "CleanAttachments" >> CleanAttachments(run, cfg.policy)
    verified = attach[MAIN] | "VerifyNoPHI" >> VerifyNoPHI(run)
    written = verified[MAIN] | "WriteDicom" >> WriteDicom(run)

    stages = (read, tagged, pixels, attach, verified)
    outcomes = ([s[OUTCOME] for s in stages] + [written[OUTCOME]]) | "AllOutcomes" >> beam.Flatten()
    dead = ([s[DEAD_LETTER] for s in stages] + [written[DEAD_LETTER]]) | "AllDeadLetters" >> beam.Flatten()
    manifest_files = outcomes | "WriteManifest" >> WriteManifest(run, progress_dir)
    dead_files = dead | "WriteDeadLetters" >> WriteDeadLetters(run)
    linkage_files = written[LINKAGE] | "WriteLinkage" >> WriteLinkage(run)
    return {"outcomes": outcomes, "dead_letters": dead, "manifest": manifest_files,
            "dead_letter_files": dead_files, "linkage_files": linkage_files}


def count_inputs(patterns) -> Optional[int]:
    try:
        return sum(len(r.metadata_list) for r in FileSystems.match(list(patterns)))
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
        elif FileSystems.exists(staging + "/"):
            FileSystems.delete([staging + "/"])
    except Exception:  # leftover staging never affects published outputs
        log.warning("could not remove the staging prefix of run %s", cfg.run_id)


def run(cfg: RunConfig, beam_args: Sequence[str] = (), stream=None) -> dict:
    """Run the pipeline to completion; return the run summary (also written as JSON)."""
    stream = stream or sys.stderr
    opts = pipeline_options(beam_args)
    local = is_local_runner(opts)
    if cfg.policy.unapplied_options:
        print(f"note: policy {cfg.policy.label} names options this version cannot apply yet: "
              f"{', '.join(cfg.policy.unapplied_options)} (recorded per object; --strict refuses)",
              file=stream)
    progress = Progress(count_inputs(cfg.inputs), stream) if (local and cfg.progress) else None
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
    cleanup_staging(cfg)
    summary = summary_mod.summarize(cfg, time.time() - t0, runner=type(p.runner).__name__,
                                    running_mode=opts.view_as(DirectOptions).direct_running_mode if local else None,
                                    num_workers=opts.view_as(DirectOptions).direct_num_workers if local else None)
    summary_mod.write(cfg, summary)
    return summary


__all__ = ["build", "run", "pipeline_options", "json"]
