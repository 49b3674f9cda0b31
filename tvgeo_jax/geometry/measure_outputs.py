"""Subspace similarity and intruder dimensions of fine-tuned models: numbers and figures.

What ``python -m experiments.grid_distances --measures=subspace_similarity,intruders``
writes beside the distances (each directory replaced as a whole)::

  OUT/subspace_similarity/phi.npz    "{module}/{factor}" -> φ [T, T, L, r_max, r_max]
                                     (NaN beyond a task's rank), "{module}/ranks",
                                     "task_names"
  OUT/subspace_similarity/phi.json   per module/factor: φ(top-i, top-i) averaged over
                                     layers for every task pair, [T, T, r_max]
  OUT/subspace_similarity/figures/   tasks_{module}_{factor}.png: [T, T] heatmaps of the
                                     layer mean of φ(i, i) for a few i;
                                     pairs_{module}_{factor}.png: φ(i, j) over (i, j) for
                                     each task pair (layer mean; Hu et al. Figure 3)
  OUT/intruders/intruders.json       per model: method, and per module the intruder
                                     count per layer and each top-k vector's max |cos|
  OUT/intruders/intruders.png        count per layer, one line per model coloured by
                                     method, one panel per module
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from tvgeo_jax import io_utils
from tvgeo_jax.geometry import intruders as intruders_lib
from tvgeo_jax.geometry import subspace_similarity as ss
from tvgeo_jax.geometry.outputs import _nan_to_none

_SIDE = {"a": "A: right-singular vectors", "b": "B: left-singular vectors"}
_METHOD_COLOURS = {"full": "tab:blue", "lora": "tab:orange", "bottleneck": "tab:green"}
MAX_PAIR_PANELS = 12


def _layer_mean(x: np.ndarray, axis: int) -> np.ndarray:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)     # all-NaN entries stay NaN
    return np.nanmean(x, axis=axis)


# --- subspace similarity ---------------------------------------------------------------

def subspace_similarities(factors: Mapping[str, Sequence[tuple]],
                          which: Sequence[str] = ss.FACTORS) -> Dict[str, Dict[str, np.ndarray]]:
  """``{module: {factor: φ [T, T, L, r, r]}}`` from ``{module: [(A, B) per task]}``.

  Each task's ``(A [L, r_t, in], B [L, out, r_t])`` is ``task_vectors.lora_factors``;
  ranks may differ between tasks.
  """
  out = {}
  for module, pairs in factors.items():
    out[module] = {f: ss.subspace_similarity_grid([p[0 if f == "a" else 1] for p in pairs], f)
                   for f in which}
  return out


def write_subspace_similarity(out_dir: str, results: Mapping[str, Mapping[str, np.ndarray]],
                              task_names: Sequence[str], ranks, *,
                              figures: bool = True) -> List[str]:
  """Write ``subspace_similarities`` results; returns the files written (final paths).

  ``ranks``: each task's LoRA rank, one list for all modules or ``{module: [r_t]}``.
  """
  if not isinstance(ranks, Mapping):
    ranks = {m: list(ranks) for m in results}
  final = os.path.abspath(out_dir)
  rels = ["phi.npz", "phi.json"]
  with io_utils.atomic_directory(final) as tmp:
    arrays = {"task_names": np.asarray(list(task_names))}
    doc = {"measure": "LoRA subspace similarity phi(i, j) (Hu et al. 2021, section 7)",
           "task_names": list(task_names), "modules": {}}
    for module, by_factor in results.items():
      arrays[f"{module}/ranks"] = np.asarray(ranks[module])
      doc["modules"][module] = {"ranks": list(ranks[module])}
      for f, phi in by_factor.items():
        arrays[f"{module}/{f}"] = phi
        top = ss.phi_top(_layer_mean(phi, axis=2))                  # [T, T, r]
        doc["modules"][module][f] = {
            "basis": _SIDE[f], "layer_mean_phi_top_i": _nan_to_none(top)}
        if figures:
          rels.append(_tasks_figure(tmp, module, f, phi, task_names, ranks[module]))
          rels.append(_pairs_figure(tmp, module, f, phi, task_names, ranks[module]))
    np.savez(os.path.join(tmp, "phi.npz"), **arrays)
    io_utils.atomic_write_json(os.path.join(tmp, "phi.json"), doc)
  return [os.path.join(final, r) for r in rels]


def _tasks_figure(root, module, factor, phi, names, ranks) -> str:
  from tvgeo_jax import figures as fg
  lo, hi = min(ranks), max(ranks)
  ks = sorted({1, max(1, lo // 2), lo, hi})
  mean = _layer_mean(phi, axis=2)
  fig, axes = fg.panels(len(ks), f"{module}: LoRA subspace similarity φ(top-i, top-i) of "
                        f"{_SIDE[factor]}, mean over layers (Hu et al. 2021)")
  for ax, k in zip(axes, ks):
    im = ax.imshow(np.ma.masked_invalid(mean[:, :, k - 1, k - 1]), vmin=0, vmax=1,
                   cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_title(f"i = j = {k}" + (" (blank: rank < i)" if k > lo else ""), fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  rel = os.path.join("figures", f"tasks_{module}_{factor}.png")
  fg.save_figure(fig, os.path.join(root, rel))
  return rel


def _pairs_figure(root, module, factor, phi, names, ranks) -> str:
  from tvgeo_jax import figures as fg
  t = len(names)
  pairs = [(s, u) for s in range(t) for u in range(s + 1, t)][:MAX_PAIR_PANELS] or [(0, 0)]
  import matplotlib.pyplot as plt
  mean = _layer_mean(phi, axis=2)
  ncols = min(4, len(pairs))
  nrows = -(-len(pairs) // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(4.0 * ncols, 3.6 * nrows), squeeze=False)
  fig.suptitle(f"{module}: φ(i, j) of {_SIDE[factor]}, mean over layers (Hu et al. 2021)"
               + (f", first {MAX_PAIR_PANELS} pairs" if t * (t - 1) // 2 > MAX_PAIR_PANELS
                  else ""))
  for ax in axes.ravel()[len(pairs):]:
    ax.axis("off")
  for ax, (s, u) in zip(axes.ravel(), pairs):
    m = mean[s, u, :ranks[s], :ranks[u]]
    im = ax.imshow(np.ma.masked_invalid(m), vmin=0, vmax=1, cmap="viridis", origin="lower",
                   aspect="auto", extent=(0.5, ranks[u] + 0.5, 0.5, ranks[s] + 0.5))
    ax.set_title(f"{names[s]} (r={ranks[s]}) vs {names[u]} (r={ranks[u]})", fontsize=8)
    ax.set_ylabel(f"i (top-i of {names[s]})", fontsize=8)
    ax.set_xlabel(f"j (top-j of {names[u]})", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  rel = os.path.join("figures", f"pairs_{module}_{factor}.png")
  fg.save_figure(fig, os.path.join(root, rel))
  return rel


# --- intruder dimensions ----------------------------------------------------------------

def intruder_records(names: Sequence[str], methods: Sequence[str], params: Sequence[Mapping],
                     base_params: Sequence[Optional[Mapping]], modules: Sequence[str],
                     k: int = intruders_lib.DEFAULT_K, eps: float = intruders_lib.DEFAULT_EPS
                     ) -> List[dict]:
  """One record per model: ``{"name", "method", "modules": {m: {"count", "max_cos"}}}``.

  ``base_params[i]`` is model i's pretrained tree (None for a LoRA tree, which carries
  its frozen base kernels).
  """
  return [{"name": n, "method": m,
           "modules": intruders_lib.model_intruders(p, b, modules, k, eps)}
          for n, m, p, b in zip(names, methods, params, base_params)]


def write_intruders(out_dir: str, records: Sequence[dict], *, k: int, eps: float,
                    figures: bool = True) -> List[str]:
  """``intruders.json`` and ``intruders.png`` for ``intruder_records``; returns paths."""
  if not records:
    raise ValueError("No models to write intruder dimensions for.")
  final = os.path.abspath(out_dir)
  rels = ["intruders.json"]
  with io_utils.atomic_directory(final) as tmp:
    doc = {"measure": "intruder dimensions (Shuttleworth et al. 2024): top-k left-singular "
                      "vectors of the fine-tuned weight whose max |cos| with any singular "
                      "vector of the base weight is below eps",
           "k": k, "eps": eps, "models": [
               {"name": r["name"], "method": r["method"],
                "modules": {m: {"count_per_layer": np.asarray(v["count"]).tolist(),
                                "total": int(np.sum(v["count"])),
                                "max_cos": np.asarray(v["max_cos"]).tolist()}
                            for m, v in r["modules"].items()}} for r in records]}
    io_utils.atomic_write_json(os.path.join(tmp, "intruders.json"), doc)
    if figures:
      rels.append(_intruder_figure(tmp, records, k, eps))
  return [os.path.join(final, r) for r in rels]


def _intruder_figure(root, records, k, eps) -> str:
  """Row 1: intruder count per layer; row 2: the lowest max |cos| among the top-k
  (how close the layer is to having one), with ε dashed. One column per module."""
  import matplotlib.pyplot as plt
  from tvgeo_jax import figures as fg
  modules = list(records[0]["modules"])
  fig, axes = plt.subplots(2, len(modules), figsize=(4.2 * len(modules) + 2.0, 7.0),
                           squeeze=False)
  fig.suptitle(f"Intruder dimensions (Shuttleworth et al. 2024):\ntop-{k} left-singular "
               f"vectors of the fine-tuned W whose max |cos| with W0's is < {eps}")
  styles = ["-", "--", ":", "-."]
  for col, mod in enumerate(modules):
    top, low = axes[0, col], axes[1, col]
    for i, r in enumerate(records):
      v = r["modules"][mod]
      count, best = np.asarray(v["count"]), np.asarray(v["max_cos"]).min(axis=-1)
      same = sum(q["method"] == r["method"] for q in records[:i])
      kw = dict(marker="o", ms=4, alpha=0.8, ls=styles[same % len(styles)],
                color=_METHOD_COLOURS.get(r["method"], f"C{i % 10}"),
                label=f"{r['name']} ({r['method']})")
      x = np.arange(len(count))
      top.plot(x, count, **kw)
      low.plot(x, best, **kw)
    top.set_title(mod, fontsize=10)
    top.set_ylabel(f"intruders among top {k}")
    top.set_ylim(-0.3, k + 0.3)
    low.axhline(eps, color="grey", ls="--", lw=1)
    low.set_ylabel(f"min over top {k} of max |cos|")
    low.set_ylim(0.0, 1.05)
    for ax in (top, low):
      ax.set_xlabel("layer (encoder/layer_i)")
      ax.set_xticks(range(len(count)))
  axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
  rel = "intruders.png"
  fg.save_figure(fig, os.path.join(root, rel))
  return rel
