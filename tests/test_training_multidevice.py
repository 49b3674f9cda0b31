"""Data parallelism: 8 simulated CPU devices give the 1-device loss trajectory.

The device count is fixed when JAX initialises, so the comparison runs in a
subprocess started with ``--xla_force_host_platform_device_count=8``; inside it the
same train step runs on a 1-device mesh and on the 8-device mesh (dropout on).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest
import numpy as np

_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    from tvgeo_jax.adapters import partition
    from tvgeo_jax.core import sharding, trees
    from tvgeo_jax.models import load_pretrained
    from tvgeo_jax.evaluation import scoring
    from tvgeo_jax.training import compile_cache, optim, step as step_lib
    import test_training_fixtures as fx
    compile_cache.enable(sys.argv[2])
    assert jax.device_count() == 8, jax.devices()
    cfg, params = load_pretrained("tiny-random", num_labels=2)
    ex = fx.topic_examples(64, seq_len=16)
    out = {}
    for n in (1, 8):
      mesh = sharding.data_mesh(jax.devices()[:n])
      trainable, frozen = partition.split(params, "full")
      tx = optim.make_optimizer(trainable, learning_rate=1e-3, total_steps=8,
                                weight_decay=0.01, max_grad_norm=1.0)
      state = sharding.replicate(step_lib.init_state(trainable, tx), mesh)
      frozen = sharding.replicate(frozen, mesh)
      train = step_lib.make_train_step(model_config=cfg, optimizer=tx, mesh=mesh,
                                       is_regression=False, seed=3)
      evaluate = scoring.make_eval_step(model_config=cfg, mesh=mesh, is_regression=False)
      losses = []
      for batch in list(fx.batches(ex, 16)) * 2:
        sb = sharding.shard_batch(batch, mesh)
        shards = len(sb["input_ids"].addressable_shards)
        state, m = train(state, frozen, sb)
        losses.append(float(m["loss"]))
      res = evaluate(partition.combine(state["trainable"], frozen), sb)
      flat = trees.flatten(jax.tree.map(np.asarray, state["trainable"]))
      out[n] = {"losses": losses, "shards": shards, "traces": train._cache_size(),
                "logits": np.asarray(res["logits"]).tolist(),
                "kernel": flat[("encoder", "layer_1", "value", "kernel")].tolist()}
    print("RESULT" + json.dumps(out))
    """)


class MultiDeviceTest(absltest.TestCase):

  def test_eight_devices_match_one_device(self):
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([os.path.dirname(tests_dir),
                                           os.environ.get("PYTHONPATH", "")]))
    cache = os.path.join(tempfile.gettempdir(), "tvgeo_jax_test_xla_cache")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, tests_dir, cache], env=env,
                          capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    res = json.loads(line[len("RESULT"):])
    one, eight = res["1"], res["8"]
    self.assertEqual((one["shards"], eight["shards"]), (1, 8))
    self.assertEqual((one["traces"], eight["traces"]), (1, 1))
    self.assertLen(one["losses"], 8)
    # float32 tolerance: the 8-way gradient all-reduce sums in a different order.
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(eight["logits"], one["logits"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(eight["kernel"], one["kernel"], rtol=1e-4, atol=1e-6)
    # It is actually training: the second pass over the same 4 batches has lower loss.
    self.assertLess(np.mean(one["losses"][4:]), np.mean(one["losses"][:4]))


if __name__ == "__main__":
  absltest.main()
