"""Bottleneck adapters as a third method: they learn an easy synthetic task and leave
every frozen weight (all but adapters, LayerNorms and the head) bit-identical."""
from __future__ import annotations

import os
import tempfile

from absl.testing import absltest
import numpy as np

from tvgeo_jax.adapters import partition
from tvgeo_jax.training import runs
from tvgeo_jax.core import trees
from tvgeo_jax.training import compile_cache

import test_training_learns as learns


def setUpModule():
  compile_cache.enable(os.path.join(tempfile.gettempdir(), "tvgeo_jax_test_xla_cache"))


class BottleneckTest(absltest.TestCase):

  def test_trains_and_keeps_frozen_weights(self):
    res, run_dir = learns.train("bottleneck", bottleneck_size=8, epochs=8)
    self.assertGreater(res["metrics"]["test"]["accuracy"], 0.9)
    run = runs.load_run(run_dir)
    base = run.base_params()
    flat = trees.flatten(run.params)
    frozen = [p for p in flat if not partition.is_trainable(p, "bottleneck")]
    adapters = [p for p in flat if any(k.endswith("_adapter") for k in p)]
    self.assertLen(adapters, 2 * 2 * 4)  # 2 layers x 2 adapters x (down, up) x (kernel, bias)
    self.assertEqual(flat[("encoder", "layer_0", "attention_adapter", "down", "kernel")].shape,
                     (64, 8))
    for path in frozen:
      np.testing.assert_array_equal(flat[path], trees.get_path(base, path),
                                    err_msg=trees.path_str(path))
    self.assertFalse(np.array_equal(
        flat[("encoder", "layer_0", "attention_layer_norm", "scale")],
        base["encoder"]["layer_0"]["attention_layer_norm"]["scale"]))


if __name__ == "__main__":
  absltest.main()
