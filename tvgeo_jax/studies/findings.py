"""Checks of the papers' findings on measured numbers (used by the studies' findings).

Each function takes arrays the pipeline saved and returns a small dict with the
measurement and a boolean verdict, never an assumption.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import numpy as np
from scipy import stats

# Paper A's groups (Figures 2-3): sentiment; MNLI/SNLI/QNLI (inference); RTE/MRPC.
GROUPS = {
    "sentiment": ("sst2", "yelp", "imdb"),
    "inference": ("mnli", "snli", "qnli"),
    "rte_mrpc": ("rte", "mrpc"),
}


def base_name(task: str) -> str:
  return task.replace("synth_", "").split("#")[0]


def nearest_neighbours(d: np.ndarray, names: Sequence[str]) -> Dict[str, str]:
  """Each task's nearest other task under the distance matrix ``d`` (NaN ignored)."""
  d = np.array(d, dtype=np.float64)
  np.fill_diagonal(d, np.inf)
  d = np.where(np.isnan(d), np.inf, d)
  return {names[i]: names[int(np.argmin(d[i]))] for i in range(len(names))}


def group_agreement(d: np.ndarray, names: Sequence[str],
                    groups: Mapping[str, Sequence[str]] = GROUPS) -> Dict[str, object]:
  """Per group: share of its tasks whose nearest neighbour is in the group.

  Also a chance level: the expected share if neighbours were drawn uniformly
  among the other tasks.
  """
  nn = nearest_neighbours(d, names)
  base = [base_name(n) for n in names]
  out: Dict[str, object] = {"nearest": {n: nn[n] for n in names}}
  total_hits, total_n, chance = 0, 0, 0.0
  for g, members in groups.items():
    present = [n for n, b in zip(names, base) if b in members]
    if len(present) < 2:
      continue
    hits = sum(base_name(nn[n]) in members for n in present)
    out[g] = {"tasks": present, "nearest_in_group": hits, "of": len(present)}
    total_hits += hits
    total_n += len(present)
    chance += len(present) * (len(present) - 1) / (len(names) - 1)
  out["share"] = total_hits / total_n if total_n else float("nan")
  out["chance"] = chance / total_n if total_n else float("nan")
  return out


def upper(d: np.ndarray) -> np.ndarray:
  i, j = np.triu_indices(d.shape[0], k=1)
  return np.asarray(d)[i, j]


def factor_resemblance(d_a: np.ndarray, d_b: np.ndarray, d_ba: np.ndarray) -> Dict[str, float]:
  """Paper A, Figure 4: does clustering on B alone resemble BA more than A alone does?

  Spearman correlation of the pairwise distances (upper triangles).
  """
  rho_b = stats.spearmanr(upper(d_b), upper(d_ba), nan_policy="omit").statistic
  rho_a = stats.spearmanr(upper(d_a), upper(d_ba), nan_policy="omit").statistic
  return {"rho_B_vs_BA": float(rho_b), "rho_A_vs_BA": float(rho_a),
          "B_resembles_BA_more": bool(rho_b > rho_a)}


def fading_similarity(diagonal: Sequence[float]) -> Dict[str, object]:
  """Paper B: PLM vs FT similarity per layer fades from ~1 towards the top."""
  x = np.asarray(diagonal, dtype=np.float64)
  layers = np.flatnonzero(np.isfinite(x))  # e.g. layer 0 is NaN with a constant first token
  if len(layers) < 2:
    return {"first": float("nan"), "last": float("nan"), "trend_rho": float("nan"),
            "first_layer": None, "fades": False}
  x = x[layers]
  rho = stats.spearmanr(layers, x).statistic if len(x) > 2 else float("nan")
  return {"first": float(x[0]), "last": float(x[-1]), "trend_rho": float(rho),
          "first_layer": int(layers[0]),
          "fades": bool(x[-1] < x[0] and (np.isnan(rho) or rho < 0))}


def increasing(values: Sequence[float]) -> bool:
  v = np.asarray(values, dtype=np.float64)
  return bool(len(v) >= 2 and v[-1] > v[0])


def describe_groups(res: Mapping[str, object]) -> List[str]:
  parts = []
  for g in GROUPS:
    if g in res:
      r = res[g]
      parts.append(f"{g} {r['nearest_in_group']}/{r['of']}")
  return parts
