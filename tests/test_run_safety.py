"""Nothing lost, nothing silent (issue 17): --overwrite that only replaces runs and keeps the
old one until the new one has a checkpoint, unusable --out paths refused up front, corrupt
checkpoints skipped, one trainer per run directory, set-up failures that do not block the
corrected command, and a non-finite loss whose advice works (--resume_with)."""
from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile

from absl.testing import absltest
import jax
import numpy as np

from tvgeo_jax.core import interrupts, io_utils
from tvgeo_jax.training import runs
from tvgeo_jax.training import compile_cache, loop, run_dir as run_dir_lib

import test_training_fixtures as fx
from test_training_errors import regression_task_with_inf_label


def setUpModule():
  compile_cache.enable(os.path.join(tempfile.gettempdir(), "tvgeo_jax_test_xla_cache"))


_config = fx.small_run_config
_data = fx.small_topic_task



def _final_params(run_dir):
  return runs.load_run(run_dir).params


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class OverwriteTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.finished = os.path.join(cls.root, "finished")
    cls.results = loop.finetune(_config(), cls.finished, data=_data())

  def _copy_of_finished(self, name):
    dst = os.path.join(self.root, name)
    shutil.copytree(self.finished, dst)
    return dst

  def test_refuses_a_directory_that_is_not_a_run(self):
    d = os.path.join(self.root, "notes")
    os.makedirs(d)
    io_utils.atomic_write_text(os.path.join(d, "notes.txt"), "x")
    with self.assertRaisesRegex(ValueError, r"--overwrite refused.*notes\.txt.*Nothing was deleted"):
      loop.finetune(_config(), d, data=_data(), overwrite=True)
    self.assertEqual(sorted(os.listdir(d)), ["notes.txt"])

  def test_refuses_a_run_directory_with_foreign_files(self):
    d = self._copy_of_finished("run_plus_notes")
    io_utils.atomic_write_text(os.path.join(d, "my_analysis.ipynb"), "{}")
    with self.assertRaisesRegex(ValueError, "my_analysis.ipynb"):
      loop.finetune(_config(), d, data=_data(), overwrite=True)
    self.assertTrue(runs.is_finished(d))

  def test_bad_task_with_overwrite_keeps_the_finished_run(self):
    d = self._copy_of_finished("bad_task")
    config = _config().replace(task="synth_sst3")  # unknown: fails while loading the data
    with self.assertRaisesRegex(ValueError, "Unknown task 'synth_sst3'"):
      loop.finetune(config, d, overwrite=True)
    self.assertEqual(io_utils.read_json(os.path.join(d, runs.RESULTS))["metrics"],
                     self.results["metrics"])

  def test_overwrite_replaces_the_run_and_removes_the_old_one_after_a_checkpoint(self):
    d = self._copy_of_finished("replaced")
    new = loop.finetune(_config(seed=1), d, data=_data(), overwrite=True)
    self.assertEqual(new["config"]["seed"], 1)
    self.assertFalse(os.path.exists(d + run_dir_lib.PREVIOUS_SUFFIX))
    self.assertFalse(os.path.exists(os.path.join(d, run_dir_lib.LOCK)))

  def test_failure_before_the_first_checkpoint_puts_the_old_run_back(self):
    d = self._copy_of_finished("rolled_back")
    bad = regression_task_with_inf_label(1)  # non-finite at step 1, before any checkpoint
    config = _config(task="topic_regression")
    with self.assertRaises(loop.NonFiniteLossError):
      loop.finetune(config, d, data=bad, overwrite=True)
    self.assertFalse(os.path.exists(d + run_dir_lib.PREVIOUS_SUFFIX))
    self.assertEqual(io_utils.read_json(os.path.join(d, runs.RESULTS))["metrics"],
                     self.results["metrics"])

  def test_an_overwrite_killed_before_its_first_checkpoint_keeps_the_old_run_aside(self):
    d = os.path.join(self.root, "killed_overwrite")
    shutil.copytree(self.finished, d + run_dir_lib.PREVIOUS_SUFFIX)  # the old run, aside
    os.makedirs(d)  # the new run's directory, killed after writing its config
    io_utils.atomic_write_json(os.path.join(d, runs.RUN_CONFIG), _config(seed=1).to_dict())
    new = loop.finetune(_config(seed=1), d, data=_data())
    self.assertEqual(new["config"]["seed"], 1)
    self.assertFalse(os.path.exists(d + run_dir_lib.PREVIOUS_SUFFIX))


class PathTest(absltest.TestCase):

  def test_glob_characters_are_refused_before_anything_is_written(self):
    d = os.path.join(tempfile.mkdtemp(), "w[1]")
    with self.assertRaisesRegex(ValueError, r"contains \[ \].*glob"):
      loop.finetune(_config(), d, data=_data())
    self.assertFalse(os.path.exists(d))

  def test_a_file_is_refused(self):
    f = os.path.join(tempfile.mkdtemp(), "afile")
    io_utils.atomic_write_text(f, "x")
    with self.assertRaisesRegex(ValueError, "is a file, not a directory"):
      loop.finetune(_config(), f, data=_data())


def _corrupt_truncate(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
           if os.path.isfile(f)]
  assert files, step_dir
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(max(os.path.getsize(f) // 3, 1))


def _corrupt_remove(name):
  def corrupt(step_dir):
    paths = glob.glob(os.path.join(step_dir, "**", name), recursive=True)
    assert paths, (step_dir, name)
    for p in paths:
      os.remove(p)
  return corrupt


CORRUPTIONS = {"truncated data": _corrupt_truncate,
               "no _METADATA": _corrupt_remove("_METADATA"),
               "no checkpoint metadata": _corrupt_remove("_CHECKPOINT_METADATA"),
               "no meta json": _corrupt_remove("metadata")}


class CorruptCheckpointTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.ref_dir = os.path.join(cls.root, "uninterrupted")
    loop.finetune(_config(), cls.ref_dir, data=_data())
    cls.killed = os.path.join(cls.root, "killed")
    with cls.assertRaises(cls, loop.StopRequested):
      loop.finetune(_config(stop_after_steps=5), cls.killed, data=_data())

  def _damaged_copy(self, name, corrupt, steps=(4,)):
    d = os.path.join(self.root, name.replace(" ", "_"))
    shutil.copytree(self.killed, d)
    for step in steps:
      corrupt(os.path.join(d, "checkpoints", "latest", str(step)))
    return d

  def test_each_damage_resumes_bitwise_exactly(self):
    reference = _final_params(self.ref_dir)
    for name, corrupt in CORRUPTIONS.items():
      with self.subTest(name):
        d = self._damaged_copy(name, corrupt)
        with self.assertLogs(level="INFO") as logs:
          loop.finetune(_config(), d, data=_data())
        _assert_trees_equal(_final_params(d), reference)
        set_aside = os.path.isdir(os.path.join(d, "checkpoints", "unreadable", "latest-4"))
        warned = any("step 4" in line and "unreadable" in line for line in logs.output)
        self.assertEqual(set_aside, warned)
        # orbax reads a step without its _CHECKPOINT_METADATA (it only warns); the others
        # must be skipped, with a warning naming the step.
        self.assertEqual(warned, name != "no checkpoint metadata", logs.output[-3:])
        resumed = 2 if warned else 4
        self.assertTrue(any(f"from step {resumed}" in line for line in logs.output))

  def test_no_readable_checkpoint_is_a_one_line_error(self):
    d = self._damaged_copy("all_damaged", _corrupt_truncate, steps=(2, 4))
    with self.assertRaisesRegex(ValueError, r"No readable checkpoint.*--overwrite"):
      loop.finetune(_config(), d, data=_data())


class LockTest(absltest.TestCase):

  def test_a_second_trainer_is_refused_with_the_pid_of_the_first(self):
    d = tempfile.mkdtemp()
    code = ("import sys, time; from tvgeo_jax.training.run_dir import RunLock; "
            "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, d], stdout=subprocess.PIPE, text=True)
    try:
      self.assertEqual(holder.stdout.readline().strip(), "locked")
      with self.assertRaisesRegex(ValueError, rf"another process \(pid {holder.pid} on"):
        loop.finetune(_config(), d, data=_data())
    finally:
      holder.kill()
      holder.wait()
    # The holder is gone: its lock file is stale and the next run takes it over.
    self.assertTrue(os.path.exists(os.path.join(d, run_dir_lib.LOCK)))
    loop.finetune(_config(epochs=1), d, data=_data())
    self.assertTrue(runs.is_finished(d))
    self.assertFalse(os.path.exists(os.path.join(d, run_dir_lib.LOCK)))


class DeferredInterruptTest(absltest.TestCase):
  """Ctrl-C inside a checkpoint save lets the save finish, then interrupts (CI once caught
  one inside orbax's wait_until_finished: orbax logged a traceback of its internals)."""

  def setUp(self):
    super().setUp()
    # A suite started in the background may inherit SIGINT ignored; these tests need
    # Python's own handler, as under a terminal.
    self.addCleanup(signal.signal, signal.SIGINT, signal.getsignal(signal.SIGINT))
    signal.signal(signal.SIGINT, signal.default_int_handler)

  def test_the_block_runs_to_its_end_then_the_interrupt_is_raised(self):
    done = []
    with self.assertRaises(KeyboardInterrupt):
      with interrupts.deferred_interrupt():
        os.kill(os.getpid(), signal.SIGINT)
        done.append("after the signal")
    self.assertEqual(done, ["after the signal"])
    self.assertIs(signal.getsignal(signal.SIGINT), signal.default_int_handler)

  def test_no_signal_no_interrupt_and_a_caller_handler_is_left_alone(self):
    with interrupts.deferred_interrupt():
      pass
    got = []
    signal.signal(signal.SIGINT, lambda *a: got.append("caller's"))
    with interrupts.deferred_interrupt():
      os.kill(os.getpid(), signal.SIGINT)
    self.assertEqual(got, ["caller's"])


class ResumeRulesTest(absltest.TestCase):

  def test_a_setup_failure_does_not_block_the_corrected_command(self):
    d = tempfile.mkdtemp()
    with self.assertRaisesRegex(ValueError, r"\['qeury'\] match no dense module"):
      loop.finetune(_config(method="lora", lora_targets=("qeury", "value")), d, data=_data())
    results = loop.finetune(_config(method="lora", lora_targets=("query",), epochs=1), d,
                            data=_data())
    self.assertEqual(results["config"]["lora_targets"], ["query"])

  def test_non_finite_loss_advice_works(self):
    d = tempfile.mkdtemp()
    config = _config(task="topic_regression", checkpoint_every=4, epochs=3)
    with self.assertRaisesRegex(loop.NonFiniteLossError,
                                r"last good checkpoint \(step 8\).*--resume_with=learning_rate=0\.0001"):
      loop.finetune(config, d, data=regression_task_with_inf_label(10))
    # Without --resume_with the lower rate is refused as a config change, as before...
    with self.assertRaisesRegex(ValueError, "learning_rate: saved"):
      loop.finetune(config.replace(learning_rate=1e-4), d, data=regression_task_with_inf_label(0))
    # ...with it, the run continues from step 8 at the new rate and records it.
    results = loop.finetune(config, d, data=regression_task_with_inf_label(0),
                            resume_with={"learning_rate": 1e-4})
    self.assertEqual(results["resumed_with"], [{"from_step": 8,
                                                "changes": {"learning_rate": 1e-4}}])
    self.assertEqual(results["config"]["learning_rate"], config.learning_rate)
    self.assertEqual(results["steps"], 18)

  def test_non_finite_loss_before_any_checkpoint(self):
    with self.assertRaisesRegex(loop.NonFiniteLossError,
                                r"No checkpoint was saved yet: rerun with --learning_rate=0\.0001"):
      loop.finetune(_config(task="topic_regression"), tempfile.mkdtemp(),
                    data=regression_task_with_inf_label(1))

  def test_resume_with_refuses_fields_that_change_the_layout(self):
    with self.assertRaisesRegex(ValueError, "cannot change lora_rank"):
      loop.finetune(_config(), tempfile.mkdtemp(), data=_data(), resume_with={"lora_rank": 4})


if __name__ == "__main__":
  absltest.main()
