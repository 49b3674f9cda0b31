"""Tests of tvgeo_jax.core.figures and the geometry output writer (files, PCA, linkage)."""
import json
import os
import tempfile

import matplotlib.pyplot as plt
import numpy as np
from absl.testing import absltest
from scipy.cluster import hierarchy
from scipy.spatial import distance as spdist
from sklearn.decomposition import PCA

from tvgeo_jax.core import figures
from tvgeo_jax import geometry as geo


def _distance_matrix(rng, t=6):
  pts = rng.standard_normal((t, 3))
  return np.linalg.norm(pts[:, None] - pts[None], axis=-1)


class FiguresTest(absltest.TestCase):

  def test_pca_coordinates_match_sklearn_and_numpy(self):
    d = _distance_matrix(np.random.default_rng(0))
    got = figures.pca_coordinates(d)
    np.testing.assert_allclose(got, PCA(n_components=2).fit_transform(d), atol=1e-10)
    # independent: centred rows projected on the top-2 right singular vectors (up to sign)
    c = d - d.mean(axis=0)
    _, _, vt = np.linalg.svd(c)
    ref = c @ vt[:2].T
    np.testing.assert_allclose(np.abs(got), np.abs(ref), atol=1e-10)

  def test_plots_write_png_files(self):
    d = _distance_matrix(np.random.default_rng(1))
    labels = [f"t{i}" for i in range(6)]
    out = tempfile.mkdtemp()
    fig, axes = figures.panels(3)
    coords = figures.plot_pca(axes[0], d, labels)
    np.testing.assert_allclose(coords, PCA(n_components=2).fit_transform(d), atol=1e-10)
    figures.plot_heatmap(axes[1], d, labels)
    z = figures.plot_dendrogram(axes[2], d, labels)
    ref = hierarchy.linkage(spdist.squareform(d, checks=False), method="average")
    np.testing.assert_allclose(z, ref)
    path = os.path.join(out, "sub", "fig.png")
    figures.save_figure(fig, path)
    with open(path, "rb") as f:
      self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    self.assertEqual([n for n in os.listdir(os.path.dirname(path)) if n.startswith(".tmp")], [])

  def test_seeds_are_joined_and_labels_do_not_overlap(self):
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(6, 4))
    points = np.concatenate([centres, centres + 0.01 * rng.normal(size=centres.shape)])
    d = np.linalg.norm(points[:, None] - points[None], axis=-1)
    tasks = [f"task_{i}" for i in range(6)]
    labels = tasks + [t + "#2" for t in tasks]
    fig, (ax,) = figures.panels(1)
    coords = figures.plot_pca(ax, d, labels)
    self.assertEqual(figures.seed_groups(labels)["task_2"], [2, 8])
    joined = [l for l in ax.get_lines() if len(l.get_xdata()) == 2]
    self.assertLen(joined, 6)   # one line per task, from seed 1 to seed 2
    np.testing.assert_allclose(joined[2].get_xydata(), coords[[2, 8]])
    self.assertEqual(sorted(t.get_text() for t in ax.texts), tasks)  # each task labelled once
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in ax.texts]
    overlaps = [(i, j) for i in range(len(boxes)) for j in range(i)
                if boxes[i].overlaps(boxes[j])]
    self.assertEqual(overlaps, [])
    plt.close(fig)

  def test_bad_inputs(self):
    fig, axes = figures.panels(1)
    with self.assertRaisesRegex(ValueError, "square"):
      figures.plot_pca(axes[0], np.zeros((3, 4)), ["a", "b", "c"])
    with self.assertRaisesRegex(ValueError, "NaN"):
      figures.pca_coordinates(np.full((3, 3), np.nan))


class WriteOutputsTest(absltest.TestCase):

  def test_npz_json_and_figures(self):
    rng = np.random.default_rng(2)
    t, l = 4, 3
    a = rng.standard_normal((t, l, 2, 10)).astype(np.float32)
    b = rng.standard_normal((t, l, 8, 2)).astype(np.float32)
    b[2, 0] = 0.0
    names = ["cola", "mrpc", "rte", "sst2"]
    res = geo.distance_grids({"query": (a, b), "value": (a, 3 * b)}, task_names=names,
                             factors=("product", "a", "b"))
    out = os.path.join(tempfile.mkdtemp(), "dist")
    written = geo.write_distance_outputs(out, res, kplus_figures=(2,))
    z = np.load(written["npz"][0])
    self.assertEqual(list(z["task_names"]), names)
    self.assertEqual(list(z["module_names"]), ["query", "value"])
    np.testing.assert_array_equal(z["value/b/grassmann"], res["value"].get("b", "grassmann"))
    doc = json.load(open(written["json"][0]))
    d = res["query"].get("product", "cosine")
    got = np.array(doc["modules"]["query"]["distances"]["product"]["cosine"]["kplus_mean"]["2"],
                   dtype=float)
    np.testing.assert_allclose(got, np.nanmean(d[..., 1:], axis=-1), rtol=1e-6)
    self.assertIn({"module": "query", "factor": "b", "task": "rte", "layer": "layer_0",
                   "issue": "zero matrix",
                   "effect": "no column space: grassmann and cosine distances are NaN"},
                  doc["reports"])
    for name in ("pca_product_cosine.png", "pca_product_grassmann_2plus.png",
                 "heatmap_value_a_l2.png", "dendrogram_query_cosine.png"):
      self.assertIn(os.path.join(out, "figures", name), written["figures"])
    for p in written["figures"]:
      self.assertTrue(os.path.getsize(p) > 1000, p)


if __name__ == "__main__":
  absltest.main()
