r"""Paper D: multiclass full FT vs multiclass LoRA vs one-vs-reference binary LoRA models.

  python -m experiments.one_vs_rest --task=synth_authorship --model=tiny --out=DIR
  python -m experiments.one_vs_rest --task=TASK --model=distilroberta-base --reference=NAME

Trains (resumably; finished runs are reused) one K-class full-FT model, one K-class
LoRA model and one binary LoRA model per non-reference class (that class vs the
reference class, default "human"), then scores all three on the full K-class test set.
Binary combination: each binary model gives P(class | text); the prediction is the
non-reference class with the highest probability if it exceeds 0.5, else the reference
class. Writes one_vs_rest.json, one_vs_rest.md, predictions.npz and
confusion_matrices.png to --out. Training flags are those of experiments.finetune
(``--method`` is ignored: every approach fixes its own).
"""
from __future__ import annotations

import os

from absl import app, flags

from experiments import cli
from experiments import finetune as ft  # the training flags (one home)

FLAGS = flags.FLAGS
flags.DEFINE_string("reference", None, "Reference class (name or index; default 'human').")
FLAGS.set_default("model", "tiny")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.task:
    raise app.UsageError("--task is required (e.g. --task=synth_authorship).")
  from tvgeo_jax import one_vs_rest
  from tvgeo_jax.training import compile_cache
  cache = FLAGS.compilation_cache
  compile_cache.enable(compile_cache.default_directory() if cache == "default" else cache)
  overrides = {name: FLAGS[name].value for name in ft.HP_FLAGS}
  out = FLAGS.out or os.path.join("runs", FLAGS.task, "one_vs_rest")
  res = one_vs_rest.run_study(FLAGS.task, out, model=FLAGS.model, preset=FLAGS.preset,
                              overrides=overrides, reference=FLAGS.reference,
                              overwrite=FLAGS.overwrite)
  with open(os.path.join(out, one_vs_rest.TABLE_MD)) as f:
    print(f.read())
  print(f"{res['task']} on {res['model']}: outputs in {os.path.abspath(out)}")


if __name__ == "__main__":
  cli.run(main)
