"""What every merge shares: leaf selection, input checks, LoRA-folded leaves, heads.

Conventions (see BUILD_NOTES.md):

* A model is a plain nested dict. Heads (top-level ``HEAD_MODULES``:
  ``classifier``, ``pooler``, ``mlm_head``) are never merged: the merged tree takes
  the head of one model (``head_from``), normally the task being scored.
* LoRA trees (``lora_a``, ``lora_b``, ``lora_scale`` beside a frozen ``kernel``)
  are compared through their *effective* kernels ``W + scale·A·B``
  (``tvgeo_jax.adapters.lora.delta_kernel``). Their task vector lives only on the
  LoRA-carrying kernels; every other non-head leaf is frozen and must equal the
  base (checked: "different bases" error).
* ``modules`` selects the merged leaves: ``None`` (every non-head leaf; for LoRA
  inputs every LoRA-carrying kernel), module names matched as suffixes of the
  module path (``"query"``, ``"layer_3/query"``, same rule as LoRA targets), or a
  predicate on the full leaf path (``("encoder", "layer_3", "query", "kernel")``).
  Unselected leaves are copied from a template (the base for task-vector
  methods, the first model for averaging methods).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from tvgeo_jax.adapters import lora
from tvgeo_jax.adapters.leaves import HEAD_MODULES, is_adapter_path, is_head, is_lora_leaf
from tvgeo_jax.core import trees

Path = Tuple[str, ...]
Modules = Union[None, str, Sequence[str], Callable[[Path], bool]]
HeadFrom = Union[None, int, Mapping]

# Largest |difference| tolerated between frozen leaves that must be identical
# (the frozen base under LoRA models). Bit-identical copies give 0.
BASE_ATOL = 1e-6


def selector(modules: Modules) -> Callable[[Path], bool]:
  """A predicate on leaf paths from the ``modules`` argument (heads never match)."""
  if modules is None:
    return lambda path: not is_head(path)
  if callable(modules):
    return lambda path: not is_head(path) and bool(modules(path))
  names = (modules,) if isinstance(modules, str) else tuple(modules)
  if not names or not all(isinstance(n, str) and n for n in names):
    raise ValueError(f"modules must be None, module names or a predicate on leaf paths, "
                     f"got {modules!r}.")
  heads = [n for n in names if n.split("/")[0] in HEAD_MODULES]
  if heads:
    raise ValueError(f"Heads {heads} are never merged; each merged model takes the head of "
                     f"the task being scored (head_from=... or with_head()).")

  def match(path: Path) -> bool:
    module = trees.path_str(path[:-1])
    return not is_head(path) and any(module == n or module.endswith("/" + n) for n in names)
  return match


def check_models(models: Sequence[Mapping], what: str) -> List[Mapping]:
  models = list(models) if models is not None else []
  if not models:
    raise ValueError(f"{what} needs at least one model; got an empty list.")
  for i, m in enumerate(models):
    if not isinstance(m, Mapping):
      raise ValueError(f"{what}: model {i} is a {type(m).__name__}, not a parameter tree "
                       "(nested dict).")
  return models


def check_weights(weights: Optional[Sequence[float]], n: int, what: str) -> np.ndarray:
  """Per-model weights; ``None`` means uniform ``1/n``."""
  if weights is None:
    return np.full(n, 1.0 / n)
  w = np.asarray(weights, np.float64).reshape(-1)
  if w.shape != (n,) or not np.all(np.isfinite(w)):
    raise ValueError(f"{what}: weights must be {n} finite numbers (one per model), "
                     f"got {weights!r}.")
  return w


def check_lam(lam, n: int, what: str) -> np.ndarray:
  """λ as one number per model (a scalar is broadcast)."""
  lam_arr = np.asarray(lam, np.float64)
  if lam_arr.ndim == 0:
    lam_arr = np.full(n, float(lam_arr))
  if lam_arr.shape != (n,) or not np.all(np.isfinite(lam_arr)):
    raise ValueError(f"{what}: lam must be a finite number or {n} numbers, got {lam!r}.")
  return lam_arr


def body(tree: Mapping) -> Dict[Path, object]:
  """Non-head, non-LoRA leaves ``{path: leaf}``: the shape every model must share."""
  return {p: v for p, v in trees.flatten(tree).items() if not is_head(p) and not is_lora_leaf(p)}


def lora_modules(tree: Mapping) -> set:
  return set(lora.lora_paths(tree))


def check_same_body(models: Sequence[Mapping], base: Optional[Mapping], what: str) -> None:
  """Same non-head leaf paths and shapes in every model (and the base)."""
  named = ([("base", base)] if base is not None else []) + [
      (f"model {i}", m) for i, m in enumerate(models)]
  ref_name, ref = named[0]
  ref_shapes = {p: np.shape(v) for p, v in body(ref).items()}
  # Bottleneck adapters start from zero: a base without them still matches their models.
  no_adapters = base is not None and not any(is_adapter_path(p) for p in ref_shapes)
  for name, tree in named[1:]:
    shapes = {p: np.shape(v) for p, v in body(tree).items()
              if not (no_adapters and is_adapter_path(p))}
    missing = sorted(set(ref_shapes) - set(shapes))
    extra = sorted(set(shapes) - set(ref_shapes))
    if missing or extra:
      p = (missing or extra)[0]
      raise ValueError(f"{what}: {name} and {ref_name} have different trees: "
                       f"{trees.path_str(p)} is in {ref_name if missing else name} only. "
                       "Merge models of the same architecture.")
    for p, s in shapes.items():
      if s != ref_shapes[p]:
        raise ValueError(f"{what}: {trees.path_str(p)} has shape {s} in {name} but "
                         f"{ref_shapes[p]} in {ref_name}. Merge models of the same "
                         "architecture.")


@jax.jit
def _max_abs_diffs(a: Dict[str, jax.Array], b: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
  return {k: jnp.max(jnp.abs(a[k].astype(jnp.float32) - b[k].astype(jnp.float32)), initial=0.0)
          for k in a}


def check_same_base(models: Sequence[Mapping], base: Optional[Mapping], what: str) -> None:
  """LoRA models keep their base frozen: every non-head, non-LoRA leaf must match."""
  lora_models = [(i, m) for i, m in enumerate(models) if lora.has_lora(m)]
  if not lora_models:
    return
  ref_name, ref = ("base", base) if base is not None else (f"model {lora_models[0][0]}",
                                                           lora_models[0][1])
  ref_body = {trees.path_str(p): v for p, v in body(ref).items()}
  for i, m in lora_models:
    diffs = _max_abs_diffs({trees.path_str(p): v for p, v in body(m).items()}, ref_body)
    for name, diff in sorted(diffs.items()):
      if not float(diff) <= BASE_ATOL:
        raise ValueError(f"{what}: model {i} and {ref_name} have different frozen bases: "
                         f"{name} differs by up to {float(diff):.3g}. LoRA adapters merge "
                         "only over the same pretrained model; pass that model's tree as "
                         "the base.")


def check_inputs(models, base: Optional[Mapping], what: str) -> List[Mapping]:
  models = check_models(models, what)
  if base is not None:
    if not isinstance(base, Mapping):
      raise ValueError(f"{what}: base must be a parameter tree, got {type(base).__name__}.")
    if lora.has_lora(base):
      raise ValueError(f"{what}: the base carries LoRA leaves; pass the pretrained tree "
                       "(tvgeo_jax.adapters.lora.strip_lora(model) gives it).")
  check_same_body(models, base, what)
  check_same_base(models, base, what)
  return models


def selected_paths(models: Sequence[Mapping], modules: Modules, what: str) -> List[Path]:
  """Sorted effective-leaf paths to merge (LoRA inputs: their LoRA-carrying kernels)."""
  keep = selector(modules)
  paths = sorted(body(models[0]))
  carried = set().union(*(lora_modules(m) for m in models))
  if carried:
    paths = [p for p in paths if p[-1] == "kernel" and p[:-1] in carried]
  paths = [p for p in paths if keep(p)]
  if not paths:
    raise ValueError(f"{what}: modules={modules!r} selects no mergeable leaf "
                     f"(LoRA modules: {sorted(trees.path_str(p) for p in carried)[:4]}...). "
                     "Pick module names present in the tree, e.g. ('query', 'value').")
  return paths


def effective_leaf(model: Mapping, path: Path) -> jnp.ndarray:
  """The leaf as the forward pass sees it: a kernel with its LoRA update folded in."""
  if path[-1] == "kernel":
    return lora.effective_kernel(trees.get_path(model, path[:-1]))
  return jnp.asarray(trees.get_path(model, path), jnp.float32)


def head_tree(models: Sequence[Mapping], head_from: HeadFrom) -> Dict[Path, object]:
  """``{path: leaf}`` of the head the merged model carries (``{}`` for none)."""
  if head_from is None:
    return {}
  if isinstance(head_from, Mapping):
    src = head_from
  elif isinstance(head_from, (int, np.integer)) and not isinstance(head_from, bool):
    if not -len(models) <= head_from < len(models):
      raise ValueError(f"head_from={head_from} is not an index into the {len(models)} models.")
    src = models[head_from]
  else:
    raise ValueError("head_from must be None, a model index or a parameter tree, "
                     f"got {type(head_from).__name__}.")
  return {p: v for p, v in trees.flatten(src).items() if is_head(p)}


def assemble(template: Mapping, replaced: Mapping[Path, object], head: Mapping[Path, object],
             drop_lora: Sequence[Path] = ()) -> dict:
  """The merged tree: the template's body, ``replaced`` leaves, LoRA leaves of the
  modules in ``drop_lora`` removed, and ``head`` as the only head."""
  drop = set(drop_lora)
  flat = {p: v for p, v in trees.flatten(template).items()
          if not is_head(p) and not (is_lora_leaf(p) and p[:-1] in drop)}
  for p, v in replaced.items():
    dtype = getattr(flat.get(p), "dtype", jnp.float32)
    flat[p] = jnp.asarray(v).astype(dtype)
  flat.update(head)
  return trees.unflatten(flat)


def with_head(merged: Mapping, task_params: Mapping) -> dict:
  """``merged`` with its head replaced by the head of ``task_params`` (the task scored)."""
  return assemble(merged, {}, head_tree([task_params], 0))
