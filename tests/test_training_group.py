"""Concurrent fine-tuning (issue 18): three tasks of different sizes and label counts trained
in one vmapped step end as they do trained alone (float32 tolerance), frozen leaves stay
bit-identical, early stopping happens at the same epochs, a killed group resumes bitwise,
finished groups are skipped, incompatible tasks are refused, and 8 simulated devices on a
(tasks, data) mesh give the 1-device results."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from unittest import mock

from absl.testing import absltest
import numpy as np

from tvgeo_jax.adapters import partition
from tvgeo_jax.training import runs
from tvgeo_jax.core import trees
from tvgeo_jax.training import compile_cache, group, loop, presets

import test_training_fixtures as fx

TESTS = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(tempfile.gettempdir(), "tvgeo_jax_test_xla_cache")
# (task, training examples, labels, tokens): 6, 4 and 3 steps per epoch at batch 16; the
# group pads b's and c's batches to 16 tokens (dropout masks must not depend on it).
SPECS = (("a", 96, 2, 16), ("b", 64, 3, 8), ("c", 48, 4, 12))


def setUpModule():
  compile_cache.enable(CACHE)


def _config(name, method, **kw):
  base = dict(epochs=4, batch_size=16, checkpoint_every=100, log_every=1, progress=False,
              learning_rate=3e-3, max_seq_len=16, patience=1, dropout=0.1)
  base.update(kw)
  return presets.resolve("topic", method, "tiny-random", overrides=base).replace(task=name)


def _data(i):
  _, n, k, length = SPECS[i]
  return fx.topic_task(n_train=n, n_eval=32, num_labels=k, batch_size=16, seq_len=length,
                       seed=i)


def _group(root, method, **kw):
  return group.finetune_group([_config(s[0], method, **kw) for s in SPECS],
                              [os.path.join(root, s[0]) for s in SPECS],
                              data=[_data(i) for i in range(len(SPECS))])


def _params(run_dir):
  return trees.flatten(runs.load_run(run_dir).params)


def _losses(run_dir):
  with open(os.path.join(run_dir, runs.METRICS_LOG)) as f:
    return [json.loads(l)["loss"] for l in f if '"kind": "step"' in l]


class GroupEquivalenceTest(absltest.TestCase):
  """Each member ends as its single-task run; not bitwise, since the vmapped products and
  the padded softmax sum in another order: losses within 1e-5, weights within 1e-5
  absolute (1e-4 relative), frozen leaves and step counts exact."""

  def _compare(self, method):
    root = tempfile.mkdtemp()
    alone = [loop.finetune(_config(s[0], method), os.path.join(root, "alone", s[0]),
                           data=_data(i)) for i, s in enumerate(SPECS)]
    together = _group(os.path.join(root, "group"), method)
    for (name, _, k, _), a, g in zip(SPECS, alone, together):
      with self.subTest(f"{method}/{name}"):
        self.assertEqual(g["steps"], a["steps"])
        self.assertEqual((g["best_epoch"], g["epochs_trained"], g["stopped_early"]),
                         (a["best_epoch"], a["epochs_trained"], a["stopped_early"]))
        np.testing.assert_allclose([h["validation_loss"] for h in g["history"]],
                                   [h["validation_loss"] for h in a["history"]],
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(_losses(os.path.join(root, "group", name)),
                                   _losses(os.path.join(root, "alone", name)),
                                   rtol=1e-5, atol=1e-6)
        pa, pg = _params(os.path.join(root, "alone", name)), _params(os.path.join(root, "group", name))
        self.assertEqual(pa.keys(), pg.keys())
        for path in pa:
          self.assertEqual(pa[path].shape, pg[path].shape, path)  # heads at their real width
          if partition.is_trainable(path, method):
            # Adam divides by sqrt(v): on rarely-hit embedding rows a rounding-level
            # gradient difference moves the update by ~1e-6 (lr 3e-3, a dozen steps). The
            # attention key bias has no true gradient at all (softmax ignores a shift
            # shared by every key), so Adam turns pure rounding noise into steps of ~lr/10.
            noise_only = path[-2:] == ("key", "bias")
            np.testing.assert_allclose(pg[path], pa[path], rtol=1e-4,
                                       atol=1e-4 if noise_only else 1e-5, err_msg=str(path))
          else:
            np.testing.assert_array_equal(pg[path], pa[path], err_msg=str(path))
        self.assertEqual(g["metrics"]["test"]["num_examples"], 32)
        self.assertEqual(len(g["metrics"]["test"]["confusion_matrix"]), k)
    # The runs stopped at different epochs, so the comparison covers frozen members too.
    self.assertGreater(len({a["epochs_trained"] for a in alone}) + len({a["steps"] for a in alone}), 2)
    self.assertFalse(any(n.startswith("_group") for n in os.listdir(os.path.join(root, "group"))))

  def test_lora(self):
    self._compare("lora")

  def test_full(self):
    self._compare("full")


class GroupRunTest(absltest.TestCase):

  def test_killed_group_resumes_bitwise_and_finished_group_is_skipped(self):
    root = tempfile.mkdtemp()
    reference = _group(os.path.join(root, "uninterrupted"), "lora", checkpoint_every=4)
    killed = os.path.join(root, "killed")
    with self.assertRaises(loop.StopRequested):
      _group(killed, "lora", checkpoint_every=4, stop_after_steps=9)
    resumed = _group(killed, "lora", checkpoint_every=4)
    for (name, _, _, _), a, b in zip(SPECS, reference, resumed):
      pa, pb = _params(os.path.join(root, "uninterrupted", name)), _params(os.path.join(killed, name))
      for path in pa:
        np.testing.assert_array_equal(pa[path], pb[path], err_msg=f"{name} {path}")
      self.assertEqual(a["metrics"]["test"], b["metrics"]["test"])
      self.assertEqual(_losses(os.path.join(root, "uninterrupted", name)),
                       _losses(os.path.join(killed, name)))
    again = _group(killed, "lora", checkpoint_every=4)  # finished: read back, not trained
    self.assertEqual([r["wall_time_s"] for r in again], [r["wall_time_s"] for r in resumed])

  def test_tasks_that_cannot_share_a_step_are_refused(self):
    configs = [_config("a", "lora"), _config("b", "lora", seed=1)]  # different random bases
    root = tempfile.mkdtemp()
    with self.assertRaisesRegex(ValueError, "'a' and 'b' have different frozen weights"):
      group.finetune_group(configs, [os.path.join(root, "a"), os.path.join(root, "b")],
                           data=[_data(0), _data(1)])
    self.assertFalse([n for n in os.listdir(root) if n.startswith("_group")])  # no lock left
    configs = [_config("a", "lora"), _config("b", "lora", batch_size=8)]
    with self.assertRaisesRegex(ValueError, "'a' and 'b' cannot train in one group: batch_size"):
      group.finetune_group(configs, [tempfile.mkdtemp(), tempfile.mkdtemp()],
                           data=[_data(0), _data(1)])


_MESH_SCRIPT = textwrap.dedent("""
    import json, os, sys, tempfile
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    from tvgeo_jax.core import trees
    from tvgeo_jax.training import runs
    from tvgeo_jax.training import compile_cache, group, presets
    import test_training_fixtures as fx
    compile_cache.enable(sys.argv[2])
    assert jax.device_count() == 8, jax.devices()
    specs = (("a", 96, 2), ("b", 64, 3))
    out = {}
    for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
      root = tempfile.mkdtemp()
      configs = [presets.resolve("topic", "lora", "tiny-random", overrides=dict(
          epochs=2, batch_size=16, progress=False, learning_rate=3e-3, max_seq_len=16,
          dropout=0.1)).replace(task=t) for t, _, _ in specs]
      data = [fx.topic_task(n_train=n, n_eval=32, num_labels=k, batch_size=16, seq_len=16,
                            seed=i) for i, (_, n, k) in enumerate(specs)]
      mesh = group.group_mesh(len(specs), devices)
      res = group.finetune_group(configs, [os.path.join(root, t) for t, _, _ in specs],
                                 data=data, mesh=mesh)
      out[name] = {"mesh": dict(mesh.shape),
                   "val": [[h["validation_loss"] for h in r["history"]] for r in res],
                   "params": [{"/".join(p): np.asarray(v).tolist() for p, v in
                               trees.flatten(runs.load_run(os.path.join(root, t)).params).items()
                               if p[-1] in ("lora_a", "lora_b", "kernel") and "classifier" in p
                               or p[-1] == "lora_b"} for t, _, _ in specs]}
    print(json.dumps(out))
""")


class LengthGroupsTest(absltest.TestCase):

  def test_members_of_similar_length_share_a_group_longest_first(self):
    self.assertEqual(group.length_groups([57, 282, 141, 282, 85], 2), [[1, 3], [2, 4], [0]])
    self.assertEqual(group.length_groups([3, 3, 3], 5), [[0, 1, 2]])

  def test_plan_groups_is_the_cheapest_partition(self):
    """Against every partition of six members (brute force): the plan's estimated cost is
    the minimum, and a short-text member is kept out of the long-text group."""
    steps, tokens = [1120, 1080, 1000, 400, 380, 240], [64, 64, 32, 32, 64, 24]

    def partitions(items):
      if not items:
        yield []
        return
      first, rest = items[0], items[1:]
      for p in partitions(rest):
        yield [[first]] + p
        for i in range(len(p)):
          yield p[:i] + [[first] + p[i]] + p[i + 1:]

    def cost(groups):
      return sum(group.group_cost([steps[i] for i in g], [tokens[i] for i in g]) for g in groups)

    for k in (2, 3, 6):
      plan = group.plan_groups(steps, tokens, k)
      self.assertEqual(sorted(i for g in plan for i in g), list(range(6)))
      self.assertTrue(all(len(g) <= k for g in plan))
      cheapest = min(cost(p) for p in partitions(list(range(6))) if max(map(len, p)) <= k)
      self.assertAlmostEqual(cost(plan), cheapest)
      self.assertLessEqual(cost(plan), cost(group.length_groups(steps, k)))
    # The 32-token member 2 would compute at 64 tokens beside 0 and 1: it trains alone.
    # Longest group first; members of a group in the given order.
    self.assertEqual(group.plan_groups(steps, tokens, 3), [[0, 1], [2], [3, 4, 5]])
    # Small members: the fixed cost of a group outweighs idling, so fewer groups.
    self.assertEqual(group.plan_groups([s // 2 for s in steps], tokens, 3),
                     [[0, 1, 2], [3, 4, 5]])

  def test_many_plans_groups_and_returns_results_in_the_given_order(self):
    root = tempfile.mkdtemp()
    # c (3 steps per epoch), a (6), b (4), one length: {a} then {c, b} computes 6 + 2 × 4
    # member-steps, {a, b} then {c} 2 × 6 + 3.
    order = (2, 0, 1)
    configs = [_config(SPECS[i][0], "lora", epochs=1, patience=0) for i in order]
    with mock.patch.object(group, "finetune_group", wraps=group.finetune_group) as spy:
      out = group.finetune_many(configs, [os.path.join(root, SPECS[i][0]) for i in order],
                                max_concurrent=2, data=[_data(i) for i in order])
    self.assertEqual([[c.task for c in call.args[0]] for call in spy.call_args_list],
                     [["a"], ["c", "b"]])
    self.assertEqual([r["task"] for r in out], ["c", "a", "b"])
    self.assertEqual([r["steps"] for r in out], [3, 6, 4])


class GroupMeshTest(absltest.TestCase):

  def test_eight_devices_two_tasks_by_four_data_match_one_device(self):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, TESTS, CACHE], env=env,
                          capture_output=True, text=True, timeout=400)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    self.assertEqual(out["one"]["mesh"], {"tasks": 1, "data": 1})
    self.assertEqual(out["eight"]["mesh"], {"tasks": 2, "data": 4})
    np.testing.assert_allclose(out["eight"]["val"], out["one"]["val"], rtol=1e-5, atol=1e-6)
    for one, eight in zip(out["one"]["params"], out["eight"]["params"]):
      self.assertEqual(one.keys(), eight.keys())
      self.assertNotEmpty(one)
      for k in one:
        np.testing.assert_allclose(eight[k], one[k], rtol=1e-4, atol=1e-6, err_msg=k)


if __name__ == "__main__":
  absltest.main()
