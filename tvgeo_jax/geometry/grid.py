"""All task pairs x layers in one compiled call: ``T_d[T, T, L]`` per metric.

Input stacks (BUILD_NOTES "Geometry convention"): LoRA ``(A [T, L, r, in],
B [T, L, out, r])`` as returned by ``tvgeo_jax.task_vectors.stack_lora`` (scale
folded into B), optionally with nominal ranks ``[T, L]`` as a third item when
adapters of different rank were zero-padded to a common ``r``
(``sources.module_stacks``), or dense ``ΔW [T, L, out, in]`` (``stack_full``).

How the work is organised: the upper block triangle of the ``[T, T]`` matrices
is cut into ``tb x tb`` tiles (``plan.plan_grid`` sizes them for a memory
budget; the last block overlaps its neighbour, nothing is padded); the tiles are split over a 1-D device mesh (``jax.shard_map``, inputs
replicated, one compiled call; multi-host like training); on each device the
layers run in sequence, and within a layer first the per-task pieces (bases,
cores, norms) and then this device's tiles (``tiles``). The host puts the tiles
together into symmetric ``[T, T, L]`` matrices.

Definitions kept in the outputs (``DistanceGrid.notes``): Grassmann distances
between column spaces of different dimension use the ``min(d1, d2)`` principal
angles; L2/cosine of the LoRA factors alone are NaN between adapters of
different rank (matrices of different shapes); near pairs get L2/cosine from
their difference, not from a Gram (``tiles.NEAR``).
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

from jax.sharding import PartitionSpec as P

from tvgeo_jax.geometry import plan as plan_lib
from tvgeo_jax.geometry import tiles as tiles_lib
from tvgeo_jax.training import sharding

METRICS = ("l2", "cosine", "grassmann")
FACTORS = ("product", "a", "b")
Stack = Union[jax.Array, np.ndarray, Tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class DistanceGrid:
  """Distances of one module: ``distances[(factor, metric)]`` is ``[T, T, L]``.

  ``factor`` is ``"product"`` (the update ΔW = BA, or the dense ΔW), ``"a"`` or
  ``"b"`` (LoRA factors alone, see the identifiability caveat in
  ``pairwise``; their L2/cosine are NaN between adapters of different rank). ``ranks[factor]`` ``[T, L]`` are numerical ranks (for dense
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
  lora_ranks: Optional[np.ndarray] = None    # [T, L] nominal LoRA ranks (before padding)
  notes: Tuple[str, ...] = ()                # definitions the numbers depend on

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

def _as_stack(stack: Stack) -> Tuple[str, Tuple[jax.Array, ...]]:
  """("lora", (a, b, nominal_rank)) or ("dense", (w,)), validated, float32."""
  if isinstance(stack, Mapping):
    if not {"a", "b"} <= set(stack) <= {"a", "b", "rank"}:
      raise ValueError(f"A LoRA stack mapping needs keys 'a', 'b' (and optionally 'rank'), got "
                       f"{sorted(stack)}.")
    stack = (stack["a"], stack["b"]) + ((stack["rank"],) if "rank" in stack else ())
  if isinstance(stack, (tuple, list)):
    if len(stack) not in (2, 3):
      raise ValueError(f"A LoRA stack is (A [T, L, r, in], B [T, L, out, r][, ranks [T, L]]); "
                       f"got {len(stack)} arrays.")
    a, b = (jnp.asarray(s, jnp.float32) for s in stack[:2])
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
    if len(stack) == 3:
      rank = np.asarray(stack[2])
      if rank.shape != a.shape[:2] or rank.min() < 0 or rank.max() > r:
        raise ValueError(f"LoRA ranks must be [T, L] = {a.shape[:2]} integers in 0..{r} (the "
                         f"factors' padded rank); got shape {rank.shape}.")
    else:
      rank = np.full(a.shape[:2], r)
    return "lora", (a, b, jnp.asarray(rank, jnp.int32))
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


# --- the compiled call -------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _compiled(mesh, kind, metrics, factors, rtol, top_k, tile, t, n_layers, flat_method):
  """The jitted, device-sharded grid for one configuration (cached per mesh and shapes)."""
  starts = plan_lib.tile_starts(t, tile)
  n_dev = mesh.size
  per_dev = math.ceil(len(starts) / n_dev)      # spare slots repeat tile 0 (results unused)
  padded = np.concatenate([starts, np.repeat(starts[:1], per_dev * n_dev - len(starts), 0)])
  tile_fn = tiles_lib.lora_tile if kind == "lora" else tiles_lib.dense_tile
  opts = dict(tb=tile, metrics=metrics, factors=factors, flat_method=flat_method)

  def body(arrays, my_tiles):
    def layer(l):
      xs = [jax.lax.dynamic_index_in_dim(x, l, axis=1, keepdims=False) for x in arrays]
      sp = (tiles_lib.lora_tasks(*xs, rtol) if kind == "lora"
            else tiles_lib.dense_tasks(xs[0], rtol, top_k))
      per_tile = jax.lax.map(lambda ij: tile_fn(sp, ij[0], ij[1], **opts), my_tiles)
      return per_tile, tiles_lib.task_outputs(kind, sp, factors)
    return jax.lax.map(layer, jnp.arange(n_layers))

  axis = sharding.DATA_AXIS
  mapped = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(axis)),
                         out_specs=(P(None, axis), P()), check_vma=False)
  return jax.jit(lambda arrays: mapped(arrays, jnp.asarray(padded, jnp.int32))), starts


def _on_mesh(x, mesh):
  """``x`` replicated on every device of ``mesh`` (every process passes the same value)."""
  if jax.process_count() > 1:
    return jax.make_array_from_process_local_data(sharding.replicated(mesh), np.asarray(x))
  return jax.device_put(x, sharding.replicated(mesh))


def _local(x) -> np.ndarray:
  return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


def _assemble(tiles: np.ndarray, starts: np.ndarray, t: int) -> np.ndarray:
  """``[L, n_tiles, tb, tb]`` upper-triangle tiles -> symmetric ``[L, T, T]`` (diagonal unset)."""
  n_l, _, tb, _ = tiles.shape
  full = np.zeros((n_l, t, t), tiles.dtype)
  for n, (i0, j0) in enumerate(starts):
    full[:, i0:i0 + tb, j0:j0 + tb] = tiles[:, n]
  upper = np.triu(np.ones((t, t), bool), 1)
  return np.where(upper, full, np.swapaxes(full, 1, 2))


def _diagonal(key: str, task: Dict[str, np.ndarray]) -> np.ndarray:
  """``[L, T]`` self-distances: 0, or NaN where the matrix has no direction."""
  f, m = key.split("/")
  if m == "l2":
    return np.zeros_like(task[f"{f}/sq_norm"])
  alive = task[f"{f}/sq_norm"] > 0 if m == "cosine" else task.get(f"{f}/dim", task[f"{f}/rank"]) > 0
  return np.where(alive, 0.0, np.nan).astype(np.float32)


def grid_plan(stack: Stack, *, metrics: Sequence[str] = METRICS,
              factors: Sequence[str] = ("product",), top_k: Optional[int] = None,
              tile: Optional[int] = None, max_memory: Optional[int] = None,
              devices: Optional[Sequence[Any]] = None) -> plan_lib.GridPlan:
  """The tiling, memory and FLOPs of ``grid_arrays`` on ``stack`` (nothing is computed)."""
  kind, arrays = _as_stack(stack)
  return _plan_for(kind, arrays, metrics, factors, top_k, tile, max_memory,
                   len(devices) if devices is not None else jax.device_count())


def _plan_for(kind, arrays, metrics, factors, top_k, tile, max_memory, n_dev):
  if kind == "dense":
    t, l, out, inn = arrays[0].shape
    r = min(out, inn) if top_k is None else int(top_k)
  else:
    (t, l, r, inn), out = arrays[0].shape, arrays[1].shape[2]
  return plan_lib.plan_grid(kind, t, l, out, inn, r, devices=n_dev, max_memory=max_memory,
                            tile=tile, metrics=metrics, factors=factors)


def grid_arrays(stack: Stack, *, metrics: Sequence[str] = METRICS,
                factors: Sequence[str] = ("product",), rtol: Optional[float] = None,
                top_k: Optional[int] = None, tile: Optional[int] = None,
                max_memory: Optional[int] = None, flat_method: str = "auto",
                devices: Optional[Sequence[Any]] = None) -> Dict[str, np.ndarray]:
  """The grid on one stack, raw: ``{"factor/metric": [L, T, T], "factor/rank": [L, T],
  "factor/sq_norm": [L, T]}`` (numpy, on every process).

  Args (beyond ``distance_grid``'s): ``tile`` tasks per tile side (default from
  ``max_memory``, bytes per device, see ``plan.plan_grid``); ``flat_method``
  ``"auto"`` (near pairs from their difference), ``"gram"`` (all from the Gram)
  or ``"difference"`` (all from the difference); ``devices`` the mesh (default
  all devices, every host).
  """
  kind, arrays = _as_stack(stack)
  _check_names([str(i) for i in range(arrays[0].shape[0])], metrics, factors, kind, top_k)
  if flat_method not in tiles_lib.FLAT_METHODS:
    raise ValueError(f"flat_method={flat_method!r}; choose from {tiles_lib.FLAT_METHODS}.")
  mesh = sharding.data_mesh(list(devices) if devices is not None else None)
  t, n_layers = arrays[0].shape[:2]
  plan = _plan_for(kind, arrays, metrics, factors, top_k, tile, max_memory, mesh.size)
  fn, starts = _compiled(mesh, kind, tuple(metrics), tuple(factors),
                         None if rtol is None else float(rtol), top_k, plan.tile, t,
                         n_layers, flat_method)
  tile_out, task_out = fn(tuple(_on_mesh(x, mesh) for x in arrays))
  task = {k: _local(v) for k, v in task_out.items()}
  raw = {k: v for k, v in task.items() if not k.endswith("/dim")}
  for key, v in tile_out.items():
    full = _assemble(sharding.to_host(v), starts, t)
    idx = np.arange(t)
    full[:, idx, idx] = _diagonal(key, task)
    raw[key] = full
  return raw


GRASSMANN_NOTE = ("grassmann: sqrt(sum of squared principal angles) between the column spaces; "
                  "subspaces of different dimension d1, d2 use their min(d1, d2) angles")
MIXED_RANK_NOTE = ("adapters of different LoRA rank (lora_rank [T, L]): L2 and cosine of A alone "
                   "and B alone are NaN for those pairs (matrices of different shapes); BA and "
                   "every Grassmann distance are defined")
NEAR_NOTE = ("l2/cosine: pairs with |x - y|^2 < {near} (|x|^2 + |y|^2) are computed from the "
             "difference x - y (for LoRA the differenced factors), the others from inner products")


def _reports(module, kind, task_names, layer_names, ranks, sq_norms, nominal, factors):
  reports = []
  for f in factors:
    rk = ranks[f]
    zero = (sq_norms[f] == 0) | (rk == 0)
    for t, l in zip(*np.nonzero(zero)):
      reports.append({"module": module, "factor": f, "task": task_names[t],
                      "layer": layer_names[l], "issue": "zero matrix",
                      "effect": "no column space: grassmann and cosine distances are NaN"})
  if kind == "lora" and "a" in ranks:
    low = (ranks["a"] < nominal) & (sq_norms["a"] > 0)
    for t, l in zip(*np.nonzero(low)):
      reports.append({"module": module, "factor": "a", "task": task_names[t],
                      "layer": layer_names[l],
                      "issue": f"A has rank {int(ranks['a'][t, l])} < r={int(nominal[t, l])}",
                      "effect": "Im(BA) is a proper subspace of Im(B); the product's column space is used"})
  return tuple(reports)


def distance_grid(stack: Stack, *, module: str = "", task_names: Optional[Sequence[str]] = None,
                  layer_names: Optional[Sequence[str]] = None,
                  metrics: Sequence[str] = METRICS, factors: Sequence[str] = ("product",),
                  rtol: Optional[float] = None, top_k: Optional[int] = None,
                  **options) -> DistanceGrid:
  """``T_d[T, T, L]`` for every requested metric and factor of one module stack.

  Args:
    stack: LoRA ``(A [T, L, r, in], B [T, L, out, r][, ranks [T, L]])`` (or
      ``{"a", "b"[, "rank"]}``) or dense ``ΔW [T, L, out, in]``.
    module: a name kept in the result (e.g. ``"query"``).
    task_names, layer_names: defaults ``task_0..``, ``layer_0..`` (tree order).
    metrics: subset of ``("l2", "cosine", "grassmann")``.
    factors: LoRA: subset of ``("product", "a", "b")``; dense: ``("product",)``.
    rtol: rank tolerance relative to the largest singular value
      (default ``max(shape) * eps(float32)`` per matrix).
    top_k: dense only: Grassmann between top-k left singular subspaces.
    **options: ``tile``, ``max_memory``, ``flat_method``, ``devices`` (``grid_arrays``).

  Returns:
    A ``DistanceGrid`` (numpy arrays) with NaN entries reported in ``reports``.
  """
  return distance_grids({module: stack}, task_names=task_names, layer_names=layer_names,
                        metrics=metrics, factors=factors, rtol=rtol, top_k=top_k, **options)[module]


def _to_result(raw, kind, module, task_names, layer_names, metrics, factors, top_k, nominal):
  distances = {(f, m): np.transpose(np.asarray(raw[f"{f}/{m}"]), (1, 2, 0))
               for f in factors for m in metrics}
  have = [f for f in FACTORS if f"{f}/rank" in raw]
  ranks = {f: np.asarray(raw[f"{f}/rank"]).T.astype(np.int64) for f in have}
  sq_norms = {f: np.asarray(raw[f"{f}/sq_norm"]).T for f in have}
  notes = []
  if "grassmann" in metrics:
    notes.append(GRASSMANN_NOTE)
  if any(m != "grassmann" for m in metrics):
    notes.append(NEAR_NOTE.format(near=tiles_lib.NEAR))
  if nominal is not None and len(np.unique(nominal)) > 1 and set(factors) - {"product"}:
    notes.append(MIXED_RANK_NOTE)
  return DistanceGrid(module=module, task_names=tuple(task_names), layer_names=tuple(layer_names),
                      distances=distances, ranks=ranks, sq_norms=sq_norms,
                      reports=_reports(module, kind, task_names, layer_names, ranks, sq_norms,
                                       nominal, factors),
                      kind=kind, top_k=top_k, lora_ranks=nominal, notes=tuple(notes))


def distance_grids(stacks: Mapping[str, Stack], *, task_names: Optional[Sequence[str]] = None,
                   layer_names: Optional[Sequence[str]] = None, **kwargs) -> Dict[str, DistanceGrid]:
  """``{module: DistanceGrid}``; modules of equal shapes share one compiled call.

  Same-shape stacks (e.g. query and value) are concatenated along the layer
  axis, so the whole analysis is a single jitted call per distinct shape.
  ``kwargs`` are ``distance_grid``'s (metrics, factors, rtol, top_k, options).
  """
  if not stacks:
    raise ValueError("distance_grids needs at least one module stack.")
  parsed = {m: _as_stack(s) for m, s in stacks.items()}
  groups: Dict[Any, List[str]] = {}
  for m, (kind, arrays) in parsed.items():
    groups.setdefault((kind, tuple(a.shape for a in arrays)), []).append(m)
  out: Dict[str, DistanceGrid] = {}
  metrics = tuple(kwargs.pop("metrics", METRICS))
  factors = tuple(kwargs.pop("factors", ("product",)))
  for (kind, shapes), mods in groups.items():
    t, l = shapes[0][:2]
    names = tuple(task_names) if task_names is not None else tuple(f"task_{i}" for i in range(t))
    lnames = tuple(layer_names) if layer_names is not None else tuple(f"layer_{i}" for i in range(l))
    if len(names) != t or len(lnames) != l:
      raise ValueError(f"Stacks of {mods} have {t} tasks and {l} layers but {len(names)} task "
                       f"names and {len(lnames)} layer names were given.")
    _check_names(names, metrics, factors, kind, kwargs.get("top_k"))
    cat = tuple(jnp.concatenate([parsed[m][1][i] for m in mods], axis=1)
                for i in range(len(shapes)))
    raw = grid_arrays(cat if kind == "lora" else cat[0], metrics=metrics, factors=factors,
                      **kwargs)
    for n_mod, m in enumerate(mods):
      part = {key: v[n_mod * l:(n_mod + 1) * l] for key, v in raw.items()}
      nominal = np.asarray(parsed[m][1][2]) if kind == "lora" else None
      out[m] = _to_result(part, kind, m, names, lnames, metrics, factors, kwargs.get("top_k"),
                          nominal)
  return {m: out[m] for m in stacks}
