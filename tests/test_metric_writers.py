"""A run's metrics reach metrics.jsonl and TensorBoard event files; TensorBoard's own event
reader reads the logged scalars back, also after a killed run was resumed."""
from __future__ import annotations

import json
import os
import tempfile

from absl.testing import absltest
import numpy as np
from tensorboard.backend.event_processing import event_accumulator

from tvgeo_jax import runs
from tvgeo_jax.training import compile_cache, loop, metric_writers

import test_training_fixtures as fx


def setUpModule():
  compile_cache.enable(os.path.join(tempfile.gettempdir(), "tvgeo_jax_test_xla_cache"))


_config = fx.small_run_config
_data = fx.small_topic_task



def _jsonl(run_dir):
  with open(os.path.join(run_dir, runs.METRICS_LOG)) as f:
    return [json.loads(line) for line in f if line.strip()]


def _tensorboard(run_dir):
  acc = event_accumulator.EventAccumulator(
      os.path.join(run_dir, metric_writers.TENSORBOARD_DIR), size_guidance={"scalars": 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


class TensorBoardTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.run_dir = os.path.join(cls.root, "run")
    loop.finetune(_config(), cls.run_dir, data=_data())

  def test_event_files_hold_the_logged_scalars(self):
    records = _jsonl(self.run_dir)
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    self.assertLen(steps, 8)
    self.assertLen(epochs, 2)
    tb = _tensorboard(self.run_dir)
    for key in ("loss", "grad_norm", "learning_rate", "tokens_per_s"):
      got = tb[f"train/{key}"]
      self.assertEqual([s for s, _ in got], [r["step"] for r in steps])
      np.testing.assert_allclose([v for _, v in got], [r[key] for r in steps], rtol=1e-6)
    got = tb["validation/loss"]
    self.assertEqual([s for s, _ in got], [4, 8])
    np.testing.assert_allclose([v for _, v in got], [r["validation_loss"] for r in epochs],
                               rtol=1e-6)
    self.assertIn("validation/accuracy", tb)

  def test_a_resumed_run_reads_as_one_uninterrupted_run(self):
    d = os.path.join(self.root, "killed")
    with self.assertRaises(loop.StopRequested):  # checkpoints at steps 3, 4 and 6; step 7
      loop.finetune(_config(stop_after_steps=8, checkpoint_every=3), d, data=_data())  # logged
    self.assertIn(7, [s for s, _ in _tensorboard(d)["train/loss"]])
    loop.finetune(_config(checkpoint_every=3), d, data=_data())
    reference = _tensorboard(self.run_dir)["train/loss"]
    resumed = _tensorboard(d)["train/loss"]  # step 7 was written twice: purged once
    self.assertEqual([s for s, _ in resumed], [s for s, _ in reference])
    np.testing.assert_array_equal([v for _, v in resumed], [v for _, v in reference])
    self.assertEqual([r["step"] for r in _jsonl(d)], [r["step"] for r in _jsonl(self.run_dir)])


if __name__ == "__main__":
  absltest.main()
