"""Evaluation metrics: GLUE's official ones and per-class reports, via scikit-learn/scipy.

Metric names (``METRICS``):

* ``accuracy``.
* ``mcc``: Matthews correlation (CoLA).
* ``f1``: binary tasks: F1 of the positive class (label 1), as GLUE scores MRPC and QQP;
  tasks with more than two classes: macro-averaged F1.
* ``f1_macro``: macro-averaged F1 whatever the number of classes.
* ``pearson``, ``spearman``: correlations for regression (STS-B).

GLUE reports two numbers for MRPC/QQP (F1 and accuracy) and STS-B (Pearson and
Spearman); ask for both. ``main`` is the one a paper table shows: by default the first
requested name, so the task registry's order (CoLA ``mcc``; MRPC/QQP ``f1`` then
``accuracy``; STS-B ``pearson`` then ``spearman``; the rest ``accuracy``) sets it, or
pass ``main=`` explicitly. For every classification task the result also holds the
per-class precision/recall/F1/support and the confusion matrix, raw and row-normalised
(true class per row), as paper D reports them.

``weights`` follow the batch convention: 0 marks padding rows of a final partial
batch, which are dropped; every other row must have weight 1.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Optional, Sequence

import numpy as np
import scipy.stats
from sklearn import metrics as skm

CLASSIFICATION_METRICS = ("accuracy", "mcc", "f1", "f1_macro")
REGRESSION_METRICS = ("pearson", "spearman")
METRICS = CLASSIFICATION_METRICS + REGRESSION_METRICS


def _mask(weights, n: int) -> np.ndarray:
  if weights is None:
    return np.ones(n, bool)
  w = np.asarray(weights, np.float64).reshape(-1)
  if w.shape[0] != n:
    raise ValueError(f"weights has {w.shape[0]} rows but there are {n} examples.")
  if not np.all((w == 0) | (w == 1)):
    raise ValueError("weights must be 0 (padding rows, dropped) or 1 (real examples); "
                     f"got values {np.unique(w)[:5]}. Class weights belong in the loss.")
  return w == 1


def _check_names(metric_names: Sequence[str]) -> list:
  if isinstance(metric_names, str):
    metric_names = [metric_names]
  names = list(metric_names)
  if not names:
    raise ValueError(f"No metric requested; choose from {METRICS}.")
  bad = [m for m in names if m not in METRICS]
  if bad:
    raise ValueError(f"Unknown metric(s) {bad}; choose from {METRICS}.")
  kinds = {m in REGRESSION_METRICS for m in names}
  if len(kinds) > 1:
    raise ValueError(f"Cannot mix classification {CLASSIFICATION_METRICS} and regression "
                     f"{REGRESSION_METRICS} metrics in one call; got {names}.")
  return names


def class_predictions(predictions_or_logits, num_classes: Optional[int] = None):
  """(predicted class ids [n], number of classes) from logits ``[n, K]`` or ids ``[n]``."""
  p = np.asarray(predictions_or_logits)
  if p.ndim == 2:
    if p.shape[1] < 2:
      raise ValueError(f"Classification logits need >= 2 columns; got shape {p.shape}. "
                       "For a regression head ask for 'pearson'/'spearman'.")
    return np.argmax(p, axis=1).astype(np.int64), int(p.shape[1])
  if p.ndim != 1:
    raise ValueError(f"Expected logits [n, classes] or class ids [n]; got shape {p.shape}.")
  if not np.all(np.equal(np.mod(p, 1), 0)):
    raise ValueError("1-D predictions must be integer class ids; pass logits [n, classes] "
                     "to take the argmax.")
  return p.astype(np.int64), num_classes


def _int_labels(labels) -> np.ndarray:
  y = np.asarray(labels).reshape(-1)
  if not np.all(np.equal(np.mod(y, 1), 0)):
    raise ValueError("Classification labels must be integer class ids.")
  return y.astype(np.int64)


def _scored_rows(pred: np.ndarray, y: np.ndarray, weights):
  """Check predictions and labels align, drop weight-0 (padding) rows, refuse an empty set."""
  if pred.shape[0] != y.shape[0]:
    raise ValueError(f"{pred.shape[0]} predictions but {y.shape[0]} labels.")
  keep = _mask(weights, y.shape[0])
  pred, y = pred[keep], y[keep]
  if y.size == 0:
    raise ValueError("No example left to score (all weights are 0).")
  return pred, y


def _prepare_classification(predictions_or_logits, labels, weights, label_names):
  k_names = len(label_names) if label_names else None
  pred, k = class_predictions(predictions_or_logits, k_names)
  y = _int_labels(labels)
  pred, y = _scored_rows(pred, y, weights)
  if k is None:
    k = int(max(y.max(), pred.max(), 1)) + 1
  if k_names is not None and k_names != k:
    raise ValueError(f"{k_names} label_names for {k} classes.")
  if y.min() < 0 or y.max() >= k or pred.min() < 0 or pred.max() >= k:
    raise ValueError(f"Labels/predictions outside 0..{k - 1}.")
  return pred, y, k


def _names(label_names, k: int) -> list:
  return list(label_names) if label_names else [str(i) for i in range(k)]


def confusion_matrices(pred: np.ndarray, y: np.ndarray, k: int) -> Dict[str, list]:
  """Raw counts and the row-normalised matrix (rows: true class; empty rows stay 0)."""
  cm = skm.confusion_matrix(y, pred, labels=list(range(k)))
  rows = cm.sum(axis=1, keepdims=True)
  norm = np.divide(cm, rows, out=np.zeros(cm.shape, np.float64), where=rows > 0)
  return {"confusion_matrix": cm.astype(int).tolist(),
          "confusion_matrix_normalized": norm.tolist()}


def classification_report_dict(predictions_or_logits, labels, weights=None,
                               label_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  """Per-class precision/recall/F1/support, averages and confusion matrices.

  Returns sklearn's ``classification_report(output_dict=True)`` layout (a dict per
  class name, plus ``accuracy``, ``macro avg`` and ``weighted avg``) with
  ``labels``/``label_names`` and both confusion matrices added. Classes absent from
  both labels and predictions score 0 (``zero_division=0``).
  """
  pred, y, k = _prepare_classification(predictions_or_logits, labels, weights, label_names)
  names = _names(label_names, k)
  report = skm.classification_report(y, pred, labels=list(range(k)), target_names=names,
                                     output_dict=True, zero_division=0)
  report = {key: ({m: float(v) for m, v in val.items()} if isinstance(val, dict) else
                  float(val)) for key, val in report.items()}
  report.setdefault("accuracy", float(skm.accuracy_score(y, pred)))
  report["label_names"] = names
  report.update(confusion_matrices(pred, y, k))
  return report


def _correlation(fn, a: np.ndarray, b: np.ndarray) -> float:
  if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
    return float("nan")  # undefined for constant inputs
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return float(fn(a, b)[0])


def compute_metrics(metric_names: Sequence[str], predictions_or_logits, labels,
                    weights=None, label_names: Optional[Sequence[str]] = None,
                    main: Optional[str] = None, details: bool = True) -> Dict[str, Any]:
  """Scores of one evaluation split.

  Args:
    metric_names: names from ``METRICS`` (all classification or all regression).
    predictions_or_logits: classification: logits ``[n, K]`` (argmax taken) or class
      ids ``[n]``; regression: predicted values ``[n]`` or ``[n, 1]``.
    labels: ``[n]`` true class ids or values.
    weights: ``[n]`` of 0 (padding, dropped) / 1; None keeps every row.
    label_names: class names in index order (sets the number of classes when
      predictions are ids; names the per-class entries).
    main: which requested metric is the headline ``"main"`` value; default the first.
    details: add the per-class report and confusion matrices (classification only).

  Returns:
    ``{metric: float, ..., "main": float, "main_metric": name, "num_scored": n}`` and,
    for classification with ``details``, ``"per_class"`` (``{class name: {precision,
    recall, f1-score, support}}``), ``"confusion_matrix"`` and
    ``"confusion_matrix_normalized"``. Values are plain Python types (JSON-ready).
  """
  names = _check_names(metric_names)
  main = names[0] if main is None else main
  if main not in names:
    raise ValueError(f"main metric {main!r} is not among the requested {names}.")
  out: Dict[str, Any] = {}
  if names[0] in REGRESSION_METRICS:
    p = np.asarray(predictions_or_logits, np.float64)
    if p.ndim == 2 and p.shape[1] == 1:
      p = p[:, 0]
    if p.ndim != 1:
      raise ValueError(f"Regression predictions must be [n] or [n, 1]; got {p.shape}.")
    y = np.asarray(labels, np.float64).reshape(-1)
    p, y = _scored_rows(p, y, weights)
    fns = {"pearson": scipy.stats.pearsonr, "spearman": scipy.stats.spearmanr}
    for m in names:
      out[m] = _correlation(fns[m], p, y)
  else:
    pred, y, k = _prepare_classification(predictions_or_logits, labels, weights, label_names)
    for m in names:
      if m == "accuracy":
        out[m] = float(skm.accuracy_score(y, pred))
      elif m == "mcc":
        out[m] = float(skm.matthews_corrcoef(y, pred))
      elif m == "f1" and k == 2:
        out[m] = float(skm.f1_score(y, pred, pos_label=1, average="binary", zero_division=0))
      else:  # f1 with > 2 classes, f1_macro
        out[m] = float(skm.f1_score(y, pred, labels=list(range(k)), average="macro",
                                    zero_division=0))
    if details:
      report = classification_report_dict(pred, y, label_names=_names(label_names, k))
      out["per_class"] = {n: report[n] for n in report["label_names"]}
      out["confusion_matrix"] = report["confusion_matrix"]
      out["confusion_matrix_normalized"] = report["confusion_matrix_normalized"]
  out["main"] = out[main]
  out["main_metric"] = main
  out["num_scored"] = int(y.shape[0])
  return out
