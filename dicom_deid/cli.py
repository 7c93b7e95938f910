"""Command line: ``dicom-deid run | demo``.

``main(argv)`` parses and dispatches; ``parse_run(argv)`` only parses and validates, so
tests can check arguments without running a pipeline. Unknown ``--options`` are Beam
pipeline options and pass through untouched (``--runner``, ``--flink_master``...).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from . import __version__
from .errors import ConfigError


def _run_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="de-identify DICOM objects",
                       description="De-identify DICOM objects matching file patterns. Any option not "
                                   "listed here is passed to Apache Beam (e.g. --runner FlinkRunner).")
    p.add_argument("--input", nargs="+", required=True, metavar="PATTERN",
                   help="file patterns: local paths, gs://, s3://; recursive globs (**) allowed")
    p.add_argument("--output", required=True, metavar="PREFIX", help="public prefix for objects and manifest")
    p.add_argument("--private", required=True, metavar="PREFIX",
                   help="private prefix: linkage table and dead letters (separate bucket in production)")
    p.add_argument("--policy", default="basic", metavar="NAME|FILE", help="built-in policy name or file")
    p.add_argument("--key", default=None, metavar="REF",
                   help="key reference: a file path or env:VAR. Without it a local run creates one "
                        "in the user's config directory")
    p.add_argument("--strict", action="store_true",
                   help="refuse to run when the policy names options this version cannot apply")
    p.add_argument("--max-input-bytes", type=int, default=None, metavar="N",
                   help="inputs larger than this become dead letters (default 8 GiB)")
    p.add_argument("--lookup-table", default=None, metavar="FILE",
                   help="private CSV/Parquet: nhs_number or patient_id[,issuer] -> research_id "
                        "[,date_offset_days]; wins over derived pseudonyms (hashed when loaded)")
    p.add_argument("--exclusions", default=None, metavar="FILE",
                   help="private CSV/Parquet of nhs_number and/or patient_id[,issuer] (opt-outs): "
                        "matching objects are not processed (manifest status 'excluded')")
    p.add_argument("--incremental", action="store_true",
                   help="skip inputs an earlier --incremental run finished with the same version "
                        "(generation/ETag, else size+mtime); record finished inputs under the private "
                        "prefix so a killed run resumes")
    p.add_argument("--pseudonym-map", choices=("auto", "scan"), default="auto",
                   help="auto (default): plain HMAC runs build no map first (one read per input, "
                        "processing starts at once, the store lock is held until the run's new "
                        "patients are stored); scan: read every header first, as sequential IDs, "
                        "lookup tables and exclusions always do (the lock is held only for that)")
    p.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-deid", description="De-identify DICOM at scale.")
    parser.add_argument("--version", action="version", version=f"dicom-deid {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    ps = sub.add_parser("policy", help="policy tools")
    psub = ps.add_subparsers(dest="policy_command", required=True)
    show = psub.add_parser("show", help="print the effective action for every Table E.1-1 attribute")
    show.add_argument("--policy", default="basic", metavar="NAME|FILE")
    show.add_argument("--format", choices=("text", "markdown"), default="text")
    ins = sub.add_parser("inspect", help="show what would happen to each attribute of one file (writes nothing)")
    ins.add_argument("file")
    ins.add_argument("--policy", default="basic", metavar="NAME|FILE")
    ins.add_argument("--key", default=None, metavar="REF", help="key reference (default: the local key)")
    ins.add_argument("--show-values", action="store_true",
                     help="also print original values: THESE ARE PHI, do not paste them anywhere")
    lk = sub.add_parser("link", help="linkage tools (private data: run where the private prefix lives)")
    lsub = lk.add_subparsers(dest="link_command", required=True)
    le = lsub.add_parser("export", help="write mapping CSVs (patients, UIDs, files) from the linkage "
                                        "table and the pseudonym store")
    le.add_argument("--private", required=True, metavar="PREFIX", help="the run's private prefix")
    le.add_argument("--out", required=True, metavar="DIR", help="local folder for the CSVs (private!)")
    le.add_argument("--run-id", default=None, help="only this run (default: every run, latest wins)")
    g = sub.add_parser("gc", help="remove what stopped (killed) runs left: staging, temporary sink files, "
                                  "uncommitted record compactions; never a live run's",
                       description="Remove what stopped runs left under an output prefix (and private "
                                   "prefix). A run is stopped when its launcher process is gone (same "
                                   "machine) or its lease was not renewed for --stale-after. Other "
                                   "options (e.g. --s3_endpoint_url) go to Beam's file systems.")
    g.add_argument("--output", required=True, metavar="PREFIX", help="the runs' public prefix")
    g.add_argument("--private", default=None, metavar="PREFIX", help="the runs' private prefix (optional)")
    g.add_argument("--stale-after", default=None, metavar="DURATION",
                   help="a lease not renewed for this long is a stopped run's: 90s, 30m, 6h, 2d "
                        "(default 6h; never less than 3 heartbeats of that run)")
    g.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    d = sub.add_parser("demo", help="make sample data with fake identifiers and de-identify it")
    d.add_argument("--dir", default="demo-output", help="where to put sample data and results")
    d.add_argument("--files", type=int, default=24)
    return parser


def parse_run(argv: Sequence[str]):
    """Parse ``run`` arguments -> (RunConfig, beam_args). Builds nothing, runs nothing."""
    from .options import DEFAULT_MAX_INPUT_BYTES, make_config
    parser = build_parser()
    args, beam_args = parser.parse_known_args(["run", *argv])
    cfg = make_config(args.input, args.output, args.private, policy=args.policy, key=args.key,
                      strict=args.strict, run_id=args.run_id,
                      max_input_bytes=args.max_input_bytes or DEFAULT_MAX_INPUT_BYTES,
                      progress=not args.no_progress, lookup_table=args.lookup_table,
                      exclusions=args.exclusions, incremental=args.incremental,
                      pseudonym_map=args.pseudonym_map)
    return cfg, beam_args


def cmd_run(argv: Sequence[str]) -> int:
    from .pipelines import deidentify
    from .summary import format_text
    cfg, beam_args = parse_run(argv)
    if cfg.key_created:
        print(f"note: no --key given; created a new key at {cfg.key_ref.ref} (owner-only). "
              "Keep it: the same key gives the same pseudonyms and UIDs in later runs.", file=sys.stderr)
    summary = deidentify.run(cfg, beam_args)
    print(format_text(summary))
    return 0


def cmd_demo(args) -> int:
    from . import sample
    from .pipelines import deidentify
    from .summary import format_text
    from .options import make_config
    import pyarrow.parquet as pq

    root = os.path.abspath(args.dir)
    data = os.path.join(root, "input")
    s = sample.generate(__import__("pathlib").Path(data), n_files=args.files)
    print(f"demo: generated {len(s.files)} sample files with fake identifiers in {data}")
    cfg = make_config([data + "/**"], os.path.join(root, "output"), os.path.join(root, "private"))
    if cfg.key_created:
        print(f"demo: created a key at {cfg.key_ref.ref}")
    summary = deidentify.run(cfg, [])
    print(format_text(summary))
    t = pq.read_table(cfg.run.manifest_dir())
    cols = ["status", "reason", "modality", "pseudo_patient_id", "output_path"]
    print("\nmanifest (first rows):")
    for r in t.select(cols).slice(0, 5).to_pylist():
        out = r["output_path"] or ""
        r["output_path"] = os.path.relpath(out, root) if out else None
        print("  " + "  ".join(f"{k}={v}" for k, v in r.items()))
    print(f"\nlook at: {cfg.output} (de-identified objects), {cfg.run.manifest_dir()} (manifest), "
          f"{cfg.private} (private: linkage, dead letters)")
    return 0


def cmd_gc(argv: Sequence[str]) -> int:
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions
    from . import housekeeping, storage
    from .options import _norm
    args, beam_args = build_parser().parse_known_args(["gc", *argv])
    try:
        stale = housekeeping.parse_duration(args.stale_after) if args.stale_after else None
    except ValueError:
        raise ConfigError("--stale-after: a duration such as 90s, 30m, 6h or 2d") from None
    opts = PipelineOptions(list(beam_args))
    FileSystems.set_options(opts)
    storage.configure(opts)
    rep = housekeeping.collect(_norm(args.output), _norm(args.private) if args.private else None,
                               stale_after=stale, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"gc: {len(rep['runs_stopped'])} stopped run(s) {', '.join(rep['runs_stopped']) or ''}".rstrip()
          + f"; {len(rep['runs_live'])} live run(s) left alone"
          + f"; {verb} {rep['staged_objects_removed']} staged object(s), "
          f"{rep['sink_temp_objects_removed']} temporary sink file(s), "
          f"{rep['uncommitted_compactions_removed']} uncommitted record compaction file(s)")
    return 0


def _quiet_logs() -> None:
    import logging
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("apache_beam", "root"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    from . import beamlogs
    beamlogs.drop_not_applicable()  # Beam's start-up lines that do not apply to this pipeline


def cmd_inspect(args) -> int:
    from pydicom.datadict import keyword_for_tag
    from . import keys, policy as policy_mod, reader, tags
    from .element import InputRef
    pol = policy_mod.load(args.policy)
    key_ref = keys.KeyRef(args.key) if args.key else keys.ensure_local_key()[0]
    key = keys.resolve(key_ref)
    d = keys.Deriver(key, pol.date_offset_days)
    with open(args.file, "rb") as f:
        data = f.read()
    obj = reader.parse(InputRef(args.file, d.input_key(args.file)), d, data=data)
    log: list = []
    if args.show_values:
        print("WARNING: original values below are identifying (PHI).", file=sys.stderr)
    tags.deidentify(obj, tags.compile_rules(pol, key), log=log, show_values=args.show_values)
    name = lambda t: keyword_for_tag(t) or f"({t >> 16:04X},{t & 0xFFFF:04X})"  # noqa: E731
    print(f"{args.file}: policy {pol.label}; {len(log)} attributes")
    for path, tag, vr, action, value in log:
        where = " > ".join(name(p) for p in path + (tag,))
        line = f"  {where:<70} {vr:<3} {action}"
        if args.show_values and value is not None:
            line += f"   {value}"
        print(line)
    c = obj.facts
    print(f"removed={c['attrs_removed']} emptied={c['attrs_emptied']} replaced={c['attrs_replaced']} "
          f"cleaned={c['attrs_cleaned']} kept={c['attrs_kept']}")
    return 0


def policy_table(name: str, fmt: str = "text") -> str:
    from . import policy as policy_mod, tags
    pol = policy_mod.load(name)
    rows = tags.effective_actions(pol)
    head = f"policy {pol.label}: options applied: {', '.join(pol.applied_options) or 'none'}"
    if pol.unapplied_options:
        head += f"; not applied yet: {', '.join(pol.unapplied_options)}"
    if fmt == "markdown":
        lines = [head, "", "| tag | attribute | basic | action | note |", "|---|---|---|---|---|"]
        lines += [f"| {r['tag']} | {r['name']} | {r['basic']} | {r['action']} | {r['note']} |" for r in rows]
    else:
        lines = [head] + [f"{r['tag']:<32} {r['action']:<7} {r['name'][:60]:<60} {r['note']}".rstrip()
                          for r in rows]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_logs()
    try:
        if argv and argv[0] == "run":
            return cmd_run(argv[1:])
        if argv and argv[0] == "gc":
            return cmd_gc(argv[1:])
        args = build_parser().parse_args(argv)
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "inspect":
            return cmd_inspect(args)
        if args.command == "policy" and args.policy_command == "show":
            print(policy_table(args.policy, args.format))
            return 0
        if args.command == "link" and args.link_command == "export":
            from . import linkage
            counts = linkage.export(args.private, args.out, run_id=args.run_id)
            print("link export: " + ", ".join(f"{name}: {n} rows" for name, n in counts.items())
                  + f" -> {args.out} (private data)")
            return 0
        return 2
    except ConfigError as exc:
        print(f"dicom-deid: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0


def entry() -> None:  # pragma: no cover - the console script and ``python -m``
    """Run ``main`` and leave without interpreter teardown: gRPC threads of Beam's runner
    can abort the process ("terminate called without an active exception") while Python
    finalises, after every output is written, turning a good run into exit code -6."""
    try:
        code = main()
    except SystemExit as exc:  # argparse's --help/--version/usage errors
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    pipelines = sys.modules.get("dicom_deid.pipelines.deidentify")
    if pipelines is not None:  # Beam stops a portable run's job server only at exit: do it here
        pipelines.stop_job_servers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
