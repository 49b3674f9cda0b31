"""Linear probes on a frozen base: can a pair task's relation be read off its states?

The diagnostics behind ``benchmarks.probe_pairs`` (BUILD_NOTES, issue 19, session 10):

* ``relation_probe``: logistic regression on the first token's state of every layer
  (concatenated) and on the mean over tokens of every layer, fitted on a synthetic pair
  task's train split and scored on its test split (the task's main metric);
* ``cross_occurrence_probe``: per content token of the pretraining corpus's held-out pairs,
  does its word occur in the other text (what ``PretrainConfig.pair_match`` trains)? A
  logistic regression on each layer's token states, beside the best a probe can do from
  the token's identity alone.
"""
from __future__ import annotations

from typing import Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tvgeo_jax.analysis.cka import layer_representations
from tvgeo_jax.core import metrics
from tvgeo_jax.data import get_task, load_tokenizer, synthetic
from tvgeo_jax.models import apply
from tvgeo_jax.pretraining.embedded import (PAD_ID, PretrainConfig, SPECIAL_IDS,
                                            cross_occurrence, pair_rows, word_ids)


def _pair_batches(tokenizer, pairs: Sequence, max_len: int, batch: int = 256):
  for i in range(0, len(pairs), batch):
    chunk = pairs[i:i + batch]
    enc = tokenizer([t[0] for t in chunk], [t[1] for t in chunk], truncation=True,
                    max_length=max_len, padding="max_length", return_tensors="np")
    yield {"input_ids": enc["input_ids"].astype(np.int32),
           "attention_mask": enc["attention_mask"].astype(np.int32)}


def pooled_features(params, config, tokenizer, pairs: Sequence,
                    max_len: int) -> Dict[str, np.ndarray]:
  """``[n, layers × hidden]``: the first token's state and the mean over tokens of every
  layer after the embeddings (``analysis.cka.layer_representations``), concatenated."""
  out = {}
  for name, token in (("first token", "first"), ("token mean", "mean")):
    reps = layer_representations(params, config, _pair_batches(tokenizer, pairs, max_len),
                                 token=token)[1:]          # [L, n, hidden]
    out[name] = reps.transpose(1, 0, 2).reshape(reps.shape[1], -1)
  return out


def logistic_probe(x_train, y_train, x_test) -> np.ndarray:
  from sklearn.linear_model import LogisticRegression
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
  return model.fit(x_train, y_train).predict(x_test)


def relation_probe(params, config, tokenizer, task: str, scale: float, max_len: int):
  """({feature: test main metric}, the test split's class counts)."""
  spec = get_task(task)
  split = synthetic.generate(spec.name, seed=0, scale=scale)
  (x_tr, y_tr), (x_te, y_te) = split["train"], split["test"]
  f_tr = pooled_features(params, config, tokenizer, x_tr, max_len)
  f_te = pooled_features(params, config, tokenizer, x_te, max_len)
  main = spec.main_metric
  scores = {k: metrics.compute_metrics((main,), logistic_probe(f_tr[k], y_tr, f_te[k]),
                                       y_te, label_names=spec.label_names,
                                       details=False)[main] for k in f_tr}
  return scores, np.bincount(y_te, minlength=spec.num_labels)


def cross_occurrence_probe(params, config, n_train: int = 3000):
  """(per-layer probe accuracy, token-identity ceiling, base rate) on the corpus's
  held-out pairs (``pair_rows``: fine-tuning's ``<s> a </s></s> b </s>``)."""
  cfg = PretrainConfig()
  rows, held = pair_rows(cfg)
  words = jnp.asarray(word_ids(load_tokenizer("tiny")))
  fn = jax.jit(lambda p, ids: apply(p, {"input_ids": ids,
                                        "attention_mask": (ids != PAD_ID).astype(jnp.int32)},
                                    config=config, head="mlm",
                                    output_hidden_states=True)["hidden_states"])

  def collect(block):
    xs, ys, ts = [], [], []
    for i in range(0, len(block), 256):
      ids = jnp.asarray(block[i:i + 256])
      in_a, in_b, b_in_a, a_in_b = cross_occurrence(ids, words, SPECIAL_IDS)
      content = np.asarray(in_a | in_b)
      ys.append(np.asarray(jnp.where(in_a, a_in_b, b_in_a))[content])
      ts.append(np.asarray(ids)[content])
      xs.append([np.asarray(h)[content] for h in fn(params, ids)])
    return ([np.concatenate([b[k] for b in xs]) for k in range(len(xs[0]))],
            np.concatenate(ys), np.concatenate(ts))

  x_tr, y_tr, t_tr = collect(rows[:n_train])
  x_te, y_te, t_te = collect(held)
  share = {t: y_tr[t_tr == t].mean() for t in np.unique(t_tr)}
  identity = float(np.mean([(share.get(t, y_tr.mean()) > 0.5) == y for t, y in zip(t_te, y_te)]))
  layers = [float(np.mean(logistic_probe(a, y_tr, b) == y_te)) for a, b in zip(x_tr, x_te)]
  return layers, identity, float(y_te.mean())
