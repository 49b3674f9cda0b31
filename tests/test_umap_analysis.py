"""Tests for tvgeo_jax.analysis.umap_analysis (small: a few hundred low-dim points)."""
import os
import tempfile

import numpy as np
from absl.testing import absltest

from tvgeo_jax.analysis import umap_analysis as ua


def _blobs(rng, n=200, d=12, sep=8.0):
  """Two Gaussian blobs; returns points and blob ids."""
  ids = np.arange(n) % 2
  centres = rng.randn(2, d)
  centres *= sep / np.linalg.norm(centres[0] - centres[1])
  return (centres[ids] + rng.randn(n, d)).astype(np.float32), ids


class UmapTest(absltest.TestCase):

  def test_projections_are_reproducible_and_transform_the_other_models(self):
    rng = np.random.RandomState(0)
    bn, ids = _blobs(rng)
    reps = {
        "bn": bn,
        "plm": bn + 0.05 * rng.randn(*bn.shape).astype(np.float32),  # nearly the same
        "ft": bn[rng.permutation(len(bn))],  # same distribution, pairing broken
    }
    # Exact neighbours keep the test fast: the approximate path's numba kernels take
    # ~30-60 s to compile per process on a small shared CPU (checked by hand).
    first = ua.umap_projections(reps, "bn", seed=3, n_neighbors=10, approximate=False)
    second = ua.umap_projections(reps, "bn", seed=3, n_neighbors=10, approximate=False)
    self.assertEqual(list(first), ["bn", "plm", "ft"])
    for name in reps:
      self.assertEqual(first[name].shape, (len(bn), 2))
      self.assertTrue(np.all(np.isfinite(first[name])))
      np.testing.assert_array_equal(first[name], second[name])  # bit-identical
    # The map separates the two blobs.
    p = first["bn"]
    gap = np.linalg.norm(p[ids == 0].mean(0) - p[ids == 1].mean(0))
    spread = max(p[ids == k].std(0).max() for k in (0, 1))
    self.assertGreater(gap, 2 * spread)
    # Paired by example: the near-copy lands near its fitted points, the shuffle does not.
    dist = ua.paired_distances(first)
    self.assertLess(dist["bn"]["plm"] * 3, dist["bn"]["ft"])
    with self.assertRaisesRegex(ValueError, "fit_on"):
      ua.umap_projections(reps, "lora")


class NumbersAndFiguresTest(absltest.TestCase):

  def test_paired_distances(self):
    rng = np.random.RandomState(1)
    pts = {"a": rng.randn(30, 2), "b": rng.randn(30, 2), "c": rng.randn(30, 2)}
    out = ua.paired_distances(pts)
    for a in pts:
      self.assertEqual(out[a][a], 0.0)
      for b in pts:
        expected = np.mean([np.sqrt(((pts[a][i] - pts[b][i]) ** 2).sum()) for i in range(30)])
        self.assertAlmostEqual(out[a][b], expected, places=12)
    with self.assertRaisesRegex(ValueError, "same examples"):
      ua.paired_distances({"a": np.zeros((3, 2)), "b": np.zeros((4, 2))})

  def test_cluster_composition_in_full_space(self):
    rng = np.random.RandomState(2)
    x, ids = _blobs(rng, n=120, d=16, sep=20.0)
    far = x + 200.0
    out = ua.cluster_composition({"plm": x, "bn": x.copy(), "ft": far}, n_clusters=3, seed=0)
    self.assertEqual(out["models"], ["plm", "bn", "ft"])
    counts = np.array(out["counts"])
    self.assertEqual(counts.shape, (3, 3))
    np.testing.assert_array_equal(counts.sum(0), [120, 120, 120])
    shares = sorted(tuple(np.round(r, 6)) for r in out["share_of_cluster"])
    # Identical models share their clusters half and half; the distant model is alone.
    self.assertEqual(shares, [(0.0, 0.0, 1.0), (0.5, 0.5, 0.0), (0.5, 0.5, 0.0)])
    np.testing.assert_allclose(np.sum(out["share_of_model"], axis=0), 1.0)
    np.testing.assert_array_equal(out["labels"]["plm"], out["labels"]["bn"])
    # The two blobs of plm land in different clusters, each blob in one cluster.
    lab = np.array(out["labels"]["plm"])
    self.assertEqual(len(set(lab[ids == 0])), 1)
    self.assertNotEqual(lab[ids == 0][0], lab[ids == 1][0])
    with self.assertRaisesRegex(ValueError, "n_clusters"):
      ua.cluster_composition({"a": x}, n_clusters=0)

  def test_cka_summary_quartiles_and_max(self):
    m = np.array([[0.0, 1.0, 2.0, 3.0, 4.0],
                  [4.0, 4.0, 4.0, 4.0, 8.0]])
    out = ua.cka_summary(m)
    self.assertEqual(out["rows"]["q1"], [1.0, 4.0])
    self.assertEqual(out["rows"]["median"], [2.0, 4.0])
    self.assertEqual(out["rows"]["q3"], [3.0, 4.0])
    self.assertEqual(out["rows"]["max"], [4.0, 8.0])
    self.assertEqual(out["columns"]["max"], [4.0, 4.0, 4.0, 4.0, 8.0])
    self.assertEqual(out["columns"]["median"], [2.0, 2.5, 3.0, 3.5, 6.0])
    with self.assertRaisesRegex(ValueError, "2-D"):
      ua.cka_summary(np.zeros(3))

  def test_figures_are_written_as_png(self):
    import matplotlib.image
    rng = np.random.RandomState(3)
    with tempfile.TemporaryDirectory() as d:
      heat = os.path.join(d, "figs", "cka.png")
      ua.plot_cka_heatmaps({("plm", "ft"): rng.rand(3, 3), ("plm", "bn"): rng.rand(3, 3)},
                           heat)
      scatter = os.path.join(d, "umap.png")
      ua.plot_umap({1: {"bn": rng.randn(20, 2), "ft": rng.randn(20, 2)},
                    2: {"bn": rng.randn(20, 2), "ft": rng.randn(20, 2)}}, scatter, fit_on="bn")
      for path in (heat, scatter):
        with open(path, "rb") as f:
          self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        img = matplotlib.image.imread(path)
        self.assertGreater(img.shape[0], 100)
        self.assertGreater(img.shape[1], 100)
      self.assertEqual(sorted(os.listdir(os.path.join(d, "figs"))), ["cka.png"])  # no temps
    with self.assertRaisesRegex(ValueError, "No CKA"):
      ua.plot_cka_heatmaps({}, "x.png")


if __name__ == "__main__":
  absltest.main()
