"""The task registry: what each task is (source, text fields, labels, metrics, splits).

Real tasks are paper A's ten (GLUE CoLA, SST-2, MRPC, QQP, MNLI, QNLI, RTE, plus SNLI,
YELP polarity, IMDB) and paper B's STS-B, loaded from the Hugging Face hub or a local copy.
Every real task has a procedurally generated offline counterpart ``synth_<task>``;
``synth_authorship`` mirrors paper D's 4-writer classification.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

# Split policies. Both carve validation out of train (90/10, fixed seed).
GLUE_DEV_AS_TEST = "glue_dev_as_test"  # the GLUE dev split is the test set
OWN_TEST = "own_test"                  # the dataset's own test split is the test set

METRICS = ("accuracy", "mcc", "f1", "pearson", "spearman")
VALIDATION_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """Everything the loaders, the pipeline and the metrics need to know about a task.

  Attributes:
    name: registry key (``qnli``, ``synth_qnli``...).
    source: ``glue`` / ``hub`` (the Hugging Face hub) or ``synthetic``.
    hub_path: hub dataset id (``nyu-mll/glue``); None for synthetic tasks.
    hub_config: configuration / sub-directory of the hub repo (``qnli``, ``plain_text``).
    text_fields: one column (single sentence) or two (sentence pair).
    label_names: class names in label-index order; empty for regression.
    is_regression: True for STS-B-like tasks (float label in [0, 5]).
    metrics: metric names computed at evaluation, from ``METRICS``.
    main_metric: the metric reported in the paper's tables.
    split_policy: ``GLUE_DEV_AS_TEST`` or ``OWN_TEST``.
    test_split: the source split that becomes our test set.
    counterpart: the real task a synthetic one mirrors (or vice versa).
  """
  name: str
  source: str
  text_fields: Tuple[str, ...]
  label_names: Tuple[str, ...]
  metrics: Tuple[str, ...]
  main_metric: str
  is_regression: bool = False
  hub_path: Optional[str] = None
  hub_config: Optional[str] = None
  split_policy: str = GLUE_DEV_AS_TEST
  test_split: str = "validation"
  counterpart: Optional[str] = None

  def __post_init__(self):
    if self.source not in ("glue", "hub", "synthetic"):
      raise ValueError(f"Task {self.name}: unknown source {self.source!r}.")
    if len(self.text_fields) not in (1, 2):
      raise ValueError(f"Task {self.name}: needs one or two text fields.")
    if self.is_regression == bool(self.label_names):
      raise ValueError(f"Task {self.name}: regression tasks have no label names, "
                       "classification tasks need them.")
    bad = [m for m in self.metrics if m not in METRICS]
    if bad or self.main_metric not in self.metrics:
      raise ValueError(f"Task {self.name}: metrics {self.metrics} / main "
                       f"{self.main_metric!r} must come from {METRICS}.")

  @property
  def num_labels(self) -> int:
    """Output width of the classification head (1 for regression)."""
    return 1 if self.is_regression else len(self.label_names)

  @property
  def is_pair(self) -> bool:
    return len(self.text_fields) == 2

  @property
  def is_synthetic(self) -> bool:
    return self.source == "synthetic"


_NLI3 = ("entailment", "neutral", "contradiction")
_NLI2 = ("entailment", "not_entailment")
_ACC = ("accuracy",)
_F1 = ("f1", "accuracy")
_CORR = ("pearson", "spearman")


def _glue(name, fields, labels, metrics=_ACC, main="accuracy", regression=False,
          test_split="validation"):
  return TaskSpec(name=name, source="glue", hub_path="nyu-mll/glue", hub_config=name,
                  text_fields=fields, label_names=labels, metrics=metrics, main_metric=main,
                  is_regression=regression, split_policy=GLUE_DEV_AS_TEST,
                  test_split=test_split, counterpart="synth_" + name)


def _hub(name, path, fields, labels):
  return TaskSpec(name=name, source="hub", hub_path=path, hub_config="plain_text",
                  text_fields=fields, label_names=labels, metrics=_ACC, main_metric="accuracy",
                  split_policy=OWN_TEST, test_split="test", counterpart="synth_" + name)


_REAL = (
    _glue("cola", ("sentence",), ("unacceptable", "acceptable"), ("mcc", "accuracy"), "mcc"),
    _glue("sst2", ("sentence",), ("negative", "positive")),
    _glue("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), _F1, "f1"),
    _glue("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), _F1, "f1"),
    _glue("stsb", ("sentence1", "sentence2"), (), _CORR, "pearson", regression=True),
    _glue("mnli", ("premise", "hypothesis"), _NLI3, test_split="validation_matched"),
    _glue("qnli", ("question", "sentence"), _NLI2),
    _glue("rte", ("sentence1", "sentence2"), _NLI2),
    _hub("snli", "stanfordnlp/snli", ("premise", "hypothesis"), _NLI3),
    _hub("yelp", "fancyzhx/yelp_polarity", ("text",), ("negative", "positive")),
    _hub("imdb", "stanfordnlp/imdb", ("text",), ("neg", "pos")),
)


def _synth(real: TaskSpec) -> TaskSpec:
  return dataclasses.replace(real, name="synth_" + real.name, source="synthetic",
                             hub_path=None, hub_config=None, split_policy=OWN_TEST,
                             test_split="test", counterpart=real.name)


AUTHORSHIP_WRITERS = ("chatgpt", "davinci", "cohere", "human")
AUTHORSHIP_REFERENCE = "human"

_SYNTH = tuple(_synth(t) for t in _REAL) + (
    TaskSpec(name="synth_authorship", source="synthetic", text_fields=("text",),
             label_names=AUTHORSHIP_WRITERS, metrics=("accuracy", "f1"),
             main_metric="accuracy", split_policy=OWN_TEST, test_split="test"),
)

TASKS: Dict[str, TaskSpec] = {t.name: t for t in _REAL + _SYNTH}

# Paper A's ten tasks (STS-B belongs to paper B) and their offline counterparts.
PAPER_TASKS: Tuple[str, ...] = ("cola", "mrpc", "rte", "qnli", "qqp", "mnli", "sst2", "snli",
                                "yelp", "imdb")
SYNTH_PAPER_TASKS: Tuple[str, ...] = tuple("synth_" + t for t in PAPER_TASKS)


def list_tasks(source: Optional[str] = None) -> List[str]:
  """Names of the registered tasks, optionally only those of one source."""
  return [n for n, t in TASKS.items() if source is None or t.source == source]


def get_task(name: str) -> TaskSpec:
  """The TaskSpec of ``name``; a ValueError lists the valid names otherwise."""
  if isinstance(name, TaskSpec):
    return name
  key = str(name).strip().lower().replace("-", "_")
  key = {"sst_2": "sst2", "sts_b": "stsb", "yelp_polarity": "yelp"}.get(key, key)
  if key not in TASKS:
    raise ValueError(f"Unknown task {name!r}. Valid tasks: real {', '.join(list_tasks('glue'))}, "
                     f"{', '.join(list_tasks('hub'))}; offline synthetic "
                     f"{', '.join(list_tasks('synthetic'))}.")
  return TASKS[key]
