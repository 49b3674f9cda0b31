"""Table 2 as a study: every model's test score beside its task's chance level, paper A's
score (real tasks) and, for synthetic tasks, the bag-of-words baseline.

``score_study`` writes ``scores/summary.json``: one record per model (task, method,
seed, run, main metric, chance level, near chance or not, bag-of-words score), paper A's
Table 2 numbers, the chance rule (``evidence.chance_rule``) and the "LoRA matches full
fine-tuning" finding. The other studies read the near-chance list from it
(``evaluability``): a finding that rests on near-chance models is "not evaluated".
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from tvgeo_jax import data
from tvgeo_jax.core import io_utils
from tvgeo_jax.data import baselines
from tvgeo_jax.studies import evidence
from tvgeo_jax.training import runs

SUMMARY = "summary.json"

# Paper A, Table 2 (roberta-base, ×100; GLUE dev sets; CoLA MCC, MRPC/QQP F1, else accuracy).
PAPER_A_TABLE2 = {
    "full": {"cola": 56.36, "mrpc": 85.78, "rte": 69.66, "qnli": 91.87, "qqp": 86.36,
             "mnli": 85.75, "sst2": 93.69, "snli": 90.61, "yelp": 97.73, "imdb": 93.95},
    "lora": {"cola": 54.98, "mrpc": 86.52, "rte": 71.84, "qnli": 92.28, "qqp": 86.02,
             "mnli": 86.73, "sst2": 93.92, "snli": 90.61, "yelp": 98.01, "imdb": 95.34},
}


def model_key(task: str, method: str, seed_index: int = 0) -> str:
  """``"sst2/lora"`` for the first seed, ``"sst2#2/lora"`` for the second (the names
  ``sources.load_sources`` gives repeated tasks)."""
  return f"{task}/{method}" if seed_index == 0 else f"{task}#{seed_index + 1}/{method}"


def model_record(run_dir: str) -> Dict[str, Any]:
  """A finished run's test main metric and its task's chance level (from the labels of
  the test split the run was scored on)."""
  res = io_utils.read_json(os.path.join(run_dir, runs.RESULTS))
  cfg = res["config"]
  spec = data.get_task(cfg["task"])
  split = data.load_task_data(spec.name, data_dir=cfg.get("data_dir"), seed=cfg["seed"],
                              scale=cfg.get("data_scale", 1.0),
                              revision=cfg.get("data_revision"))["test"]
  main = res["metrics"]["test"].get("main")
  return {"task": spec.name, "method": cfg["method"], "seed": cfg["seed"], "run": run_dir,
          "main": None if main is None else float(main), "main_metric": spec.main_metric,
          "chance": evidence.task_chance_level(spec, split.labels)}


def score_study(models: Mapping[str, str], out_dir: str, *, bag_of_words: bool = True,
                margin: float = evidence.CHANCE_MARGIN) -> Dict[str, Any]:
  """``models``: ``{model_key: run dir}`` of finished runs. Writes and returns the summary."""
  records = {k: model_record(d) for k, d in models.items()}
  near = evidence.near_chance({k: np.nan if r["main"] is None else r["main"]
                               for k, r in records.items()},
                              {k: r["chance"] for k, r in records.items()}, margin)
  for k, r in records.items():
    r["near_chance"] = k in near
    r["paper_a"] = PAPER_A_TABLE2.get(r["method"], {}).get(r["task"])
  bow: Dict[str, Optional[float]] = {}
  if bag_of_words:
    for k, r in records.items():
      if data.get_task(r["task"]).is_synthetic and k.split("/")[0] == r["task"] \
          and r["task"] not in bow:
        # One baseline per task, on its first model's training rows (the study lists full
        # FT first; a method with a larger train_scale trained on more rows than this).
        cfg = io_utils.read_json(os.path.join(r["run"], runs.RESULTS))["config"]
        bow[r["task"]] = float(baselines.bag_of_words_baseline(
            r["task"], seed=cfg["seed"], scale=cfg.get("data_scale", 1.0),
            train_scale=cfg.get("train_scale", 1.0))["main"])
  summary = {"models": records, "bag_of_words": bow, "paper_a_table2": PAPER_A_TABLE2,
             "chance_rule": evidence.chance_rule(margin), "margin": margin,
             "near_chance": near, "findings": [f.to_dict() for f in findings(records)]}
  os.makedirs(out_dir, exist_ok=True)
  io_utils.atomic_write_json(os.path.join(out_dir, SUMMARY), summary)
  return summary


def findings(records: Mapping[str, Mapping[str, Any]]) -> List[evidence.Finding]:
  """Paper A: LoRA matches full fine-tuning (first seeds; paired test over tasks)."""
  full = {r["task"]: (k, r["main"]) for k, r in records.items()
          if r["method"] == "full" and "#" not in k and r["main"] is not None}
  lora = {r["task"]: (k, r["main"]) for k, r in records.items()
          if r["method"] == "lora" and "#" not in k and r["main"] is not None}
  tasks = [t for t in full if t in lora]
  if not tasks:
    return []
  diff = np.array([100 * (lora[t][1] - full[t][1]) for t in tasks])
  test = evidence.safe_test(evidence.paired_test, [100 * lora[t][1] for t in tasks],
                            [100 * full[t][1] for t in tasks],
                            "mean LoRA − full (points)", alternative="two-sided")
  models = [lora[t][0] for t in tasks] + [full[t][0] for t in tasks]
  return [evidence.Finding(
      claim="(paper A: LoRA matches full fine-tuning within about a point; tested: do they "
            "differ?)",
      measured=f"mean LoRA − full = {diff.mean():+.2f} points over {len(tasks)} tasks; within "
               f"2 points on {int((np.abs(diff) <= 2).sum())} of {len(tasks)}",
      tests=tuple(t for t in (test,) if t is not None),
      evaluability=evaluability_of(records, models))]


def evaluability_of(records: Mapping[str, Mapping[str, Any]], models: Sequence[str]
                    ) -> evidence.Evaluability:
  """``evidence.not_evaluated`` of ``models`` (keys of ``records``)."""
  return evidence.not_evaluated(
      list(models), {k: np.nan if records[k]["main"] is None else records[k]["main"]
                     for k in models}, {k: records[k]["chance"] for k in models})


def evaluability(summary: Optional[Mapping[str, Any]], models: Sequence[str]
                 ) -> Optional[evidence.Evaluability]:
  """The same from a written summary (None when there is none, or it lacks a model)."""
  if not summary or any(m not in summary["models"] for m in models):
    return None
  return evaluability_of(summary["models"], models)


def read_summary(out_dir: str) -> Optional[Dict[str, Any]]:
  path = os.path.join(out_dir, SUMMARY)
  return io_utils.read_json(path) if os.path.exists(path) else None
