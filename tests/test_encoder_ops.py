"""The encoder's hand-written gradients (LayerNorm, exact GELU) and its dropout.

References are the textbook formulas differentiated by ``jax.grad`` in float32
and their float64 evaluation in NumPy/SciPy, so a wrong backward cannot pass.
"""
import re
from unittest import mock

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from tvgeo_jax import lora, partition
from tvgeo_jax.models import apply, encoder, init_params, tiny_config


def _ln_reference(x, scale, bias, eps):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + eps) * scale + bias


class LayerNormTest(parameterized.TestCase):

  def _inputs(self, seed, shape=(3, 5, 16)):
    r = np.random.default_rng(seed)
    x = r.normal(1.5, 2.0, shape).astype(np.float32)
    scale = r.normal(1.0, 0.3, shape[-1:]).astype(np.float32)
    bias = r.normal(0.0, 0.3, shape[-1:]).astype(np.float32)
    cot = r.normal(size=shape).astype(np.float32)
    return x, scale, bias, cot

  def test_forward_matches_float64_formula(self):
    x, scale, bias, _ = self._inputs(0)
    got = encoder.layer_norm(x, scale, bias, 1e-5, jnp.dtype(jnp.float32))
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(got, ref * scale + bias, rtol=1e-5, atol=1e-5)

  @parameterized.parameters(0, 1, 2)
  def test_gradients_match_autodiff_of_the_formula(self, seed):
    x, scale, bias, cot = self._inputs(seed)
    ours = jax.grad(lambda *a: jnp.sum(cot * encoder.layer_norm(*a, 1e-5, jnp.dtype("float32"))),
                    argnums=(0, 1, 2))(x, scale, bias)
    ref = jax.grad(lambda *a: jnp.sum(cot * _ln_reference(*a, 1e-5)),
                   argnums=(0, 1, 2))(x, scale, bias)
    for name, a, b in zip(("dx", "dscale", "dbias"), ours, ref):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5, err_msg=name)

  def test_bfloat16_input_and_output_keep_float32_statistics(self):
    x, scale, bias, cot = self._inputs(3)
    xb = jnp.asarray(x, jnp.bfloat16)
    f = lambda x: jnp.sum(cot * encoder.layer_norm(x, scale, bias, 1e-5, jnp.dtype("bfloat16"))
                          .astype(jnp.float32))
    y = encoder.layer_norm(xb, scale, bias, 1e-5, jnp.dtype("bfloat16"))
    dx = jax.grad(f)(xb)
    self.assertEqual(y.dtype, jnp.bfloat16)
    self.assertEqual(dx.dtype, jnp.bfloat16)
    ref = jax.grad(lambda x: jnp.sum(cot * _ln_reference(x, scale, bias, 1e-5)))(
        xb.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(dx, np.float32), ref, rtol=0.05, atol=0.05)


class GeluTest(absltest.TestCase):

  def test_value_and_derivative_match_float64(self):
    x = np.linspace(-6, 6, 1001).astype(np.float32)
    x64 = x.astype(np.float64)
    cdf = 0.5 * (1 + special.erf(x64 / np.sqrt(2)))
    np.testing.assert_allclose(encoder.gelu_exact(x), x64 * cdf, rtol=1e-5, atol=1e-6)
    d = jax.vmap(jax.grad(encoder.gelu_exact))(x)
    ref = cdf + x64 * np.exp(-0.5 * x64 ** 2) / np.sqrt(2 * np.pi)
    np.testing.assert_allclose(d, ref, rtol=1e-5, atol=1e-6)

  def test_matches_jax_nn_gelu_and_its_autodiff(self):
    x = np.random.default_rng(0).normal(size=(4, 33)).astype(np.float32) * 3
    np.testing.assert_allclose(encoder.gelu_exact(x), jax.nn.gelu(x, approximate=False),
                               rtol=1e-6, atol=1e-6)
    g = lambda f: jax.grad(lambda x: jnp.sum(jnp.sin(x) * f(x)))(x)
    np.testing.assert_allclose(g(encoder.gelu_exact),
                               g(lambda x: jax.nn.gelu(x, approximate=False)),
                               rtol=1e-5, atol=1e-6)

  def test_keeps_bfloat16(self):
    x = jnp.ones((3,), jnp.bfloat16)
    self.assertEqual(encoder.gelu_exact(x).dtype, jnp.bfloat16)
    self.assertEqual(jax.grad(lambda x: encoder.gelu_exact(x).sum().astype(jnp.float32))(x).dtype,
                     jnp.bfloat16)


class CpuFusionBoundaryTest(absltest.TestCase):
  """``encoder._cpu_fusion_boundary``: an identity XLA:CPU cannot fuse through."""

  def test_is_the_identity_and_keeps_nan_poisoning(self):
    f = jax.jit(encoder._cpu_fusion_boundary)
    x = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    x[1, 2], x[3, 4], x[0, 0] = np.inf, np.nan, -np.inf
    np.testing.assert_array_equal(f(x), x)
    y = jnp.asarray(x).at[0, 0].set(jnp.nan)
    self.assertTrue(np.isnan(np.asarray(f(y))).all())
    self.assertEqual(f(jnp.ones(3, jnp.bfloat16)).dtype, jnp.bfloat16)

  def test_only_the_cpu_lowering_carries_the_conditional(self):
    grad = jax.jit(jax.grad(lambda x, s, b: jnp.sum(
        encoder.layer_norm(x, s, b, 1e-5, jnp.dtype("float32")) ** 2)))
    args = (jnp.ones((4, 8)), jnp.ones(8), jnp.zeros(8))
    # isnan lowers to compare NE (x != x); the LayerNorm backward has no other.
    has_nan_test = lambda plat: "stablehlo.compare NE" in grad.trace(*args).lower(
        lowering_platforms=(plat,)).as_text()
    self.assertTrue(has_nan_test("cpu"))
    self.assertFalse(has_nan_test("cuda"))
    self.assertFalse(has_nan_test("tpu"))

  def test_frozen_layer_norm_backward_is_not_recomputed_per_layer(self):
    # With frozen LayerNorms (LoRA), XLA:CPU used to fuse the LayerNorm backward of
    # every layer above into each layer's backward fusion: the widest fusion grew
    # with depth (71 operands at 4 layers, 107 at 6, 215 for roberta-base).
    cfg = tiny_config(num_hidden_layers=4, num_labels=2)
    train, frozen = partition.split(lora.inject_lora(init_params(cfg), rank=4, alpha=8), "lora")
    ids = np.random.default_rng(0).integers(3, 100, (4, 8)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    def loss(t, f):  # frozen as an argument, as in the train step (not constants)
      out = apply(partition.combine(t, f), batch, config=cfg, train=True, rng=jax.random.key(1))
      return jnp.sum(out["logits"] ** 2)

    def widest_fusion():
      hlo = jax.jit(jax.grad(loss)).lower(train, frozen).compile().as_text()
      return max(m.group(1).count("%") for m in re.finditer(r"= \S+ fusion\((.*?)\), kind=", hlo))

    with_boundary = widest_fusion()
    with mock.patch.object(encoder, "_cpu_fusion_boundary", lambda x: x):
      without = widest_fusion()
    self.assertLessEqual(with_boundary, 16)
    self.assertGreater(without, 3 * with_boundary)  # the check can tell the two apart


class DropoutTest(parameterized.TestCase):

  def _apply(self, rate, x, seed=0, deterministic=False):
    mod = encoder.Dropout(rate)
    return mod.apply({}, x, deterministic, rngs={"dropout": jax.random.key(seed)})

  @parameterized.parameters(0.1, 0.5)
  def test_rate_and_unbiased_scaling(self, rate):
    x = jnp.ones((400, 500), jnp.float32)
    y = np.asarray(self._apply(rate, x))
    dropped = np.mean(y == 0)
    n = x.size
    self.assertLess(abs(dropped - rate), 5 * np.sqrt(rate * (1 - rate) / n))  # 5 sigma
    kept = y[y != 0]
    np.testing.assert_allclose(kept, 1 / (1 - round(rate * 65536) / 65536), rtol=1e-6)
    self.assertAlmostEqual(y.mean(), 1.0, delta=5 * np.sqrt(rate / (1 - rate) / n))

  def test_identity_when_deterministic_or_rate_zero(self):
    x = jnp.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(self._apply(0.1, x, deterministic=True), x)
    np.testing.assert_array_equal(self._apply(0.0, x), x)

  def test_masks_depend_on_the_key_and_repeat_for_the_same_key(self):
    x = jnp.ones((64, 64), jnp.bfloat16)
    a, b, c = self._apply(0.1, x, 0), self._apply(0.1, x, 0), self._apply(0.1, x, 1)
    np.testing.assert_array_equal(a, b)
    self.assertFalse(np.array_equal(np.asarray(a), np.asarray(c)))
    self.assertEqual(a.dtype, jnp.bfloat16)

  def test_bad_rate_is_an_error(self):
    with self.assertRaisesRegex(ValueError, "Dropout rate"):
      self._apply(1.0, jnp.ones((2, 2)))

  @parameterized.parameters(((4, 16, 8), (1,), (4, 9, 8)),
                            ((3, 2, 12, 12), (2, 3), (3, 2, 7, 10)))
  def test_position_masks_do_not_depend_on_padding(self, shape, axes, shorter):
    # A concurrent group pads its members' batches to a common length; a token's
    # dropout word must be the one the unpadded batch draws.
    key = jax.random.key(7)
    long = np.asarray(encoder.position_stable_bits(key, shape, axes))
    short = np.asarray(encoder.position_stable_bits(key, shorter, axes))
    np.testing.assert_array_equal(long[tuple(slice(0, n) for n in shorter)], short)
    self.assertFalse(np.array_equal(long, np.asarray(
        encoder.position_stable_bits(jax.random.key(8), shape, axes))))
    # Uniform 16-bit words: the mean is 32767.5 within 5 standard errors.
    big = np.asarray(encoder.position_stable_bits(key, (64, 128, 32), (1,)), np.float64)
    self.assertLess(abs(big.mean() - 32767.5), 5 * 65536 / np.sqrt(12 * big.size))
    self.assertGreater(len(np.unique(big)), 60000)


if __name__ == "__main__":
  absltest.main()
