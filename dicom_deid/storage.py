"""Object storage I/O: ``gs://``, ``s3://`` and local paths, without Beam transforms.

What the pipeline needs from a store, done the same way on every scheme:

* :func:`iter_objects` lists a Beam file pattern (``*``, ``**``, ``?``, ``[...]``) page by
  page as :class:`ObjectInfo` (URI, size, the store's version: GCS generation, S3 ETag,
  else size and mtime). Nothing is collected: 100,000 names are never held in a list.
  :func:`plan_listing` + :func:`iter_task` split the same listing into folder / key-prefix
  tasks that different workers list in parallel (same objects, each listed once).
* :func:`fetch` reads a whole object, small ones into memory, large ones streamed to a local
  temp file in ranged chunks (each chunk retried on its own, so a dropped connection costs
  one chunk, not the object); :func:`read_head` reads only the first bytes.
* :func:`write_bytes` is one upload (atomic on object stores; local: temp name + rename);
  :func:`copy` is a server-side copy, atomic at its destination.

Errors are split once, here (:func:`classify`):

* **transient** (HTTP 408/429/5xx, dropped connections, timeouts) are retried with
  exponential backoff and jitter; when retries run out :class:`~dicom_deid.errors.StorageError`
  propagates so the runner retries the bundle;
* **permanent for one object**: 404 -> :class:`ObjectNotFound`, 401/403 ->
  :class:`AccessDenied`, anything else the store refuses -> :class:`StorageRefused`. They are
  :class:`~dicom_deid.errors.DeidError` subclasses: a dead letter for that object only.

Messages never carry a URI or a store's message (object names may contain names): every
exception raised from here has fixed text and no chained cause.

Clients are built per process from the Beam pipeline options the worker was given
(``FileSystems`` options): ``--s3_endpoint_url``, ``--s3_region_name``,
``--s3_access_key_id``... for S3 (else boto3's usual environment chain). For GCS,
``STORAGE_EMULATOR_HOST`` (an emulator) or Beam's ``--no_auth`` mean *anonymous*: neither
our client nor Beam's own ``GcsIO`` then looks for default credentials (which, on a machine
without any, costs ~20 s of retries per worker process). :func:`configure` applies that to
Beam's credential cache; this module is also imported by every worker at start-up through
``--beam_plugins`` (see :func:`beam_plugin_args`), so Beam's sinks benefit too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import os
import random
import re
import tempfile
import threading
import time
from typing import Callable, Iterator, Optional

from .errors import DeidError, StorageError

log = logging.getLogger("dicom_deid.storage")

#: read in one request up to this size; larger objects are read in chunks of this size
CHUNK = 8 * 1024 * 1024
#: retries of one transient failure (then StorageError); backoff doubles from BACKOFF seconds
RETRIES = int(os.environ.get("DICOM_DEID_STORAGE_RETRIES", "6"))
BACKOFF = float(os.environ.get("DICOM_DEID_STORAGE_BACKOFF", "0.5"))
MAX_BACKOFF = 20.0
LIST_PAGE = 1000


# --- errors ------------------------------------------------------------------------------
class ObjectNotFound(DeidError):
    description = "object not found in storage (404)"


class AccessDenied(DeidError):
    description = "access to the object denied by storage (401/403)"


class StorageRefused(DeidError):
    description = "storage refused the request for this object"


TRANSIENT, NOT_FOUND, DENIED, PERMANENT = "transient", "not_found", "denied", "permanent"
_TRANSIENT_CODES = {"RequestTimeout", "RequestTimeoutException", "SlowDown", "Throttling",
                    "ThrottlingException", "InternalError", "ServiceUnavailable",
                    "RequestLimitExceeded", "TooManyRequests", "BadDigest", "IncompleteBody"}
_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "NoSuchBucket", "404", "NoSuchVersion"}
_DENIED_CODES = {"AccessDenied", "Forbidden", "403", "401", "InvalidAccessKeyId",
                 "SignatureDoesNotMatch", "AllAccessDisabled", "AccountProblem"}


def _status_kind(code) -> Optional[str]:
    try:
        code = int(code)
    except (TypeError, ValueError):
        return None
    if code == 404 or code == 410:
        return NOT_FOUND
    if code in (401, 403):
        return DENIED
    if code in (408, 429) or 500 <= code <= 599:
        return TRANSIENT
    if 400 <= code < 500:
        return PERMANENT
    return None


def classify(exc: BaseException) -> str:
    """``transient``, ``not_found``, ``denied`` or ``permanent`` for a storage exception."""
    if isinstance(exc, StorageError):
        return TRANSIENT
    if isinstance(exc, ObjectNotFound):
        return NOT_FOUND
    if isinstance(exc, AccessDenied):
        return DENIED
    if isinstance(exc, DeidError):
        return PERMANENT
    mod = type(exc).__module__ or ""
    name = type(exc).__name__
    # Beam wraps per-path errors
    details = getattr(exc, "exception_details", None)
    if isinstance(details, dict) and details:
        kinds = [classify(e) for e in details.values() if isinstance(e, BaseException)]
        for k in (TRANSIENT, DENIED, NOT_FOUND, PERMANENT):
            if k in kinds:
                return k
    # google-api-core / google-cloud-storage
    if mod.startswith("google.api_core"):
        if name == "RetryError":
            return TRANSIENT
        kind = _status_kind(getattr(exc, "code", None))
        if kind:
            return kind
    if mod.startswith("google.auth") and name in ("TransportError", "RefreshError"):
        return TRANSIENT if name == "TransportError" else DENIED
    if mod.startswith(("google.resumable_media", "google.cloud.storage")):
        if name == "InvalidResponse":
            resp = exc.args[0] if exc.args else None
            kind = _status_kind(getattr(resp, "status_code", None))
            return kind or TRANSIENT
        if name == "DataCorruption":
            return TRANSIENT
    # botocore / boto3
    if mod.startswith("botocore"):
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            err = (response.get("Error") or {}).get("Code")
            if err in _NOT_FOUND_CODES:
                return NOT_FOUND
            if err in _DENIED_CODES:
                return DENIED
            if err in _TRANSIENT_CODES:
                return TRANSIENT
            kind = _status_kind((response.get("ResponseMetadata") or {}).get("HTTPStatusCode"))
            return kind or PERMANENT
        # ConnectionError family, ReadTimeoutError, IncompleteReadError, ResponseStreamingError
        return TRANSIENT if name not in ("NoCredentialsError", "ParamValidationError",
                                         "UnknownServiceError", "NoRegionError") else PERMANENT
    # Beam's S3 client
    if name == "S3ClientError":
        return _status_kind(getattr(exc, "code", None)) or TRANSIENT
    # HTTP stacks (requests, urllib3, http.client)
    if mod.startswith(("requests", "urllib3", "http.client")):
        return TRANSIENT
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return TRANSIENT
    if isinstance(exc, FileNotFoundError):
        return NOT_FOUND
    if isinstance(exc, PermissionError):
        return DENIED
    return PERMANENT


def _translate(kind: str) -> Exception:
    return {TRANSIENT: StorageError("transient storage error: retries exhausted"),
            NOT_FOUND: ObjectNotFound(), DENIED: AccessDenied()}.get(kind, StorageRefused())


class _Stats:
    """Per-process counts (read by the transforms for their counters and by benchmarks)."""

    def __init__(self):
        self.retries = 0
        self.requests = 0


stats = _Stats()


def with_retries(op: Callable, retries: Optional[int] = None,
                 on_retry: Optional[Callable[[], None]] = None):
    """Run ``op()``; retry transient failures with backoff; translate every failure into a
    fixed-text exception (StorageError, ObjectNotFound, AccessDenied, StorageRefused)."""
    retries = RETRIES if retries is None else retries
    delay = BACKOFF
    attempt = 0
    while True:
        try:
            stats.requests += 1
            return op()
        except Exception as exc:  # noqa: BLE001 - classified below
            kind = classify(exc)
            if kind == TRANSIENT and attempt < retries:
                attempt += 1
                stats.retries += 1
                if on_retry is not None:
                    on_retry()
                time.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, MAX_BACKOFF)
                continue
            err = _translate(kind)
        raise err  # outside the except block: no chained context carrying the store's message


# --- URIs --------------------------------------------------------------------------------
def scheme(uri: str) -> str:
    """``gs``, ``s3``, ``file`` (local) or another Beam scheme."""
    m = re.match(r"^([a-zA-Z][-a-zA-Z0-9+.]*)://", uri)
    if not m:
        return "file"
    s = m.group(1).lower()
    return "file" if s == "file" else s


def is_local(uri: str) -> bool:
    return scheme(uri) == "file"


def local_path(uri: str) -> str:
    return uri[7:] if uri.startswith("file://") else uri


def split_bucket(uri: str) -> tuple[str, str]:
    rest = uri.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    return bucket, key


_GLOB = re.compile(r"[*?\[]")


def has_glob(pattern: str) -> bool:
    return bool(_GLOB.search(pattern))


def pattern_regex(pattern: str) -> "re.Pattern":
    """Beam's pattern syntax: fnmatch with ``*`` = ``[^/]*`` and ``**`` = ``.*``."""
    from apache_beam.io.filesystem import FileSystem
    return re.compile(FileSystem.translate_pattern(pattern))


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int
    #: the store's version of the object: ``gen:<generation>`` (GCS), ``etag:<etag>`` (S3),
    #: ``mtime:<ns>`` (local and others: with the size, what Beam's metadata offers)
    version: str
    #: last modification, seconds since the epoch by the store's clock (None: not known)
    mtime: Optional[float] = dataclasses.field(default=None, compare=False)


def canonical_uri(uri: str) -> str:
    """The identity of an input, from which its ``input_key`` (HMAC) is derived: local files
    by their absolute, normalised path (``.``/``..``/repeated ``/`` resolved, ``file://``
    dropped; symbolic links are *not* resolved: the path the pattern reached); objects by
    their ``gs://bucket/key`` / ``s3://bucket/key`` URI as the store names them (keys are
    opaque: ``a//b`` and ``a/b`` are different objects). So ``in/**``, ``./in/**`` and
    ``/data/in/**`` name each input the same way, and a run's input keys do not depend on
    how the pattern was spelled or on the working directory."""
    if is_local(uri):
        return os.path.abspath(local_path(uri))
    return uri


def canonical_pattern(pattern: str) -> str:
    """A file pattern made independent of the launcher's working directory (local patterns
    become absolute; bucket patterns are kept). Done at the edge: workers may run elsewhere."""
    if is_local(pattern):
        path = local_path(pattern)
        trailing = path.endswith("/") and len(path) > 1
        return os.path.abspath(path) + ("/" if trailing else "")
    return pattern


# --- clients (one per process and configuration) -----------------------------------------
_lock = threading.Lock()
_clients: dict = {}


def _options():
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions
    opts = FileSystems._pipeline_options
    if opts is None:
        try:
            from apache_beam.options.value_provider import RuntimeValueProvider
            opts = RuntimeValueProvider.runtime_options
        except Exception:  # pragma: no cover
            opts = None
    if opts is None:
        return PipelineOptions([])
    if isinstance(opts, dict):
        return PipelineOptions.from_dictionary(opts)
    return opts


def gcs_anonymous(opts=None) -> bool:
    """True against an emulator (``STORAGE_EMULATOR_HOST``) or with Beam's ``--no_auth``."""
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return True
    try:
        from apache_beam.options.pipeline_options import GoogleCloudOptions
        return bool((opts or _options()).view_as(GoogleCloudOptions).no_auth)
    except Exception:
        return False


def configure(opts=None) -> None:
    """Make this process's GCS access anonymous when :func:`gcs_anonymous` says so, for our
    client and Beam's ``GcsIO`` alike (Beam 2.77 asks ``google.auth.default()`` with four
    backed-off retries before falling back to an anonymous client; a resolved ``None`` in its
    credential cache makes it build the anonymous client at once)."""
    if opts is not None:
        from apache_beam.io.filesystems import FileSystems
        if FileSystems._pipeline_options is None:
            FileSystems.set_options(opts)
    if not gcs_anonymous(opts):
        return
    try:
        from apache_beam.internal.gcp import auth
    except ImportError:  # gcp extra not installed
        return
    creds = getattr(auth, "_Credentials", None)
    if creds is None:  # pragma: no cover - Beam changed; fall back to its own lookup
        return
    with creds._credentials_lock:
        creds._credentials = None
        creds._credentials_init = True


def beam_plugin_args(beam_args) -> list[str]:
    """Extra Beam args so every worker process imports this module at start-up (and so
    applies :func:`configure` before Beam's own GCS code asks for credentials)."""
    if any(a.startswith(("--beam_plugin", "--beam_plugins")) and __name__ in a for a in beam_args):
        return []
    return [f"--beam_plugins={__name__}"]


def worker_provision_info(opts):
    """Provision info for the FnApiRunner that carries ``opts`` to its worker processes.

    Beam 2.77's ``FnApiRunner()`` provisions multi-processing workers with empty pipeline
    options, so ``--s3_endpoint_url``, ``--beam_plugins`` and the like would never reach
    them; this is what Beam's portable runner sends instead."""
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner.fn_runner import ExtendedProvisionInfo
    from apache_beam.runners.portability.portable_runner import JobServiceHandle
    encoded = JobServiceHandle.encode_pipeline_options(opts.get_all_options(drop_default=True, retain_unknown_options=True))
    return ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(
        retrieval_token="unused-retrieval-token", pipeline_options=encoded))


def _gcs():
    opts = _options()
    anon = gcs_anonymous(opts)
    key = ("gs", anon, os.environ.get("STORAGE_EMULATOR_HOST"), id(opts) if not anon else 0)
    with _lock:
        client = _clients.get(key)
        if client is None:
            configure()
            from apache_beam.io.gcp import gcsio
            client = gcsio.create_storage_client(opts, use_credentials=not anon)
            _clients[key] = client
    return client


def _s3():
    from apache_beam.options.pipeline_options import S3Options
    o = _options().view_as(S3Options)
    key = ("s3", o.s3_endpoint_url, o.s3_region_name, o.s3_access_key_id, o.s3_secret_access_key,
           o.s3_session_token, o.s3_disable_ssl, o.s3_verify, o.s3_api_version)
    with _lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config
            cfg = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10,
                         read_timeout=120, max_pool_connections=32,
                         s3={"addressing_style": "path"} if o.s3_endpoint_url else None)
            verify = o.s3_verify
            if isinstance(verify, str) and verify.lower() in ("false", "0", "no"):
                verify = False
            client = boto3.session.Session().client(
                "s3", region_name=o.s3_region_name, endpoint_url=o.s3_endpoint_url,
                use_ssl=not o.s3_disable_ssl, verify=verify, api_version=o.s3_api_version,
                aws_access_key_id=o.s3_access_key_id, aws_secret_access_key=o.s3_secret_access_key,
                aws_session_token=o.s3_session_token, config=cfg)
            _clients[key] = client
    return client


def reset_clients() -> None:
    """Forget cached clients (tests that start servers on new ports)."""
    with _lock:
        _clients.clear()


# --- listing -----------------------------------------------------------------------------
#: how many listing tasks :func:`plan_listing` aims for (splitting stops once it has them)
SPLIT_TARGET = int(os.environ.get("DICOM_DEID_LIST_SPLIT_TARGET", "64"))
#: how many folder levels :func:`plan_listing` may open to find that many tasks
SPLIT_DEPTH = 3


class _Pattern:
    """A file pattern compiled once for listing: ``base`` (the literal text up to the last
    ``/`` before the first wildcard; local: a folder), ``lit`` (the literal text after it, up
    to the first wildcard), and matchers on names *relative to base*: ``rx`` (the whole
    pattern, Beam's semantics exactly: ``translate_pattern`` is character by character, so
    the literal base can be cut off) and per-segment matchers used only to skip folders that
    cannot hold a match.

    Folder pruning is exact, never a guess: a segment is used only if it holds nothing but
    literals and single ``*`` (``[^/]*``: cannot cross ``/``); Beam's ``?`` and ``[...]`` can
    match ``/``, and ``**`` anything, so from the first such segment on, folders are opened."""

    __slots__ = ("pattern", "base", "lit", "rx", "everything", "segs", "depth")

    def __init__(self, pattern: str):
        from apache_beam.io.filesystem import FileSystem
        self.pattern = pattern
        m = _GLOB.search(pattern)
        pre = pattern[:m.start()] if m else pattern
        cut = pre.rfind("/") + 1
        self.base, self.lit = pattern[:cut], pre[cut:]
        rest = pattern[cut:]
        self.everything = rest == "**"
        self.rx = re.compile(FileSystem.translate_pattern(rest))
        parts = rest.split("/")
        segs = []
        for p in parts:
            if "**" in p or "?" in p or "[" in p:
                break
            segs.append(re.compile(FileSystem.translate_pattern(p)))
        self.segs = segs
        #: a match has exactly this many segments (None: any number)
        self.depth = len(parts) if len(segs) == len(parts) else None

    def may_hold(self, rel_dir: str) -> bool:
        """Whether objects under the folder ``base + rel_dir`` (``rel_dir`` ends with ``/``)
        can match."""
        if not (rel_dir.startswith(self.lit) or self.lit.startswith(rel_dir)):
            return False
        comps = rel_dir[:-1].split("/")
        if self.depth is not None and len(comps) >= self.depth:
            return False
        for c, seg in zip(comps, self.segs):
            if not seg.fullmatch(c):
                return False
        return True


def iter_objects(pattern: str, on_retry=None) -> Iterator[ObjectInfo]:
    """Objects matching a Beam file pattern, streamed page by page (never collected), listed
    in this process (no split: see :func:`plan_listing`)."""
    s = scheme(pattern)
    if s == "file":
        yield from _iter_local(pattern)
        return
    if s in ("gs", "s3"):
        if not has_glob(pattern):
            info = stat(pattern, on_retry=on_retry)
            if info is not None:
                yield info
            return
        yield from iter_task(pattern, pattern[:_GLOB.search(pattern).start()], on_retry)
        return
    yield from _iter_beam(pattern)


def plan_listing(pattern: str, on_retry=None, target: Optional[int] = None,
                 max_depth: int = SPLIT_DEPTH) -> Iterator:
    """Split the listing of one pattern into tasks that can run on different workers.

    Yields :class:`ObjectInfo` for objects found while splitting (those directly in the
    folders it opened) and ``str`` *tasks*: a folder (local) or a key prefix ending in ``/``
    (gs/s3), each listed in full by :func:`iter_task`. Folders are opened breadth first (a
    delimiter ``/`` listing on buckets, one ``scandir`` locally), at most ``max_depth``
    levels, until there are ``target`` tasks; further sub-folders become tasks as they are
    found, so at most ``target`` are held. A sub-folder is opened only when it fits in one
    listing page (``LIST_PAGE`` entries), and only until the planner has listed about one
    page of objects below the top folder; the rest are tasks. So the planner lists the
    pattern's top folder and about two pages more: folders that hold only folders (site /
    patient / study) are opened to find parallelism, folders of objects are left to tasks. Every object the pattern matches is yielded
    exactly once, either here or by exactly one task's :func:`iter_task` (same set as
    :func:`iter_objects`). Patterns without wildcards and other schemes are not split."""
    target = SPLIT_TARGET if target is None else target
    s = scheme(pattern)
    if s not in ("file", "gs", "s3") or not has_glob(canonical_uri(pattern) if s == "file" else pattern):
        yield from iter_objects(pattern, on_retry)
        return
    if s == "file":
        pat = _Pattern(canonical_uri(pattern))
        if not os.path.isdir(pat.base):
            return
        start = pat.base
    else:
        pat = _Pattern(pattern)
        start = pat.base + pat.lit  # a key prefix: opened with a delimiter listing below
    if target <= 1 or max_depth <= 0:
        yield start
        return
    from collections import deque
    queue, tasks = deque([(start, 0)]), 0
    budget = LIST_PAGE  # objects the planner may list itself below the pattern's own folder
    while queue:
        top, level = queue.popleft()
        if level >= max_depth or tasks + len(queue) + 1 > target or (level and budget <= 0):
            tasks += 1
            yield top
            continue
        # the pattern's own folder is opened whatever its size (someone must list what is
        # directly in it); a sub-folder only when one page holds it, so the planner never
        # lists much itself: a big folder is one task
        level_items = _one_level(pat, top, on_retry, None if level == 0 else LIST_PAGE)
        if level_items is None:
            tasks += 1
            yield top
            continue
        for item in level_items:
            if isinstance(item, ObjectInfo):
                budget -= level > 0
                yield item
            elif tasks + len(queue) < target:
                queue.append((item, level + 1))
            else:
                tasks += 1
                yield item


def iter_task(pattern: str, task: str, on_retry=None) -> Iterator[ObjectInfo]:
    """Objects of a :func:`plan_listing` task (a folder or key prefix) matching ``pattern``."""
    s = scheme(pattern)
    if s == "file":
        pat = _Pattern(canonical_uri(pattern))
        yield from _walk_local(pat, task)
        return
    pat = _Pattern(pattern)
    rx, n = pat.rx, len(pat.base)
    for info in _iter_prefix(task, on_retry):
        if pat.everything or rx.match(info.uri, n):
            yield info


def _one_level(pat: _Pattern, top: str, on_retry=None, limit: Optional[int] = None):
    """One level under ``top``: matching objects (ObjectInfo) and sub-folders / common
    prefixes (str) that may hold matches, streamed; with ``limit``, a list of them, or None
    when the level holds more than ``limit`` entries (more than one listing page: such a
    folder is better listed as one task than opened by the planner)."""
    if limit is None:
        return _iter_one_level(pat, top, on_retry)
    if is_local(top):
        try:
            with os.scandir(top) as it:
                entries = list(itertools.islice(it, limit + 1))
        except OSError:
            return []
        if len(entries) > limit:
            return None
        return list(_iter_one_level(pat, top, on_retry))
    page = _gcs_page if scheme(top) == "gs" else _s3_page
    objects, prefixes, token = page(top, None, "/", on_retry)
    if token:
        return None
    n = len(pat.base)
    return ([o for o in objects if pat.everything or pat.rx.match(o.uri, n)]
            + [p for p in prefixes if pat.may_hold(p[n:])])


def _iter_one_level(pat: _Pattern, top: str, on_retry=None) -> Iterator:
    n = len(pat.base)
    if is_local(top):
        try:
            with os.scandir(top) as it:
                entries = sorted(it, key=_entry_name)
        except OSError:
            return
        for e in entries:
            path = e.path
            try:
                if e.is_dir(follow_symlinks=False):
                    if pat.may_hold(path[n:] + "/"):
                        yield path
                    continue
                if not (pat.everything or pat.rx.match(path, n)):
                    continue
                st = e.stat()
            except OSError:
                continue  # vanished while listing
            yield ObjectInfo(path, st.st_size, f"mtime:{st.st_mtime_ns}", st.st_mtime)
        return
    for item in _iter_prefix(top, on_retry, delimiter="/"):
        if isinstance(item, str):
            if pat.may_hold(item[n:]):
                yield item
        elif pat.everything or pat.rx.match(item.uri, n):
            yield item


def _ts(value) -> Optional[float]:
    """A store's modification time (datetime or number) -> seconds since the epoch."""
    if value is None:
        return None
    try:
        return float(value.timestamp()) if hasattr(value, "timestamp") else float(value)
    except (TypeError, ValueError, OverflowError):
        return None


#: what :func:`probe_pattern` says about a pattern
MATCHED, MISSING, FOLDER, EMPTY = "matched", "missing", "folder", "empty"


def probe_pattern(pattern: str) -> str:
    """Whether a pattern matches anything, cheaply (stops at the first match):
    ``matched``; ``missing`` (a path without wildcards names no object); ``folder`` (it names a
    folder or a prefix holding objects, not an object); ``empty`` (a glob matching nothing)."""
    for _ in iter_objects(pattern):
        return MATCHED
    if has_glob(pattern):
        return EMPTY
    if is_local(pattern):
        return FOLDER if os.path.isdir(local_path(pattern)) else MISSING
    for _ in iter_objects(pattern.rstrip("/") + "/**"):
        return FOLDER
    return MISSING


def check_patterns(patterns) -> list[str]:
    """Check input patterns before a run; patterns are named by position only (paths can
    hold patient names). Raises ConfigError when a path without wildcards names nothing or
    names a folder, or when no pattern matches anything; returns warnings for globs that
    match nothing while others do."""
    from .errors import ConfigError
    patterns = list(patterns)
    n = len(patterns)
    kinds = [probe_pattern(p) for p in patterns]
    for i, kind in enumerate(kinds, 1):
        if kind == MISSING:
            raise ConfigError(f"input pattern {i} of {n} matched nothing: a path without wildcards "
                              "must name an existing object (the pattern is not repeated here: paths "
                              "can hold names)")
        if kind == FOLDER:
            raise ConfigError(f"input pattern {i} of {n} names a folder or prefix, not an object: "
                              "add '/**' to it to read every object under it")
    empty = [i for i, kind in enumerate(kinds, 1) if kind == EMPTY]
    if len(empty) == n:
        raise ConfigError(f"none of the {n} input pattern(s) matched any object")
    if empty:
        which = ", ".join(str(i) for i in empty)
        return [f"warning: {len(empty)} of {n} input patterns matched no object (pattern {which}); "
                f"{n - len(empty)} matched objects"]
    return []


def _iter_local(pattern: str) -> Iterator[ObjectInfo]:
    path = canonical_uri(pattern)
    if not has_glob(path):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return
        if os.path.isdir(path):
            return
        yield ObjectInfo(path, st.st_size, f"mtime:{st.st_mtime_ns}", st.st_mtime)
        return
    pat = _Pattern(path)
    if os.path.isdir(pat.base):
        yield from _walk_local(pat, pat.base)


def _walk_local(pat: _Pattern, top: str) -> Iterator[ObjectInfo]:
    """Files under the folder ``top`` matching ``pat``: depth first, sorted, streaming (one
    folder's entries in memory at a time); ``scandir`` gives the type, so the one ``stat`` per
    matching file is for size and mtime. Symbolic links to folders are not followed."""
    n, rx, everything, may_hold = len(pat.base), pat.rx, pat.everything, pat.may_hold
    stack = [top]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=_entry_name)
        except OSError:
            continue
        subdirs = []
        for e in entries:
            path = e.path
            try:
                if e.is_dir(follow_symlinks=False):
                    if may_hold(path[n:] + "/"):
                        subdirs.append(path)
                    continue
                if not (everything or rx.match(path, n)):
                    continue
                st = e.stat()
            except OSError:
                continue  # vanished while listing
            yield ObjectInfo(path, st.st_size, f"mtime:{st.st_mtime_ns}", st.st_mtime)
        stack.extend(reversed(subdirs))


def _entry_name(e) -> str:
    return e.name


def _gcs_page(prefix: str, token=None, delimiter: Optional[str] = None, on_retry=None):
    """One listing page under a ``gs://`` key prefix: (ObjectInfo list, common prefixes as
    ``gs://`` URIs (with ``delimiter``), next page token or None)."""
    bucket, key_prefix = split_bucket(prefix)
    client = _gcs()

    def page():
        it = client.list_blobs(client.bucket(bucket), prefix=key_prefix, page_token=token,
                               page_size=LIST_PAGE, delimiter=delimiter, retry=None)
        p = next(it.pages)
        return list(p), tuple(getattr(p, "prefixes", ()) or ()), it.next_page_token
    blobs, prefixes, token = with_retries(page, on_retry=on_retry)
    return ([ObjectInfo(f"gs://{bucket}/{b.name}", int(b.size or 0), f"gen:{b.generation}", _ts(b.updated))
             for b in blobs], [f"gs://{bucket}/{p}" for p in prefixes], token or None)


def _s3_page(prefix: str, token=None, delimiter: Optional[str] = None, on_retry=None):
    """One listing page under an ``s3://`` key prefix (as :func:`_gcs_page`)."""
    bucket, key_prefix = split_bucket(prefix)
    client = _s3()

    def page():
        kw = {"Bucket": bucket, "Prefix": key_prefix, "MaxKeys": LIST_PAGE}
        if delimiter:
            kw["Delimiter"] = delimiter
        if token:
            kw["ContinuationToken"] = token
        r = client.list_objects_v2(**kw)
        return (r.get("Contents") or [], [c["Prefix"] for c in r.get("CommonPrefixes") or []],
                r.get("NextContinuationToken") if r.get("IsTruncated") else None)
    items, prefixes, token = with_retries(page, on_retry=on_retry)
    return ([ObjectInfo(f"s3://{bucket}/{it['Key']}", int(it.get("Size") or 0),
                        f"etag:{(it.get('ETag') or '').strip(chr(34))}", _ts(it.get("LastModified")))
             for it in items], [f"s3://{bucket}/{p}" for p in prefixes], token or None)


def _iter_prefix(prefix: str, on_retry=None, delimiter: Optional[str] = None) -> Iterator:
    """Objects under a ``gs://``/``s3://`` key prefix as ObjectInfo, page by page; with
    ``delimiter`` also the common prefixes one level down, as URI strings."""
    page = _gcs_page if scheme(prefix) == "gs" else _s3_page
    token = None
    while True:
        objects, prefixes, token = page(prefix, token, delimiter, on_retry)
        yield from objects
        yield from prefixes
        if not token:
            return


def _iter_beam(pattern: str) -> Iterator[ObjectInfo]:
    from apache_beam.io.filesystems import FileSystems
    for r in with_retries(lambda: FileSystems.match([pattern])):
        for m in r.metadata_list:
            yield ObjectInfo(m.path, int(m.size_in_bytes or 0), f"mtime:{m.last_updated_in_seconds}",
                             m.last_updated_in_seconds)


def stat(uri: str, on_retry=None) -> Optional[ObjectInfo]:
    """Metadata of one object, or None when absent."""
    s = scheme(uri)
    if s == "file":
        try:
            st = os.stat(local_path(uri))
        except FileNotFoundError:
            return None
        return ObjectInfo(canonical_uri(uri), st.st_size, f"mtime:{st.st_mtime_ns}", st.st_mtime)

    def op():
        if s == "gs":
            bucket, key = split_bucket(uri)
            b = _gcs().bucket(bucket).get_blob(key, retry=None)
            return None if b is None else ObjectInfo(uri, int(b.size or 0), f"gen:{b.generation}", _ts(b.updated))
        if s == "s3":
            bucket, key = split_bucket(uri)
            try:
                r = _s3().head_object(Bucket=bucket, Key=key)
            except Exception as exc:  # noqa: BLE001
                if classify(exc) == NOT_FOUND:
                    return None
                raise
            return ObjectInfo(uri, int(r.get("ContentLength") or 0),
                              f"etag:{(r.get('ETag') or '').strip(chr(34))}", _ts(r.get("LastModified")))
        from apache_beam.io.filesystems import FileSystems
        res = FileSystems.match([uri])[0].metadata_list
        return ObjectInfo(uri, int(res[0].size_in_bytes), f"mtime:{res[0].last_updated_in_seconds}") if res else None
    return with_retries(op, on_retry=on_retry)


def exists(uri: str) -> bool:
    return stat(uri) is not None


# --- reading -----------------------------------------------------------------------------
def _read_range(uri: str, start: int, end: Optional[int]) -> bytes:
    """Bytes ``[start, end)`` (``end=None``: to the end). One request; no retry here."""
    s = scheme(uri)
    if s == "gs":
        bucket, key = split_bucket(uri)
        blob = _gcs().bucket(bucket).blob(key)
        try:
            return blob.download_as_bytes(start=start or None, end=None if end is None else end - 1,
                                          raw_download=True, checksum=None, retry=None)
        except Exception as exc:  # noqa: BLE001
            if getattr(exc, "code", None) == 416:
                return b""
            raise
    if s == "s3":
        bucket, key = split_bucket(uri)
        kw = {"Bucket": bucket, "Key": key}
        if start or end is not None:
            kw["Range"] = f"bytes={start}-" + ("" if end is None else str(end - 1))
        try:
            body = _s3().get_object(**kw)["Body"]
        except Exception as exc:  # noqa: BLE001
            code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code")
            if code in ("InvalidRange", "416"):
                return b""
            raise
        try:
            return body.read()
        finally:
            body.close()
    from apache_beam.io.filesystems import FileSystems
    with FileSystems.open(uri, compression_type="uncompressed") as f:
        if start:
            f.seek(start)
        return f.read() if end is None else f.read(end - start)


def read_head(uri: str, n: int, on_retry=None) -> bytes:
    """The first ``n`` bytes only (one ranged request on object stores)."""
    if is_local(uri):
        with open(local_path(uri), "rb") as f:
            return f.read(n)
    return with_retries(lambda: _read_range(uri, 0, n), on_retry=on_retry)


class RangeReader:
    """A seekable, read-only raw file over an object: each ``read`` is a ranged request
    (retried; errors translated like everything here, nothing logged). Wrap it in
    ``io.BufferedReader(reader, buffer_size=64 * 1024)`` for header-only parsing: a header
    scan then fetches the first few blocks of an object, never the whole of it."""

    name = "<object>"  # parsers read .name; never the URI (paths may hold names)

    def __init__(self, uri: str, on_retry=None):
        self._uri, self._pos, self._on_retry, self.closed = uri, 0, on_retry, False
        self.bytes_read = 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def writable(self):
        return False

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            data = b"".join(iter_chunks_from(self._uri, self._pos, self._on_retry))
        elif n == 0:
            return b""
        else:
            data = with_retries(lambda: _read_range(self._uri, self._pos, self._pos + n),
                                on_retry=self._on_retry)
        self._pos += len(data)
        self.bytes_read += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 0:
            self._pos = pos
        elif whence == 1:
            self._pos += pos
        else:
            info = stat(self._uri)
            if info is None:
                raise ObjectNotFound()
            self._pos = info.size + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self):
        self.closed = True

    def flush(self):
        pass

    def isatty(self):
        return False

    def fileno(self):
        raise OSError("not a real file")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_read(uri: str, on_retry=None):
    """A raw seekable reader: a local file, or a :class:`RangeReader` on an object store."""
    if is_local(uri):
        return open(local_path(uri), "rb", buffering=0)
    return RangeReader(uri, on_retry=on_retry)


class TooLarge(Exception):
    """Raised by :func:`fetch` when an object exceeds ``max_bytes`` (callers map it)."""


def iter_chunks(uri: str, size_hint: int = -1, chunk: int = CHUNK, on_retry=None) -> Iterator[bytes]:
    """Stream an object in ranged chunks; each chunk is retried on its own."""
    if is_local(uri):
        with open(local_path(uri), "rb") as f:
            while True:
                b = f.read(chunk)
                if not b:
                    return
                yield b
    if size_hint == 0 or (0 < size_hint <= chunk):
        data = with_retries(lambda: _read_range(uri, 0, None), on_retry=on_retry)
        if data:
            yield data
        return
    yield from _ranged_chunks(uri, 0, chunk, on_retry)


def fetch(uri: str, size: int, max_bytes: int, in_memory_max: int, tmp_dir: str,
          on_retry=None) -> tuple[Optional[bytes], Optional[str], str]:
    """Read a whole object: ``(bytes, None, sha256)`` up to ``in_memory_max`` bytes, else
    ``(None, temp_path, sha256)`` streamed to a local temp file (the caller owns it).
    Raises :class:`TooLarge`, the permanent storage errors, or StorageError."""
    h = hashlib.sha256()
    if size <= in_memory_max:
        parts, total = [], 0
        for b in iter_chunks(uri, size, on_retry=on_retry):
            total += len(b)
            if total > max_bytes:
                raise TooLarge()
            if total > in_memory_max:  # grew since listing: spill what we have
                return _spill(parts + [b], iter_chunks_from(uri, total, on_retry), h, max_bytes, total, tmp_dir)
            parts.append(b)
        data = b"".join(parts)
        h.update(data)
        return data, None, h.hexdigest()
    return _spill([], iter_chunks(uri, size, on_retry=on_retry), h, max_bytes, 0, tmp_dir)


def iter_chunks_from(uri: str, offset: int, on_retry=None, chunk: int = CHUNK) -> Iterator[bytes]:
    if is_local(uri):
        with open(local_path(uri), "rb") as f:
            f.seek(offset)
            while True:
                b = f.read(chunk)
                if not b:
                    return
                yield b
    yield from _ranged_chunks(uri, offset, chunk, on_retry)


def _ranged_chunks(uri: str, off: int, chunk: int, on_retry=None) -> Iterator[bytes]:
    """Ranged reads of ``chunk`` bytes from ``off`` to the end, each retried on its own."""
    while True:
        data = with_retries(lambda off=off: _read_range(uri, off, off + chunk), on_retry=on_retry)
        if data:
            yield data
            off += len(data)
        if len(data) < chunk:
            return


def _spill(first, rest, h, max_bytes, total, tmp_dir):
    fd, path = tempfile.mkstemp(prefix="dicom-deid-", suffix=".dcm", dir=tmp_dir)
    ok = False
    try:
        with os.fdopen(fd, "wb") as dst:
            for b in first:
                h.update(b)
                dst.write(b)
            for b in rest:
                total += len(b)
                if total > max_bytes:
                    raise TooLarge()
                h.update(b)
                dst.write(b)
        ok = True
        return None, path, h.hexdigest()
    finally:
        if not ok:
            try:
                os.unlink(path)
            except OSError:
                pass


def sha256_of(uri: str) -> Optional[str]:
    """sha256 of an existing object, or None when absent."""
    if is_local(uri):
        try:
            with open(local_path(uri), "rb") as f:
                return hashlib.file_digest(f, "sha256").hexdigest()
        except FileNotFoundError:
            return None
    info = stat(uri)
    if info is None:
        return None
    h = hashlib.sha256()
    for b in iter_chunks(uri, info.size):
        h.update(b)
    return h.hexdigest()


# --- writing -----------------------------------------------------------------------------
def _write_local_temp(path: str, data: bytes, durable: bool) -> str:
    """Write ``data`` completely to a temp name beside ``path`` (fsynced when ``durable``);
    the caller publishes it by rename or link."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    return tmp


def write_bytes(uri: str, data: bytes, content_type: str = "application/octet-stream",
                on_retry=None, durable: bool = False) -> None:
    """Write a whole object: local temp name + rename; object stores: one upload, which
    appears atomically (never a partial object at its name)."""
    s = scheme(uri)
    if s == "file":
        path = local_path(uri)
        # durable: stores and records that must survive a crash; not the hot path
        os.replace(_write_local_temp(path, data, durable), path)
        return

    def op():
        if s == "gs":
            bucket, key = split_bucket(uri)
            _gcs().bucket(bucket).blob(key).upload_from_string(data, content_type=content_type,
                                                               retry=None)
        elif s == "s3":
            bucket, key = split_bucket(uri)
            _s3().put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)
        else:
            from apache_beam.io.filesystems import FileSystems
            with FileSystems.create(uri, mime_type=content_type) as f:
                f.write(data)
    with_retries(op, on_retry=on_retry)


#: uploads of local files: S3 switches to a multipart upload (parts of S3_PART bytes,
#: read from the file part by part) above this size; GCS uploads resumably in CHUNK pieces
S3_MULTIPART_THRESHOLD = 256 * 1024 * 1024
S3_PART = 32 * 1024 * 1024


def write_file(uri: str, path: str, content_type: str = "application/octet-stream",
               on_retry=None, move: bool = False) -> None:
    """:func:`write_bytes` from a local file, streamed (never the whole file in memory):
    local: renamed into place when ``move`` and on the same file system (the file is then
    gone from ``path``; given the mode a new file would get), else copied to a temp name
    beside ``uri`` and renamed; GCS: a resumable upload in :data:`CHUNK` pieces (the object
    appears when it is finalised); S3: one PUT from the file, or above
    :data:`S3_MULTIPART_THRESHOLD` a multipart upload (the object appears when it is
    completed). A retry starts the upload again from the file."""
    s = scheme(uri)
    if s == "file":
        import shutil
        dst = local_path(uri)
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        if move:
            try:
                os.chmod(path, 0o666 & ~_umask())
                os.replace(path, dst)  # atomic, and no copy of a large file
                return
            except OSError as exc:
                import errno
                if exc.errno != errno.EXDEV:
                    raise
        tmp = f"{dst}.tmp-{os.getpid()}-{threading.get_ident()}"
        try:
            shutil.copyfile(path, tmp)  # in kernel where it can (copy_file_range/sendfile)
            os.replace(tmp, dst)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return

    def op():
        if s == "gs":
            bucket, key = split_bucket(uri)
            blob = _gcs().bucket(bucket).blob(key, chunk_size=CHUNK)
            blob.upload_from_filename(path, content_type=content_type, retry=None)
        elif s == "s3":
            from boto3.exceptions import S3UploadFailedError
            from boto3.s3.transfer import TransferConfig
            bucket, key = split_bucket(uri)
            cfg = TransferConfig(multipart_threshold=S3_MULTIPART_THRESHOLD, multipart_chunksize=S3_PART,
                                 max_concurrency=2, num_download_attempts=1)
            try:
                _s3().upload_file(path, bucket, key, ExtraArgs={"ContentType": content_type}, Config=cfg)
            except S3UploadFailedError as exc:  # classify the store's own error, not the wrapper
                inner = exc.__cause__ or exc.__context__
                raise (inner if inner is not None else exc) from None
        else:
            from apache_beam.io.filesystems import FileSystems
            with open(path, "rb") as src, FileSystems.create(uri, mime_type=content_type) as f:
                while True:
                    b = src.read(CHUNK)
                    if not b:
                        break
                    f.write(b)
    with_retries(op, on_retry=on_retry)


def _umask() -> int:
    """This process's umask, read without changing it (Linux), else the usual 022."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def create_if_absent(uri: str, data: bytes, on_retry=None) -> bool:
    """Write a whole object only if nothing exists at ``uri``, decided by the store itself
    (local: ``link(2)`` of a complete temp file; GCS: ``ifGenerationMatch=0``; S3:
    ``If-None-Match: *``). True if this call created it; False if an object was there (also
    when an earlier attempt of this call created it and its answer was lost: callers that
    must know compare the content). Stores that ignore the precondition (some emulators)
    make it an ordinary write: callers probe that with a second call on the same name."""
    s = scheme(uri)
    if s == "file":
        path = local_path(uri)
        tmp = _write_local_temp(path, data, durable=True)
        try:
            os.link(tmp, path)  # atomic, and the name never shows a partial object
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    if s not in ("gs", "s3"):
        raise StorageRefused()

    def op():
        bucket, key = split_bucket(uri)
        try:
            if s == "gs":
                _gcs().bucket(bucket).blob(key).upload_from_string(data, if_generation_match=0, retry=None)
            else:
                _s3().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except Exception as exc:  # noqa: BLE001
            status = getattr(exc, "code", None) or ((getattr(exc, "response", None) or {})
                                                    .get("ResponseMetadata", {}).get("HTTPStatusCode"))
            if status in (412, 409):  # precondition failed / S3 concurrent conditional write
                return False
            raise
        return True
    return with_retries(op, on_retry=on_retry)


def copy(src: str, dst: str, on_retry=None) -> None:
    """Server-side copy within a scheme (the destination appears atomically); across
    schemes, a download and one upload."""
    s, d = scheme(src), scheme(dst)
    if s == d == "file":
        import shutil
        os.makedirs(os.path.dirname(local_path(dst)) or ".", exist_ok=True)
        tmp = f"{local_path(dst)}.tmp-{os.getpid()}"
        shutil.copyfile(local_path(src), tmp)
        os.replace(tmp, local_path(dst))
        return
    if s == d == "gs":
        def op():
            sb, sk = split_bucket(src)
            db, dk = split_bucket(dst)
            client = _gcs()
            dblob = client.bucket(db).blob(dk)
            token, _, _ = dblob.rewrite(client.bucket(sb).blob(sk), retry=None)
            while token:
                token, _, _ = dblob.rewrite(client.bucket(sb).blob(sk), token=token, retry=None)
        with_retries(op, on_retry=on_retry)
        return
    if s == d == "s3":
        def op():
            sb, sk = split_bucket(src)
            db, dk = split_bucket(dst)
            _s3().copy({"Bucket": sb, "Key": sk}, db, dk)
        with_retries(op, on_retry=on_retry)
        return
    data = b"".join(iter_chunks(src, -1, on_retry=on_retry))
    write_bytes(dst, data, on_retry=on_retry)


def delete(uri: str, on_retry=None) -> None:
    """Delete one object; absent is fine."""
    s = scheme(uri)
    if s == "file":
        try:
            os.unlink(local_path(uri))
        except FileNotFoundError:
            pass
        return

    def op():
        try:
            if s == "gs":
                bucket, key = split_bucket(uri)
                _gcs().bucket(bucket).delete_blob(key, retry=None)
            elif s == "s3":
                bucket, key = split_bucket(uri)
                _s3().delete_object(Bucket=bucket, Key=key)
            else:
                from apache_beam.io.filesystems import FileSystems
                FileSystems.delete([uri])
        except Exception as exc:  # noqa: BLE001
            if classify(exc) != NOT_FOUND:
                raise
    with_retries(op, on_retry=on_retry)


def delete_prefix(prefix: str) -> int:
    """Delete every object under ``prefix/`` (a staging area); returns how many."""
    prefix = prefix.rstrip("/") + "/"
    if is_local(prefix):
        import shutil
        path = local_path(prefix)
        n = sum(len(f) for _, _, f in os.walk(path))
        shutil.rmtree(path, ignore_errors=True)
        return n
    n = 0
    for info in iter_objects(prefix + "**"):
        delete(info.uri)
        n += 1
    return n


def count(patterns) -> int:
    """How many objects the patterns match (streamed; nothing is kept)."""
    return sum(1 for p in patterns for _ in iter_objects(p))


# Imported by every worker at start-up (--beam_plugins): make GCS anonymous where it should be.
try:
    configure()
except Exception:  # pragma: no cover - never break an import over this
    pass
