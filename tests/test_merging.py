"""Merges as pytree arithmetic: hand-computed trees, numpy references, peft parity."""
import itertools
import os
import shutil
import tempfile
import warnings

from absl.testing import absltest, parameterized
import jax
import numpy as np
import torch
from peft.utils import merge_utils

from tvgeo_jax import lora, merging, peft_io, trees
from tvgeo_jax.models import Encoder, make_apply, save_pretrained, tiny_config

import peft_fixtures

F = np.float32


def _close(test, got, want, atol=1e-6):
  np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                             atol=atol, rtol=0)


def _full(q_kernel, q_bias, v_kernel, head):
  """A 3-module tree: query, value and a classifier head."""
  return {"encoder": {"layer_0": {"query": {"kernel": np.asarray(q_kernel, F),
                                            "bias": np.asarray(q_bias, F)},
                                  "value": {"kernel": np.asarray(v_kernel, F)}}},
          "classifier": {"out_proj": {"kernel": np.asarray(head, F)}}}


def _random_full(rng, shapes=None):
  shapes = shapes or {("encoder", "layer_0", "query", "kernel"): (4, 3),
                      ("encoder", "layer_0", "query", "bias"): (3,),
                      ("encoder", "layer_0", "value", "kernel"): (4, 5),
                      ("classifier", "out_proj", "kernel"): (3, 2)}
  return trees.unflatten({p: rng.normal(size=s).astype(F) for p, s in shapes.items()})


def _lora(base, factors, scale=2.0, head=None):
  """``base`` with LoRA factors {module name: (a, b)} on layer_0 modules."""
  tree = trees.unflatten(dict(trees.flatten(base)))
  for name, (a, b) in factors.items():
    mod = tree["encoder"]["layer_0"][name]
    mod["lora_a"] = np.asarray(a, F)
    mod["lora_b"] = np.asarray(b, F)
    mod["lora_scale"] = np.asarray(scale, F)
  if head is not None:
    tree["classifier"]["out_proj"]["kernel"] = np.asarray(head, F)
  return tree


def _np_ties_global(taus, k, rule="mass"):
  """Paper C's three steps on the concatenated flattened vectors (float64 numpy)."""
  flat = [np.concatenate([np.ravel(t[p]) for p in sorted(t)]).astype(np.float64) for t in taus]
  trimmed = []
  for v in flat:
    thr = np.sort(np.abs(v))[-max(1, int(k * v.size))]
    trimmed.append(np.where(np.abs(v) >= thr, v, 0.0))
  trimmed = np.stack(trimmed)
  score = trimmed.sum(0) if rule == "mass" else np.sign(trimmed).sum(0)
  elected = np.sign(score)
  elected[elected == 0] = np.sign(elected.sum())
  agree = (trimmed != 0) & (np.sign(trimmed) == elected)
  merged = (trimmed * agree).sum(0) / np.maximum(agree.sum(0), 1)
  out, i = {}, 0
  for p in sorted(taus[0]):
    n = np.size(taus[0][p])
    out[p] = merged[i:i + n].reshape(np.shape(taus[0][p]))
    i += n
  return out


class AveragingTest(parameterized.TestCase):

  def test_weight_average_by_hand(self):
    a = _full([[1, 2], [3, 4]], [0, 2], [[1, 1]], [[7, 7]])
    b = _full([[3, 0], [1, 0]], [2, 2], [[0, -1]], [[9, 9]])
    m = merging.weight_average([a, b])
    _close(self, m["encoder"]["layer_0"]["query"]["kernel"], [[2, 1], [2, 2]])
    _close(self, m["encoder"]["layer_0"]["query"]["bias"], [1, 2])
    _close(self, m["encoder"]["layer_0"]["value"]["kernel"], [[0.5, 0]])
    _close(self, m["classifier"]["out_proj"]["kernel"], [[7, 7]])  # head of model 0, unmerged
    w = merging.weight_average([a, b], weights=[0.25, 0.75], head_from=1)
    _close(self, w["encoder"]["layer_0"]["query"]["kernel"], [[2.5, 0.5], [1.5, 1]])
    _close(self, w["classifier"]["out_proj"]["kernel"], [[9, 9]])

  def test_module_selection_and_heads(self):
    a = _full([[1, 2]], [0, 2], [[1, 1]], [[7]])
    b = _full([[3, 0]], [2, 2], [[0, -1]], [[9]])
    m = merging.weight_average([a, b], modules=("value",))
    _close(self, m["encoder"]["layer_0"]["query"]["kernel"], [[1, 2]])  # unselected: model 0
    _close(self, m["encoder"]["layer_0"]["value"]["kernel"], [[0.5, 0]])
    p = merging.weight_average([a, b], modules=lambda path: path[-1] == "bias")
    _close(self, p["encoder"]["layer_0"]["query"]["bias"], [1, 2])
    _close(self, p["encoder"]["layer_0"]["query"]["kernel"], [[1, 2]])
    swapped = merging.with_head(m, b)
    _close(self, swapped["classifier"]["out_proj"]["kernel"], [[9]])
    _close(self, swapped["encoder"]["layer_0"]["value"]["kernel"], [[0.5, 0]])
    headless = merging.weight_average([a, b], head_from=None)
    self.assertNotIn("classifier", headless)
    with self.assertRaisesRegex(ValueError, "never merged"):
      merging.weight_average([a, b], modules=("classifier",))
    with self.assertRaisesRegex(ValueError, "selects no"):
      merging.weight_average([a, b], modules=("nonexistent",))

  def test_lora_factor_and_product_average_by_hand(self):
    base = _full([[1, 0], [0, 1]], [0, 0], [[1, 1]], [[0]])
    m1 = _lora(base, {"query": ([[1], [2]], [[3, 4]])}, head=[[1]])
    m2 = _lora(base, {"query": ([[3], [0]], [[1, 0]])}, head=[[2]])
    fa = merging.lora_factor_average([m1, m2])
    q = fa["encoder"]["layer_0"]["query"]
    _close(self, q["lora_a"], [[2], [1]])
    _close(self, q["lora_b"], [[2, 2]])
    _close(self, q["lora_scale"], 2.0)
    _close(self, q["kernel"], [[1, 0], [0, 1]])
    _close(self, fa["classifier"]["out_proj"]["kernel"], [[1]])
    # ΔW1 = 2·[[3,4],[6,8]], ΔW2 = 2·[[3,0],[0,0]]; mean = [[6,4],[6,8]].
    pa = merging.lora_product_average([m1, m2], head_from=1)
    q = pa["encoder"]["layer_0"]["query"]
    self.assertNotIn("lora_a", q)
    _close(self, q["kernel"], [[7, 4], [6, 9]])
    _close(self, pa["classifier"]["out_proj"]["kernel"], [[2]])
    # Factor averaging's update 2·[[2],[1]]·[[2,2]] = [[8,8],[4,4]]: the cross terms.
    _close(self, 2.0 * np.asarray(fa["encoder"]["layer_0"]["query"]["lora_a"])
           @ np.asarray(fa["encoder"]["layer_0"]["query"]["lora_b"]), [[8, 8], [4, 4]])
    wa = merging.weight_average([m1, m2])
    _close(self, wa["encoder"]["layer_0"]["query"]["kernel"], [[7, 4], [6, 9]])

  def test_product_average_refactor_matches_numpy_svd(self):
    rng = np.random.default_rng(0)
    base = _random_full(rng)
    models = [_lora(base, {"value": (rng.normal(size=(4, 2)), rng.normal(size=(2, 5)))},
                    scale=0.5) for _ in range(3)]
    mean = sum(0.5 * np.asarray(m["encoder"]["layer_0"]["value"]["lora_a"], np.float64)
               @ np.asarray(m["encoder"]["layer_0"]["value"]["lora_b"], np.float64)
               for m in models) / 3
    u, s, vt = np.linalg.svd(mean)
    for r, want in ((4, mean), (1, s[0] * np.outer(u[:, 0], vt[0]))):
      out = merging.lora_product_average(models, refactor_rank=r)["encoder"]["layer_0"]["value"]
      self.assertEqual(np.shape(out["lora_a"]), (4, r))
      _close(self, out["lora_scale"] * np.asarray(out["lora_a"]) @ np.asarray(out["lora_b"]),
             want, atol=1e-5)
      _close(self, out["kernel"], base["encoder"]["layer_0"]["value"]["kernel"])
    with self.assertRaisesRegex(ValueError, "exceeds"):
      merging.lora_product_average(models, refactor_rank=5)

  def test_merge_with_itself_returns_it(self):
    rng = np.random.default_rng(1)
    full = _random_full(rng)
    base = _random_full(rng)
    lo = _lora(base, {"query": (rng.normal(size=(4, 2)), rng.normal(size=(2, 3)))})
    for got, want in ((merging.weight_average([full, full]), full),
                      (merging.lora_factor_average([lo, lo, lo]), lo),
                      (merging.task_arithmetic(base, [full], 1.0), full),
                      (merging.ties(base, [full], k=1.0), full)):
      self.assertEqual(sorted(trees.flatten(got)), sorted(trees.flatten(want)))
      for p, v in trees.flatten(want).items():
        _close(self, trees.get_path(got, p), v, atol=1e-6)
    folded = merging.lora_product_average([lo, lo])
    q = lo["encoder"]["layer_0"]["query"]
    _close(self, folded["encoder"]["layer_0"]["query"]["kernel"],
           q["kernel"] + 2.0 * q["lora_a"].astype(np.float64) @ q["lora_b"], atol=1e-5)

  def test_errors(self):
    rng = np.random.default_rng(2)
    base = _random_full(rng)
    lo1 = _lora(base, {"query": (rng.normal(size=(4, 2)), rng.normal(size=(2, 3)))})
    lo2 = _lora(base, {"query": (rng.normal(size=(4, 3)), rng.normal(size=(3, 3)))})
    with self.assertRaisesRegex(ValueError, "empty list"):
      merging.weight_average([])
    with self.assertRaisesRegex(ValueError, "different ranks"):
      merging.lora_factor_average([lo1, lo2])
    merging.lora_product_average([lo1, lo2])  # mixed ranks are fine for products
    other = _lora(_random_full(rng), {"query": (np.ones((4, 2)), np.ones((2, 3)))})
    with self.assertRaisesRegex(ValueError, "different frozen bases"):
      merging.lora_factor_average([lo1, other])
    with self.assertRaisesRegex(ValueError, "different frozen bases"):
      merging.ties(base, [other])
    bigger = _random_full(rng, {("encoder", "layer_0", "query", "kernel"): (4, 4),
                                ("encoder", "layer_0", "query", "bias"): (3,),
                                ("encoder", "layer_0", "value", "kernel"): (4, 5)})
    with self.assertRaisesRegex(ValueError, "shape"):
      merging.weight_average([base, bigger])
    with self.assertRaisesRegex(ValueError, "scale"):
      merging.lora_factor_average([lo1, _lora(base, {"query": (np.ones((4, 2)),
                                                               np.ones((2, 3)))}, scale=1.0)])
    with self.assertRaisesRegex(ValueError, "no LoRA"):
      merging.lora_factor_average([base, base])
    with self.assertRaisesRegex(ValueError, "base carries LoRA"):
      merging.task_arithmetic(lo1, [lo1])
    for k in (0, 0.0, -0.1, 1.5):
      with self.assertRaisesRegex(ValueError, r"\(0, 1\]"):
        merging.ties(base, [base], k=k)
    with self.assertRaisesRegex(ValueError, "granularity"):
      merging.ties(base, [base], granularity="row")
    with self.assertRaisesRegex(ValueError, "drop_rate"):
      merging.dare(base, [base], drop_rate=1.0)
    with self.assertRaisesRegex(ValueError, "weights"):
      merging.weight_average([base, base], weights=[1.0])


class TaskVectorTest(parameterized.TestCase):

  def test_task_arithmetic_by_hand(self):
    base = _full([[0, 0]], [1, 1], [[2, 2]], [[0]])
    m1 = _full([[1, -2]], [1, 1], [[2, 2]], [[5]])
    m2 = _full([[3, 4]], [2, 0], [[2, 3]], [[6]])
    m = merging.task_arithmetic(base, [m1, m2], lam=0.5)
    _close(self, m["encoder"]["layer_0"]["query"]["kernel"], [[2, 1]])
    _close(self, m["encoder"]["layer_0"]["query"]["bias"], [1.5, 0.5])
    _close(self, m["encoder"]["layer_0"]["value"]["kernel"], [[2, 2.5]])
    _close(self, m["classifier"]["out_proj"]["kernel"], [[5]])
    q = merging.task_arithmetic(base, [m1, m2], lam=[1.0, 0.0], modules=("query",))
    _close(self, q["encoder"]["layer_0"]["query"]["kernel"], [[1, -2]])
    _close(self, q["encoder"]["layer_0"]["value"]["kernel"], [[2, 2]])  # base

  def test_lora_task_vector_is_the_product(self):
    base = _full([[1, 0], [0, 1]], [0, 0], [[1, 1]], [[0]])
    m = _lora(base, {"query": ([[1], [2]], [[3, 4]])})
    tv = merging.task_vector(base, m)
    self.assertEqual(list(trees.flatten(tv)), [("encoder", "layer_0", "query", "kernel")])
    _close(self, tv["encoder"]["layer_0"]["query"]["kernel"], [[6, 8], [12, 16]])
    merged = merging.task_arithmetic(base, [m], lam=0.5)
    self.assertNotIn("lora_a", merged["encoder"]["layer_0"]["query"])
    _close(self, merged["encoder"]["layer_0"]["query"]["kernel"], [[4, 4], [6, 9]])
    back = merging.apply_task_vector(base, merging.keep_top_k(tv, 0.5), 1.0, head_from=m)
    _close(self, back["encoder"]["layer_0"]["query"]["kernel"], [[1, 0], [12, 17]])

  def test_dare(self):
    rng = np.random.default_rng(3)
    base = _random_full(rng, {("encoder", "layer_0", "value", "kernel"): (40, 50),
                              ("encoder", "layer_0", "query", "kernel"): (3, 3)})
    models = [_random_full(rng, {("encoder", "layer_0", "value", "kernel"): (40, 50),
                                 ("encoder", "layer_0", "query", "kernel"): (3, 3)})
              for _ in range(2)]
    ta = merging.task_arithmetic(base, models, lam=0.7)
    d0 = merging.dare(base, models, drop_rate=0.0, seed=5, lam=0.7)
    for p, v in trees.flatten(ta).items():
      _close(self, trees.get_path(d0, p), v, atol=1e-5)
    p = 0.3
    one = merging.dare(base, models[:1], drop_rate=p, seed=7)
    again = merging.dare(base, models[:1], drop_rate=p, seed=7)
    other = merging.dare(base, models[:1], drop_rate=p, seed=8)
    path = ("encoder", "layer_0", "value", "kernel")
    got = np.asarray(trees.get_path(one, path), np.float64) - trees.get_path(base, path)
    tau = np.asarray(trees.get_path(models[0], path), np.float64) - trees.get_path(base, path)
    dropped = np.isclose(got, 0.0, atol=1e-6)
    _close(self, got[~dropped], tau[~dropped] / (1 - p), atol=1e-5)
    n = got.size
    self.assertLess(abs(dropped.mean() - p), 5 * np.sqrt(p * (1 - p) / n))
    np.testing.assert_array_equal(trees.get_path(one, path), trees.get_path(again, path))
    self.assertFalse(np.array_equal(trees.get_path(one, path), trees.get_path(other, path)))


class TiesTest(parameterized.TestCase):

  def _hand_models(self):
    """Three task vectors over two leaves (n = 6), base 0; see the expected values."""
    base = {"a": {"kernel": np.zeros((2, 2), F)}, "b": {"bias": np.zeros(2, F)}}
    taus = [([[4, -1], [0.5, -3]], [2, -0.2]),
            ([[-2, 5], [1, 1]], [-1, 0.1]),
            ([[-1, -1], [-1, 2]], [0.5, 3])]
    models = [{"a": {"kernel": np.asarray(k, F)}, "b": {"bias": np.asarray(b, F)}}
              for k, b in taus]
    return base, models

  def test_global_ties_by_hand(self):
    # k=0.5 keeps |τ| ≥ the 3rd largest magnitude of each vector (ties kept):
    #   τ̂1 = a[[4,0],[0,-3]] b[2,0]; τ̂2 = a[[-2,5],[1,1]] b[-1,0]; τ̂3 = a[[-1,-1],[-1,2]] b[0,3].
    # mass sums a[[1,4],[0,0]] b[1,3]: the two zeros take sign(Σ elected) = sign(4) = +.
    # Disjoint means: a[[4,5],[1,1.5]] b[2,3]; λ = 0.5 halves them.
    base, models = self._hand_models()
    m = merging.ties(base, models, k=0.5, lam=0.5)
    _close(self, m["a"]["kernel"], [[2, 2.5], [0.5, 0.75]])
    _close(self, m["b"]["bias"], [1, 1.5])
    # frequency: sign sums a[[-1,0],[0,1]] b[0,1], Σ elected = 1 → zeros take +.
    f = merging.ties(base, models, k=0.5, lam=1.0, sign_rule="frequency")
    _close(self, f["a"]["kernel"], [[-1.5, 5], [1, 1.5]])
    _close(self, f["b"]["bias"], [2, 3])

  def test_zero_sign_takes_the_global_majority(self):
    # No trimming; mass sums [0, 0, -4, -4]: Σ elected = -2, so the zeros take -.
    base = {"x": {"bias": np.zeros(4, F)}}
    models = [{"x": {"bias": np.asarray(v, F)}} for v in ([1, -1, -2, -3], [-1, 1, -2, -1])]
    m = merging.ties(base, models, k=1.0)
    _close(self, m["x"]["bias"], [-1, -1, -2, -2])

  @parameterized.parameters("mass", "frequency")
  def test_global_ties_matches_numpy_reference(self, rule):
    rng = np.random.default_rng(4)
    base = _random_full(rng)
    models = [_random_full(rng) for _ in range(4)]
    # Round to a coarse grid so magnitudes tie and trimmed sums cancel sometimes.
    models = [trees.unflatten({p: np.round(v * 2) / 2 for p, v in trees.flatten(m).items()})
              for m in models]
    base = trees.unflatten({p: np.zeros_like(v) for p, v in trees.flatten(base).items()})
    taus = [{p: v for p, v in trees.flatten(m).items() if p[0] != "classifier"} for m in models]
    for k in (0.2, 0.5, 1.0):
      want = _np_ties_global(taus, k, rule)
      got = merging.ties(base, models, k=k, lam=1.0, sign_rule=rule)
      for p, v in want.items():
        _close(self, trees.get_path(got, p), v, atol=1e-6)

  def test_kth_largest_magnitude(self):
    rng = np.random.default_rng(5)
    leaves = [np.round(rng.normal(size=s), 1).astype(F) for s in ((7, 3), (5,), (2, 2, 2))]
    leaves[1][:2] = 0.0
    mags = np.sort(np.abs(np.concatenate([x.ravel() for x in leaves])))[::-1]
    for k in (1, 2, 5, 13, len(mags)):
      self.assertEqual(merging.kth_largest_magnitude(leaves, k), mags[k - 1])
    with self.assertRaisesRegex(ValueError, "NaN"):
      merging.kth_largest_magnitude([np.asarray([1.0, np.nan], F)], 1)

  @parameterized.parameters(("total", "mass", "majority"), ("total", "mass", "positive"),
                            ("frequency", "frequency", "positive"))
  def test_per_tensor_ties_matches_peft(self, peft_rule, rule, zero_sign):
    rng = np.random.default_rng(6)
    base = _random_full(rng)
    models = [_random_full(rng) for _ in range(3)]
    density, lam = 0.3, 0.7
    got = merging.ties(base, models, k=density, lam=lam, granularity="per_tensor",
                       sign_rule=rule, zero_sign=zero_sign)
    for p, b in trees.flatten(base).items():
      if p[0] == "classifier":
        continue
      taus = [torch.from_numpy(trees.get_path(m, p).astype(np.float64) - b) for m in models]
      want = merge_utils.ties(taus, torch.full((3,), lam, dtype=torch.float64), density,
                              majority_sign_method=peft_rule).numpy()
      _close(self, np.asarray(trees.get_path(got, p), np.float64) - b, want, atol=1e-5)

  def test_per_tensor_ties_on_lora_products_matches_peft(self):
    rng = np.random.default_rng(7)
    base = _random_full(rng)
    models = [_lora(base, {"query": (rng.normal(size=(4, 2)), rng.normal(size=(2, 3))),
                           "value": (rng.normal(size=(4, 2)), rng.normal(size=(2, 5)))},
                    scale=0.5) for _ in range(3)]
    got = merging.ties(base, models, k=0.4, lam=1.0, granularity="per_tensor")
    for name in ("query", "value"):
      # peft / PyTorch layout: ΔW = scale·B·A (out, in) with B = lora_b.T, A = lora_a.T.
      deltas = [0.5 * torch.from_numpy(m["encoder"]["layer_0"][name]["lora_b"].T.astype(np.float64))
                @ torch.from_numpy(m["encoder"]["layer_0"][name]["lora_a"].T.astype(np.float64))
                for m in models]
      want = merge_utils.ties(deltas, torch.ones(3, dtype=torch.float64), 0.4).numpy().T
      _close(self, np.asarray(got["encoder"]["layer_0"][name]["kernel"], np.float64)
             - base["encoder"]["layer_0"][name]["kernel"], want, atol=1e-5)
      _close(self, got["encoder"]["layer_0"][name]["bias"] if name == "query" else 0,
             base["encoder"]["layer_0"][name]["bias"] if name == "query" else 0)

  def test_keep_top_k(self):
    rng = np.random.default_rng(8)
    tv = {"a": {"kernel": rng.normal(size=(6, 5)).astype(F)}, "b": {"bias": rng.normal(size=7)
                                                                    .astype(F)}}
    per = merging.keep_top_k(tv, 0.3, granularity="per_tensor")
    for p, v in trees.flatten(tv).items():
      want = merge_utils.prune(torch.from_numpy(v), 0.3, method="magnitude").numpy()
      _close(self, trees.get_path(per, p), want)
    glob = merging.keep_top_k(tv, 0.3)
    want = _np_keep_global(tv, 0.3)
    for p, v in want.items():
      _close(self, trees.get_path(glob, p), v)
    kept = sum(int(np.count_nonzero(v)) for v in trees.flatten(glob).values())
    self.assertEqual(kept, int(0.3 * 37))


def _np_keep_global(tv, k):
  flat = trees.flatten(tv)
  allv = np.concatenate([np.ravel(v) for v in flat.values()])
  thr = np.sort(np.abs(allv))[-max(1, int(k * allv.size))]
  return {p: np.where(np.abs(v) >= thr, v, 0) for p, v in flat.items()}


class SignConflictTest(parameterized.TestCase):

  def test_by_hand(self):
    taus = [{"x": np.asarray(v, F)} for v in ([1, 1, -1, 0], [-1, 1, 1, 0], [1, -1, 0, 2])]
    got = merging.sign_conflict_share(taus, k=1.0)
    # Pairs {1,2}: entries 0, 2 conflict; {1,3}: entry 1; {2,3}: entries 0, 1 (of 4).
    pairs = np.asarray([2, 1, 2]) / 4
    self.assertAlmostEqual(got[2]["mean"], pairs.mean())
    self.assertAlmostEqual(got[2]["std"], pairs.std())
    self.assertEqual(got[2]["subsets"], 3)
    self.assertAlmostEqual(got[3]["mean"], 3 / 4)
    overlap = merging.sign_conflict_share(taus, k=1.0, denominator="overlap")
    # Entries with two non-zero members: {1,2}: 3, {1,3}: 2, {2,3}: 2; all three: 3.
    self.assertAlmostEqual(overlap[2]["mean"], np.mean([2 / 3, 1 / 2, 2 / 2]))
    self.assertAlmostEqual(overlap[3]["mean"], 1.0)

  def test_matches_brute_force_and_samples(self):
    rng = np.random.default_rng(9)
    taus = [{"a": rng.normal(size=(5, 4)).astype(F), "b": rng.normal(size=6).astype(F)}
            for _ in range(5)]
    got = merging.sign_conflict_share(taus, k=0.4, max_subsets=100)
    kept = [np.concatenate([np.ravel(v) for v in _np_keep_global(t, 0.4).values()])
            for t in taus]
    for n in range(2, 6):
      shares = [np.mean(np.any([kept[i] > 0 for i in s], 0) & np.any([kept[i] < 0 for i in s], 0))
                for s in itertools.combinations(range(5), n)]
      self.assertAlmostEqual(got[n]["mean"], np.mean(shares), places=6)
    sampled = merging.sign_conflict_share(taus, k=0.4, max_subsets=3, seed=1)
    self.assertEqual([sampled[n]["subsets"] for n in range(2, 6)], [3, 3, 3, 1])
    self.assertEqual(sampled, merging.sign_conflict_share(taus, k=0.4, max_subsets=3, seed=1))
    with self.assertRaisesRegex(ValueError, "at least 2"):
      merging.sign_conflict_share(taus[:1])


class PeftInteropTest(absltest.TestCase):
  """Paper A's factor average equals peft's linear add_weighted_adapter at w = 0.25."""

  def test_factor_average_equals_peft_linear_weighted_adapter(self):
    import peft
    import transformers
    warnings.filterwarnings("ignore")
    tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
    config = tiny_config("roberta", num_labels=3, vocab_size=61, hidden_size=16,
                         num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                         max_position_embeddings=24)
    # One compiled init (init_params runs op by op, slow on a shared CPU).
    ids0 = np.full((1, 8), 3, np.int32)
    base = trees.to_numpy(jax.jit(Encoder(config, "classification").init)(
        jax.random.PRNGKey(0), ids0)["params"])
    base = trees.unflatten(dict(trees.flatten(base)))  # plain dicts
    rng = np.random.RandomState(0)
    models = []
    for seed in (1, 2):
      m = lora.inject_lora(base, targets=("query", "value"), rank=4, alpha=8.0, seed=seed)
      models.append(trees.map_with_path(
          lambda p, v: (0.3 * rng.randn(*np.shape(v))).astype(np.float32)
          if p[-1] in ("lora_a", "lora_b") or p[0] == "classifier" else v, m))
    ours = merging.lora_factor_average(models)  # head of task 1
    ids = rng.randint(4, config.vocab_size, size=(3, 7)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "token_type_ids": np.zeros_like(ids)}
    want = np.asarray(jax.jit(make_apply(config))(ours, batch)["logits"])

    # The transformers model carries task 1's head; adapters carry only the factors.
    save_pretrained(os.path.join(tmp, "base1"), config, lora.strip_lora(models[0]))
    for i, m in enumerate(models):
      peft_io.save_peft(os.path.join(tmp, f"a{i}"), m, config,
                        base_model_name_or_path=os.path.join(tmp, "base1"))
      peft_fixtures.plain_adapter(os.path.join(tmp, f"a{i}"))
    peft_io.save_peft(os.path.join(tmp, "ours"), ours, config,
                      base_model_name_or_path=os.path.join(tmp, "base1"))
    peft_fixtures.plain_adapter(os.path.join(tmp, "ours"))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        os.path.join(tmp, "base1")).eval()
    model = peft.PeftModel.from_pretrained(hf, os.path.join(tmp, "a0"), adapter_name="a0")
    model.load_adapter(os.path.join(tmp, "a1"), adapter_name="a1")
    model.load_adapter(os.path.join(tmp, "ours"), adapter_name="ours")
    model.add_weighted_adapter(["a0", "a1"], [0.25, 0.25], "w25", combination_type="linear")
    model.add_weighted_adapter(["a0", "a1"], [0.5, 0.5], "w50", combination_type="linear")
    model.eval()

    def logits(name):
      model.set_adapter(name)
      with torch.no_grad():
        return model(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
                     ).logits.numpy()

    np.testing.assert_allclose(logits("w25"), want, atol=2e-5)
    np.testing.assert_allclose(logits("ours"), want, atol=2e-5)  # our merge saved for peft
    self.assertGreater(np.max(np.abs(logits("w50") - want)), 1e-3)


if __name__ == "__main__":
  absltest.main()
