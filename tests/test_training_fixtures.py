"""In-memory tasks for the training tests: random token arrays in the batch format.

``topic_task`` is easy: every class has its own block of two token ids and half of each
sequence's tokens are drawn from its class's block (the rest from a shared range), so
even a frozen random encoder's near-uniform attention carries the label (a bag of
words). Batches follow BUILD_NOTES' format (padding rows weight 0) with a
deterministic per-(seed, epoch) shuffle, as the data pipeline's do.
"""
from __future__ import annotations

from typing import Dict, Sequence

from absl.testing import absltest
import numpy as np

from tvgeo_jax.training.loop import TrainingData

PAD, CLS, SEP = 1, 0, 2
SHARED = (20, 1024)
CLASS_BLOCK = 2


def topic_examples(n: int, num_labels: int = 2, seq_len: int = 16, seed: int = 0,
                   lengths: Sequence[int] = ()) -> Dict[str, np.ndarray]:
  """n examples; half the tokens come from the label's own vocabulary block."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_labels, n).astype(np.int32)
  ids = rng.integers(*SHARED, (n, seq_len)).astype(np.int32)
  topical = rng.random((n, seq_len)) < 0.5
  own = SHARED[1] + labels[:, None] * CLASS_BLOCK + rng.integers(0, CLASS_BLOCK, (n, seq_len))
  ids = np.where(topical, own, ids).astype(np.int32)
  mask = np.ones((n, seq_len), np.int32)
  for i in range(n):
    length = int(lengths[i % len(lengths)]) if lengths else seq_len
    ids[i, 0], ids[i, length - 1] = CLS, SEP
    ids[i, length:], mask[i, length:] = PAD, 0
  return {"input_ids": ids, "attention_mask": mask,
          "token_type_ids": np.zeros_like(ids), "labels": labels}


def batches(examples: Dict[str, np.ndarray], batch_size: int, order=None):
  """Fixed-size batches; the last one padded with weight-0 rows."""
  n = examples["labels"].shape[0]
  order = np.arange(n) if order is None else order
  for start in range(0, n, batch_size):
    idx = order[start:start + batch_size]
    b = {k: v[idx] for k, v in examples.items()}
    b["weights"] = np.ones(len(idx), np.float32)
    extra = batch_size - len(idx)
    if extra:
      b = {k: np.concatenate([v, np.repeat(np.zeros_like(v[:1]) if k == "weights" else v[:1],
                                           extra, 0)]) for k, v in b.items()}
    yield b


def topic_task(n_train: int = 256, n_eval: int = 64, num_labels: int = 2, batch_size: int = 16,
                seq_len: int = 16, seed: int = 0) -> TrainingData:
  splits = {name: topic_examples(n, num_labels, seq_len, seed + k)
            for k, (name, n) in enumerate((("train", n_train), ("validation", n_eval),
                                           ("test", n_eval)))}

  def train_batches(epoch):
    order = np.random.default_rng([seed, epoch]).permutation(n_train)
    return batches(splits["train"], batch_size, order)

  return TrainingData(num_labels=num_labels, is_regression=False,
                  label_names=[f"c{i}" for i in range(num_labels)], metrics=("accuracy",),
                  main_metric="accuracy", train_batches=train_batches,
                  num_train_batches=-(-n_train // batch_size),
                  eval_batches=lambda split: batches(splits[split], 32),
                  train_labels=splits["train"]["labels"])


def small_run_config(task="topic", method="full", **overrides):
  """A tiny-random run over ``small_topic_task``: 4 steps per epoch, 2 epochs,
  checkpoints every 2 steps, a loss record every step, dropout off."""
  from tvgeo_jax.training import presets
  base = dict(epochs=2, batch_size=16, checkpoint_every=2, log_every=1, progress=False,
              learning_rate=1e-3, max_seq_len=16, dropout=0.0)
  base.update(overrides)
  return presets.resolve(task, method, "tiny-random", overrides=base)


def small_topic_task() -> TrainingData:
  """64 training examples (4 batches of 16), 32 per evaluation split."""
  return topic_task(n_train=64, n_eval=32, batch_size=16, seq_len=16)


class FixtureTest(absltest.TestCase):

  def test_batches_cover_every_example_once(self):
    ex = topic_examples(37, seq_len=8)
    got = list(batches(ex, 16))
    self.assertLen(got, 3)
    self.assertEqual(sum(float(b["weights"].sum()) for b in got), 37.0)
    real = np.concatenate([b["labels"][b["weights"] > 0] for b in got])
    np.testing.assert_array_equal(real, ex["labels"])


if __name__ == "__main__":
  absltest.main()
