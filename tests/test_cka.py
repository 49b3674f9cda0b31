"""Tests for tvgeo_jax.analysis.cka against a straightforward numpy float64 reference."""
import numpy as np

import cka_reference
import scipy.stats
from absl.testing import absltest, parameterized

from tvgeo_jax.adapters import bottleneck
from tvgeo_jax.analysis import cka
from tvgeo_jax.models import apply, init_params, tiny_config


_hsic_ref, _cka_ref = cka_reference.hsic_ref, cka_reference.cka_ref


def _related(rng, n, d1, d2, noise=0.5):
  x = rng.randn(n, d1)
  y = np.tanh(x @ rng.randn(d1, d2) / np.sqrt(d1)) + noise * rng.randn(n, d2)
  return x, y


class CKATest(parameterized.TestCase):

  @parameterized.parameters("unbiased", "biased")
  def test_invariant_to_orthogonal_transform_and_isotropic_scaling(self, estimator):
    rng = np.random.RandomState(0)
    x = rng.randn(100, 24).astype(np.float32)
    q = scipy.stats.ortho_group.rvs(24, random_state=1)
    self.assertAlmostEqual(cka.cka(x, (x @ q).astype(np.float32), estimator), 1.0, places=5)
    self.assertAlmostEqual(cka.cka(x, 7.5 * x, estimator), 1.0, places=5)
    self.assertAlmostEqual(cka.cka(x, x + 3.0, estimator), 1.0, places=5)
    # ... but not to a general (non-orthogonal) linear map.
    a = rng.randn(24, 24) * np.linspace(0.1, 3.0, 24)
    self.assertLess(cka.cka(x, (x @ a).astype(np.float32), estimator), 0.99)

  @parameterized.parameters("unbiased", "biased")
  def test_all_layer_pairs_equal_numpy_float64_reference(self, estimator):
    rng = np.random.RandomState(2)
    n = 60
    x = rng.randn(3, n, 20)
    y = rng.randn(4, n, 12)
    y[1] = np.tanh(x[0] @ rng.randn(20, 12)) + 0.3 * rng.randn(n, 12)
    y[2] = x[2][:, :12] * 2.0 - 1.0
    got = cka.cka(x.astype(np.float32), y.astype(np.float32), estimator)
    ref = np.array([[_cka_ref(x[i], y[j], estimator) for j in range(4)] for i in range(3)])
    self.assertEqual(got.shape, (3, 4))
    np.testing.assert_allclose(got, ref, atol=2e-6)
    self.assertGreater(ref[0, 1], 0.3)  # the related pairs are really related
    self.assertAlmostEqual(got[2, 2], ref[2, 2], places=5)
    # One jitted call computes the whole matrix; a 2-D input drops its layer axis.
    np.testing.assert_allclose(cka.cka(x[1].astype(np.float32), y.astype(np.float32),
                                       estimator), ref[1], atol=2e-6)

  def test_unbiased_is_near_zero_for_independent_features_biased_is_not(self):
    rng = np.random.RandomState(4)
    n, d = 256, 768
    x = rng.randn(n, d).astype(np.float32)
    y = rng.randn(n, d).astype(np.float32)
    unbiased, biased = cka.cka(x, y, "unbiased"), cka.cka(x, y, "biased")
    self.assertLess(abs(unbiased), 0.03)
    self.assertGreater(biased, 0.6)  # ≈ 0.75: the bias the unbiased estimator removes
    self.assertAlmostEqual(biased, _cka_ref(x, y, "biased"), places=5)
    self.assertAlmostEqual(unbiased, _cka_ref(x, y, "unbiased"), places=5)

  @parameterized.parameters("unbiased", "biased")
  def test_float32_with_a_large_shared_offset(self, estimator):
    rng = np.random.RandomState(5)
    x, y = _related(rng, 200, 64, 48)
    x[:, :8] += 1e3  # BERT-like outlier dimensions shared by every example
    y[:, :4] -= 1e3
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    # Reference: float64 on the very same float32 inputs, centred in float64 (CKA is
    # shift-invariant). Even float64 on the raw Grams loses ~1e-4 to cancellation in the
    # unbiased formula at this offset, so the reference centres first.
    x64, y64 = x32.astype(np.float64), y32.astype(np.float64)
    ref = _cka_ref(x64 - x64.mean(0), y64 - y64.mean(0), estimator)
    got = cka.cka(x32, y32, estimator)
    self.assertAlmostEqual(got, ref, delta=1e-6)
    # Contrast: centring the float32 Gram afterwards instead loses the signal.
    n = x32.shape[0]
    h = (np.eye(n) - 1.0 / n).astype(np.float32)
    kc, lc = h @ (x32 @ x32.T) @ h, h @ (y32 @ y32.T) @ h
    naive = (kc * lc).sum() / np.sqrt((kc * kc).sum() * (lc * lc).sum())
    if estimator == "biased":
      self.assertGreater(abs(naive - ref), 100 * abs(got - ref))

  def test_minibatch_accumulation(self):
    rng = np.random.RandomState(6)
    n, b = 1024, 128
    x, y = _related(rng, n, 32, 40)
    xs, ys = np.stack([x, x ** 2]), np.stack([y, rng.randn(n, 40)])
    # One batch of everything is the full-batch estimate.
    np.testing.assert_allclose(cka.minibatch_cka(xs, ys, n), cka.cka(xs, ys), atol=1e-6)
    # Accumulation is the ratio of mean per-batch HSICs (Nguyen et al. 2021).
    got = cka.minibatch_cka(xs, ys, b)
    for i in range(2):
      for j in range(2):
        parts = [(xs[i, s:s + b] @ xs[i, s:s + b].T, ys[j, s:s + b] @ ys[j, s:s + b].T)
                 for s in range(0, n, b)]
        xy = np.mean([_hsic_ref(k, l, "unbiased") for k, l in parts])
        xx = np.mean([_hsic_ref(k, k, "unbiased") for k, _ in parts])
        yy = np.mean([_hsic_ref(l, l, "unbiased") for _, l in parts])
        self.assertAlmostEqual(got[i, j], xy / np.sqrt(xx * yy), places=5)
    # The unbiased minibatch estimate tracks the full-batch one; the biased one drifts.
    full = cka.cka(xs, ys, "unbiased")
    np.testing.assert_allclose(got, full, atol=0.03)
    self.assertGreater(full[0, 0], 0.3)
    drift = cka.minibatch_cka(xs, ys, b, "biased") - cka.cka(xs, ys, "biased")
    self.assertGreater(np.abs(drift).max(), np.abs(got - full).max())

  def test_accumulator_and_small_batches(self):
    rng = np.random.RandomState(7)
    x, y = _related(rng, 70, 8, 6)
    with self.assertRaisesRegex(ValueError, "at least 4"):
      cka.hsic_terms(x[:3], y[:3])
    cka.hsic_terms(x[:3], y[:3], "biased")  # 2 rows suffice for the biased estimator
    self.assertEqual(cka.batch_bounds(70, 32), [(0, 32), (32, 70)])
    self.assertEqual(cka.batch_bounds(70, 32, remainder="drop"), [(0, 32), (32, 64)])
    self.assertEqual(cka.batch_bounds(20, 32), [(0, 20)])
    with self.assertRaisesRegex(ValueError, "batch_size"):
      cka.batch_bounds(70, 3)
    with self.assertRaisesRegex(ValueError, "estimator"):
      cka.cka(x, y, "debiased")
    # merge == accumulating the two batches by hand, every example counted once.
    acc = cka.CKAAccumulator()
    acc.update(x[:32], y[:32])
    acc.update(x[32:], y[32:])
    self.assertEqual((acc.num_batches, acc.num_examples), (2, 70))
    self.assertAlmostEqual(float(acc.result()[0, 0]), cka.minibatch_cka(x, y, 32), places=6)
    dropped = cka.minibatch_cka(x, y, 32, remainder="drop")
    self.assertAlmostEqual(dropped, cka.minibatch_cka(x[:64], y[:64], 32), places=6)
    with self.assertRaisesRegex(ValueError, "No batch"):
      cka.CKAAccumulator().result()

  def test_pairwise_cka_covers_every_model_pair(self):
    rng = np.random.RandomState(8)
    reps = {"plm": rng.randn(3, 40, 6), "ft": rng.randn(2, 40, 5)}
    out = cka.pairwise_cka(reps)
    self.assertEqual(set(out), {("plm", "plm"), ("plm", "ft"), ("ft", "ft")})
    self.assertEqual(out[("plm", "ft")].shape, (3, 2))
    np.testing.assert_allclose(np.diag(out[("plm", "plm")]), 1.0, atol=1e-5)


class LayerRepresentationsTest(absltest.TestCase):

  def test_first_and_mean_tokens_match_the_hidden_states(self):
    config = tiny_config()
    params = bottleneck.inject_bottleneck(init_params(config, seed=0), config, init_std=0.1)
    rng = np.random.RandomState(0)
    b, t = 4, 6
    ids = rng.randint(3, config.vocab_size, size=(b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    mask[1, 3:] = 0
    ids[1, 3:] = config.pad_token_id
    batch = {"input_ids": ids, "attention_mask": mask,
             "token_type_ids": np.zeros_like(ids)}
    hidden = np.stack([np.asarray(h) for h in apply(
        params, batch, config=config, output_hidden_states=True)["hidden_states"]])
    padded = dict(batch, weights=np.array([1, 1, 1, 0], np.float32))
    first = cka.layer_representations(params, config, [batch, padded], token="first")
    self.assertEqual(first.shape, (config.num_hidden_layers + 1, 2 * b - 1, config.hidden_size))
    np.testing.assert_allclose(first[:, :b], hidden[:, :, 0], atol=1e-6)
    np.testing.assert_allclose(first[:, b:], hidden[:, :3, 0], atol=1e-6)
    mean = cka.layer_representations(params, config, [batch], token="mean")
    m = mask[None, :, :, None].astype(np.float64)
    np.testing.assert_allclose(mean, (hidden * m).sum(2) / m.sum(2), atol=1e-5)
    with self.assertRaisesRegex(ValueError, "token"):
      cka.layer_representations(params, config, [batch], token="cls")


if __name__ == "__main__":
  absltest.main()
