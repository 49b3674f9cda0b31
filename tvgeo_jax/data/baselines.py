"""Bag-of-words baselines: how much of a task's label a word list can read.

``bag_of_words_baseline`` fits a scikit-learn logistic regression (ridge regression for
STS-B-style targets) on token counts of the training split and scores the test split
with the task's metrics. Words of a pair are counted per side (``a:word``, ``b:word``),
so the baseline knows which sentence a word came from but not how the two relate: on a
pair task whose label is a relation between the sentences it should stay near chance,
and a fine-tuned model that beats it has learnt the relation, not a word list.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
from tvgeo_jax.core import metrics
from tvgeo_jax.data import get_task, load_task_data

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def bag_of_words_docs(texts: Sequence[Tuple[str, ...]]) -> list:
  """One whitespace-joined document per example; words of a pair tagged by side."""
  out = []
  for t in texts:
    if len(t) == 1:
      out.append(" ".join(_WORD.findall(t[0].lower())))
    else:
      out.append(" ".join(f"{side}:{w}" for side, s in zip("ab", t)
                          for w in _WORD.findall(s.lower())))
  return out


def bag_of_words_baseline(task: str, seed: int = 0, scale: float = 1.0,
                          train_scale: float = 1.0,
                          splits: Optional[Dict[str, Tuple[Sequence, np.ndarray]]] = None,
                          ngram: int = 1, c: float = 1.0) -> Dict[str, Any]:
  """Test metrics of a bag-of-words model fit on the training split of ``task``.

  Args:
    task: a registered task name (its metrics and main metric score the baseline).
    seed, scale, train_scale: passed to ``tvgeo_jax.data.load_task_data`` when
      ``splits`` is None (the training examples the fine-tuned model had).
    splits: ``{"train": (texts, labels), "test": (texts, labels)}`` to use instead.
    ngram: 1 counts words; 2 also counts word bigrams (a word-order check).
    c: inverse regularisation strength of the logistic regression.

  Returns:
    ``tvgeo_jax.core.metrics.compute_metrics``'s dict for the test split (``main`` is the
    task's headline metric) plus ``train_main``, the same metric on the training split.
  """
  from sklearn.feature_extraction.text import CountVectorizer
  from sklearn.linear_model import LogisticRegression, Ridge

  spec = get_task(task)
  if splits is None:
    d = load_task_data(spec.name, seed=seed, scale=scale, train_scale=train_scale)
    splits = {s: (d[s].texts, d[s].labels) for s in ("train", "test")}
  (tr_x, tr_y), (te_x, te_y) = splits["train"], splits["test"]
  vec = CountVectorizer(token_pattern=r"\S+", lowercase=False, ngram_range=(1, ngram))
  xtr = vec.fit_transform(bag_of_words_docs(tr_x))
  xte = vec.transform(bag_of_words_docs(te_x))
  if spec.is_regression:
    model = Ridge(alpha=1.0 / c).fit(xtr, tr_y)
  else:
    model = LogisticRegression(C=c, max_iter=5000).fit(xtr, tr_y)
  res = metrics.compute_metrics(list(spec.metrics), model.predict(xte), np.asarray(te_y),
                                label_names=list(spec.label_names) or None,
                                main=spec.main_metric, details=False)
  train = metrics.compute_metrics(list(spec.metrics), model.predict(xtr), np.asarray(tr_y),
                                  label_names=list(spec.label_names) or None,
                                  main=spec.main_metric, details=False)
  res["train_main"] = train["main"]
  return res
