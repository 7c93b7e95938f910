"""Validated run configuration: the edge between argv and the pipeline.

Everything a pipeline needs is in :class:`RunConfig`; Beam options stay as their own list
and pass through untouched (any runner, any runner option).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import secrets
from typing import Optional

from . import __version__, keys, manifest
from . import policy as policy_mod
from .errors import ConfigError

DEFAULT_MAX_INPUT_BYTES = 8 * 1024 ** 3


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _absolute_key_file(key: str) -> str:
    """A key file path made absolute at the edge: workers resolve the reference in their own
    working directory (a Flink worker pool's or TaskManager's), not the launcher's."""
    if key.startswith("env:") or "://" in key:
        return key
    path = key[5:] if key.startswith("file:") else key
    return os.path.abspath(os.path.expanduser(path))


@dataclasses.dataclass(frozen=True)
class RunConfig:
    inputs: tuple[str, ...]
    output: str
    private: str
    policy: policy_mod.Policy
    key_ref: keys.KeyRef
    run_id: str
    strict: bool = False
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES
    progress: bool = True
    key_created: bool = False
    #: private user tables (URIs): research IDs (lookup) and opt-outs (exclusions)
    lookup_table: Optional[str] = None
    exclusions: Optional[str] = None
    #: skip inputs finished before with the same version; record finished inputs (resumable)
    incremental: bool = False
    #: "auto": direct map where the strategy allows (pseudonyms.Settings.needs_scan);
    #: "scan": always scan every header first (the store lock is then held only for that)
    pseudonym_map: str = "auto"

    @property
    def run(self) -> manifest.RunInfo:
        return manifest.RunInfo(run_id=self.run_id, policy_name=self.policy.name,
                                policy_version=self.policy.version, pipeline_version=__version__,
                                output=self.output, private=self.private)


def new_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def _norm(prefix: str) -> str:
    prefix = prefix.rstrip("/") or "/"
    if _is_local(prefix):
        p = prefix[7:] if prefix.startswith("file://") else prefix
        return os.path.abspath(p)
    return prefix


def make_config(inputs, output: str, private: str, policy: Optional[str] = None,
                key: Optional[str] = None, strict: bool = False, run_id: Optional[str] = None,
                max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES, progress: bool = True,
                create_key: bool = True, lookup_table: Optional[str] = None,
                exclusions: Optional[str] = None, incremental: bool = False,
                pseudonym_map: str = "auto") -> RunConfig:
    if not inputs:
        raise ConfigError("at least one --input pattern is required")
    output, private = _norm(output), _norm(private)
    if output == private or private.startswith(output + "/") or output.startswith(private + "/"):
        raise ConfigError("--output and --private must be separate prefixes (neither inside the other)")
    pol = policy_mod.load(policy)
    if strict and pol.unapplied_options:
        raise ConfigError(f"--strict: policy {pol.label} names options this version cannot apply: "
                          f"{', '.join(pol.unapplied_options)}")
    created = False
    if key:
        key_ref = keys.KeyRef(_absolute_key_file(key))
    else:
        if not _is_local(private):
            raise ConfigError("no --key given and the private prefix is not local: refusing to invent "
                              "a key for a shared run (pass --key FILE or env:VAR)")
        if not create_key:
            raise ConfigError("no --key given")
        key_ref, created = keys.ensure_local_key()
    # resolve once at the edge so a bad reference fails before the pipeline starts;
    # the bytes are dropped here and resolved again on each worker
    keys.resolve(key_ref)
    if max_input_bytes <= 0:
        raise ConfigError("--max-input-bytes must be positive")
    # pseudonym tables: present and usable before anything runs (messages name rows only)
    from . import pseudonyms
    lookup_table = _norm(lookup_table) if lookup_table else None
    exclusions = _norm(exclusions) if exclusions else None
    if pol.strategy == "lookup" and not lookup_table:
        raise ConfigError(f"policy {pol.label} uses pseudonym strategy 'lookup': pass --lookup-table FILE")
    pseudonyms.validate_tables(lookup_table, exclusions)
    if pseudonym_map not in ("auto", "scan"):
        raise ConfigError("--pseudonym-map must be auto or scan")
    # local patterns made absolute here, not on workers (another working directory); an
    # input's identity (input_key) is its canonical URI: see storage.canonical_uri
    from . import storage
    inputs = tuple(storage.canonical_pattern(p) for p in inputs)
    return RunConfig(inputs=inputs, output=output, private=private, policy=pol,
                     key_ref=key_ref, run_id=run_id or new_run_id(), strict=strict,
                     max_input_bytes=max_input_bytes, progress=progress, key_created=created,
                     lookup_table=lookup_table, exclusions=exclusions, incremental=incremental,
                     pseudonym_map=pseudonym_map)
