"""δ(i, j) and the Spearman table against a direct scipy loop; NaN rows reported."""
import warnings

from absl.testing import absltest
import numpy as np
import scipy.stats

from tvgeo_jax.studies import interference


def _scipy_loop(delta, dist):
  t = delta.shape[0]
  rho = []
  for i in range(t):
    js = [j for j in range(t) if j != i]
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      rho.append(scipy.stats.spearmanr(delta[i, js], dist[i, js])[0])
  return np.asarray(rho)


class DeltaTest(absltest.TestCase):

  def test_by_hand(self):
    merged = [[0.0, 0.85, 0.60], [0.50, 0.0, 0.80], [0.70, 0.65, 0.0]]
    d = interference.delta_matrix([0.9, 0.8, 0.7], merged)
    np.testing.assert_allclose(d[0, 1:], [0.05, 0.30], atol=1e-12)
    np.testing.assert_allclose(d[1, [0, 2]], [0.30, 0.0], atol=1e-12)
    np.testing.assert_allclose(d[2, :2], [0.0, 0.05], atol=1e-12)
    self.assertTrue(np.all(np.isnan(np.diag(d))))

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, r"\[3, 3\]"):
      interference.delta_matrix([1, 2, 3], np.zeros((3, 2)))
    with self.assertRaisesRegex(ValueError, "T >= 2"):
      interference.delta_matrix([1], np.zeros((1, 1)))


class SpearmanTest(absltest.TestCase):

  def test_matches_scipy_loop_with_ties(self):
    rng = np.random.default_rng(0)
    t = 6
    delta = interference.delta_matrix(rng.integers(80, 90, t),
                                      rng.integers(60, 80, (t, t)).astype(float))
    dists = {"L2": rng.random((t, t)), "cos": rng.integers(0, 3, (t, t)).astype(float)}
    table = interference.spearman_table(delta, dists)
    for name, dist in dists.items():
      want = _scipy_loop(delta, dist)
      np.testing.assert_allclose(table[name]["per_task"], want, atol=1e-12)
      ok = ~np.isnan(want)
      self.assertAlmostEqual(table[name]["mean"], float(np.mean(want[ok])))
      self.assertAlmostEqual(table[name]["std"], float(np.std(want[ok])))
      self.assertEqual(table[name]["n_nan"], int((~ok).sum()))

  def test_constant_row_is_reported(self):
    rng = np.random.default_rng(1)
    t = 4
    merged = rng.random((t, t))
    merged[2] = 0.5  # task 2: every merge scores the same → constant δ row
    delta = interference.delta_matrix(np.ones(t), merged)
    dist = rng.random((t, t))
    table = interference.spearman_table(delta, {"cos": dist, "d_G 5+": dist + 1},
                                        task_names=["cola", "mrpc", "rte", "sst2"])
    want = _scipy_loop(delta, dist)
    self.assertTrue(np.isnan(want[2]))
    self.assertTrue(np.isnan(table["cos"]["per_task"][2]))
    self.assertEqual(table["cos"]["n_nan"], 1)
    self.assertEqual(table["cos"]["n_valid"], 3)
    self.assertEqual(table["cos"]["nan_tasks"], ["rte"])
    self.assertAlmostEqual(table["cos"]["mean"], float(np.nanmean(want)))
    self.assertAlmostEqual(table["cos"]["std"], float(np.nanstd(want)))
    md = interference.spearman_markdown({"Query": table, "Value": table})
    lines = md.splitlines()
    self.assertEqual(lines[0], "| | cos | d_G 5+ |")
    cell = f"{np.nanmean(want):.2f} ({np.nanstd(want):.2f}) [1 NaN]"
    self.assertEqual(lines[2], f"| Query | {cell} | {cell} |")
    self.assertIn("['rte']", md)

  def test_markdown_without_nan_and_column_order(self):
    rng = np.random.default_rng(2)
    delta = interference.delta_matrix(np.ones(5), rng.random((5, 5)))
    table = interference.spearman_table(delta, {"L2": rng.random((5, 5)),
                                                "cos": rng.random((5, 5))})
    md = interference.spearman_markdown({"Value": table}, columns=["cos", "L2", "d_G"])
    row = md.splitlines()[2]
    c = table["cos"]
    self.assertTrue(row.startswith(f"| Value | {c['mean']:.2f} ({c['std']:.2f}) |"))
    self.assertTrue(row.endswith("| – |"))
    self.assertNotIn("NaN", md)

  def test_errors(self):
    delta = interference.delta_matrix(np.ones(3), np.zeros((3, 3)))
    with self.assertRaisesRegex(ValueError, "shape"):
      interference.spearman_table(delta, {"cos": np.zeros((4, 4))})
    with self.assertRaisesRegex(ValueError, "T >= 3"):
      interference.spearman_table(np.zeros((2, 2)), {"cos": np.zeros((2, 2))})
    bad = delta.copy()
    bad[0, 1] = np.nan
    with self.assertRaisesRegex(ValueError, "every merge"):
      interference.spearman_table(bad, {"cos": np.zeros((3, 3))})


if __name__ == "__main__":
  absltest.main()
