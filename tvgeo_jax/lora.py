"""LoRA as parameter-tree transforms: inject, merge, inspect, count.

LoRA is not a model class here but a property of the tree. A targeted module
dict (a ``Dense`` of ``tvgeo_jax.models.encoder``, e.g.
``params['encoder']['layer_3']['query']``) gains three leaves beside its frozen
``kernel (in, out)`` and ``bias``::

  lora_a      (in, r)   float32, random at init
  lora_b      (r, out)  float32, zero at init
  lora_scale  ()        float32 constant: alpha / r (alpha / sqrt(r) with rsLoRA)

and the encoder computes ``x·W + b + scale·(x·A)·B`` without forming
``W + ΔW``. Layouts relative to peft / PyTorch (``nn.Linear.weight`` is
``(out, in)``)::

  peft lora_A.weight (r, in)   = lora_a.T
  peft lora_B.weight (out, r)  = lora_b.T
  ΔW_torch = scale·B·A (out, in) = (scale · lora_a @ lora_b).T = ΔW_flax.T

Training only the factors (plus the classification head, as peft's
``modules_to_save`` does for sequence classification) goes through
``tvgeo_jax.partition`` with ``method="lora"``; ``lora_scale`` is never
trainable (not a float leaf the partition trains, and not counted).
"""
from __future__ import annotations

import math
import re
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from tvgeo_jax import partition, trees

Path = Tuple[str, ...]
Targets = Union[str, Sequence[str], Callable[[Path], bool]]

LORA_LEAVES = ("lora_a", "lora_b", "lora_scale")
INITS = ("peft", "gaussian")


def has_lora(params) -> bool:
  """True if any leaf of the tree is a LoRA factor."""
  return any(getattr(p[-1], "key", None) == "lora_a"
             for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])


def _dense_modules(params: Mapping) -> List[Path]:
  """Paths of every module dict that holds a 2-D ``kernel`` (sorted)."""
  return sorted(p[:-1] for p, v in trees.flatten(params).items()
                if p[-1] == "kernel" and np.ndim(v) == 2)


def lora_paths(params: Mapping) -> List[Path]:
  """Paths of the module dicts that carry LoRA factors, sorted."""
  return sorted(p[:-1] for p in trees.flatten(params) if p[-1] == "lora_a")


def _target_names(targets: Targets) -> Tuple[str, ...]:
  """The module names of a name-based ``targets`` (none for a predicate)."""
  if callable(targets):
    return ()
  return (targets,) if isinstance(targets, str) else tuple(targets)


def _target_predicate(targets: Targets) -> Callable[[Path], bool]:
  """Module names (``"query"``, or a path suffix ``"layer_3/query"``) or a predicate."""
  if callable(targets):
    return targets
  names = _target_names(targets)
  if not names or not all(isinstance(n, str) and n for n in names):
    raise ValueError(f"targets must be module names or a predicate on paths, got {targets!r}.")

  def match(path: Path) -> bool:
    s = trees.path_str(path)
    return any(s == n or s.endswith("/" + n) for n in names)
  return match


def pattern_value(patterns: Optional[Mapping[str, float]], path: Path, default):
  """peft's rank/alpha pattern rule on our "/"-joined paths.

  A pattern (a regular expression) applies to a module when it matches a
  "/"-aligned suffix of the path, as ``peft.utils.other.get_pattern_key``
  does on "."-joined names: ``"query"`` hits every query, ``"layer_3/query"``
  one module. The first matching pattern wins; otherwise ``default``.
  """
  s = trees.path_str(path)
  for key, value in (patterns or {}).items():
    if re.match(rf"(.*/)?({key})$", s):
      return value
  return default


def lora_scale_value(alpha: float, rank: int, use_rslora: bool = False) -> float:
  """alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA (as peft)."""
  return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _init_a(key, fan_in: int, rank: int, init: str) -> np.ndarray:
  """A in our (in, r) layout, distributed like peft's lora_A.weight (r, in)."""
  if init == "peft":
    # torch.nn.init.kaiming_uniform_(W, a=sqrt(5)) on W (r, in): gain = sqrt(2 / (1 + 5)),
    # bound = gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in), fan_in = in.
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(key, (fan_in, rank), jnp.float32, -bound, bound)
  else:  # "gaussian": peft's nn.init.normal_(W, std=1 / r)
    a = jax.random.normal(key, (fan_in, rank), jnp.float32) / rank
  return np.asarray(a, dtype=np.float32)


def inject_lora(params: Mapping, *, targets: Targets = ("query", "value"), rank: int = 8,
                alpha: float = 16.0, seed: int = 0,
                rank_pattern: Optional[Mapping[str, int]] = None,
                alpha_pattern: Optional[Mapping[str, float]] = None,
                init: str = "peft", use_rslora: bool = False) -> dict:
  """A copy of ``params`` in which every targeted dense module carries LoRA factors.

  Args:
    params: a plain tree (base weights stay as they are and are shared, not copied).
    targets: module names matched against the end of a module's path
      (``"query"`` hits ``encoder/layer_i/query`` for every i; ``"layer_0/query"``
      one module), or a predicate ``fn(path_tuple) -> bool`` on module paths.
    rank, alpha: the default rank r and alpha; ``lora_scale = alpha / r``.
    seed: seeds A (module k uses ``fold_in(PRNGKey(seed), k)`` in sorted path order).
    rank_pattern, alpha_pattern: ``{regex: value}`` overrides per module, matched
      on "/"-joined path suffixes like peft matches "."-joined names.
    init: ``"peft"`` (default; peft's ``init_lora_weights=True``: A ~ kaiming-uniform
      with a=sqrt(5) on the (r, in) weight, i.e. U(-1/sqrt(in), 1/sqrt(in)), B = 0)
      or ``"gaussian"`` (A ~ N(0, 1/r²), B = 0, peft's ``"gaussian"``).
    use_rslora: scale alpha / sqrt(r) instead of alpha / r.

  Returns:
    A new tree; untouched sub-trees are shared with ``params``.

  Raises:
    ValueError: unknown init, rank <= 0, no module matched, or a module that
      already carries LoRA.
  """
  if init not in INITS:
    raise ValueError(f"Unknown LoRA init {init!r}; choose one of {INITS}.")
  match = _target_predicate(targets)
  dense = _dense_modules(params)
  modules = [p for p in dense if match(p)]
  names = sorted({p[-1] for p in dense})
  if not modules:
    raise ValueError(
        f"LoRA targets {targets!r} matched no dense module. Module names in this tree: "
        f"{names} (e.g. targets=('query', 'value')).")
  # A misspelt name beside a valid one would otherwise be dropped without a word.
  unmatched = [n for n in _target_names(targets)
               if not any(_target_predicate((n,))(p) for p in dense)]
  if unmatched:
    raise ValueError(
        f"LoRA target(s) {unmatched} match no dense module (module names in this tree: "
        f"{names}); fix the spelling in --lora_targets.")
  base_key = jax.random.PRNGKey(seed)
  out = _copy_dicts(params)
  for k, path in enumerate(modules):
    module = trees.get_path(out, path)
    if "lora_a" in module:
      raise ValueError(f"{trees.path_str(path)} already carries LoRA factors; "
                       "merge_lora(params) first or inject into the base tree.")
    r = pattern_value(rank_pattern, path, rank)
    a_ = pattern_value(alpha_pattern, path, alpha)
    if not isinstance(r, (int, np.integer)) or r <= 0:
      raise ValueError(f"LoRA rank must be a positive integer, got {r!r} for "
                       f"{trees.path_str(path)}.")
    fan_in, fan_out = np.shape(module["kernel"])
    module["lora_a"] = _init_a(jax.random.fold_in(base_key, k), fan_in, int(r), init)
    module["lora_b"] = np.zeros((int(r), fan_out), np.float32)
    module["lora_scale"] = np.asarray(lora_scale_value(float(a_), int(r), use_rslora),
                                      np.float32)
  return out


def _copy_dicts(tree):
  """Copy the dict structure (leaves shared) so in-place edits don't leak."""
  if isinstance(tree, Mapping):
    return {k: _copy_dicts(v) for k, v in tree.items()}
  return tree


def delta_kernel(module: Mapping) -> jax.Array:
  """``scale · lora_a @ lora_b``: the LoRA update of one module, Flax layout (in, out)."""
  return module["lora_scale"] * jnp.matmul(module["lora_a"], module["lora_b"],
                                           precision=jax.lax.Precision.HIGHEST)


def merge_lora(params: Mapping) -> dict:
  """Fold every LoRA update into its kernel: ``W + scale·A·B``; drop the LoRA leaves.

  The result is a plain tree the encoder runs without LoRA and that
  ``tvgeo_jax.models.save_pretrained`` exports as an ordinary checkpoint.
  """
  out = _copy_dicts(params)
  for path in lora_paths(params):
    module = trees.get_path(out, path)
    merged = jnp.asarray(module["kernel"], jnp.float32) + delta_kernel(module)
    module["kernel"] = merged if isinstance(module["kernel"], jax.Array) else np.asarray(merged)
    for leaf in LORA_LEAVES:
      module.pop(leaf, None)
  return out


def strip_lora(params: Mapping) -> dict:
  """The base tree: LoRA leaves dropped, kernels untouched."""
  out = _copy_dicts(params)
  for path in lora_paths(params):
    module = trees.get_path(out, path)
    for leaf in LORA_LEAVES:
      module.pop(leaf, None)
  return out


def lora_ranks(params: Mapping) -> Dict[Path, int]:
  """{module path: rank} for every LoRA module."""
  return {p: int(np.shape(trees.get_path(params, p)["lora_a"])[1]) for p in lora_paths(params)}


def count_parameters(params: Mapping) -> Tuple[int, int]:
  """(trainable, total) for LoRA training: ``partition.count_parameters(params, "lora")``.

  Trainable = the LoRA factors + the classification head; total = every scalar
  of the tree (base + factors + head), ``lora_scale`` excluded.
  """
  return partition.count_parameters(params, "lora")


def peft_parameter_counts(params: Mapping) -> Tuple[int, int]:
  """(trainable, all) as peft's ``get_nb_trainable_parameters()`` reports them.

  peft keeps the original head and a trainable copy of it
  (``modules_to_save``), so its "all" counts the head twice:
  ``all = total + head``, with ``(trainable, total) = count_parameters(params)``.
  Papers that quote peft's numbers (e.g. paper D's 82,807,304) use this "all".
  """
  trainable, total = count_parameters(params)
  mask = partition.trainable_mask(params, "lora")
  head = sum(int(np.size(v)) for p, v in trees.flatten(params).items()
             if trees.get_path(mask, p) and p[-1] not in LORA_LEAVES)
  return trainable, total + head
