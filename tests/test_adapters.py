"""Tests for tvgeo_jax.adapters.bottleneck: injection, near-identity init, frozen leaves, counts."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats
from absl.testing import absltest, parameterized

from tvgeo_jax.adapters import bottleneck, leaves, partition
from tvgeo_jax.core import trees
from tvgeo_jax.models import apply, init_params, tiny_config


def _batch(config, b=3, t=7, seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, config.vocab_size, size=(b, t)).astype(np.int32)
  mask = np.ones((b, t), np.int32)
  mask[0, -2:] = 0
  ids[0, -2:] = config.pad_token_id
  return {"input_ids": ids, "attention_mask": mask,
          "token_type_ids": np.zeros((b, t), np.int32),
          "labels": rng.randint(0, config.num_labels, size=(b,)).astype(np.int32)}


class AdaptersTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config = tiny_config()
    cls.params = init_params(cls.config, seed=1)
    cls.batch = _batch(cls.config)

  def _forward(self, params):
    return apply(params, self.batch, config=self.config, output_hidden_states=True)

  def test_zero_up_weights_give_exactly_the_base_model(self):
    p = bottleneck.inject_bottleneck(self.params, self.config, size=8, seed=3)
    for i in range(self.config.num_hidden_layers):
      for name in leaves.ADAPTER_NAMES:
        up = p["encoder"][f"layer_{i}"][name]["up"]
        up["kernel"] = np.zeros_like(up["kernel"])
    base, injected = self._forward(self.params), self._forward(p)
    np.testing.assert_array_equal(np.asarray(injected["logits"]), np.asarray(base["logits"]))
    for hb, hi in zip(base["hidden_states"], injected["hidden_states"]):
      np.testing.assert_array_equal(np.asarray(hi), np.asarray(hb))

  def test_init_is_near_identity(self):
    p = bottleneck.inject_bottleneck(self.params, self.config, seed=0)  # m = 64 // 16 = 4
    base, injected = self._forward(self.params), self._forward(p)
    diff = np.abs(np.asarray(injected["last_hidden_state"]) -
                  np.asarray(base["last_hidden_state"]))
    # Post-LN hidden states are O(1); the adapters perturb them by ~init_std² scale.
    self.assertGreater(diff.max(), 0.0)  # the adapters are really applied
    self.assertLess(diff.max(), 1e-2)
    # A large init is not near-identity: the same bound fails.
    far = bottleneck.inject_bottleneck(self.params, self.config, seed=0, init_std=1.0)
    far_diff = np.abs(np.asarray(self._forward(far)["last_hidden_state"]) -
                      np.asarray(base["last_hidden_state"]))
    self.assertGreater(far_diff.max(), 1e-1)

  def test_init_distribution_is_truncated_normal_with_zero_biases(self):
    std = 0.05
    p = bottleneck.inject_bottleneck(self.params, self.config, size=32, init_std=std)
    flat = trees.flatten(bottleneck.adapter_params(p))
    kernels = np.concatenate([v.ravel() for k, v in flat.items() if k[-1] == "kernel"])
    biases = np.concatenate([v.ravel() for k, v in flat.items() if k[-1] == "bias"])
    np.testing.assert_array_equal(biases, 0.0)
    self.assertLessEqual(np.abs(kernels).max(), 2 * std + 1e-7)
    expected_std = std * scipy.stats.truncnorm(-2, 2).std()
    self.assertAlmostEqual(kernels.std() / expected_std, 1.0, delta=0.03)
    self.assertAlmostEqual(kernels.mean() / std, 0.0, delta=0.03)

  def test_seed_determines_the_adapters(self):
    a = bottleneck.adapter_params(bottleneck.inject_bottleneck(self.params, self.config, seed=5))
    b = bottleneck.adapter_params(bottleneck.inject_bottleneck(self.params, self.config, seed=5))
    c = bottleneck.adapter_params(bottleneck.inject_bottleneck(self.params, self.config, seed=6))
    fa, fb, fc = trees.flatten(a), trees.flatten(b), trees.flatten(c)
    for k in fa:
      np.testing.assert_array_equal(fa[k], fb[k])
    self.assertFalse(all(np.array_equal(fa[k], fc[k]) for k in fa if k[-1] == "kernel"))
    # Layers and positions get different draws.
    self.assertFalse(np.array_equal(
        a["encoder"]["layer_0"]["attention_adapter"]["down"]["kernel"],
        a["encoder"]["layer_0"]["output_adapter"]["down"]["kernel"]))
    self.assertFalse(np.array_equal(
        a["encoder"]["layer_0"]["attention_adapter"]["down"]["kernel"],
        a["encoder"]["layer_1"]["attention_adapter"]["down"]["kernel"]))

  @parameterized.parameters((None, 16, 4), (None, 8, 8), (5, 16, 5))
  def test_sizes_and_parameter_count(self, size, factor, m):
    p = bottleneck.inject_bottleneck(self.params, self.config, size=size,
                                   reduction_factor=factor)
    self.assertEqual(bottleneck.adapter_size(p), m)
    h, layers = self.config.hidden_size, self.config.num_hidden_layers
    expected = 2 * layers * (2 * h * m + m + h)
    self.assertEqual(bottleneck.count_adapter_parameters(p), expected)
    self.assertEqual(trees.count(p), trees.count(self.params) + expected)
    sub = p["encoder"]["layer_1"]["output_adapter"]
    self.assertEqual(sub["down"]["kernel"].shape, (h, m))
    self.assertEqual(sub["up"]["kernel"].shape, (m, h))
    # partition counts adapters + every LayerNorm + the head as trainable.
    trainable, total = partition.count_parameters(p, "bottleneck")
    norms = sum(np.size(v) for k, v in trees.flatten(p).items()
                if any(s.endswith("layer_norm") for s in k))
    head = trees.count(p["classifier"])
    self.assertEqual(total, trees.count(p))
    self.assertEqual(trainable, expected + norms + head)

  def test_strip_restores_the_base_tree_and_input_is_untouched(self):
    before = trees.flatten(self.params)
    p = bottleneck.inject_bottleneck(self.params, self.config)
    self.assertTrue(bottleneck.has_adapters(p))
    self.assertFalse(bottleneck.has_adapters(self.params))
    self.assertEqual(set(trees.flatten(self.params)), set(before))
    stripped = trees.flatten(bottleneck.strip_adapters(p))
    self.assertEqual(set(stripped), set(before))
    for k in before:
      self.assertIs(stripped[k], before[k])

  def test_bad_input(self):
    p = bottleneck.inject_bottleneck(self.params, self.config)
    with self.assertRaisesRegex(ValueError, "already carries"):
      bottleneck.inject_bottleneck(p, self.config)
    with self.assertRaisesRegex(ValueError, "positive"):
      bottleneck.inject_bottleneck(self.params, self.config, size=0)
    with self.assertRaisesRegex(ValueError, "reduction_factor"):
      bottleneck.inject_bottleneck(self.params, self.config, reduction_factor=128)
    with self.assertRaisesRegex(ValueError, "num_hidden_layers"):
      bottleneck.inject_bottleneck(self.params, self.config.replace(num_hidden_layers=3))
    with self.assertRaisesRegex(ValueError, "hidden size"):
      bottleneck.inject_bottleneck(self.params, self.config.replace(
          hidden_size=32, num_attention_heads=4))
    with self.assertRaisesRegex(ValueError, "no bottleneck adapters"):
      bottleneck.adapter_size(self.params)

  def test_optax_step_on_bottleneck_partition_keeps_frozen_leaves_bit_identical(self):
    p = bottleneck.inject_bottleneck(self.params, self.config, seed=0)
    trainable, frozen = partition.split(p, "bottleneck")
    frozen_before = jax.tree.map(np.array, frozen)
    trainable_before = trees.flatten(jax.tree.map(np.array, trainable))
    config, batch = self.config, self.batch

    def loss_fn(tr, fr):
      logits = apply(partition.combine(tr, fr), batch, config=config)["logits"]
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, jnp.asarray(batch["labels"])).mean()

    opt = optax.adamw(1e-2)
    state = opt.init(trainable)

    @jax.jit
    def step(params, st):
      tr, fr = partition.split(params, "bottleneck")
      loss, g = jax.value_and_grad(loss_fn)(tr, fr)
      updates, st = opt.update(g, st, tr)
      return partition.combine(optax.apply_updates(tr, updates), fr), st, loss

    params = p
    for _ in range(3):
      params, state, _ = step(params, state)
    trainable, frozen_after = partition.split(params, "bottleneck")
    # Frozen: the leaves of the updated full tree are unchanged bit for bit.
    self.assertEqual(set(trees.flatten(frozen_after)), set(trees.flatten(frozen_before)))
    for k, v in trees.flatten(frozen_after).items():
      np.testing.assert_array_equal(np.asarray(v), trees.flatten(frozen_before)[k])
    after = trees.flatten(trainable)
    self.assertTrue(any(k[-2:] == ("up", "kernel") for k in after))
    for k, v in after.items():  # every trainable leaf (adapters, norms, head) moved
      self.assertFalse(np.array_equal(np.asarray(v), trainable_before[k]), msg=str(k))
    # The frozen split holds every base weight except norms and head, and no adapter.
    fk = set(trees.flatten(frozen_after))
    self.assertIn(("encoder", "layer_0", "query", "kernel"), fk)
    self.assertFalse(any(bottleneck.is_adapter_path(k) for k in fk))
    self.assertFalse(any(k[0] == "classifier" for k in fk))


if __name__ == "__main__":
  absltest.main()
