"""Paper B's visual comparisons: UMAP of first-token representations, clusters, CKA summaries.

* ``umap_projections``: fit UMAP (umap-learn) on one model's representations of a layer
  and ``transform`` the other models' representations of the same examples into that
  map (paper B fits on the bottleneck-adapter model and applies it to PLM and FT).
* ``paired_distances``: mean 2-D distance between the models' projections of the same
  example.
* ``cluster_composition``: k-means (scikit-learn) on all models' points together in the
  full representation space (not the 2-D picture), then how each cluster splits by model.
* ``cka_summary``: quartiles and maximum of every row and column of a CKA matrix.
* ``plot_cka_heatmaps`` / ``plot_umap``: PNG figures (matplotlib, Agg backend).

Reproducibility: UMAP runs with ``init="random"`` and a fixed ``random_state``
(umap-learn's spectral init was seen to differ between seeded fits when the neighbour
graph has several components; the random init is bit-identical run to run); a fixed
random_state also makes umap-learn single-threaded. ``approximate=True`` forces the
approximate nearest-neighbour search (pynndescent), several times faster for a few
thousand points than the exact path; its numba kernels compile once per process
(~30 s on a small CPU), so small inputs may prefer ``approximate=False``.
umap-learn, scikit-learn and matplotlib are imported inside the functions.
"""
from __future__ import annotations

import io
import math
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

from tvgeo_jax import io_utils


def _as_points(x, name: str) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if x.ndim != 2:
    raise ValueError(f"Representations of {name!r} must be [n, d]; got shape {x.shape}. "
                     "Select a layer of a [layers, n, d] stack first.")
  return x


def _check_same_examples(reps: Mapping[str, np.ndarray]) -> int:
  sizes = {k: v.shape[0] for k, v in reps.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"Every model must represent the same examples; got counts {sizes}.")
  return next(iter(sizes.values()))


def umap_projections(representations: Mapping[str, Any], fit_on: str, *, seed: int = 0,
                     n_neighbors: int = 15, min_dist: float = 0.1,
                     approximate: bool = True, metric: str = "euclidean"
                     ) -> Dict[str, np.ndarray]:
  """2-D UMAP of several models' ``[n, d]`` representations in one shared map.

  Args:
    representations: model name -> ``[n, d]`` (same examples, same order).
    fit_on: the model whose points define the map; the others are ``transform``-ed.
    seed: UMAP ``random_state``; the same seed gives identical numbers.
    n_neighbors, min_dist, metric: UMAP's parameters.
    approximate: ``force_approximation_algorithm`` (approximate neighbour search).

  Returns:
    model name -> ``[n, 2]`` float32 (``fit_on``'s are the fitted embedding).
  """
  if fit_on not in representations:
    raise ValueError(f"fit_on={fit_on!r} is not one of the models {list(representations)}.")
  reps = {k: _as_points(v, k) for k, v in representations.items()}
  n = _check_same_examples(reps)
  if n <= n_neighbors:
    raise ValueError(f"UMAP needs more examples ({n}) than n_neighbors ({n_neighbors}); "
                     "lower n_neighbors or add examples.")
  import umap  # heavy import (numba): only when used
  reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, min_dist=min_dist,
                      metric=metric, init="random", random_state=seed, n_jobs=1,
                      force_approximation_algorithm=approximate, transform_seed=seed)
  out = {fit_on: np.asarray(reducer.fit_transform(reps[fit_on]), np.float32)}
  for name, x in reps.items():
    if name != fit_on:
      out[name] = np.asarray(reducer.transform(x), np.float32)
  return {name: out[name] for name in reps}


def umap_by_layer(representations: Mapping[str, Any], layers: Sequence[int], fit_on: str,
                  **kwargs) -> Dict[int, Dict[str, np.ndarray]]:
  """``umap_projections`` for each chosen layer of ``[L, n, d]`` stacks (one map per layer)."""
  out = {}
  for layer in layers:
    out[int(layer)] = umap_projections(
        {k: np.asarray(v)[layer] for k, v in representations.items()}, fit_on, **kwargs)
  return out


def paired_distances(points: Mapping[str, Any]) -> Dict[str, Dict[str, float]]:
  """Mean Euclidean distance between two models' points of the same example.

  Returns ``{a: {b: mean_i ||p_a[i] − p_b[i]||}}`` for every ordered pair (symmetric,
  zero diagonal). Works on 2-D projections or on full representations.
  """
  pts = {k: np.asarray(v, np.float64) for k, v in points.items()}
  _check_same_examples(pts)
  return {a: {b: float(np.mean(np.linalg.norm(pts[a] - pts[b], axis=-1))) for b in pts}
          for a in pts}


def cluster_composition(representations: Mapping[str, Any], n_clusters: int,
                        seed: int = 0) -> Dict[str, Any]:
  """k-means over all models' points together; the make-up of each cluster by model.

  Clustering runs in the full representation space (all models' ``[n, d]`` stacked).
  Returns JSON-ready lists:

  * ``models``: model order of the columns below;
  * ``counts[c][m]``: points of model m in cluster c;
  * ``share_of_cluster[c][m]``: fraction of cluster c that comes from model m (rows
    sum to 1) — paper B's "ratio of each model's points in the clusters";
  * ``share_of_model[c][m]``: fraction of model m's points that fall in cluster c
    (columns sum to 1);
  * ``labels``: model -> cluster id per example.
  """
  from sklearn.cluster import KMeans
  reps = {k: _as_points(v, k) for k, v in representations.items()}
  n = _check_same_examples(reps)
  names = list(reps)
  if not 1 <= n_clusters <= n * len(names):
    raise ValueError(f"n_clusters={n_clusters} must be between 1 and the number of points "
                     f"({n * len(names)}).")
  stacked = np.concatenate([reps[k] for k in names]).astype(np.float64)
  labels = KMeans(n_clusters=n_clusters, random_state=seed, n_init=10).fit_predict(stacked)
  labels = labels.reshape(len(names), n)
  counts = np.stack([np.bincount(labels[m], minlength=n_clusters)
                     for m in range(len(names))], axis=1)  # [clusters, models]
  rows = counts.sum(1, keepdims=True)
  return {
      "models": names,
      "counts": counts.tolist(),
      "share_of_cluster": np.divide(counts, rows, out=np.zeros(counts.shape),
                                    where=rows > 0).tolist(),
      "share_of_model": (counts / n).tolist(),
      "labels": {k: labels[m].tolist() for m, k in enumerate(names)},
  }


def cka_summary(matrix) -> Dict[str, Dict[str, list]]:
  """Quartiles and maximum of each row and each column of a CKA matrix ``[L1, L2]``.

  Returns ``{"rows": {"q1", "median", "q3", "max"}, "columns": {...}}``, each a list
  (one value per row / column; NaN entries ignored).
  """
  m = np.asarray(matrix, np.float64)
  if m.ndim != 2:
    raise ValueError(f"A CKA matrix is 2-D [layers1, layers2]; got shape {m.shape}.")

  def stats(axis):
    q1, med, q3 = np.nanpercentile(m, [25, 50, 75], axis=axis)
    return {"q1": q1.tolist(), "median": med.tolist(), "q3": q3.tolist(),
            "max": np.nanmax(m, axis=axis).tolist()}

  return {"rows": stats(1), "columns": stats(0)}


# --- figures -----------------------------------------------------------------------

def _figure_module():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path: str) -> None:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
  io_utils.atomic_write_bytes(path, buf.getvalue())


def _grid(count: int, ncols: Optional[int] = None):
  ncols = ncols or min(count, 3)
  return math.ceil(count / ncols), ncols


def plot_cka_heatmaps(matrices: Mapping[Any, Any], path: str, title: str = "Linear CKA",
                      ncols: Optional[int] = None, vmin: float = 0.0, vmax: float = 1.0
                      ) -> None:
  """One heatmap per model pair, in a grid, written as a PNG.

  ``matrices`` maps ``(model_a, model_b)`` (or any label) to ``[L_a, L_b]``; rows are
  model a's layers (y axis, layer 0 = embeddings at the bottom), columns model b's.
  The colour scale is fixed to ``[vmin, vmax]`` ([0, 1] for CKA; the other layer
  similarities of ``representations`` use it too).
  """
  if not matrices:
    raise ValueError("No CKA matrix to plot.")
  plt = _figure_module()
  nrows, ncols = _grid(len(matrices), ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.4 * nrows), squeeze=False)
  fig.subplots_adjust(hspace=0.45, wspace=0.35)  # room for each panel's title and x label
  image = None
  for ax, (key, m) in zip(axes.ravel(), matrices.items()):
    a, b = key if isinstance(key, tuple) and len(key) == 2 else ("", "")
    image = ax.imshow(np.asarray(m, np.float64), origin="lower", vmin=vmin, vmax=vmax,
                      cmap="magma", aspect="auto")
    ax.set_title(f"{a} vs {b}" if a else str(key), fontsize=9)
    ax.set_ylabel(f"{a} layer" if a else "layer")
    ax.set_xlabel(f"{b} layer" if b else "layer")
  for ax in axes.ravel()[len(matrices):]:
    ax.axis("off")
  fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
  fig.suptitle(title)
  _save(fig, path)
  plt.close(fig)


def plot_umap(projections: Mapping[Any, Mapping[str, Any]], path: str,
              fit_on: Optional[str] = None, ncols: Optional[int] = None) -> None:
  """Scatter plots of UMAP projections, one panel per layer, one colour per model.

  ``projections`` maps a layer (or any panel label) to ``{model: [n, 2]}``.
  """
  if not projections:
    raise ValueError("No projection to plot.")
  plt = _figure_module()
  nrows, ncols = _grid(len(projections), ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(3.8 * ncols, 3.4 * nrows), squeeze=False)
  for ax, (layer, pts) in zip(axes.ravel(), projections.items()):
    for i, (model, p) in enumerate(pts.items()):
      p = np.asarray(p)
      ax.scatter(p[:, 0], p[:, 1], s=4, alpha=0.6, color=f"C{i}", label=model)
    ax.set_title(f"layer {layer}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
  for ax in axes.ravel()[len(projections):]:
    ax.axis("off")
  axes.ravel()[0].legend(fontsize=7, markerscale=3)
  fig.suptitle("UMAP of first-token representations" +
               (f" (fitted on {fit_on})" if fit_on else ""))
  _save(fig, path)
  plt.close(fig)
