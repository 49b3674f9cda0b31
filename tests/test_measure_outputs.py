"""Files and figures of the subspace-similarity and intruder measures (grid_distances)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import numpy as np

from tvgeo_jax.geometry import measure_outputs, subspace_similarity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png(path):
  with open(path, "rb") as f:
    return f.read(8) == b"\x89PNG\r\n\x1a\n"


class MeasureOutputsTest(absltest.TestCase):

  def test_subspace_similarity_files_with_different_ranks(self):
    rng = np.random.default_rng(0)
    L, n = 2, 40
    factors = {"query": [(rng.standard_normal((L, r, n)), rng.standard_normal((L, n, r)))
                         for r in (4, 4, 16)]}
    res = measure_outputs.subspace_similarities(factors)
    self.assertEqual(res["query"]["a"].shape, (3, 3, L, 16, 16))
    np.testing.assert_allclose(
        res["query"]["b"][0, 2, 1, :4, :16],
        subspace_similarity.subspace_similarity(factors["query"][0][1][1],
                                                factors["query"][2][1][1], "b"), atol=1e-6)
    out = os.path.join(tempfile.mkdtemp(), "ss")
    paths = measure_outputs.write_subspace_similarity(out, res, ["t0", "t1", "t2"], [4, 4, 16])
    self.assertLen(paths, 6)
    for p in paths:
      self.assertTrue(os.path.exists(p), p)
      if p.endswith(".png"):
        self.assertTrue(_png(p))
    doc = json.load(open(os.path.join(out, "phi.json")))
    top = np.array(doc["modules"]["query"]["a"]["layer_mean_phi_top_i"], dtype=float)
    import warnings
    warnings.simplefilter("ignore", RuntimeWarning)   # nanmean of all-NaN entries
    np.testing.assert_allclose(
        top, subspace_similarity.phi_top(np.nanmean(res["query"]["a"], axis=2)), atol=1e-6)
    self.assertTrue(np.isnan(top[0, 2, 4]))             # beyond task 0's rank: null
    self.assertEqual(np.load(os.path.join(out, "phi.npz"))["query/a"].shape, (3, 3, L, 16, 16))

  def test_intruder_records_and_files(self):
    rng = np.random.default_rng(1)
    kernel = rng.standard_normal((2, 16, 16)).astype(np.float32)
    base = {"encoder": {f"layer_{i}": {"query": {"kernel": kernel[i]}} for i in range(2)}}
    ft = {"encoder": {f"layer_{i}": {"query": {"kernel": kernel[i] + 0.01 * i}}
                      for i in range(2)}}
    records = measure_outputs.intruder_records(["sst2", "rte"], ["full", "bottleneck"],
                                               [ft, base], [base, base], ["query"], k=3)
    self.assertEqual(records[1]["modules"]["query"]["count"].tolist(), [0, 0])
    out = os.path.join(tempfile.mkdtemp(), "intr")
    paths = measure_outputs.write_intruders(out, records, k=3, eps=0.5)
    doc = json.load(open(paths[0]))
    self.assertEqual([m["method"] for m in doc["models"]], ["full", "bottleneck"])
    self.assertEqual(doc["models"][0]["modules"]["query"]["count_per_layer"],
                     records[0]["modules"]["query"]["count"].tolist())
    self.assertTrue(_png(paths[1]))


  def test_cli_rejects_unknown_measures_before_loading_anything(self):
    # The full CLI path on run directories (LoRA r=8 + r=64 + full + bottleneck) takes
    # ~40 s on 2 loaded cores and is checked by hand (BUILD_NOTES); the writers it calls
    # are tested above.
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    bad = subprocess.run([sys.executable, "-m", "experiments.grid_distances",
                          "--runs=/nonexistent", "--measures=distances,cka"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    self.assertNotEqual(bad.returncode, 0)
    self.assertIn("--measures: unknown ['cka']", bad.stderr)


if __name__ == "__main__":
  absltest.main()
