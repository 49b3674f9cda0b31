"""A non-finite loss stops the run at the step where it happened and keeps the last
good checkpoint; a bad class-weight request is a clear error."""
from __future__ import annotations

import dataclasses
import os
import tempfile

from absl.testing import absltest
import jax
import numpy as np

from tvgeo_jax.training import runs
from tvgeo_jax.training import compile_cache, loop, presets
from tvgeo_jax.training.checkpoint import RunCheckpoints
from tvgeo_jax.evaluation.task_data import TaskData

import test_training_fixtures as fx


def setUpModule():
  compile_cache.enable(os.path.join(tempfile.gettempdir(), "tvgeo_jax_test_xla_cache"))


def regression_task_with_inf_label(bad_step: int) -> TaskData:
  """A regression task (target = class id) whose batch number ``bad_step`` has an inf target."""
  base = fx.topic_task(n_train=96, n_eval=32, batch_size=16, seq_len=16)

  def as_regression(batches):
    for b in batches:
      yield dict(b, labels=b["labels"].astype(np.float32))

  def train_batches(epoch):
    for i, b in enumerate(as_regression(base.train_batches(epoch))):
      if epoch * base.num_train_batches + i + 1 == bad_step:
        b["labels"][3] = np.inf
      yield b

  return dataclasses.replace(
      base, num_labels=1, is_regression=True, label_names=(), metrics=("pearson", "spearman"),
      main_metric="pearson", train_batches=train_batches,
      eval_batches=lambda split: as_regression(base.eval_batches(split)), train_labels=None)


class NonFiniteLossTest(absltest.TestCase):

  def test_stops_at_the_bad_step_and_keeps_the_last_good_checkpoint(self):
    run_dir = tempfile.mkdtemp()
    config = presets.resolve("topic_regression", "full", "tiny-random", overrides=dict(
        epochs=2, batch_size=16, checkpoint_every=4, progress=False, max_seq_len=16,
        dropout=0.0))
    with self.assertRaisesRegex(loop.NonFiniteLossError,
                                r"at step 10 \(epoch 1\).*last good checkpoint \(step 8\)"):
      loop.finetune(config, run_dir, data=regression_task_with_inf_label(10))
    self.assertFalse(runs.is_finished(run_dir))
    ck = RunCheckpoints(run_dir)
    self.assertEqual(ck.latest.latest_step(), 8)
    self.assertEqual(ck.best.latest_step(), 6)  # end of epoch 1
    state, meta = ck.latest.restore(8).state, ck.latest.restore(8).meta
    ck.close()
    self.assertEqual((meta["epoch"], meta["position"]), (1, 2))
    leaves = jax.tree.leaves(state)
    self.assertTrue(all(np.all(np.isfinite(np.asarray(x))) for x in leaves))

  def test_class_weights_need_training_labels(self):
    data = dataclasses.replace(fx.topic_task(n_train=32, n_eval=16), train_labels=None)
    config = presets.resolve("topic", "full", "tiny-random", overrides=dict(class_weights=True,
                                                                     progress=False))
    with self.assertRaisesRegex(ValueError, "class_weights needs the training labels"):
      loop.finetune(config, tempfile.mkdtemp(), data=data)


if __name__ == "__main__":
  absltest.main()
