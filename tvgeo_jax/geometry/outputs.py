"""Write a distance analysis to disk: npz tensors, json reductions, figures.

``write_distance_outputs`` is what ``python -m experiments.grid_distances``
calls after ``distance_grids``; its layout:

  OUT/distances.npz   "{module}/{factor}/{metric}" -> T_d [T, T, L],
                      "{module}/{factor}/rank" -> [T, L], "{module}/lora_rank" ->
                      [T, L] nominal LoRA ranks, plus "task_names", "module_names"
                      and "{module}/layer_names"
  OUT/distances.json  per module/factor/metric: layer mean T̄_d and the k+ means
                      (1-indexed, k = 1..L), ranks, NaN reports, and per module the
                      "notes" defining what the numbers are (min(r1, r2) principal
                      angles; factor-alone L2/cosine NaN across LoRA ranks)
  OUT/figures/        pca_{factor}_{metric}.png (modules side by side, paper A
                      Figs. 2-3), heatmap_{module}_{factor}_{metric}.png,
                      dendrogram_{module}_{metric}.png (A, B, BA panels, Fig. 4)

The directory is written to a temp dir and renamed into place (it replaces an
existing ``OUT`` as a whole).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from tvgeo_jax import io_utils
from tvgeo_jax.geometry.grid import DistanceGrid

_FACTOR_LABEL = {"product": "BA", "a": "A", "b": "B"}


def _nan_to_none(x):
  arr = np.asarray(x, dtype=object)
  arr[np.isnan(np.asarray(x, np.float64))] = None
  return arr.tolist()


def _finite_tasks(d: np.ndarray, labels: Sequence[str]):
  """Drop tasks (rows and columns) until the matrix is finite."""
  keep = np.ones(len(labels), bool)
  while keep.any():
    n_bad = (~np.isfinite(d[np.ix_(keep, keep)])).sum(axis=1)
    if not n_bad.any():
      break
    keep[np.flatnonzero(keep)[np.argmax(n_bad)]] = False   # the worst task first
  return d[np.ix_(keep, keep)], [l for l, k in zip(labels, keep) if k], \
      [l for l, k in zip(labels, keep) if not k]


def _as_dict(results) -> Dict[str, DistanceGrid]:
  if isinstance(results, DistanceGrid):
    results = [results]
  if isinstance(results, Mapping):
    return dict(results)
  out = {}
  for r in results:
    name = r.module or f"module_{len(out)}"
    if name in out:
      raise ValueError(f"Two results carry the module name {name!r}; give each a distinct module.")
    out[name] = r
  return out


def summary(results: Mapping[str, DistanceGrid]) -> dict:
  """The JSON-able reductions (layer means, k+ means, ranks, reports)."""
  doc = {"task_names": None, "modules": {}, "reports": []}
  for mod, g in results.items():
    doc["task_names"] = list(g.task_names)
    entry = {"kind": g.kind, "layer_names": list(g.layer_names), "top_k": g.top_k,
             "ranks": {f: r.tolist() for f, r in g.ranks.items()}, "distances": {},
             "notes": list(g.notes),
             "lora_ranks": None if g.lora_ranks is None else np.asarray(g.lora_ranks).tolist()}
    for (f, m) in g.distances:
      entry["distances"].setdefault(f, {})[m] = {
          "layer_mean": _nan_to_none(g.layer_mean(f, m)),
          "kplus_mean": {str(k): _nan_to_none(g.kplus_mean(f, m, k))
                         for k in range(1, g.num_layers + 1)},
      }
    doc["modules"][mod] = entry
    doc["reports"].extend(g.reports)
  return doc


def write_distance_outputs(out_dir: str,
                           results: Union[Mapping[str, DistanceGrid], Sequence[DistanceGrid],
                                          DistanceGrid],
                           task_names: Optional[Sequence[str]] = None, *,
                           figures: bool = True, dendrogram_metric: str = "cosine",
                           kplus_figures: Sequence[int] = ()) -> Dict[str, List[str]]:
  """Write distances.npz, distances.json and figures for ``results`` to ``out_dir``.

  Args:
    out_dir: destination directory (replaced atomically).
    results: ``{module: DistanceGrid}`` (``distance_grids``) or a list of grids.
    task_names: override the names stored in the grids (must match in count).
    figures: draw the PNGs (PCA per factor and metric with modules side by
      side, heatmaps, dendrograms of the A, B and BA panels).
    dendrogram_metric: metric clustered in the dendrograms (paper: cosine);
      every metric present gets one if this is "all".
    kplus_figures: also draw PCA figures of the k+ means for these k (e.g. 5).

  Returns:
    ``{"npz": [...], "json": [...], "figures": [...]}`` final paths.
  """
  results = _as_dict(results)
  if not results:
    raise ValueError("No results to write.")
  names = {tuple(g.task_names) for g in results.values()}
  if len(names) > 1:
    raise ValueError(f"Results disagree on task names: {sorted(names)}.")
  if task_names is not None:
    if len(task_names) != len(next(iter(names))):
      raise ValueError(f"{len(task_names)} task names for {len(next(iter(names)))} tasks.")
    results = {m: _renamed(g, tuple(task_names)) for m, g in results.items()}
  labels = list(next(iter(results.values())).task_names)
  written: Dict[str, List[str]] = {"npz": [], "json": [], "figures": []}
  final = os.path.abspath(out_dir)
  with io_utils.atomic_directory(final) as tmp:
    arrays = {"task_names": np.asarray(labels), "module_names": np.asarray(list(results))}
    for mod, g in results.items():
      arrays[f"{mod}/layer_names"] = np.asarray(g.layer_names)
      for (f, m), d in g.distances.items():
        arrays[f"{mod}/{f}/{m}"] = d
      for f, r in g.ranks.items():
        arrays[f"{mod}/{f}/rank"] = r
      if g.lora_ranks is not None:
        arrays[f"{mod}/lora_rank"] = np.asarray(g.lora_ranks)
    np.savez(os.path.join(tmp, "distances.npz"), **arrays)
    written["npz"].append(os.path.join(final, "distances.npz"))
    io_utils.atomic_write_json(os.path.join(tmp, "distances.json"), summary(results))
    written["json"].append(os.path.join(final, "distances.json"))
    if figures:
      for rel in _draw(tmp, results, labels, dendrogram_metric, kplus_figures):
        written["figures"].append(os.path.join(final, rel))
  return written


def _renamed(g: DistanceGrid, names) -> DistanceGrid:
  return dataclasses.replace(g, task_names=names)


def _draw(root, results, labels, dendrogram_metric, kplus_figures) -> List[str]:
  from tvgeo_jax import figures as fg
  rels: List[str] = []
  mods = list(results)
  keys = sorted({k for g in results.values() for k in g.distances})
  variants = [(None, "mean over layers")] + [(k, f"mean over layers {k}+") for k in kplus_figures]
  for (f, m) in keys:
    have = [mod for mod in mods if (f, m) in results[mod].distances]
    for k, what in variants:
      fig, axes = fg.panels(len(have), f"PCA of T̄ rows: {_FACTOR_LABEL[f]}, {m} ({what})")
      for ax, mod in zip(axes, have):
        g = results[mod]
        if k is not None and k > g.num_layers:
          continue
        d = g.layer_mean(f, m) if k is None else g.kplus_mean(f, m, k)
        sub, lab, dropped = _finite_tasks(d, labels)
        if len(lab) >= 2:
          fg.plot_pca(ax, sub, lab, mod + (f" (dropped NaN: {', '.join(dropped)})" if dropped else ""))
      rel = os.path.join("figures", f"pca_{f}_{m}" + ("" if k is None else f"_{k}plus") + ".png")
      fg.save_figure(fig, os.path.join(root, rel))
      rels.append(rel)
    for mod in have:
      fig, axes = fg.panels(1)
      fg.plot_heatmap(axes[0], results[mod].layer_mean(f, m), labels,
                      f"{mod}: {_FACTOR_LABEL[f]} {m}, mean over layers")
      rel = os.path.join("figures", f"heatmap_{mod}_{f}_{m}.png")
      fg.save_figure(fig, os.path.join(root, rel))
      rels.append(rel)
  metrics = sorted({m for _, m in keys}) if dendrogram_metric == "all" else [dendrogram_metric]
  for mod in mods:
    g = results[mod]
    for m in metrics:
      facs = [f for f in ("a", "b", "product") if (f, m) in g.distances]
      if not facs:
        continue
      fig, axes = fg.panels(len(facs), f"{mod}: hierarchical clustering by {m}")
      for ax, f in zip(axes, facs):
        sub, lab, _ = _finite_tasks(g.layer_mean(f, m), labels)
        if len(lab) >= 2:
          fg.plot_dendrogram(ax, sub, lab, _FACTOR_LABEL[f])
      rel = os.path.join("figures", f"dendrogram_{mod}_{m}.png")
      fg.save_figure(fig, os.path.join(root, rel))
      rels.append(rel)
  return rels
