r"""Pretrain the embedded base: a tiny RoBERTa, masked-LM on the synthetic corpus.

  python -m experiments.pretrain_mlm                  # build into the cache (once)
  python -m experiments.pretrain_mlm --out=DIR --steps=2000 --overwrite

The result is a Hugging Face model directory (config.json, model.safetensors with the MLM
head, the synthetic tokenizer) plus ``pretrain.json`` with the held-out MLM loss against
the unigram baseline. ``--model=embedded`` elsewhere uses the cached copy.
"""
from __future__ import annotations

import dataclasses
import json

from absl import flags, logging

from experiments import cli

from tvgeo_jax.pretraining import embedded

FLAGS = flags.FLAGS
_DEFAULTS = embedded.PretrainConfig()
flags.DEFINE_string("out", None, "Output directory (default: the embedded-base cache).")
flags.DEFINE_bool("overwrite", False, "Pretrain again even if the directory is complete.")
flags.DEFINE_integer("steps", _DEFAULTS.steps, "Optimizer steps.")
flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size, "Blocks per step.")
flags.DEFINE_integer("seq_len", _DEFAULTS.seq_len, "Tokens per (short) block.")
flags.DEFINE_float("learning_rate", _DEFAULTS.learning_rate, "Peak learning rate.")
flags.DEFINE_integer("seed", _DEFAULTS.seed, "Seed (init, data order, masks).")
flags.DEFINE_integer("cls_targets", _DEFAULTS.cls_targets,
                     "Tokens of its block the first position predicts (0: MLM only).")
flags.DEFINE_bool("pair_novelty", _DEFAULTS.pair_novelty,
                  "On pair rows, the first position predicts the words new in the second text.")
flags.DEFINE_bool("pair_match", _DEFAULTS.pair_match,
                  "On pair rows, every token predicts whether its word occurs in the other text.")
flags.DEFINE_integer("pair_every", _DEFAULTS.pair_every,
                     "Every n-th step is a batch of unlabelled text pairs (0: never).")
flags.DEFINE_integer("polar_reviews", _DEFAULTS.polar_reviews,
                     "Polarity-coherent, negation-free reviews added to the MLM training "
                     "texts (synthetic.polar_reviews; 0: none).")
flags.DEFINE_float("polar_negation", _DEFAULTS.polar_negation,
                   "Share of the polar reviews' clauses negated with the opposite adjective "
                   "(the review's polarity kept; 0: none).")

flags.DEFINE_float("word_init_std", _DEFAULTS.word_init_std,
                   "Standard deviation of the initial word embeddings (0: the encoder's "
                   "0.02); a larger start keeps the words of a class apart.")


def main(argv):
  del argv
  out = FLAGS.out or embedded.default_dir()
  if embedded.is_built(out) and not FLAGS.overwrite:
    logging.info("%s is already built; --overwrite to pretrain again.", out)
  else:
    cfg = dataclasses.replace(_DEFAULTS, steps=FLAGS.steps, batch_size=FLAGS.batch_size,
                              seq_len=FLAGS.seq_len, learning_rate=FLAGS.learning_rate,
                              seed=FLAGS.seed, cls_targets=FLAGS.cls_targets,
                              pair_every=FLAGS.pair_every,
                              polar_reviews=FLAGS.polar_reviews,
                              polar_negation=FLAGS.polar_negation,
                              pair_novelty=FLAGS.pair_novelty,
                              pair_match=FLAGS.pair_match,
                              word_init_std=FLAGS.word_init_std)
    config, params, report = embedded.pretrain(cfg)
    embedded.save(out, config, params, report)
  with open(f"{out}/pretrain.json") as f:
    report = json.load(f)
  print(f"embedded base: {out}\n  held-out MLM loss {report['mlm_loss_final']:.3f} nats "
        f"(initial {report['mlm_loss_initial']:.3f}, unigram baseline "
        f"{report['unigram_baseline_loss']:.3f}), {report['steps']} steps, "
        f"{report['wall_time_s']} s")


if __name__ == "__main__":
  cli.run(main)
