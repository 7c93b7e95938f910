#!/usr/bin/env python
"""Run the ``dicom-deid`` CLI and record when each stage of the local runner ran.

Usage: ``python benchmarks/stage_times.py OUT.jsonl run --input ... [CLI arguments]``

Appends one JSON line per executed stage bundle to ``OUT.jsonl``: ``{"stage", "start",
"end"}`` in seconds since this process started (``time.perf_counter``), plus a first line
``{"event": "start"}`` and, if the run returns, a last one ``{"event": "run_returned"}``.
The timing wraps ``FnApiRunner._execute_bundle`` (Beam 2.77), which runs one stage's bundle
on all workers and returns when every worker has answered, so a stage's time is the
slowest worker's. ``throughput.py`` uses it to split a run into the start-up before the
main stage (the one that reads and de-identifies every object), the main stage itself and
what follows it. Nothing here changes what the pipeline does.
"""

from __future__ import annotations

import json
import sys
import time

T0 = time.perf_counter()


def main() -> None:
    out_path, argv = sys.argv[1], sys.argv[2:]
    out = open(out_path, "a", buffering=1)

    def emit(**rec) -> None:
        out.write(json.dumps(rec) + "\n")

    emit(event="start", at=0.0)
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    original = fn_runner.FnApiRunner._execute_bundle

    def timed(self, context, bundle_context_manager, bundle_input):
        start = time.perf_counter() - T0
        try:
            return original(self, context, bundle_context_manager, bundle_input)
        finally:
            emit(stage=bundle_context_manager.stage.name[:300], start=start,
                 end=time.perf_counter() - T0)

    fn_runner.FnApiRunner._execute_bundle = timed
    from dicom_deid import cli
    sys.argv = ["dicom-deid", *argv]
    rc = cli.main(argv)
    emit(event="run_returned", at=time.perf_counter() - T0, returncode=rc)
    out.close()
    sys.stdout.flush()
    sys.stderr.flush()
    import os
    os._exit(rc)  # as cli.entry: no interpreter teardown


def split(path: str) -> dict:
    """Start-up before the main stage, the main stage and the rest, from a stage log.

    ``before_main_s`` counts from this wrapper's first line (the interpreter's own start,
    a few tens of ms, is not in it); ``after_main_s`` ends when the CLI's run returned.
    """
    stages, returned = [], None
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if "stage" in rec:
                stages.append(rec)
            elif rec.get("event") == "run_returned":
                returned = rec["at"]
    if not stages:
        return {}
    main = max(stages, key=lambda r: r["end"] - r["start"])
    return {
        "stages": len(stages),
        "before_main_s": main["start"],
        "main_stage_s": main["end"] - main["start"],
        "after_main_s": (returned - main["end"]) if returned is not None else None,
        "first_stage_s": stages[0]["end"] - stages[0]["start"],
        "other_stages_s": sum(r["end"] - r["start"] for r in stages if r is not main),
        "main_stage_name": main["stage"][:120],
    }


if __name__ == "__main__":
    main()
