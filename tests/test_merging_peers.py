"""The merges peers ship (issue 22 item 4) against peft and float64 numpy references.

peft: ``merge_utils`` on the same tensors with the same random masks (product space),
and ``add_weighted_adapter`` on the same saved adapters (logits and ΔW) for ``svd``,
``dare_linear``, ``dare_ties``, ``magnitude_prune`` (factor space) and
``dare_linear_svd`` (product space). Elsewhere (breadcrumbs, DELLA, TSV-M, Iso-C,
KnOTS) the papers' formulas in float64 numpy, written here independently.
"""
import os
import shutil
import tempfile
from unittest import mock
import warnings

from absl.testing import absltest, parameterized
import jax
import numpy as np
import torch
from peft.utils import merge_utils

from tvgeo_jax import lora, merge_study, merging, peft_io, trees
from tvgeo_jax.models import Encoder, make_apply, save_pretrained, tiny_config

import peft_fixtures

F = np.float32
SHAPES = {("encoder", "layer_0", "query", "kernel"): (6, 5),
          ("encoder", "layer_0", "query", "bias"): (5,),
          ("encoder", "layer_0", "value", "kernel"): (6, 4),
          ("classifier", "out_proj", "kernel"): (5, 2)}
KERNELS = [p for p in SHAPES if p[-1] == "kernel" and p[0] != "classifier"]


def _tree(rng, shapes=SHAPES, scale=1.0):
  return trees.unflatten({p: (scale * rng.normal(size=s)).astype(F) for p, s in shapes.items()})


def _body(tree):
  return {p: np.asarray(v, np.float64) for p, v in trees.flatten(tree).items()
          if p[0] != "classifier"}


def _taus(base, models):
  b = _body(base)
  return [{p: v - b[p] for p, v in _body(m).items()} for m in models]


def _low_rank_models(rng, base, num, rank):
  """Full trees whose kernel task vectors have rank ``rank`` (biases move too)."""
  out = []
  for _ in range(num):
    flat = dict(trees.flatten(base))
    for p in SHAPES:
      if p[-1] == "kernel" and p[0] != "classifier":
        m, n = SHAPES[p]
        flat[p] = (flat[p] + rng.normal(size=(m, rank)) @ rng.normal(size=(rank, n))).astype(F)
      elif p[0] != "classifier":
        flat[p] = (flat[p] + rng.normal(size=SHAPES[p])).astype(F)
    out.append(trees.unflatten(flat))
  return out


def _merged_delta(got, base):
  b = _body(base)
  return {p: np.asarray(trees.get_path(got, p), np.float64) - b[p] for p in b}


def _close(got, want, atol=1e-5):
  np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                             atol=atol, rtol=0)


def _effective(tree, path):
  """The kernel the forward pass sees (LoRA update folded in)."""
  return np.asarray(merging.inputs.effective_leaf(tree, path), np.float64)


def _rank(x):
  """numpy's matrix_rank at float32 precision (the task vectors are float32 differences)."""
  s = np.linalg.svd(x, compute_uv=False)
  return np.linalg.matrix_rank(x, tol=s[0] * max(x.shape) * np.finfo(np.float32).eps)


def _np_ties(vectors, k, lam=1.0):
  """TIES (paper C) on ``[T, N]`` float64 vectors: global top-k, mass sign, majority zeros."""
  trimmed = []
  for v in vectors:
    thr = np.sort(np.abs(v))[-max(1, int(k * v.size))]
    trimmed.append(np.where(np.abs(v) >= thr, v, 0.0))
  trimmed = np.stack(trimmed)
  elected = np.sign(trimmed.sum(0))
  elected[elected == 0] = np.sign(elected.sum())
  agree = (trimmed != 0) & (np.sign(trimmed) == elected)
  return lam * (trimmed * agree).sum(0) / np.maximum(agree.sum(0), 1)


class PeftTensorParityTest(parameterized.TestCase):
  """Product space, leaf by leaf, against ``peft.utils.merge_utils`` (float64)."""

  def setUp(self):
    rng = np.random.default_rng(0)
    self.base = _tree(rng)
    self.models = [_tree(rng) for _ in range(3)]
    self.taus = _taus(self.base, self.models)
    self.paths = sorted(self.taus[0])
    self.w = [0.7, 0.4, 1.1]

  def _peft_with_masks(self, fn, density, **kw):
    """peft's merge of each leaf, and the masks it drew (regenerated from the seed)."""
    want, masks = {}, {}
    for i, p in enumerate(self.paths):
      taus = [torch.from_numpy(t[p]) for t in self.taus]
      torch.manual_seed(100 + i)
      want[p] = fn(taus, torch.tensor(self.w, dtype=torch.float64), density, **kw).numpy()
      torch.manual_seed(100 + i)   # random_pruning draws bernoulli(full_like(τ, density))
      masks[p] = np.stack([torch.bernoulli(torch.full_like(t, density)).numpy() > 0
                           for t in taus])
    return want, masks

  def test_dare_linear_with_the_same_mask(self):
    density = 0.6
    want, masks = self._peft_with_masks(merge_utils.dare_linear, density)
    got = merging.dare(self.base, self.models, drop_rate=1 - density, lam=self.w,
                       keep_masks=masks)
    for p, d in _merged_delta(got, self.base).items():
      _close(d, want[p])

  @parameterized.parameters(("total", "mass"), ("frequency", "frequency"))
  def test_dare_ties_with_the_same_mask(self, peft_rule, rule):
    density = 0.5
    want, masks = self._peft_with_masks(merge_utils.dare_ties, density,
                                        majority_sign_method=peft_rule)
    got = merging.dare_ties(self.base, self.models, drop_rate=1 - density, lam=self.w,
                            sign_rule=rule, keep_masks=masks)
    for p, d in _merged_delta(got, self.base).items():
      _close(d, want[p])

  def test_magnitude_prune(self):
    got = merging.magnitude_prune(self.base, self.models, k=0.4, lam=self.w)
    for p, d in _merged_delta(got, self.base).items():
      want = merge_utils.magnitude_prune([torch.from_numpy(t[p]) for t in self.taus],
                                         torch.tensor(self.w, dtype=torch.float64), 0.4)
      _close(d, want.numpy())

  def test_drawn_dare_masks(self):
    ta = merging.task_arithmetic(self.base, self.models, lam=self.w)
    d0 = merging.dare_ties(self.base, self.models[:1], drop_rate=0.0, lam=0.5)
    for p, d in _merged_delta(merging.dare(self.base, self.models, 0.0, lam=self.w),
                              self.base).items():
      _close(d, _merged_delta(ta, self.base)[p])
      _close(_merged_delta(d0, self.base)[p], 0.5 * self.taus[0][p])
    a = merging.dare_ties(self.base, self.models, drop_rate=0.5, seed=3)
    b = merging.dare_ties(self.base, self.models, drop_rate=0.5, seed=3)
    for p in self.paths:
      np.testing.assert_array_equal(trees.get_path(a, p), trees.get_path(b, p))


class DropRuleReferenceTest(parameterized.TestCase):

  def test_breadcrumbs_matches_numpy(self):
    rng = np.random.default_rng(1)
    base, models = _tree(rng), [_tree(rng) for _ in range(2)]
    k, gamma, lam = 0.5, 0.1, [0.8, 0.3]
    got = _merged_delta(merging.breadcrumbs(base, models, k=k, gamma=gamma, lam=lam),
                        base)
    for p, d in got.items():
      want = 0.0
      for w, tau in zip(lam, _taus(base, models)):
        v = tau[p].ravel()
        n = v.size
        n_top = min(int(gamma * n), n - int(k * n))
        n_bottom = n - int(k * n) - n_top
        keep = np.zeros(n, bool)
        keep[np.argsort(np.abs(v))[n_bottom:n - n_top]] = True
        want = want + w * np.where(keep, v, 0.0).reshape(tau[p].shape)
      _close(d, want)
      self.assertLessEqual(int(np.count_nonzero(d)), 2 * int(k * d.size))   # 2 models

  def test_della_matches_numpy_with_given_masks(self):
    rng = np.random.default_rng(2)
    base, models = _tree(rng), [_tree(rng) for _ in range(3)]
    k, eps, lam = 0.4, 0.2, 0.9
    taus = _taus(base, models)
    masks = {p: rng.random((3,) + SHAPES[p]) < 0.5 for p in taus[0]}
    got = _merged_delta(merging.della(base, models, k=k, epsilon=eps, lam=lam,
                                            keep_masks=masks), base)
    for p, d in got.items():
      dropped = []
      for t, tau in enumerate(taus):
        x = tau[p].reshape(tau[p].shape[0], -1)
        # MagPrune: within each output unit (column), rank by magnitude along the inputs.
        frac = np.argsort(np.argsort(np.abs(x), axis=0), axis=0) / (x.shape[0] - 1)
        prob = ((k - eps) + 2 * eps * frac).reshape(tau[p].shape)
        dropped.append(np.where(masks[p][t], tau[p] / prob, 0.0))
      dropped = np.stack(dropped)
      elected = np.where(dropped.sum(0) >= 0, 1.0, -1.0)      # zero_sign="positive"
      agree = (dropped != 0) & (np.sign(dropped) == elected)
      _close(d, lam * (dropped * agree).sum(0) / np.maximum(agree.sum(0), 1), atol=1e-4)

  def test_della_drawn_masks_keep_large_entries_more_often(self):
    rng = np.random.default_rng(3)
    shapes = {("encoder", "w", "kernel"): (400, 30)}
    base, model = _tree(rng, shapes), _tree(rng, shapes)
    got = np.asarray(merging.della(base, [model], k=0.3, epsilon=0.2, seed=1)[
        "encoder"]["w"]["kernel"], np.float64) - base["encoder"]["w"]["kernel"]
    tau = model["encoder"]["w"]["kernel"] - base["encoder"]["w"]["kernel"].astype(np.float64)
    kept = got != 0
    self.assertAlmostEqual(kept.mean(), 0.3, delta=0.02)
    large = np.abs(tau) >= np.median(np.abs(tau), axis=0, keepdims=True)
    self.assertGreater(kept[large].mean(), kept[~large].mean() + 0.15)
    prob = np.asarray(merging.sparsify.magprune_keep_probability(tau.astype(F), 0.3, 0.2))
    _close(got[kept], tau[kept] / prob[kept], atol=1e-4)   # kept entries rescaled by 1/p_i

  def test_errors(self):
    rng = np.random.default_rng(4)
    base, models = _tree(rng), [_tree(rng) for _ in range(2)]
    with self.assertRaisesRegex(ValueError, "drop_rate"):
      merging.dare_ties(base, models, drop_rate=1.0)
    with self.assertRaisesRegex(ValueError, "keep_masks has no mask"):
      merging.dare(base, models, 0.5, keep_masks={})
    with self.assertRaisesRegex(ValueError, "space"):
      merging.dare(base, models, 0.5, space="rows")
    with self.assertRaisesRegex(ValueError, "no LoRA"):
      merging.magnitude_prune(base, models, space="factors")
    with self.assertRaisesRegex(ValueError, "epsilon"):
      merging.della(base, models, k=0.2, epsilon=0.3)
    with self.assertRaisesRegex(ValueError, "gamma"):
      merging.breadcrumbs(base, models, gamma=1.5)
    with self.assertRaisesRegex(ValueError, "inner"):
      merging.knots(base, models, inner="slerp")
    with self.assertRaisesRegex(ValueError, "takes no option"):
      merging.knots(base, models, inner="ties", drop_rate=0.5)
    many = [_tree(rng) for _ in range(7)]     # min(6, 5) < 7: too small for TSV, averaged
    got = _merged_delta(merging.tsv_merge(base, many), base)
    for p, d in got.items():
      _close(d, np.mean([t[p] for t in _taus(base, many)], axis=0), atol=1e-5)


def _np_tsv(stack):
  num, m, n = stack.shape
  k = min(m, n) // num
  us, ss, vts = [], [], []
  for t in range(num):
    u, s, vt = np.linalg.svd(stack[t], full_matrices=False)
    r = min(k, _rank(stack[t]))
    us.append(u[:, :r]), ss.append(s[:r]), vts.append(vt[:r])
  u_cat, s_cat, v_cat = np.hstack(us), np.concatenate(ss), np.vstack(vts).T
  pu, _, qu = np.linalg.svd(u_cat, full_matrices=False)
  pv, _, qv = np.linalg.svd(v_cat, full_matrices=False)
  return (pu @ qu) @ np.diag(s_cat) @ (pv @ qv).T


class SpectralReferenceTest(parameterized.TestCase):

  @parameterized.parameters(None, 1)
  def test_tsv_merge_matches_numpy(self, rank):
    rng = np.random.default_rng(5)
    base = _tree(rng)
    models = ([_tree(rng) for _ in range(2)] if rank is None
              else _low_rank_models(rng, base, 3, rank))
    taus = _taus(base, models)
    got = _merged_delta(merging.tsv_merge(base, models, lam=0.8), base)
    for p, d in got.items():
      stack = np.stack([t[p] for t in taus])
      want = _np_tsv(stack) if stack.ndim == 3 else stack.mean(0)
      _close(d, 0.8 * want, atol=1e-4)

  def test_tsv_merge_of_orthogonal_tasks_is_their_sum(self):
    # Planted: tasks in mutually orthogonal singular subspaces of rank ≤ min(m, n)/T.
    rng = np.random.default_rng(6)
    q_left, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    q_right, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    shapes = {("encoder", "w", "kernel"): (6, 5)}
    base = trees.unflatten({p: np.zeros(s, F) for p, s in shapes.items()})
    models = [trees.unflatten({("encoder", "w", "kernel"): (
        q_left[:, 2 * t:2 * t + 2] @ np.diag(rng.uniform(1, 3, 2)) @ q_right[:, 2 * t:2 * t + 2].T
    ).astype(F)}) for t in range(2)]
    got = merging.tsv_merge(base, models)["encoder"]["w"]["kernel"]
    _close(got, sum(m["encoder"]["w"]["kernel"].astype(np.float64) for m in models), atol=1e-5)

  def test_iso_c_matches_numpy_and_is_isotropic(self):
    rng = np.random.default_rng(7)
    base = _tree(rng)
    models = _low_rank_models(rng, base, 2, 1)
    taus = _taus(base, models)
    got = _merged_delta(merging.iso_c(base, models, lam=1.3), base)
    for p, d in got.items():
      stack = np.stack([t[p] for t in taus])
      if stack.ndim == 2:
        _close(d, 1.3 * stack.mean(0))
        continue
      total = stack.sum(0)
      u, s, vt = np.linalg.svd(total, full_matrices=False)
      r = _rank(total)
      _close(d, 1.3 * s[:r].mean() * u[:, :r] @ vt[:r], atol=1e-4)
      sv = np.linalg.svd(d, compute_uv=False)
      _close(sv[:r], np.full(r, 1.3 * s[:r].mean()), atol=1e-4)   # a flat spectrum
      _close(sv[r:], 0.0, atol=1e-4)

  def test_knots_ties_matches_numpy(self):
    rng = np.random.default_rng(8)
    shapes = {p: s for p, s in SHAPES.items() if p in KERNELS}
    base = _tree(rng, shapes)
    models = []
    for _ in range(3):   # LoRA-like rank-2 updates
      flat = dict(trees.flatten(base))
      for p in KERNELS:
        m, n = shapes[p]
        flat[p] = (flat[p] + rng.normal(size=(m, 2)) @ rng.normal(size=(2, n))).astype(F)
      models.append(trees.unflatten(flat))
    taus = _taus(base, models)
    k, lam = 0.3, 0.9
    got = _merged_delta(merging.knots(base, models, inner="ties", k=k, lam=lam), base)
    # KnOTS: [ΔW_1 … ΔW_T] = U Σ [V_1ᵀ … V_Tᵀ] (PyTorch layout ΔW = kernelᵀ);
    # TIES on the Σ V_tᵀ.
    bases, coefs = {}, []
    for p in KERNELS:
      cat = np.hstack([t[p].T for t in taus])
      u, s, vt = np.linalg.svd(cat, full_matrices=False)
      r = _rank(cat)
      self.assertEqual(r, min(shapes[p][1], 6))   # rank ≤ out and ≤ 3 tasks × rank 2
      bases[p] = u[:, :r]
      width = shapes[p][0]
      coefs.append([(s[:r, None] * vt[:r])[:, t * width:(t + 1) * width] for t in range(3)])
    vecs = np.stack([np.concatenate([c[t].ravel() for c in coefs]) for t in range(3)])
    merged = _np_ties(vecs, k, lam)
    start = 0
    for p, c in zip(KERNELS, coefs):
      size = c[0].size
      want = (bases[p] @ merged[start:start + size].reshape(c[0].shape)).T
      start += size
      _close(got[p], want, atol=1e-4)

  def test_knots_with_task_arithmetic_is_task_arithmetic(self):
    rng = np.random.default_rng(9)
    base = _tree(rng)
    models = _low_rank_models(rng, base, 3, 2)
    got = _merged_delta(merging.knots(base, models, inner="task_arithmetic",
                                            lam=[0.5, 1.0, 0.2]), base)
    want = _merged_delta(merging.task_arithmetic(base, models, lam=[0.5, 1.0, 0.2]), base)
    for p in want:
      _close(got[p], want[p], atol=1e-4)


class PeftAdapterParityTest(parameterized.TestCase):
  """``add_weighted_adapter`` on two saved adapters vs our merge: ΔW and logits."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    import peft
    import transformers
    warnings.filterwarnings("ignore")
    cls.tmp = tempfile.mkdtemp()
    cls.config = tiny_config("roberta", num_labels=3, vocab_size=61, hidden_size=16,
                             num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                             max_position_embeddings=24)
    ids0 = np.full((1, 8), 3, np.int32)
    base = trees.to_numpy(jax.jit(Encoder(cls.config, "classification").init)(
        jax.random.PRNGKey(0), ids0)["params"])
    cls.base = trees.unflatten(dict(trees.flatten(base)))
    rng = np.random.RandomState(0)
    cls.models = []
    for seed in (1, 2):
      m = lora.inject_lora(cls.base, targets=("query", "value"), rank=4, alpha=8.0, seed=seed)
      cls.models.append(trees.map_with_path(
          lambda p, v: (0.3 * rng.randn(*np.shape(v))).astype(np.float32)
          if p[-1] in ("lora_a", "lora_b") or p[0] == "classifier" else v, m))
    ids = rng.randint(4, cls.config.vocab_size, size=(3, 7)).astype(np.int32)
    cls.batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                 "token_type_ids": np.zeros_like(ids)}
    save_pretrained(os.path.join(cls.tmp, "base1"), cls.config, lora.strip_lora(cls.models[0]))
    for i, m in enumerate(cls.models):
      peft_io.save_peft(os.path.join(cls.tmp, f"a{i}"), m, cls.config,
                        base_model_name_or_path=os.path.join(cls.tmp, "base1"))
      peft_fixtures.plain_adapter(os.path.join(cls.tmp, f"a{i}"))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        os.path.join(cls.tmp, "base1")).eval()
    cls.peft = peft.PeftModel.from_pretrained(hf, os.path.join(cls.tmp, "a0"), adapter_name="a0")
    cls.peft.load_adapter(os.path.join(cls.tmp, "a1"), adapter_name="a1")
    cls.names = peft_io._lora_module_names(cls.config, "classification")
    cls.forward = {"apply": jax.jit(make_apply(cls.config))}   # not a method

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def _module(self, mp):
    return self.peft.base_model.model.get_submodule(self.names[mp])

  def _peft_logits(self, name):
    self.peft.set_adapter(name)
    self.peft.eval()
    with torch.no_grad():
      return self.peft(**{k: torch.tensor(v, dtype=torch.long) for k, v in self.batch.items()}
                       ).logits.numpy()

  def _check(self, ours, name, atol=2e-5):
    """ΔW of every LoRA module and the logits of ``ours`` equal peft's adapter ``name``."""
    for mp in lora.lora_paths(self.models[0]):
      with torch.no_grad():
        want = self._module(mp).get_delta_weight(name).numpy().T   # (out, in) -> (in, out)
      mod = trees.get_path(ours, mp)
      got = (np.asarray(lora.delta_kernel(mod)) if "lora_a" in mod else
             np.asarray(mod["kernel"], np.float64) - trees.get_path(self.base, mp)["kernel"])
      _close(got, want, atol=atol)
    _close(np.asarray(self.forward["apply"](ours, self.batch)["logits"]), self._peft_logits(name),
           atol=atol)

  def _record_masks(self, build, fn):
    """Run peft's merge, observing each random_pruning call (the real function runs)."""
    seen = []
    real = merge_utils.random_pruning

    def observed(tensor, density, rescale):
      out = real(tensor, density, rescale)
      seen.append((tensor.detach().numpy().copy(), (out != 0).numpy()))
      return out
    with mock.patch.object(merge_utils, "random_pruning", observed):
      fn()
    return build(seen)

  def _factor_masks(self, seen):
    """Map observed (tensor, mask) pairs to our ``{lora_a/lora_b path: [T, ...]}`` layout."""
    masks = {}
    for mp in lora.lora_paths(self.models[0]):
      for leaf in ("lora_a", "lora_b"):
        per_model = []
        for m in self.models:
          ours = np.asarray(trees.get_path(m, mp + (leaf,))).T        # peft layout
          hit = [mask for tensor, mask in seen if tensor.shape == ours.shape
                 and np.array_equal(tensor, ours)]
          self.assertLen(hit, 1)
          per_model.append(hit[0].T)
        masks[mp + (leaf,)] = np.stack(per_model)
    return masks

  def _product_masks(self, seen):
    masks = {}
    for mp in lora.lora_paths(self.models[0]):
      per_model = []
      for m in self.models:
        ours = np.asarray(lora.delta_kernel(trees.get_path(m, mp))).T
        hit = [mask for tensor, mask in seen if tensor.shape == ours.shape
               and np.allclose(tensor, ours, atol=1e-5)]
        self.assertLen(hit, 1)
        per_model.append(hit[0].T)
      masks[mp + ("kernel",)] = np.stack(per_model)
    return masks

  def test_svd_is_the_exact_sum_truncated_to_rank(self):
    w = [0.7, 0.5]
    self.peft.add_weighted_adapter(["a0", "a1"], w, "svd", combination_type="svd")
    ours = merging.lora_product_average(self.models, refactor_rank=4, weights=w)
    self._check(ours, "svd", atol=5e-5)
    # Through the study's registry ("svd" → lora_svd, rank = the adapters' rank 4).
    reg = merge_study.merge("svd", self.models)
    want = merging.lora_product_average(self.models, refactor_rank=4)
    for p, v in trees.flatten(want).items():
      _close(trees.get_path(reg, p), v)

  @parameterized.parameters("dare_linear", "dare_ties")
  def test_factor_dare_with_peft_masks(self, combination):
    w, density = [0.36, 0.64], 0.6
    name = f"f_{combination}"
    masks = self._record_masks(self._factor_masks, lambda: self.peft.add_weighted_adapter(
        ["a0", "a1"], w, name, combination_type=combination, density=density))
    fn = merging.dare if combination == "dare_linear" else merging.dare_ties
    ours = fn(self.base, self.models, drop_rate=1 - density, lam=np.sqrt(w), keep_masks=masks,
              space="factors")
    self._check(ours, name)

  def test_factor_magnitude_prune(self):
    w = [0.25, 0.81]
    self.peft.add_weighted_adapter(["a0", "a1"], w, "f_mp", combination_type="magnitude_prune",
                                   density=0.5)
    ours = merging.magnitude_prune(self.base, self.models, k=0.5, lam=np.sqrt(w),
                                   space="factors")
    self._check(ours, "f_mp")

  def test_product_dare_with_peft_masks(self):
    w, density = [0.6, 0.9], 0.7
    masks = self._record_masks(self._product_masks, lambda: self.peft.add_weighted_adapter(
        ["a0", "a1"], w, "p_dare", combination_type="dare_linear_svd", density=density,
        svd_rank=16))    # full rank: the SVD re-factorisation is exact
    ours = merging.dare(self.base, self.models, drop_rate=1 - density, lam=w, keep_masks=masks)
    self._check(ours, "p_dare", atol=5e-5)


class RegistryTest(parameterized.TestCase):

  def test_every_method_merges_lora_runs(self):
    rng = np.random.default_rng(10)
    base = _tree(rng)
    zero = [lora.inject_lora(base, targets=("query", "value"), rank=2, alpha=4.0, seed=s)
            for s in range(3)]                    # lora_b = 0: no update
    models = [trees.map_with_path(lambda p, v: (0.3 * rng.normal(size=np.shape(v))).astype(F)
                                  if p[-1] in ("lora_a", "lora_b") else v, m) for m in zero]
    kernels = sorted(p for p in trees.flatten(base) if p[-1] == "kernel")
    for method in merge_study.METHODS:
      merged = merge_study.merge(method, models, base)
      self.assertEqual(sorted(p for p in trees.flatten(merged) if p[-1] == "kernel"), kernels)
      self.assertTrue(all(np.all(np.isfinite(v)) for v in trees.flatten(merged).values()))
      unchanged = merge_study.merge(method, zero, base)   # no update merges to the base
      for p in KERNELS:
        _close(_effective(unchanged, p), trees.get_path(base, p), atol=1e-6)

  def test_aliases_and_options(self):
    self.assertEqual(merge_study.resolve_method("svd"), "lora_svd")
    self.assertEqual(merge_study.resolve_method("dare_linear"), "dare")
    self.assertEqual(merge_study.method_options("dare", {"lam": None}), {"drop_rate": 0.5})
    with self.assertRaisesRegex(ValueError, "takes no option"):
      merge_study.method_options("iso_c", {"k": 0.2})
    with self.assertRaisesRegex(ValueError, "Unknown merge method"):
      merge_study.resolve_method("slerp")
    rng = np.random.default_rng(11)
    base, models = _tree(rng), [_tree(rng) for _ in range(2)]
    got = merge_study.merge("dare", models, base, merge_seed=3)   # study default p = 0.5
    want = merging.dare(base, models, 0.5, seed=3)
    for p, v in trees.flatten(want).items():
      np.testing.assert_array_equal(trees.get_path(got, p), v)


if __name__ == "__main__":
  absltest.main()
