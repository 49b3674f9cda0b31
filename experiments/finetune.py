r"""Fine-tune a BERT-family encoder on one task: full fine-tuning, LoRA or bottleneck adapters.

  python -m experiments.finetune --task=qnli --method=lora               # paper preset
  python -m experiments.finetune --task=synth_sst2 --method=full --model=tiny --out=DIR

Every hyper-parameter is a flag; unset flags take the preset's value (``--preset``,
default ``tiny`` for the tiny/embedded bases and ``paper`` otherwise). Rerunning the
same command after an interruption resumes from the latest checkpoint; a finished
run is skipped unless ``--overwrite``. Data-parallel over every visible device;
``--multihost`` starts the multi-host runtime first (TPU pods, several GPU hosts; see
``experiments/multihost.py``).
"""
from __future__ import annotations

import os
import re

from absl import app, flags

from experiments import cli, multihost
from tvgeo_jax import partition
from tvgeo_jax.training import presets

FLAGS = flags.FLAGS

flags.DEFINE_string("task", None,
                    "Task name (e.g. qnli, synth_sst2), or a comma-separated list: the tasks "
                    "then train concurrently, in one compiled step vmapped over tasks.")
flags.DEFINE_integer("max_concurrent", None,
                     "With several --task: at most this many tasks per concurrent group (the "
                     "rest queued); default all.")
flags.DEFINE_enum("method", "lora", list(partition.METHODS), "Fine-tuning method.")
flags.DEFINE_string("model", "roberta-base",
                    "Base model: hub id, local HF directory, or a built-in: 'tiny' (= "
                    "'embedded', the pretrained tiny base), 'tiny-random', 'tiny-bert-random'.")
flags.DEFINE_enum("preset", None, list(presets.PRESETS),
                  "Hyper-parameter preset (default: tiny for the built-in models, else paper).")
flags.DEFINE_string("out", None, "Run directory (default runs/<task>/<method>_<model>_s<seed>); "
                    "with several tasks, the parent of one run directory per task, OUT/<task>.")
flags.DEFINE_bool("overwrite", False,
                  "Redo a finished (or differently configured) run. Only a run directory is "
                  "replaced, and the old run is kept as OUT.previous until the new one has "
                  "its first checkpoint.")
flags.DEFINE_list("resume_with", None,
                  "Resume an unfinished run with changed values, e.g. learning_rate=1e-4 "
                  "after a non-finite loss (learning_rate, max_grad_norm, weight_decay, "
                  "adam_eps, dtype); recorded in results.json.")
flags.DEFINE_string("compilation_cache", "default",
                    "XLA compilation cache directory ('default': ~/.cache/tvgeo_jax/xla; "
                    "'' disables).")
# Hyper-parameters: None means "the preset's value".
flags.DEFINE_integer("seed", None, "Seed (model head, adapters/LoRA init, data order, dropout).")
flags.DEFINE_float("learning_rate", None, "Peak learning rate.")
flags.DEFINE_integer("batch_size", None, "Global training batch size.")
flags.DEFINE_integer("epochs", None, "Maximum number of epochs.")
flags.DEFINE_integer("patience", None, "Early-stopping patience in epochs (0: never stop).")
flags.DEFINE_float("weight_decay", None, "AdamW weight decay (not on biases/LayerNorm).")
flags.DEFINE_float("warmup_ratio", None, "Share of steps with linear warm-up.")
flags.DEFINE_float("max_grad_norm", None, "Global gradient-norm clip (0: off).")
flags.DEFINE_float("adam_b1", None, "AdamW beta1.")
flags.DEFINE_float("adam_b2", None, "AdamW beta2.")
flags.DEFINE_float("adam_eps", None, "AdamW epsilon.")
flags.DEFINE_bool("class_weights", None, "Balanced class weights in the loss (paper D).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_float("dropout", None, "Override the encoder's dropout probabilities.")
flags.DEFINE_integer("lora_rank", None, "LoRA rank r.")
flags.DEFINE_float("lora_alpha", None, "LoRA alpha (scale alpha / r).")
flags.DEFINE_list("lora_targets", None, "Modules that get LoRA factors.")
flags.DEFINE_integer("bottleneck_size", None, "Adapter bottleneck width (0: use the factor).")
flags.DEFINE_integer("bottleneck_reduction_factor", None, "hidden_size / bottleneck width.")
flags.DEFINE_integer("max_seq_len", None, "Maximum tokens per example.")
flags.DEFINE_float("data_scale", None, "Size multiplier of synthetic tasks.")
flags.DEFINE_string("data_dir", None, "Local copy of a real task's data (instead of the hub).")
flags.DEFINE_string("data_revision", None, "Hub dataset revision (branch, tag or commit).")
flags.DEFINE_integer("eval_batch_size", None, "Evaluation batch size.")
flags.DEFINE_integer("checkpoint_every", None, "Save the latest state every N steps.")
flags.DEFINE_integer("log_every", None, "Log the training loss every N steps.")
flags.DEFINE_bool("progress", None, "Show a progress bar.")
flags.DEFINE_integer("stop_after_steps", None,
                     "Stop (as if killed) after this many steps; for testing resumption.")

HP_FLAGS = ("seed", "learning_rate", "batch_size", "epochs", "patience", "weight_decay",
            "warmup_ratio", "max_grad_norm", "adam_b1", "adam_b2", "adam_eps",
            "class_weights", "dtype", "dropout", "lora_rank", "lora_alpha", "lora_targets",
            "bottleneck_size", "bottleneck_reduction_factor", "max_seq_len", "data_scale",
            "data_dir", "eval_batch_size", "checkpoint_every", "log_every", "progress",
            "stop_after_steps", "data_revision")


def default_out(config) -> str:
  model = re.sub(r"[^A-Za-z0-9._-]+", "-", os.path.basename(config.model.rstrip("/")))
  return os.path.join("runs", config.task, f"{config.method}_{model}_s{config.seed}")


def _summary(results: dict, out: str) -> str:
  test = results["metrics"]["test"]
  main = results.get("main_metric", "accuracy")
  scores = ", ".join(f"{k} {test[k]:.4f}" for k in ("accuracy", "f1", "mcc", "pearson",
                                                     "spearman") if k in test)
  p = results["parameters"]
  return (f"{results['task']} / {results['method']} on {results['base_model']}: test {scores} "
          f"(main: {main}); best epoch {results['best_epoch'] + 1} of "
          f"{results['epochs_trained']}; trainable {p['trainable']:,} of {p['total']:,} "
          f"({100 * p['trainable_share']:.3f}%); {results['wall_time_s']:.1f} s; {out}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.task:
    raise app.UsageError("--task is required (e.g. --task=synth_sst2 or --task=qnli).")
  from tvgeo_jax.training import compile_cache, config as config_lib, loop
  resume_with = config_lib.parse_resume_with(FLAGS.resume_with)
  multihost.initialize_if_requested()
  cache = FLAGS.compilation_cache
  compile_cache.enable(compile_cache.default_directory() if cache == "default" else cache)
  overrides = {name: FLAGS[name].value for name in HP_FLAGS}
  tasks = [t.strip() for t in FLAGS.task.split(",") if t.strip()]
  configs = [presets.resolve(t, FLAGS.method, FLAGS.model, FLAGS.preset, overrides)
             for t in tasks]
  if len(configs) == 1:
    out = FLAGS.out or default_out(configs[0])
    results = [loop.finetune(configs[0], out, overwrite=FLAGS.overwrite,
                             resume_with=resume_with)]
    outs = [out]
  else:
    if resume_with:
      raise app.UsageError("--resume_with applies to one task; resume that task alone.")
    from tvgeo_jax.training import group
    outs = [os.path.join(FLAGS.out, c.task) if FLAGS.out else default_out(c) for c in configs]
    results = group.finetune_many(configs, outs, max_concurrent=FLAGS.max_concurrent,
                                  overwrite=FLAGS.overwrite)
  for r, out in zip(results, outs):
    print(_summary(r, os.path.abspath(out)))


if __name__ == "__main__":
  cli.run(main)
