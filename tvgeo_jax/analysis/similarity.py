r"""SVCCA, PWCCA and orthogonal Procrustes between the layers of two models (beside CKA).

All three compare two representations ``X [n, d1]``, ``Y [n, d2]`` of the same n
examples, after centring each feature over the examples (``cka.centre_features``):

* **CCA** (the common core): the canonical correlations ``ρ_1 >= ρ_2 >= ...`` are the
  cosines of the principal angles between the column spaces of X and Y, i.e. the
  singular values of ``Uxᵀ Uy`` for orthonormal bases ``Ux, Uy`` of those spaces.
* **SVCCA** (Raghu et al. 2017): first keep each representation's top singular
  directions that explain ``variance`` (0.99) of its variance, then the mean of the
  ``min(kx, ky)`` canonical correlations between the kept subspaces. A similarity in
  [0, 1].
* **PWCCA** (Morcos et al. 2018): ``Σ_i α_i ρ_i`` with weights ``α_i ∝ Σ_j |⟨h_i, x_j⟩|``,
  ``h_i`` the unit-norm canonical variates of X and ``x_j`` X's (centred) neurons:
  canonical directions that account for more of X count more. Asymmetric: the weights
  are the *first* argument's (row model's). A similarity in [0, 1]; Morcos et al.'s
  distance is ``1 − PWCCA``.
* **Orthogonal Procrustes distance** (Ding et al. 2021): with ``‖X‖_F = ‖Y‖_F = 1``,
  ``min_Q ‖XQ − Y‖²_F = 2 − 2‖XᵀY‖_*`` over orthogonal Q (the smaller side
  zero-padded). A *distance* in [0, 2], 0 for representations equal up to rotation
  (and scale).

Every layer's thin SVD ``X = Ux Sx Vxᵀ`` is computed once per model
(``representation_bases``); every layer pair then needs one ``Uxᵀ Uy`` product and
small SVDs (``layer_similarities``): ``‖XᵀY‖_* = ‖Sx Uxᵀ Uy Sy‖_*`` and PWCCA's
``⟨h_i, x_j⟩ = (Pᵀ Sx Vxᵀ)_ij`` for ``P`` the left singular vectors of ``Uxᵀ Uy``.
Constant features (layer 0 of the first token) give NaN, as CKA does.

CCA needs many more examples than features: when ``rank X + rank Y > n`` the two
column spaces must intersect and correlations of 1 appear whatever the models are
(Raghu et al. use n far above d). SVCCA's truncation reduces this; PWCCA and
Procrustes are reported as computed.
"""
from __future__ import annotations

import functools
from typing import Dict, Mapping, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from tvgeo_jax.analysis.cka import centre_features
from tvgeo_jax.geometry.linalg import after

MEASURES = ("svcca", "pwcca", "procrustes")
#: What each measure's matrix holds (plots and JSON say so).
KIND = {"svcca": "similarity", "pwcca": "similarity", "procrustes": "distance"}
RANGE = {"svcca": (0.0, 1.0), "pwcca": (0.0, 1.0), "procrustes": (0.0, 2.0)}
_HIGHEST = jax.lax.Precision.HIGHEST
_einsum = functools.partial(jnp.einsum, precision=_HIGHEST)
_EPS32 = float(jnp.finfo(jnp.float32).eps)


def check_measures(measures: Sequence[str]) -> Tuple[str, ...]:
  bad = [m for m in measures if m not in MEASURES]
  if bad:
    raise ValueError(f"Unknown representation similarities {bad}; choose from {MEASURES} "
                     "(CKA is always computed).")
  return tuple(measures)


@functools.partial(jax.jit, static_argnames=("variance",))
def _bases(x, variance):
  xc = centre_features(x)                                   # [L, n, d]
  u, s, vt = jnp.linalg.svd(xc, full_matrices=False)        # one batched SVD call
  n, d = x.shape[-2:]
  rank = jnp.where(s[..., 0] > 0, jnp.sum(s > max(n, d) * _EPS32 * s[..., :1], axis=-1), 0)
  keep = jnp.arange(s.shape[-1]) < rank[..., None]
  s = jnp.where(keep, s, 0.0)
  frac = jnp.cumsum(s * s, axis=-1) / jnp.maximum(jnp.sum(s * s, axis=-1, keepdims=True), 1e-30)
  # smallest k with frac[k-1] >= variance (the last direction that crosses the threshold)
  k_var = jnp.minimum(jnp.sum(frac < variance, axis=-1) + 1, rank)
  return {"u": u * keep[..., None, :], "s": s, "svt": s[..., :, None] * vt,
          "rank": rank, "k_var": k_var}


def representation_bases(x, variance: float = 0.99) -> Dict[str, jax.Array]:
  """Per-layer thin SVD of the centred ``x [L, n, d]`` (what every measure here needs).

  Returns ``u [L, n, k]`` (columns beyond the numerical rank zeroed), ``s [L, k]``,
  ``svt = diag(s) Vᵀ [L, k, d]``, ``rank [L]`` and ``k_var [L]`` (SVCCA's kept
  directions), ``k = min(n, d)``.
  """
  x = jnp.asarray(x, jnp.float32)
  if x.ndim == 2:
    x = x[None]
  if x.ndim != 3:
    raise ValueError(f"Representations must be [layers, n, d] or [n, d]; got {x.shape}.")
  if not 0.0 < variance <= 1.0:
    raise ValueError(f"variance={variance} must lie in (0, 1] (SVCCA keeps that share).")
  if x.shape[1] < 2:
    raise ValueError(f"{x.shape[1]} examples are too few to compare representations.")
  return _bases(x, float(variance))


def _pair_measures(bx, by_l, measures):
  """All measures of one layer of x (``bx`` slices) against every layer of y.

  SVCCA and Procrustes need singular values only (one values-only SVD call of both
  matrices); PWCCA needs the left singular vectors too (a second call, ordered after
  the first: two batched LAPACK calls in flight can wedge a 2-thread CPU pool, see
  ``geometry.linalg``). Values-only SVDs cost ~1/3 of full ones on CPU.
  """
  ux, sx, svtx, rx, kx = bx
  g = _einsum("ni,lnj->lij", ux, by_l["u"])                      # [L2, kx, ky] cosines
  i = jnp.arange(g.shape[-2])[:, None]
  j = jnp.arange(g.shape[-1])[None, :]
  valid = (rx > 0) & (by_l["rank"] > 0)                          # [L2]
  out = {}
  names = [m for m in ("svcca", "procrustes") if m in measures]
  mats = []
  if "svcca" in measures:
    mats.append(jnp.where((i < kx) & (j < by_l["k_var"][:, None, None]), g, 0.0))
  if "procrustes" in measures:
    # ‖XᵀY‖_* = ‖Sx Uxᵀ Uy Sy‖_* for unit-Frobenius X, Y
    nx = jnp.sqrt(jnp.sum(sx * sx))
    ny = jnp.sqrt(jnp.sum(by_l["s"] ** 2, axis=-1))
    mats.append((sx[:, None] / jnp.maximum(nx, 1e-30)) * g * (
        by_l["s"] / jnp.maximum(ny, 1e-30)[:, None])[:, None, :])
  done = ()
  if mats:
    sv = jnp.linalg.svd(jnp.stack(mats), compute_uv=False)
    done = (sv,)
    for idx, m in enumerate(names):
      if m == "svcca":
        c = jnp.minimum(kx, by_l["k_var"])
        keep = jnp.arange(sv.shape[-1])[None, :] < c[:, None]
        out["svcca"] = jnp.sum(jnp.where(keep, sv[idx], 0.0), -1) / jnp.maximum(c, 1)
      else:
        out["procrustes"] = jnp.maximum(2.0 - 2.0 * jnp.sum(sv[idx], -1), 0.0)
  if "pwcca" in measures:
    p, rho, _ = jnp.linalg.svd(after(g, *done), full_matrices=False)
    c = jnp.minimum(rx, by_l["rank"])
    keep = jnp.arange(rho.shape[-1])[None, :] < c[:, None]       # [L2, c]
    # ⟨h_i, x_j⟩ for the canonical variates h_i = Ux p_i of x and x's neurons x_j
    proj = _einsum("lki,kd->lid", p, svtx)                         # [L2, c, d]
    alpha = jnp.where(keep, jnp.sum(jnp.abs(proj), axis=-1), 0.0)
    alpha = alpha / jnp.maximum(jnp.sum(alpha, -1, keepdims=True), 1e-30)
    out["pwcca"] = jnp.sum(alpha * rho, -1)
  return {k: jnp.where(valid, v, jnp.nan) for k, v in out.items()}


@functools.partial(jax.jit, static_argnames=("measures",))
def _layer_similarities(bx, by, measures):
  fields = ("u", "s", "svt", "rank", "k_var")
  xs = tuple(bx[f] for f in fields)
  return jax.lax.map(lambda b: _pair_measures(b, by, measures), xs)   # {m: [L1, L2]}


def layer_similarities(x, y, measures: Sequence[str] = MEASURES, variance: float = 0.99
                       ) -> Dict[str, np.ndarray]:
  """``{measure: [L1, L2]}`` between every layer of ``x [L1, n, d1]`` and ``y [L2, n, d2]``.

  ``x`` and ``y`` may also be ``representation_bases`` results (reuse them across
  pairs). Rows are x's layers; PWCCA's weights are x's.
  """
  measures = check_measures(measures)
  if not measures:
    return {}
  bx = x if isinstance(x, Mapping) else representation_bases(x, variance)
  by = y if isinstance(y, Mapping) else representation_bases(y, variance)
  if bx["u"].shape[1] != by["u"].shape[1]:
    raise ValueError(f"x and y must hold the same examples: n={bx['u'].shape[1]} vs "
                     f"n={by['u'].shape[1]}.")
  res = _layer_similarities(bx, jax.block_until_ready(by), measures)
  return {m: np.asarray(res[m]) for m in measures}


def pairwise_similarities(representations: Mapping[str, object],
                          measures: Sequence[str] = MEASURES, variance: float = 0.99
                          ) -> Dict[str, Dict[Tuple[str, str], np.ndarray]]:
  """``{measure: {(a, b): [L_a, L_b]}}`` for every model pair ``a <= b`` in key order.

  The same pairs as ``cka.pairwise_cka`` (each model against itself included); each
  model's per-layer SVDs are computed once.
  """
  measures = check_measures(measures)
  names = list(representations)
  bases = {}
  for k in names:                       # one after the other: one LAPACK call in flight
    bases[k] = jax.block_until_ready(representation_bases(representations[k], variance))
  out: Dict[str, Dict[Tuple[str, str], np.ndarray]] = {m: {} for m in measures}
  for i, a in enumerate(names):
    for b in names[i:]:
      for m, mat in layer_similarities(bases[a], bases[b], measures).items():
        out[m][(a, b)] = mat
  return out
