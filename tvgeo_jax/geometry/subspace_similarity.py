r"""LoRA subspace similarity (Hu et al. 2021, LoRA paper section 7.2).

For two adapters of one module, with ``U1, U2`` the singular vectors of their ``A``
factors (``A (r, in)``: the *right*-singular vectors, a basis of A's row space in
R^in) or of their ``B`` factors (``B (out, r)``: the *left*-singular vectors, in
R^out), both sorted by decreasing singular value::

  φ(i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j)   ∈ [0, 1],  1 <= i <= r1, 1 <= j <= r2

``φ(i, j) = 1`` when the top-i subspace of one lies in the top-j subspace of the other
(or vice versa), 0 when they are orthogonal; the paper compares r=8 with r=64 adapters
of one task (Figure 3) and two seeds (Figure 4). ``φ(r, r)`` is the mean squared cosine
of the principal angles between the two rank-r subspaces.

Layouts are the geometry convention (BUILD_NOTES): ``A [..., r, in]``, ``B [..., out, r]``
(``task_vectors.lora_factors`` / ``stack_lora``; the scale folded into B changes no
singular vector). Directions at or below the numerical rank (singular values
``<= rtol * s_max``) are arbitrary, so entries that use them are NaN rather than made up.

* ``subspace_similarity(m1, m2, factor)``: one pair, ``[..., r1, r2]`` (ranks may differ);
* ``subspace_similarity_grid(factors, factor)``: all task pairs × layers in one jitted
  call, ``[T, T, L, r_max, r_max]`` (NaN-padded where a task's rank is smaller).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from tvgeo_jax.geometry.linalg import default_rtol, einsum

FACTORS = ("a", "b")


def _check_factor(factor: str) -> None:
  if factor not in FACTORS:
    raise ValueError(f"factor must be 'a' (A (r, in), right-singular vectors) or 'b' "
                     f"(B (out, r), left-singular vectors), got {factor!r}.")


def _as_left(m: jax.Array, factor: str) -> jax.Array:
  """The matrix whose *left*-singular vectors are wanted: ``Aᵀ (in, r)`` or ``B (out, r)``."""
  m = jnp.asarray(m, jnp.float32)
  return jnp.swapaxes(m, -1, -2) if factor == "a" else m


def _bases(m: jax.Array, rtol: Optional[float]) -> Tuple[jax.Array, jax.Array]:
  """``(u [..., n, r], rank [...])`` of ``m [..., n, r]`` (one batched SVD)."""
  u, s, _ = jnp.linalg.svd(m, full_matrices=False)
  tol = default_rtol(*m.shape[-2:]) if rtol is None else rtol
  rank = jnp.where(s[..., 0] > 0, jnp.sum(s > tol * s[..., :1], axis=-1), 0)
  return u, rank


def phi_from_bases(u1: jax.Array, u2: jax.Array, rank1, rank2) -> jax.Array:
  """``φ [..., r1, r2]`` from orthonormal bases ``u1 [..., n, r1]``, ``u2 [..., n, r2]``.

  Column order is the singular-value order; entry ``(i-1, j-1)`` uses the top i of
  ``u1`` and top j of ``u2``, NaN where ``i > rank1`` or ``j > rank2``.
  """
  return phi_from_cosines(einsum("...ni,...nj->...ij", u1, u2), rank1, rank2)


def phi_from_cosines(c: jax.Array, rank1, rank2) -> jax.Array:
  """``φ [..., r1, r2]`` from the cosines ``c = U1ᵀ U2`` of two sorted bases."""
  cum = jnp.cumsum(jnp.cumsum(c * c, axis=-2), axis=-1)
  i = jnp.arange(1, c.shape[-2] + 1)[:, None]
  j = jnp.arange(1, c.shape[-1] + 1)[None, :]
  phi = cum / jnp.minimum(i, j)
  r1 = jnp.asarray(rank1)[..., None, None]
  r2 = jnp.asarray(rank2)[..., None, None]
  return jnp.where((i <= r1) & (j <= r2), phi, jnp.nan)


def _pad_rank(m: jax.Array, r: int) -> jax.Array:
  """Zero columns up to rank ``r`` (a zero column adds only a zero singular value)."""
  return jnp.pad(m, [(0, 0)] * (m.ndim - 1) + [(0, r - m.shape[-1])])


@functools.partial(jax.jit, static_argnames=("rtol",))
def _pair(l1, l2, rtol):
  r1, r2 = l1.shape[-1], l2.shape[-1]
  r = max(r1, r2)
  u, rank = _bases(jnp.stack([_pad_rank(l1, r), _pad_rank(l2, r)]), rtol)  # one SVD call
  return phi_from_bases(u[0][..., :r1], u[1][..., :r2], rank[0], rank[1])


def subspace_similarity(m1, m2, factor: str = "a", rtol: Optional[float] = None) -> jax.Array:
  """φ of Hu et al. between two LoRA factors: ``[..., r1, r2]``.

  Args:
    m1, m2: ``A [..., r, in]`` (``factor="a"``) or ``B [..., out, r]`` (``"b"``); the
      ranks may differ (r=8 vs r=64), the other axes must agree.
    factor: which factor the matrices are.
    rtol: numerical-rank tolerance relative to the largest singular value
      (default NumPy's ``max(shape) * eps``).
  """
  _check_factor(factor)
  l1, l2 = _as_left(m1, factor), _as_left(m2, factor)
  if l1.shape[:-1] != l2.shape[:-1]:
    raise ValueError(f"The two {factor.upper()} factors disagree outside the rank axis: "
                     f"{tuple(jnp.shape(m1))} vs {tuple(jnp.shape(m2))} (pass "
                     + ("A (r, in)" if factor == "a" else "B (out, r)") + " for both).")
  if l1.shape[-1] > l1.shape[-2] or l2.shape[-1] > l2.shape[-2]:
    raise ValueError(f"Rank exceeds the feature dimension in {tuple(jnp.shape(m1))} / "
                     f"{tuple(jnp.shape(m2))}: is factor={factor!r} right? A is (r, in), "
                     "B is (out, r).")
  return _pair(l1, l2, None if rtol is None else float(rtol))


@functools.partial(jax.jit, static_argnames=("rtol",))
def _grid(stack, ranks_given, rtol):
  """``stack [T, L, n, r]`` (zero-padded) -> ``φ [T, T, L, r, r]``."""
  u, rank = _bases(stack, rtol)
  rank = jnp.minimum(rank, ranks_given[:, None])
  c = einsum("slni,tlnj->stlij", u, u)
  return phi_from_cosines(c, rank[:, None], rank[None, :])


def subspace_similarity_grid(factors: Union[jax.Array, Sequence], factor: str = "a",
                             rtol: Optional[float] = None) -> np.ndarray:
  """φ for every task pair and layer: ``[T, T, L, r_max, r_max]`` (numpy, float32).

  Args:
    factors: ``A [T, L, r, in]`` or ``B [T, L, out, r]`` (``stack_lora``'s first or
      second array), or a list of per-task ``[L, r_t, in]`` / ``[L, out, r_t]`` whose
      ranks may differ (``task_vectors.lora_factors`` of each adapter).
    factor: ``"a"`` or ``"b"``.

  Entry ``[s, t, l, i-1, j-1]`` is φ(top-i of task s, top-j of task t) at layer l; NaN
  where i or j exceeds that task's rank. ``φ[s, s, l]`` has a unit diagonal.
  """
  _check_factor(factor)
  if isinstance(factors, (list, tuple)):
    mats = [_as_left(m, factor) for m in factors]
  else:
    arr = jnp.asarray(factors, jnp.float32)
    if arr.ndim != 4:
      raise ValueError(f"Expected a [T, L, ...] stack of 2-D factors, got shape {arr.shape}.")
    mats = list(_as_left(arr, factor))
  if not mats:
    raise ValueError("No adapters given.")
  shapes = {m.shape[:-1] for m in mats}
  if len(shapes) > 1 or mats[0].ndim != 3:
    raise ValueError(f"Adapters disagree on layers or feature size ({sorted(shapes)}); "
                     "they must share one base model and module.")
  ranks = [m.shape[-1] for m in mats]
  r = max(ranks)
  stack = jnp.stack([_pad_rank(m, r) for m in mats])
  if r > stack.shape[-2]:
    raise ValueError(f"Rank {r} exceeds the feature dimension {stack.shape[-2]}: is "
                     f"factor={factor!r} right?")
  out = _grid(stack, jnp.asarray(ranks, jnp.int32), None if rtol is None else float(rtol))
  return np.asarray(out)


def phi_top(phi: np.ndarray) -> np.ndarray:
  """``φ(i, i)`` for i = 1..r: the diagonal of the last two axes, ``[..., r]``."""
  return np.diagonal(np.asarray(phi), axis1=-2, axis2=-1)
