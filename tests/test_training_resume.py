"""Preemption safety: a run killed mid-epoch and rerun ends bit-identical to an
uninterrupted one; a resume with a different config is refused; finished runs are skipped."""
from __future__ import annotations

import json
import os
import tempfile

from absl.testing import absltest
import jax
import numpy as np

from tvgeo_jax.training import runs
from tvgeo_jax.core import trees
from tvgeo_jax.training import compile_cache, loop, presets
from tvgeo_jax.training.checkpoint import RunCheckpoints

import test_training_fixtures as fx


def setUpModule():
  compile_cache.enable(os.path.join(tempfile.gettempdir(), "tvgeo_jax_test_xla_cache"))


def _config(**kw):
  # 96 examples / batch 16 = 6 steps per epoch, 2 epochs; checkpoints at steps 4, 6, 8, 12.
  base = dict(epochs=2, batch_size=16, checkpoint_every=4, log_every=1, progress=False,
              learning_rate=1e-3,
              patience=5, max_seq_len=16)
  base.update(kw)
  return presets.resolve("topic", "full", "tiny-random", overrides=base)


def _data():
  return fx.topic_task(n_train=96, n_eval=32, batch_size=16, seq_len=16)


class ResumeTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.ref_dir = os.path.join(cls.root, "uninterrupted")
    cls.ref = loop.finetune(_config(), cls.ref_dir, data=_data())

  def test_killed_run_resumes_to_bitwise_identical_params(self):
    run_dir = os.path.join(self.root, "killed")
    with self.assertRaises(loop.StopRequested):
      loop.finetune(_config(stop_after_steps=9), run_dir, data=_data())
    self.assertFalse(runs.is_finished(run_dir))
    ck = RunCheckpoints(run_dir)
    self.assertEqual(ck.latest.latest_step(), 8)  # mid-epoch 2; steps 9 was lost
    ck.close()

    # A different hyper-parameter is refused and names the field; the checkpoint survives.
    with self.assertRaisesRegex(ValueError, r"learning_rate: saved 0\.001, now 0\.002"):
      loop.finetune(_config(learning_rate=2e-3), run_dir, data=_data())
    ck = RunCheckpoints(run_dir)
    self.assertEqual(ck.latest.latest_step(), 8)
    ck.close()

    got = loop.finetune(_config(), run_dir, data=_data())  # the same command again
    ref_params = runs.load_run(self.ref_dir).params
    run = runs.load_run(run_dir)
    for path, want in trees.flatten(ref_params).items():
      np.testing.assert_array_equal(trees.get_path(run.params, path), want,
                                    err_msg=trees.path_str(path))
    self.assertEqual(got["metrics"], self.ref["metrics"])
    self.assertEqual([h["validation_loss"] for h in got["history"]],
                     [h["validation_loss"] for h in self.ref["history"]])
    self.assertEqual(got["steps"], 12)
    # The metrics log has each step once, as an uninterrupted run's.
    with open(os.path.join(run_dir, runs.METRICS_LOG)) as f:
      steps = [json.loads(l)["step"] for l in f if '"step"' in l and '"kind": "step"' in l]
    self.assertEqual(steps, sorted(set(steps)))

  def test_finished_run_is_skipped_unless_overwrite(self):
    log = os.path.join(self.ref_dir, runs.METRICS_LOG)
    before = os.path.getmtime(log)
    again = loop.finetune(_config(), self.ref_dir, data=_data())
    self.assertEqual(again, json.load(open(os.path.join(self.ref_dir, runs.RESULTS))))
    self.assertEqual(os.path.getmtime(log), before)

  def test_overwrite_starts_afresh_with_a_new_config(self):
    run_dir = os.path.join(self.root, "overwritten")
    with self.assertRaises(loop.StopRequested):
      loop.finetune(_config(stop_after_steps=5), run_dir, data=_data())
    res = loop.finetune(_config(learning_rate=2e-3, epochs=1), run_dir, data=_data(),
                        overwrite=True)
    self.assertEqual(res["steps"], 6)
    self.assertEqual(runs.load_run(run_dir, load_params=False).config.learning_rate, 2e-3)

  def test_results_and_run_directory(self):
    res = self.ref
    self.assertEqual(res["parameters"]["trainable"], res["parameters"]["total"])
    self.assertEqual(res["devices"]["count"], jax.device_count())
    for split in ("validation", "test"):
      self.assertEqual(res["metrics"][split]["num_examples"], 32)
    for name in (runs.PARAMS, runs.HF, runs.RESULTS, runs.RUN_CONFIG, runs.METRICS_LOG):
      self.assertTrue(os.path.exists(os.path.join(self.ref_dir, name)), name)
    run = runs.load_run(self.ref_dir)
    self.assertEqual((run.task, run.method, run.base_model), ("topic", "full", "tiny-random"))
    base = run.base_params()
    # Base params are the start point: same tree structure, different values after training.
    self.assertEqual(set(trees.flatten(base)), set(trees.flatten(run.params)))
    self.assertFalse(np.array_equal(base["encoder"]["layer_0"]["query"]["kernel"],
                                    run.params["encoder"]["layer_0"]["query"]["kernel"]))
    # The HF export holds the best params.
    from tvgeo_jax.models import load_pretrained
    _, hf = load_pretrained(os.path.join(self.ref_dir, runs.HF))
    np.testing.assert_array_equal(hf["encoder"]["layer_1"]["value"]["kernel"],
                                  run.params["encoder"]["layer_1"]["value"]["kernel"])


if __name__ == "__main__":
  absltest.main()
