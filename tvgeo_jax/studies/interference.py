"""Interference of merges (paper A section 3.2, Table 3): δ and its rank correlation
with task-vector distances.

* ``delta_matrix``: ``δ(i, j) = score_i(model_i) − score_i(merge(i, j))``, the drop
  on task i when task i's model is merged with task j's (diagonal NaN).
* ``spearman_table``: for every task i, Spearman's ρ (``scipy.stats.spearmanr``,
  average ranks for ties) between ``δ(i, ·)`` and a distance ``T̄_d(i, ·)`` over
  j ≠ i; summarised as mean (std, population ``ddof=0``) over the tasks whose ρ is
  defined. A row with constant δ (or constant distances) has no ρ: it is NaN,
  counted in ``n_nan`` and listed in ``nan_tasks`` — never silently dropped.
* ``spearman_markdown``: the Table-3-like Markdown table (rows: modules, columns:
  distance / layer range such as "cos", "d_G 5+").
"""
from __future__ import annotations

import warnings
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import scipy.stats


def delta_matrix(single_scores: Sequence[float], merged_scores) -> np.ndarray:
  """``δ[i, j] = single_scores[i] − merged_scores[i, j]`` (NaN on the diagonal).

  Args:
    single_scores: ``[T]`` score of each task's own model on its task.
    merged_scores: ``[T, T]``; entry (i, j) is the score on task i of merge(i, j),
      evaluated with task i's head. The diagonal is ignored.
  """
  single = np.asarray(single_scores, np.float64)
  merged = np.asarray(merged_scores, np.float64)
  if single.ndim != 1 or single.size < 2:
    raise ValueError(f"delta_matrix: single_scores must be a vector of T >= 2 scores, got shape "
                     f"{single.shape}.")
  t = single.size
  if merged.shape != (t, t):
    raise ValueError(f"delta_matrix: merged_scores must be [T, T] = [{t}, {t}] (row i: merges "
                     f"scored on task i), got shape {merged.shape}.")
  delta = single[:, None] - merged
  np.fill_diagonal(delta, np.nan)
  return delta


def _off_diagonal_row(m: np.ndarray, i: int) -> np.ndarray:
  return np.delete(m[i], i)


def spearman_table(delta, distances: Mapping[str, object],
                   task_names: Optional[Sequence[str]] = None) -> Dict[str, dict]:
  """Per distance: ``{"per_task": [T] ρ_i, "mean", "std", "n_valid", "n_nan", "nan_tasks"}``.

  Args:
    delta: ``[T, T]`` from ``delta_matrix`` (diagonal ignored).
    distances: ``{name: [T, T]}`` mean-over-layers distances ``T̄_d`` (diagonal ignored).
    task_names: optional names for ``nan_tasks`` (default: indices).
  """
  d = np.asarray(delta, np.float64)
  if d.ndim != 2 or d.shape[0] != d.shape[1] or d.shape[0] < 3:
    raise ValueError(f"spearman_table: delta must be [T, T] with T >= 3 (each row needs at "
                     f"least 2 off-diagonal points), got shape {d.shape}.")
  t = d.shape[0]
  names = list(task_names) if task_names is not None else list(range(t))
  if len(names) != t:
    raise ValueError(f"spearman_table: {len(names)} task names for {t} tasks.")
  if not distances:
    raise ValueError("spearman_table: no distances given.")
  off = ~np.eye(t, dtype=bool)
  if not np.all(np.isfinite(d[off])):
    raise ValueError("spearman_table: delta has NaN/inf off the diagonal; every merge (i, j), "
                     "i != j, needs a score.")
  out = {}
  for name, dist in distances.items():
    m = np.asarray(dist, np.float64)
    if m.shape != (t, t):
      raise ValueError(f"spearman_table: distance {name!r} has shape {m.shape}, expected "
                       f"({t}, {t}).")
    if not np.all(np.isfinite(m[off])):
      raise ValueError(f"spearman_table: distance {name!r} has NaN/inf off the diagonal.")
    rho = np.empty(t)
    for i in range(t):
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.stats.ConstantInputWarning)
        rho[i] = scipy.stats.spearmanr(_off_diagonal_row(d, i),
                                       _off_diagonal_row(m, i)).statistic
    valid = ~np.isnan(rho)
    out[name] = {
        "per_task": rho.tolist(),
        "mean": float(np.mean(rho[valid])) if valid.any() else float("nan"),
        "std": float(np.std(rho[valid])) if valid.any() else float("nan"),
        "n_valid": int(valid.sum()),
        "n_nan": int((~valid).sum()),
        "nan_tasks": [names[i] for i in np.flatnonzero(~valid)],
    }
  return out


def format_cell(summary: Mapping, digits: int = 2) -> str:
  """"0.65 (0.16)", with " [1 NaN]" when tasks had no defined ρ."""
  if summary["n_valid"] == 0:
    cell = "NaN"
  else:
    cell = f"{summary['mean']:.{digits}f} ({summary['std']:.{digits}f})"
  if summary["n_nan"]:
    cell += f" [{summary['n_nan']} NaN]"
  return cell


def spearman_markdown(rows: Mapping[str, Mapping[str, Mapping]],
                      columns: Optional[Sequence[str]] = None, digits: int = 2) -> str:
  """Markdown table: one row per module (e.g. "Query"), one column per distance.

  Args:
    rows: ``{row name: spearman_table(...) result}``.
    columns: column order (default: the first row's distances in order); a column
      missing from a row shows "–".
    digits: decimals of mean and std.
  """
  if not rows:
    raise ValueError("spearman_markdown: no rows.")
  cols = list(columns) if columns is not None else list(next(iter(rows.values())))
  lines = ["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
  for row, table in rows.items():
    cells = [format_cell(table[c], digits) if c in table else "–" for c in cols]
    lines.append(f"| {row} | " + " | ".join(cells) + " |")
  nan_notes = [f"{row} / {c}: tasks {table[c]['nan_tasks']}" for row, table in rows.items()
               for c in cols if c in table and table[c]["n_nan"]]
  if nan_notes:
    lines += ["", "ρ undefined (constant δ or distance row), excluded from mean (std): "
              + "; ".join(nan_notes) + "."]
  return "\n".join(lines) + "\n"
