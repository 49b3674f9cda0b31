"""Distances between two task vectors: dense matrices or LoRA factor pairs.

Dense task vectors ``ΔW (out, in)`` (full fine-tuning) and LoRA updates
``ΔW = B A`` with ``B (out, r)`` (scale alpha/r folded in) and ``A (r, in)``
(BUILD_NOTES "Geometry convention"). All functions accept extra leading batch
dimensions and are jit/vmap friendly; the grid (``tvgeo_jax.geometry.grid``)
computes the same quantities for all task pairs and layers in one call.

Metrics (paper A, section 2.2):
  * L2: ``‖W1 − W2‖_F``;
  * cosine distance: ``1 − <W1, W2> / (‖W1‖ ‖W2‖)`` on the flattened matrices
    (NaN when either matrix is zero);
  L2 and cosine are computed from the difference ``W1 − W2`` (``distances_from_difference``),
  not from ``‖W1‖² + ‖W2‖² − 2<W1, W2>``, whose cancellation costs near pairs their digits;
  * Grassmann: ``d_G = sqrt(Σ θ_i²)`` over the principal angles between the
    column spaces ``Im(W1), Im(W2) ⊂ R^out``; subspaces of different dimensions
    use ``min(r1, r2)`` angles; a zero matrix has no column space (NaN).
Numerical rank: singular values above ``rtol * s_max``; ``rtol`` defaults to
NumPy's ``max(shape) * eps(float32)``.

LoRA kernels never form the ``out x in`` product: ``<B1A1, B2A2> =
tr((B1ᵀB2)(A2A1ᵀ))`` costs ``O((out + in) r²)``. The column space of ``BA`` is
``Im(B)`` when ``A`` has full row rank; in general it is computed exactly as
``Im(B R)`` for the small factor ``R`` of ``A`` (so a rank-deficient ``A`` is
handled, not assumed away).

Identifiability caveat for the factor-alone analyses (paper A, Figure 4):
``(B M, M⁻¹ A)`` gives the same ``ΔW`` for any invertible ``M``, so the
flattened ``A`` or ``B`` alone (and their L2/cosine) are not functions of the
update; ``Im(B)`` (= ``Im(ΔW)`` for full-rank ``A``) and the row space of ``A``
(= that of ``ΔW`` for full-rank ``B``) are.
"""
from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from tvgeo_jax.geometry import linalg
from tvgeo_jax.geometry.linalg import einsum, mm


# --- flattened metrics ----------------------------------------------------------

def _flat_inner(x, y):
  return jnp.sum(x * y, axis=(-2, -1))


def distances_from_inner(inner, sq1, sq2):
  """``(l2, cosine)`` from ``<x, y>``, ``‖x‖²``, ``‖y‖²`` (NaN cosine if a norm is 0).

  L2 goes through ``‖x‖² + ‖y‖² − 2<x, y>``: its relative error is
  ``~eps (‖x‖² + ‖y‖²) / L2²``, small unless the two are nearly equal.
  """
  l2 = jnp.sqrt(jnp.maximum(sq1 + sq2 - 2.0 * inner, 0.0))
  denom = jnp.sqrt(sq1 * sq2)
  cos = jnp.where(denom > 0, 1.0 - inner / jnp.where(denom > 0, denom, 1.0), jnp.nan)
  return l2, cos


def distances_from_difference(sq_diff, gap, sq1, sq2):
  """``(l2, cosine)`` from ``‖x − y‖²``, ``gap = ‖x‖² − ‖y‖² = <x − y, x + y>``, ``‖x‖²``, ``‖y‖²``.

  ``1 − cos = (‖x − y‖² − (‖x‖ − ‖y‖)²) / (2 ‖x‖ ‖y‖)`` with ``‖x‖ − ‖y‖ = gap /
  (‖x‖ + ‖y‖)``: when ``x − y`` and ``gap`` are computed from the differenced
  inputs, both keep their relative accuracy however close ``x`` and ``y`` are
  (float32 relative error ~1e-7 at any separation, against ``eps (‖x‖² + ‖y‖²) /
  ‖x − y‖²`` for ``distances_from_inner``). NaN cosine if a norm is 0.
  """
  n1, n2 = jnp.sqrt(sq1), jnp.sqrt(sq2)
  norm_gap = gap / jnp.where(n1 + n2 > 0, n1 + n2, 1.0)
  l2 = jnp.sqrt(jnp.maximum(sq_diff, 0.0))
  denom = n1 * n2
  cos = jnp.where(denom > 0, jnp.maximum(sq_diff - norm_gap * norm_gap, 0.0)
                  / (2.0 * jnp.where(denom > 0, denom, 1.0)), jnp.nan)
  return l2, cos


def dense_difference_terms(x: jax.Array, y: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """``(‖x − y‖², <x − y, x + y>)`` over the last two axes, from the difference."""
  d = x - y
  return _flat_inner(d, d), _flat_inner(d, x + y)


def l2_distance(x: jax.Array, y: jax.Array) -> jax.Array:
  """Frobenius norm of ``x − y`` over the last two axes."""
  d = jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)
  return jnp.sqrt(jnp.sum(d * d, axis=(-2, -1)))


def cosine_distance(x: jax.Array, y: jax.Array) -> jax.Array:
  """``1 − cos`` of the flattened matrices (from their difference); NaN if either is zero."""
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.float32)
  return distances_from_difference(*dense_difference_terms(x, y), _flat_inner(x, x),
                                   _flat_inner(y, y))[1]


# --- dense column spaces -------------------------------------------------------

def dense_basis(x: jax.Array, rtol: Optional[float] = None, top_k: Optional[int] = None
                ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Top-k left singular subspace of ``x [..., out, in]``.

  Returns ``(q [..., out, k], dim, s)``: orthonormal columns (those beyond the
  numerical rank zeroed), the subspace dimension ``min(k, rank)`` and all
  singular values. ``top_k=None`` keeps every direction (the full column space;
  uninformative for near-full-rank full-FT updates, paper A section 3.1).
  """
  x = jnp.asarray(x, jnp.float32)
  out, inn = x.shape[-2:]
  rtol = linalg.default_rtol(out, inn) if rtol is None else rtol
  u, s, _ = jnp.linalg.svd(x, full_matrices=False)
  rank = jnp.where(s[..., 0] > 0, jnp.sum(s > rtol * s[..., :1], axis=-1), 0)
  k = u.shape[-1] if top_k is None else int(top_k)
  if not 1 <= k <= u.shape[-1]:
    raise ValueError(f"top_k={top_k} must lie in [1, {u.shape[-1]}] for {out}x{inn} matrices.")
  dim = jnp.minimum(rank, k)
  q = u[..., :k] * (jnp.arange(k) < dim[..., None])[..., None, :]
  return q, dim, s


def numerical_rank(x: jax.Array, rtol: Optional[float] = None) -> jax.Array:
  """Count of singular values above ``rtol * s_max`` (0 for a zero matrix)."""
  return dense_basis(x, rtol)[1]


def principal_angles(x: jax.Array, y: jax.Array, rtol: Optional[float] = None,
                     top_k: Optional[int] = None) -> jax.Array:
  """Principal angles (ascending) between ``Im(x)`` and ``Im(y)`` (top-k if given).

  Returns ``[..., k]`` with NaN beyond ``min(dim x, dim y)``.
  """
  q1, d1, _ = dense_basis(x, rtol, top_k)
  q2, d2, _ = dense_basis(y, rtol, top_k)
  if q1.shape[-1] != q2.shape[-1]:
    k = max(q1.shape[-1], q2.shape[-1])
    q1 = jnp.pad(q1, [(0, 0)] * (q1.ndim - 1) + [(0, k - q1.shape[-1])])
    q2 = jnp.pad(q2, [(0, 0)] * (q2.ndim - 1) + [(0, k - q2.shape[-1])])
  theta, valid = linalg.principal_angles_from_bases(q1, None, d1, q2, None, d2)
  return jnp.where(valid, theta, jnp.nan)


def grassmann_distance(x: jax.Array, y: jax.Array, rtol: Optional[float] = None,
                       top_k: Optional[int] = None) -> jax.Array:
  """``sqrt(Σ θ²)`` between the column spaces (NaN if either matrix is zero)."""
  theta = principal_angles(x, y, rtol, top_k)
  valid = ~jnp.isnan(theta)
  return linalg.grassmann_from_angles(jnp.where(valid, theta, 0.0), valid)


# --- LoRA factored kernels -----------------------------------------------------

def _check_lora(b, a):
  b = jnp.asarray(b, jnp.float32)
  a = jnp.asarray(a, jnp.float32)
  if b.ndim < 2 or a.ndim < 2 or b.shape[-1] != a.shape[-2]:
    raise ValueError(f"LoRA factors need B (..., out, r) and A (..., r, in) with the same r; "
                     f"got B {b.shape}, A {a.shape}. Pass (b, a) in this order.")
  r = b.shape[-1]
  if r > min(b.shape[-2], a.shape[-1]):
    raise ValueError(f"LoRA rank r={r} exceeds min(out={b.shape[-2]}, in={a.shape[-1]}): are B "
                     "and A swapped? Pass B (out, r) then A (r, in).")
  return b, a


def lora_inner(b1, a1, b2, a2) -> jax.Array:
  """``<B1 A1, B2 A2>_F = Σ (B1ᵀB2) ⊙ (A1A2ᵀ)`` without forming the products."""
  b1, a1 = _check_lora(b1, a1)
  b2, a2 = _check_lora(b2, a2)
  gb = einsum("...oi,...oj->...ij", b1, b2)
  ga = einsum("...in,...jn->...ij", a1, a2)
  return jnp.sum(gb * ga, axis=(-2, -1))


def _sum2(x, y):
  return jnp.sum(x * y, axis=(-2, -1))


def lora_difference_terms(b1, a1, b2, a2, bb2=None, aa1=None):
  """``{factor: (‖x − y‖², <x − y, x + y>)}`` for ``product`` (``B1A1 − B2A2``), ``a`` and ``b``.

  The update difference is the rank-2r product of differenced factors,
  ``B1A1 − B2A2 = [δB | B2] [A1; δA]`` with ``δB = B1 − B2``, ``δA = A1 − A2``
  (exact in floating point when the factors are close), so every term is of the
  size of the difference and nothing cancels; only ``r x r`` products of
  ``δB``, ``δA`` with ``δB``, ``B2``, ``A1``, ``δA`` are formed, ``O((out + in)
  r²)`` (``difference_terms_from_products``). ``bb2 = B2ᵀB2``, ``aa1 = A1A1ᵀ``
  may be passed precomputed. The accuracy holds for near pairs whose factors are
  close (checkpoints of one run, a fine-tune of a fine-tune); two factorisations
  of one update that differ by a gauge ``(BM, M⁻¹A)`` still get absolute error
  ~eps ‖ΔW‖ (a Gram gives ~sqrt(eps) ‖ΔW‖). Factors of different ``r`` must be
  zero-padded first (``pad_rank``).
  """
  db, da = b1 - b2, a1 - a2
  bb2 = einsum("...or,...os->...rs", b2, b2) if bb2 is None else bb2
  aa1 = einsum("...ri,...si->...rs", a1, a1) if aa1 is None else aa1
  return difference_terms_from_products(
      einsum("...or,...os->...rs", db, db), einsum("...or,...os->...rs", db, b2),
      einsum("...ri,...si->...rs", da, a1), einsum("...ri,...si->...rs", da, da), bb2, aa1)


def difference_terms_from_products(dbdb, dbb2, daa1, dada, bb2, aa1):
  """``lora_difference_terms`` from ``δBᵀδB, δBᵀB2, δA A1ᵀ, δA δAᵀ, B2ᵀB2, A1A1ᵀ`` (``[..., r, r]``)."""
  a1da = jnp.swapaxes(daa1, -1, -2)
  sq = _sum2(dbdb, aa1) + 2.0 * _sum2(dbb2, a1da) + _sum2(bb2, dada)
  # <δB A1 + B2 δA, B1 A1 + B2 A2>, each Gram rebuilt from small + large exact-size parts
  gap = (_sum2(dbdb + dbb2, aa1) + _sum2(dbb2, aa1 - a1da)
         + _sum2(jnp.swapaxes(dbb2, -1, -2) + bb2, daa1) + _sum2(bb2, daa1 - dada))
  tr = lambda m: jnp.trace(m, axis1=-2, axis2=-1)
  return {"product": (sq, gap),
          "a": (tr(dada), 2.0 * tr(daa1) - tr(dada)),
          "b": (tr(dbdb), tr(dbdb) + 2.0 * tr(dbb2))}


def pad_rank(b, a, r: int):
  """Zero-pad ``B (..., out, r0)``, ``A (..., r0, in)`` to rank ``r`` (``B A`` unchanged)."""
  extra = r - b.shape[-1]
  if extra < 0:
    raise ValueError(f"Cannot pad rank {b.shape[-1]} down to {r}.")
  b = jnp.pad(b, [(0, 0)] * (b.ndim - 1) + [(0, extra)])
  a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, extra), (0, 0)])
  return b, a


def _lora_flat(b1, a1, b2, a2, factor="product"):
  b1, a1 = _check_lora(b1, a1)
  b2, a2 = _check_lora(b2, a2)
  r = max(b1.shape[-1], b2.shape[-1])
  (b1, a1), (b2, a2) = pad_rank(b1, a1, r), pad_rank(b2, a2, r)
  sq_diff, gap = lora_difference_terms(b1, a1, b2, a2)[factor]
  return distances_from_difference(sq_diff, gap, lora_inner(b1, a1, b1, a1),
                                   lora_inner(b2, a2, b2, a2))


def lora_l2_distance(b1, a1, b2, a2) -> jax.Array:
  """``‖B1A1 − B2A2‖_F`` in ``O((out + in) r²)`` (from the differenced factors)."""
  return _lora_flat(b1, a1, b2, a2)[0]


def lora_cosine_distance(b1, a1, b2, a2) -> jax.Array:
  """Cosine distance of the flattened updates ``B1A1``, ``B2A2`` (NaN if one is 0)."""
  return _lora_flat(b1, a1, b2, a2)[1]


def lora_spectral(b, a, rtol: Optional[float] = None):
  """Factored spectral form of ``ΔW = B A`` (never formed).

  ``B = qb rb``, ``Aᵀ = qa ra`` (``orthonormal_factor``), so
  ``ΔW = qb (rb raᵀ) qaᵀ``. Returns a dict with those pieces and, for each of
  ``product`` / ``b`` / ``a``, the coefficient matrix ``x`` (``qb x`` or
  ``qa x`` is an orthonormal basis of ``Im(BA)``, ``Im(B)`` or the row space of
  ``A``), the singular values and the numerical rank.
  """
  b, a = _check_lora(b, a)
  out, r = b.shape[-2:]
  inn = a.shape[-1]
  rtol_p = linalg.default_rtol(out, inn) if rtol is None else rtol
  (qb, rb), (qa, ra) = linalg.orthonormal_factors([b, jnp.swapaxes(a, -1, -2)])
  k = mm(rb, jnp.swapaxes(ra, -1, -2))
  res = {"qb": qb, "rb": rb, "qa": qa, "ra": ra, "k": k}
  tols = (rtol_p, linalg.default_rtol(out, r) if rtol is None else rtol,
          linalg.default_rtol(inn, r) if rtol is None else rtol)
  # one batched SVD for the three r x r matrices (see linalg._svqb_pass)
  x, s, rank = linalg.subspace_coefficients(jnp.stack([k, rb, ra]),
                                            jnp.asarray(tols, jnp.float32))
  for i, name in enumerate(("product", "b", "a")):
    res[name] = {"x": x[i], "s": s[i], "rank": rank[i]}
  return res


def lora_principal_angles(b1, a1, b2, a2, rtol: Optional[float] = None,
                          factor: str = "product") -> jax.Array:
  """Principal angles between column spaces of ``B1A1`` and ``B2A2`` (NaN-padded).

  ``factor="b"`` compares ``Im(B1), Im(B2)``; ``"a"`` the row spaces of
  ``A1, A2`` (subspaces of R^in).
  """
  if factor not in ("product", "a", "b"):
    raise ValueError(f"factor must be 'product', 'a' or 'b', got {factor!r}.")
  s1 = lora_spectral(b1, a1, rtol)
  s2 = lora_spectral(b2, a2, rtol)
  qkey = "qa" if factor == "a" else "qb"
  theta, valid = linalg.principal_angles_from_bases(
      s1[qkey], s1[factor]["x"], s1[factor]["rank"],
      s2[qkey], s2[factor]["x"], s2[factor]["rank"])
  return jnp.where(valid, theta, jnp.nan)


def lora_grassmann_distance(b1, a1, b2, a2, rtol: Optional[float] = None,
                            factor: str = "product") -> jax.Array:
  """Grassmann distance of ``Im(B1A1), Im(B2A2)`` (or of the factors, see above)."""
  theta = lora_principal_angles(b1, a1, b2, a2, rtol, factor)
  valid = ~jnp.isnan(theta)
  return linalg.grassmann_from_angles(jnp.where(valid, theta, 0.0), valid)
