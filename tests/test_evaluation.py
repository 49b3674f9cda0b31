"""tvgeo_jax.evaluation: scores equal the run's results.json; stacked == one at a time.

The reference for ``evaluate`` is the test metrics the training loop wrote at the
end of a (tiny, one-epoch) LoRA run; the reference for ``evaluate_stacked`` is
``evaluate`` on each tree alone.
"""
from __future__ import annotations

import os
import tempfile

from absl.testing import absltest
import jax
import numpy as np

from tvgeo_jax import evaluation
from tvgeo_jax.training import runs
from tvgeo_jax.core import trees
from tvgeo_jax.training import compile_cache, loop, presets


def setUpModule():
  compile_cache.enable(os.path.join(tempfile.gettempdir(), "tvgeo_jax_test_xla_cache"))


def _perturbed(params, seed, scale=5.0):
  """The tree with its LoRA B factors replaced by random ones (predictions change)."""
  rng = np.random.default_rng(seed)
  return trees.map_with_path(
      lambda p, v: (rng.normal(0, scale, np.shape(v)).astype(np.float32)
                    if p[-1] == "lora_b" else v), params)


class EvaluationTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dir = tempfile.mkdtemp()
    config = presets.resolve("synth_sst2", "lora", "tiny-random", overrides=dict(
        epochs=1, data_scale=0.1, max_seq_len=16, batch_size=16, eval_batch_size=16,
        progress=False, lora_rank=4))
    loop.finetune(config, os.path.join(cls.dir, "run"))
    cls.saved = runs.load_run(os.path.join(cls.dir, "run"))

  def test_evaluate_equals_results_json(self):
    r = self.saved
    got = evaluation.evaluate(r.params, r.model_config, r.config, "test")
    want = r.results["metrics"]["test"]
    self.assertEqual(got["num_examples"], want["num_examples"])
    self.assertEqual(got["confusion_matrix"], want["confusion_matrix"])
    self.assertAlmostEqual(got["main"], want["main"], places=6)
    self.assertAlmostEqual(got["loss"], want["loss"], places=5)
    val = evaluation.evaluate(r.params, r.model_config, r.config, "validation")
    self.assertAlmostEqual(val["loss"], r.results["metrics"]["validation"]["loss"], places=5)

  def test_data_is_tokenised_once(self):
    r = self.saved
    a = evaluation.cached_task_data(r.config)
    self.assertIs(evaluation.cached_task_data(r.config.replace(progress=True)), a)
    self.assertIsNot(evaluation.cached_task_data(r.config.replace(max_seq_len=24)), a)

  def test_stacked_equals_one_at_a_time(self):
    r = self.saved
    models = [_perturbed(r.params, s) for s in range(3)] + [r.params]
    shared, varying = evaluation.split_shared(models)
    self.assertTrue(all(k.endswith("lora_b") for k in varying))
    self.assertIn("classifier/out_proj/kernel", shared)
    singles = [evaluation.evaluate(p, r.model_config, r.config) for p in models]
    for chunk in (None, 3):
      stacked = evaluation.evaluate_stacked(models, r.model_config, r.config, chunk_size=chunk)
      self.assertLen(stacked, 4)
      for s, o in zip(stacked, singles):
        self.assertAlmostEqual(s["loss"], o["loss"], places=5)
        self.assertAlmostEqual(s["accuracy"], o["accuracy"], places=6)
        self.assertEqual(s["confusion_matrix"], o["confusion_matrix"])
    losses = [o["loss"] for o in singles]
    self.assertGreater(np.ptp(losses), 1e-3)   # the trees really differ

  def test_errors(self):
    r = self.saved
    other = jax.tree.map(lambda x: x, r.params)
    other["classifier"]["out_proj"]["bias"] = np.zeros(5, np.float32)
    with self.assertRaisesRegex(ValueError, "shape"):
      evaluation.evaluate_stacked([r.params, other], r.model_config, r.config)
    with self.assertRaisesRegex(ValueError, "split must be"):
      evaluation.evaluate(r.params, r.model_config, r.config, "train")
    with self.assertRaisesRegex(ValueError, "labels"):
      evaluation.evaluate(r.params, r.model_config.replace(num_labels=3), r.config)


if __name__ == "__main__":
  absltest.main()
