"""Benchmark: the peers' merges on roberta-base-sized query/value kernels.

    python -m benchmarks.bench_merge_peers [--tasks=3] [--layers=12] [--dim=768]

T dense task vectors on ``2·layers`` kernels of ``dim × dim`` (full fine-tuning of
query and value): the wall time of each merge (best of ``--repeats`` after a warm-up
call that includes compilation), and the magnitude-rank helper of breadcrumbs / DELLA
(one argsort and a scatter) against ``argsort(argsort(x))``, with their ratio.
"""
from __future__ import annotations

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import best_time
from tvgeo_jax import merging, trees
from tvgeo_jax.merging import sparsify

FLAGS = flags.FLAGS
flags.DEFINE_integer("tasks", 3, "Merged task vectors T.")
flags.DEFINE_integer("layers", 12, "Layers (two kernels each).")
flags.DEFINE_integer("dim", 768, "Kernel size dim × dim.")
flags.DEFINE_integer("repeats", 2, "Timed calls per merge (best reported).")
flags.DEFINE_list("methods", ["task_arithmetic", "ties", "dare", "dare_ties", "magnitude_prune",
                              "breadcrumbs", "della", "tsv_merge", "iso_c", "knots"],
                  "Merges to time.")


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  shapes = {("encoder", f"layer_{l}", m, "kernel"): (FLAGS.dim, FLAGS.dim)
            for l in range(FLAGS.layers) for m in ("query", "value")}
  base = trees.unflatten({p: rng.normal(size=s).astype(np.float32) for p, s in shapes.items()})
  models = [trees.unflatten({p: (v + 0.01 * rng.normal(size=v.shape)).astype(np.float32)
                             for p, v in trees.flatten(base).items()})
            for _ in range(FLAGS.tasks)]
  extra = {"dare": {"drop_rate": 0.5}, "dare_ties": {"drop_rate": 0.5}}
  print(f"{FLAGS.tasks} task vectors, {len(shapes)} kernels of {FLAGS.dim}×{FLAGS.dim}")
  for name in FLAGS.methods:
    fn = getattr(merging, name)
    run = lambda: jax.block_until_ready(fn(base, models, **extra.get(name, {})))  # noqa: E731
    run()   # warm-up: compilation
    print(f"  {name:16s} {best_time(run, FLAGS.repeats):7.2f} s", flush=True)
  x = jnp.asarray(rng.normal(size=(FLAGS.tasks, FLAGS.dim, FLAGS.dim)).astype(np.float32))
  double = jax.jit(lambda s: jnp.argsort(jnp.argsort(jnp.abs(s.reshape(s.shape[0], -1)),
                                                     axis=1), axis=1))
  scatter = jax.jit(lambda s: sparsify._ranks(jnp.abs(s.reshape(s.shape[0], -1)).T).T)
  np.testing.assert_array_equal(double(x), scatter(x))   # also the warm-up
  t_double = best_time(lambda: double(x).block_until_ready(), 3)
  t_scatter = best_time(lambda: scatter(x).block_until_ready(), 3)
  print(f"ranks of {tuple(x.shape)}: argsort(argsort) {t_double:.3f} s, argsort + scatter "
        f"{t_scatter:.3f} s, ratio {t_double / t_scatter:.2f}×")


if __name__ == "__main__":
  app.run(main)
