"""Tests of tvgeo_jax.geometry against float64 / scipy / numpy references."""
import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from absl.testing import absltest, parameterized

from tvgeo_jax import geometry as geo
from tvgeo_jax.geometry import grid as grid_lib
from tvgeo_jax.geometry import linalg

ANGLE_TOL = 1e-5  # rad, the float32 target of the issue


def _known_pair(rng, n, angles, extra2=0):
  """Float64 orthonormal bases with exactly these principal angles.

  Q1 = [e_1..e_k]; Q2 = [cos θ_i e_i + sin θ_i f_i] plus ``extra2`` directions
  orthogonal to everything (a larger second subspace), all rotated at random.
  """
  k = len(angles)
  z, _ = np.linalg.qr(rng.standard_normal((n, 2 * k + extra2)))
  e, f = z[:, :k], z[:, k:2 * k]
  q2 = e * np.cos(angles) + f * np.sin(angles)
  return e, np.concatenate([q2, z[:, 2 * k:]], axis=1)


def _mix(rng, k):
  """A well-conditioned k x k mixing matrix (columns stop being orthonormal)."""
  return np.eye(k) + 0.3 * rng.standard_normal((k, k)) / np.sqrt(k)


def _basis64(x, rtol=None):
  u, s, _ = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
  rtol = max(x.shape) * np.finfo(np.float32).eps if rtol is None else rtol
  r = int(np.sum(s > rtol * s[0])) if s[0] > 0 else 0
  return u[:, :r]


def ref_angles(x, y):
  """Float64 principal angles by the atan2 pairing (NumPy), ascending."""
  q1, q2 = _basis64(x), _basis64(y)
  if q2.shape[1] > q1.shape[1]:
    q1, q2 = q2, q1
  m = q2.shape[1]
  c = np.linalg.svd(q1.T @ q2, compute_uv=False)[:m]                       # descending
  s = np.sort(np.linalg.svd(q2 - q1 @ (q1.T @ q2), compute_uv=False))[:m]   # ascending
  return np.arctan2(s, c)


def _f32(*xs):
  return [np.asarray(x, np.float32) for x in xs]


class PairwiseAnglesTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("random", [0.35, 0.6, 0.9, 1.1, 1.3, 1.5]),
      ("nearly_coincident", [1e-4, 1.5e-4, 3e-4, 7e-4, 2e-3, 5e-3]),
      ("mixed", [1e-4, 1e-3, 0.02, 0.5, 1.2, np.pi / 2]),
      ("clustered_small", [1e-4, 1.1e-4, 1.2e-4, 1.3e-3, 1.31e-3, 1.5]),
  )
  def test_known_angles_dense_and_factored(self, angles):
    rng = np.random.default_rng(0)
    angles = np.asarray(angles)
    k, n, inn = len(angles), 60, 40
    e, q2 = _known_pair(rng, n, angles)
    b1, b2 = e @ _mix(rng, k), q2 @ _mix(rng, k)
    a1, a2 = rng.standard_normal((k, inn)), rng.standard_normal((k, inn))
    b1, b2, a1, a2 = _f32(b1, b2, a1, a2)
    dense = np.asarray(geo.principal_angles(b1 @ a1, b2 @ a2))
    fact = np.asarray(geo.lora_principal_angles(b1, a1, b2, a2))
    np.testing.assert_allclose(dense[:k], angles, atol=ANGLE_TOL, rtol=0)
    self.assertTrue(np.all(np.isnan(dense[k:])))          # rank 6 of a 60x40 matrix
    np.testing.assert_allclose(fact, angles, atol=ANGLE_TOL, rtol=0)
    # the float64 atan2 reference on the same float32 inputs agrees too
    np.testing.assert_allclose(fact, ref_angles(b1 @ a1, b2 @ a2), atol=ANGLE_TOL, rtol=0)
    d_ref = np.sqrt(np.sum(angles ** 2))
    self.assertAlmostEqual(float(geo.lora_grassmann_distance(b1, a1, b2, a2)), d_ref, delta=3e-5)

  @parameterized.named_parameters(("all_small", [2e-4, 1e-3, 0.1, 0.5, 0.7]),
                                  ("all_large", [0.9, 1.0, 1.2, 1.4, np.pi / 2]))
  def test_scipy_reference_one_side_of_45_degrees(self, angles):
    rng = np.random.default_rng(1)
    e, q2 = _known_pair(rng, 50, np.asarray(angles))
    x, y = _f32(e @ _mix(rng, 5), q2 @ _mix(rng, 5))
    ref = np.sort(scipy.linalg.subspace_angles(x.astype(np.float64), y.astype(np.float64)))
    np.testing.assert_allclose(np.asarray(geo.principal_angles(x, y)), ref, atol=ANGLE_TOL)

  def test_different_dimensions_use_min_angles(self):
    rng = np.random.default_rng(2)
    angles = np.array([1e-3, 0.4, 1.1])
    e, q2 = _known_pair(rng, 40, angles, extra2=2)          # dims 3 and 5
    x, y = _f32(e, q2 @ _mix(rng, 5))
    for got in (geo.principal_angles(x, y), geo.principal_angles(y, x)):
      got = np.asarray(got)
      np.testing.assert_allclose(got[:3], angles, atol=ANGLE_TOL)
      self.assertTrue(np.all(np.isnan(got[3:])))
    np.testing.assert_allclose(np.asarray(geo.principal_angles(x, y))[:3], ref_angles(x, y),
                               atol=ANGLE_TOL)

  def test_rank_deficient_factors(self):
    rng = np.random.default_rng(3)
    angles = np.array([3e-4, 0.2, 1.0])
    e, q2 = _known_pair(rng, 50, angles)
    r = 6                                                   # B has 6 columns but rank 3
    b1 = e @ rng.standard_normal((3, r))
    b2 = q2 @ rng.standard_normal((3, r))
    a1, a2 = rng.standard_normal((r, 30)), rng.standard_normal((r, 30))
    b1, b2, a1, a2 = _f32(b1, b2, a1, a2)
    self.assertEqual(int(geo.numerical_rank(b1)), np.linalg.matrix_rank(b1))
    self.assertEqual(int(geo.numerical_rank(b1 @ a1)), 3)
    got = np.asarray(geo.lora_principal_angles(b1, a1, b2, a2))
    np.testing.assert_allclose(got[:3], angles, atol=ANGLE_TOL)
    self.assertTrue(np.all(np.isnan(got[3:])))
    np.testing.assert_allclose(got[:3], ref_angles(b1 @ a1, b2 @ a2), atol=ANGLE_TOL)
    # a rank-deficient A: Im(BA) is a proper subspace of Im(B)
    b3, a3 = _f32(rng.standard_normal((50, 4)), rng.standard_normal((2, 30)))
    a3 = np.concatenate([a3, a3], axis=0)                   # rank 2 of r=4
    b4, a4 = _f32(rng.standard_normal((50, 4)), rng.standard_normal((4, 30)))
    got = np.asarray(geo.lora_principal_angles(b3, a3, b4, a4))
    np.testing.assert_allclose(got[:2], ref_angles(b3 @ a3, b4 @ a4), atol=ANGLE_TOL)
    self.assertTrue(np.all(np.isnan(got[2:])))

  def test_grassmann_of_product_equals_grassmann_of_b(self):
    rng = np.random.default_rng(4)
    b1, b2 = _f32(rng.standard_normal((64, 8)), rng.standard_normal((64, 8)))
    a1, a2 = _f32(rng.standard_normal((8, 48)), rng.standard_normal((8, 48)))
    d_ba = float(geo.lora_grassmann_distance(b1, a1, b2, a2))
    d_b = float(geo.grassmann_distance(b1, b2))
    self.assertAlmostEqual(d_ba, d_b, delta=1e-5)
    self.assertAlmostEqual(d_b, float(np.sqrt(np.sum(ref_angles(b1, b2) ** 2))), delta=1e-5)

  def test_zero_matrix_gives_nan(self):
    x = np.zeros((10, 6), np.float32)
    y = np.random.default_rng(5).standard_normal((10, 6)).astype(np.float32)
    self.assertTrue(np.isnan(float(geo.grassmann_distance(x, y))))
    self.assertTrue(np.isnan(float(geo.cosine_distance(x, y))))
    self.assertAlmostEqual(float(geo.l2_distance(x, y)), np.linalg.norm(y), places=4)

  def test_top_k_subspace(self):
    rng = np.random.default_rng(6)
    x, y = _f32(rng.standard_normal((30, 30)), rng.standard_normal((30, 30)))
    got = np.asarray(geo.principal_angles(x, y, top_k=4))
    ref = ref_angles(np.linalg.svd(x)[0][:, :4], np.linalg.svd(y)[0][:, :4])
    np.testing.assert_allclose(got, ref, atol=ANGLE_TOL)
    with self.assertRaisesRegex(ValueError, "top_k"):
      geo.principal_angles(x, y, top_k=31)


class FlatMetricsTest(absltest.TestCase):

  def test_lora_l2_and_cosine_match_materialised_products(self):
    rng = np.random.default_rng(7)
    b1, b2 = _f32(rng.standard_normal((3, 40, 4)), rng.standard_normal((3, 40, 4)))
    a1, a2 = _f32(rng.standard_normal((3, 4, 24)), rng.standard_normal((3, 4, 24)))
    w1 = np.einsum("bor,bri->boi", b1.astype(np.float64), a1.astype(np.float64))
    w2 = np.einsum("bor,bri->boi", b2.astype(np.float64), a2.astype(np.float64))
    l2 = np.linalg.norm((w1 - w2).reshape(3, -1), axis=1)
    cos = 1 - np.sum(w1 * w2, axis=(1, 2)) / (np.linalg.norm(w1.reshape(3, -1), axis=1)
                                             * np.linalg.norm(w2.reshape(3, -1), axis=1))
    np.testing.assert_allclose(np.asarray(geo.lora_l2_distance(b1, a1, b2, a2)), l2, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(geo.lora_cosine_distance(b1, a1, b2, a2)), cos,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(geo.l2_distance(w1, w2)), l2, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(geo.cosine_distance(w1, w2)), cos, atol=1e-6)

  def test_swapped_factors_rejected(self):
    b, a = _f32(np.ones((40, 4)), np.ones((4, 40)))
    with self.assertRaisesRegex(ValueError, "swapped"):
      geo.lora_inner(a, b, a, b)
    with self.assertRaisesRegex(ValueError, "same r"):
      geo.lora_inner(b, b, b, b)


def _lora_stack(rng, t=5, l=3, out=24, inn=20, r=3):
  """Random LoRA stacks where tasks 0 and 1 have nearly coincident column spaces."""
  a = rng.standard_normal((t, l, r, inn))
  b = rng.standard_normal((t, l, out, r))
  for layer in range(l):
    e, q2 = _known_pair(rng, out, np.array([2e-4, 3e-3, 0.3]))
    b[0, layer], b[1, layer] = e @ _mix(rng, r), q2 @ _mix(rng, r)
  a, b = _f32(a, b)
  b[3, 1] = 0.0                                 # an untrained B: zero update
  return a, b


def _pair_reference(x, y, metric):
  x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
  zero = not np.any(x64) or not np.any(y64)
  if metric == "l2":
    return np.linalg.norm(x64 - y64)
  if zero:
    return np.nan
  if metric == "cosine":
    return 1 - np.sum(x64 * y64) / (np.linalg.norm(x64) * np.linalg.norm(y64))
  return np.sqrt(np.sum(ref_angles(x64, y64) ** 2))


class GridTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.a, cls.b = _lora_stack(np.random.default_rng(8))
    # 2 x 2 tiles exercise the tiled code path (3 blocks of tasks, the last overlapping)
    cls.res = geo.distance_grid((cls.a, cls.b), module="query", factors=("product", "a", "b"),
                                tile=2)

  def test_grid_equals_reference_loop_over_pairs(self):
    t, l = self.a.shape[:2]
    for f in ("product", "a", "b"):
      for m in ("l2", "cosine", "grassmann"):
        got = self.res.get(f, m)
        self.assertEqual(got.shape, (t, t, l))
        for k in range(l):
          for i in range(t):
            for j in range(t):
              if f == "product":
                x, y = self.b[i, k] @ self.a[i, k], self.b[j, k] @ self.a[j, k]
              elif f == "a":
                x, y = self.a[i, k].T, self.a[j, k].T      # row space of A
              else:
                x, y = self.b[i, k], self.b[j, k]
              ref = 0.0 if (i == j and (m == "l2" or np.any(x))) else _pair_reference(x, y, m)
              if np.isnan(ref):
                self.assertTrue(np.isnan(got[i, j, k]), (f, m, i, j, k))
              else:
                tol = ANGLE_TOL * 3 if m == "grassmann" else 1e-5 * max(1.0, abs(ref))
                self.assertAlmostEqual(float(got[i, j, k]), ref, delta=tol,
                                       msg=f"{f}/{m} pair ({i},{j}) layer {k}")

  def test_grid_equals_pairwise_kernels(self):
    for k in range(self.a.shape[1]):
      for i, j in ((0, 1), (2, 4)):
        b1, a1, b2, a2 = self.b[i, k], self.a[i, k], self.b[j, k], self.a[j, k]
        self.assertAlmostEqual(float(self.res.get("product", "grassmann")[i, j, k]),
                               float(geo.lora_grassmann_distance(b1, a1, b2, a2)), delta=1e-5)
        self.assertAlmostEqual(float(self.res.get("product", "cosine")[i, j, k]),
                               float(geo.lora_cosine_distance(b1, a1, b2, a2)), delta=1e-6)

  def test_symmetry_zero_diagonal_and_nan_reports(self):
    for (f, m), d in self.res.distances.items():
      np.testing.assert_array_equal(d, np.transpose(d, (1, 0, 2)), err_msg=f"{f}/{m}")
      diag = np.diagonal(d, axis1=0, axis2=1)               # [L, T]
      zero = np.zeros_like(diag, bool)
      if f in ("product", "b") and m != "l2":
        zero[1, 3] = True                                  # task 3, layer 1 has B = 0
      self.assertTrue(np.all(np.isnan(diag[zero])), f"{f}/{m}")
      np.testing.assert_array_equal(diag[~zero], 0.0, err_msg=f"{f}/{m}")
    zero_reports = {(r["factor"], r["task"], r["layer"]) for r in self.res.reports
                    if r["issue"] == "zero matrix"}
    self.assertEqual(zero_reports, {("product", "task_3", "layer_1"), ("b", "task_3", "layer_1")})
    self.assertEqual(self.res.ranks["product"][3, 1], 0)
    self.assertEqual(self.res.ranks["b"][3, 1], 0)
    self.assertEqual(self.res.ranks["a"].min(), 3)

  def test_layer_and_kplus_means(self):
    d = self.res.get("product", "cosine")
    np.testing.assert_allclose(self.res.kplus_mean("product", "cosine", 2),
                               np.nanmean(d[..., 1:], axis=-1))
    means = self.res.kplus_means("product", "grassmann")
    self.assertEqual(means.shape, (3, 5, 5))
    np.testing.assert_allclose(means[-1], self.res.get("product", "grassmann")[..., -1])
    with self.assertRaisesRegex(ValueError, "1-indexed"):
      self.res.kplus_mean("product", "l2", 0)

  def test_modules_share_one_call_and_match_single_grids(self):
    both = geo.distance_grids({"query": (self.a, self.b), "value": (self.a, 2 * self.b)},
                              metrics=("cosine", "grassmann"))
    self.assertEqual(list(both), ["query", "value"])
    np.testing.assert_allclose(both["query"].get("product", "grassmann"),
                               self.res.get("product", "grassmann"), atol=1e-6)
    # scaling B changes neither the cosine nor the column space
    np.testing.assert_allclose(both["value"].get("product", "cosine"),
                               self.res.get("product", "cosine"), atol=1e-6)

  def test_precision_independence(self):
    small = (self.a[:3, :1], self.b[:3, :1])
    mesh_fn, _ = grid_lib._compiled(jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",)),
                                    "lora", geo.METRICS, geo.FACTORS, None, None, 2, 3, 1,
                                    "difference")
    jaxpr = jax.make_jaxpr(mesh_fn)((*small, jnp.full((3, 1), 3, jnp.int32)))
    dots = []

    def walk(jx):
      for eqn in jx.eqns:
        if eqn.primitive.name == "dot_general":
          dots.append(eqn.params["precision"])
        for v in eqn.params.values():
          for sub in (v if isinstance(v, (tuple, list)) else [v]):
            if isinstance(sub, jex_core.ClosedJaxpr):
              walk(sub.jaxpr)
            elif isinstance(sub, jex_core.Jaxpr):
              walk(sub)
    walk(jaxpr.jaxpr)
    self.assertNotEmpty(dots)
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    self.assertTrue(all(p == highest for p in dots), f"dots without HIGHEST: {dots}")
    base = geo.grid_arrays(small, factors=geo.FACTORS, tile=2)
    for prec in ("bfloat16", "tensorfloat32"):
      with jax.default_matmul_precision(prec):
        other = geo.grid_arrays(small, factors=geo.FACTORS, tile=2)
      for key in base:
        np.testing.assert_allclose(np.asarray(other[key]), np.asarray(base[key]), atol=1e-6,
                                   err_msg=key)

  def test_dense_grid_top_k_and_ranks(self):
    rng = np.random.default_rng(9)
    w = rng.standard_normal((3, 2, 12, 10)).astype(np.float32)
    w[1, 0, :, 5:] = 0.0                                   # rank 5 in layer 0 of task 1
    res = geo.distance_grid(w, top_k=3, module="dense")
    np.testing.assert_array_equal(res.ranks["product"],
                                  np.linalg.matrix_rank(w.astype(np.float64)))
    for k in range(2):
      for i, j in ((0, 1), (1, 2)):
        ref = np.sqrt(np.sum(ref_angles(np.linalg.svd(w[i, k])[0][:, :3],
                                        np.linalg.svd(w[j, k])[0][:, :3]) ** 2))
        self.assertAlmostEqual(float(res.get("product", "grassmann")[i, j, k]), ref, delta=3e-5)
        self.assertAlmostEqual(float(res.get("product", "l2")[i, j, k]),
                               np.linalg.norm(w[i, k].astype(np.float64) - w[j, k]), delta=1e-4)

  def test_bad_inputs(self):
    with self.assertRaisesRegex(ValueError, "disagree"):
      geo.distance_grid((self.b, self.a))
    square_a, square_b = self.a[..., :3, :12], self.b[..., :12, :]    # out = in = 12
    with self.assertRaisesRegex(ValueError, "swapped"):
      geo.distance_grid((square_b, square_a))
    with self.assertRaisesRegex(ValueError, "Unknown metrics"):
      geo.distance_grid((self.a, self.b), metrics=("l1",))
    with self.assertRaisesRegex(ValueError, "no LoRA factors"):
      geo.distance_grid(np.zeros((2, 1, 4, 4), np.float32), factors=("a",))
    with self.assertRaisesRegex(ValueError, "task names"):
      geo.distance_grid((self.a, self.b), task_names=["x"])


class LinalgTest(absltest.TestCase):

  def test_orthonormal_factor_reconstructs_and_is_orthonormal(self):
    rng = np.random.default_rng(10)
    x = (rng.standard_normal((80, 6)) @ np.diag([1, 1e-1, 1e-2, 1e-3, 1, 2])).astype(np.float32)
    q, r = linalg.orthonormal_factor(jnp.asarray(x))
    q, r = np.asarray(q, np.float64), np.asarray(r, np.float64)
    np.testing.assert_allclose(q.T @ q, np.eye(6), atol=1e-5)
    np.testing.assert_allclose(q @ r, x, atol=1e-5 * np.abs(x).max())
    np.testing.assert_allclose(np.linalg.svd(r, compute_uv=False),
                               np.linalg.svd(x.astype(np.float64), compute_uv=False),
                               rtol=1e-4)


if __name__ == "__main__":
  absltest.main()
