"""Listing split across workers (``storage.plan_listing`` + ``storage.iter_task``, wired as
``MatchInputs``): the planner's objects plus every task's objects are exactly the objects
``storage.iter_objects`` lists unsplit (each once), on local disk, S3 (moto) and GCS, for
nested folders, objects at the top level, empty folders and globs in the middle; and folder
pruning never skips a folder that holds a match (Beam's ``?`` and ``[...]`` match ``/``)."""

from __future__ import annotations

import itertools
import os
import re

import pytest
from apache_beam.io.filesystem import FileSystem
from apache_beam.io.filesystems import FileSystems

from dicom_deid import storage

NAME = "Smith^John 1970"
TREE = ["top.dcm", "top.txt", "a/1.dcm", "a/2.dcm", "a/x.txt", "a/b/3.dcm", "a/b/c/4.dcm", "a/b/c/d/5.dcm",
        "ab/6.dcm", "abc/d/7.dcm", f"{NAME}/s1/8.dcm", f"{NAME}/9.dcm", "q/r/s/t/10.dcm", "z.dcm",
        "scan1/series/11.dcm", "scan2/12.dcm", "scanX.dcm"]
EMPTY = ["empty", "a/empty", "a/b/c/d/e"]  # empty folders (buckets: zero-byte "folder/" markers)
PATTERNS = ["**", "*", "*.dcm", "a/**", "a/*", "a/*.dcm", "a/?.dcm", "a/[12].dcm", "a/b/3.dcm", "*/*.dcm",
            "*/b/**", "a/*/c/**", "**/4.dcm", "a*/**", "a?/**", "a?d/**", "a[b/]*", "scan*/**", "scan?/*.dcm",
            "*/*/*/*/*.dcm", f"{NAME}/**", "q/**/t/*.dcm", "nothing/**", "top*", "[as]*/**"]
BUCKET_PATTERNS = ["**", "*", "a/**", "a/?.dcm", "a/[12].dcm", "a/b/3.dcm", "*/b/**", "a*/**", "a?d/**",
                   "a[b/]*", "scan?/*.dcm", "*/*/*/*/*.dcm", "q/**/t/*.dcm", "nothing/**"]
SPLITS = [(1, 3), (2, 1), (3, 3), (5, 2), (64, 3), (1000, 1)]  # (target, max_depth)


def split_listing(pattern, target, depth):
    """Every ObjectInfo from the plan and its tasks, in a list (duplicates kept), and the tasks."""
    items = list(storage.plan_listing(pattern, target=target, max_depth=depth))
    tasks = [i for i in items if isinstance(i, str)]
    out = [i for i in items if not isinstance(i, str)]
    for t in tasks:
        out += list(storage.iter_task(pattern, t))
    return out, tasks


def _check(pattern, rel, expected=None, splits=SPLITS):
    whole = list(storage.iter_objects(pattern))
    assert len({i.uri for i in whole}) == len(whole)
    if expected is not None:
        assert {rel(i.uri) for i in whole} == expected
    for target, depth in splits:
        got, tasks = split_listing(pattern, target, depth)
        assert sorted(got, key=lambda i: i.uri) == sorted(whole, key=lambda i: i.uri), (target, depth)
        if target == 1:
            assert len(tasks) <= 1 and len(got) == len(tasks) * 0 + len(got)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("split") / "in"
    for k in TREE:
        (root / k).parent.mkdir(parents=True, exist_ok=True)
        (root / k).write_bytes(k.encode())
    for k in EMPTY:
        (root / k).mkdir(parents=True, exist_ok=True)
    return root


@pytest.mark.parametrize("page", [1000, 2])  # 2: most sub-folders are too big to open, so tasks
@pytest.mark.parametrize("pattern", PATTERNS)
def test_local_split_listing_lists_the_same_objects_once(tree, pattern, page, monkeypatch):
    monkeypatch.setattr(storage, "LIST_PAGE", page)
    beam = {os.path.relpath(m.path, tree) for r in FileSystems.match([f"{tree}/{pattern}"])
            for m in r.metadata_list} if "nothing" not in pattern else set()
    _check(f"{tree}/{pattern}", lambda u: os.path.relpath(u, tree), beam)
    whole = list(storage.iter_objects(f"{tree}/{pattern}"))
    assert all(i.version == f"mtime:{os.stat(i.uri).st_mtime_ns}" and i.size == os.stat(i.uri).st_size
               for i in whole)  # same version format as before: incremental runs still match


def test_local_split_really_splits(tree, monkeypatch):
    items = list(storage.plan_listing(f"{tree}/**", target=4, max_depth=1))
    tasks = {os.path.relpath(i, tree) for i in items if isinstance(i, str)}
    direct = {os.path.relpath(i.uri, tree) for i in items if not isinstance(i, str)}
    assert direct == {"top.dcm", "top.txt", "z.dcm", "scanX.dcm"}  # the opened folder's own files
    assert tasks == {"a", "ab", "abc", NAME, "q", "scan1", "scan2", "empty"}  # every sub-folder, once
    # with room for 64 tasks it opens up to 3 levels: what is left are the folders 3 deep
    items = list(storage.plan_listing(f"{tree}/**", target=64))
    assert {os.path.relpath(i, tree) for i in items if isinstance(i, str)} == {"a/b/c", "q/r/s"}
    # a pattern that can only match two levels down does not make tasks of deeper folders
    items = list(storage.plan_listing(f"{tree}/*/*.dcm", target=64))
    assert not [i for i in items if isinstance(i, str)]
    assert {os.path.relpath(i.uri, tree) for i in items} == {"a/1.dcm", "a/2.dcm", "ab/6.dcm", f"{NAME}/9.dcm",
                                                            "scan2/12.dcm"}
    # a sub-folder with more entries than one listing page is a task, not opened by the planner
    monkeypatch.setattr(storage, "LIST_PAGE", 2)
    items = list(storage.plan_listing(f"{tree}/**", target=64))
    # and stops opening folders once it has listed about one page (2) of objects below the top
    assert {os.path.relpath(i, tree) for i in items if isinstance(i, str)} == {
        "a", "abc", "empty", "q", "scan1", "scan2", f"{NAME}/s1"}
    assert {os.path.relpath(i.uri, tree) for i in items if not isinstance(i, str)} == {
        "top.dcm", "top.txt", "z.dcm", "scanX.dcm", "ab/6.dcm", f"{NAME}/9.dcm"}


def test_missing_and_plain_paths(tree):
    assert list(storage.plan_listing(f"{tree}/nowhere/**")) == []
    assert [i.uri for i in storage.plan_listing(f"{tree}/a/1.dcm")] == [f"{tree}/a/1.dcm"]
    assert list(storage.plan_listing(f"{tree}/a")) == []  # a folder is not an object


# --- pruning is sound: brute force over patterns x paths -------------------------------------
SEGS = ["a", "b", "ab", "a*", "*", "?", "a?", "[ab]", "[/]", "**", "*b", "a**", "?b"]
PATHS = ["/".join(p) for n in (1, 2, 3, 4) for p in itertools.product(["a", "b", "ab", "ba", ""], repeat=n)]


def test_folder_pruning_never_skips_a_folder_holding_a_match():
    for n in (1, 2, 3):
        for segs in itertools.product(SEGS, repeat=n):
            rest = "/".join(segs)
            if not storage.has_glob(rest):
                continue  # no wildcard: a plain path, stat'ed, never walked
            pat = storage._Pattern("/base/" + rest)
            rx = re.compile(FileSystem.translate_pattern(rest))
            for path in PATHS:
                if rx.fullmatch(path):
                    full = "/base/" + path
                    assert full.startswith(pat.base) and pat.rx.match(full, len(pat.base)), (rest, path)
                    for k in range(full.count("/")):
                        folder = full[:[i for i, c in enumerate(full) if c == "/"][k] + 1]
                        if len(folder) > len(pat.base):
                            assert pat.may_hold(folder[len(pat.base):]), (rest, path, folder)
                elif full_rx_ok(pat, "/base/" + path):
                    raise AssertionError(("matched what Beam does not", rest, path))


def full_rx_ok(pat, full):
    return full.startswith(pat.base) and pat.rx.match(full, len(pat.base)) is not None


# --- buckets ----------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_bucket_split_listing_lists_the_same_objects_once(scheme, request, in_store, tree, monkeypatch):
    store = in_store(request.getfixturevalue(f"{scheme}_store"))
    monkeypatch.setattr(storage, "LIST_PAGE", 4)  # several pages per listing, prefixes across pages
    bucket = store.new_bucket()
    keys = [f"p/{k}" for k in TREE] + [f"p/{k}/" for k in EMPTY] + ["p//double/13.dcm", "p/a//14.dcm",
                                                                    "pq/outside.dcm", "outside.dcm"]
    for k in keys:
        store.put(bucket, k, k.encode())
    uris = [store.uri(bucket, f"p/{p}") for p in BUCKET_PATTERNS] + [store.uri(bucket, "p*/**"),
                                                                      store.uri(bucket, "**")]
    for uri in uris:
        # the unsplit listing filters a full listing with Beam's regex: the reference
        rx = re.compile(FileSystem.translate_pattern(uri))
        expected = {k for k in keys if rx.fullmatch(store.uri(bucket, k))}
        _check(uri, lambda u: u.split("/", 3)[3], expected, splits=[(1, 3), (2, 1), (64, 3)])
        if uri.endswith("/p/**"):
            tasks = [i for i in storage.plan_listing(uri, target=64) if isinstance(i, str)]
            assert tasks and all(t.endswith("/") for t in tasks)


# --- the transform ----------------------------------------------------------------------------
def test_match_inputs_gives_the_unsplit_refs(tree, monkeypatch):
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to
    from dicom_deid.transforms.read import FileRef, MatchInputs
    monkeypatch.setattr(storage, "SPLIT_TARGET", 4)
    patterns = [f"{tree}/**", f"{tree}/a/*.dcm", f"{tree}/nothing/*"]
    expected = [FileRef(i.uri, i.size, i.version) for p in patterns for i in storage.iter_objects(p)]
    with TestPipeline() as p:
        refs = p | MatchInputs(patterns)
        assert_that(refs, equal_to(expected))
