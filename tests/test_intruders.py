"""Intruder dimensions (Shuttleworth et al. 2024) on planted updates, against float64 numpy."""
from __future__ import annotations

from absl.testing import absltest
import numpy as np

from tvgeo_jax.geometry import intruders


def _max_cos64(w, w_base, k):
  """For each of w's top-k left-singular vectors, max |cos| with the base's (float64)."""
  u = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)[0][:, :k]
  u0 = np.linalg.svd(np.asarray(w_base, np.float64), full_matrices=False)[0]
  return np.abs(u.T @ u0).max(axis=1)


def _base(rng, out=48, inn=40):
  u0 = np.linalg.qr(rng.standard_normal((out, out)))[0][:, :inn]
  v0 = np.linalg.qr(rng.standard_normal((inn, inn)))[0]
  s0 = np.linspace(10.0, 1.0, inn)
  return u0, s0, v0, (u0 * s0) @ v0.T


class IntruderTest(absltest.TestCase):

  def test_planted_orthogonal_rank1_update_is_found(self):
    rng = np.random.default_rng(0)
    u0, _, v0, w0 = _base(rng)
    # u: orthogonal to the base's top 10 left vectors, spread over 16 of the others
    # (|cos| with each base vector 1/4); a large rank-1 update along it.
    u = u0[:, 20:36].sum(axis=1) / 4.0
    v = v0[:, 5]
    w = w0 + 30.0 * np.outer(u, v)
    count, best = intruders.intruder_dimensions(w.astype(np.float32), w0.astype(np.float32))
    self.assertEqual(int(count), 1)                      # defaults k=10, eps=0.5
    ref = _max_cos64(w, w0, 10)
    np.testing.assert_allclose(best, ref, atol=1e-4)
    self.assertLess(best[0], 0.5)                        # the new top direction
    self.assertEqual(int(np.sum(ref < 0.5)), 1)
    # a stricter threshold, below its cosine (~0.25), finds none
    self.assertEqual(int(intruders.intruder_dimensions(w, w0, eps=0.2)[0]), 0)

  def test_rescaling_existing_directions_is_not_an_intruder(self):
    rng = np.random.default_rng(1)
    u0, s0, v0, w0 = _base(rng)
    s = s0.copy()
    s[[30, 35, 38]] *= 40.0          # low directions become the top three
    w = (u0 * s) @ v0.T
    count, best = intruders.intruder_dimensions(w, w0, k=10, eps=0.5)
    self.assertEqual(int(count), 0)
    np.testing.assert_allclose(best, 1.0, atol=1e-4)
    np.testing.assert_allclose(best, _max_cos64(w, w0, 10), atol=1e-4)

  def test_layers_are_batched_and_inputs_checked(self):
    rng = np.random.default_rng(2)
    ws, w0s, expect = [], [], []
    for l in range(3):
      u0, _, v0, w0 = _base(rng, 32, 24)
      planted = l % 2 == 0
      w = w0 + (25.0 * np.outer(u0[:, 14:23].sum(1) / 3.0, v0[:, 0]) if planted else 0.0)
      ws.append(w), w0s.append(w0), expect.append(int(planted))
    count, best = intruders.intruder_dimensions(np.stack(ws), np.stack(w0s), k=5)
    np.testing.assert_array_equal(count, expect)
    self.assertEqual(best.shape, (3, 5))
    with self.assertRaisesRegex(ValueError, "one shape"):
      intruders.intruder_dimensions(ws[0], ws[0][:, :5])
    with self.assertRaisesRegex(ValueError, "k=99"):
      intruders.intruder_dimensions(ws[0], w0s[0], k=99)

  def test_trees_lora_full_and_bottleneck(self):
    """Per module and layer from trees: LoRA folds W + scale·A·B, bottleneck is frozen."""
    rng = np.random.default_rng(3)
    hidden, r = 24, 2
    layers_ft, layers_base, layers_lora, layers_adapter = {}, {}, {}, {}
    for i in range(2):
      u0, _, v0, w0 = _base(rng, hidden, hidden)
      kernel = w0.T.astype(np.float32)                   # Flax layout (in, out)
      direction = u0[:, 12:21].sum(1) / 3.0              # |cos| 1/3 with 9 base vectors
      delta = 30.0 * np.outer(direction, v0[:, 0])       # (out, in)
      layers_base[f"layer_{i}"] = {"query": {"kernel": kernel}}
      layers_ft[f"layer_{i}"] = {"query": {"kernel": kernel + (delta.T if i == 1 else 0)}}
      a = np.zeros((hidden, r), np.float32)              # lora_a (in, r)
      b = np.zeros((r, hidden), np.float32)              # lora_b (r, out)
      a[:, 0], b[0] = v0[:, 0], 30.0 * direction / 2.0   # scale 2 below
      layers_lora[f"layer_{i}"] = {"query": {"kernel": kernel, "lora_a": a, "lora_b": b,
                                             "lora_scale": np.float32(2.0)}}
      layers_adapter[f"layer_{i}"] = {
          "query": {"kernel": kernel},
          "attention_adapter": {"down": {"kernel": rng.standard_normal((hidden, 4))},
                                "up": {"kernel": rng.standard_normal((4, hidden))}}}
    base = {"encoder": layers_base}
    full = intruders.model_intruders({"encoder": layers_ft}, base, ["query"])
    np.testing.assert_array_equal(full["query"]["count"], [0, 1])
    lora_res = intruders.model_intruders({"encoder": layers_lora}, None, ["query"])
    np.testing.assert_array_equal(lora_res["query"]["count"], [1, 1])
    np.testing.assert_allclose(
        lora_res["query"]["max_cos"][1], full["query"]["max_cos"][1], atol=1e-4)
    adapter = intruders.model_intruders({"encoder": layers_adapter}, base, ["query"])
    np.testing.assert_array_equal(adapter["query"]["count"], [0, 0])
    with self.assertRaisesRegex(ValueError, "need the base weights"):
      intruders.model_intruders({"encoder": layers_ft}, None, ["query"])
    with self.assertRaisesRegex(ValueError, "layer_0/value/kernel"):
      intruders.model_intruders({"encoder": layers_ft}, base, ["value"])


if __name__ == "__main__":
  absltest.main()
