#!/usr/bin/env python
"""Per-step wall time, CPU time and peak RSS of one large object through the engine, in one
process without Beam: fetch (to a local temp file above 64 MiB) -> parse -> tags (basic) ->
serialise -> verify -> stage to local disk. Works on the code before the streamed
large-object path too (in-memory serialise + write_bytes), for comparisons: run it with
``PYTHONPATH`` and the working directory set to an exported copy of the other commit.

Usage::

    flock /tmp/dicom-deid-bench.lock .venv/bin/python benchmarks/large_stages.py OBJECT TMP_DIR OUT_DIR

Prints one JSON line; ``peak_mb`` is the process's ru_maxrss after each step.
"""
import json, os, resource, secrets, shutil, sys, time
import dicom_deid
from dicom_deid import keys, policy, reader, storage, tags, verify, writer
from dicom_deid.element import InputRef
src = sys.argv[1]; tmp = sys.argv[2]; out_dir = sys.argv[3]
shutil.rmtree(out_dir, ignore_errors=True); os.makedirs(out_dir)
key = bytes.fromhex("5a" * 32); d = keys.Deriver(key)
rules = tags.compile_rules(policy.load("basic"), key)
new = hasattr(writer, "serialize_to_file")
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
res = {"code": os.path.dirname(dicom_deid.__file__), "new": new, "start_peak_mb": rss()}
pc, ct = time.perf_counter, time.process_time
def step(name, fn):
    t, c = pc(), ct(); v = fn(); res[name] = {"s": round(pc() - t, 2), "cpu_s": round(ct() - c, 2), "peak_mb": rss()}; return v
size = os.path.getsize(src)
data, path, sha = step("fetch", lambda: storage.fetch(src, size, 1 << 40, 64 << 20, tmp))
obj = step("parse", lambda: reader.parse(InputRef(src, d.input_key(src), size), d, data=data, path=path, sha256=sha, temp_path=path))
step("tags", lambda: tags.deidentify(obj, rules))
if new and writer.has_deferred(obj.dataset):
    out = step("serialize", lambda: writer.serialize_to_file(obj.dataset, tmp))
    f = step("verify", lambda: verify.find_residuals(obj, out))
    step("stage", lambda: storage.write_file(os.path.join(out_dir, "x.dcm"), out.path, move=True))
    out.remove()
else:
    out = step("serialize", lambda: writer.serialize(obj.dataset))
    f = step("verify", lambda: verify.find_residuals(obj, out))
    step("stage", lambda: (storage.write_bytes(os.path.join(out_dir, "x.dcm"), out), writer.sha256(out)))
obj.release()
res["findings"] = f
print(json.dumps(res))
