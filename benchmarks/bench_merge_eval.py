"""Benchmark: scoring K merged LoRA models stacked (vmap) vs one at a time.

    python -m benchmarks.bench_merge_eval [--k=9] [--examples=512] [--seq_len=64]

The K models are paper A's merges of task 0 with K partners (factor averaging):
same base, same head, different LoRA factors — what ``merge_study.merge_grid``
scores on one task. (a) ``evaluation.evaluate`` per model; (b)
``evaluation.evaluate_stacked`` (the K varying LoRA leaves stacked, one compiled
forward per batch). Random token data in the batch format; two shapes: the
``tiny`` model (hidden 64, 2 layers) and hidden 256 / 4 layers. Times are the best
of ``--repeats`` after a warm-up call (compilation excluded, reported apart).
"""
from __future__ import annotations

import time

from absl import app, flags
import jax
import numpy as np

from benchmarks.timing import best_time
from tvgeo_jax import evaluation, merging
from tvgeo_jax.adapters import lora
from tvgeo_jax.models.config import tiny_config
from tvgeo_jax.models.hf_io import init_params
from tvgeo_jax.training.config import TrainConfig
from tvgeo_jax.evaluation.task_data import TaskData

FLAGS = flags.FLAGS
flags.DEFINE_integer("k", 9, "Merged models per task.")
flags.DEFINE_integer("examples", 512, "Test examples.")
flags.DEFINE_integer("seq_len", 64, "Tokens per example.")
flags.DEFINE_integer("batch", 64, "Eval batch size.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions (best kept).")

SHAPES = {"tiny (h64, L2)": {}, "h256, L4": dict(hidden_size=256, num_hidden_layers=4,
                                                 intermediate_size=1024,
                                                 num_attention_heads=4)}


def random_task(n, seq_len, batch, vocab, seed=0) -> TaskData:
  rng = np.random.default_rng(seed)
  ex = {"input_ids": rng.integers(3, vocab, (n, seq_len)).astype(np.int32),
        "attention_mask": np.ones((n, seq_len), np.int32),
        "token_type_ids": np.zeros((n, seq_len), np.int32),
        "labels": rng.integers(0, 2, n).astype(np.int32)}

  def batches(split):
    for s in range(0, n, batch):
      b = {k: v[s:s + batch] for k, v in ex.items()}
      b["weights"] = np.ones(len(b["labels"]), np.float32)
      yield b

  return TaskData(num_labels=2, is_regression=False, label_names=("a", "b"),
                           metrics=("accuracy",), main_metric="accuracy",
                           train_batches=lambda e: iter(()), num_train_batches=0,
                           eval_batches=batches, train_labels=ex["labels"])


def main(argv):
  del argv
  print(f"device: {jax.devices()[0].device_kind}, K={FLAGS.k}, {FLAGS.examples} examples x "
        f"{FLAGS.seq_len} tokens, batch {FLAGS.batch}")
  for label, over in SHAPES.items():
    cfg = tiny_config(**over)
    base = init_params(cfg, seed=0)
    models = []
    for t in range(FLAGS.k + 1):
      m = lora.inject_lora(base, rank=8, seed=t)
      rng = np.random.default_rng(t)
      m = jax.tree_util.tree_map_with_path(
          lambda p, v: rng.normal(0, 0.05, np.shape(v)).astype(np.float32)
          if str(p[-1]).find("lora_b") >= 0 else v, m)
      models.append(m)
    merged = [merging.lora_factor_average([models[0], m]) for m in models[1:]]
    tc = TrainConfig(task=f"bench_{label}", model="tiny-random", max_seq_len=FLAGS.seq_len,
                     eval_batch_size=FLAGS.batch, progress=False)
    evaluation.set_task_data(tc, random_task(FLAGS.examples, FLAGS.seq_len, FLAGS.batch,
                                             cfg.vocab_size))

    def one_by_one():
      return [evaluation.evaluate(p, cfg, tc) for p in merged]

    def stacked():
      return evaluation.evaluate_stacked(merged, cfg, tc, chunk_size=None)

    t0 = time.perf_counter()
    a = one_by_one()
    c_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = stacked()
    c_st = time.perf_counter() - t0
    diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
    t_one = best_time(one_by_one, FLAGS.repeats)
    t_st = best_time(stacked, FLAGS.repeats)
    print(f"{label}: one-at-a-time {t_one:.3f}s, stacked {t_st:.3f}s, "
          f"speed-up {t_one / t_st:.2f}x (first calls incl. compile {c_one:.2f}s / "
          f"{c_st:.2f}s; max |Δloss| {diff:.1e})")


if __name__ == "__main__":
  app.run(main)
