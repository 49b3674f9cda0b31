"""One tile of the ``[T, T]`` distance matrices: task block ``I`` against task block ``J``.

The grid (``grid``) cuts the upper block triangle of every ``[T, T]`` matrix into
``tb x tb`` tiles (the last block of tasks starts at ``T − tb``, overlapping its
neighbour, so that no task is padded), spreads the tiles over the devices and runs this code for each
(layers in sequence, a device's tiles in sequence). Per layer, everything about
one task is computed once (``lora_tasks`` / ``dense_tasks``: orthonormal bases,
spectral cores, norms); a tile then needs

  1. the Gram blocks ``q_Iᵀ q_J`` (one GEMM per side, ``[tb r, tb r]``);
  2. flattened inner products from them, giving L2 and cosine for every pair;
     pairs flagged near (``‖x − y‖² < NEAR (‖x‖² + ‖y‖²)``, where the Gram's
     ``‖x‖² + ‖y‖² − 2<x, y>`` would cancel) take the differenced path instead
     (``pairwise.lora_difference_terms`` / ``dense_difference_terms``), run only
     for tiles that hold such a pair (or for all, ``flat_method="difference"``);
  3. Grassmann: cosine matrices ``x_iᵀ G_ij x_j``, one batched SVD, and the
     ``O(d r²)`` sine step only for tiles with a cosine above ``linalg.COS_SWITCH``.

LAPACK calls (SVD, eigh) stay in one data-dependent chain (``linalg.after``): on
jax 0.10.2 CPU two batched calls in flight can deadlock the thread pool.
LoRA factors of different rank arrive zero-padded to a common ``r`` with their
nominal ranks: the product, its column space and ``Im(B)``/row space of ``A`` are
unchanged by the padding; the factor-alone L2/cosine of two adapters of different
rank compare matrices of different shapes and are NaN (see ``grid``).
"""
from __future__ import annotations

from typing import Dict, Sequence

import jax
import jax.numpy as jnp

from tvgeo_jax.geometry import linalg, pairwise
from tvgeo_jax.geometry.linalg import einsum

# Pairs closer than this (‖x − y‖² < NEAR · (‖x‖² + ‖y‖²), i.e. cosine similarity
# above ~0.5) take the differenced L2/cosine; the Gram's relative L2 error is
# ~eps (‖x‖² + ‖y‖²) / (2 ‖x − y‖²), below 1.2e-7 beyond it.
NEAR = 0.5
FLAT_METHODS = ("auto", "gram", "difference")


def _block(x, start, tb):
  return jax.lax.dynamic_slice_in_dim(x, start, tb, 0)


def lora_tasks(a, b, nominal, rtol) -> dict:
  """Per-task pieces of one layer: ``a [T, r, in]``, ``b [T, out, r]``, ``nominal [T]``."""
  sp = pairwise.lora_spectral(b, a, rtol)
  sp["a_raw"], sp["b_raw"], sp["nominal"] = a, b, nominal
  sp["bb"] = einsum("tor,tos->trs", b, b)
  sp["aa"] = einsum("tri,tsi->trs", a, a)
  sp["sq"] = {"product": jnp.sum(sp["bb"] * sp["aa"], axis=(-2, -1)),
              "b": jnp.trace(sp["bb"], axis1=-2, axis2=-1),
              "a": jnp.trace(sp["aa"], axis1=-2, axis2=-1)}
  return sp


def dense_tasks(w, rtol, top_k) -> dict:
  """Per-task pieces of one layer of dense task vectors ``w [T, out, in]``."""
  q, dim, s = pairwise.dense_basis(w, rtol, top_k)
  tol = linalg.default_rtol(*w.shape[-2:]) if rtol is None else rtol
  rank = jnp.where(s[:, 0] > 0, jnp.sum(s > tol * s[:, :1], axis=-1), 0)
  return {"w": w, "q": q, "dim": dim, "rank": rank, "sq": {"product": jnp.sum(w * w, axis=(-2, -1))}}


def _flat_estimates(inner, sq_i, sq_j, off):
  l2, cos = pairwise.distances_from_inner(inner, sq_i[:, None], sq_j[None, :])
  near = off & (sq_i[:, None] + sq_j[None, :] > 0) & (
      l2 * l2 < NEAR * (sq_i[:, None] + sq_j[None, :]))
  return l2, cos, near


def _select_accurate(est, near, flat_method, accurate_fn, factors):
  """Replace the Gram estimates of near pairs by the differenced values.

  ``est[f] = (l2, cos, near)``; ``accurate_fn()`` returns ``{f: (l2, cos)}`` for
  the whole tile and runs only when a pair needs it.
  """
  if flat_method == "gram":
    return {f: est[f][:2] for f in factors}
  use = {f: est[f][2] for f in factors}
  if flat_method == "difference":
    acc = accurate_fn()
    return {f: acc[f] for f in factors}
  zeros = {f: (jnp.zeros_like(est[f][0]), jnp.zeros_like(est[f][0])) for f in factors}
  acc = jax.lax.cond(jnp.any(near), accurate_fn, lambda: zeros)
  return {f: tuple(jnp.where(use[f], acc[f][k], est[f][k]) for k in range(2)) for f in factors}


def _grassmann(cs_list, ranks, q_pairs, x_pairs, off):
  """Grassmann distances of a tile for each factor; ``cs_list[n]`` is ``[tb, tb, k, k]``,
  ``q_pairs[n]`` the bases ``([tb, n, k], [tb, n, k])`` of the tile's row and column tasks.

  One batched SVD for all factors, then each factor's sine step (when a pair
  needs it) in turn, each chained after the previous one.
  """
  r1 = jnp.stack([r[0] for r in ranks])[:, :, None]
  r2 = jnp.stack([r[1] for r in ranks])[:, None, :]
  u_all, c_all, vt_all, valid_all, need_all = linalg.cosine_svd(jnp.stack(cs_list), r1, r2)
  outs = []
  for n, ((qi, qj), (xi, xj)) in enumerate(zip(q_pairs, x_pairs)):
    u, cs, vt, valid = u_all[n], c_all[n], vt_all[n], valid_all[n]
    if outs:
      u = linalg.after(u, outs[-1])

    def with_sines():
      p1, p2 = linalg.sine_coefficients(u, cs, vt, xi, xj)
      # q_j p2 − q_i p1 as one GEMM per task of the tile (batch j, resp. i), not tb² small ones
      w = einsum("jor,ijrs->ijos", qj, p2) - einsum("ior,ijrs->ijos", qi, p1)
      return linalg.angles_from_sine_vectors(cs, valid, w)

    theta = jax.lax.cond(jnp.any(off & need_all[n]), with_sines,
                         lambda: linalg.angles_from_sine_vectors(cs, valid))
    outs.append(linalg.grassmann_from_angles(theta, valid))
  return outs


def lora_tile(sp, bi, bj, *, tb, metrics, factors, flat_method) -> Dict[str, jax.Array]:
  """``{"factor/metric": [tb, tb]}`` for tasks ``bi..bi+tb`` x ``bj..bj+tb`` of one layer."""
  blk = lambda x, k: _block(x, k, tb)
  gi, gj = bi + jnp.arange(tb), bj + jnp.arange(tb)
  off = gi[:, None] != gj[None, :]
  flat = [m for m in metrics if m != "grassmann"]
  need_gb = any(f in factors for f in ("product", "b"))
  need_ga = "a" in factors or ("product" in factors and flat)
  gb = einsum("ior,jos->ijrs", blk(sp["qb"], bi), blk(sp["qb"], bj)) if need_gb else None
  ga = einsum("ior,jos->ijrs", blk(sp["qa"], bi), blk(sp["qa"], bj)) if need_ga else None
  res: Dict[str, jax.Array] = {}
  if flat:
    est = {}
    for f in factors:
      if f == "product":
        core = einsum("iab,ijac,jcd->ijbd", blk(sp["k"], bi), gb, blk(sp["k"], bj))
        inner = jnp.sum(core * ga, axis=(-2, -1))
      else:
        rm, g = (sp["rb"], gb) if f == "b" else (sp["ra"], ga)
        inner = einsum("iab,ijac,jcb->ij", blk(rm, bi), g, blk(rm, bj))
      est[f] = _flat_estimates(inner, blk(sp["sq"][f], bi), blk(sp["sq"][f], bj), off)
    near = jnp.any(jnp.stack([est[f][2] for f in factors]))

    def accurate():
      b_i, b_j = blk(sp["b_raw"], bi), blk(sp["b_raw"], bj)
      a_i, a_j = blk(sp["a_raw"], bi), blk(sp["a_raw"], bj)
      db, da = b_i[:, None] - b_j[None], a_i[:, None] - a_j[None]    # [tb, tb, d, r], [tb, tb, r, d]
      terms = pairwise.difference_terms_from_products(
          einsum("ijor,ijos->ijrs", db, db), einsum("ijor,jos->ijrs", db, b_j),
          einsum("ijrn,isn->ijrs", da, a_i), einsum("ijrn,ijsn->ijrs", da, da),
          blk(sp["bb"], bj)[None], blk(sp["aa"], bi)[:, None])
      return {f: pairwise.distances_from_difference(
          *terms[f], blk(sp["sq"][f], bi)[:, None], blk(sp["sq"][f], bj)[None])
              for f in factors}

    vals = _select_accurate(est, near, flat_method, accurate, factors)
    same_rank = blk(sp["nominal"], bi)[:, None] == blk(sp["nominal"], bj)[None]
    for f in factors:
      for m, v in zip(("l2", "cosine"), vals[f]):
        if m in flat:
          # A (r, in) / B (out, r) of different r: no entrywise comparison (NaN, noted)
          res[f"{f}/{m}"] = v if f == "product" else jnp.where(same_rank, v, jnp.nan)
  if "grassmann" in metrics:
    cs, ranks, qs, xs = [], [], [], []
    for f in factors:
      q, g = (sp["qa"], ga) if f == "a" else (sp["qb"], gb)
      xi, xj = blk(sp[f]["x"], bi), blk(sp[f]["x"], bj)
      cs.append(einsum("iab,ijac,jcd->ijbd", xi, g, xj))
      ranks.append((blk(sp[f]["rank"], bi), blk(sp[f]["rank"], bj)))
      qs.append((blk(q, bi), blk(q, bj)))
      xs.append((xi[:, None], xj[None]))
    for f, d in zip(factors, _grassmann(cs, ranks, qs, xs, off)):
      res[f"{f}/grassmann"] = d
  return res


def dense_tile(sp, bi, bj, *, tb, metrics, factors, flat_method) -> Dict[str, jax.Array]:
  """Dense task vectors: ``{"product/metric": [tb, tb]}`` for the tasks from ``bi``, ``bj``."""
  del factors
  blk = lambda x, k: _block(x, k, tb)
  gi, gj = bi + jnp.arange(tb), bj + jnp.arange(tb)
  off = gi[:, None] != gj[None, :]
  flat = [m for m in metrics if m != "grassmann"]
  res: Dict[str, jax.Array] = {}
  wi, wj = blk(sp["w"], bi), blk(sp["w"], bj)
  if flat:
    sqi, sqj = blk(sp["sq"]["product"], bi), blk(sp["sq"]["product"], bj)
    inner = einsum("in,jn->ij", wi.reshape(tb, -1), wj.reshape(tb, -1))
    est = {"product": _flat_estimates(inner, sqi, sqj, off)}

    def accurate():
      sq_diff, gap = pairwise.dense_difference_terms(wi[:, None], wj[None])
      return {"product": pairwise.distances_from_difference(sq_diff, gap, sqi[:, None],
                                                            sqj[None])}

    vals = _select_accurate(est, est["product"][2], flat_method, accurate, ("product",))
    for m, v in zip(("l2", "cosine"), vals["product"]):
      if m in flat:
        res[f"product/{m}"] = v
  if "grassmann" in metrics:
    qi, qj = blk(sp["q"], bi), blk(sp["q"], bj)
    c = einsum("ink,jnl->ijkl", qi, qj)
    res["product/grassmann"] = _grassmann(
        [c], [(blk(sp["dim"], bi), blk(sp["dim"], bj))], [(qi, qj)], [(None, None)], off)[0]
  return res


def task_outputs(kind: str, sp: dict, factors: Sequence[str]) -> Dict[str, jax.Array]:
  """Per-task numbers kept in the result: numerical ranks and squared norms ``[T]``."""
  if kind == "dense":
    return {"product/rank": sp["rank"], "product/sq_norm": sp["sq"]["product"],
            "product/dim": sp["dim"]}
  del factors
  out = {}
  for f in ("product", "a", "b"):
    out[f"{f}/rank"] = sp[f]["rank"]
    out[f"{f}/sq_norm"] = sp["sq"][f]
  return out
