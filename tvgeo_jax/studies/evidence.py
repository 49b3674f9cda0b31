"""Findings as evidence: a seed noise floor, permutation p-values, and the chance rule.

Three questions a finding must answer before it is stated:

* **Is the distance above noise?** Several runs of one task (different seeds) land at a
  non-zero distance from each other: ``seed_floor`` measures it (per module, factor,
  metric and layer, from distance matrices whose rows are runs labelled by task), and
  ``clears_floor`` says whether between-family distances exceed it. The rule: the floor
  is the ``quantile`` (default 1.0: the maximum) of the same-task, different-seed
  distances; a grouping counts only where the *mean* between-family distance is above
  the floor. ``share_above`` (the share of between-family distances above the floor)
  is reported beside it.
* **Could it arise by chance?** Each test returns a ``PermutationResult`` (statistic,
  p-value, number of permutations, alternative) computed with
  ``scipy.stats.permutation_test`` (``DEFAULT_PERMUTATIONS = 9999`` random
  permutations, or every permutation when there are fewer; p-values of random
  permutations are ``(count + 1) / (n + 1)``). Its ``verdict(level)`` depends on the
  p-value only. With ten tasks the tests have little power: a large p-value is "not
  shown", never "shown false".
    - ``grouping_test``: share of tasks whose nearest neighbour is in its family
      against random relabellings of the families;
    - ``table3_test``: paper A's Table 3 statistic (mean over tasks of Spearman ρ
      between δ(i, ·) and d(i, ·)) against independent permutations of each task's
      distance row;
    - ``paired_test``: "cosine beats L2", the mean per-task difference ρ_cos − ρ_L2
      against random sign flips of the per-task differences;
    - ``trend_test``: a monotone trend (CKA falling with depth, sign conflicts growing
      with the number of task vectors): Spearman ρ between position and value against
      permutations of the values; ``sign_conflict_trend`` reads ``ties.json``'s shape.
* **Did the models learn?** ``chance_level`` is the score of the best constant predictor
  from a task's label counts (accuracy: the majority share; F1: the constant positive
  predictor, macro F1 over classes; MCC and correlations: 0); ``near_chance`` lists the
  models whose main metric is less than ``margin`` (default 0.05, five points) above
  it. A finding resting on those models is "not evaluated" (``not_evaluated``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import stats
from tvgeo_jax.studies import findings

DEFAULT_PERMUTATIONS = 9999
DEFAULT_LEVEL = 0.05
CHANCE_MARGIN = 0.05
POWER_NOTE = ("ten tasks give these tests little power: a p-value above the level means "
              "'not shown', not 'shown false'")


def task_of(name: str) -> str:
  """The task of a run name: ``"sst2#2"`` (second seed of sst2) -> ``"sst2"``."""
  return str(name).split("#")[0]


def paper_families(names: Sequence[str], groups: Optional[Mapping[str, Sequence[str]]] = None
                   ) -> List[Optional[str]]:
  """Each run's family in paper A's groups (``findings.GROUPS``; ``synth_`` prefixes and
  seed suffixes ignored), None for a task in no group."""
  groups = findings.GROUPS if groups is None else groups
  return [next((g for g, members in groups.items() if findings.base_name(n) in members), None)
          for n in names]


# --- the seed noise floor ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SeedFloor:
  """Same-task, different-seed distances beside between-task distances.

  Arrays have the trailing shape of the input (``[L]`` for ``[R, R, L]`` input, scalars
  for ``[R, R]``). ``per_task[t]`` is task t's mean same-task distance.
  """
  floor: np.ndarray            # quantile (default max) of same-task distances
  same_task_mean: np.ndarray
  between_task_mean: np.ndarray
  quantile: float
  num_same_task_pairs: int
  num_between_task_pairs: int
  per_task: Dict[str, np.ndarray]

  def to_dict(self) -> Dict[str, Any]:
    return {"floor": np.asarray(self.floor).tolist(),
            "same_task_mean": np.asarray(self.same_task_mean).tolist(),
            "between_task_mean": np.asarray(self.between_task_mean).tolist(),
            "quantile": self.quantile, "num_same_task_pairs": self.num_same_task_pairs,
            "num_between_task_pairs": self.num_between_task_pairs,
            "per_task": {t: np.asarray(v).tolist() for t, v in self.per_task.items()}}


def _run_matrix(d, names: Sequence[str]) -> np.ndarray:
  d = np.asarray(d, np.float64)
  if d.ndim < 2 or d.shape[0] != d.shape[1]:
    raise ValueError(f"Expected distances [R, R] or [R, R, L] (rows: runs), got {d.shape}.")
  if len(names) != d.shape[0]:
    raise ValueError(f"{len(names)} run names for {d.shape[0]} rows.")
  return d


def _pairs(names: Sequence[str], same: bool):
  tasks = [task_of(n) for n in names]
  i, j = np.triu_indices(len(names), k=1)
  keep = np.array([(tasks[a] == tasks[b]) == same for a, b in zip(i, j)], bool)
  return i[keep], j[keep]


def seed_floor(d, names: Sequence[str], quantile: float = 1.0) -> SeedFloor:
  """The seed noise floor of one distance (``[R, R]`` or ``[R, R, L]``, rows: runs).

  Runs are grouped by ``task_of(name)``; every unordered pair of runs of one task is a
  same-task pair. Raises ValueError if no task has two runs.
  """
  d = _run_matrix(d, names)
  if not 0.0 < quantile <= 1.0:
    raise ValueError(f"quantile must be in (0, 1], got {quantile}.")
  si, sj = _pairs(names, same=True)
  if not len(si):
    raise ValueError("No task has two runs (seeds): the seed floor needs several runs of a "
                     "task (train with --seeds=2 or more).")
  bi, bj = _pairs(names, same=False)
  same, between = d[si, sj], d[bi, bj]
  tasks = [task_of(n) for n in names]
  per_task = {}
  for t in dict.fromkeys(tasks):
    rows = [k for k, (a, b) in enumerate(zip(si, sj)) if tasks[a] == t]
    if rows:
      per_task[t] = np.nanmean(same[rows], axis=0)
  return SeedFloor(floor=np.nanquantile(same, quantile, axis=0),
                   same_task_mean=np.nanmean(same, axis=0),
                   between_task_mean=np.nanmean(between, axis=0) if len(bi) else
                   np.full(d.shape[2:], np.nan),
                   quantile=quantile, num_same_task_pairs=len(si),
                   num_between_task_pairs=len(bi), per_task=per_task)


def seed_floors(arrays: Mapping[str, Any], names: Sequence[str], quantile: float = 1.0
                ) -> Dict[str, SeedFloor]:
  """``seed_floor`` of every ``"{module}/{factor}/{metric}"`` distance ``[R, R, L]`` of a
  ``distances.npz`` (other entries, e.g. ranks and names, are skipped)."""
  return {k: seed_floor(arrays[k], names, quantile) for k in distance_keys(arrays)}


def distance_keys(arrays: Mapping[str, Any]) -> List[str]:
  """The ``"{module}/{factor}/{metric}"`` entries ``[R, R, L]`` of a distances.npz (not
  ranks, names)."""
  return [k for k, v in arrays.items() if len(k.split("/")) == 3
          and k.split("/")[2] != "rank" and np.ndim(v) == 3]


def select_runs(arrays: Mapping[str, Any], keep: Sequence[int]) -> Dict[str, Any]:
  """``arrays`` with every distance (``distance_keys``) restricted to the runs ``keep``
  (rows and columns); other entries as they are."""
  keys = set(distance_keys(arrays))
  return {k: (np.asarray(v)[np.ix_(keep, keep)] if k in keys else v)
          for k, v in arrays.items()}


@dataclasses.dataclass(frozen=True)
class FloorCheck:
  """Between-family distances against the seed floor (see the module docstring)."""
  floor: float
  between_family_mean: float
  share_above: float
  clears: bool


def clears_floor(d, names: Sequence[str], families: Mapping[str, Optional[str]],
                 quantile: float = 1.0) -> FloorCheck:
  """Does the mean between-family distance exceed the seed floor? (``d`` ``[R, R]``.)

  ``families`` maps a task to its family; a task it does not name is a family of its
  own. Between-family pairs are runs of tasks in different families.
  """
  d = _run_matrix(d, names)
  if d.ndim != 2:
    raise ValueError(f"clears_floor takes one [R, R] matrix (a layer or a layer mean), got "
                     f"{d.shape}.")
  floor = float(seed_floor(d, names, quantile).floor)
  fam = [families.get(task_of(n)) or task_of(n) for n in names]
  i, j = np.triu_indices(len(names), k=1)
  keep = np.array([fam[a] != fam[b] for a, b in zip(i, j)], bool)
  if not keep.any():
    raise ValueError("All runs are in one family: there are no between-family distances.")
  between = d[i[keep], j[keep]]
  mean = float(np.nanmean(between))
  return FloorCheck(floor=floor, between_family_mean=mean,
                    share_above=float(np.nanmean(between > floor)), clears=bool(mean > floor))


def task_mean_matrix(d, names: Sequence[str]):
  """Runs collapsed to tasks: entry (a, b) is the mean distance over run pairs of tasks a
  and b (r ≠ s); the diagonal is the mean same-task distance (NaN for one run).

  Returns ``(matrix [T, T, ...], task names in first-seen order)``.
  """
  d = _run_matrix(d, names)
  tasks = [task_of(n) for n in names]
  order = list(dict.fromkeys(tasks))
  idx = {t: [k for k, s in enumerate(tasks) if s == t] for t in order}
  out = np.full((len(order), len(order)) + d.shape[2:], np.nan)
  for a, ta in enumerate(order):
    for b, tb in enumerate(order):
      vals = [d[r, s] for r in idx[ta] for s in idx[tb] if r != s]
      if vals:
        out[a, b] = np.mean(vals, axis=0)
  return out, order


# --- permutation tests -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PermutationResult:
  """A statistic with its permutation p-value."""
  name: str
  statistic: float
  p_value: float
  n_permutations: int
  alternative: str
  exact: bool = False

  def significant(self, level: float = DEFAULT_LEVEL) -> bool:
    return bool(np.isfinite(self.p_value) and self.p_value < level)

  def verdict(self, level: float = DEFAULT_LEVEL) -> str:
    """"shown (p < level)" or "not shown (p ≥ level)": the p-value decides, nothing else."""
    if not np.isfinite(self.p_value):
      return "not evaluated (no p-value)"
    if self.significant(level):
      return f"shown (p = {self.p_value:.3g} < {level:g})"
    return f"not shown (p = {self.p_value:.3g} ≥ {level:g})"

  def describe(self, level: float = DEFAULT_LEVEL) -> str:
    how = "all" if self.exact else "random"
    return (f"{self.name} = {self.statistic:.3f}, p = {self.p_value:.3g} ({self.alternative}; "
            f"{self.n_permutations} {how} permutations) — {self.verdict(level)}")

  def to_dict(self, level: float = DEFAULT_LEVEL) -> Dict[str, Any]:
    return {**dataclasses.asdict(self), "level": level, "verdict": self.verdict(level)}


def _permutation(name: str, data, statistic, permutation_type: str, alternative: str,
                 n_permutations: Union[int, float], seed: Optional[int]) -> PermutationResult:
  res = stats.permutation_test(data, statistic, permutation_type=permutation_type,
                               vectorized=True, n_resamples=n_permutations,
                               alternative=alternative, rng=np.random.default_rng(seed))
  n = len(res.null_distribution)
  return PermutationResult(name=name, statistic=float(res.statistic), p_value=float(res.pvalue),
                           n_permutations=int(n), alternative=alternative,
                           exact=bool(n < n_permutations or math.isinf(n_permutations)))


def nearest_neighbour_indices(d) -> np.ndarray:
  """Each row's nearest other row (NaN distances ignored; ties: the first)."""
  d = np.array(d, np.float64)
  if d.ndim != 2 or d.shape[0] != d.shape[1] or d.shape[0] < 2:
    raise ValueError(f"Expected a square [T, T] distance matrix, T >= 2, got {d.shape}.")
  np.fill_diagonal(d, np.inf)
  return np.argmin(np.where(np.isnan(d), np.inf, d), axis=1)


def _family_codes(families: Sequence[Optional[str]]) -> np.ndarray:
  """Family labels as integer codes; -1 for tasks without a family (never a hit)."""
  labels = sorted({f for f in families if f is not None})
  return np.array([-1 if f is None else labels.index(f) for f in families])


def grouping_share(nn: np.ndarray, codes: np.ndarray) -> np.ndarray:
  """Share of grouped tasks (family of ≥ 2 tasks) whose nearest neighbour shares the family.

  ``codes`` ``[..., T]`` may carry leading batch axes (relabellings).
  """
  codes = np.asarray(codes)
  sizes = (codes[..., :, None] == codes[..., None, :]).sum(-1)
  counted = (codes >= 0) & (sizes >= 2)
  hit = counted & (codes == np.take_along_axis(codes, np.broadcast_to(nn, codes.shape), -1))
  return hit.sum(-1) / np.maximum(counted.sum(-1), 1)


def grouping_test(d, families: Sequence[Optional[str]],
                  n_permutations: Union[int, float] = DEFAULT_PERMUTATIONS,
                  seed: Optional[int] = 0) -> PermutationResult:
  """Nearest-neighbour grouping share against random relabellings of the families.

  ``families[t]``: task t's family (None: in none; it can still be a neighbour). The null
  permutes the labels over the tasks (family sizes kept); one-sided, greater.
  """
  nn = nearest_neighbour_indices(d)
  codes = _family_codes(families)
  if len(codes) != len(nn):
    raise ValueError(f"{len(codes)} family labels for {len(nn)} tasks.")
  if not ((codes[:, None] == codes[None]).sum(1)[codes >= 0] >= 2).any():
    raise ValueError("No family has two tasks: there is no grouping to test.")
  return _permutation("grouping share", (codes,), lambda c, axis: grouping_share(nn, c),
                      "pairings", "greater", n_permutations, seed)


def _ranks(x: np.ndarray) -> np.ndarray:
  return stats.rankdata(x, axis=-1)


def _pearson_last(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a = a - a.mean(-1, keepdims=True)
  b = b - b.mean(-1, keepdims=True)
  den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(den > 0, (a * b).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def spearman_rows(x, y) -> np.ndarray:
  """Spearman ρ along the last axis (average ranks for ties; NaN for a constant row)."""
  return _pearson_last(_ranks(np.asarray(x, np.float64)), _ranks(np.asarray(y, np.float64)))


def off_diagonal_rows(m) -> np.ndarray:
  """``[T, T]`` -> ``[T, T − 1]``: each row without its diagonal entry."""
  m = np.asarray(m, np.float64)
  t = m.shape[0]
  return m[~np.eye(t, dtype=bool)].reshape(t, t - 1)


def table3_test(delta, distance, n_permutations: Union[int, float] = DEFAULT_PERMUTATIONS,
                seed: Optional[int] = 0, alternative: str = "greater") -> PermutationResult:
  """Paper A's Table 3 entry, mean_i ρ(δ(i, ·), d(i, ·)), against permuted distance rows.

  Each task's off-diagonal distance row is permuted independently (δ fixed). Tasks with
  a constant δ or distance row (ρ undefined) are left out, as in the table.
  """
  dl, dd = off_diagonal_rows(delta), off_diagonal_rows(distance)
  if dl.shape != dd.shape or dl.shape[0] < 3:
    raise ValueError(f"delta and distance must be the same [T, T], T >= 3; got "
                     f"{np.shape(delta)} and {np.shape(distance)}.")
  if not (np.isfinite(dl).all() and np.isfinite(dd).all()):
    raise ValueError("table3_test: δ and the distance need finite off-diagonal entries.")
  rho = spearman_rows(dl, dd)
  keep = np.isfinite(rho)
  if not keep.any():
    raise ValueError("table3_test: every task's ρ is undefined (constant rows).")
  dl, dd = dl[keep], dd[keep]
  rank_delta = _ranks(dl)

  def statistic(*rows, axis):
    return np.nanmean(_pearson_last(rank_delta, _ranks(np.stack(rows, -2))), axis=-1)

  return _permutation("mean Spearman ρ(δ, d)", tuple(dd), statistic, "pairings", alternative,
                      n_permutations, seed)


def paired_test(a, b, name: str = "mean paired difference",
                n_permutations: Union[int, float] = DEFAULT_PERMUTATIONS,
                seed: Optional[int] = 0, alternative: str = "greater") -> PermutationResult:
  """Mean of ``a − b`` over paired items (tasks) against random swaps within pairs
  (sign flips of the differences). E.g. ``a`` = per-task ρ_cos, ``b`` = per-task ρ_L2:
  "cosine beats L2". Pairs with a NaN are left out."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"paired_test takes two vectors of one length, got {a.shape}, {b.shape}.")
  keep = np.isfinite(a) & np.isfinite(b)
  if keep.sum() < 2:
    raise ValueError("paired_test: fewer than two complete pairs.")
  return _permutation(name, (a[keep], b[keep]),
                      lambda x, y, axis: np.mean(x - y, axis=axis), "samples", alternative,
                      n_permutations, seed)


def trend_test(values, positions=None, alternative: str = "greater",
               name: str = "Spearman ρ(position, value)",
               n_permutations: Union[int, float] = DEFAULT_PERMUTATIONS,
               seed: Optional[int] = 0) -> PermutationResult:
  """A monotone trend: Spearman ρ between ``positions`` (default 0..n−1) and ``values``
  against permutations of the values. ``alternative="less"`` tests a decrease (CKA
  fading with depth), ``"greater"`` an increase. NaN values are left out."""
  y = np.asarray(values, np.float64)
  x = np.arange(len(y), dtype=np.float64) if positions is None else np.asarray(positions,
                                                                              np.float64)
  if x.shape != y.shape or y.ndim != 1:
    raise ValueError(f"trend_test: values and positions must be one vector each, got "
                     f"{y.shape} and {x.shape}.")
  keep = np.isfinite(y)
  if keep.sum() < 3:
    raise ValueError(f"trend_test: needs at least 3 finite values, got {int(keep.sum())}.")
  rx = _ranks(x[keep])
  return _permutation(name, (y[keep],), lambda v, axis: _pearson_last(rx, _ranks(v)),
                      "pairings", alternative, n_permutations, seed)


def sign_conflict_trend(per_n: Mapping[str, Mapping[str, float]],
                        n_permutations: Union[int, float] = DEFAULT_PERMUTATIONS,
                        seed: Optional[int] = 0) -> PermutationResult:
  """Sign conflicts grow with the number of merged task vectors: ``trend_test`` (greater)
  of the mean conflict share against n, from one top-k entry of ``ties.json``'s
  ``sign_conflicts`` (``{n: {"mean", "std", "subsets"}}``)."""
  ns = sorted(per_n, key=int)
  return trend_test([per_n[n]["mean"] for n in ns], [int(n) for n in ns], "greater",
                    "Spearman ρ(n task vectors, conflict share)", n_permutations, seed)


def table3_evidence(pairs: Mapping[str, Any], columns: Optional[Sequence[str]] = None,
                    n_permutations: Union[int, float] = DEFAULT_PERMUTATIONS,
                    seed: Optional[int] = 0) -> Dict[str, Dict[str, PermutationResult]]:
  """``table3_test`` of every module and distance column of a merge study's
  ``pairs_{method}.json`` document (``delta``, ``distances: {module: {column: [T, T]}}``),
  e.g. ``columns=("l2", "cos", "d_G", "cos 5+")`` (default: all)."""
  delta = np.asarray(pairs["delta"], np.float64)
  out: Dict[str, Dict[str, PermutationResult]] = {}
  for module, cols in pairs["distances"].items():
    out[module] = {c: table3_test(delta, np.asarray(cols[c], np.float64), n_permutations, seed)
                   for c in (columns or cols) if c in cols}
  return out


def metric_beats(pairs: Mapping[str, Any], module: str, better: str = "cos", worse: str = "l2",
                 n_permutations: Union[int, float] = DEFAULT_PERMUTATIONS,
                 seed: Optional[int] = 0) -> PermutationResult:
  """"``better`` correlates with δ more than ``worse``" (paper A: cosine vs L2) as
  ``paired_test`` of the per-task ρ of a ``pairs_{method}.json``'s ``spearman`` tables."""
  table = pairs["spearman"][module]
  return paired_test(table[better]["per_task"], table[worse]["per_task"],
                     f"mean ρ_{better} − ρ_{worse} ({module})", n_permutations, seed)


# --- chance levels and the "not evaluated" rule ------------------------------------------

def label_counts(labels, num_classes: int) -> np.ndarray:
  """Class counts ``[K]`` of integer labels."""
  y = np.asarray(labels).astype(int).reshape(-1)
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(f"Labels must lie in 0..{num_classes - 1}.")
  return np.bincount(y, minlength=num_classes)


def chance_level(metric: str, class_counts) -> float:
  """The score of the best constant predictor (from the test split's class counts).

  accuracy: the majority share; f1 (binary, positive class 1): the constant positive
  predictor, 2p / (1 + p); f1 with more classes and f1_macro: max over classes c of
  2p_c / (1 + p_c) / K (the other classes score 0); mcc, pearson, spearman: 0 (a constant
  predictor has none; sklearn returns 0).
  """
  if metric in ("mcc", "pearson", "spearman"):
    return 0.0
  counts = np.asarray(class_counts, np.float64)
  if counts.ndim != 1 or counts.size < 2 or counts.sum() <= 0 or (counts < 0).any():
    raise ValueError(f"class_counts must be ≥ 2 non-negative counts, got {class_counts}.")
  p = counts / counts.sum()
  if metric == "accuracy":
    return float(p.max())
  if metric == "f1" and p.size == 2:
    return float(2 * p[1] / (1 + p[1]))
  if metric in ("f1", "f1_macro"):
    return float(np.max(2 * p / (1 + p)) / p.size)
  raise ValueError(f"No chance level for metric {metric!r}.")


def task_chance_level(spec, test_labels) -> float:
  """``chance_level`` of a task's main metric (``spec``: a ``data.TaskSpec``) from the
  labels of its test split (regression tasks: 0)."""
  if spec.is_regression:
    return 0.0
  return chance_level(spec.main_metric, label_counts(test_labels, spec.num_labels))


def near_chance(scores: Mapping[str, float], chance: Mapping[str, float],
                margin: float = CHANCE_MARGIN) -> List[str]:
  """Models whose main metric is less than ``margin`` above their task's chance level
  (below chance included; a NaN score counts as near chance). Same keys in both."""
  missing = sorted(set(scores) - set(chance))
  if missing:
    raise ValueError(f"No chance level for {missing}.")
  return [m for m, s in scores.items()
          if not (np.isfinite(s) and float(s) >= float(chance[m]) + margin)]


def chance_rule(margin: float = CHANCE_MARGIN) -> str:
  return (f"a model is near chance when its main metric is less than {100 * margin:g} points "
          "above the score of the best constant predictor of its task (accuracy: majority "
          "share; F1: constant positive class; MCC: 0)")


@dataclasses.dataclass(frozen=True)
class Evaluability:
  """Whether a finding may be stated: ``evaluated`` is False when any of its models is
  near chance (``near_chance`` lists them)."""
  evaluated: bool
  near_chance: Sequence[str]
  rule: str

  def label(self) -> str:
    return "evaluated" if self.evaluated else (
        "not evaluated: near chance — " + ", ".join(self.near_chance))


MIN_LEARNT_TASKS = 4  # a finding judged on the learnt tasks alone needs at least this many


def learnt_runs(names: Sequence[str], evaluability: Optional[Evaluability]) -> List[int]:
  """Indices of the runs (``task[#k]``) whose task has no near-chance model (by
  ``evaluability``'s model keys ``task[#k]/method``): the rows a finding may rest on."""
  near = set() if evaluability is None else {
      task_of(str(k).split("/")[0]) for k in evaluability.near_chance}
  return [i for i, n in enumerate(names) if task_of(n) not in near]


def learnt_subset(names: Sequence[str], evaluability: Optional[Evaluability]
                  ) -> Optional[Tuple[List[int], Evaluability]]:
  """Where a finding on ``names`` is not evaluated (some model near chance): the runs it
  is also judged on (``learnt_runs``) and their ``Evaluability`` (evaluated), when they
  cover at least ``MIN_LEARNT_TASKS`` tasks and leave some run out; else None."""
  if evaluability is None or evaluability.evaluated:
    return None
  keep = learnt_runs(names, evaluability)
  if (len({task_of(names[i]) for i in keep}) < MIN_LEARNT_TASKS
      or len(keep) == len(names)):
    return None
  return keep, Evaluability(evaluated=True, near_chance=(), rule=evaluability.rule)


def not_evaluated(models: Sequence[str], scores: Mapping[str, float],
                  chance: Mapping[str, float], margin: float = CHANCE_MARGIN) -> Evaluability:
  """Is a finding resting on ``models`` evaluated? (See ``near_chance``.)"""
  near = near_chance({m: scores[m] for m in models}, {m: chance[m] for m in models}, margin)
  return Evaluability(evaluated=not near, near_chance=tuple(near), rule=chance_rule(margin))


# --- a finding, as the studies write it in their summaries -------------------------------

@dataclasses.dataclass(frozen=True)
class Finding:
  """One paper finding checked on measured numbers: what it claims, what was measured,
  the permutation tests that judge it, and whether it may be judged at all.

  ``verdict`` comes from the p-values only: "not evaluated" when a model it rests on is
  near chance (``evaluability``); "not counted" when a grouping's between-family
  distances do not clear the seed floor (``floor``); otherwise each test's verdict at
  ``level``; "descriptive" when there is no test.
  """
  claim: str
  measured: str
  tests: Sequence[PermutationResult] = ()
  evaluability: Optional[Evaluability] = None
  floor: Optional[FloorCheck] = None
  level: float = DEFAULT_LEVEL
  untested: str = ""    # why there is no test (e.g. too few points), when there is none

  def verdict(self) -> str:
    if self.evaluability is not None and not self.evaluability.evaluated:
      return self.evaluability.label()
    if self.floor is not None and not self.floor.clears:
      return (f"not counted: the mean between-family distance {self.floor.between_family_mean:.3g} "
              f"does not clear the seed floor {self.floor.floor:.3g}")
    if not self.tests:
      return "descriptive (no test" + (f": {self.untested})" if self.untested else ")")
    return "; ".join(f"{t.name}: {t.verdict(self.level)}" for t in self.tests)

  def to_dict(self) -> Dict[str, Any]:
    ev = self.evaluability
    out = {"claim": self.claim, "measured": self.measured, "level": self.level,
           "tests": [dict(t.to_dict(self.level), describe=t.describe(self.level))
                     for t in self.tests],
           "evaluated": True if ev is None else ev.evaluated,
           "near_chance": [] if ev is None else list(ev.near_chance),
           "chance_rule": chance_rule() if ev is None else ev.rule,
           "verdict": self.verdict()}
    if self.floor is not None:
      out["seed_floor"] = dataclasses.asdict(self.floor)
    return out


def safe_test(fn, *args, **kwargs) -> Optional[PermutationResult]:
  """``fn(*args, **kwargs)``, or None when the test is undefined on these numbers (it
  raises ValueError: too few tasks, constant rows...)."""
  try:
    return fn(*args, **kwargs)
  except ValueError:
    return None
