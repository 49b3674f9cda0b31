"""Task vectors ``τ_t = θ_t − θ_0`` (base first, always) and per-layer stacks for the
geometry kernels.

``task_vector(base, finetuned)`` / ``TaskVectors`` are the one definition every merge and
study uses: the body leaves (heads are never part of a task vector), LoRA-carrying
kernels as their update ``ΔW = scale·A·B`` (Flax layout ``(in, out)``; the other leaves
of a LoRA model are frozen, so they are not part of it), bottleneck-adapter leaves whole
(the base has none: they start from zero).

Layout convention (BUILD_NOTES.md, "Geometry convention"): everything returned
here is in the **paper's / PyTorch layout**, not Flax's:

* full fine-tuning: ``ΔW = W_ft − W_base`` of shape ``(out, in)`` = ``(kernel_ft − kernel_base).T``;
* LoRA: ``A (r, in) = lora_a.T`` and ``B (out, r) = (lora_scale · lora_b).T`` — the
  scale alpha/r is **folded into B**, so ``B @ A`` is exactly the update ``ΔW (out, in)``
  (= ``(merged kernel − base kernel).T``) and ``Im(B) = Im(ΔW)`` for a full-rank A;
* bottleneck adapters: the adapter weights are parameters of their own (the base
  has none, i.e. they start from zero), so their task vector is the weights
  themselves: ``adapter_weights(params)``; in stacks a module such as
  ``"attention_adapter/down"`` gives ``kernel.T`` (``(bottleneck, hidden)``).

Stacks are ``[tasks, layers, ...]`` with layers in tree order (``layer_0`` first).
Module names: ``query, key, value, attention_output, intermediate, output`` and the
adapter matrices ``{attention,output}_adapter/{down,up}``.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from tvgeo_jax.adapters import bottleneck, lora
from tvgeo_jax.adapters.leaves import is_adapter_path, is_head
from tvgeo_jax.core import trees
from tvgeo_jax.geometry.pairwise import pad_rank
from tvgeo_jax.vectors import inputs
from tvgeo_jax.vectors.inputs import HeadFrom, Modules

Path = Tuple[str, ...]
MODULES = ("query", "key", "value", "attention_output", "intermediate", "output")
ADAPTER_MODULES = ("attention_adapter/down", "attention_adapter/up",
                   "output_adapter/down", "output_adapter/up")
_HIGHEST = jax.lax.Precision.HIGHEST

# One model in a stack: a (finetuned, base) pair, a task-vector tree, or a LoRA tree.
Model = Union[Mapping, Tuple[Mapping, Mapping]]


class TaskVectors:
  """The selected task-vector leaves of several models, computed on demand.

  Holds no copy: ``leaf(t, path)`` forms ``τ_t`` at one leaf, ``stack(path)`` the
  ``[T, ...]`` stack of one leaf, so memory stays at one leaf stack at a time.
  """

  def __init__(self, base: Mapping, models: Sequence[Mapping], modules: Modules, what: str):
    self.models = inputs.check_inputs(models, base, what)
    self.base = base
    self._base_paths = set(trees.flatten(base))
    self.paths: List[Path] = inputs.selected_paths(self.models, modules, what)

  def __len__(self) -> int:
    return len(self.models)

  def base_leaf(self, path: Path) -> jnp.ndarray:
    """The base's leaf; zeros for an adapter leaf the base does not have."""
    if is_adapter_path(path) and path not in self._base_paths:
      return jnp.zeros(np.shape(trees.get_path(self.models[0], path)), jnp.float32)
    return jnp.asarray(trees.get_path(self.base, path), jnp.float32)

  def leaf(self, t: int, path: Path) -> jnp.ndarray:
    return inputs.effective_leaf(self.models[t], path) - self.base_leaf(path)

  def stack(self, path: Path) -> jnp.ndarray:
    return jnp.stack([self.leaf(t, path) for t in range(len(self.models))])

  def tree(self, t: int) -> dict:
    return trees.unflatten({p: self.leaf(t, p) for p in self.paths})

  def merged(self, replaced_delta: Mapping[Path, jnp.ndarray], models: Sequence[Mapping],
             head_from: HeadFrom) -> dict:
    """``θ_0 + delta`` on the given leaves, the base elsewhere, the chosen head."""
    replaced = {p: self.base_leaf(p) + d for p, d in replaced_delta.items()}
    return inputs.assemble(self.base, replaced, inputs.head_tree(models, head_from))


def task_vectors(base: Mapping, models: Sequence[Mapping], *, modules: Modules = None
                 ) -> List[dict]:
  """``[τ_t]``: each a tree of the selected leaves (the same leaves for every model)."""
  tv = TaskVectors(base, models, modules, "task_vectors")
  return [tv.tree(t) for t in range(len(tv))]


def task_vector(base: Mapping, model: Mapping, *, modules: Modules = None) -> dict:
  """``τ = θ − θ_0`` on the selected body leaves (LoRA kernels: ``ΔW = scale·A·B``;
  adapter leaves whole). Raises on trees of different architectures or, for LoRA,
  different frozen bases (``vectors.inputs.check_inputs``)."""
  return task_vectors(base, [model], modules=modules)[0]


def apply_task_vector(base: Mapping, tau: Mapping, lam: float = 1.0, *,
                      head_from: Optional[Mapping] = None) -> dict:
  """``θ_0 + λ·τ`` on τ's leaves; the head of ``head_from`` (default: the base's)."""
  base_flat = trees.flatten(base)
  replaced = {}
  for p, v in trees.flatten(tau).items():
    if p not in base_flat or is_head(p):
      raise ValueError(f"apply_task_vector: {trees.path_str(p)} is not a body leaf of the base.")
    if jnp.shape(v) != jnp.shape(base_flat[p]):
      raise ValueError(f"apply_task_vector: {trees.path_str(p)} has shape {jnp.shape(v)} in "
                       f"the task vector but {jnp.shape(base_flat[p])} in the base.")
    replaced[p] = jnp.asarray(base_flat[p], jnp.float32) + float(lam) * jnp.asarray(v)
  head = inputs.head_tree([base], 0 if head_from is None else head_from)
  return inputs.assemble(base, replaced, head)


def adapter_weights(params: Mapping) -> dict:
  """The bottleneck-adapter leaves of a tree (their own task vector), same nesting."""
  if not bottleneck.has_adapters(params):
    raise ValueError("No bottleneck-adapter leaves (encoder/layer_i/*_adapter/...) in this "
                     "tree; inject adapters with tvgeo_jax.adapters.bottleneck first.")
  return bottleneck.adapter_params(params)


# --- per-layer access ---------------------------------------------------------

def _check_module(module: str, allow_adapters: bool = True) -> Path:
  known = MODULES + (ADAPTER_MODULES if allow_adapters else ())
  if module not in known:
    raise ValueError(f"Unknown module {module!r}; choose one of {known}.")
  return tuple(module.split("/"))


def _layers(params: Mapping, layers: Optional[Sequence[int]]) -> List[int]:
  if "encoder" not in params:
    raise ValueError("Tree has no 'encoder' sub-tree; expected encoder/layer_i/... "
                     "(see BUILD_NOTES.md).")
  have = trees.layer_indices(params)
  if layers is None:
    return have
  missing = sorted(set(layers) - set(have))
  if missing:
    raise ValueError(f"Layers {missing} not in this tree (it has layers {have}).")
  return list(layers)


def _module_dict(params: Mapping, layer: int, module: Path) -> Optional[Mapping]:
  try:
    return trees.get_path(params, ("encoder", f"layer_{layer}") + module)
  except (KeyError, TypeError):
    return None


def lora_factors(params: Mapping, module: str, layers: Optional[Sequence[int]] = None
                 ) -> Tuple[jax.Array, jax.Array]:
  """``(A [L, r, in], B [L, out, r])`` of a LoRA tree, PyTorch layout, scale folded into B.

  ``B[l] @ A[l]`` is the update ``ΔW (out, in)`` of layer l.

  Raises:
    ValueError: the module lacks LoRA in some layer, or ranks differ across layers.
  """
  path = _check_module(module, allow_adapters=False)
  layers = _layers(params, layers)
  mods = {i: _module_dict(params, i, path) for i in layers}
  missing = [i for i, m in mods.items() if m is None or "lora_a" not in m]
  if missing:
    raise ValueError(f"Module {module!r} carries no LoRA factors in layers {missing}; "
                     f"LoRA modules of this tree: "
                     f"{[trees.path_str(p) for p in lora.lora_paths(params)][:12]}. "
                     "Pass layers=... to stack only the adapted layers.")
  ranks = {i: int(np.shape(m["lora_a"])[1]) for i, m in mods.items()}
  if len(set(ranks.values())) > 1:
    raise ValueError(f"LoRA ranks of {module!r} differ across layers ({ranks}); "
                     "stack the layers of each rank separately (layers=...).")
  a = jnp.stack([jnp.asarray(mods[i]["lora_a"], jnp.float32).T for i in layers])
  b = jnp.stack([(jnp.asarray(mods[i]["lora_scale"], jnp.float32)
                  * jnp.asarray(mods[i]["lora_b"], jnp.float32)).T for i in layers])
  return a, b


def lora_delta(params: Mapping, module: str, layers: Optional[Sequence[int]] = None
               ) -> jax.Array:
  """The LoRA updates ``B @ A`` of ``module``: ``[L, out, in]`` (PyTorch layout)."""
  a, b = lora_factors(params, module, layers)
  return jnp.einsum("lor,lri->loi", b, a, precision=_HIGHEST)


def lora_task_vector(params: Mapping, products: bool = False) -> Dict[str, object]:
  """Per LoRA module (key: "/"-joined path): ``(A (r, in), B (out, r))``, or ``B @ A``.

  The scale is folded into B, as in ``lora_factors``.
  """
  paths = lora.lora_paths(params)
  if not paths:
    raise ValueError("This tree carries no LoRA factors; use task_vector(base, finetuned).")
  out = {}
  for p in paths:
    m = trees.get_path(params, p)
    a = jnp.asarray(m["lora_a"], jnp.float32).T
    b = (jnp.asarray(m["lora_scale"], jnp.float32) * jnp.asarray(m["lora_b"], jnp.float32)).T
    out[trees.path_str(p)] = jnp.matmul(b, a, precision=_HIGHEST) if products else (a, b)
  return out


def _effective_kernel(params: Mapping, layer: int, module: Path):
  """A module's kernel (in, out) with any LoRA update folded in; None if absent."""
  m = _module_dict(params, layer, module)
  return None if m is None or "kernel" not in m else lora.effective_kernel(m)


def _delta_stack(model: Model, module: str, layers: Optional[Sequence[int]], t: int):
  """``[L, out, in]`` task vectors of one model for ``module``."""
  path = _check_module(module)
  adapter = is_adapter_path(path)
  if isinstance(model, (tuple, list)):
    if len(model) != 2:
      raise ValueError(f"Model {t}: expected a (finetuned, base) pair, got {len(model)} items.")
    ft, base = model
    layers = _layers(ft, layers)
    out = []
    for i in layers:
      kf = _effective_kernel(ft, i, path)
      kb = _effective_kernel(base, i, path)
      if kf is None:
        raise ValueError(f"Model {t}: finetuned tree has no encoder/layer_{i}/{module}/kernel.")
      if kb is None and not adapter:
        raise ValueError(f"Model {t}: base tree has no encoder/layer_{i}/{module}/kernel.")
      if kb is not None and kb.shape != kf.shape:
        raise ValueError(f"Model {t}: encoder/layer_{i}/{module}/kernel has shape {kf.shape} "
                         f"in the finetuned tree but {kb.shape} in the base.")
      out.append((kf if kb is None else kf - kb).T)
    return jnp.stack(out)
  if lora.has_lora(model) and not adapter:
    return lora_delta(model, module, layers)
  layers = _layers(model, layers)
  out = []
  for i in layers:
    m = _module_dict(model, i, path)
    if m is None or "kernel" not in m:
      raise ValueError(f"Model {t}: no encoder/layer_{i}/{module}/kernel in the tree.")
    out.append(jnp.asarray(m["kernel"], jnp.float32).T)
  return jnp.stack(out)


def stack_full(models: Sequence[Model], module: str,
               layers: Optional[Sequence[int]] = None
               ) -> Union[jax.Array, Dict[str, jax.Array]]:
  """Dense task vectors of ``module`` for T models: ``[T, L, out, in]`` (PyTorch layout).

  Each model is one of:
    * a ``(finetuned, base)`` pair: ``(kernel_ft − kernel_base).T`` (LoRA factors in
      either tree are folded in first, adapter matrices missing from the base count as 0);
    * a tree carrying LoRA: its updates ``B @ A`` (``lora_delta``);
    * any other tree, taken as a task vector (e.g. from ``task_vector``): ``kernel.T``;
      for bottleneck trees the adapter modules are their own task vectors.

  ``module="all"`` returns ``{name: [T, L, out, in]}`` for the six dense modules of
  a layer (shapes differ between modules, so they are not one array).
  """
  if not models:
    raise ValueError("stack_full needs at least one model.")
  if module == "all":
    return {m: stack_full(models, m, layers) for m in MODULES}
  stacks = [_delta_stack(m, module, layers, t) for t, m in enumerate(models)]
  shapes = {tuple(s.shape) for s in stacks}
  if len(shapes) > 1:
    raise ValueError(f"Task vectors of {module!r} differ in shape across models: "
                     f"{[tuple(s.shape) for s in stacks]}; are they from the same base?")
  return jnp.stack(stacks)


def stack_lora(models: Sequence[Mapping], module: str,
               layers: Optional[Sequence[int]] = None) -> Tuple[jax.Array, jax.Array]:
  """LoRA factors of T models: ``(A [T, L, r, in], B [T, L, out, r])``, scale folded into B."""
  if not models:
    raise ValueError("stack_lora needs at least one model.")
  pairs = []
  for t, m in enumerate(models):
    if isinstance(m, (tuple, list)):
      raise ValueError(f"Model {t}: stack_lora takes LoRA trees, not (finetuned, base) pairs.")
    if not lora.has_lora(m):
      raise ValueError(f"Model {t} carries no LoRA factors; use stack_full for dense deltas.")
    pairs.append(lora_factors(m, module, layers))
  shapes = {(tuple(a.shape), tuple(b.shape)) for a, b in pairs}
  if len(shapes) > 1:
    raise ValueError(f"LoRA factors of {module!r} differ in shape across models (ranks or "
                     f"bases differ): {[(tuple(a.shape), tuple(b.shape)) for a, b in pairs]}.")
  return jnp.stack([a for a, _ in pairs]), jnp.stack([b for _, b in pairs])


def padded_lora_stack(models: Sequence[Mapping], module: str):
  """``(A [T, L, r, in], B [T, L, out, r])`` of LoRA trees whose ranks may differ (per
  adapter, or per layer through peft's ``rank_pattern``): every layer's factors zero-padded
  to the largest rank (``B A``, its column space and ``Im(B)`` are unchanged), plus
  ``ranks [T, L]`` as a third element when the ranks differ."""
  per_model = []
  for params in models:
    layers = trees.layer_indices(params)
    per_model.append([lora_factors(params, module, layers=[i]) for i in layers])
  r = max(a.shape[1] for model in per_model for a, _ in model)
  ranks = np.asarray([[a.shape[1] for a, _ in model] for model in per_model], np.int32)
  a_all, b_all = [], []
  for model in per_model:
    padded = [pad_rank(b[0], a[0], r) for a, b in model]
    a_all.append(np.stack([np.asarray(a) for _, a in padded]))
    b_all.append(np.stack([np.asarray(b) for b, _ in padded]))
  shapes = {(x.shape, y.shape) for x, y in zip(a_all, b_all)}
  if len(shapes) > 1:
    raise ValueError(f"LoRA factors of {module!r} differ in layers or base shape across models: "
                     f"{sorted(shapes)}; distances need adapters of one base.")
  if len(np.unique(ranks)) == 1:
    return np.stack(a_all), np.stack(b_all)
  return np.stack(a_all), np.stack(b_all), ranks


def module_stacks(models: Sequence[Model], modules: Sequence[str], kind: Optional[str] = None,
                  names: Optional[Sequence[str]] = None) -> Dict[str, object]:
  """``{module: stack}`` the geometry kernels take: LoRA ``(A, B)`` factor stacks
  (``padded_lora_stack``), or dense ``ΔW [T, L, out, in]`` (``stack_full``).

  ``kind`` is ``"lora"`` (every model must carry LoRA) or ``"dense"``; by default LoRA
  when every model carries LoRA factors, dense otherwise (LoRA trees then contribute
  their products B·A). ``names`` label the models in errors.
  """
  if not models:
    raise ValueError("No models given.")
  names = list(names) if names is not None else [f"model {t}" for t in range(len(models))]
  is_lora = [not isinstance(m, (tuple, list)) and lora.has_lora(m) for m in models]
  kind = kind or ("lora" if all(is_lora) else "dense")
  if kind == "lora":
    if not all(is_lora):
      bad = [n for n, ok in zip(names, is_lora) if not ok]
      raise ValueError(f"LoRA distances need LoRA models; these have none: {bad}.")
    return {m: padded_lora_stack(models, m) for m in modules}
  return {m: stack_full(models, m) for m in modules}
