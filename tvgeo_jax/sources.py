"""Fine-tuned models as inputs to the analyses: finetune run directories or peft adapters.

``load_sources`` reads a list of directories — each either a run written by
``experiments.finetune`` (``results.json``) or a peft LoRA adapter
(``adapter_config.json``, e.g. downloaded from the hub) — and ``module_stacks`` turns
them into the ``[tasks, layers, ...]`` stacks the geometry kernels take.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional, Sequence

from tvgeo_jax import lora, task_vectors
from tvgeo_jax.models import EncoderConfig


@dataclasses.dataclass
class Source:
  """One fine-tuned model: its label, method, tree, and (for dense deltas) its base tree."""
  name: str
  method: str                 # "full" | "lora" | "bottleneck"
  params: dict
  config: EncoderConfig
  path: str
  base_model: str
  base_params: Optional[dict] = None


def _is_run(path: str) -> bool:
  from tvgeo_jax import runs
  return os.path.exists(os.path.join(path, runs.RESULTS))


def _is_adapter(path: str) -> bool:
  return os.path.exists(os.path.join(path, "adapter_config.json"))


def load_source(path: str, base: Optional[str] = None, with_base: bool = True) -> Source:
  """Read a run directory or a peft adapter directory.

  ``base`` overrides the adapter's ``base_model_name_or_path`` (a local copy of the
  base for an adapter that names a hub id, when offline).
  """
  from tvgeo_jax import peft_io, runs
  from tvgeo_jax.models import load_pretrained
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path!r} is not a directory (expected a finetune run or a peft "
                            "adapter directory).")
  if _is_run(path):
    run = runs.load_run(path)
    base_params = run.base_params() if with_base and run.method != "lora" else None
    return Source(name=run.task, method=run.method, params=run.params, config=run.model_config,
                  path=run.run_dir, base_model=run.base_model, base_params=base_params)
  if _is_adapter(path):
    cfg = peft_io.read_adapter_config(path)
    base_name = base or cfg.get("base_model_name_or_path")
    if not base_name:
      raise ValueError(f"{path}: adapter_config.json names no base model; pass --base.")
    # The base gets a head shaped like the adapter's saved classifier (if it has one).
    config, base_params = load_pretrained(base_name, num_labels=_adapter_num_labels(path))
    params = peft_io.load_peft(path, base_params, config)
    name = os.path.basename(os.path.normpath(path))
    return Source(name=name, method="lora", params=params, config=config,
                  path=os.path.abspath(path), base_model=base_name)
  raise ValueError(f"{path!r} is neither a finetune run (results.json) nor a peft adapter "
                   "(adapter_config.json). A run still in progress has no results.json yet: "
                   "rerun its finetune command to finish it.")


def _adapter_num_labels(path: str) -> Optional[int]:
  """Rows of the adapter's saved classifier output layer; None if it saved no head."""
  from safetensors import safe_open
  with safe_open(os.path.join(path, "adapter_model.safetensors"), "numpy") as f:
    for k in f.keys():
      if k.endswith("out_proj.weight") or k.endswith("classifier.weight"):
        return int(f.get_slice(k).get_shape()[0])
  return None


def expand_paths(patterns: Sequence[str]) -> List[str]:
  """Expand shell-style globs (sorted); a pattern matching nothing is an error."""
  import glob
  paths = []
  for p in patterns:
    hits = sorted(glob.glob(p))
    if not hits:
      raise ValueError(f"--runs: nothing matches {p!r}; pass run or adapter directories.")
    paths.extend(hits)
  return paths


def load_sources(paths: Sequence[str], base: Optional[str] = None,
                 with_base: bool = True) -> List[Source]:
  """Load several sources; names are made unique (``task``, ``task#2`` …)."""
  sources = [load_source(p, base=base, with_base=with_base) for p in paths]
  seen: Dict[str, int] = {}
  for s in sources:
    seen[s.name] = seen.get(s.name, 0) + 1
    if seen[s.name] > 1:
      s.name = f"{s.name}#{seen[s.name]}"
  return sources


def check_same_shapes(sources: Sequence[Source]) -> None:
  """All sources must share one base architecture; name the odd one out."""
  ref = sources[0].config
  keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads")
  for s in sources[1:]:
    diff = {k: (getattr(ref, k), getattr(s.config, k)) for k in keys
            if getattr(ref, k) != getattr(s.config, k)}
    if diff:
      raise ValueError(f"{s.path} has another base shape than {sources[0].path}: "
                       + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in diff.items())
                       + ". Distances need models fine-tuned from the same base.")


def _lora_module_stack(params_list, module: str):
  """``(A [T, L, r, in], B [T, L, out, r], ranks [T, L])``: every layer's factors zero-padded
  to the largest rank (peft's ``rank_pattern`` and ``--lora_rank`` runs mix ranks; ``B A``,
  its column space and ``Im(B)`` are unchanged by the padding)."""
  import numpy as np
  from tvgeo_jax import trees
  from tvgeo_jax.geometry import pad_rank
  per_model = []
  for params in params_list:
    layers = trees.layer_indices(params)
    per_model.append([task_vectors.lora_factors(params, module, layers=[i]) for i in layers])
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


def module_stacks(sources: Sequence[Source], modules: Sequence[str],
                  kind: Optional[str] = None) -> Dict[str, object]:
  """``{module: stack}``: LoRA ``(A, B)`` factor stacks, or dense ``ΔW [T, L, out, in]``.

  ``kind`` is ``"lora"`` (all sources must carry LoRA) or ``"dense"``; by default
  LoRA when every source carries LoRA factors, dense otherwise (LoRA trees then
  contribute their products B·A). Adapters of different ranks (per adapter, or
  per layer through peft's ``rank_pattern``) give ``(A, B, ranks [T, L])`` with
  the factors zero-padded to the largest rank.
  """
  if not sources:
    raise ValueError("No models given.")
  check_same_shapes(sources)
  all_lora = all(lora.has_lora(s.params) for s in sources)
  kind = kind or ("lora" if all_lora else "dense")
  if kind == "lora":
    if not all_lora:
      bad = [s.path for s in sources if not lora.has_lora(s.params)]
      raise ValueError(f"LoRA distances need LoRA models; these have none: {bad}.")
    return {m: _lora_module_stack([s.params for s in sources], m) for m in modules}
  models = []
  for s in sources:
    if lora.has_lora(s.params):
      models.append(s.params)
    elif s.base_params is None:
      raise ValueError(f"{s.path}: a dense task vector needs the base model's weights.")
    else:
      models.append((s.params, s.base_params))
  return {m: task_vectors.stack_full(models, m) for m in modules}
