"""Drop-then-combine merges: DARE, DARE-TIES, magnitude pruning, breadcrumbs, DELLA.

Each merge drops entries of every task vector ``τ_t`` leaf by leaf (a *drop rule*,
possibly rescaling the kept entries), then combines the dropped stack:

* ``combine="sum"``: ``θ_0 + Σ_t λ_t τ̃_t`` (task arithmetic; peft's ``dare_linear``,
  ``magnitude_prune``; breadcrumbs);
* ``combine="ties"``: elect a sign per entry from the unweighted ``τ̃`` (``sign_rule``
  as in ``ties``), keep the entries that agree, ``θ_0 + Σ_t λ_t τ̃_t·agree_t / #agree``
  (peft's ``dare_ties``; DELLA). An elected sign of 0 becomes +1
  (``zero_sign="positive"``, peft) or the sign of the sum of all elected signs
  (``"majority"``, the original TIES code).

Drop rules (per leaf, ``n`` entries; all keep exactly as documented):

* DARE (Yu et al. 2024): keep each entry with probability ``1 − p``, rescale by
  ``1/(1 − p)``. The keep mask of model t at the i-th leaf (sorted paths) comes from
  ``fold_in(fold_in(key(seed), t), i)``, or from ``keep_masks`` (``{path: bool
  [T, *leaf]}``) to reproduce a mask drawn elsewhere (e.g. peft's).
* magnitude (peft's ``magnitude_prune``): the top ``int(k·n)`` magnitudes per leaf
  (``granularity="per_tensor"``) or over the whole task vector (``"global"``, as ``ties``).
* breadcrumbs (Davari & Belilovsky 2023): per leaf, drop the ``int(γ·n)`` largest
  magnitudes (outliers) and the smallest ones, keeping ``int(k·n)`` entries (as
  mergekit's ``magnitude_outliers``: if ``k + γ > 1`` fewer outliers are dropped).
* DELLA's MagPrune (Deep et al. 2024): within each output unit (a 2-D kernel
  ``(in, out)`` is ranked along ``in``; a 1-D leaf as one group) the entries are
  ranked by magnitude, the keep probability rises linearly with the rank from
  ``k − ε`` (smallest) to ``k + ε`` (largest), and a kept entry is divided by its
  keep probability.

``space="product"`` (default) acts on the task vectors (LoRA: the products ``ΔW``) and
returns a plain tree with the update folded into the kernels. ``space="factors"``
(LoRA only, equal ranks and scales) applies the same rule to the stacks of
``lora_a`` and of ``lora_b`` separately and returns a LoRA tree: this is peft's
``add_weighted_adapter`` with ``combination_type`` ``dare_linear``, ``dare_ties`` or
``magnitude_prune`` and weights ``w_t = λ_t²`` (peft puts ``√w_t`` on each factor).
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tvgeo_jax import trees
from tvgeo_jax.merging import inputs
from tvgeo_jax.merging.averaging import factor_modules
from tvgeo_jax.merging.inputs import HeadFrom, Modules, Path
from tvgeo_jax.merging.task_vectors import TaskVectors
from tvgeo_jax.merging.ties import (GRANULARITIES, SIGN_RULES, ZERO_SIGNS, _check_choice,
                                    check_density, elect_sign, global_threshold, top_k_mask)

SPACES = ("product", "factors")
COMBINES = ("sum", "ties")
# A drop rule: (leaf index, leaf path, stack [T, ...]) -> dropped and rescaled stack.
DropRule = Callable[[int, Path, jax.Array], jax.Array]


class _Leaves:
  """The stacks a drop-then-combine merge acts on, and how the result is assembled."""

  def __init__(self, base, models, space, modules, head_from, what):
    _check_choice(space, SPACES, "space", what)
    self.space, self.head_from = space, head_from
    if space == "product":
      self.tv = TaskVectors(base, models, modules, what)
      self.models, self.paths = self.tv.models, self.tv.paths
      return
    self.models = inputs.check_inputs(models, base, what)
    self.stacks = {}
    for mp, mods in factor_modules(self.models, modules, what):
      for leaf in ("lora_a", "lora_b"):
        self.stacks[mp + (leaf,)] = [mod[leaf] for mod in mods]
    self.paths = sorted(self.stacks)

  def __len__(self) -> int:
    return len(self.models)

  def stack(self, path: Path) -> jax.Array:
    if self.space == "product":
      return self.tv.stack(path)
    return jnp.stack([jnp.asarray(v, jnp.float32) for v in self.stacks[path]])

  def merged(self, merged: Mapping[Path, jax.Array]) -> dict:
    if self.space == "product":
      return self.tv.merged(merged, self.models, self.head_from)
    return inputs.assemble(self.models[0], merged, inputs.head_tree(self.models,
                                                                     self.head_from))


@jax.jit
def _weighted_sum(dropped: jax.Array, lam: jax.Array) -> jax.Array:
  return jnp.tensordot(lam, dropped, axes=1)


@jax.jit
def _agreeing_mean(dropped: jax.Array, elected: jax.Array, lam: jax.Array) -> jax.Array:
  """``Σ_t λ_t x_t·agree_t / #agree`` with agree = non-zero and of the elected sign."""
  agree = (dropped != 0) & (jnp.sign(dropped) == elected[None])
  w = lam.reshape((-1,) + (1,) * (dropped.ndim - 1))
  total = jnp.sum(jnp.where(agree, w * dropped, 0.0), axis=0)
  return total / jnp.maximum(jnp.sum(agree, axis=0), 1)


def drop_and_combine(base: Mapping, models: Sequence[Mapping], drop: DropRule, lam=1.0, *,
                     combine: str = "sum", sign_rule: str = "mass",
                     zero_sign: str = "positive", space: str = "product",
                     modules: Modules = None, head_from: HeadFrom = 0,
                     what: str = "drop_and_combine") -> dict:
  """The shared engine: ``drop`` every leaf stack, then combine (see the module doc)."""
  _check_choice(combine, COMBINES, "combine", what)
  _check_choice(sign_rule, SIGN_RULES, "sign_rule", what)
  _check_choice(zero_sign, ZERO_SIGNS, "zero_sign", what)
  leaves = _Leaves(base, models, space, modules, head_from, what)
  lam = jnp.asarray(inputs.check_lam(lam, len(leaves), what), jnp.float32)
  if combine == "sum":
    return leaves.merged({p: _weighted_sum(drop(i, p, leaves.stack(p)), lam)
                          for i, p in enumerate(leaves.paths)})
  # Pass 1: elected signs (and their total, for zero_sign="majority"); the dropped
  # stacks are recomputed in pass 2 (drop rules are deterministic) to hold one at a time.
  elected: Dict[Path, jax.Array] = {}
  total = 0.0
  for i, p in enumerate(leaves.paths):
    elected[p] = elect_sign(drop(i, p, leaves.stack(p)), sign_rule).astype(jnp.int8)
    total += float(jnp.sum(elected[p], dtype=jnp.float32))
  fill = float(np.sign(total)) if zero_sign == "majority" else 1.0
  out = {}
  for i, p in enumerate(leaves.paths):
    e = elected.pop(p).astype(jnp.float32)
    out[p] = _agreeing_mean(drop(i, p, leaves.stack(p)), jnp.where(e == 0, fill, e), lam)
  return leaves.merged(out)


# --- drop rules -------------------------------------------------------------------------

@jax.jit
def _bernoulli_keep(key: jax.Array, index: int, shape_like: jax.Array, p: float) -> jax.Array:
  return jax.random.bernoulli(jax.random.fold_in(key, index), 1.0 - p, shape_like.shape)


def given_mask(keep_masks: Mapping[Path, object], path: Path, stack: jax.Array,
               what: str) -> jax.Array:
  """``keep_masks[path]`` as a bool ``[T, *leaf]`` array, checked against the stack."""
  if path not in keep_masks:
    raise ValueError(f"{what}: keep_masks has no mask for {trees.path_str(path)}; give a "
                     "[T, *leaf] boolean mask for every merged leaf (or none to draw them).")
  mask = jnp.asarray(keep_masks[path], bool)
  if mask.shape != stack.shape:
    raise ValueError(f"{what}: keep_masks[{trees.path_str(path)}] has shape {mask.shape}, "
                     f"expected {stack.shape}.")
  return mask


def dare_rule(drop_rate: float, seed: int, num_models: int,
              keep_masks: Optional[Mapping[Path, object]] = None,
              what: str = "dare") -> DropRule:
  """DARE's drop rule: Bernoulli(1 − p) keep masks, kept entries times ``1/(1 − p)``."""
  roots = [jax.random.fold_in(jax.random.key(int(seed)), t) for t in range(num_models)]

  def drop(i, path, stack):
    if keep_masks is not None:
      keep = given_mask(keep_masks, path, stack, what)
    else:
      keep = jnp.stack([_bernoulli_keep(r, i, stack[0], float(drop_rate)) for r in roots])
    return jnp.where(keep, stack / (1.0 - drop_rate), 0.0)
  return drop


def _check_drop_rate(drop_rate, what):
  if (isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float, np.floating))
      or not 0.0 <= drop_rate < 1.0):
    raise ValueError(f"{what}: drop_rate must be in [0, 1), got {drop_rate!r}; "
                     "drop_rate=0.9 keeps 10% of the entries.")
  return float(drop_rate)


def _dare(what, base, models, drop_rate, seed, lam, keep_masks, combine, space, modules,
          head_from, **kw):
  drop_rate = _check_drop_rate(drop_rate, what)
  rule = dare_rule(drop_rate, seed, len(models), keep_masks, what)
  return drop_and_combine(base, models, rule, lam, combine=combine, space=space,
                          modules=modules, head_from=head_from, what=what, **kw)


def dare(base: Mapping, models: Sequence[Mapping], drop_rate: float, seed: int = 0, lam=1.0, *,
         keep_masks: Optional[Mapping[Path, object]] = None, space: str = "product",
         modules: Modules = None, head_from: HeadFrom = 0) -> dict:
  """DARE + task arithmetic: drop each entry of every ``τ_t`` with probability p,
  rescale the kept ones by ``1/(1−p)``, then ``θ_0 + Σ_t λ_t τ̃_t`` (peft's
  ``dare_linear`` with density ``1 − p``)."""
  return _dare("dare", base, models, drop_rate, seed, lam, keep_masks, "sum", space,
               modules, head_from)


def dare_ties(base: Mapping, models: Sequence[Mapping], drop_rate: float, seed: int = 0,
              lam=1.0, *, sign_rule: str = "mass", zero_sign: str = "positive",
              keep_masks: Optional[Mapping[Path, object]] = None, space: str = "product",
              modules: Modules = None, head_from: HeadFrom = 0) -> dict:
  """DARE's drop-and-rescale, then TIES's sign election and disjoint mean (peft's
  ``dare_ties``: ``sign_rule="mass"`` is its ``"total"``)."""
  return _dare("dare_ties", base, models, drop_rate, seed, lam, keep_masks, "ties", space,
               modules, head_from, sign_rule=sign_rule, zero_sign=zero_sign)


def magnitude_prune(base: Mapping, models: Sequence[Mapping], k: float = 0.2, lam=1.0, *,
                    granularity: str = "per_tensor", space: str = "product",
                    modules: Modules = None, head_from: HeadFrom = 0) -> dict:
  """Keep the top-k fraction of each ``τ_t`` by magnitude, then ``θ_0 + Σ_t λ_t τ̃_t``
  (peft's ``magnitude_prune``: ``granularity="per_tensor"``); TIES without election."""
  what = "magnitude_prune"
  k = check_density(k, what)
  _check_choice(granularity, GRANULARITIES, "granularity", what)
  thr = None
  if granularity == "global":
    leaves = _Leaves(base, models, space, modules, head_from, what)
    stacks = [leaves.stack(p) for p in leaves.paths]
    thr = [global_threshold([s[t] for s in stacks], k) for t in range(len(leaves))]
    del stacks

  def drop(i, path, stack):
    if thr is None:
      keep = jnp.stack([top_k_mask(s, k) for s in stack])
    else:
      keep = jnp.abs(stack) >= jnp.asarray(thr, jnp.float32).reshape((-1,) + (1,) * (
          stack.ndim - 1))
    return jnp.where(keep, stack, 0.0)
  return drop_and_combine(base, models, drop, lam, combine="sum", space=space,
                          modules=modules, head_from=head_from, what=what)


def _ranks(x: jax.Array) -> jax.Array:
  """Rank of every entry within its column of the 2-D ``x`` (0 = smallest): one argsort
  and a scatter (half the cost of argsort(argsort(x)))."""
  order = jnp.argsort(x, axis=0)
  cols = jnp.broadcast_to(jnp.arange(x.shape[1])[None, :], x.shape)
  rows = jnp.broadcast_to(jnp.arange(x.shape[0])[:, None], x.shape)
  return jnp.zeros(x.shape, jnp.int32).at[order, cols].set(rows)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _middle_band(stack: jax.Array, n_bottom: int, n_top: int) -> jax.Array:
  """Zero, per model, the ``n_bottom`` smallest and ``n_top`` largest magnitudes."""
  flat = jnp.abs(stack.reshape(stack.shape[0], -1)).T      # (entries, models)
  rank = _ranks(flat).T
  keep = (rank >= n_bottom) & (rank < flat.shape[0] - n_top)
  return jnp.where(keep.reshape(stack.shape), stack, 0.0)


def breadcrumbs(base: Mapping, models: Sequence[Mapping], k: float = 0.2, gamma: float = 0.01,
                lam=1.0, *, space: str = "product", modules: Modules = None,
                head_from: HeadFrom = 0) -> dict:
  """Model breadcrumbs: per leaf, drop the ``γ`` fraction of largest magnitudes and
  the smallest ones so that ``int(k·n)`` entries stay, then ``θ_0 + Σ_t λ_t τ̃_t``."""
  what = "breadcrumbs"
  k = check_density(k, what)
  if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma < 1:
    raise ValueError(f"{what}: gamma (the fraction of largest magnitudes dropped) must be "
                     f"in [0, 1), got {gamma!r}; gamma=0.01 drops the top 1%.")

  def drop(i, path, stack):
    n = int(np.prod(stack.shape[1:]))
    kept = int(k * n)
    n_top = min(int(gamma * n), n - kept)
    return _middle_band(stack, n - kept - n_top, n_top)
  return drop_and_combine(base, models, drop, lam, combine="sum", space=space,
                          modules=modules, head_from=head_from, what=what)


@jax.jit
def magprune_keep_probability(x: jax.Array, k: float, epsilon: float) -> jax.Array:
  """DELLA's keep probabilities for one leaf: linear in the magnitude rank along the
  first axis (each output unit of an ``(in, out)`` kernel; a 1-D leaf as one group),
  from ``k − ε`` (smallest) to ``k + ε`` (largest)."""
  groups = x.reshape(x.shape[0], -1)
  rank = _ranks(jnp.abs(groups)).astype(jnp.float32)
  frac = rank / max(groups.shape[0] - 1, 1)
  return ((k - epsilon) + 2.0 * epsilon * frac).reshape(x.shape)


def della(base: Mapping, models: Sequence[Mapping], k: float = 0.2, epsilon: float = 0.1,
          lam=1.0, seed: int = 0, *, sign_rule: str = "mass", zero_sign: str = "positive",
          keep_masks: Optional[Mapping[Path, object]] = None, space: str = "product",
          modules: Modules = None, head_from: HeadFrom = 0) -> dict:
  """DELLA-merging: MagPrune (magnitude-ranked keep probabilities in ``[k−ε, k+ε]``,
  kept entries divided by their probability), then TIES's election and disjoint mean.

  The keep mask of model t at leaf i is ``uniform(fold_in(fold_in(key(seed), t), i))
  < probability``, or ``keep_masks`` (as ``dare``).
  """
  what = "della"
  k = check_density(k, what)
  if not (isinstance(epsilon, (int, float)) and 0 <= epsilon and 0 < k - epsilon
          and k + epsilon <= 1):
    raise ValueError(f"{what}: need 0 <= epsilon and 0 < k - epsilon < k + epsilon <= 1, "
                     f"got k={k}, epsilon={epsilon!r}; e.g. k=0.2, epsilon=0.1.")
  roots = [jax.random.fold_in(jax.random.key(int(seed)), t) for t in range(len(models))]

  def drop(i, path, stack):
    prob = jnp.stack([magprune_keep_probability(s, k, float(epsilon)) for s in stack])
    if keep_masks is not None:
      keep = given_mask(keep_masks, path, stack, what)
    else:
      keep = jnp.stack([jax.random.uniform(jax.random.fold_in(r, i), s.shape) < pr
                        for r, s, pr in zip(roots, stack, prob)])
    return jnp.where(keep, stack / prob, 0.0)
  return drop_and_combine(base, models, drop, lam, combine="ties", sign_rule=sign_rule,
                          zero_sign=zero_sign, space=space, modules=modules,
                          head_from=head_from, what=what)
