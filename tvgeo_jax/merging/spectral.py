"""Merges in the singular bases of the task matrices: TSV-Merge, ISO-C, KnOTS.

Each acts on the 2-D leaves of the task vectors (LoRA: the products ``ΔW``, Flax
layout ``(in, out)``) and returns a plain tree ``θ_0 + λ·Δ`` with the update folded
into the kernels. Leaves that are not matrices (biases, LayerNorm) take the mean of
the task vectors in TSV-Merge and ISO-C (as the papers' code) and go through the
inner merge in KnOTS.

* ``tsv_merge`` (Gargiulo et al. 2025, TSV-M): per matrix, each task keeps its top
  ``int(min(in, out)/T)`` singular triplets; the kept left (and right) singular
  vectors of all tasks are concatenated and replaced by their nearest orthogonal
  matrix (polar factor ``P·Qᵀ`` of ``P·Σ·Qᵀ``), ``Δ = U⊥·diag(σ)·V⊥ᵀ``. A matrix with
  ``min(in, out) < T`` (a 1×d token-type embedding) is averaged instead (the TSV code
  would keep no triplet and merge it to zero).
* ``iso_c`` (Marczak et al. 2025, Iso-C): ``Δ_TA = Σ_t τ_t``; ``Δ = σ̄·U·Vᵀ`` over its
  singular triplets, ``σ̄`` the mean singular value (isotropic spectrum).
* ``knots`` (Stoica et al. 2025, KnOTS): in PyTorch layout the updates are concatenated
  along the input axis, ``[ΔW_1 … ΔW_T] = U·Σ·[V_1ᵀ … V_Tᵀ]``; each task becomes
  ``Σ·V_tᵀ`` in the shared basis U, those are merged by an existing method (TIES,
  DARE-TIES or task arithmetic, with the method's own options) and
  ``ΔW = U·merged``. KnOTS with task arithmetic is task arithmetic.

Singular triplets whose value is below ``max(shape)·eps·σ_max`` (numpy's
``matrix_rank`` rule, eps of float32) are not used: they carry no update, and their
vectors are arbitrary (a rank-r LoRA update has only r); with full-rank task
matrices every triplet is used, as in the papers.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tvgeo_jax import trees
from tvgeo_jax.merging import inputs, sparsify, task_vectors, ties
from tvgeo_jax.merging.inputs import HeadFrom, Modules
from tvgeo_jax.merging.task_vectors import TaskVectors

# The inner merges of KnOTS and the options each takes.
KNOTS_MERGES = {"ties": ("k", "granularity", "sign_rule", "zero_sign"),
                "dare_ties": ("drop_rate", "seed", "sign_rule", "zero_sign"),
                "task_arithmetic": ()}


def numerical_rank(s: jax.Array, shape: Sequence[int]) -> int:
  """How many singular values ``s`` (descending) exceed ``max(shape)·eps·s[0]``."""
  s = np.asarray(s, np.float64)
  if s.size == 0 or s[0] <= 0:
    return 0
  return int(np.sum(s > max(shape) * np.finfo(np.float32).eps * s[0]))


@jax.jit
def polar_factor(x: jax.Array) -> jax.Array:
  """The nearest matrix with orthonormal columns (``P·Qᵀ`` of ``x = P·Σ·Qᵀ``)."""
  p, _, qt = jnp.linalg.svd(x, full_matrices=False)
  return p @ qt


def _tsv_matrix(stack: jax.Array) -> jax.Array:
  num, m, n = stack.shape
  k = min(m, n) // num
  if k < 1:           # e.g. a 1×d token-type embedding: no triplet per task, average it
    return jnp.mean(stack, axis=0)
  us, ss, vts = [], [], []
  for t in range(num):
    u, s, vt = jnp.linalg.svd(stack[t], full_matrices=False)
    r = min(k, numerical_rank(s, (m, n)))
    us.append(u[:, :r])
    ss.append(s[:r])
    vts.append(vt[:r])
  u_cat, s_cat, vt_cat = (jnp.concatenate(us, 1), jnp.concatenate(ss),
                          jnp.concatenate(vts, 0))
  if s_cat.size == 0:
    return jnp.zeros((m, n), jnp.float32)
  return (polar_factor(u_cat) * s_cat[None, :]) @ polar_factor(vt_cat.T).T


def _iso_matrix(total: jax.Array) -> jax.Array:
  u, s, vt = jnp.linalg.svd(total, full_matrices=False)
  r = numerical_rank(s, total.shape)
  if r == 0:
    return jnp.zeros_like(total)
  return jnp.mean(s[:r]) * (u[:, :r] @ vt[:r])


def _per_matrix(what, base, models, lam, modules, head_from, matrix_fn, other_fn):
  tv = TaskVectors(base, models, modules, what)
  lam = float(inputs.check_lam(lam, 1, what)[0])
  delta = {}
  for p in tv.paths:
    stack = tv.stack(p)
    delta[p] = lam * (matrix_fn(stack) if stack.ndim == 3 else other_fn(stack))
  return tv.merged(delta, tv.models, head_from)


def tsv_merge(base: Mapping, models: Sequence[Mapping], lam: float = 1.0, *,
              modules: Modules = None, head_from: HeadFrom = 0) -> dict:
  """TSV-M: ``θ_0 + λ·U⊥·diag(σ)·V⊥ᵀ`` per matrix (each task's top ``min(in,out)/T``
  singular triplets, the concatenated singular vectors orthogonalised)."""
  return _per_matrix("tsv_merge", base, models, lam, modules, head_from, _tsv_matrix,
                     lambda stack: jnp.mean(stack, axis=0))


def iso_c(base: Mapping, models: Sequence[Mapping], lam: float = 1.0, *,
          modules: Modules = None, head_from: HeadFrom = 0) -> dict:
  """Iso-C: ``θ_0 + λ·σ̄·U·Vᵀ`` per matrix, ``U·Σ·Vᵀ = Σ_t τ_t``, ``σ̄ = mean(Σ)``."""
  return _per_matrix("iso_c", base, models, lam, modules, head_from,
                     lambda stack: _iso_matrix(jnp.sum(stack, axis=0)),
                     lambda stack: jnp.mean(stack, axis=0))


def knots(base: Mapping, models: Sequence[Mapping], inner: str = "ties", lam=1.0, *,
          modules: Modules = None, head_from: HeadFrom = 0, **inner_options) -> dict:
  """KnOTS: align the task matrices in the SVD basis of their concatenation, merge
  the aligned ``Σ·V_tᵀ`` with the ``inner`` merge (``inner_options``: e.g. ``k``,
  ``granularity`` for TIES, ``drop_rate``, ``seed`` for DARE-TIES), ``θ_0 + U·merged``.

  ``lam`` is the inner merge's λ; the result equals ``task_arithmetic`` when
  ``inner="task_arithmetic"``.
  """
  what = "knots"
  if inner not in KNOTS_MERGES:
    raise ValueError(f"{what}: inner={inner!r}; choose one of {tuple(KNOTS_MERGES)}.")
  bad = sorted(set(inner_options) - set(KNOTS_MERGES[inner]))
  if bad:
    raise ValueError(f"{what}: inner={inner!r} takes no option(s) {bad}; it takes "
                     f"{list(KNOTS_MERGES[inner])}.")
  merge_fn = {"ties": ties.ties, "dare_ties": sparsify.dare_ties,
              "task_arithmetic": task_vectors.task_arithmetic}[inner]
  tv = TaskVectors(base, models, modules, what)
  bases, coefs = {}, [dict() for _ in range(len(tv))]
  for p in tv.paths:
    stack = tv.stack(p)
    if stack.ndim != 3:
      for t in range(len(tv)):
        coefs[t][p] = stack[t]
      continue
    # PyTorch layout ΔW_t = stack[t].T (out, in); concatenated along the inputs.
    cat = jnp.concatenate([s.T for s in stack], axis=1)
    u, s, vt = jnp.linalg.svd(cat, full_matrices=False)
    r = numerical_rank(s, cat.shape)
    if r == 0:          # no update on this matrix in any task
      continue
    bases[p] = u[:, :r]
    sv = s[:r, None] * vt[:r]                                  # (r, T·in)
    width = stack.shape[1]
    for t in range(len(tv)):
      coefs[t][p] = sv[:, t * width:(t + 1) * width]
  merged = {}
  if coefs[0]:
    zero = {p: jnp.zeros_like(c) for p, c in coefs[0].items()}
    merged = trees.flatten(merge_fn(trees.unflatten(zero), [trees.unflatten(c) for c in coefs],
                                    lam=lam, head_from=None, **inner_options))
  delta = {p: (bases[p] @ merged[p]).T if p in bases else
           merged.get(p, jnp.zeros_like(tv.base_leaf(p))) for p in tv.paths}
  return tv.merged(delta, tv.models, head_from)

