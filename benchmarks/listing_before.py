"""The local lister as it was before the split listing (dicom_deid/storage.py at fdf2a77,
``_iter_local``), frozen here so that benchmarks/storage.py can time before and after side
by side in one run. Not used by the pipeline."""

from __future__ import annotations

import os
import re

from dicom_deid.storage import ObjectInfo, canonical_uri, has_glob, pattern_regex

_GLOB = re.compile(r"[*?\[]")


def iter_local(pattern: str):
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
    prefix = path[:_GLOB.search(path).start()]
    rx = pattern_regex(path)
    root = prefix if prefix.endswith("/") else os.path.dirname(prefix)
    if not os.path.isdir(root):
        return
    stack = [root]
    while stack:  # depth-first, sorted, streaming: one directory's entries in memory at a time
        d = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name, reverse=True)
        except OSError:
            continue
        for e in entries:
            full = os.path.join(d, e.name)
            try:
                if e.is_dir(follow_symlinks=False):
                    if full.startswith(prefix) or prefix.startswith(full + "/"):
                        stack.append(full)
                    continue
                if not full.startswith(prefix) or not rx.fullmatch(full):
                    continue
                st = e.stat()
            except OSError:
                continue  # vanished while listing
            yield ObjectInfo(full, st.st_size, f"mtime:{st.st_mtime_ns}", st.st_mtime)
