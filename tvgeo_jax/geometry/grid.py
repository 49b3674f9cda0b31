"""All task pairs x layers in one compiled call: ``T_d[T, T, L]`` per metric.

Input stacks (BUILD_NOTES "Geometry convention"): LoRA ``(A [T, L, r, in],
B [T, L, out, r])`` as returned by ``tvgeo_jax.task_vectors.stack_lora`` (scale
folded into B), or dense ``ΔW [T, L, out, in]`` (``stack_full``).

How the work is organised (per layer, layers in sequence inside one jit):
  1. per task: orthonormal factors ``B = qb rb``, ``Aᵀ = qa ra`` from small
     products (``linalg.orthonormal_factor``), the ``r x r`` core
     ``K = rb raᵀ`` (``ΔW = qb K qaᵀ``) and its SVD (ranks, bases);
  2. one Gram per side over all tasks' stacked bases, ``qbᵀ qb`` and ``qaᵀ qa``
     ([T r, T r], a GEMM computed block-upper-triangular);
  3. flattened inner products of every pair from the Gram blocks
     (``<ΔW_i, ΔW_j> = Σ (K_iᵀ Gb_ij K_j) ⊙ Ga_ij``, ``O(T² r³)``), giving L2
     and cosine for ``product``, ``a`` and ``b``;
  4. Grassmann: cosine matrices ``x_iᵀ G_ij x_j`` for all pairs ``i < j`` and
     their SVDs, in chunks of pairs (memory stays bounded for large T); the
     ``O(d r²)`` sine step runs only for chunks holding a pair with a cosine
     above ``linalg.COS_SWITCH`` (elsewhere arccos is already exact to ~eps).
Dense stacks use one flattened Gram per layer and, for Grassmann, the top-k
left singular subspaces (SVD per task and layer).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from tvgeo_jax.geometry import linalg, pairwise
from tvgeo_jax.geometry.linalg import einsum

METRICS = ("l2", "cosine", "grassmann")
FACTORS = ("product", "a", "b")
Stack = Union[jax.Array, np.ndarray, Tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class DistanceGrid:
  """Distances of one module: ``distances[(factor, metric)]`` is ``[T, T, L]``.

  ``factor`` is ``"product"`` (the update ΔW = BA, or the dense ΔW), ``"a"`` or
  ``"b"`` (LoRA factors alone, see the identifiability caveat in
  ``pairwise``). ``ranks[factor]`` ``[T, L]`` are numerical ranks (for dense
  stacks the full rank, not top-k), ``sq_norms[factor]`` squared Frobenius
  norms, ``reports`` one dict per zero matrix (NaN distances) or rank-deficient
  A (then ``Im(BA) ≠ Im(B)``; the product's own column space is used).
  """
  module: str
  task_names: Tuple[str, ...]
  layer_names: Tuple[str, ...]
  distances: Dict[Tuple[str, str], np.ndarray]
  ranks: Dict[str, np.ndarray]
  sq_norms: Dict[str, np.ndarray]
  reports: Tuple[Dict[str, Any], ...]
  kind: str                       # "lora" or "dense"
  top_k: Optional[int] = None

  @property
  def num_tasks(self) -> int:
    return len(self.task_names)

  @property
  def num_layers(self) -> int:
    return len(self.layer_names)

  def get(self, factor: str, metric: str) -> np.ndarray:
    try:
      return self.distances[(factor, metric)]
    except KeyError:
      raise KeyError(f"No {factor}/{metric} distances for module {self.module!r}; "
                     f"computed: {sorted(self.distances)}.") from None

  def layer_mean(self, factor: str, metric: str, skip_nan: bool = True) -> np.ndarray:
    """``T̄_d [T, T]``: mean over all layers (NaN layers skipped unless told)."""
    return self.kplus_mean(factor, metric, 1, skip_nan)

  def kplus_mean(self, factor: str, metric: str, k: int, skip_nan: bool = True) -> np.ndarray:
    """Mean over layers ``k..L``, 1-indexed as in the paper (``k = L``: last layer)."""
    if not 1 <= k <= self.num_layers:
      raise ValueError(f"k={k} outside 1..{self.num_layers} (layers are 1-indexed here).")
    d = self.get(factor, metric)[..., k - 1:]
    if skip_nan:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)     # all-NaN entries stay NaN
        return np.nanmean(d, axis=-1)
    return d.mean(axis=-1)

  def kplus_means(self, factor: str, metric: str, skip_nan: bool = True) -> np.ndarray:
    """``[L, T, T]``: entry ``k − 1`` is the mean over layers ``k..L``."""
    return np.stack([self.kplus_mean(factor, metric, k, skip_nan)
                     for k in range(1, self.num_layers + 1)])


# --- input handling ----------------------------------------------------------------

def _as_stack(stack: Stack) -> Tuple[str, Tuple[np.ndarray, ...]]:
  """("lora", (a, b)) or ("dense", (w,)), validated, float32."""
  if isinstance(stack, Mapping):
    if set(stack) != {"a", "b"}:
      raise ValueError(f"A LoRA stack mapping needs keys 'a' and 'b', got {sorted(stack)}.")
    stack = (stack["a"], stack["b"])
  if isinstance(stack, (tuple, list)):
    if len(stack) != 2:
      raise ValueError(f"A LoRA stack is (A [T, L, r, in], B [T, L, out, r]); got {len(stack)} arrays.")
    a, b = (jnp.asarray(s, jnp.float32) for s in stack)
    if a.ndim != 4 or b.ndim != 4:
      raise ValueError(f"LoRA stacks must be A [T, L, r, in] and B [T, L, out, r]; got "
                       f"A {a.shape}, B {b.shape}.")
    if a.shape[:2] != b.shape[:2] or a.shape[2] != b.shape[3]:
      raise ValueError(f"A {a.shape} and B {b.shape} disagree on tasks, layers or rank; "
                       "pass (A, B) as returned by task_vectors.stack_lora.")
    r = a.shape[2]
    if r > min(a.shape[3], b.shape[2]):
      raise ValueError(f"LoRA rank {r} exceeds min(out={b.shape[2]}, in={a.shape[3]}): the pair "
                       "looks swapped; pass (A [T, L, r, in], B [T, L, out, r]).")
    return "lora", (a, b)
  w = jnp.asarray(stack, jnp.float32)
  if w.ndim != 4:
    raise ValueError(f"A dense stack is ΔW [T, L, out, in]; got shape {w.shape}.")
  return "dense", (w,)


def _check_names(names: Sequence[str], metrics, factors, kind, top_k):
  bad = [m for m in metrics if m not in METRICS]
  if bad or not metrics:
    raise ValueError(f"Unknown metrics {bad or metrics}; choose from {METRICS}.")
  bad = [f for f in factors if f not in FACTORS]
  if bad or not factors:
    raise ValueError(f"Unknown factors {bad or factors}; choose from {FACTORS}.")
  if kind == "dense" and tuple(factors) != ("product",):
    raise ValueError("Dense (full fine-tuning) stacks have no LoRA factors: use factors=('product',).")
  if kind == "lora" and top_k is not None:
    raise ValueError("top_k applies to dense stacks; LoRA column spaces have dimension <= r.")
  if len(set(names)) != len(names):
    raise ValueError(f"Task names must be unique, got {list(names)}.")


# --- building blocks (inside jit) --------------------------------------------------

def _block_gram(q: jax.Array, block: int) -> jax.Array:
  """``G[t, s] = q_tᵀ q_s``: ``q [T, n, k] -> [T, T, k, k]``.

  One GEMM when ``T <= block``; otherwise only the upper block triangle is
  computed (the lower blocks are transposes), which saves ~40% of the dominant
  cost. The blocks form ONE batched product: several independent large dots
  in one program can wedge XLA's CPU thread pool on small machines (seen with
  2 cores: the run stalls at 0% CPU).
  """
  t, n, k = q.shape
  if t <= block:
    return einsum("tnk,snl->tskl", q, q)
  nb = math.ceil(t / block)
  q = jnp.pad(q, ((0, nb * block - t), (0, 0), (0, 0))).reshape(nb, block, n, k)
  bi, bj = np.triu_indices(nb)
  prods = einsum("ptnk,psnl->ptskl", q[bi], q[bj])       # [pairs, block, block, k, k]
  where = {(int(i), int(j)): p for p, (i, j) in enumerate(zip(bi, bj))}
  rows = []
  for i in range(nb):
    rows.append(jnp.concatenate(
        [prods[where[i, j]] if i <= j else jnp.transpose(prods[where[j, i]], (1, 0, 3, 2))
         for j in range(nb)], axis=1))
  return jnp.concatenate(rows, axis=0)[:t, :t]


def _flat_from_inner(inner: jax.Array, metrics) -> Dict[str, jax.Array]:
  inner = 0.5 * (inner + inner.T)        # exactly symmetric distances
  sq = jnp.diagonal(inner)
  l2, cos = pairwise.distances_from_inner(inner, sq[:, None], sq[None, :])
  eye = jnp.eye(inner.shape[0], dtype=bool)
  out = {}
  if "l2" in metrics:
    out["l2"] = jnp.where(eye, 0.0, l2)
  if "cosine" in metrics:
    out["cosine"] = jnp.where(eye, jnp.where(sq > 0, 0.0, jnp.nan), cos)
  return out


def _grassmann_pairs(q, x, rank, gram, pair_chunk: int) -> jax.Array:
  """``[T, T]`` Grassmann distances between ``Im(q_t x_t)``, chunked over pairs."""
  t = q.shape[0]
  iu, ju = np.triu_indices(t, 1)
  n_pairs = len(iu)
  out = jnp.where(jnp.eye(t, dtype=bool), jnp.where(rank > 0, 0.0, jnp.nan), 0.0)
  if n_pairs == 0:
    return out
  pc = min(pair_chunk, n_pairs)
  n_chunks = math.ceil(n_pairs / pc)
  pad = n_chunks * pc - n_pairs
  idx = np.stack([np.pad(iu, (0, pad)), np.pad(ju, (0, pad))]).reshape(2, n_chunks, pc)
  idx = jnp.asarray(np.transpose(idx, (1, 0, 2)), jnp.int32)

  def chunk(ij):
    i, j = ij[0], ij[1]
    xi = None if x is None else x[i]
    xj = None if x is None else x[j]
    g = gram[i, j]
    c = g if x is None else einsum("pab,pac,pcd->pbd", xi, g, xj)
    u, cs, vt, valid, need = linalg.cosine_svd(c, rank[i], rank[j])
    theta = jax.lax.cond(
        jnp.any(need),
        lambda: linalg.angles_from_svd(u, cs, vt, valid, q[i], xi, q[j], xj, True),
        lambda: linalg.angles_from_svd(u, cs, vt, valid, with_sines=False))
    return linalg.grassmann_from_angles(theta, valid)

  d = jax.lax.map(chunk, idx).reshape(-1)[:n_pairs]
  return out.at[iu, ju].set(d).at[ju, iu].set(d)


def _layer_lora(a, b, *, metrics, factors, rtol, pair_chunk, gram_block):
  sp = pairwise.lora_spectral(b, a, rtol)
  flat = [m for m in metrics if m != "grassmann"]
  need_gb = any(f in factors for f in ("product", "b"))
  need_ga = "a" in factors or ("product" in factors and flat)
  gb = _block_gram(sp["qb"], gram_block) if need_gb else None
  ga = _block_gram(sp["qa"], gram_block) if need_ga else None
  res: Dict[str, jax.Array] = {}
  last = None        # the factors' Grassmann loops run one after the other (linalg._svqb_pass)
  for f in factors:
    if flat:
      if f == "product":
        core = einsum("iab,ijac,jcd->ijbd", sp["k"], gb, sp["k"])
        inner = jnp.sum(core * ga, axis=(-2, -1))
      else:
        rm, g = (sp["rb"], gb) if f == "b" else (sp["ra"], ga)
        inner = einsum("iab,ijac,jcb->ij", rm, g, rm)
      for m, v in _flat_from_inner(inner, flat).items():
        res[f"{f}/{m}"] = v
      res[f"{f}/sq_norm"] = jnp.diagonal(inner)
    if "grassmann" in metrics:
      q, g = (sp["qa"], ga) if f == "a" else (sp["qb"], gb)
      x = sp[f]["x"] if last is None else linalg.after(sp[f]["x"], last)
      last = res[f"{f}/grassmann"] = _grassmann_pairs(q, x, sp[f]["rank"], g, pair_chunk)
  for f in FACTORS:   # ranks and norms of all three are free; kept for the reports
    mat = sp["k"] if f == "product" else sp["rb" if f == "b" else "ra"]
    res.setdefault(f"{f}/sq_norm", jnp.sum(mat * mat, axis=(-2, -1)))
    res[f"{f}/rank"] = sp[f]["rank"]
  return res


def _layer_dense(w, *, metrics, factors, rtol, top_k, pair_chunk, gram_block):
  del factors
  t = w.shape[0]
  flat = [m for m in metrics if m != "grassmann"]
  res: Dict[str, jax.Array] = {}
  x = w.reshape(t, -1)
  inner = einsum("tn,sn->ts", x, x)
  res["product/sq_norm"] = jnp.diagonal(inner)
  if flat:
    for m, v in _flat_from_inner(inner, flat).items():
      res[f"product/{m}"] = v
  q, dim, s = pairwise.dense_basis(w, rtol, top_k)
  tol = linalg.default_rtol(*w.shape[-2:]) if rtol is None else rtol
  res["product/rank"] = jnp.where(s[:, 0] > 0, jnp.sum(s > tol * s[:, :1], axis=-1), 0)
  if "grassmann" in metrics:
    g = _block_gram(q, gram_block)
    res["product/grassmann"] = _grassmann_pairs(q, None, dim, g, pair_chunk)
  return res


@functools.partial(jax.jit, static_argnames=(
    "kind", "metrics", "factors", "rtol", "top_k", "pair_chunk", "gram_block"))
def _grid_core(arrays, *, kind, metrics, factors, rtol, top_k, pair_chunk, gram_block):
  """One compiled call over all layers: returns ``{key: [L, ...]}``."""
  per_layer = tuple(jnp.swapaxes(x, 0, 1) for x in arrays)     # [L, T, ...]
  if kind == "lora":
    fn = lambda xs: _layer_lora(*xs, metrics=metrics, factors=factors, rtol=rtol,
                                pair_chunk=pair_chunk, gram_block=gram_block)
  else:
    fn = lambda xs: _layer_dense(*xs, metrics=metrics, factors=factors, rtol=rtol,
                                 top_k=top_k, pair_chunk=pair_chunk, gram_block=gram_block)
  return jax.lax.map(fn, per_layer)


def default_pair_chunk(n: int, k: int, budget_floats: int = 4_000_000) -> int:
  """Pairs per chunk so that the ``[chunk, n, k]`` sine buffers stay ~16 MB each."""
  return max(8, budget_floats // max(1, n * k))


def default_gram_block(t: int) -> int:
  """Tasks per Gram block: one GEMM up to 16 tasks, else ~6 blocks a side."""
  return t if t <= 16 else max(8, math.ceil(t / 6))


# --- public API ----------------------------------------------------------------------

def grid_arrays(stack: Stack, *, metrics: Sequence[str] = METRICS,
                factors: Sequence[str] = ("product",), rtol: Optional[float] = None,
                top_k: Optional[int] = None, pair_chunk: Optional[int] = None,
                gram_block: Optional[int] = None) -> Dict[str, jax.Array]:
  """The jitted grid on one stack, raw: ``{"factor/metric": [L, T, T], "factor/rank":
  [L, T], "factor/sq_norm": [L, T]}`` (device arrays, not blocked on).

  This is the one compiled call the benchmark times; ``distance_grid`` wraps it.
  """
  kind, arrays = _as_stack(stack)
  _check_names([str(i) for i in range(arrays[0].shape[0])], metrics, factors, kind, top_k)
  if kind == "lora":
    a, b = arrays
    n, k = max(a.shape[3], b.shape[2]), a.shape[2]
  else:
    n = arrays[0].shape[2]
    k = min(arrays[0].shape[2:]) if top_k is None else top_k
  t = arrays[0].shape[0]
  return _grid_core(
      arrays, kind=kind, metrics=tuple(metrics), factors=tuple(factors),
      rtol=None if rtol is None else float(rtol), top_k=top_k,
      pair_chunk=int(pair_chunk or default_pair_chunk(n, k)),
      gram_block=int(gram_block or default_gram_block(t)))


def _reports(module, kind, task_names, layer_names, ranks, sq_norms, r_lora, factors):
  reports = []
  for f in factors:
    rk = ranks[f]
    zero = (sq_norms[f] == 0) | (rk == 0)
    for t, l in zip(*np.nonzero(zero)):
      reports.append({"module": module, "factor": f, "task": task_names[t],
                      "layer": layer_names[l], "issue": "zero matrix",
                      "effect": "no column space: grassmann and cosine distances are NaN"})
  if kind == "lora" and "a" in ranks:
    low = (ranks["a"] < r_lora) & (sq_norms["a"] > 0)
    for t, l in zip(*np.nonzero(low)):
      reports.append({"module": module, "factor": "a", "task": task_names[t],
                      "layer": layer_names[l], "issue": f"A has rank {int(ranks['a'][t, l])} < r={r_lora}",
                      "effect": "Im(BA) is a proper subspace of Im(B); the product's column space is used"})
  return tuple(reports)


def distance_grid(stack: Stack, *, module: str = "", task_names: Optional[Sequence[str]] = None,
                  layer_names: Optional[Sequence[str]] = None,
                  metrics: Sequence[str] = METRICS, factors: Sequence[str] = ("product",),
                  rtol: Optional[float] = None, top_k: Optional[int] = None,
                  pair_chunk: Optional[int] = None, gram_block: Optional[int] = None
                  ) -> DistanceGrid:
  """``T_d[T, T, L]`` for every requested metric and factor of one module stack.

  Args:
    stack: LoRA ``(A [T, L, r, in], B [T, L, out, r])`` (or ``{"a", "b"}``) or
      dense ``ΔW [T, L, out, in]``.
    module: a name kept in the result (e.g. ``"query"``).
    task_names, layer_names: defaults ``task_0..``, ``layer_0..`` (tree order).
    metrics: subset of ``("l2", "cosine", "grassmann")``.
    factors: LoRA: subset of ``("product", "a", "b")``; dense: ``("product",)``.
    rtol: rank tolerance relative to the largest singular value
      (default ``max(shape) * eps(float32)`` per matrix).
    top_k: dense only: Grassmann between top-k left singular subspaces.
    pair_chunk, gram_block: memory/speed knobs (defaults scale with the shapes).

  Returns:
    A ``DistanceGrid`` (numpy arrays) with NaN entries reported in ``reports``.
  """
  kind, arrays = _as_stack(stack)
  t, l = arrays[0].shape[:2]
  task_names = tuple(task_names) if task_names is not None else tuple(f"task_{i}" for i in range(t))
  layer_names = tuple(layer_names) if layer_names is not None else tuple(f"layer_{i}" for i in range(l))
  if len(task_names) != t or len(layer_names) != l:
    raise ValueError(f"The stack has {t} tasks and {l} layers but {len(task_names)} task names "
                     f"and {len(layer_names)} layer names were given.")
  _check_names(task_names, metrics, factors, kind, top_k)
  raw = jax.device_get(grid_arrays(stack, metrics=metrics, factors=factors, rtol=rtol,
                                   top_k=top_k, pair_chunk=pair_chunk, gram_block=gram_block))
  return _to_result(raw, kind, module, task_names, layer_names, metrics, factors, top_k,
                    arrays[0].shape[2] if kind == "lora" else None)


def _to_result(raw, kind, module, task_names, layer_names, metrics, factors, top_k, r_lora):
  distances = {(f, m): np.transpose(np.asarray(raw[f"{f}/{m}"]), (1, 2, 0))
               for f in factors for m in metrics}
  have = [f for f in FACTORS if f"{f}/rank" in raw]
  ranks = {f: np.asarray(raw[f"{f}/rank"]).T.astype(np.int64) for f in have}
  sq_norms = {f: np.asarray(raw[f"{f}/sq_norm"]).T for f in have}
  return DistanceGrid(module=module, task_names=tuple(task_names), layer_names=tuple(layer_names),
                      distances=distances, ranks=ranks, sq_norms=sq_norms,
                      reports=_reports(module, kind, task_names, layer_names, ranks, sq_norms, r_lora,
                                       factors),
                      kind=kind, top_k=top_k)


def distance_grids(stacks: Mapping[str, Stack], *, task_names: Optional[Sequence[str]] = None,
                   layer_names: Optional[Sequence[str]] = None, **kwargs) -> Dict[str, DistanceGrid]:
  """``{module: DistanceGrid}``; modules of equal shapes share one compiled call.

  Same-shape stacks (e.g. query and value) are concatenated along the layer
  axis, so the whole analysis is a single jitted call per distinct shape.
  """
  if not stacks:
    raise ValueError("distance_grids needs at least one module stack.")
  parsed = {m: _as_stack(s) for m, s in stacks.items()}
  groups: Dict[Any, List[str]] = {}
  for m, (kind, arrays) in parsed.items():
    groups.setdefault((kind, tuple(a.shape for a in arrays)), []).append(m)
  out: Dict[str, DistanceGrid] = {}
  for (kind, shapes), mods in groups.items():
    t, l = shapes[0][:2]
    names = tuple(task_names) if task_names is not None else tuple(f"task_{i}" for i in range(t))
    lnames = tuple(layer_names) if layer_names is not None else tuple(f"layer_{i}" for i in range(l))
    if len(names) != t or len(lnames) != l:
      raise ValueError(f"Stacks of {mods} have {t} tasks and {l} layers but {len(names)} task "
                       f"names and {len(lnames)} layer names were given.")
    metrics = tuple(kwargs.get("metrics", METRICS))
    factors = tuple(kwargs.get("factors", ("product",)))
    _check_names(names, metrics, factors, kind, kwargs.get("top_k"))
    cat = tuple(jnp.concatenate([parsed[m][1][i] for m in mods], axis=1)
                for i in range(len(shapes)))
    stack = cat if kind == "lora" else cat[0]
    raw = jax.device_get(grid_arrays(stack, **kwargs))
    for n_mod, m in enumerate(mods):
      part = {key: v[n_mod * l:(n_mod + 1) * l] for key, v in raw.items()}
      out[m] = _to_result(part, kind, m, names, lnames, metrics, factors, kwargs.get("top_k"),
                          shapes[0][2] if kind == "lora" else None)
  return {m: out[m] for m in stacks}
