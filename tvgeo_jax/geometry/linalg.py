"""Numerical kernels shared by the pairwise distances and the grid.

Three ideas live here:

* **Full-precision products.** Every matrix product goes through ``mm``/``einsum``
  with ``precision=HIGHEST``: JAX's default matmul precision is TF32 on GPUs and
  bfloat16 passes on TPUs, which would cost the principal angles 3-5 digits.
* **Orthonormal bases from small products** (``orthonormal_factor``). A tall
  matrix ``X (n, r)`` is written ``X = Q R`` with ``Q`` orthonormal by two passes
  of SVQB (eigen-decomposition of the ``r x r`` Gram, Stathopoulos & Wu 2002);
  the singular values and numerical rank then come from the SVD of the small
  ``R``. Only batched products and ``r x r`` decompositions are used: XLA's
  tall-matrix QR/SVD on CPU are one to two orders of magnitude slower.
* **Accurate principal angles** (``principal_angles_from_cosines``). Cosines
  ``c = svd(Q1ᵀ Q2)`` lose half their digits for small angles (``arccos`` of a
  number near 1), so sines are computed from the difference vectors
  ``W = Q2 V − Q1 U diag(c)`` (whose singular values are those of
  ``Q2 − Q1 Q1ᵀ Q2``) and paired as ``θ = atan2(s, c)``.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
EPS32 = float(jnp.finfo(jnp.float32).eps)

mm = functools.partial(jnp.matmul, precision=HIGHEST)
einsum = functools.partial(jnp.einsum, precision=HIGHEST)

# Cosines above this value take their angle from the sine side (atan2(s, c));
# below it arccos is accurate (|dθ/dc| = 1/sin θ <= 1.4).
COS_SWITCH = 0.7
# Difference vectors shorter than this are resolved by an eigen-decomposition of
# their own (small-norm) Gram block, so that clusters of nearly equal cosines near
# 1 -- whose singular vectors are mixed -- still give accurate sines.
SMALL_SINE = 0.02


def default_rtol(*dims: int) -> float:
  """NumPy's ``matrix_rank`` tolerance relative to the largest singular value."""
  return float(max(dims)) * EPS32


def _svqb_pass(xs, drop: float):
  """One SVQB pass on each ``x [..., n_i, r]`` of ``xs``: ``x M`` with orthonormal columns.

  Columns whose Gram eigenvalue is below ``drop`` times the largest are set to
  zero (they are rounding noise, not directions of ``x``). The ``r x r`` Grams
  of all inputs go through ONE batched ``eigh``: on CPU, jaxlib runs a batched
  LAPACK call as tasks on XLA's intra-op pool and blocks a worker until they
  finish, so two such calls running side by side can wedge a 2-thread pool.
  Keeping every decomposition a single call in a data-dependent chain avoids it.
  """
  grams = jnp.stack([einsum("...ni,...nj->...ij", x, x) for x in xs])
  lam, v = jnp.linalg.eigh(grams)
  lam_max = jnp.maximum(lam[..., -1:], 1e-30)
  keep = lam > drop * lam_max
  scale = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, lam, 1.0)), 0.0)
  m = v * scale[..., None, :]
  return [mm(x, m[i]) for i, x in enumerate(xs)]


def orthonormal_factors(xs):
  """``x [..., n, r] = q r_mat`` (n >= r) for each ``x`` of ``xs``, small products only.

  All ``xs`` share the leading and ``r`` dimensions (their ``n`` may differ).
  For each, ``q [..., n, r]`` has orthonormal (or zero) columns spanning
  ``Im(x)`` and ``r_mat = qᵀ x [..., r, r]``, so ``x = q r_mat`` to rounding and
  the singular values (and numerical rank) of ``x`` are those of ``r_mat``
  (``subspace_coefficients``). A zero matrix gives ``q = 0``.
  Accuracy: ``Im(q)`` matches ``Im(x)`` to ``~eps * cond(x)``, like an SVD.
  """
  # Scale to unit Frobenius norm: subspaces are scale-free and this keeps the
  # Gram eigenvalues away from float32 under/overflow.
  xs_unit = [x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True)), 1e-30)
             for x in xs]
  qs = _svqb_pass(xs_unit, drop=EPS32 ** 2)   # may contain noise columns of small norm
  qs = _svqb_pass(qs, drop=1e-4)              # re-orthonormalise, drop the noise
  return [(q, einsum("...ni,...nj->...ij", q, x)) for q, x in zip(qs, xs)]


def orthonormal_factor(x: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """``orthonormal_factors([x])[0]``: ``(q, r_mat)`` with ``x = q r_mat``."""
  return orthonormal_factors([x])[0]


def after(x, *deps):
  """``x``, but only once ``deps`` are computed (serialises LAPACK calls, see above)."""
  return jax.lax.optimization_barrier((x,) + tuple(deps))[0]


def subspace_coefficients(m: jax.Array, rtol
                          ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Orthonormal coefficients of ``Im(m)`` for square ``m [..., r, r]``.

  Returns ``(x, s, rank)``: ``x = U[:, :rank]`` of ``svd(m)`` with the other
  columns zeroed, so that for an orthonormal ``q``, ``q x`` is an orthonormal
  basis of ``Im(q m)`` padded with zero columns.
  """
  u, s, _ = jnp.linalg.svd(m)
  rtol = jnp.reshape(jnp.asarray(rtol, s.dtype), jnp.shape(rtol) + (1,) * (s.ndim - jnp.ndim(rtol)))
  rank = jnp.sum(s > rtol * s[..., :1], axis=-1)
  rank = jnp.where(s[..., 0] > 0, rank, 0)
  mask = jnp.arange(m.shape[-1]) < rank[..., None]
  return u * mask[..., None, :], s, rank


def _graded_sines(w: jax.Array, small: jax.Array) -> jax.Array:
  """Singular-value-accurate lengths of the columns of ``w [..., n, k]``.

  Columns not flagged ``small`` give their norm (after the cosine SVD rotation
  they are orthogonal to all others up to rounding). The ``small`` columns form
  a block whose own Gram is eigen-decomposed: its entries are all below
  ``SMALL_SINE**2``, so the eigenvalue error is ``eps * SMALL_SINE**2`` and sines
  down to ~1e-5 stay accurate even when their cosines were indistinguishable.
  Returns ``[..., k]``.
  """
  k = w.shape[-1]
  norms = jnp.sqrt(jnp.sum(w * w, axis=-2))
  gram = einsum("...ni,...nj->...ij", w, w)
  block = small[..., :, None] & small[..., None, :]
  ev = jnp.linalg.eigvalsh(jnp.where(block, gram, 0.0))   # ascending
  n_small = jnp.sum(small, axis=-1, keepdims=True)
  order = jnp.cumsum(small, axis=-1) - 1                   # rank among small cols
  idx = jnp.clip(k - n_small + order, 0, k - 1)
  ev_small = jnp.take_along_axis(ev, idx, axis=-1)
  return jnp.where(small, jnp.sqrt(jnp.maximum(ev_small, 0.0)), norms)


def cosine_svd(c_mat: jax.Array, rank1: jax.Array, rank2: jax.Array):
  """SVD of the cosine matrix and the flags the angle step needs.

  Returns ``(u, c, vt, valid, need)``: ``valid [..., k]`` marks the
  ``min(rank1, rank2)`` genuine angles, ``need [...]`` whether any genuine
  cosine exceeds ``COS_SWITCH`` (then the sine step is required).
  """
  u, c, vt = jnp.linalg.svd(c_mat)
  k = c.shape[-1]
  valid = jnp.arange(k) < jnp.minimum(rank1, rank2)[..., None]
  need = jnp.any(valid & (c > COS_SWITCH), axis=-1)
  return u, c, vt, valid, need


def sine_coefficients(u, c, vt, x1=None, x2=None):
  """``(p1, p2)`` with ``q2 p2 − q1 p1 = (Q2 − Q1 Q1ᵀ Q2) V`` (``Qk = qk xk``), from ``svd(C)``."""
  v = jnp.swapaxes(vt, -1, -2)
  p2 = v if x2 is None else mm(x2, v)
  p1 = u * jnp.clip(c, 0.0, 1.0)[..., None, :]
  p1 = p1 if x1 is None else mm(x1, p1)
  return p1, p2


def angles_from_sine_vectors(c, valid, w=None) -> jax.Array:
  """``θ = atan2(s, c)`` with sines from the difference vectors ``w [..., n, k]``
  (``None``: from the cosines alone); 0 outside ``valid``."""
  c = jnp.clip(c, 0.0, 1.0)
  s_cos = jnp.sqrt(jnp.maximum(1.0 - c * c, 0.0))
  if w is None:
    s = s_cos
  else:
    use = valid & (c > COS_SWITCH)
    norms = jnp.sqrt(jnp.sum(w * w, axis=-2))
    s = jnp.where(use, _graded_sines(w, use & (norms < SMALL_SINE)), s_cos)
  return jnp.where(valid, jnp.arctan2(s, c), 0.0)


def angles_from_svd(u, c, vt, valid, q1=None, x1=None, q2=None, x2=None,
                    with_sines: bool = True) -> jax.Array:
  """Principal angles between ``Im(q1 x1)`` and ``Im(q2 x2)`` from ``svd(C)``.

  Args:
    u, c, vt, valid: from ``cosine_svd(C)`` with ``C = (q1 x1)ᵀ (q2 x2)``.
    q1, q2: orthonormal-or-zero columns ``[..., n, k]``.
    x1, x2: coefficient matrices ``[..., k, k]`` (orthonormal columns, those
      beyond the rank zeroed) so that ``q x`` is the basis; ``None`` = identity.
    with_sines: False skips the ``O(n k²)`` sine step, exact to ``~eps`` when
      every genuine cosine is below ``COS_SWITCH``.

  Returns:
    ``theta [..., k]``: angles ascending in the ``valid`` entries, 0 elsewhere.
  """
  if not with_sines:
    return angles_from_sine_vectors(c, valid)
  p1, p2 = sine_coefficients(u, c, vt, x1, x2)
  return angles_from_sine_vectors(c, valid, mm(q2, p2) - mm(q1, p1))   # (Q2 − Q1 Q1ᵀ Q2) V


def principal_angles_from_bases(q1, x1, rank1, q2, x2, rank2, c_mat=None):
  """``(theta, valid)`` between ``Im(q1 x1)`` and ``Im(q2 x2)`` (batched).

  ``c_mat`` defaults to ``(q1 x1)ᵀ (q2 x2)``; the grid passes it from a Gram.
  """
  if c_mat is None:
    b1 = q1 if x1 is None else mm(q1, x1)
    b2 = q2 if x2 is None else mm(q2, x2)
    c_mat = einsum("...ni,...nj->...ij", b1, b2)
  u, c, vt, valid, _ = cosine_svd(c_mat, rank1, rank2)
  return angles_from_svd(u, c, vt, valid, q1, x1, q2, x2), valid


def grassmann_from_angles(theta: jax.Array, valid: jax.Array) -> jax.Array:
  """``d_G = sqrt(Σ θ²)``; NaN where there is no angle (a zero subspace)."""
  d = jnp.sqrt(jnp.sum(jnp.where(valid, theta * theta, 0.0), axis=-1))
  return jnp.where(jnp.any(valid, axis=-1), d, jnp.nan)
