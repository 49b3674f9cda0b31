"""LoRA subspace similarity φ (Hu et al. 2021 §7) against float64 numpy and planted subspaces."""
from __future__ import annotations

from absl.testing import absltest
import numpy as np

from tvgeo_jax.geometry import subspace_similarity as ss


def _phi64(m1, m2, factor):
  """φ(i, j) straight from the definition, float64 (independent of the module)."""
  def basis(m):
    m = np.asarray(m, np.float64)
    if factor == "a":             # right-singular vectors of A (r, in)
      return np.linalg.svd(m, full_matrices=False)[2].T
    return np.linalg.svd(m, full_matrices=False)[0]
  u1, u2 = basis(m1), basis(m2)
  out = np.zeros((u1.shape[1], u2.shape[1]))
  for i in range(1, u1.shape[1] + 1):
    for j in range(1, u2.shape[1] + 1):
      out[i - 1, j - 1] = np.linalg.norm(u1[:, :i].T @ u2[:, :j]) ** 2 / min(i, j)
  return out


def _orthogonal(rng, n):
  return np.linalg.qr(rng.standard_normal((n, n)))[0]


def _planted_pair(rng, n, r1, r2, theta):
  """A1 (r1, n), A2 (r2, n) whose top singular directions meet at angles ``theta``.

  Right-singular vectors: U1 = Q[:, :r1]; U2's k-th (k < len(theta)) is
  cos θ_k Q[:, k] + sin θ_k Q[:, n-1-k], the rest orthogonal to U1. A = R diag(s) Uᵀ
  with a random orthogonal R (the factor itself is mixed, its SVD is not).
  """
  q = _orthogonal(rng, n)
  u1 = q[:, :r1]
  u2 = np.zeros((n, r2))
  for k in range(r2):
    if k < len(theta):
      u2[:, k] = np.cos(theta[k]) * q[:, k] + np.sin(theta[k]) * q[:, n - 1 - k]
    else:
      u2[:, k] = q[:, r1 + k]        # beyond U1 and the sine partners
  a1 = _orthogonal(rng, r1) @ np.diag(np.linspace(5, 1, r1)) @ u1.T
  a2 = _orthogonal(rng, r2) @ np.diag(np.linspace(9, 1, r2)) @ u2.T
  return a1, a2


class SubspaceSimilarityTest(absltest.TestCase):

  def test_planted_overlap_r8_vs_r64_closed_form(self):
    rng = np.random.default_rng(0)
    n, r1, r2 = 160, 8, 64
    theta = np.array([0.0, 0.1, 0.3, 0.6, 0.9, 1.2, 1.4, np.pi / 2])
    a1, a2 = _planted_pair(rng, n, r1, r2, theta)
    phi = np.asarray(ss.subspace_similarity(a1.astype(np.float32), a2.astype(np.float32), "a"))
    self.assertEqual(phi.shape, (r1, r2))
    # U1[:, :i]ᵀ U2[:, :j] is diag(cos θ) on the first min(i, j) entries, 0 elsewhere.
    c2 = np.cos(theta) ** 2
    known = np.array([[c2[:min(i, j)].sum() / min(i, j) for j in range(1, r2 + 1)]
                      for i in range(1, r1 + 1)])
    np.testing.assert_allclose(phi, known, atol=2e-5)
    np.testing.assert_allclose(phi, _phi64(a1, a2, "a"), atol=2e-5)
    self.assertAlmostEqual(float(phi[0, 0]), 1.0, places=5)   # shared top direction
    self.assertTrue(np.all((phi >= -1e-6) & (phi <= 1 + 1e-6)))

  def test_b_factor_uses_left_singular_vectors_random_against_float64(self):
    rng = np.random.default_rng(1)
    b1 = rng.standard_normal((96, 8))
    b2 = b1 @ rng.standard_normal((8, 16)) + 0.5 * rng.standard_normal((96, 16))  # overlap
    phi = np.asarray(ss.subspace_similarity(b1, b2, "b"))
    np.testing.assert_allclose(phi, _phi64(b1, b2, "b"), atol=3e-5)
    # A and B sides are not interchangeable: B's right vectors are a different thing.
    with self.assertRaisesRegex(ValueError, "factor"):
      ss.subspace_similarity(b1, b2, "c")
    with self.assertRaisesRegex(ValueError, "A factors disagree"):
      ss.subspace_similarity(b1, b2, "a")
    with self.assertRaisesRegex(ValueError, "is factor='a' right"):
      ss.subspace_similarity(b1, b1, "a")    # read as A: r=96 rows > in=8


  def test_grid_over_tasks_with_different_ranks_matches_pairs(self):
    rng = np.random.default_rng(2)
    L, n = 3, 80
    a_r8 = rng.standard_normal((L, 8, n)).astype(np.float32)
    a_r8b = (a_r8 + 0.3 * rng.standard_normal((L, 8, n))).astype(np.float32)
    a_r64 = rng.standard_normal((L, 64, n)).astype(np.float32)
    grid = ss.subspace_similarity_grid([a_r8, a_r8b, a_r64], "a")
    self.assertEqual(grid.shape, (3, 3, L, 64, 64))
    for s, t, ms, mt in [(0, 1, a_r8, a_r8b), (0, 2, a_r8, a_r64), (2, 0, a_r64, a_r8)]:
      for l in range(L):
        ref = _phi64(ms[l], mt[l], "a")
        np.testing.assert_allclose(grid[s, t, l, :ref.shape[0], :ref.shape[1]], ref,
                                   atol=3e-5)
    self.assertTrue(np.all(np.isnan(grid[0, 2, :, 8:, :])))       # task 0 has rank 8
    np.testing.assert_allclose(ss.phi_top(grid[1, 1])[:, :8], 1.0, atol=1e-5)
    # a stacked [T, L, r, in] array (stack_lora's A) gives the same numbers
    stacked = ss.subspace_similarity_grid(np.stack([a_r8, a_r8b]), "a")
    np.testing.assert_allclose(stacked, grid[:2, :2, :, :8, :8], atol=1e-5)
    # near-identical adapters are more similar than unrelated ones, at every i
    self.assertTrue(np.all(ss.phi_top(grid[0, 1, :, :8, :8]) > ss.phi_top(grid[0, 2, :, :8, :8])))

  def test_rank_deficient_factor_is_nan_beyond_its_rank(self):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((8, 5)) @ rng.standard_normal((5, 60))   # rank 5 of r=8
    phi = np.asarray(ss.subspace_similarity(a, rng.standard_normal((8, 60)), "a"))
    self.assertFalse(np.any(np.isnan(phi[:5])))
    self.assertTrue(np.all(np.isnan(phi[5:])))


if __name__ == "__main__":
  absltest.main()
