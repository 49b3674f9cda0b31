r"""Distances between task vectors for all task pairs × layers, in one compiled call.

  python -m experiments.grid_distances --runs=runs/synth_*/lora_* --out=out/distances
  python -m experiments.grid_distances --runs=ADAPTER_DIR1,ADAPTER_DIR2 --base=roberta-base

``--runs`` takes finetune run directories and/or peft adapter directories (a
comma-separated list; shell globs are expanded). Writes ``distances.npz`` (every
``T_d[T, T, L]`` with task, layer and module names), ``distances.json`` (layer means
and k+ means) and figures: PCA of the rows of T̄_d (paper A, Figures 2-3), heatmaps
and dendrograms (Figure 4: A, B and BA).
"""
from __future__ import annotations

from absl import app, flags, logging

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
flags.DEFINE_string("out", "out/distances", "Output directory.")
flags.DEFINE_list("kplus_figures", ["5"], "Also draw PCA figures of these k+ layer means.")
flags.DEFINE_bool("figures", True, "Draw the figures.")
flags.DEFINE_float("max_memory", None, "GiB per device for the grid (inputs, results and one "
                   "tile of pairs); sets the tile size. Default: tiles of ~0.5 GiB.")
flags.DEFINE_bool("dry_run", False, "Print the grid's plan (tiles, memory and FLOPs per "
                  "device) and stop.")


def main(argv):
  del argv
  if not FLAGS.runs:
    raise app.UsageError("--runs is required: finetune run or peft adapter directories.")
  srcs = sources.load_sources(sources.expand_paths(FLAGS.runs), base=FLAGS.base)
  stacks = sources.module_stacks(srcs, FLAGS.modules, kind=FLAGS.kind)
  is_lora = all(isinstance(s, tuple) for s in stacks.values())
  factors = FLAGS.factors if is_lora else ["product"]
  metrics = [m for m in FLAGS.metrics if is_lora or m != "grassmann" or FLAGS.top_k]
  if len(metrics) < len(FLAGS.metrics):
    logging.warning("Grassmann skipped: dense task vectors are full rank; pass --top_k.")
  max_memory = None if FLAGS.max_memory is None else int(FLAGS.max_memory * 2 ** 30)
  if FLAGS.dry_run:
    for module, stack in stacks.items():
      print(f"{module}: " + geometry.grid_plan(stack, metrics=metrics, factors=factors,
                                               top_k=FLAGS.top_k, max_memory=max_memory).describe())
    return
  results = geometry.distance_grids(stacks, task_names=[s.name for s in srcs],
                                    metrics=metrics, factors=factors, top_k=FLAGS.top_k,
                                    max_memory=max_memory)
  files = geometry.write_distance_outputs(
      FLAGS.out, results, figures=FLAGS.figures,
      kplus_figures=[int(k) for k in FLAGS.kplus_figures])
  for grid in results.values():
    for line in grid.reports:
      logging.warning("%s", line)
  for note in dict.fromkeys(n for grid in results.values() for n in grid.notes):
    print(f"  note: {note}")
  print(f"{len(srcs)} models x {len(results)} modules -> {FLAGS.out}")
  for kind, paths in files.items():
    print(f"  {kind}: {len(paths)} file(s)")


if __name__ == "__main__":
  app.run(main)
