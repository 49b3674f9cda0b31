r"""Distances between task vectors for all task pairs × layers, in one compiled call.

  python -m experiments.grid_distances --runs=runs/synth_*/lora_* --out=out/distances
  python -m experiments.grid_distances --runs=ADAPTER_DIR1,ADAPTER_DIR2 --base=roberta-base
  python -m experiments.grid_distances --runs_file=pool.txt --base=/models/roberta-base

``--runs`` takes finetune run directories and/or peft adapter directories (a
comma-separated list; shell globs are expanded; an existing path is taken literally).
``--runs_file`` reads a pool manifest instead: one directory or hub adapter id per line,
``#`` comments, names taken literally; models whose base differs from the pool's
(``--base``) are skipped with a warning, or refused with ``--strict``. Models of
different bases are refused unless ``--allow_different_bases``. Writes ``distances.npz`` (every
``T_d[T, T, L]`` with task, layer and module names), ``distances.json`` (layer means
and k+ means) and figures: PCA of the rows of T̄_d (paper A, Figures 2-3), heatmaps
and dendrograms (Figure 4: A, B and BA).
"""
from __future__ import annotations

from absl import app, flags, logging

from experiments import cli

from tvgeo_jax import geometry, sources

FLAGS = flags.FLAGS
flags.DEFINE_list("runs", None, "Run or peft adapter directories (globs allowed).")
flags.DEFINE_list("modules", ["query", "value"], "Modules to analyse (or 'all' for dense).")
flags.DEFINE_list("metrics", list(geometry.METRICS), "Distances: l2, cosine, grassmann.")
flags.DEFINE_list("factors", ["product", "a", "b"],
                  "LoRA: the product B·A and/or A alone and B alone (dense: product).")
flags.DEFINE_enum("kind", None, ["lora", "dense"],
                  "Force LoRA factor kernels or dense deltas (default: LoRA if all are LoRA).")
flags.DEFINE_integer("top_k", None,
                     "Dense Grassmann between the top-k left singular subspaces (full FT task "
                     "vectors are full rank, where the plain Grassmann distance is 0).")
flags.DEFINE_string("base", None, "Base model for peft adapters (overrides the adapter's).")
flags.DEFINE_string("runs_file", None, "Pool manifest: one run/adapter directory or hub "
                    "adapter id per line, '#' comments (instead of --runs).")
flags.DEFINE_bool("strict", False, "--runs_file: refuse the pool if a model is on another base "
                  "(default: skip it with a warning).")
flags.DEFINE_bool("allow_different_bases", False,
                  "Compute although the models' base weights differ (a warning).")
flags.DEFINE_string("out", "out/distances", "Output directory.")
flags.DEFINE_list("kplus_figures", ["5"], "Also draw PCA figures of these k+ layer means.")
flags.DEFINE_bool("figures", True, "Draw the figures.")


def load_models():
  """The sources of --runs or --runs_file (one base, checked)."""
  if bool(FLAGS.runs) == bool(FLAGS.runs_file):
    raise app.UsageError("Pass --runs (finetune run or peft adapter directories) or "
                         "--runs_file (a pool manifest), one of them.")
  if FLAGS.runs_file:
    srcs = sources.load_pool(FLAGS.runs_file, base=FLAGS.base, strict=FLAGS.strict)
    sources.check_same_base(srcs, allow_different=FLAGS.allow_different_bases)
    return srcs
  return sources.load_sources(sources.expand_paths(FLAGS.runs), base=FLAGS.base,
                              allow_different_bases=FLAGS.allow_different_bases)


def main(argv):
  del argv
  srcs = load_models()
  if len(srcs) == 1:
    logging.warning("Only one model (%s): the grid is 1 x 1 (every distance to itself); pass "
                    "two or more runs or adapters.", srcs[0].path)
  stacks = sources.module_stacks(srcs, FLAGS.modules, kind=FLAGS.kind)
  is_lora = all(isinstance(s, tuple) for s in stacks.values())
  factors = FLAGS.factors if is_lora else ["product"]
  metrics = [m for m in FLAGS.metrics if is_lora or m != "grassmann" or FLAGS.top_k]
  if len(metrics) < len(FLAGS.metrics):
    logging.warning("Grassmann skipped: dense task vectors are full rank; pass --top_k.")
  results = geometry.distance_grids(stacks, task_names=[s.name for s in srcs],
                                    metrics=metrics, factors=factors, top_k=FLAGS.top_k)
  files = geometry.write_distance_outputs(
      FLAGS.out, results, figures=FLAGS.figures,
      kplus_figures=[int(k) for k in FLAGS.kplus_figures])
  for grid in results.values():
    for line in grid.reports:
      logging.warning("%s", line)
  print(f"{len(srcs)} models x {len(results)} modules -> {FLAGS.out}")
  for kind, paths in files.items():
    print(f"  {kind}: {len(paths)} file(s)")


if __name__ == "__main__":
  cli.run(main)
