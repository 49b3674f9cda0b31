"""The distance grid sharded over 8 simulated CPU devices, and over two processes joined by
``jax.distributed`` (the multi-host path), gives the 1-device numbers.

The device count is fixed when JAX initialises, so the comparisons run in
subprocesses started with ``--xla_force_host_platform_device_count``.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest
import jax
import numpy as np

from tvgeo_jax import geometry as geo

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


# Each process: 2 simulated devices of a 4-device global mesh; writes its copy of the grid.
_MULTIHOST = textwrap.dedent("""
    import sys
    import jax, numpy as np
    jax.distributed.initialize(coordinator_address=sys.argv[2], num_processes=2,
                               process_id=int(sys.argv[3]))
    sys.path.insert(0, sys.argv[1])
    from tvgeo_jax import geometry as geo
    sys.path.insert(0, sys.argv[1] + "/tests")
    from test_geometry_sharded import multihost_stack
    raw = geo.grid_arrays(multihost_stack(), factors=geo.FACTORS, tile=2)
    np.savez(sys.argv[4], devices=jax.device_count(), **raw)
    """)


def multihost_stack():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((9, 2, 3, 20)).astype(np.float32)
  b = rng.standard_normal((9, 2, 24, 3)).astype(np.float32)
  b[1], a[1] = b[0] + 1e-3 * b[1], a[0]
  return a, b


def _root():
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ShardedGridTest(absltest.TestCase):

  def test_two_processes_match_one_process(self):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}")
    procs = []
    for i in range(2):     # output to files: a full pipe would stall the other process
      log = open(os.path.join(tmp, f"log{i}"), "w")
      procs.append((subprocess.Popen(
          [sys.executable, "-c", _MULTIHOST, _root(), f"127.0.0.1:{port}", str(i),
           os.path.join(tmp, f"p{i}.npz")], env=env, stdout=log, stderr=log), log))
    for p, log in procs:
      p.wait(timeout=300)
      log.close()
      self.assertEqual(p.returncode, 0, open(log.name).read()[-3000:])
    ref = geo.grid_arrays(multihost_stack(), factors=geo.FACTORS, tile=2,   # this process, 1 device
                          devices=jax.devices()[:1])
    for i in range(2):
      got = np.load(os.path.join(tmp, f"p{i}.npz"))
      self.assertEqual(int(got["devices"]), 4)
      for key in ref:
        np.testing.assert_array_equal(got[key], ref[key], err_msg=f"process {i}: {key}")

  def test_eight_devices_match_one_device(self):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, _root()], env=env, capture_output=True,
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
