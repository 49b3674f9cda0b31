"""Findings of the distance step (paper A, Figures 2-4), with their evidence.

``distance_findings(arrays, names)`` reads one ``distances.npz`` (rows: runs; a task
trained with several seeds has rows ``task``, ``task#2``...) and returns the summary
the study writes beside it (``distances/<method>/summary.json``):

* ``grouping``: per module × metric, the share of tasks whose nearest neighbour (layer
  mean T̄, runs collapsed to tasks with ``evidence.task_mean_matrix``) is in its paper
  family, the uniform chance share, and ``evidence.grouping_test``'s p-value;
* ``seed_floor`` (several seeds only): per ``module/factor/metric``, the same-task,
  different-seed floor beside the mean between-task distance, per layer
  (``evidence.seed_floor``), and per grouping row ``evidence.clears_floor``: a grouping
  counts only where the mean between-family distance clears the floor;
* ``figure4``: per module, Spearman ρ of cos(B) and cos(A) against cos(BA) (LoRA);
* ``findings``: ``evidence.Finding`` dicts (claim, measured, tests, verdict).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from tvgeo_jax.studies import evidence, findings as findings_lib

METRICS = ("l2", "cosine", "grassmann")


def _layer_mean(d) -> np.ndarray:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)    # all-NaN entries stay NaN
    return np.nanmean(np.asarray(d, np.float64), axis=-1)


def has_seeds(names: Sequence[str]) -> bool:
  tasks = [evidence.task_of(n) for n in names]
  return len(set(tasks)) < len(tasks)


def _grouping(arrays, names, module, seeds, n_permutations, suffix=""):
  """Per metric of ``module``: the grouping row (share, chance, p-value, seed floor)."""
  fam_of_task = {evidence.task_of(n): f for n, f in zip(names, evidence.paper_families(names))}
  rows: Dict[str, Dict[str, Any]] = {}
  for metric in METRICS:
    key = f"{module}/product/{metric}"
    if key not in arrays:
      continue
    d_runs = _layer_mean(arrays[key])
    d, tasks = evidence.task_mean_matrix(d_runs, names) if seeds else (d_runs, names)
    g = findings_lib.group_agreement(d, tasks)
    test = evidence.safe_test(evidence.grouping_test, d, evidence.paper_families(tasks),
                              n_permutations)
    if test is not None:
      test = dataclasses.replace(test, name=f"grouping share, {metric} ({module}{suffix})")
    row = {"module": module, "metric": metric, "share": g["share"], "chance": g["chance"],
           "per_group": findings_lib.describe_groups(g),
           "test": None if test is None else test.to_dict()}
    floor = None
    if seeds:
      try:
        floor = evidence.clears_floor(d_runs, names, fam_of_task)
        row["seed_floor"] = {"floor": floor.floor,
                             "between_family_mean": floor.between_family_mean,
                             "share_above": floor.share_above, "clears": floor.clears}
      except ValueError:
        pass
    rows[metric] = dict(row, _test=test, _floor=floor)
  return rows


def _cosine_vs_l2(row_of, module, method, evaluability, what=""):
  cos, l2 = row_of.get("cosine"), row_of.get("l2")
  if not (cos and l2):
    return None
  tests = tuple(t for t in (cos["_test"], l2["_test"]) if t is not None)
  measured = (f"{module}{what}: grouping share cosine {cos['share']:.2f} vs L2 "
              f"{l2['share']:.2f} (chance {cos['chance']:.2f}); cosine groups better than L2 "
              f"by {cos['share'] - l2['share']:+.2f}")
  if cos["_floor"] is not None:
    f = cos["_floor"]
    measured += (f"; cosine seed floor {f.floor:.3g} vs mean between-family distance "
                 f"{f.between_family_mean:.3g} ({100 * f.share_above:.0f}% of "
                 "between-family pairs above it)")
  return evidence.Finding(
      claim=f"(paper A: cosine groups related tasks, L2 does not; {method}, {module}{what})",
      measured=measured, tests=tests, evaluability=evaluability, floor=cos["_floor"],
      untested="no paper family has two of these tasks").to_dict()


def distance_findings(arrays: Mapping[str, Any], names: Sequence[str], *, method: str = "",
                      evaluability: Optional[evidence.Evaluability] = None,
                      n_permutations: int = evidence.DEFAULT_PERMUTATIONS) -> Dict[str, Any]:
  """The summary of one distance step (see the module docstring).

  Where some models are near chance, the grouping finding on every task is "not
  evaluated"; it is then also computed on the tasks whose models learnt
  (``evidence.learnt_subset``), as a finding of its own.
  """
  names = [str(n) for n in names]
  seeds = has_seeds(names)
  modules = list(dict.fromkeys(k.split("/")[0] for k in evidence.distance_keys(arrays)))
  out: Dict[str, Any] = {"method": method, "runs": names, "seeds": seeds, "grouping": [],
                         "figure4": [], "findings": []}
  if seeds:
    out["seed_floor"] = {k: v.to_dict() for k, v in evidence.seed_floors(arrays, names).items()}
  learnt = evidence.learnt_subset(names, evaluability)
  if learnt:
    keep, learnt_ev = learnt
    kept = [names[i] for i in keep]
    sub = evidence.select_runs(arrays, keep)
    out["learnt_tasks"] = list(dict.fromkeys(evidence.task_of(n) for n in kept))
  for module in modules:
    row_of = _grouping(arrays, names, module, seeds, n_permutations)
    out["grouping"].extend({k: v for k, v in r.items() if not k.startswith("_")}
                           for r in row_of.values())
    finding = _cosine_vs_l2(row_of, module, method, evaluability)
    if finding:
      out["findings"].append(finding)
    if learnt:
      what = f", the {len(out['learnt_tasks'])} tasks above chance"
      rows = _grouping(sub, kept, module, has_seeds(kept), n_permutations, what)
      out.setdefault("grouping_learnt", []).extend(
          {k: v for k, v in r.items() if not k.startswith("_")} for r in rows.values())
      finding = _cosine_vs_l2(rows, module, method, learnt_ev, what)
      if finding:
        out["findings"].append(finding)
  for module in modules:
    keys = [f"{module}/{f}/cosine" for f in ("a", "b", "product")]
    if not all(k in arrays for k in keys):
      continue
    mats = []
    for k in keys:
      d = _layer_mean(arrays[k])
      mats.append(evidence.task_mean_matrix(d, names)[0] if seeds else d)
    r = findings_lib.factor_resemblance(*mats)
    out["figure4"].append({"module": module, **r})
  if out["figure4"]:
    v = [r["B_resembles_BA_more"] for r in out["figure4"]]
    out["findings"].append(evidence.Finding(
        claim="(paper A, Figure 4: B alone resembles BA, A alone does not)",
        measured=f"B closer to BA than A for {sum(v)} of {len(v)} modules (ρ of the pairwise "
                 "cosine distances; A and B alone are not identifiable: B·M, M⁻¹·A give the "
                 "same ΔW, col(B) is)", evaluability=evaluability,
        untested="one ρ per module").to_dict())
  return out
