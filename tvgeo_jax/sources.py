"""Fine-tuned models as inputs to the analyses: finetune run directories or peft adapters.

``load_sources`` reads a list of directories — each either a run written by
``experiments.finetune`` (``results.json``) or a peft LoRA adapter
(``adapter_config.json``, e.g. downloaded from the hub) — checks that they share one
base (``tvgeo_jax.fingerprint``), and ``module_stacks`` turns them into the
``[tasks, layers, ...]`` stacks the geometry kernels take. ``load_pool`` reads a pool
manifest (a text file of directories or hub adapter ids) and skips, with a warning,
the models of another base.

Base fingerprints: a run stores its own (``results.json``); a run written before
fingerprints gets one computed on load (LoRA: from its frozen leaves, exact; full
fine-tuning / bottleneck: from the base its results.json names, reloaded); a peft
adapter gets its base's, computed once per base.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import logging
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from tvgeo_jax import fingerprint, lora, task_vectors
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
  base_fingerprint: Optional[str] = None   # tvgeo_jax.fingerprint of the base (None: unknown)


def _is_run(path: str) -> bool:
  from tvgeo_jax import runs
  return os.path.exists(os.path.join(path, runs.RESULTS))


def _is_adapter(path: str) -> bool:
  return os.path.exists(os.path.join(path, "adapter_config.json"))


# (base name, num_labels) -> (config, base tree, fingerprint): one load per base.
BaseCache = Dict[Tuple[str, Optional[int]], Tuple[EncoderConfig, dict, str]]


def _load_base(name: str, num_labels: Optional[int], cache: Optional[BaseCache]):
  from tvgeo_jax.models import load_pretrained
  key = (name, num_labels)
  if cache is None or key not in cache:
    config, params = load_pretrained(name, num_labels=num_labels)
    entry = (config, params, fingerprint.base_fingerprint(params, config))
    if cache is None:
      return entry
    cache[key] = entry
  return cache[key]


def load_source(path: str, base: Optional[str] = None, with_base: bool = True,
                name: Optional[str] = None, base_cache: Optional[BaseCache] = None) -> Source:
  """Read a run directory or a peft adapter directory.

  ``base`` overrides the adapter's ``base_model_name_or_path`` (a local copy of the
  base for an adapter that names a hub id, when offline). ``name`` labels the model
  (default: a run's task, an adapter's directory name).
  """
  from tvgeo_jax import peft_io, runs
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path!r} is not a directory (expected a finetune run or a peft "
                            "adapter directory).")
  if _is_run(path):
    run = runs.load_run(path)
    base_params = run.base_params() if with_base and run.method != "lora" else None
    fp, recomputed = run.base_fingerprint(base_params)
    if recomputed:
      logging.info("%s: no base_fingerprint in results.json (an older run); computed from %s.",
                   path, "its frozen leaves" if run.method == "lora" else "its base, reloaded")
    return Source(name=name or run.task, method=run.method, params=run.params,
                  config=run.model_config, path=run.run_dir, base_model=run.base_model,
                  base_params=base_params, base_fingerprint=fp)
  if _is_adapter(path):
    cfg = peft_io.read_adapter_config(path)
    base_name = base or cfg.get("base_model_name_or_path")
    if not base_name:
      raise ValueError(f"{path}: adapter_config.json names no base model; pass --base.")
    # The base gets a head shaped like the adapter's saved classifier (if it has one).
    config, base_params, fp = _load_base(base_name, peft_io.adapter_num_labels(path),
                                         base_cache)
    params = peft_io.load_peft(path, base_params, config)
    return Source(name=name or os.path.basename(os.path.normpath(path)), method="lora",
                  params=params, config=config, path=os.path.abspath(path),
                  base_model=base_name, base_fingerprint=fp)
  raise ValueError(f"{path!r} is neither a finetune run (results.json) nor a peft adapter "
                   "(adapter_config.json). A run still in progress has no results.json yet: "
                   "rerun its finetune command to finish it.")


def expand_paths(patterns: Sequence[str]) -> List[str]:
  """Expand shell-style globs (sorted); an existing path is taken literally (its name may
  hold ``[``, ``*`` or ``?``); a pattern matching nothing is an error."""
  paths = []
  for p in patterns:
    hits = [p] if os.path.exists(p) else sorted(glob.glob(p))
    if not hits:
      raise ValueError(f"--runs: nothing matches {p!r}; pass run or adapter directories (a "
                       "path with a comma: list it in a --runs_file manifest).")
    paths.extend(hits)
  return paths


def _unique_names(sources: Sequence[Source]) -> None:
  seen: Dict[str, int] = {}
  for s in sources:
    seen[s.name] = seen.get(s.name, 0) + 1
    if seen[s.name] > 1:
      s.name = f"{s.name}#{seen[s.name]}"


def load_sources(paths: Sequence[str], base: Optional[str] = None, with_base: bool = True,
                 allow_different_bases: bool = False) -> List[Source]:
  """Load several sources of one base; names are made unique (``task``, ``task#2`` …).

  Raises ValueError naming the models when their bases differ (a warning with
  ``allow_different_bases``).
  """
  cache: BaseCache = {}
  sources = [load_source(p, base=base, with_base=with_base, base_cache=cache) for p in paths]
  _unique_names(sources)
  check_same_base(sources, allow_different=allow_different_bases)
  return sources


def _describe(group: Sequence[Source]) -> str:
  names = ", ".join(s.path for s in group[:4]) + (f" +{len(group) - 4}" if len(group) > 4 else "")
  s = group[0]
  return (f"[{names}] on {s.base_model} ({s.config.model_type}, base "
          f"{fingerprint.short(s.base_fingerprint)})")


def check_same_base(sources: Sequence[Source], allow_different: bool = False) -> None:
  """All sources must share one base (architecture and weights): their fingerprints."""
  groups: Dict[str, List[Source]] = collections.defaultdict(list)
  for s in sources:
    if s.base_fingerprint is not None:
      groups[s.base_fingerprint].append(s)
  if len(groups) < 2:
    return
  listed = sorted(groups.values(), key=len, reverse=True)
  msg = (f"The models have {len(groups)} different bases: "
         + " vs ".join(_describe(g) for g in listed)
         + ". Task vectors are comparable only on one base")
  if not allow_different:
    raise ValueError(msg + ": pass models fine-tuned from the same base weights, or "
                     "--allow_different_bases to compute anyway.")
  logging.warning("%s; computing anyway (--allow_different_bases).", msg)


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


# --- pools: manifests of runs and adapters ---------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def read_manifest(path: str) -> List[str]:
  """Entries of a pool manifest: one run/adapter directory or hub adapter id per line.

  Blank lines and ``#`` comments (a line starting with ``#``, or `` #`` after an
  entry) are skipped; entries are literal (no globs, commas allowed); relative
  directories are relative to the manifest's folder.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--runs_file {path!r} is not a file; write one run or adapter "
                            "directory (or hub adapter id) per line.")
  home = os.path.dirname(os.path.abspath(path))
  entries = []
  with open(path) as f:
    for line in f:
      entry = re.split(r"(?:^|\s)#", line.rstrip("\n"), maxsplit=1)[0].strip()
      if not entry:
        continue
      local = os.path.join(home, os.path.expanduser(entry))
      looks_local = (os.path.exists(local) or not _HUB_ID.match(entry)
                     or os.path.isdir(os.path.join(home, entry.split("/")[0])))
      entries.append(local if looks_local else entry)
  if not entries:
    raise ValueError(f"--runs_file {path!r} lists no models.")
  return entries


def _entry_path(entry: str) -> Tuple[str, Optional[str]]:
  """(local directory, label) of a manifest entry; a hub id is read from the hub cache
  and labelled by its name (a local entry by load_source's default)."""
  if os.path.exists(entry) or not _HUB_ID.match(entry):
    return entry, None
  from tvgeo_jax import hub, peft_io
  path = hub.snapshot(entry, kind="model",
                      allow_patterns=[peft_io.CONFIG_FILE, peft_io.WEIGHTS_FILE,
                                      peft_io.LEGACY_WEIGHTS_FILE],
                      missing=lambda p: None if _is_adapter(p) else peft_io.CONFIG_FILE)
  return path, entry.rsplit("/", 1)[-1]


def _declared_base(path: str) -> Optional[str]:
  from tvgeo_jax import peft_io
  return peft_io.read_adapter_config(path).get("base_model_name_or_path") if (
      not _is_run(path) and _is_adapter(path)) else None


def _base_mismatch(path: str, source: Optional[Source], ref: str, base: Optional[str],
                   cache: BaseCache) -> Optional[str]:
  """Why the model at ``path`` is not on the pool's base (fingerprint ``ref``), or None."""
  declared = _declared_base(path)
  if source is not None and source.base_fingerprint != ref:
    return f"base {fingerprint.short(source.base_fingerprint)} ({source.base_model})"
  if declared is None or base is None or declared == base:
    return None
  try:  # the adapter's own base, when it is available offline
    _, _, fp = _load_base(declared, None, cache)
  except (OSError, ValueError, RuntimeError) as e:
    same = (os.path.basename(os.path.normpath(declared)).lower()
            == os.path.basename(os.path.normpath(base)).lower())
    logging.info("%s: base %r not available to fingerprint (%s); matched by name: %s.",
                 path, declared, type(e).__name__, same)
    return None if same else f"declared base {declared!r} (not available to compare weights)"
  return None if fp == ref else f"declared base {declared!r} ({fingerprint.short(fp)})"


def load_pool(manifest: str, base: Optional[str] = None, with_base: bool = True,
              strict: bool = False) -> List[Source]:
  """The models a manifest lists that share the pool's base; the others are skipped.

  The pool's base is ``base`` (its fingerprint) when given, else the fingerprint most
  models share. An adapter is on it when its declared base has that fingerprint (the
  declared base available offline) or, if not available, the same name as ``base``;
  one that does not fit ``base`` at all (shapes, keys) is off it too. Skipped models
  are named in a warning; ``strict`` refuses the pool instead (ValueError).
  """
  from tvgeo_jax import peft_io
  cache: BaseCache = {}
  loaded: List[Tuple[str, Optional[Source], Optional[str]]] = []
  for entry in read_manifest(manifest):
    path, label = _entry_path(entry)
    try:
      loaded.append((path, load_source(path, base=base, with_base=with_base, name=label,
                                       base_cache=cache), None))
    except peft_io.BaseMismatchError:  # an adapter that does not fit this base
      loaded.append((path, None, f"its weights do not fit {base!r} (declared base "
                                 f"{_declared_base(path)!r})"))
  if base is not None:
    ref = _load_base(base, None, cache)[2]
  else:
    counts = collections.Counter(s.base_fingerprint for _, s, _ in loaded if s is not None)
    if not counts:
      raise ValueError(f"--runs_file {manifest!r}: no model could be loaded.")
    ref = counts.most_common(1)[0][0]
  kept, skipped = [], []
  for path, source, error in loaded:
    why = error or _base_mismatch(path, source, ref, base, cache)
    (skipped.append(f"{path}: {why}") if why else kept.append(source))
  if skipped:
    msg = (f"{len(skipped)} of {len(loaded)} models in {manifest!r} are not on the pool's base "
           f"({base or 'the most common one'}, {fingerprint.short(ref)}): " + "; ".join(skipped))
    if strict:
      raise ValueError(msg[:2000] + " (drop them from the manifest, or leave out --strict to "
                       "skip them).")
    logging.warning("%s. Skipped.", msg)
  if not kept:
    raise ValueError(f"--runs_file {manifest!r}: none of its models is on the base {base!r}.")
  _unique_names(kept)
  return kept


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
