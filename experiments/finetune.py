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
import sys

from absl import app, flags, logging

from experiments import multihost
from tvgeo_jax import partition
from tvgeo_jax.training import presets

FLAGS = flags.FLAGS

flags.DEFINE_string("task", None, "Task name (e.g. qnli, synth_sst2).")
flags.DEFINE_enum("method", "lora", list(partition.METHODS), "Fine-tuning method.")
flags.DEFINE_string("model", "roberta-base",
                    "Base model: hub id, local HF directory, or a built-in: 'tiny' (= "
                    "'embedded', the pretrained tiny base), 'tiny-random', 'tiny-bert-random'.")
flags.DEFINE_enum("preset", None, list(presets.PRESETS),
                  "Hyper-parameter preset (default: tiny for the built-in models, else paper).")
flags.DEFINE_string("out", None, "Run directory (default runs/<task>/<method>_<model>_s<seed>).")
flags.DEFINE_bool("overwrite", False, "Redo a finished (or differently configured) run.")
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


def _quiet_orbax() -> None:
  """Drop orbax's per-save INFO lines (dozens per checkpoint) unless --verbosity >= 1."""
  import logging as std_logging

  class _Filter(std_logging.Filter):
    def filter(self, record):
      return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname

  if FLAGS.verbosity < 1:
    logging.get_absl_handler().addFilter(_Filter())


def main(argv):
  _quiet_orbax()
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.task:
    raise app.UsageError("--task is required (e.g. --task=synth_sst2 or --task=qnli).")
  from tvgeo_jax.training import compile_cache, loop
  multihost.initialize_if_requested()
  cache = FLAGS.compilation_cache
  compile_cache.enable(compile_cache.default_directory() if cache == "default" else cache)
  overrides = {name: FLAGS[name].value for name in HP_FLAGS}
  try:
    config = presets.resolve(FLAGS.task, FLAGS.method, FLAGS.model, FLAGS.preset, overrides)
    out = FLAGS.out or default_out(config)
    results = loop.finetune(config, out, overwrite=FLAGS.overwrite)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    logging.error("%s", e)
    sys.exit(f"finetune: error: {e}")
  except loop.StopRequested as e:
    sys.exit(f"finetune: stopped: {e}")
  except KeyboardInterrupt:
    sys.exit("finetune: interrupted; rerun the same command to resume from the latest "
             "checkpoint.")
  print(_summary(results, os.path.abspath(out)))


if __name__ == "__main__":
  app.run(main)
