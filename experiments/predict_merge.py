r"""Predict merge damage δ(i, j) from task-vector geometry, scored on held-out tasks.

  python -m experiments.predict_merge --distances=out/distances/lora --merge=out/merge \
      --out=out/predict_merge
  python -m experiments.predict_merge --runs='runs/synth_*/lora' --merge=out/merge

Geometry: ``--distances`` (a ``distances.npz`` or the ``--out`` directory of
``experiments.grid_distances``), or ``--runs`` / ``--runs_file`` (the distances are then
computed here, like grid_distances does). δ: ``--merge``, the ``--out`` directory of
``experiments.merge_grid`` (its ``pairs_{method}.json``). Both must be of the same runs.
Writes ``prediction.json``, ``prediction.md`` and ``predicted_vs_measured.png`` to
``--out``; see ``tvgeo_jax.studies.merge_prediction`` for the features, the
leave-one-task-out scoring and the baselines.
"""
from __future__ import annotations

from absl import app, flags

from experiments import cli, model_inputs

from tvgeo_jax.studies import merge_prediction
from tvgeo_jax import geometry
from tvgeo_jax.studies import sources

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(model_inputs)  # --runs and friends in --helpshort
flags.DEFINE_string("distances", None, "distances.npz, or the directory of "
                    "experiments.grid_distances holding it (instead of --runs).")
flags.DEFINE_string("merge", None, "Output directory of experiments.merge_grid (pairs_*.json).")
flags.DEFINE_string("method", None, "Merge method of the pairs file (default: the only one, "
                    "or lora_factor_average).")
flags.DEFINE_list("modules", ["query", "value"], "--runs: modules of the distances.")
flags.DEFINE_integer("top_k", None, "--runs, full fine-tuning: Grassmann between top-k "
                     "singular subspaces (without it, no Grassmann for dense runs).")
flags.DEFINE_integer("seed", 0, "random_state of the non-linear regressor.")
flags.DEFINE_string("out", "out/predict_merge", "Output directory.")
flags.DEFINE_bool("figures", True, "Draw the predicted-vs-measured figure.")


def _geometry():
  if FLAGS.distances:
    if FLAGS.runs or FLAGS.runs_file:
      raise app.UsageError("Pass --distances or --runs/--runs_file, not both.")
    return merge_prediction.read_distances(FLAGS.distances)
  if not (FLAGS.runs or FLAGS.runs_file):
    raise app.UsageError("Pass --distances (grid_distances output) or --runs/--runs_file.")
  srcs = model_inputs.load_models()
  stacks = sources.module_stacks(srcs, FLAGS.modules)
  is_lora = all(isinstance(s, tuple) for s in stacks.values())
  metrics = geometry.meaningful_metrics(geometry.METRICS, is_lora, FLAGS.top_k)
  grids = geometry.distance_grids(stacks, task_names=[s.name for s in srcs], metrics=metrics,
                                  factors=("product", "a", "b") if is_lora else ("product",),
                                  top_k=None if is_lora else FLAGS.top_k)
  return merge_prediction.distance_arrays(grids)


def main(argv):
  del argv
  if not FLAGS.merge:
    raise app.UsageError("Pass --merge (the output directory of experiments.merge_grid).")
  arrays, names = _geometry()
  pairs = merge_prediction.read_merge_pairs(FLAGS.merge, FLAGS.method)
  res = merge_prediction.run_prediction(arrays, names, pairs, FLAGS.out, figures=FLAGS.figures,
                                        seed=FLAGS.seed)
  print(merge_prediction.prediction_markdown(res))
  for kind, path in res["files"].items():
    print(f"  {kind}: {path}")


if __name__ == "__main__":
  cli.run(main)
