"""Plots of task-distance matrices: PCA scatter, heatmap, dendrogram (PNG, Agg).

Paper A visualises ``T̄_d`` by a 2-D PCA of its rows (each task a point,
Figures 2 and 3) and clusters tasks hierarchically (Figure 4). Every plot
function takes a ``[T, T]`` distance matrix, draws it on a given matplotlib
axis (so callers can compose side-by-side panels) and returns what it
computed; ``save_figure`` writes a figure atomically.
"""
from __future__ import annotations

import io
import textwrap
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from adjustText import adjust_text  # noqa: E402
import numpy as np  # noqa: E402
from scipy.cluster import hierarchy  # noqa: E402
from scipy.spatial import distance as spdist  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402

from tvgeo_jax.core import io_utils


def _check_square(d: np.ndarray, labels: Sequence[str]) -> np.ndarray:
  d = np.asarray(d, np.float64)
  if d.ndim != 2 or d.shape[0] != d.shape[1]:
    raise ValueError(f"Expected a square [T, T] distance matrix, got shape {d.shape}.")
  if len(labels) != d.shape[0]:
    raise ValueError(f"{len(labels)} labels for a {d.shape[0]}x{d.shape[0]} matrix.")
  return d


def pca_coordinates(d: np.ndarray, n_components: int = 2) -> np.ndarray:
  """2-D PCA of the rows of ``d`` (sklearn ``PCA.fit_transform``), ``[T, 2]``.

  Needs finite entries: drop or impute NaN rows (zero task vectors) first.
  """
  d = np.asarray(d, np.float64)
  if not np.all(np.isfinite(d)):
    raise ValueError("PCA needs a finite matrix; this one has NaN/inf entries (zero task "
                     "vectors?). Drop those tasks or use the reports to find them.")
  n = min(n_components, d.shape[0], d.shape[1])
  coords = PCA(n_components=n).fit_transform(d)
  if n < n_components:
    coords = np.pad(coords, ((0, 0), (0, n_components - n)))
  return coords


def seed_groups(labels: Sequence[str]) -> dict:
  """``{task: [indices]}`` of labels ``task``, ``task#2``, ... (the names repeated seeds
  of a task get), in first-appearance order."""
  out: dict = {}
  for k, name in enumerate(labels):
    out.setdefault(str(name).split("#")[0], []).append(k)
  return out


def plot_pca(ax, d: np.ndarray, labels: Sequence[str], title: str = "",
             groups: Optional[Sequence[Optional[str]]] = None) -> np.ndarray:
  """Scatter of ``pca_coordinates(d)`` with task labels; returns the coordinates.

  ``groups`` (one label per point, None: no group) colours the points by group with a
  legend ("other" for None). Seeds of one task (``task``, ``task#2``, ...) are joined by
  a grey line, the spread a reader compares with the distances between tasks, and the
  task is labelled once. Labels are moved apart by ``adjustText`` so they do not overlap
  each other or the points.
  """
  d = _check_square(d, labels)
  coords = pca_coordinates(d)
  seeds = seed_groups(labels)
  repeated = [idx for idx in seeds.values() if len(idx) > 1]
  for idx in repeated:
    ax.plot(coords[idx, 0], coords[idx, 1], color="0.55", lw=0.9, zorder=1)
  if repeated:
    ax.plot([], [], color="0.55", lw=0.9, label="seeds of one task")
  if groups is None:
    ax.scatter(coords[:, 0], coords[:, 1], s=30, zorder=2)
  else:
    if len(groups) != len(labels):
      raise ValueError(f"{len(groups)} groups for {len(labels)} points.")
    names = list(dict.fromkeys(g or "other" for g in groups))
    cmap = matplotlib.colormaps["tab10"]
    for c, name in enumerate(names):
      idx = [k for k, g in enumerate(groups) if (g or "other") == name]
      ax.scatter(coords[idx, 0], coords[idx, 1], s=34, zorder=2,
                 color="0.6" if name == "other" else cmap(c % cmap.N), label=name)
  if groups is not None or repeated:
    ax.legend(fontsize=7, title=None if groups is None else "paper A family",
              title_fontsize=7, loc="best")
  ax.margins(0.15)  # room inside the axes for the labels adjustText moves
  texts = [ax.text(coords[idx[0], 0], coords[idx[0], 1], task, fontsize=7)
           for task, idx in seeds.items()]
  ax.set_title(title, fontsize=9)
  ax.set_xlabel("PC 1")
  ax.set_ylabel("PC 2")
  adjust_text(texts, x=coords[:, 0], y=coords[:, 1], ax=ax,
              arrowprops=dict(arrowstyle="-", color="0.6", lw=0.5))
  return coords


def plot_heatmap(ax, d: np.ndarray, labels: Sequence[str], title: str = "") -> None:
  """Distance matrix as an image with task names on both axes (NaN shown blank)."""
  d = _check_square(d, labels)
  im = ax.imshow(np.ma.masked_invalid(d), cmap="viridis")
  ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
  ax.set_yticks(range(len(labels)), labels, fontsize=7)
  ax.set_title(title, fontsize=9)
  ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def linkage(d: np.ndarray, method: str = "average") -> np.ndarray:
  """scipy linkage of a symmetric distance matrix (diagonal ignored)."""
  d = np.asarray(d, np.float64)
  if not np.all(np.isfinite(d)):
    raise ValueError("Hierarchical clustering needs finite distances; drop NaN tasks first.")
  sym = 0.5 * (d + d.T)
  np.fill_diagonal(sym, 0.0)
  return hierarchy.linkage(spdist.squareform(np.maximum(sym, 0.0), checks=False), method=method)


def plot_dendrogram(ax, d: np.ndarray, labels: Sequence[str], title: str = "",
                    method: str = "average") -> np.ndarray:
  """Dendrogram of the tasks (paper A Figure 4); returns the linkage matrix."""
  d = _check_square(d, labels)
  z = linkage(d, method)
  hierarchy.dendrogram(z, labels=list(labels), ax=ax, leaf_rotation=90, leaf_font_size=8)
  ax.set_title(title, fontsize=9)
  return z


def save_figure(fig, path: str, dpi: int = 120) -> None:
  """Write ``fig`` as PNG to ``path`` atomically and close it."""
  buf = io.BytesIO()
  fig.tight_layout()
  fig.savefig(buf, format="png", dpi=dpi)
  plt.close(fig)
  io_utils.atomic_write_bytes(path, buf.getvalue())


def panels(n: int, title: Optional[str] = None, size: float = 4.0):
  """A figure with ``n`` side-by-side axes (always a list); a long ``title`` is wrapped
  to the figure's width (about 11 characters per inch at the default font size)."""
  fig, axes = plt.subplots(1, n, figsize=(size * n, size), squeeze=False)
  if title:
    fig.suptitle(textwrap.fill(title, width=max(20, int(11 * size * n))))
  return fig, list(axes[0])
