"""SVCCA, PWCCA and orthogonal Procrustes against float64 references from the papers.

The references below are written from the definitions, not from analysis/similarity.py:
CCA by whitening (Σxx^-1/2 Σxy Σyy^-1/2, as in Raghu et al. 2017 and Morcos et al. 2018),
SVCCA on the 99%-variance SVD projections, PWCCA with unit-norm canonical variates and
weights Σ_j |<h_i, x_j>|, and the Procrustes distance as the minimum of ‖XQ − Y‖²_F found
by scipy.linalg.orthogonal_procrustes (Ding et al. 2021). Neither anatome nor netrep is on
this machine's package index, so they are not compared.
"""
from __future__ import annotations

from absl.testing import absltest
import numpy as np
import scipy.linalg

from tvgeo_jax.analysis import similarity


def _centre(x):
  x = np.asarray(x, np.float64)
  return x - x.mean(axis=0)


def _inv_sqrt(c):
  lam, v = np.linalg.eigh(c)
  return (v / np.sqrt(lam)) @ v.T


def _cca64(x, y):
  """Canonical correlations (descending), X's whitened directions and whitening matrix."""
  xc, yc = _centre(x), _centre(y)
  wx, wy = _inv_sqrt(xc.T @ xc), _inv_sqrt(yc.T @ yc)
  u, rho, _ = np.linalg.svd(wx @ (xc.T @ yc) @ wy, full_matrices=False)
  return np.clip(rho, 0.0, 1.0), u, wx


def _svcca64(x, y, variance=0.99):
  def reduce(z):
    u, s, _ = np.linalg.svd(_centre(z), full_matrices=False)
    frac = np.cumsum(s ** 2) / np.sum(s ** 2)
    k = int(np.searchsorted(frac, variance) + 1)   # fewest directions reaching `variance`
    return u[:, :k] * s[:k]
  return float(np.mean(_cca64(reduce(x), reduce(y))[0]))


def _pwcca64(x, y):
  rho, u, wx = _cca64(x, y)
  xc = _centre(x)
  h = xc @ wx @ u                     # canonical variates of x, [n, c]
  h /= np.linalg.norm(h, axis=0)
  alpha = np.abs(h.T @ xc).sum(axis=1)
  return float(np.sum(alpha / alpha.sum() * rho))


def _procrustes64(x, y):
  xn, yn = _centre(x), _centre(y)
  xn, yn = xn / np.linalg.norm(xn), yn / np.linalg.norm(yn)
  d = max(xn.shape[1], yn.shape[1])
  xn = np.pad(xn, ((0, 0), (0, d - xn.shape[1])))
  yn = np.pad(yn, ((0, 0), (0, d - yn.shape[1])))
  q, _ = scipy.linalg.orthogonal_procrustes(xn, yn)
  return float(np.linalg.norm(xn @ q - yn) ** 2)


REFS = {"svcca": _svcca64, "pwcca": _pwcca64, "procrustes": _procrustes64}


def _layers(rng, n=300):
  """Two 'models' with 3 layers each of different widths, related to different degrees."""
  z = rng.standard_normal((n, 6))          # shared signal
  x = np.stack([z @ rng.standard_normal((6, 12)) * rng.uniform(0.2, 3, 12)
                + s * rng.standard_normal((n, 12)) for s in (0.1, 1.0, 3.0)])
  y = np.stack([z @ rng.standard_normal((6, 9)) + s * rng.standard_normal((n, 9))
                for s in (0.2, 0.8, 4.0)])
  return (x + 5.0).astype(np.float32), (y - 3.0).astype(np.float32)   # offsets cancel


class SimilarityTest(absltest.TestCase):

  def test_against_float64_references_every_layer_pair(self):
    x, y = _layers(np.random.default_rng(0))
    ours = similarity.layer_similarities(x, y)
    self.assertEqual(set(ours), {"svcca", "pwcca", "procrustes"})
    for name, ref in REFS.items():
      expect = np.array([[ref(x[i], y[j]) for j in range(3)] for i in range(3)])
      self.assertEqual(ours[name].shape, (3, 3))
      np.testing.assert_allclose(ours[name], expect, atol=2e-4, err_msg=name)
    # the measures see the planted ordering: layer 0 (low noise) is closest to y's layer 0
    self.assertGreater(ours["svcca"][0, 0], ours["svcca"][2, 2])
    self.assertLess(ours["procrustes"][0, 0], ours["procrustes"][2, 2])
    # PWCCA is asymmetric (weights are the row model's), SVCCA is symmetric
    back = similarity.layer_similarities(y, x)
    np.testing.assert_allclose(back["svcca"], ours["svcca"].T, atol=1e-5)
    np.testing.assert_allclose(back["procrustes"], ours["procrustes"].T, atol=1e-5)
    self.assertGreater(np.abs(back["pwcca"] - ours["pwcca"].T).max(), 1e-3)
    np.testing.assert_allclose(back["pwcca"], [[_pwcca64(y[i], x[j]) for j in range(3)]
                                               for i in range(3)], atol=2e-4)

  def test_invariances_and_constant_features(self):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 200, 10)).astype(np.float32)
    q = np.linalg.qr(rng.standard_normal((10, 10)))[0]
    rotated = (3.0 * x @ q + 1.0).astype(np.float32)                  # rotation + scale
    mixed = (x @ rng.standard_normal((10, 10))).astype(np.float32)   # invertible map
    rot = similarity.layer_similarities(x, rotated)
    np.testing.assert_allclose(np.diag(rot["procrustes"]), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.diag(rot["svcca"]), 1.0, atol=1e-5)
    lin = similarity.layer_similarities(x, mixed, ["pwcca"])
    np.testing.assert_allclose(np.diag(lin["pwcca"]), 1.0, atol=1e-4)   # CCA: any linear map
    self.assertGreater(similarity.layer_similarities(x, mixed, ["procrustes"])
                       ["procrustes"][0, 0], 1e-2)                     # Procrustes: rotations only
    const = np.concatenate([np.ones((1, 200, 10), np.float32), x[:1]])
    res = similarity.layer_similarities(const, x)
    for name in REFS:
      self.assertTrue(np.all(np.isnan(res[name][0])), name)   # layer 0 constant: undefined
      self.assertFalse(np.any(np.isnan(res[name][1])), name)
    with self.assertRaisesRegex(ValueError, "Unknown representation similarities"):
      similarity.layer_similarities(x, x, ["cca"])
    with self.assertRaisesRegex(ValueError, "same examples"):
      similarity.layer_similarities(x, x[:, :50])

  def test_pairwise_over_models_reuses_bases(self):
    x, y = _layers(np.random.default_rng(2), n=120)
    reps = {"plm": x, "lora": y}
    out = similarity.pairwise_similarities(reps, ["svcca", "procrustes"])
    self.assertEqual(set(out), {"svcca", "procrustes"})
    self.assertEqual(set(out["svcca"]), {("plm", "plm"), ("plm", "lora"), ("lora", "lora")})
    np.testing.assert_allclose(out["procrustes"][("plm", "lora")],
                               similarity.layer_similarities(x, y, ["procrustes"])["procrustes"],
                               atol=1e-6)


  def test_representation_study_writes_them_beside_cka(self):
    import json
    import os
    import tempfile
    from tvgeo_jax import representations
    x, _ = _layers(np.random.default_rng(3), n=64)
    y = (x + np.random.default_rng(4).standard_normal(x.shape)).astype(np.float32)
    out = tempfile.mkdtemp()
    summary = representations.analyse({"plm": x, "lora": y}, out, umap=False, n_clusters=2)
    doc = json.load(open(os.path.join(out, "similarities.json")))
    self.assertEqual(set(doc["measures"]), {"svcca", "pwcca", "procrustes"})
    self.assertEqual(doc["measures"]["procrustes"]["kind"], "distance")
    ref = similarity.layer_similarities(x, y)
    for name in REFS:
      np.testing.assert_allclose(doc["measures"][name]["pairs"]["plm|lora"]["matrix"],
                                 ref[name], atol=1e-6)
      np.testing.assert_allclose(summary["similarity_diagonal"][name]["plm|lora"],
                                 np.diag(ref[name]), atol=1e-6)
      with open(os.path.join(out, f"{name}_heatmaps.png"), "rb") as f:
        self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    with self.assertRaisesRegex(ValueError, "Unknown representation similarities"):
      representations.analyse({"plm": x}, out, umap=False, similarities=["cca"])


if __name__ == "__main__":
  absltest.main()
