"""TIES-merging (Yadav et al. 2023; paper C) and top-k trimming of task vectors.

TIES: (1) trim each task vector to its top-k fraction of entries by magnitude,
(2) elect a sign per entry, (3) average, per entry, the trimmed values that are
non-zero and agree with the elected sign; ``θ = θ_0 + λ·τ_m``.

Granularity of the trim (implementations differ, and it changes results):

* ``"global"`` (default; the original TIES code and FusionBench): one threshold
  over the whole task vector (all selected leaves): keep ``|τ| ≥ m_k``, the
  ``k_count``-th largest magnitude, ``k_count = max(1, int(k·n))``; ties at the
  threshold are all kept. The threshold is found exactly without concatenating
  the leaves: non-negative float32 numbers order like their int32 bit patterns,
  so a 31-step bisection on the bit pattern, each step counting ``|τ| ≥ t`` leaf
  by leaf inside one compiled loop, lands on the k-th largest magnitude itself.
  Memory: one task vector at a time (plus its int32 bit view). (The original code
  takes ``kthvalue(n − int(k·n))``, i.e. the ``int(k·n)+1``-th largest: one more
  entry than ``k·n``; we keep the k-th as the paper defines it.)
* ``"per_tensor"`` (peft, mergekit): exactly ``int(k·numel)`` entries per leaf
  (``jax.lax.top_k``), as ``peft.utils.merge_utils.magnitude_based_pruning``.

Sign election: ``"mass"`` = sign of the sum of trimmed values (peft's
``"total"``), ``"frequency"`` = sign of the sum of their signs. An entry whose
elected sign is 0 takes the sign of the sum of all elected signs across the whole
task vector (``zero_sign="majority"``, the original code's ``resolve_zero_signs``);
peft instead elects +1 there (``zero_sign="positive"``). Under "mass" the two differ
only where trimmed values cancel exactly; under "frequency" ties of the sign count
(one +, one −) are common and the choice matters.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tvgeo_jax.core import trees
from tvgeo_jax.vectors import inputs
from tvgeo_jax.vectors.inputs import HeadFrom, Modules, Path
from tvgeo_jax.vectors.task_vectors import TaskVectors

GRANULARITIES = ("global", "per_tensor")
SIGN_RULES = ("mass", "frequency")
ZERO_SIGNS = ("majority", "positive")
_INF_BITS = 0x7F800000  # bit pattern of float32 +inf


def check_density(k, what: str) -> float:
  if isinstance(k, bool) or not isinstance(k, (int, float, np.floating)) or not 0.0 < k <= 1.0:
    raise ValueError(f"{what}: k (the kept fraction) must be in (0, 1], got {k!r}; "
                     "k=0.2 keeps the top 20%.")
  return float(k)


def _check_choice(value, choices, name, what):
  if value not in choices:
    raise ValueError(f"{what}: {name}={value!r}; choose one of {choices}.")


@jax.jit
def _kth_largest_bits(leaves: List[jax.Array], k: jax.Array) -> jax.Array:
  bits = [jax.lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.int32)
          for x in leaves]

  def count(b):
    return sum(jnp.sum(v >= b, dtype=jnp.int32) for v in bits)

  def step(_, lohi):
    lo, hi = lohi
    mid = lo + (hi - lo) // 2
    ok = count(mid) >= k
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = jax.lax.fori_loop(0, 32, step, (jnp.int32(0), jnp.int32(_INF_BITS + 1)))
  return lo


def kth_largest_magnitude(leaves: Sequence[jax.Array], k: int) -> float:
  """The exact k-th largest ``|x|`` over all entries of ``leaves`` (1 ≤ k ≤ n)."""
  leaves = [jnp.asarray(x) for x in leaves]
  n = int(sum(x.size for x in leaves))
  if not 1 <= k <= n:
    raise ValueError(f"kth_largest_magnitude: k={k} outside [1, {n}].")
  if n >= 2**31 - 1:
    raise ValueError(f"kth_largest_magnitude: {n} entries exceed the int32 counter; select "
                     "fewer leaves (modules=...).")
  if not all(bool(jnp.all(jnp.isfinite(x))) for x in leaves):
    raise ValueError("kth_largest_magnitude: the task vector has NaN or inf entries.")
  bits = _kth_largest_bits(leaves, jnp.int32(k))
  return float(jax.lax.bitcast_convert_type(bits, jnp.float32))


def global_threshold(leaves: Sequence[jax.Array], k: float) -> float:
  """``m_k``: the ``max(1, int(k·n))``-th largest magnitude over the leaves."""
  n = int(sum(np.size(x) for x in leaves))
  return kth_largest_magnitude(leaves, max(1, int(k * n)))


def top_k_mask(x: jax.Array, k: float) -> jax.Array:
  """Per-tensor trim mask: exactly ``int(k·numel)`` largest magnitudes (peft's rule)."""
  x = jnp.asarray(x)
  count = int(k * x.size)
  if count >= x.size:
    return jnp.ones(x.shape, bool)
  if count == 0:
    return jnp.zeros(x.shape, bool)
  _, idx = jax.lax.top_k(jnp.abs(x).reshape(-1), count)
  return jnp.zeros(x.size, bool).at[idx].set(True).reshape(x.shape)


def keep_top_k(task_vector: Mapping, k: float, granularity: str = "global") -> dict:
  """The task vector with all but its top-k fraction of entries (by magnitude) zeroed.

  Every leaf of ``task_vector`` takes part (build it with ``task_vector(...,
  modules=...)`` to choose which). ``θ_0 + keep_top_k(τ, k)`` is paper C's
  "keep only the top-k% of a task vector" model (``apply_task_vector``).
  """
  what = "keep_top_k"
  k = check_density(k, what)
  _check_choice(granularity, GRANULARITIES, "granularity", what)
  flat = {p: jnp.asarray(v, jnp.float32) for p, v in trees.flatten(task_vector).items()}
  if not flat:
    raise ValueError(f"{what}: the task vector has no leaves.")
  if granularity == "global":
    thr = global_threshold(list(flat.values()), k)
    return trees.unflatten({p: jnp.where(jnp.abs(v) >= thr, v, 0.0) for p, v in flat.items()})
  return trees.unflatten({p: jnp.where(top_k_mask(v, k), v, 0.0) for p, v in flat.items()})


@functools.partial(jax.jit, static_argnums=1)
def elect_sign(trimmed: jax.Array, sign_rule: str) -> jax.Array:
  """Per-entry elected sign (−1, 0, +1) of a ``[T, ...]`` stack of trimmed values."""
  if sign_rule == "mass":
    return jnp.sign(jnp.sum(trimmed, axis=0))
  return jnp.sign(jnp.sum(jnp.sign(trimmed), axis=0))


@jax.jit
def _trim_stack(stack: jax.Array, thresholds: jax.Array) -> jax.Array:
  """Zero ``stack[t]`` where ``|stack[t]| < thresholds[t]``."""
  thr = thresholds.reshape((-1,) + (1,) * (stack.ndim - 1))
  return jnp.where(jnp.abs(stack) >= thr, stack, 0.0)


@jax.jit
def disjoint_mean(trimmed: jax.Array, elected: jax.Array) -> jax.Array:
  """Mean over t of the non-zero ``trimmed[t]`` whose sign equals ``elected``."""
  agree = (trimmed != 0) & (jnp.sign(trimmed) == elected[None])
  total = jnp.sum(jnp.where(agree, trimmed, 0.0), axis=0)
  return total / jnp.maximum(jnp.sum(agree, axis=0), 1)


def ties(base: Mapping, models: Sequence[Mapping], k: float = 0.2, lam: float = 1.0, *,
         granularity: str = "global", sign_rule: str = "mass", zero_sign: str = "majority",
         modules: Modules = None, head_from: HeadFrom = 0) -> dict:
  """TIES-merging: ``θ_0 + λ·τ_m`` on the selected leaves (LoRA: on the ``ΔW``).

  Args:
    base: the pretrained tree θ_0 (no LoRA leaves).
    models: fine-tuned trees (full or LoRA) of the same architecture and base.
    k: kept fraction in (0, 1] (0.2 = top 20%).
    lam: the scaling λ of the merged task vector.
    granularity: "global" (one threshold per task vector) or "per_tensor".
    sign_rule: "mass" (sign of the sum) or "frequency" (sign of the sum of signs).
    zero_sign: an elected sign of 0 becomes the sign of the sum of all elected
      signs ("majority", original TIES) or +1 ("positive", peft).
    modules: leaf selection (see ``tvgeo_jax.vectors.inputs``).
    head_from: index of the model (or a tree) whose head the result carries.
  """
  what = "ties"
  k = check_density(k, what)
  _check_choice(granularity, GRANULARITIES, "granularity", what)
  _check_choice(sign_rule, SIGN_RULES, "sign_rule", what)
  _check_choice(zero_sign, ZERO_SIGNS, "zero_sign", what)
  lam = float(inputs.check_lam(lam, 1, what)[0])
  tv = TaskVectors(base, models, modules, what)
  if granularity == "global":
    thr = jnp.asarray([global_threshold([tv.leaf(t, p) for p in tv.paths], k)
                       for t in range(len(tv))], jnp.float32)

  def trimmed(p: Path) -> jax.Array:
    stack = tv.stack(p)
    if granularity == "global":
      return _trim_stack(stack, thr)
    return jnp.where(jnp.stack([top_k_mask(s, k) for s in stack]), stack, 0.0)

  # Pass 1: elected signs, and their sum over the whole task vector for the zeros.
  elected: Dict[Path, jax.Array] = {}
  total = 0.0
  for p in tv.paths:
    elected[p] = elect_sign(trimmed(p), sign_rule).astype(jnp.int8)
    total += float(jnp.sum(elected[p], dtype=jnp.float32))
  majority = float(np.sign(total)) if zero_sign == "majority" else 1.0
  # Pass 2: disjoint mean (trimmed values recomputed rather than stored).
  delta = {}
  for p in tv.paths:
    e = elected.pop(p).astype(jnp.float32)
    e = jnp.where(e == 0, majority, e)
    delta[p] = lam * disjoint_mean(trimmed(p), e)
  return tv.merged(delta, tv.models, head_from)
