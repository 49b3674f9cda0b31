"""Task vectors and per-layer stacks: shapes, layouts and values vs numpy float64."""
from absl.testing import absltest, parameterized
import numpy as np

from tvgeo_jax.adapters import lora
from tvgeo_jax.vectors import task_vectors as tv
from tvgeo_jax.core import trees
from tvgeo_jax.models import init_params, tiny_config

_CFG = tiny_config("roberta", vocab_size=97, hidden_size=32, num_hidden_layers=3,
                   num_attention_heads=4, intermediate_size=48, max_position_embeddings=40)
L, H, F = 3, 32, 48
_OUT_IN = {"query": (H, H), "key": (H, H), "value": (H, H), "attention_output": (H, H),
           "intermediate": (F, H), "output": (H, F)}


def _perturb(params, seed, scale=0.01):
  rng = np.random.RandomState(seed)
  return trees.map_with_path(
      lambda p, v: (np.asarray(v) + scale * rng.randn(*np.shape(v))).astype(np.float32), params)


def _lora_tree(base, seed, rank=4, targets=("query", "value")):
  tree = lora.inject_lora(base, targets=targets, rank=rank, alpha=16.0, seed=seed)
  rng = np.random.RandomState(seed + 100)
  return trees.map_with_path(
      lambda p, v: (0.1 * rng.randn(*np.shape(v))).astype(np.float32)
      if p[-1] == "lora_b" else v, tree)


def _with_adapters(params, seed, bottleneck=8):
  rng = np.random.RandomState(seed)
  out = trees.flatten(params)
  for i in range(L):
    for name in ("attention_adapter", "output_adapter"):
      base = ("encoder", f"layer_{i}", name)
      out[base + ("down", "kernel")] = rng.randn(H, bottleneck).astype(np.float32)
      out[base + ("down", "bias")] = rng.randn(bottleneck).astype(np.float32)
      out[base + ("up", "kernel")] = rng.randn(bottleneck, H).astype(np.float32)
      out[base + ("up", "bias")] = rng.randn(H).astype(np.float32)
  return trees.unflatten(out)


class FullTaskVectorTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.base = init_params(_CFG, seed=0)
    cls.fts = [_perturb(cls.base, s) for s in (1, 2)]

  def test_tree_difference(self):
    """Base first; the body leaves (heads are never part of a task vector)."""
    d = tv.task_vector(self.base, self.fts[0])
    flat_d, flat_ft, flat_b = (trees.flatten(t) for t in (d, self.fts[0], self.base))
    self.assertEqual(set(flat_d), {p for p in flat_b if p[0] != "classifier"})
    for p in flat_d:
      np.testing.assert_allclose(np.asarray(flat_d[p]),
                                 flat_ft[p].astype(np.float64) - flat_b[p], atol=1e-6)

  def test_mismatches_are_named(self):
    bad = trees.flatten(self.fts[0])
    bad[("encoder", "layer_1", "value", "kernel")] = np.zeros((H, 5), np.float32)
    with self.assertRaisesRegex(ValueError, r"encoder/layer_1/value/kernel has shape \(32, 5\)"
                                r" in model 0 but \(32, 32\) in base"):
      tv.task_vector(self.base, trees.unflatten(bad))
    bodyless = {k: v for k, v in self.fts[0].items() if k != "encoder"}
    with self.assertRaisesRegex(ValueError, "is in base only"):
      tv.task_vector(self.base, bodyless)
    # A LoRA tree's task vector is its update B·A on the LoRA-carrying kernels only.
    lora_tree = _lora_tree(self.base, 0)
    d = trees.flatten(tv.task_vector(self.base, lora_tree))
    self.assertEqual(set(d), {p + ("kernel",) for p in lora.lora_paths(lora_tree)})
    for p, v in d.items():
      np.testing.assert_allclose(np.asarray(v),
                                 lora.delta_kernel(trees.get_path(lora_tree, p[:-1])), atol=1e-6)

  @parameterized.parameters(*_OUT_IN)
  def test_stack_full_pairs_and_vectors(self, module):
    stack = tv.stack_full([(ft, self.base) for ft in self.fts], module)
    self.assertEqual(stack.shape, (2, L) + _OUT_IN[module])
    for t, ft in enumerate(self.fts):
      for i in range(L):
        k_ft = ft["encoder"][f"layer_{i}"][module]["kernel"].astype(np.float64)
        k_b = self.base["encoder"][f"layer_{i}"][module]["kernel"]
        np.testing.assert_allclose(np.asarray(stack[t, i]), (k_ft - k_b).T, atol=1e-6)
    vectors = [tv.task_vector(self.base, ft) for ft in self.fts]
    np.testing.assert_allclose(np.asarray(tv.stack_full(vectors, module)), np.asarray(stack),
                               atol=0)

  def test_all_modules_and_layer_subset(self):
    stacks = tv.stack_full([(ft, self.base) for ft in self.fts], "all")
    self.assertEqual(list(stacks), list(tv.MODULES))
    for m, s in stacks.items():
      self.assertEqual(s.shape, (2, L) + _OUT_IN[m])
    sub = tv.stack_full([(self.fts[0], self.base)], "value", layers=[2])
    np.testing.assert_array_equal(np.asarray(sub[0, 0]), np.asarray(stacks["value"][0, 2]))
    with self.assertRaisesRegex(ValueError, r"Layers \[7\] not in this tree"):
      tv.stack_full([(self.fts[0], self.base)], "value", layers=[7])
    with self.assertRaisesRegex(ValueError, "Unknown module 'q_proj'"):
      tv.stack_full([(self.fts[0], self.base)], "q_proj")


class LoraTaskVectorTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.base = init_params(_CFG, seed=0)
    cls.models = [_lora_tree(cls.base, s) for s in (1, 2, 3)]

  def test_factor_layout_and_product_equals_merged_difference(self):
    a, b = tv.lora_factors(self.models[0], "value")
    self.assertEqual(a.shape, (L, 4, H))
    self.assertEqual(b.shape, (L, H, 4))
    delta = tv.lora_delta(self.models[0], "value")
    self.assertEqual(delta.shape, (L, H, H))
    merged = lora.merge_lora(self.models[0])
    for i in range(L):
      m = self.models[0]["encoder"][f"layer_{i}"]["value"]
      np.testing.assert_array_equal(np.asarray(a[i]), m["lora_a"].T)
      np.testing.assert_allclose(np.asarray(b[i]), 4.0 * m["lora_b"].T, rtol=1e-6)
      ref = (merged["encoder"][f"layer_{i}"]["value"]["kernel"].astype(np.float64)
             - self.base["encoder"][f"layer_{i}"]["value"]["kernel"]).T
      np.testing.assert_allclose(np.asarray(delta[i]), ref, atol=1e-6)
      np.testing.assert_allclose(np.asarray(b[i]).astype(np.float64) @ np.asarray(a[i]), ref,
                                 atol=1e-6)

  def test_stacks(self):
    a, b = tv.stack_lora(self.models, "query")
    self.assertEqual(a.shape, (3, L, 4, H))
    self.assertEqual(b.shape, (3, L, H, 4))
    full = tv.stack_full(self.models, "query")
    self.assertEqual(full.shape, (3, L, H, H))
    pairs = tv.stack_full([(m, self.base) for m in self.models], "query")
    np.testing.assert_allclose(np.asarray(full), np.asarray(pairs), atol=1e-6)
    np.testing.assert_allclose(np.einsum("tlor,tlri->tloi", np.asarray(b, np.float64),
                                         np.asarray(a, np.float64)),
                               np.asarray(full), atol=1e-6)
    per_module = tv.lora_task_vector(self.models[0], products=True)
    np.testing.assert_allclose(np.asarray(per_module["encoder/layer_1/query"]),
                               np.asarray(full[0, 1]), atol=1e-6)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, r"'key' carries no LoRA factors in layers \[0, 1, 2\]"):
      tv.lora_factors(self.models[0], "key")
    mixed = lora.inject_lora(self.base, rank=4, rank_pattern={"layer_2/value": 2})
    with self.assertRaisesRegex(ValueError, "ranks of 'value' differ across layers"):
      tv.lora_factors(mixed, "value")
    self.assertEqual(tv.lora_factors(mixed, "value", layers=[0, 1])[0].shape, (2, 4, H))
    other_rank = _lora_tree(self.base, 9, rank=2)
    with self.assertRaisesRegex(ValueError, "differ in shape across models"):
      tv.stack_lora([self.models[0], other_rank], "query")
    with self.assertRaisesRegex(ValueError, "carries no LoRA factors; use stack_full"):
      tv.stack_lora([self.base], "query")


class AdapterTaskVectorTest(absltest.TestCase):

  def test_adapter_weights_are_their_own_task_vector(self):
    base = init_params(_CFG, seed=0)
    models = [_with_adapters(base, s) for s in (1, 2)]
    w = tv.adapter_weights(models[0])
    self.assertEqual(set(w["encoder"]["layer_0"]), {"attention_adapter", "output_adapter"})
    self.assertNotIn("query", w["encoder"]["layer_0"])
    d = tv.task_vector(base, models[0])  # frozen backbone: zero; adapters whole
    np.testing.assert_array_equal(
        np.asarray(d["encoder"]["layer_1"]["output_adapter"]["up"]["kernel"]),
        models[0]["encoder"]["layer_1"]["output_adapter"]["up"]["kernel"])
    self.assertEqual(float(np.abs(np.asarray(d["encoder"]["layer_1"]["query"]["kernel"])).max()),
                     0.0)
    down = tv.stack_full(models, "attention_adapter/down")
    self.assertEqual(down.shape, (2, L, 8, H))
    pairs = tv.stack_full([(m, base) for m in models], "output_adapter/up")
    self.assertEqual(pairs.shape, (2, L, H, 8))
    for t, m in enumerate(models):
      np.testing.assert_array_equal(
          np.asarray(down[t, 2]), m["encoder"]["layer_2"]["attention_adapter"]["down"]["kernel"].T)
      np.testing.assert_array_equal(
          np.asarray(pairs[t, 0]), m["encoder"]["layer_0"]["output_adapter"]["up"]["kernel"].T)
    with self.assertRaisesRegex(ValueError, "No bottleneck-adapter leaves"):
      tv.adapter_weights(base)


if __name__ == "__main__":
  absltest.main()
