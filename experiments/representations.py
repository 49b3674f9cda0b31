r"""Paper B's representation study of one task: CKA heatmaps, UMAP maps, cluster make-up.

  python -m experiments.representations --task=synth_sst2 \
      --runs=runs/synth_sst2/full_tiny_s0,runs/synth_sst2/lora_tiny_s0,runs/synth_sst2/bottleneck_tiny_s0

Compares the frozen base model (PLM; ``--base`` overrides the runs' base) with each
finished run (labelled by its method) on the same examples of ``--split``: CKA (and
``--similarities``: SVCCA, PWCCA, orthogonal Procrustes) between every pair of models
(layers × layers), the quartiles and maximum of each row and
column, UMAP of the first-token representations of ``--layers`` fitted on one model
(``--fit_on``, default the bottleneck run) and transformed for the others, paired 2-D
distances, and k-means cluster composition in the full representation space.
Writes PNG figures and JSON numbers to ``--out`` (see tvgeo_jax.representations).
"""
from __future__ import annotations

import json
import os

from absl import app, flags

from experiments import cli

FLAGS = flags.FLAGS

flags.DEFINE_string("task", None, "Task of the runs (checked against them).")
flags.DEFINE_list("runs", None, "Finished run directories (full, lora, bottleneck).")
flags.DEFINE_string("base", None, "Base model for the PLM (default: the runs' base model).")
flags.DEFINE_string("split", "test", "Split whose examples are represented.")
flags.DEFINE_integer("max_examples", 2000, "Examples used (a seeded random subset).")
flags.DEFINE_enum("token", "first", ["first", "mean"], "Pooled token per layer.")
flags.DEFINE_list("layers", None, "Layers for UMAP/clusters (0 = embeddings; default "
                  "first, middle and last encoder layer).")
flags.DEFINE_enum("estimator", "unbiased", ["unbiased", "biased"], "CKA estimator.")
flags.DEFINE_integer("cka_batch_size", 256, "Minibatch size of the CKA (0: one batch).")
flags.DEFINE_list("similarities", ["svcca", "pwcca", "procrustes"],
                  "Layer similarities besides CKA (Raghu 2017, Morcos 2018, Ding 2021); "
                  "'none' for CKA only.")
flags.DEFINE_bool("umap", True, "Compute UMAP maps (numba compiles slowly the first time).")
flags.DEFINE_string("fit_on", None, "Model the UMAP is fitted on (default: bottleneck run).")
flags.DEFINE_integer("n_neighbors", 15, "UMAP n_neighbors.")
flags.DEFINE_bool("approximate", True, "UMAP approximate nearest neighbours (faster for "
                  "thousands of points).")
flags.DEFINE_integer("clusters", 4, "k of the k-means clustering.")
flags.DEFINE_integer("seed", None, "Seed of UMAP and k-means (default: the run's seed).")
flags.DEFINE_integer("batch_size", 64, "Batch size of the forward passes.")
flags.DEFINE_string("out", None, "Output directory (default runs/<task>/representations).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.runs:
    raise app.UsageError("--runs is required: finished run directories, comma-separated.")
  from tvgeo_jax import representations
  try:
    layers = [int(l) for l in FLAGS.layers] if FLAGS.layers else None
  except ValueError:
    raise app.UsageError(f"--layers must be integers, got {FLAGS.layers}.") from None
  out = FLAGS.out or os.path.join("runs", FLAGS.task or "task", "representations")
  kwargs = dict(layers=layers, estimator=FLAGS.estimator,
                cka_batch_size=FLAGS.cka_batch_size or None, umap=FLAGS.umap,
                fit_on=FLAGS.fit_on, n_neighbors=FLAGS.n_neighbors,
                approximate=FLAGS.approximate, n_clusters=FLAGS.clusters,
                similarities=[m for m in FLAGS.similarities if m != "none"])
  if FLAGS.seed is not None:
    kwargs["seed"] = FLAGS.seed
  summary = representations.run_study(
      FLAGS.runs, out, task=FLAGS.task, base=FLAGS.base, split=FLAGS.split,
      max_examples=FLAGS.max_examples, token=FLAGS.token, batch_size=FLAGS.batch_size,
      **kwargs)
  print(f"{summary['task']}: models {', '.join(summary['models'])} on "
        f"{summary['num_examples']} {summary['split']} examples; outputs in "
        f"{os.path.abspath(out)}")
  print(json.dumps({"cka_diagonal": summary["cka_diagonal"]}, indent=None)[:2000])


if __name__ == "__main__":
  cli.run(main)
