"""``python -m experiments.finetune`` end to end on the tiny model and a synthetic task,
plus its errors for bad input (each names the problem and the valid values)."""
from __future__ import annotations

import json
import os
import signal
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
    cases = [  # (flags, message, exit code: 2 for usage errors, 1 for bad values)
        (["--task=no_such_task", "--method=lora"], "Unknown task 'no_such_task'", 1),
        (["--task=synth_sst2", "--method=ia3"], "full|lora|bottleneck", 2),
        (["--task=synth_sst2", "--method=lora", "--lora_rank=0"], "lora_rank must be > 0", 1),
        (["--task=synth_sst2", "--method=full", "--learning_rate=-1"],
         "learning_rate must be > 0", 1),
        (["--method=lora"], "--task is required", 2),
    ]
    for args, message, code in cases:
      proc = finetune(*args, "--model=tiny-random", f"--out={out}", timeout=120)
      self.assertEqual(proc.returncode, code, (args, proc.stderr[-2000:]))
      self.assertIn(message, proc.stderr, args)
      self.assertIn("finetune: error: ", proc.stderr, args)
      self.assertNotIn("Traceback", proc.stderr, args)
      self.assertFalse(os.path.exists(out), args)  # nothing written


class CliErrorsTest(absltest.TestCase):
  """Issue 17: expected errors are one line with exit 1, Ctrl-C exits 130, --overwrite
  never deletes a directory that is not a run."""

  def test_overwrite_of_a_directory_with_user_files_deletes_nothing(self):
    d = tempfile.mkdtemp()
    with open(os.path.join(d, "notes.txt"), "w") as f:
      f.write("x")
    for task, message in (("synth_sst3", "Unknown task"), ("synth_sst2", "--overwrite refused")):
      proc = finetune(f"--task={task}", "--method=lora", "--model=tiny-random", f"--out={d}",
                      "--overwrite", timeout=120)
      self.assertEqual(proc.returncode, 1, proc.stderr[-2000:])
      self.assertIn(message, proc.stderr)
      self.assertNotIn("Traceback", proc.stderr)
      self.assertEqual(os.listdir(d), ["notes.txt"])

  def test_analysis_errors_are_one_line(self):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "experiments.grid_distances",
                           f"--runs={tempfile.mkdtemp()}/nothing_*"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    self.assertEqual(proc.returncode, 1, proc.stderr[-2000:])
    self.assertRegex(proc.stderr.strip().splitlines()[-1],
                     r"^grid_distances: error: --runs: nothing matches")
    self.assertNotIn("Traceback", proc.stderr)

  def test_ctrl_c_exits_130_and_the_run_resumes(self):
    out = os.path.join(tempfile.mkdtemp(), "run")
    cmd, env = finetune_command("--task=synth_sst2", "--method=full", "--model=tiny-random",
                                f"--out={out}", "--epochs=200", "--patience=0",
                                "--data_scale=0.25", "--max_seq_len=16",
                                "--checkpoint_every=5")
    # The child starts with SIGINT at its default, as under a terminal: a suite launched in
    # the background of a non-interactive shell inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler, so the run trained on and exited 0.
    # --patience=0: it cannot stop early on its own before the signal comes.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
      for line in proc.stderr:  # the first epoch ends: training is under way
        if "epoch 1: validation loss" in line:
          break
      proc.send_signal(signal.SIGINT)
      rest = proc.stderr.read()
      self.assertEqual(proc.wait(timeout=60), 130, rest[-2000:])
    finally:
      proc.kill()
    self.assertIn("finetune: interrupted; rerun the same command to resume", rest)
    self.assertNotIn("Traceback", rest)
    self.assertFalse(os.path.exists(os.path.join(out, "run.lock")))


if __name__ == "__main__":
  absltest.main()
