"""Benchmark: the one-call distance grid against the naive per-pair loop.

    python -m benchmarks.bench_distances [--scales=paper,hub] [--data=random|shared|near]
        [--methods=auto] [--plan=hub1000]

(a) naive: what a user would write -- for every module, layer and task pair,
    materialise ``B @ A`` in NumPy and call ``np.linalg.norm`` (L2, cosine) and
    ``scipy.linalg.subspace_angles`` (Grassmann). It is timed on a random sample
    of pairs and extrapolated to all pairs (the full loop takes hours).
(b) ours: ``tvgeo_jax.geometry.grid_arrays`` -- all metrics, pairs and layers
    (all modules of one shape concatenated) in one jitted call; compile time is
    reported separately, run time is the median of ``--repeats`` calls after it.
    ``--methods`` times the L2/cosine paths: ``gram`` (inner products only, the
    cancelling path), ``auto`` (near pairs from their differenced factors, the
    default) and ``difference`` (every pair differenced).

FLOPs of (b) come from ``geometry.plan_grid`` (bases, Grams, pair cores; the
differenced path and the sine step only when the data or method triggers them)
and are compared with the machine's measured float32 matmul rate (4096^3).
``--data=shared`` gives every task a common subspace so that all pairs need the
``O(d r²)`` sine step; ``near`` makes every task a small perturbation of one
adapter (every pair near: differenced L2/cosine and sine step, the worst case);
``random`` tasks are nearly orthogonal. ``--plan`` prints the dry-run plan of
larger grids (``hub1000``: T=1000 adapters of roberta-base shape) without running.
"""
from __future__ import annotations

import math
import time
from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from absl import app, flags

from tvgeo_jax.geometry import grid as grid_lib
from tvgeo_jax.geometry import linalg
from tvgeo_jax.geometry import plan as plan_lib
from tvgeo_jax.training import sharding

SCALES = {
    # name: (T tasks, L layers, d = out = in, r, modules)
    "paper": (10, 12, 768, 8, ("query", "value")),
    "hub": (100, 32, 4096, 16, ("query",)),
    "hub1000": (1000, 12, 768, 16, ("query", "value")),     # roberta-base shape, planned only
}

FLAGS = flags.FLAGS
flags.DEFINE_list("scales", ["paper", "hub"], "Scales to run: paper, hub.")
flags.DEFINE_enum("data", "random", ["random", "shared", "near"], "Task vectors: independent, "
                  "sharing half their column space (every pair takes the sine step), or all "
                  "within 1e-3 of one adapter (every pair near).")
flags.DEFINE_list("methods", ["auto"], "L2/cosine paths to time: gram, auto, difference.")
flags.DEFINE_list("plan", ["hub1000"], "Scales whose dry-run plan is printed (not run).")
flags.DEFINE_float("max_memory", None, "GiB per device for the plans and runs (default tiles).")
flags.DEFINE_integer("naive_pairs", 4, "Pairs timed for the naive loop (then extrapolated).")
flags.DEFINE_integer("repeats", 2, "Timed calls of the grid after compilation.")
flags.DEFINE_integer("seed", 0, "Random seed.")


def make_stack(t, l, d, r, n_mod, data, seed):
  """LoRA stacks ``A [T, n_mod * L, r, d]``, ``B [T, n_mod * L, d, r]`` (modules concatenated)."""
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((t, n_mod * l, r, d), dtype=np.float32) / np.sqrt(d)
  b = rng.standard_normal((t, n_mod * l, d, r), dtype=np.float32) * 0.01
  if data == "shared":
    common = rng.standard_normal((1, n_mod * l, d, r // 2), dtype=np.float32) * 0.01
    b[..., : r // 2] = common + 0.05 * b[..., : r // 2]
  if data == "near":
    a = a[:1] + 1e-3 * a
    b = b[:1] + 1e-3 * b
  return a, b


def naive_pair(b1, a1, b2, a2):
  w1 = b1 @ a1
  w2 = b2 @ a2
  l2 = np.linalg.norm(w1 - w2)
  cos = 1.0 - np.sum(w1 * w2) / (np.linalg.norm(w1) * np.linalg.norm(w2))
  dg = np.sqrt(np.sum(scipy.linalg.subspace_angles(w1, w2) ** 2))
  return l2, cos, dg


def time_naive(a, b, n_samples, seed):
  t, lm = a.shape[:2]
  rng = np.random.default_rng(seed + 1)
  iu, ju = np.triu_indices(t, 1)
  total = len(iu) * lm
  picks = rng.choice(total, size=min(n_samples, total), replace=False)
  times = []
  for p in picks:
    k, q = divmod(int(p), len(iu))
    i, j = iu[q], ju[q]
    t0 = time.perf_counter()
    naive_pair(b[i, k], a[i, k], b[j, k], a[j, k])
    times.append(time.perf_counter() - t0)
  per = float(np.mean(times)) if times else float("nan")     # --naive_pairs=0 skips it
  return per * total, per, total, len(picks)


def matmul_rate(n=4096):
  x = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(lambda u: jnp.matmul(u, u, precision=linalg.HIGHEST))
  f(x).block_until_ready()
  best = math.inf
  for _ in range(3):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def _max_memory():
  return None if FLAGS.max_memory is None else int(FLAGS.max_memory * 2 ** 30)


def run_scale(name, data, method, n_naive, repeats, seed) -> Dict[str, float]:
  t, l, d, r, mods = SCALES[name]
  a, b = make_stack(t, l, d, r, len(mods), data, seed)
  lm = a.shape[1]
  aj, bj = jnp.asarray(a), jnp.asarray(b)
  call = lambda: grid_lib.grid_arrays((aj, bj), flat_method=method, max_memory=_max_memory())
  t0 = time.perf_counter()
  call()
  first = time.perf_counter() - t0
  runs = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    call()
    runs.append(time.perf_counter() - t0)
  run = float(np.median(runs))
  plan = grid_lib.grid_plan((aj, bj), max_memory=_max_memory())
  print(f"  {name} [{method}, data={data}]: grid compile+run {first:.1f} s, run {run:.2f} s "
        f"(tiles of {plan.tile} tasks, {plan.tiles} per layer)", flush=True)
  del aj, bj
  naive_total, naive_per, n_total, n_timed = time_naive(a, b, n_naive, seed)
  f = plan.flops
  differenced = method == "difference" or (method == "auto" and data == "near")
  flops = f["min"] + (f["difference"] if differenced else 0.0) + (
      f["sines"] if data in ("near", "shared") else 0.0)
  return {"scale": f"{name}/{method}", "shape": f"T={t} L={l} d={d} r={r} x{len(mods)} module(s)",
          "naive_s": naive_total, "naive_per_pair_s": naive_per, "naive_pairs": n_total,
          "naive_timed": n_timed, "compile_s": max(first - run, 0.0), "run_s": run,
          "speedup": naive_total / run, "gflop": flops / 1e9, "gflops": flops / run / 1e9}


def print_plan(name):
  t, l, d, r, mods = SCALES[name]
  plan = plan_lib.plan_grid("lora", t, l * len(mods), d, d, r, devices=jax.device_count(),
                            max_memory=_max_memory(), factors=("product",))
  print(f"dry run, {name} ({'+'.join(mods)}): " + plan.describe())
  # XLA's own accounting of the same program, compiled for the shapes only (nothing runs)
  fn, _ = grid_lib._compiled(sharding.data_mesh(), "lora", grid_lib.METRICS, ("product",), None,
                             None, plan.tile, t, l * len(mods), "auto")
  shapes = ((jax.ShapeDtypeStruct((t, l * len(mods), r, d), jnp.float32),
             jax.ShapeDtypeStruct((t, l * len(mods), d, r), jnp.float32),
             jax.ShapeDtypeStruct((t, l * len(mods)), jnp.int32)),)
  mem = fn.lower(*shapes).compile().memory_analysis()
  print(f"  XLA memory analysis of that program: arguments {mem.argument_size_in_bytes / 2**30:.2f} "
        f"GiB, temporaries {mem.temp_size_in_bytes / 2**30:.2f} GiB, outputs "
        f"{mem.output_size_in_bytes / 2**30:.2f} GiB per device")


def main(argv: List[str]):
  del argv
  peak = matmul_rate()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; measured float32 matmul "
        f"rate (4096^3, HIGHEST): {peak / 1e9:.1f} GFLOP/s; data={FLAGS.data}")
  for name in FLAGS.plan:
    print_plan(name)
  rows = [run_scale(s, FLAGS.data, m, FLAGS.naive_pairs, FLAGS.repeats, FLAGS.seed)
          for s in FLAGS.scales for m in FLAGS.methods]
  hdr = (f"{'scale':18} {'naive (s)':>11} {'per pair':>9} {'compile':>8} {'grid (s)':>9} "
         f"{'speedup':>8} {'GFLOP':>7} {'GFLOP/s':>8} {'% matmul':>8}")
  print(hdr)
  for x in rows:
    print(f"{x['scale']:18} {x['naive_s']:11.1f} {x['naive_per_pair_s']:9.3f} "
          f"{x['compile_s']:8.1f} {x['run_s']:9.2f} {x['speedup']:7.0f}x {x['gflop']:7.1f} "
          f"{x['gflops']:8.1f} {100 * x['gflops'] * 1e9 / peak:7.0f}%")
  for x in rows:
    print(f"  {x['scale']}: {x['shape']}; naive extrapolated from {x['naive_timed']} of "
          f"{x['naive_pairs']} (layer, pair) items")


if __name__ == "__main__":
  app.run(main)
