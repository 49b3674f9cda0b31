"""Predicting merge damage δ(i, j) from task-vector geometry, scored on held-out tasks.

Inputs (the project's files, read by the adapters at the bottom):
  * geometry: ``distances.npz`` of ``python -m experiments.grid_distances`` (or of the
    study's ``distances/<method>`` step): ``"{module}/{factor}/{metric}"`` -> ``[R, R, L]``
    with ``task_names``; rows are runs (a task trained with several seeds has several
    rows, ``task``, ``task#2``... as ``sources.load_sources`` names them);
  * δ: ``pairs_{method}.json`` of ``merge_study.run_study`` (``task_names``, ``delta``
    ``[R, R]``, row i: ``score_i(model_i) − score_i(merge(i, j))``).

Features of a pair (i, j) (``geometry_features``), for every module × factor × metric
of the npz: the distance at each layer (``"query/product/cosine layer3"``, 1-indexed)
and the means over layers k..L for k = 1..L−1 (paper A's "k+"; ``"… 1+"`` is the mean
over all layers; NaN layers skipped as in ``DistanceGrid.kplus_mean``), plus, when
every task has ≥ 2 runs, the seed floor of the pair (``"… seed floor"``: the mean of
the two tasks' mean same-task distances over layers, ``evidence.seed_floor``). A
feature with a non-finite value on any scored pair is dropped (and listed).

Scoring (``leave_one_task_out``): pairs of runs of one task are never scored (they are
the seed floor, not interference). For each task g: fit on the pairs that involve no
run of g, predict δ(i, ·) for g's runs i (partners of every other task), and report
Spearman ρ (``scipy.stats.spearmanr``; undefined, NaN, for constant predictions) and the
mean absolute error over those pairs; then their means over tasks. Predictors:
  * ``ridge``: standardised features, the k with the largest univariate F statistic
    (``SelectKBest(f_regression)``; with ~400 features and ~70 training pairs a plain
    ridge spreads its weight over noise), then ``RidgeCV`` with α among ``RIDGE_ALPHAS``
    by efficient leave-one-out CV; k among ``RIDGE_FEATURE_COUNTS`` is chosen by an inner
    leave-tasks-out CV on the training pairs (``task_folds``, ``INNER_FOLDS`` folds, mean
    absolute error);
  * ``gradient_boosting``: ``GradientBoostingRegressor`` (300 trees, depth 2, learning
    rate 0.05, fixed ``random_state``);
  * baseline ``mean``: the mean δ of the training pairs (its ρ is undefined);
  * baseline ``best_feature``: the one feature with the largest |Spearman ρ| against δ on
    the training pairs (what paper A's Table 3 ranks), mapped to δ by a least-squares
    line on the training pairs (so its sign is learnt, and its held-out ρ is ±ρ of the
    feature).
"""
from __future__ import annotations

import glob
import os
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import scipy.stats

from tvgeo_jax.core import io_utils
from tvgeo_jax.studies import evidence
from tvgeo_jax.core import figures

RIDGE_ALPHAS = tuple(np.logspace(-3, 4, 15))
RIDGE_FEATURE_COUNTS = (1, 3, 10, 30, 100000)    # 100000: every feature
INNER_FOLDS = 5
MODELS = ("ridge", "gradient_boosting")
BASELINES = ("mean", "best_feature")
SUMMARY_FILE = "prediction.json"
FIGURE_FILE = "predicted_vs_measured.png"
DELTA_DEFINITION = "δ(i, j) = score_i(model_i) − score_i(merge(i, j))"


# --- features -------------------------------------------------------------------------

def geometry_features(arrays: Mapping[str, Any], names: Sequence[str],
                      seed_floor: bool = True) -> Dict[str, np.ndarray]:
  """``{feature name: [R, R]}``: per-layer distances, k+ means and seed floors (see the
  module docstring)."""
  keys = evidence.distance_keys(arrays)
  if not keys:
    raise ValueError("No distances of the form 'module/factor/metric' [R, R, L] to build "
                     "features from.")
  tasks = [evidence.task_of(n) for n in names]
  with_floor = seed_floor and all(tasks.count(t) >= 2 for t in tasks)
  out: Dict[str, np.ndarray] = {}
  for key in keys:
    d = np.asarray(arrays[key], np.float64)
    if d.shape[:2] != (len(names), len(names)):
      raise ValueError(f"{key}: shape {d.shape} does not fit {len(names)} runs.")
    n_layers = d.shape[2]
    for layer in range(n_layers):
      out[f"{key} layer{layer + 1}"] = d[..., layer]
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)          # all-NaN pairs stay NaN
      for k in range(1, max(n_layers, 2)):
        out[f"{key} {k}+"] = np.nanmean(d[..., k - 1:], axis=-1)
      if with_floor:
        floor = evidence.seed_floor(d, names)
        per_task = {t: np.nanmean(v) for t, v in floor.per_task.items()}
        f = np.array([per_task[t] for t in tasks])
        out[f"{key} seed floor"] = (f[:, None] + f[None, :]) / 2
  return out


def scored_pairs(names: Sequence[str], delta, groups: Optional[Sequence[str]] = None
                 ) -> Tuple[np.ndarray, np.ndarray, List[str]]:
  """Ordered pairs (i, j) of runs of different tasks with a finite δ: ``(i, j, groups)``."""
  delta = np.asarray(delta, np.float64)
  r = len(names)
  if delta.shape != (r, r):
    raise ValueError(f"δ has shape {delta.shape}; expected [{r}, {r}] for the runs {list(names)}.")
  groups = [evidence.task_of(n) for n in names] if groups is None else list(groups)
  if len(set(groups)) < 4:
    raise ValueError(f"Leave-one-task-out needs at least 4 tasks (the pairs of 3 to fit on), "
                     f"got {sorted(set(groups))}.")
  i, j = np.nonzero(~np.eye(r, dtype=bool))
  keep = np.array([groups[a] != groups[b] for a, b in zip(i, j)], bool) & np.isfinite(delta[i, j])
  return i[keep], j[keep], groups


def design_matrix(features: Mapping[str, np.ndarray], i: np.ndarray, j: np.ndarray
                  ) -> Tuple[np.ndarray, List[str], List[str]]:
  """``(X [P, F], kept feature names, dropped names)``: non-finite features dropped."""
  names = list(features)
  x = np.stack([np.asarray(features[n], np.float64)[i, j] for n in names], axis=1)
  ok = np.isfinite(x).all(axis=0)
  if not ok.any():
    raise ValueError("Every feature has NaN/inf on some scored pair; nothing to fit.")
  return x[:, ok], [n for n, k in zip(names, ok) if k], [n for n, k in zip(names, ok) if not k]


# --- predictors: (x_train, y_train, x_test, feature names, seed) -> (prediction, info) ---

def task_folds(gi: Sequence[str], gj: Sequence[str], n_folds: int = INNER_FOLDS
               ) -> List[Tuple[np.ndarray, np.ndarray]]:
  """Leave-tasks-out splits of ordered pairs (task i, task j): the tasks are dealt into
  ``n_folds`` folds; a fold validates on its tasks' pairs (i in the fold, j not) and
  trains on the pairs with neither task in it. (Grouping by i alone would leak: the
  mirrored pair (j, i) has the same distances.)"""
  gi, gj = np.asarray(gi), np.asarray(gj)
  tasks = list(dict.fromkeys(gi.tolist() + gj.tolist()))
  splits = []
  for f in range(min(n_folds, len(tasks))):
    held = np.isin(gi, tasks[f::n_folds]), np.isin(gj, tasks[f::n_folds])
    val, train = held[0] & ~held[1], ~held[0] & ~held[1]
    if val.any() and train.any():
      splits.append((np.flatnonzero(train), np.flatnonzero(val)))
  return splits


def _screened_ridge(x, y, ks):
  """For each k of ``ks``: standardise, keep the k features of largest F statistic, RidgeCV.
  Returns ``{k: (predict function, fitted RidgeCV, kept columns)}``."""
  from sklearn.feature_selection import f_regression
  from sklearn.linear_model import RidgeCV
  from sklearn.preprocessing import StandardScaler
  scaler = StandardScaler().fit(x)
  z = scaler.transform(x)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)      # constant columns: F is NaN
    f_stat = np.nan_to_num(f_regression(z, y)[0], nan=-1.0)
  order = np.argsort(-f_stat, kind="stable")
  fits = {}
  for k in ks:
    cols = np.sort(order[:k])
    model = RidgeCV(alphas=RIDGE_ALPHAS).fit(z[:, cols], y)
    fits[k] = (lambda xt, m=model, c=cols: m.predict(scaler.transform(xt)[:, c]), model, cols)
  return fits


def _ridge(x_tr, y_tr, x_te, names, seed, pair_groups=None):
  ks = sorted({min(k, x_tr.shape[1]) for k in RIDGE_FEATURE_COUNTS})
  errors = {k: [] for k in ks}
  for train, val in task_folds(*pair_groups, INNER_FOLDS):
    for k, (predict, _, _) in _screened_ridge(x_tr[train], y_tr[train], ks).items():
      errors[k].append(np.mean(np.abs(predict(x_tr[val]) - y_tr[val])))
  best = min(ks, key=lambda k: (np.mean(errors[k]), k)) if all(errors.values()) else ks[-1]
  predict, model, cols = _screened_ridge(x_tr, y_tr, [best])[best]
  return predict(x_te), {"alpha": float(model.alpha_), "num_features": int(len(cols)),
                         "features": [names[c] for c in cols[:10]]}


def _gradient_boosting(x_tr, y_tr, x_te, names, seed, pair_groups=None):
  from sklearn.ensemble import GradientBoostingRegressor
  model = GradientBoostingRegressor(n_estimators=300, max_depth=2, learning_rate=0.05,
                                    random_state=seed).fit(x_tr, y_tr)
  top = int(np.argmax(model.feature_importances_))
  return model.predict(x_te), {"top_feature": names[top]}


def _mean(x_tr, y_tr, x_te, names, seed, pair_groups=None):
  return np.full(len(x_te), float(np.mean(y_tr))), {}


def feature_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Spearman ρ of each column of ``x`` with ``y`` (NaN for a constant column)."""
  return evidence.spearman_rows(np.asarray(x, np.float64).T, np.broadcast_to(y, x.T.shape))


def _best_feature(x_tr, y_tr, x_te, names, seed, pair_groups=None):
  rho = feature_spearman(x_tr, y_tr)
  if not np.isfinite(rho).any():
    return _mean(x_tr, y_tr, x_te, names, seed)[0], {"feature": None, "train_rho": None}
  k = int(np.nanargmax(np.abs(rho)))
  slope, intercept = np.polyfit(x_tr[:, k], y_tr, 1)
  return intercept + slope * x_te[:, k], {"feature": names[k], "train_rho": float(rho[k])}


PREDICTORS: Dict[str, Callable] = {"ridge": _ridge, "gradient_boosting": _gradient_boosting,
                                   "mean": _mean, "best_feature": _best_feature}


# --- leave-one-task-out ----------------------------------------------------------------

def _spearman(a, b) -> float:
  a, b = np.asarray(a), np.asarray(b)
  if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
    return float("nan")
  return float(scipy.stats.spearmanr(a, b).statistic)


def _mean_finite(v) -> Optional[float]:
  v = np.asarray([x for x in v if x is not None], np.float64)
  v = v[np.isfinite(v)]
  return float(v.mean()) if v.size else None


def leave_one_task_out(delta, features: Mapping[str, np.ndarray], names: Sequence[str], *,
                       groups: Optional[Sequence[str]] = None,
                       predictors: Sequence[str] = MODELS + BASELINES, seed: int = 0
                       ) -> Dict[str, Any]:
  """Fit δ(i, j) on the pairs of the other tasks, predict each held-out task's δ(i, ·).

  Args:
    delta: ``[R, R]`` δ of ordered run pairs (row i: merges scored on i's task).
    features: ``{name: [R, R]}`` (``geometry_features``).
    names: the R run names; ``groups`` (default ``task_of(name)``) says which runs are
      one task (held out together).
    predictors: names from ``PREDICTORS``.
    seed: ``random_state`` of the non-linear model.

  Returns a JSON-ready dict: ``tasks``, ``num_pairs``, ``features``, ``dropped_features``,
  ``predictors: {name: {"per_task": {task: {"spearman", "mae", "num_pairs", "info"}},
  "mean_spearman", "num_undefined_spearman", "mean_mae"}}``, ``predicted: {name: [R, R]}``
  and ``measured`` (δ on the scored pairs, NaN elsewhere).
  """
  bad = [p for p in predictors if p not in PREDICTORS]
  if bad:
    raise ValueError(f"Unknown predictors {bad}; choose from {list(PREDICTORS)}.")
  delta = np.asarray(delta, np.float64)
  i, j, groups = scored_pairs(names, delta, groups)
  x, kept, dropped = design_matrix(features, i, j)
  y = delta[i, j]
  gi, gj = np.asarray(groups)[i], np.asarray(groups)[j]
  tasks = list(dict.fromkeys(groups))
  r = len(names)
  predicted = {p: np.full((r, r), np.nan) for p in predictors}
  per_task: Dict[str, Dict[str, Any]] = {p: {} for p in predictors}
  for g in tasks:
    test = gi == g
    train = (gi != g) & (gj != g)
    if not test.any() or not train.any():
      continue
    for p in predictors:
      pred, info = PREDICTORS[p](x[train], y[train], x[test], kept, seed,
                                  (gi[train], gj[train]))
      predicted[p][i[test], j[test]] = pred
      per_task[p][g] = {"spearman": _spearman(pred, y[test]),
                        "mae": float(np.mean(np.abs(pred - y[test]))),
                        "num_pairs": int(test.sum()), "info": info}
  measured = np.full((r, r), np.nan)
  measured[i, j] = y
  out = {"names": list(names), "groups": groups, "tasks": tasks, "num_pairs": int(len(y)),
         "features": kept, "dropped_features": dropped, "predictors": {}, "measured": measured,
         "predicted": predicted}
  for p in predictors:
    rhos = [v["spearman"] for v in per_task[p].values()]
    out["predictors"][p] = {
        "per_task": per_task[p], "mean_spearman": _mean_finite(rhos),
        "num_undefined_spearman": int(sum(not np.isfinite(v) for v in rhos)),
        "mean_mae": _mean_finite([v["mae"] for v in per_task[p].values()])}
  return out


# --- outputs ---------------------------------------------------------------------------

def prediction_markdown(result: Mapping[str, Any]) -> str:
  """One row per predictor: mean held-out Spearman and MAE (tasks held out in turn)."""
  lines = [f"Predicting {DELTA_DEFINITION} from geometry, leave-one-task-out over "
           f"{len(result['tasks'])} tasks ({result['num_pairs']} pairs, "
           f"{len(result['features'])} features).", "",
           "| predictor | mean held-out Spearman ρ | mean held-out MAE |", "|---|---|---|"]
  for p, v in result["predictors"].items():
    rho = "undefined (constant)" if v["mean_spearman"] is None else f"{v['mean_spearman']:.3f}"
    if v["num_undefined_spearman"] and v["mean_spearman"] is not None:
      rho += f" [{v['num_undefined_spearman']} undefined]"
    mae = "–" if v["mean_mae"] is None else f"{v['mean_mae']:.4f}"
    lines.append(f"| {p} | {rho} | {mae} |")
  return "\n".join(lines) + "\n"


def _json_ready(obj):
  if isinstance(obj, Mapping):
    return {str(k): _json_ready(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_json_ready(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return _json_ready(obj.tolist())
  if isinstance(obj, (float, np.floating)):
    return float(obj) if np.isfinite(obj) else None
  if isinstance(obj, np.generic):
    return obj.item()
  return obj


def write_summary(path: str, result: Mapping[str, Any], **meta) -> str:
  """``result`` (plus ``meta``, e.g. method and score) as JSON, NaN as null, atomically."""
  io_utils.atomic_write_json(path, _json_ready({**meta, **result}))
  return path


def plot_predictions(path: str, result: Mapping[str, Any], what: str = "",
                     predictors: Optional[Sequence[str]] = None) -> str:
  """Predicted against measured δ, one panel per predictor, points coloured by held-out
  task (legend), the identity line dashed."""
  import matplotlib
  predictors = [p for p in (predictors or result["predicted"]) if p != "mean"]
  tasks = result["tasks"]
  measured = np.asarray(result["measured"], np.float64)
  cmap = matplotlib.colormaps["tab10" if len(tasks) <= 10 else "tab20"]
  title = "Held-out prediction of " + DELTA_DEFINITION + (f" — {what}" if what else "")
  fig, axes = figures.panels(len(predictors), title, size=4.5)
  finite = measured[np.isfinite(measured)]
  lo, hi = float(finite.min()), float(finite.max())
  for ax, p in zip(axes, predictors):
    pred = np.asarray(result["predicted"][p], np.float64)
    for c, g in enumerate(tasks):
      rows = [k for k, n in enumerate(result["groups"]) if n == g]
      ok = np.isfinite(pred[rows]) & np.isfinite(measured[rows])
      ax.scatter(measured[rows][ok], pred[rows][ok], s=16, color=cmap(c % cmap.N), label=g)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    s = result["predictors"][p]
    rho = "—" if s["mean_spearman"] is None else f"{s['mean_spearman']:.2f}"
    ax.set_title(f"{p}: mean held-out ρ {rho}, MAE {s['mean_mae']:.3g}", fontsize=9)
    ax.set_xlabel("measured δ(i, j)")
    ax.set_ylabel("predicted δ(i, j) (task i held out)")
  axes[-1].legend(fontsize=6, title="held-out task i", loc="upper left",
                  bbox_to_anchor=(1.02, 1.0))
  figures.save_figure(fig, path)
  return path


# --- the project's files ------------------------------------------------------------------

def read_distances(path: str) -> Tuple[Dict[str, np.ndarray], List[str]]:
  """``(arrays, run names)`` of a ``distances.npz`` (or the directory holding it)."""
  if os.path.isdir(path):
    path = os.path.join(path, "distances.npz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"No distances.npz at {path}; write one with "
                            "python -m experiments.grid_distances --out=DIR.")
  with np.load(path) as z:
    arrays = {k: z[k] for k in z.files}
  return arrays, [str(n) for n in arrays["task_names"]]


def distance_arrays(grids: Mapping[str, Any]) -> Tuple[Dict[str, np.ndarray], List[str]]:
  """The same ``(arrays, names)`` from ``geometry.distance_grids``' ``{module: DistanceGrid}``."""
  arrays, names = {}, None
  for module, g in grids.items():
    names = list(g.task_names)
    for (factor, metric), d in g.distances.items():
      arrays[f"{module}/{factor}/{metric}"] = np.asarray(d)
  if names is None:
    raise ValueError("No distance grids.")
  return arrays, names


def read_merge_pairs(merge_dir: str, method: Optional[str] = None) -> Dict[str, Any]:
  """A merge study's ``pairs_{method}.json`` (``method`` None: the only one, or factor
  averaging when both LoRA averagings are there)."""
  if method is None:
    found = sorted(glob.glob(os.path.join(merge_dir, "pairs_*.json")))
    if not found:
      raise FileNotFoundError(f"No pairs_*.json in {merge_dir}; run python -m "
                              "experiments.merge_grid --analyses=pairs --out=DIR first.")
    methods = [os.path.basename(f)[len("pairs_"):-len(".json")] for f in found]
    if len(methods) > 1 and "lora_factor_average" not in methods:
      raise ValueError(f"{merge_dir} holds several merge methods {methods}; pass --method.")
    method = "lora_factor_average" if "lora_factor_average" in methods else methods[0]
  path = os.path.join(merge_dir, f"pairs_{method}.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"No pairs_{method}.json in {merge_dir}.")
  doc = io_utils.read_json(path)
  if "delta" not in doc or "task_names" not in doc:
    raise ValueError(f"{path} has no 'delta' / 'task_names': not a merge study's pairs file.")
  return doc


def aligned(arrays: Mapping[str, np.ndarray], distance_names: Sequence[str],
            merge_names: Sequence[str]) -> Dict[str, np.ndarray]:
  """The distance arrays re-ordered to the merge study's run order (same runs required)."""
  if sorted(distance_names) != sorted(merge_names):
    raise ValueError(f"The distances and the merge study are of different runs: distances "
                     f"{sorted(distance_names)}, merges {sorted(merge_names)}.")
  order = [list(distance_names).index(n) for n in merge_names]
  keys = set(evidence.distance_keys(arrays))
  return {k: (np.asarray(v)[np.ix_(order, order)] if k in keys else v)
          for k, v in arrays.items()}


def run_prediction(arrays: Mapping[str, np.ndarray], distance_names: Sequence[str],
                   pairs: Mapping[str, Any], out_dir: str, *, figures: bool = True,
                   seed: int = 0) -> Dict[str, Any]:
  """The prediction step: features from ``arrays``, δ from a ``pairs_{method}.json``
  document; writes ``prediction.json``, ``prediction.md`` and the figure to ``out_dir``."""
  names = list(pairs["task_names"])
  arrays = aligned(arrays, distance_names, names)
  result = leave_one_task_out(np.asarray(pairs["delta"], np.float64),
                              geometry_features(arrays, names), names, seed=seed)
  meta = {"method": pairs.get("method"), "score": pairs.get("score"),
          "delta_definition": DELTA_DEFINITION}
  os.makedirs(out_dir, exist_ok=True)
  files = {"json": write_summary(os.path.join(out_dir, SUMMARY_FILE), result, **meta)}
  md = (f"# δ from geometry ({meta['method']}, {meta['score']})\n\n"
        + prediction_markdown(result))
  io_utils.atomic_write_text(os.path.join(out_dir, "prediction.md"), md)
  files["markdown"] = os.path.join(out_dir, "prediction.md")
  if figures:
    files["figure"] = plot_predictions(os.path.join(out_dir, FIGURE_FILE), result,
                                       f"{meta['method']} merges, score {meta['score']}")
  return {**result, "files": files, **meta}
