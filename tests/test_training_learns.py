"""Full fine-tuning and LoRA learn an easy synthetic task on the tiny model; LoRA leaves
every frozen base weight bit-identical."""
from __future__ import annotations

import json
import os
import tempfile

from absl.testing import absltest, parameterized
import numpy as np

from tvgeo_jax.adapters import partition
from tvgeo_jax.training import runs
from tvgeo_jax.core import trees
from tvgeo_jax.training import compile_cache, loop, presets

import test_training_fixtures as fx


def setUpModule():
  compile_cache.enable(os.path.join(tempfile.gettempdir(), "tvgeo_jax_test_xla_cache"))


def train(method: str, **overrides):
  """The tiny preset (its learning rates), a small budget: 5 epochs of 32 steps."""
  cfg = dict(epochs=5, batch_size=8, progress=False, patience=0, max_seq_len=16,
             log_every=1, dropout=0.0)
  cfg.update(overrides)
  config = presets.resolve("topic", method, "tiny-random", overrides=cfg)
  run_dir = tempfile.mkdtemp()
  data = fx.topic_task(n_train=256, n_eval=64, num_labels=3, batch_size=8, seq_len=16)
  return loop.finetune(config, run_dir, data=data), run_dir


def step_losses(run_dir):
  with open(os.path.join(run_dir, runs.METRICS_LOG)) as f:
    return [r["loss"] for r in map(json.loads, f) if r["kind"] == "step"]


class LearnsTest(parameterized.TestCase):

  @parameterized.parameters("full", "lora")
  def test_loss_decreases_and_beats_chance(self, method):
    res, run_dir = train(method)
    losses = step_losses(run_dir)
    self.assertLen(losses, 5 * 32)
    self.assertLess(np.mean(losses[-32:]), 0.5 * np.mean(losses[:32]))
    self.assertLess(res["history"][-1]["validation_loss"], res["history"][0]["validation_loss"])
    # 3 balanced classes: chance is 1/3.
    self.assertGreater(res["metrics"]["test"]["accuracy"], 0.9)
    self.assertEqual(res["metrics"]["test"]["num_examples"], 64)
    if method == "lora":
      run = runs.load_run(run_dir)
      base = run.base_params()
      frozen_paths = [p for p in trees.flatten(run.params)
                      if not partition.is_trainable(p, "lora") and p[-1] != "lora_scale"]
      self.assertGreater(len(frozen_paths), 30)
      for path in frozen_paths:
        np.testing.assert_array_equal(trees.get_path(run.params, path),
                                      trees.get_path(base, path), err_msg=trees.path_str(path))
      # ... and the LoRA factors and head did train.
      self.assertTrue(np.any(run.params["encoder"]["layer_1"]["value"]["lora_b"] != 0))
      self.assertFalse(np.array_equal(run.params["classifier"]["out_proj"]["kernel"],
                                      base["classifier"]["out_proj"]["kernel"]))
      trainable, total = res["parameters"]["trainable"], res["parameters"]["total"]
      self.assertLess(trainable, total / 10)
      self.assertTrue(os.path.exists(os.path.join(run_dir, runs.ADAPTER)))


if __name__ == "__main__":
  absltest.main()
