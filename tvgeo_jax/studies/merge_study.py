"""The merge/interference study on saved runs (paper A section 3.2 and Table 3; paper C).

Inputs are finished fine-tuning runs (``tvgeo_jax.studies.sources.load_sources``); nothing is
retrained. Every score comes from ``tvgeo_jax.evaluation`` on the task's *test* split.

Pairs (paper A):
  * ``merge_grid``: for every ordered pair (i, j), i ≠ j, ``merge(i, j)`` with task i's
    head, scored on task i (the merges of one task are scored as one stacked batch);
    single-task scores ``score_i(model_i)`` are **re-evaluated** with the same code (so
    δ compares like with like; ``results.json``'s value is reported beside it);
    ``δ = interference.delta_matrix`` (diagonal NaN).
  * ``interference_tables``: ``T̄_d(i, j)`` for metrics l2/cosine/grassmann (Grassmann
    only for LoRA, or dense with ``top_k``), per module, over all layers and layers
    k..L ("k+", 1-indexed) for every k; Spearman tables per (module, metric, range)
    with ``interference.spearman_table`` (NaN rows reported); summary mean (std) over
    tasks = Table 3.
Paper C analyses:
  * ``sign_conflicts``: share of entries with a sign conflict vs the number of merged
    task vectors (after top-k trimming), ``merging.sign_conflict_share``.
  * ``topk_sweep``: score of task i with only the top-k fraction of its task vector.
  * ``multitask``: merges of n = 2..T tasks with each method; the subsets are the
    prefixes of one seeded permutation of the tasks (n = T: all tasks). Reported:
    the mean over the merged tasks of the score, and of the normalised score
    ``score_i(merge) / score_i(model_i)`` (NaN where the single score is 0);
    ``multitask_methods=["all"]`` compares every method of ``REGISTRY`` that applies
    (``multitask.md``), each with its study defaults (the pair method with its options).

Methods: ``REGISTRY`` names each merge's function in ``tvgeo_jax.merging``, its
options and study defaults (``dare``/``dare_ties``: ``drop_rate=0.5``); ``lora_svd`` is
peft's ``svd`` (``lora_product_average`` re-factorised to the adapters' rank).

Score: ``score="main"`` (the task's main metric, default), any scalar metric name
(``"accuracy"``, ``"loss"``...) or ``"neg_loss"`` (−loss, higher is better). Every
evaluation stores all scalar metrics in a JSON cache, so the score can be changed
without re-evaluating, and a rerun (after a crash) skips everything already scored.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import matplotlib
import numpy as np

from tvgeo_jax import evaluation, merging
from tvgeo_jax.studies import evidence, interference, sources
from tvgeo_jax.core import io_utils, trees
from tvgeo_jax.adapters import lora
from tvgeo_jax.models import fingerprint
from tvgeo_jax.training import runs
from tvgeo_jax import geometry
from tvgeo_jax.core import figures

@dataclasses.dataclass(frozen=True)
class MergeMethod:
  """A merge of the study: its function in ``tvgeo_jax.merging``, the options it takes
  (``merge(**kw)``), the defaults the study uses, and whether it needs θ0 / LoRA."""
  function: str
  options: Tuple[str, ...]
  needs_base: bool = True
  lora_only: bool = False
  defaults: Tuple[Tuple[str, Any], ...] = ()
  reference: str = ""


_TIES_OPTS = ("k", "granularity", "sign_rule", "zero_sign")
_DROP_OPTS = ("drop_rate", "merge_seed", "sign_rule", "zero_sign", "space")
REGISTRY: Dict[str, MergeMethod] = {
    "lora_factor_average": MergeMethod("lora_factor_average", ("modules",), False, True,
                                       reference="paper A; peft linear at w/4"),
    "lora_product_average": MergeMethod("lora_product_average", ("modules", "refactor_rank"),
                                        False, True, reference="exact ΔW average"),
    "lora_svd": MergeMethod("lora_product_average", ("modules", "refactor_rank"), False, True,
                            reference="peft svd (ΔW sum, truncated SVD to the rank)"),
    "weight_average": MergeMethod("weight_average", ("modules",), False),
    "task_arithmetic": MergeMethod("task_arithmetic", ("modules", "lam"),
                                   reference="Ilharco et al. 2023"),
    "ties": MergeMethod("ties", ("modules", "lam") + _TIES_OPTS, reference="paper C"),
    "dare": MergeMethod("dare", ("modules", "lam", "drop_rate", "merge_seed", "space"),
                        defaults=(("drop_rate", 0.5),),
                        reference="Yu et al. 2024; peft dare_linear"),
    "dare_ties": MergeMethod("dare_ties", ("modules", "lam") + _DROP_OPTS,
                             defaults=(("drop_rate", 0.5),), reference="peft dare_ties"),
    "magnitude_prune": MergeMethod("magnitude_prune", ("modules", "lam", "k", "granularity",
                                                       "space"), reference="peft magnitude_prune"),
    "breadcrumbs": MergeMethod("breadcrumbs", ("modules", "lam", "k", "gamma", "space"),
                               reference="Davari & Belilovsky 2023"),
    "della": MergeMethod("della", ("modules", "lam", "k", "epsilon", "merge_seed", "sign_rule",
                                   "zero_sign", "space"), reference="Deep et al. 2024"),
    "tsv_merge": MergeMethod("tsv_merge", ("modules", "lam"), reference="Gargiulo et al. 2025"),
    "iso_c": MergeMethod("iso_c", ("modules", "lam"), reference="Marczak et al. 2025"),
    "knots": MergeMethod("knots", ("modules", "lam", "inner") + _TIES_OPTS
                         + ("drop_rate", "merge_seed"), reference="Stoica et al. 2025"),
}
METHODS = tuple(REGISTRY)
ALIASES = {"lora_avg": "lora_factor_average", "lora_product": "lora_product_average",
           "weight_avg": "weight_average", "ta": "task_arithmetic", "svd": "lora_svd",
           "dare_linear": "dare", "tsv": "tsv_merge", "tsv_m": "tsv_merge", "iso": "iso_c"}
LORA_ONLY = tuple(m for m, spec in REGISTRY.items() if spec.lora_only)
NEEDS_BASE = tuple(m for m, spec in REGISTRY.items() if spec.needs_base)
METRIC_LABELS = {"l2": "l2", "cosine": "cos", "grassmann": "d_G"}
DEFAULT_MODULES = ("query", "value")
DEFAULT_TOPK = (0.05, 0.1, 0.2, 0.5, 1.0)


def resolve_method(method: str) -> str:
  name = ALIASES.get(method, method)
  if name not in METHODS:
    raise ValueError(f"Unknown merge method {method!r}; valid: {', '.join(METHODS)} "
                     f"(aliases {', '.join(ALIASES)}).")
  return name


def method_options(method: str, kw: Mapping[str, Any]) -> Dict[str, Any]:
  """``kw`` without ``None`` values, over the study's defaults for ``method``; checked."""
  method = resolve_method(method)
  spec = REGISTRY[method]
  kw = {k: v for k, v in kw.items() if v is not None}
  bad = sorted(set(kw) - set(spec.options))
  if bad:
    raise ValueError(f"{method} takes no option(s) {bad}; it takes {list(spec.options)}.")
  return {**dict(spec.defaults), **kw}


# --- inputs ------------------------------------------------------------------------

def train_configs(srcs: Sequence[sources.Source]) -> List[Any]:
  """Each source's TrainConfig (task, data and eval settings) from its run directory."""
  out = []
  for s in srcs:
    if not runs.is_finished(s.path):
      raise ValueError(f"{s.path} is not a finished finetune run: the merge study scores "
                       "models on their task's test split and needs the run's config "
                       "(results.json). A bare peft adapter cannot be scored.")
    out.append(runs.load_run(s.path, load_params=False).config)
  return out


def _check_sources(srcs: Sequence[sources.Source], method: str) -> None:
  if len(srcs) < 2:
    raise ValueError(f"The merge study needs at least 2 runs, got {len(srcs)}.")
  sources.check_same_shapes(srcs)
  if method in LORA_ONLY:
    dense = [s.path for s in srcs if not lora.has_lora(s.params)]
    if dense:
      raise ValueError(f"{method} merges LoRA adapters; these runs carry none: {dense}. "
                       "Use weight_average, task_arithmetic or ties for full fine-tuning.")


def base_tree(source: sources.Source) -> dict:
  """θ0 of a source: the frozen base of a LoRA tree, or the run's pretrained tree."""
  if lora.has_lora(source.params):
    return lora.strip_lora(source.params)
  if source.base_params is None:
    raise ValueError(f"{source.path}: task-vector merges of a full fine-tuning run need the "
                     "base weights; load sources with with_base=True.")
  return source.base_params


def merge(method: str, models: Sequence[Mapping], base: Optional[Mapping] = None,
          **kw) -> dict:
  """``method`` applied to ``models``; the result carries ``models[0]``'s head.

  ``kw``: the method's options (``REGISTRY[method].options``: ``modules``, ``lam``,
  ``k``, ``drop_rate``, ``merge_seed`` (the functions' ``seed`` of random drops, named
  apart from the study's subset seed)...), over its study defaults. ``lora_svd``
  re-factorises to the adapters' largest rank unless ``refactor_rank`` is given (peft's
  ``svd``).
  """
  method = resolve_method(method)
  spec = REGISTRY[method]
  kw = method_options(method, kw)
  fn = getattr(merging, spec.function)
  if "merge_seed" in kw:
    kw["seed"] = kw.pop("merge_seed")
  if method == "lora_svd" and "refactor_rank" not in kw:
    kw["refactor_rank"] = max(int(np.shape(mod["lora_a"])[1]) for m in models
                              for mod in (trees.get_path(m, p) for p in lora.lora_paths(m)))
  if spec.needs_base:
    if base is None:
      raise ValueError(f"{method} needs the base tree θ0.")
    return fn(base, list(models), head_from=0, **kw)
  return fn(list(models), head_from=0, **kw)


# --- the evaluation cache -------------------------------------------------------------

def _scalars(metrics: Mapping) -> Dict[str, Any]:
  return {k: v for k, v in metrics.items()
          if isinstance(v, (int, float, str, bool)) or np.isscalar(v)}


class EvalCache:
  """``{key: scalar metrics}`` in a JSON file, rewritten atomically after each batch.

  ``new`` counts the evaluations this object performed (not read back from disk).
  """

  def __init__(self, path: Optional[str], meta: Mapping[str, Any]):
    self.path = path
    self.meta = dict(meta)
    self.entries: Dict[str, Dict[str, Any]] = {}
    self.new = 0
    if path and os.path.exists(path):
      saved = io_utils.read_json(path)
      meta = json.loads(json.dumps(self.meta))
      if saved.get("meta") == meta:
        self.entries = saved["entries"]
      elif _same_runs_retrained(saved.get("meta", {}), meta):
        # The same runs, other weights (a run trained again in place): every cached
        # score may be stale, and the cache is derived data, so it starts afresh.
        changed = sorted(set(saved["meta"]["runs"]) - set(meta["runs"]))
        logging.warning("%s: %s changed since their scores were cached; evaluating "
                        "again.", path, ", ".join(r.split("=")[0] for r in changed))
      else:
        raise ValueError(f"{path} holds results of another study ({saved.get('meta')}); "
                         "use another --out or delete the cache to start afresh.")

  def __contains__(self, key: str) -> bool:
    return key in self.entries

  def __getitem__(self, key: str) -> Dict[str, Any]:
    return self.entries[key]

  def put(self, items: Mapping[str, Mapping]) -> None:
    for k, v in items.items():
      self.entries[k] = _scalars(v)
      self.new += 1
    self.save()

  def save(self) -> None:
    if self.path:
      io_utils.atomic_write_json(self.path, {"meta": self.meta, "entries": self.entries})


def study_tag(method: str, kw: Mapping[str, Any]) -> str:
  """A short name of (method, options), for cache and output file names."""
  opts = json.dumps({k: v for k, v in sorted(kw.items()) if v is not None}, default=str)
  return f"{method}-{hashlib.sha1(opts.encode()).hexdigest()[:8]}"


def _same_runs_retrained(saved: Mapping, meta: Mapping) -> bool:
  """Whether two caches' metadata name the same runs (and options) with other weights."""
  def names(m):
    return sorted(r.split("=")[0] for r in m.get("runs", ()))
  rest = lambda m: {k: v for k, v in m.items() if k != "runs"}
  return names(saved) == names(meta) and rest(saved) == rest(meta)


def open_cache(out_dir: Optional[str], srcs: Sequence[sources.Source],
               max_examples: Optional[int] = None) -> EvalCache:
  """One cache per set of runs and test subset: ``OUT/cache/evaluations.json``.

  Runs are identified by name and by the fingerprint of their weights
  (``models.fingerprint.model_fingerprint``), not by path: a moved run directory keeps
  its cached scores, a run trained again in place does not. Without ``out_dir`` the
  cache lives in memory only, and nothing is hashed."""
  if not out_dir:
    return EvalCache(None, {})
  meta = {"runs": sorted(f"{s.name}={fingerprint.model_fingerprint(s.params, s.config)}"
                         for s in srcs)}   # order-independent
  if max_examples is not None:
    meta["max_examples"] = int(max_examples)
  return EvalCache(os.path.join(out_dir, "cache", "evaluations.json"), meta)


def score_of(metrics: Mapping[str, Any], score: str) -> float:
  if score == "neg_loss":
    return -float(metrics["loss"])
  if score not in metrics:
    raise ValueError(f"score {score!r} is not among the metrics {sorted(metrics)}; use "
                     "'main', 'neg_loss' or one of them.")
  return float(metrics[score])


# --- pairs: δ and Table 3 --------------------------------------------------------------

def single_scores(srcs, configs, cache: EvalCache,
                  max_examples: Optional[int] = None) -> List[Dict[str, Any]]:
  """Each task's own model on its test split (re-evaluated, cached as ``single|name``)."""
  todo = {f"single|{s.name}": (s, c) for s, c in zip(srcs, configs)
          if f"single|{s.name}" not in cache}
  for key, (s, c) in todo.items():
    cache.put({key: evaluation.evaluate(s.params, s.config, c, "test", max_examples)})
  return [cache[f"single|{s.name}"] for s in srcs]


def merge_grid(srcs: Sequence[sources.Source], method: str = "lora_factor_average", *,
               cache: Optional[EvalCache] = None, configs: Optional[Sequence] = None,
               score: str = "main", chunk_size: Optional[int] = evaluation.DEFAULT_CHUNK,
               max_examples: Optional[int] = None, **kw) -> Dict[str, Any]:
  """Scores of every merge(i, j) on task i, single scores and δ (``max_examples``: on
  the first examples of each test split, ``evaluation.model_scores.split_batches``).

  Returns ``{"method", "options", "task_names", "score", "single" [T],
  "single_results_json" [T] (on the whole split), "max_examples", "merged" [T, T] (NaN
  diagonal), "delta" [T, T],
  "metrics": {"i|j": all scalar metrics}}``.
  """
  method = resolve_method(method)
  srcs = list(srcs)
  _check_sources(srcs, method)
  configs = list(configs) if configs is not None else train_configs(srcs)
  cache = cache if cache is not None else open_cache(None, srcs, max_examples)
  kw = method_options(method, kw)
  tag = study_tag(method, kw)
  t = len(srcs)
  singles = single_scores(srcs, configs, cache, max_examples)
  for i, (si, ci) in enumerate(zip(srcs, configs)):
    keys = {j: f"pair|{tag}|{si.name}|{srcs[j].name}" for j in range(t) if j != i}
    todo = [j for j, k in keys.items() if k not in cache]
    if not todo:
      continue
    base = base_tree(si) if method in NEEDS_BASE else None
    merged = [merge(method, [si.params, srcs[j].params], base, **kw) for j in todo]
    res = evaluation.evaluate_stacked(merged, si.config, ci, "test", chunk_size=chunk_size,
                                      max_examples=max_examples)
    cache.put({keys[j]: r for j, r in zip(todo, res)})
  merged_scores = np.full((t, t), np.nan)
  metrics = {}
  for i in range(t):
    for j in range(t):
      if i != j:
        m = cache[f"pair|{tag}|{srcs[i].name}|{srcs[j].name}"]
        merged_scores[i, j] = score_of(m, score)
        metrics[f"{srcs[i].name}|{srcs[j].name}"] = m
  single = np.array([score_of(m, score) for m in singles])
  saved = []
  for s in srcs:
    test = io_utils.read_json(os.path.join(s.path, runs.RESULTS))["metrics"]["test"]
    saved.append(score_of(test, score) if (score in test or score == "neg_loss")
                 else float("nan"))
  return {"method": method, "options": {k: v for k, v in kw.items() if v is not None},
          "task_names": [s.name for s in srcs], "score": score, "single": single.tolist(),
          "single_results_json": saved, "max_examples": max_examples,
          "merged": merged_scores.tolist(),
          "delta": interference.delta_matrix(single, merged_scores).tolist(),
          "metrics": metrics}


def column_name(metric: str, k: int) -> str:
  """"cos" for all layers, "cos 5+" for layers 5..L (1-indexed)."""
  label = METRIC_LABELS[metric]
  return label if k == 1 else f"{label} {k}+"


def distance_columns(srcs: Sequence[sources.Source], modules: Sequence[str] = DEFAULT_MODULES,
                     metrics: Optional[Sequence[str]] = None, top_k: Optional[int] = None
                     ) -> Dict[str, Dict[str, np.ndarray]]:
  """``{module: {column: T̄_d [T, T]}}`` for every metric and layer range (all, k+)."""
  stacks = sources.module_stacks(srcs, list(modules))
  is_lora = all(isinstance(s, tuple) for s in stacks.values())
  if metrics is None:
    metrics = geometry.meaningful_metrics(geometry.METRICS, is_lora, top_k)
  grids = geometry.distance_grids(stacks, task_names=[s.name for s in srcs],
                                  metrics=tuple(metrics), factors=("product",), top_k=top_k)
  out = {}
  for module, grid in grids.items():
    cols = {}
    for metric in metrics:
      for k in range(1, grid.num_layers + 1):
        cols[column_name(metric, k)] = grid.kplus_mean("product", metric, k)
    out[module] = cols
  return out


def interference_tables(delta, columns: Mapping[str, Mapping[str, np.ndarray]],
                        task_names: Sequence[str]) -> Dict[str, Dict[str, dict]]:
  """``{module: spearman_table(δ, its columns)}`` (Table 3 rows)."""
  return {module: interference.spearman_table(delta, cols, task_names)
          for module, cols in columns.items()}


def table3_columns(tables: Mapping[str, Mapping[str, dict]],
                   kplus: Sequence[int] = (5,)) -> List[str]:
  """Paper A's columns (all-layer metrics, then cos/d_G k+) that exist in ``tables``."""
  have = list(next(iter(tables.values())))
  cols = [c for c in ("l2", "cos", "d_G") if c in have]
  n_layers = sum(1 for c in have if c.startswith("cos"))
  for k in kplus:
    k = min(k, n_layers)
    cols += [c for c in (f"cos {k}+", f"d_G {k}+") if c in have and c not in cols]
  return cols


def table3_markdown(tables: Mapping[str, Mapping[str, dict]], kplus: Sequence[int] = (5,)
                    ) -> str:
  """Table 3 (rows: modules) and, below it, every layer range."""
  rows = {m.capitalize(): t for m, t in tables.items()}
  main = interference.spearman_markdown(rows, table3_columns(tables, kplus))
  full = interference.spearman_markdown(rows)
  return ("Spearman ρ between δ(i, ·) and T̄_d(i, ·), mean (std) over tasks\n\n" + main
          + "\nAll layer ranges (k+ = layers k..L, 1-indexed)\n\n" + full)


def scatter_plots(out_dir: str, grid: Mapping[str, Any],
                  columns: Mapping[str, Mapping[str, np.ndarray]]) -> List[str]:
  """δ(i, j) against each all-layer distance, one PNG per module: points coloured by
  task i's paper A family (legend), filled where j is in the same family, hollow where
  not (geometry predicts δ if the filled points sit left and low)."""
  delta = np.asarray(grid["delta"], np.float64)
  names = grid["task_names"]
  fams = [f or "other" for f in evidence.paper_families(names)]
  kinds = list(dict.fromkeys(fams))
  cmap = matplotlib.colormaps["tab10"]
  colour = {f: ("0.6" if f == "other" else cmap(k % cmap.N)) for k, f in enumerate(kinds)}
  t = len(names)
  same = np.array([[fams[i] == fams[j] and fams[i] != "other" for j in range(t)]
                   for i in range(t)])
  off = ~np.eye(t, dtype=bool)
  paths = []
  for module, cols in columns.items():
    shown = [c for c in cols if " " not in c]
    fig, axes = figures.panels(len(shown), title=f"{grid['method']}: δ vs distance ({module})")
    for ax, col in zip(axes, shown):
      d = np.asarray(cols[col])
      for f in kinds:
        rows = np.array([fams[i] == f for i in range(t)])[:, None] & off
        for filled in (True, False):
          sel = rows & (same == filled)
          if sel.any():
            ax.scatter(d[sel], delta[sel], s=16, linewidths=0.9,
                       color=colour[f] if filled else "none", edgecolors=colour[f],
                       label=f"{f} (j in i's family)" if filled else f"{f} (j elsewhere)")
      ax.set_xlabel(f"T̄ {col} (all layers)")
      ax.set_ylabel(f"δ(i, j) ({grid['score']}, task i's score)")
    axes[0].legend(fontsize=6, title="task i's family", title_fontsize=6)
    path = os.path.join(out_dir, f"scatter_{module}.png")
    figures.save_figure(fig, path)
    paths.append(path)
  return paths


# --- paper C ---------------------------------------------------------------------------

def _task_vectors(srcs, modules):
  base = base_tree(srcs[0])
  return merging.task_vectors(base, [s.params for s in srcs], modules=modules)


def sign_conflicts(srcs: Sequence[sources.Source], ks: Sequence[float] = (0.2, 1.0), *,
                   modules=None, granularity: str = "global", max_subsets: int = 20,
                   seed: int = 0) -> Dict[str, Any]:
  """``{k: {n: {"mean", "std", "subsets"}}}``: conflict share vs number of task vectors."""
  tvs = _task_vectors(srcs, modules)
  return {str(k): {str(n): v for n, v in merging.sign_conflict_share(
      tvs, k, granularity=granularity, max_subsets=max_subsets, seed=seed).items()}
          for k in ks}


def topk_sweep(srcs, configs, cache: EvalCache, ks: Sequence[float] = DEFAULT_TOPK, *,
               modules=None, granularity: str = "global", score: str = "main",
               chunk_size: Optional[int] = evaluation.DEFAULT_CHUNK,
               max_examples: Optional[int] = None) -> Dict[str, Any]:
  """Score of θ0 + keep_top_k(τ_i, k) (task i's head) on task i, for every k."""
  out = {"ks": list(ks), "score": score, "tasks": {}}
  for s, c in zip(srcs, configs):
    keys = {k: f"topk|{granularity}|{modules}|{s.name}|{k}" for k in ks}
    todo = [k for k in ks if keys[k] not in cache]
    if todo:
      base = base_tree(s)
      tau = merging.task_vector(base, s.params, modules=modules)
      models = [merging.apply_task_vector(base, merging.keep_top_k(tau, k, granularity),
                                          head_from=s.params) for k in todo]
      res = evaluation.evaluate_stacked(models, s.config, c, "test", chunk_size=chunk_size,
                                        max_examples=max_examples)
      cache.put({keys[k]: r for k, r in zip(todo, res)})
    out["tasks"][s.name] = [score_of(cache[keys[k]], score) for k in ks]
  return out


def multitask(srcs, configs, cache: EvalCache, methods: Sequence[str], *, score: str = "main",
              seed: int = 0, options: Optional[Mapping[str, Mapping]] = None,
              max_examples: Optional[int] = None) -> Dict[str, Any]:
  """Merges of the first n tasks of a seeded permutation, n = 2..T, per method.

  ``options``: per-method keyword arguments of ``merge``.
  """
  options = options or {}
  single = {s.name: score_of(m, score)
            for s, m in zip(srcs, single_scores(srcs, configs, cache, max_examples))}
  order = np.random.default_rng(seed).permutation(len(srcs)).tolist()
  out = {"order": [srcs[i].name for i in order], "score": score, "seed": seed, "methods": {}}
  for method in methods:
    method = resolve_method(method)
    if method in LORA_ONLY and not all(lora.has_lora(s.params) for s in srcs):
      continue
    kw = method_options(method, options.get(method, {}))
    tag = study_tag(method, kw)
    rows = []
    for n in range(2, len(srcs) + 1):
      idx = order[:n]
      subset = [srcs[i] for i in idx]
      names = ",".join(s.name for s in subset)
      keys = {s.name: f"multi|{tag}|{names}|{s.name}" for s in subset}
      if any(k not in cache for k in keys.values()):
        base = base_tree(subset[0]) if method in NEEDS_BASE else None
        body = merge(method, [s.params for s in subset], base, **kw)
        for i, s in zip(idx, subset):
          c = configs[i]
          if keys[s.name] not in cache:
            cache.put({keys[s.name]: evaluation.evaluate(merging.with_head(body, s.params),
                                                          s.config, c, "test", max_examples)})
      scores = {s.name: score_of(cache[keys[s.name]], score) for s in subset}
      # A task whose single-task score is 0 (e.g. MCC) has no normalised score: it is
      # left out of the mean (and counted), not allowed to turn the whole mean into NaN.
      norm = np.array([scores[k] / single[k] if single[k] != 0 else np.nan for k in scores])
      finite = np.isfinite(norm)
      rows.append({"n": n, "tasks": list(scores), "scores": scores,
                   "mean_score": float(np.mean(list(scores.values()))),
                   "mean_normalised": float(np.mean(norm[finite])) if finite.any() else float("nan"),
                   "num_unnormalisable": int((~finite).sum())})
    out["methods"][method] = {"options": kw, "rows": rows}
  return out


def multitask_markdown(multi: Mapping[str, Any]) -> str:
  """Markdown: per method, the mean normalised score (and mean score) for n merged tasks."""
  methods = multi["methods"]
  ns = sorted({r["n"] for res in methods.values() for r in res["rows"]})
  lines = [f"Multi-task merges: mean over the merged tasks of score_i(merge) / score_i(model_i) "
           f"(mean {multi['score']} in brackets); tasks added in the order "
           f"{', '.join(multi['order'])}.", "",
           "| method | options | " + " | ".join(f"n={n}" for n in ns) + " |",
           "|---|---|" + "---|" * len(ns)]
  for method, res in methods.items():
    by_n = {r["n"]: r for r in res["rows"]}
    cells = [f"{by_n[n]['mean_normalised']:.3f} ({by_n[n]['mean_score']:.3f})" if n in by_n
             else "" for n in ns]
    opts = ", ".join(f"{k}={v}" for k, v in sorted(res["options"].items())) or "defaults"
    lines.append(f"| {method} | {opts} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plt_colors(n: int) -> List[Any]:
  """``n`` distinguishable colours (tab10, then tab20 beyond ten lines)."""
  cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
  return [cmap(i % cmap.N) for i in range(n)]


def _plot_paper_c(out_dir: str, conflicts, topk, multi) -> List[str]:
  paths = []
  if conflicts is not None:
    fig, (ax,) = figures.panels(1, "Sign conflicts vs number of task vectors")
    for k, per_n in conflicts.items():
      ns = sorted(int(n) for n in per_n)
      ax.errorbar(ns, [per_n[str(n)]["mean"] for n in ns], [per_n[str(n)]["std"] for n in ns],
                  marker="o", label=f"top-{float(k):.0%}")
    ax.set_xlabel("merged task vectors")
    ax.set_ylabel("share of entries in conflict")
    ax.legend(fontsize=7)
    paths.append(os.path.join(out_dir, "sign_conflicts.png"))
    figures.save_figure(fig, paths[-1])
  if topk is not None:
    fig, (ax,) = figures.panels(1, "Keeping the top-k of a task vector")
    for name, vals in topk["tasks"].items():
      ax.plot([100 * k for k in topk["ks"]], vals, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("kept entries (%)")
    ax.set_ylabel(topk["score"])
    ax.legend(fontsize=7)
    paths.append(os.path.join(out_dir, "topk.png"))
    figures.save_figure(fig, paths[-1])
  if multi is not None and multi["methods"]:
    fig, (ax,) = figures.panels(1, "Multi-task merges", size=4.5 if len(multi["methods"]) > 6
                                else 4.0)
    colors = plt_colors(len(multi["methods"]))
    for i, (method, res) in enumerate(multi["methods"].items()):
      ax.plot([r["n"] for r in res["rows"]], [r["mean_score"] for r in res["rows"]],
              marker="os^vDP*X"[i % 8], color=colors[i], label=method)
    ax.set_xticks(sorted({r["n"] for res in multi["methods"].values() for r in res["rows"]}))
    ax.set_xlabel("merged tasks")
    ax.set_ylabel(f"mean {multi['score']} over merged tasks")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    paths.append(os.path.join(out_dir, "multitask.png"))
    figures.save_figure(fig, paths[-1])
  return paths


# --- the whole study -------------------------------------------------------------------

ANALYSES = ("pairs", "ties", "topk", "multitask")


def run_study(srcs: Sequence[sources.Source], out_dir: str, method: str = "lora_factor_average",
              *, analyses: Sequence[str] = ("pairs",), score: str = "main",
              modules: Sequence[str] = DEFAULT_MODULES, kplus: Sequence[int] = (5,),
              topk_ks: Sequence[float] = DEFAULT_TOPK, conflict_ks: Sequence[float] = (0.2, 1.0),
              multitask_methods: Optional[Sequence[str]] = None, seed: int = 0,
              top_k: Optional[int] = None, chunk_size: Optional[int] = evaluation.DEFAULT_CHUNK,
              figures: bool = True, max_examples: Optional[int] = None,
              compare_lora_averaging: bool = True, **kw) -> Dict[str, Any]:
  """Run the chosen analyses and write them under ``out_dir``.

  Files: ``pairs_{method}.json`` (scores, δ, distances, Spearman tables),
  ``table3_{method}.md``, ``scatter_{module}.png`` (under ``figures/{method}``);
  with both LoRA averagings available, ``lora_merges.md`` compares factor and
  product averaging; ``ties.json`` (sign conflicts), ``topk.json``,
  ``multitask.json`` and their PNGs; ``cache/evaluations.json`` (resumption).
  ``compare_lora_averaging``: with a LoRA averaging and LoRA runs, also the other
  averaging's pair grid and ``lora_merges.md`` (False: only ``method``'s grid, half the
  pair evaluations).
  ``max_examples``: every model (single and merged alike) is scored on the same first
  ``max_examples`` of each test split (whole eval batches), so δ stays paired while a
  large synthetic test split costs less; None scores the whole split.
  Returns the written objects plus ``"evaluations"``: evaluations performed now.
  """
  method = resolve_method(method)
  bad = sorted(set(analyses) - set(ANALYSES))
  if bad:
    raise ValueError(f"Unknown analyses {bad}; valid: {', '.join(ANALYSES)}.")
  srcs = list(srcs)
  _check_sources(srcs, method)
  configs = train_configs(srcs)
  os.makedirs(out_dir, exist_ok=True)
  cache = open_cache(out_dir, srcs, max_examples)
  names = [s.name for s in srcs]
  result: Dict[str, Any] = {}
  all_lora = all(lora.has_lora(s.params) for s in srcs)
  if "pairs" in analyses:
    columns = distance_columns(srcs, modules, top_k=top_k)
    pair_methods = [method]
    if (compare_lora_averaging and all_lora
        and method in ("lora_factor_average", "lora_product_average")):
      # both LoRA averagings, side by side
      pair_methods = ["lora_factor_average", "lora_product_average"]
      pair_methods.sort(key=lambda m: m != method)
    result["pairs"] = {}
    for m in pair_methods:
      m_kw = kw if m == method else {k: v for k, v in kw.items() if k == "modules"}
      grid = merge_grid(srcs, m, cache=cache, configs=configs, score=score,
                        chunk_size=chunk_size, max_examples=max_examples, **m_kw)
      tables = interference_tables(grid["delta"], columns, names)
      grid["distances"] = {mod: {c: np.asarray(v).tolist() for c, v in cols.items()}
                           for mod, cols in columns.items()}
      grid["spearman"] = tables
      grid["table3_columns"] = table3_columns(tables, kplus)
      io_utils.atomic_write_json(os.path.join(out_dir, f"pairs_{m}.json"), grid)
      io_utils.atomic_write_text(os.path.join(out_dir, f"table3_{m}.md"),
                                 f"# {m} ({score})\n\n" + table3_markdown(tables, kplus))
      if figures:
        scatter_plots(os.path.join(out_dir, "figures", m), grid, columns)
      result["pairs"][m] = grid
    if len(pair_methods) == 2:
      io_utils.atomic_write_text(os.path.join(out_dir, "lora_merges.md"),
                                 lora_merge_comparison(result["pairs"]))
  conflicts = topk = multi = None
  if "ties" in analyses:
    conflicts = sign_conflicts(srcs, conflict_ks, modules=None, seed=seed)
    io_utils.atomic_write_json(os.path.join(out_dir, "ties.json"),
                               {"task_names": names, "sign_conflicts": conflicts})
    result["ties"] = conflicts
  if "topk" in analyses:
    topk = topk_sweep(srcs, configs, cache, topk_ks, score=score, chunk_size=chunk_size,
                      max_examples=max_examples)
    io_utils.atomic_write_json(os.path.join(out_dir, "topk.json"), topk)
    result["topk"] = topk
  if "multitask" in analyses:
    if multitask_methods is None:
      multitask_methods = (["lora_factor_average", "lora_product_average"] if all_lora
                           else []) + [
          "weight_average", "task_arithmetic", "ties"]
    elif "all" in multitask_methods:
      multitask_methods = [m for m in METHODS if all_lora or m not in LORA_ONLY]
    if method not in [resolve_method(m) for m in multitask_methods]:
      multitask_methods = list(multitask_methods) + [method]   # the pair method, compared too
    opts = {method: kw} if kw else {}
    multi = multitask(srcs, configs, cache, multitask_methods, score=score, seed=seed,
                      options=opts, max_examples=max_examples)
    io_utils.atomic_write_json(os.path.join(out_dir, "multitask.json"), multi)
    io_utils.atomic_write_text(os.path.join(out_dir, "multitask.md"), multitask_markdown(multi))
    result["multitask"] = multi
  if figures:
    _plot_paper_c(os.path.join(out_dir, "figures"), conflicts, topk, multi)
  result["evaluations"] = cache.new
  return result


def lora_merge_comparison(pairs: Mapping[str, Mapping[str, Any]]) -> str:
  """Markdown: per task, mean δ over partners under factor vs product averaging.

  Factor averaging's update ``¼(B1+B2)(A1+A2)`` adds the cross terms
  ``¼(B1A2 + B2A1)`` to product averaging's ``½(B1A1 + B2A2)``.
  """
  f, p = pairs["lora_factor_average"], pairs["lora_product_average"]
  lines = ["Factor averaging ((A1+A2)/2, (B1+B2)/2) vs product averaging ((B1A1+B2A2)/2): "
           "the difference is the cross terms (B1A2+B2A1)/4.", "",
           f"| task | single ({f['score']}) | mean δ factor | mean δ product |",
           "|---|---|---|---|"]
  for i, name in enumerate(f["task_names"]):
    df = np.nanmean(np.asarray(f["delta"], np.float64)[i])
    dp = np.nanmean(np.asarray(p["delta"], np.float64)[i])
    lines.append(f"| {name} | {f['single'][i]:.4f} | {df:.4f} | {dp:.4f} |")
  return "\n".join(lines) + "\n"


# --- findings (written in the study's summary; the report renders them) -----------------

PAPER_TABLE3 = {"query": "0.65/0.65 vs 0.45", "value": "0.68/0.64 vs 0.48"}


def restrict_pairs(grid: Mapping[str, Any], keep: Sequence[int]) -> Dict[str, Any]:
  """A pairs grid (``merge_grid`` with its ``distances`` and ``spearman``) on the tasks
  ``keep`` only: δ and every distance column restricted, Table 3 recomputed."""
  ix = np.ix_(list(keep), list(keep))
  names = [grid["task_names"][i] for i in keep]
  delta = np.asarray(grid["delta"], np.float64)[ix]
  distances = {mod: {c: np.asarray(v, np.float64)[ix] for c, v in cols.items()}
               for mod, cols in grid["distances"].items()}
  return {"task_names": names, "delta": delta, "distances": distances,
          "spearman": interference_tables(delta, distances, names)}


def _table3_findings(fa: Mapping[str, Any], evaluability, n_permutations: int,
                     what: str = "") -> List[Dict[str, Any]]:
  """Paper A's Table 3 per module: mean ρ of L2, cosine, Grassmann with their tests."""
  out = []
  delta = np.asarray(fa["delta"], np.float64)
  for module, table in fa["spearman"].items():
    get = lambda c: table.get(c, {}).get("mean", float("nan"))
    l2, cos, dg = get("l2"), get("cos"), get("d_G")
    tests = []
    for c in ("cos", "d_G", "l2"):       # evidence.table3_evidence, one column at a time
      if c in fa["distances"][module]:
        t = evidence.safe_test(evidence.table3_test, delta,
                               np.asarray(fa["distances"][module][c], np.float64),
                               n_permutations)
        if t is not None:
          tests.append(dataclasses.replace(t, name=f"Table 3 mean ρ(δ, {c}) ({module}{what})"))
    beats = evidence.safe_test(evidence.metric_beats, fa, module, "cos", "l2", n_permutations)
    if beats is not None:
      tests.append(dataclasses.replace(beats, name=beats.name[:-1] + what + ")")
                   if what else beats)
    out.append(evidence.Finding(
        claim=f"(paper A, Table 3, {module}{what}: cosine and Grassmann correlate with δ "
              f"more than L2; paper {PAPER_TABLE3.get(module, '')})",
        measured=f"mean ρ L2 {l2:.2f}, cos {cos:.2f}, d_G {dg:.2f}; cosine − L2 "
                 f"{cos - l2:+.2f}",
        tests=tuple(tests), evaluability=evaluability,
        untested="every task's ρ is undefined (constant δ or distance rows)").to_dict())
  return out


def study_findings(res: Mapping[str, Any], evaluability=None,
                   n_permutations: int = evidence.DEFAULT_PERMUTATIONS) -> List[Dict[str, Any]]:
  """Paper A's Table 3 and paper C, checked on ``run_study``'s result with permutation
  tests (``evidence``): Table 3's mean ρ per module and column against permuted distance
  rows, cosine vs L2 as a paired test over tasks, sign conflicts growing with the number
  of task vectors. ``evaluability``: ``evidence.Evaluability`` of the merged models;
  where some are near chance, Table 3 is also judged on the tasks whose models learnt
  (``evidence.learnt_subset``), as findings of their own. Returns ``evidence.Finding`` dicts."""
  out = []
  pairs = res.get("pairs", {})
  fa = pairs.get("lora_factor_average")
  if fa:
    out += _table3_findings(fa, evaluability, n_permutations)
    learnt = evidence.learnt_subset(fa["task_names"], evaluability)
    if learnt:
      keep, learnt_ev = learnt
      out += _table3_findings(restrict_pairs(fa, keep), learnt_ev, n_permutations,
                              f", the {len(keep)} tasks above chance")
  fp = pairs.get("lora_product_average")
  if fa and fp:
    da, dp = (np.asarray(x["delta"], float) for x in (fa, fp))
    off = ~np.eye(len(da), dtype=bool)
    test = evidence.safe_test(evidence.paired_test, da[off], dp[off],
                              "mean δ factor − δ product (pairs)", n_permutations)
    out.append(evidence.Finding(
        claim="(factor vs product averaging: factor averaging adds cross terms B1A2 + B2A1, "
              "so product averaging hurts less)",
        measured=f"mean δ factor {np.nanmean(da):.3f} vs product {np.nanmean(dp):.3f}",
        tests=tuple(t for t in (test,) if t is not None),
        evaluability=evaluability, untested="fewer than two merged pairs").to_dict())
  conflicts = res.get("ties", {}).get("0.2")
  if conflicts:
    ns = sorted(conflicts, key=int)
    share = [conflicts[n]["mean"] for n in ns]
    test = evidence.safe_test(evidence.sign_conflict_trend, conflicts, n_permutations)
    out.append(evidence.Finding(
        claim="(paper C: sign conflicts grow with the number of merged task vectors, top-20%)",
        measured=f"{share[0]:.3f} at n={ns[0]} → {share[-1]:.3f} at n={ns[-1]}",
        tests=tuple(t for t in (test,) if t is not None),
        untested="a trend test needs conflict shares at 3 or more n").to_dict())
  multi = res.get("multitask", {}).get("methods", {})
  if multi:
    parts, drops = [], []
    for m, v in multi.items():
      rows = v["rows"]
      parts.append(f"{m} {rows[0]['mean_normalised']:.2f}→{rows[-1]['mean_normalised']:.2f}")
      drops.append(rows[-1]["mean_normalised"] < rows[0]["mean_normalised"])
    out.append(evidence.Finding(
        claim="(paper C: merging more tasks lowers the normalised score)",
        measured="n=2 → n=T: " + ", ".join(parts)
                 + f"; lower for {sum(drops)} of {len(drops)} methods",
        evaluability=evaluability).to_dict())
  return out
