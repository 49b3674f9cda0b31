r"""Where the device time of a profiled step goes: a summary of a JAX Perfetto trace.

  python -m benchmarks.trace_summary TRACE.json.gz [--steps=3] [--top=25]

Reads the ``perfetto_trace.json.gz`` that ``jax.profiler.trace(...,
create_perfetto_trace=True)`` writes (``bench_train --profile_dir``), keeps the
device's kernel events (XLA:CPU: the ops on its worker threads) and prints, per step, the busy time by category (matmul
libraries, XLA fusions by kind, copies, collectives, ...) and the top kernels.
"""
from __future__ import annotations

import collections
import gzip
import json
import re

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 3, "Steps the trace covers (times are divided by this).")
flags.DEFINE_integer("top", 25, "Kernels to list.")

_CATEGORIES = (
    ("matmul (cuBLAS/cuBLASLt, XLA:CPU dot)", re.compile(r"gemm|cublas|cutlass|sm90_xmma|nvjet|^dot", re.I)),
    ("attention (cuDNN)", re.compile(r"cudnn|fmha|flash", re.I)),
    ("triton fusions", re.compile(r"triton", re.I)),
    ("reductions", re.compile(r"reduce|reduction", re.I)),
    ("scatter/gather", re.compile(r"scatter|gather|dynamic.update", re.I)),
    ("copies/transposes", re.compile(r"copy|transpose|memcpy|memset", re.I)),
    ("rng", re.compile(r"rng|threefry|philox", re.I)),
    ("YNNPACK fusions (XLA:CPU dots)", re.compile(r"^ynn_fusion", re.I)),
    ("while loops", re.compile(r"^while", re.I)),
    ("loop fusions", re.compile(r"fusion|loop", re.I)),
)


def category(name: str) -> str:
  for label, pattern in _CATEGORIES:
    if pattern.search(name):
      return label
  return "other"


def device_kernels(trace: dict):
  """Complete ('X') events of compiled code: kernels on device (GPU/TPU) processes, or,
  when there are none (XLA:CPU), the ops on the host's XLA worker threads."""
  procs, threads = {}, {}
  for e in trace["traceEvents"]:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      procs[e["pid"]] = e["args"]["name"]
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e.get("tid"))] = e["args"]["name"]
  device_pids = {p for p, n in procs.items() if re.search(r"/device:(GPU|TPU)", n)}

  def keep(e, thread):
    if device_pids:
      return e.get("pid") in device_pids
    return thread.startswith("tf_XLAEigen") and not e["name"].startswith("ThunkExecutor")

  by_thread = collections.defaultdict(list)
  for e in trace["traceEvents"]:
    if e.get("ph") == "X":
      thread = threads.get((e["pid"], e.get("tid")), str(e.get("tid")))
      if keep(e, thread):
        by_thread[thread].append(e)
  return procs, by_thread


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("Give one trace file (perfetto_trace.json.gz).")
  opener = gzip.open if argv[1].endswith(".gz") else open
  with opener(argv[1], "rt") as f:
    trace = json.load(f)
  procs, by_thread = device_kernels(trace)
  if not by_thread:
    raise SystemExit(f"No device events in {argv[1]} (processes: {sorted(procs.values())}).")
  for thread, events in sorted(by_thread.items(), key=lambda kv: -sum(e["dur"] for e in kv[1])):
    total = sum(e["dur"] for e in events) / 1e3 / FLAGS.steps
    span = (max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)) / 1e3
    print(f"\n== {thread}: {len(events)} events, busy {total:.2f} ms/step, "
          f"span {span / FLAGS.steps:.2f} ms/step")
    cats, names = collections.Counter(), collections.Counter()
    counts = collections.Counter()
    for e in events:
      cats[category(e["name"])] += e["dur"]
      names[e["name"]] += e["dur"]
      counts[e["name"]] += 1
    for label, dur in cats.most_common():
      print(f"  {label:<28} {dur / 1e3 / FLAGS.steps:8.2f} ms  {100 * dur / 1e3 / FLAGS.steps / total:5.1f}%")
    for name, dur in names.most_common(FLAGS.top):
      print(f"    {dur / 1e3 / FLAGS.steps:8.3f} ms  x{counts[name] // FLAGS.steps:<4} {name[:110]}")


if __name__ == "__main__":
  app.run(main)
