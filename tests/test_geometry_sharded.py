"""The distance grid sharded over 8 simulated CPU devices gives the 1-device numbers.

The device count is fixed when JAX initialises, so the comparison runs in a
subprocess started with ``--xla_force_host_platform_device_count=8``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from absl.testing import absltest
import numpy as np

_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    from tvgeo_jax import geometry as geo
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((9, 2, 3, 20)).astype(np.float32)
    b = rng.standard_normal((9, 2, 24, 3)).astype(np.float32)
    b[1], a[1] = b[0] + 1e-3 * b[1], a[0]           # a near pair (differenced path, sine step)
    ranks = np.full((9, 2), 3); ranks[4] = 2; a[4, :, 2] = 0; b[4, :, :, 2] = 0
    out = {}
    for n in (1, 8):
      raw = geo.grid_arrays((a, b, ranks), factors=geo.FACTORS, tile=2, devices=jax.devices()[:n])
      out[n] = {k: np.asarray(v).tolist() for k, v in raw.items()}
    print("RESULT" + json.dumps(out))
    """)


class ShardedGridTest(absltest.TestCase):

  def test_eight_devices_match_one_device(self):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, root], env=env, capture_output=True,
                          text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    res = json.loads(line[len("RESULT"):])
    one, eight = res["1"], res["8"]
    self.assertEqual(sorted(one), sorted(eight))
    for key in one:
      # the same tiles run the same code on whichever device holds them
      np.testing.assert_array_equal(np.asarray(eight[key], np.float64),
                                    np.asarray(one[key], np.float64), err_msg=key)
    self.assertTrue(np.isnan(one["a/l2"][0][0][4]))      # rank 3 vs 2: factor-alone L2 is NaN
    self.assertFalse(np.isnan(one["product/l2"][0][0][4]))


if __name__ == "__main__":
  absltest.main()
