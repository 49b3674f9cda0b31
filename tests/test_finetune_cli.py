"""``python -m experiments.finetune`` end to end on the tiny model and a synthetic task,
plus its errors for bad input (each names the problem and the valid values)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(tempfile.gettempdir(), "tvgeo_jax_test_xla_cache")


def finetune_command(*args, **env):
  """(argv, environment) of ``python -m experiments.finetune`` on the CPU; ``env``
  adds environment variables."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
             JAX_PLATFORMS="cpu", **env)
  cmd = [sys.executable, "-m", "experiments.finetune", f"--compilation_cache={CACHE}",
         "--progress=false", *args]
  return cmd, env


def finetune(*args, timeout=240, **env):
  cmd, env = finetune_command(*args, **env)
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


class FinetuneCliTest(absltest.TestCase):

  def test_lora_run_writes_a_complete_run_directory_and_is_skipped_after(self):
    out = os.path.join(tempfile.mkdtemp(), "run")
    common = ["--task=synth_sst2", "--method=lora", "--model=tiny-random", f"--out={out}",
              "--epochs=2", "--data_scale=0.25", "--max_seq_len=16", "--eval_batch_size=32"]
    proc = finetune(*common)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn("synth_sst2 / lora on tiny-random: test accuracy", proc.stdout)
    for name in ("results.json", "run_config.json", "metrics.jsonl", "params", "hf", "adapter"):
      self.assertTrue(os.path.exists(os.path.join(out, name)), name)
    res = json.load(open(os.path.join(out, "results.json")))
    self.assertEqual((res["task"], res["method"], res["base_model"]), ("synth_sst2", "lora", "tiny-random"))
    self.assertEqual(res["config"]["learning_rate"], 3e-3)  # the tiny preset
    self.assertEqual(res["config"]["lora_targets"], ["query", "value"])
    test = res["metrics"]["test"]
    self.assertIn("confusion_matrix", test)
    self.assertIn("per_class", test)
    self.assertEqual(sum(map(sum, test["confusion_matrix"])), test["num_examples"])
    self.assertEqual(res["epochs_trained"], 2)
    # The same command again: skipped. A different learning rate: refused, naming it.
    again = finetune(*common)
    self.assertEqual(again.returncode, 0, again.stderr[-3000:])
    self.assertIn("skipping", again.stderr)
    changed = finetune(*common, "--learning_rate=0.01")
    self.assertNotEqual(changed.returncode, 0)
    self.assertIn("learning_rate: saved 0.003, now 0.01", changed.stderr)
    self.assertEqual(json.load(open(os.path.join(out, "results.json"))), res)

  def test_bad_input_fails_fast_with_the_valid_values(self):
    out = os.path.join(tempfile.mkdtemp(), "run")
    cases = [
        (["--task=no_such_task", "--method=lora"], "Unknown task 'no_such_task'"),
        (["--task=synth_sst2", "--method=ia3"], "full|lora|bottleneck"),
        (["--task=synth_sst2", "--method=lora", "--lora_rank=0"], "lora_rank must be > 0"),
        (["--task=synth_sst2", "--method=full", "--learning_rate=-1"],
         "learning_rate must be > 0"),
    ]
    for args, message in cases:
      proc = finetune(*args, "--model=tiny-random", f"--out={out}", timeout=120)
      self.assertNotEqual(proc.returncode, 0, args)
      self.assertIn(message, proc.stderr, args)
      self.assertFalse(os.path.exists(out), args)  # nothing written


if __name__ == "__main__":
  absltest.main()
