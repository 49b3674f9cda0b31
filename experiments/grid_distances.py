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

``--measures`` adds, beside (or instead of) the distances: ``subspace_similarity``
(LoRA φ(i, j) of Hu et al. 2021, §7, for A and B; adapter ranks may differ) into
``OUT/subspace_similarity/`` and ``intruders`` (Shuttleworth et al. 2024; full FT,
LoRA and bottleneck runs) into ``OUT/intruders/`` (tvgeo_jax.geometry.measure_outputs):

  python -m experiments.grid_distances --runs=runs/synth_*/* --measures=distances,intruders
"""
from __future__ import annotations

import os

from absl import app, flags, logging

from experiments import cli, model_inputs

from tvgeo_jax import geometry, lora, sources, task_vectors

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(model_inputs)  # --runs and friends in --helpshort
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
flags.DEFINE_list("measures", ["distances"],
                  "distances (l2/cosine/grassmann), subspace_similarity (LoRA φ, Hu et al. "
                  "2021), intruders (intruder dimensions, Shuttleworth et al. 2024).")
flags.DEFINE_integer("intruder_k", 10, "Intruders: top-k singular vectors tested.")
flags.DEFINE_float("intruder_eps", 0.5, "Intruders: max |cos| below which a vector intrudes.")
MEASURES = ("distances", "subspace_similarity", "intruders")

flags.DEFINE_float("max_memory", None, "GiB per device for the grid (inputs, results and one "
                   "tile of pairs); sets the tile size. Default: tiles of ~0.5 GiB.")
flags.DEFINE_bool("dry_run", False, "Print the grid's plan (tiles, memory and FLOPs per "
                  "device) and stop.")

def main(argv):
  del argv
  bad = [m for m in FLAGS.measures if m not in MEASURES]
  if bad or not FLAGS.measures:
    raise app.UsageError(f"--measures: unknown {bad or FLAGS.measures}; choose from {MEASURES}.")
  srcs = model_inputs.load_models(base=FLAGS.base)
  if len(srcs) == 1:
    logging.warning("Only one model (%s): the grid is 1 x 1 (every distance to itself); pass "
                    "two or more runs or adapters.", srcs[0].path)
  if "distances" not in FLAGS.measures:
    return _other_measures(srcs)
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
  _other_measures(srcs)


def _modules():
  return list(task_vectors.MODULES) if FLAGS.modules == ["all"] else FLAGS.modules


def _labels(srcs):
  """Task names, or run/adapter directory names when tasks repeat (r=8 vs r=64 of one task)."""
  if len({s.name.split("#")[0] for s in srcs}) == len(srcs):
    return [s.name for s in srcs]
  return [os.path.basename(os.path.normpath(s.path)) for s in srcs]


def _other_measures(srcs):
  """Subspace similarity and intruder dimensions (``--measures``), after the distances."""
  if "subspace_similarity" in FLAGS.measures:
    _subspace_similarity(srcs)
  if "intruders" in FLAGS.measures:
    _intruders(srcs)


def _subspace_similarity(srcs):
  from tvgeo_jax.geometry import measure_outputs
  loras = [s for s in srcs if lora.has_lora(s.params)]
  if not loras:
    raise ValueError("--measures=subspace_similarity needs LoRA runs or adapters; none of "
                     "--runs carries LoRA factors.")
  if len(loras) < len(srcs):
    logging.warning("subspace_similarity: skipped %s (no LoRA factors).",
                    [s.name for s in srcs if s not in loras])
  facs = {m: [task_vectors.lora_factors(s.params, m) for s in loras] for m in _modules()}
  which = [f for f in FLAGS.factors if f in ("a", "b")] or ["a", "b"]
  ranks = {m: [int(a.shape[1]) for a, _ in pairs] for m, pairs in facs.items()}
  paths = measure_outputs.write_subspace_similarity(
      os.path.join(FLAGS.out, "subspace_similarity"),
      measure_outputs.subspace_similarities(facs, which), _labels(loras), ranks,
      figures=FLAGS.figures)
  print(f"subspace similarity of {len(loras)} LoRA models (ranks "
        f"{next(iter(ranks.values()))}) -> {os.path.dirname(paths[0])}")


def _intruders(srcs):
  from tvgeo_jax.geometry import measure_outputs
  records = measure_outputs.intruder_records(
      _labels(srcs), [s.method for s in srcs], [s.params for s in srcs],
      [None if lora.has_lora(s.params) else s.base_params for s in srcs], _modules(),
      FLAGS.intruder_k, FLAGS.intruder_eps)
  paths = measure_outputs.write_intruders(os.path.join(FLAGS.out, "intruders"), records,
                                          k=FLAGS.intruder_k, eps=FLAGS.intruder_eps,
                                          figures=FLAGS.figures)
  for r in records:
    print(f"intruders {r['name']} ({r['method']}): " + ", ".join(
        f"{m} {int(v['count'].sum())}" for m, v in r["modules"].items()))
  print(f"intruder dimensions (k={FLAGS.intruder_k}, eps={FLAGS.intruder_eps}) -> "
        f"{os.path.dirname(paths[0])}")


if __name__ == "__main__":
  cli.run(main)
