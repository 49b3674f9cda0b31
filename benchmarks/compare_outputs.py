"""Compare two study output trees (e.g. `experiments.reproduce` before and after a change):
every number of every JSON file and every array of every .npz, bitwise; wall times, paths
and timestamps skipped.

  python -m benchmarks.compare_outputs DIR_A DIR_B
"""
import json, os, sys
import numpy as np
A, B = sys.argv[1], sys.argv[2]
SKIP = {"wall_time_s", "timing", "time_s", "seconds", "started", "finished", "created",
        "path", "run_dir", "out", "base_model_path", "devices", "tokens_per_s", "steps_per_s",
        "elapsed_s", "wall_s", "timestamp", "compile_s", "duration_s"}
def walk(a, b, where, diffs):
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      if k in SKIP or any(s in k for s in ("time", "_s_", "path", "dir")):
        continue
      if k not in a or k not in b:
        diffs.append(f"{where}/{k}: only in {'A' if k in a else 'B'}"); continue
      walk(a[k], b[k], f"{where}/{k}", diffs)
  elif isinstance(a, list) and isinstance(b, list):
    if len(a) != len(b):
      diffs.append(f"{where}: length {len(a)} vs {len(b)}"); return
    for i, (x, y) in enumerate(zip(a, b)):
      walk(x, y, f"{where}[{i}]", diffs)
  elif isinstance(a, str) and isinstance(b, str):
    if a != b and not (A in a or B in a or "/tmp/" in a):
      diffs.append(f"{where}: {a[:60]!r} vs {b[:60]!r}")
  elif a != b and not (isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b)):
    diffs.append(f"{where}: {a!r} vs {b!r}")
n_json = n_npz = 0; diffs = []
for root, _, files in os.walk(A):
  for f in files:
    pa = os.path.join(root, f); rel = os.path.relpath(pa, A); pb = os.path.join(B, rel)
    if "checkpoints" in rel or "tensorboard" in rel or rel.endswith(".lock"):
      continue
    if not os.path.exists(pb):
      if f.endswith((".json", ".npz")): diffs.append(f"{rel}: missing in B")
      continue
    if f.endswith(".json") and f not in ("pipeline_state.json",):
      n_json += 1
      walk(json.load(open(pa)), json.load(open(pb)), rel, diffs)
    elif f.endswith(".npz"):
      n_npz += 1
      za, zb = np.load(pa, allow_pickle=True), np.load(pb, allow_pickle=True)
      for k in sorted(set(za.files) | set(zb.files)):
        if k not in za.files or k not in zb.files:
          diffs.append(f"{rel}:{k} only in one"); continue
        x, y = za[k], zb[k]
        if x.shape != y.shape or (x.dtype.kind == "f" and not np.array_equal(x, y, equal_nan=True)) or (x.dtype.kind != "f" and not np.array_equal(x, y)):
          d = np.nanmax(np.abs(x.astype(float) - y.astype(float))) if x.shape == y.shape and x.dtype.kind in "fi" else "shape/type"
          diffs.append(f"{rel}:{k} differs (max |d| {d})")
print(f"compared {n_json} JSON files and {n_npz} npz files: {len(diffs)} differences")
print("\n".join(diffs[:40]))
