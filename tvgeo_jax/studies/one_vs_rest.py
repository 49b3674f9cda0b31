"""Paper D's comparison: multiclass full FT, multiclass LoRA, and one-vs-reference LoRA.

For a K-class task with a reference class (``synth_authorship``: the writer
``"human"``) three approaches are trained with ``training.loop.finetune`` (each run
resumable, one run directory per model under ``out_dir``):

* ``full``: one K-class model, full fine-tuning (``out_dir/full``);
* ``lora``: one K-class model, LoRA (``out_dir/lora``);
* ``binary_lora``: K − 1 binary LoRA models, one per non-reference class c, trained on
  the examples of c and of the reference class only (label 1 = c, 0 = reference;
  ``out_dir/binary_<c>``), a binary dataset derived by filtering every split.

All are scored on the *full* K-class test set. Combination rule of the binary models
(``combine_one_vs_rest``): every binary model gives P(c | text) (softmax of its two
logits, column 1); the prediction is the non-reference class with the highest
probability if that probability exceeds 0.5 (strictly), else the reference class.

Reported per approach: per-class precision / recall / F1 / support (sklearn's
``classification_report``), accuracy and macro F1, the row-normalised confusion matrix
(figure), optimizer steps (summed over the approach's models: its training work) and
wall time (until its last model finished: the binary models train in one concurrent
group), and trainable-parameter share.
For the binary approach the trainable count is the sum over its K − 1 models and the
share divides it by one model's total (the frozen base is shared).
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from tvgeo_jax.core import io_utils
from tvgeo_jax.data import AUTHORSHIP_REFERENCE
from tvgeo_jax.data import SPLITS
from tvgeo_jax.core import metrics
from tvgeo_jax.core import figures
from tvgeo_jax import data
from tvgeo_jax.training import group, loop, presets
from tvgeo_jax.evaluation import scoring, task_data
from tvgeo_jax.core import sharding
from tvgeo_jax.training import runs
from tvgeo_jax.studies import evidence

THRESHOLD = 0.5
APPROACHES = ("full", "lora", "binary_lora")
RESULTS_JSON = "one_vs_rest.json"
TABLE_MD = "one_vs_rest.md"
PREDICTIONS = "predictions.npz"
CONFUSION_FIGURE = "confusion_matrices.png"


# --- the combination rule ------------------------------------------------------------

def combine_one_vs_rest(probabilities, classes: Sequence[int], reference: int,
                        threshold: float = THRESHOLD) -> np.ndarray:
  """Class ids from binary one-vs-reference probabilities.

  Args:
    probabilities: ``[n, C]``; column j is P(classes[j] | text) from the binary model
      of ``classes[j]`` against the reference class.
    classes: the C non-reference class ids, in column order.
    reference: the reference class id.
    threshold: a class is predicted only if its probability exceeds this (strictly).

  Returns:
    ``[n]`` int64: ``classes[argmax_j p[:, j]]`` where ``max_j p[:, j] > threshold``,
    else ``reference`` (ties between columns go to the first column).
  """
  p = np.asarray(probabilities, np.float64)
  classes = list(classes)
  if p.ndim != 2 or p.shape[1] != len(classes):
    raise ValueError(f"probabilities must be [n, {len(classes)}] (one column per "
                     f"non-reference class); got shape {p.shape}.")
  if reference in classes:
    raise ValueError(f"The reference class {reference} must not be among the binary "
                     f"classes {classes}.")
  best = np.argmax(p, axis=1)
  top = p[np.arange(p.shape[0]), best]
  return np.where(top > threshold, np.asarray(classes, np.int64)[best],
                  np.int64(reference)).astype(np.int64)


# --- derived binary data ----------------------------------------------------------------

def reference_index(label_names: Sequence[str], reference: Optional[str]) -> int:
  """Index of the reference class (by name or index string); a clear error otherwise."""
  names = list(label_names)
  ref = reference if reference is not None else AUTHORSHIP_REFERENCE
  if ref in names:
    return names.index(ref)
  if ref.isdigit() and int(ref) < len(names):
    return int(ref)
  raise ValueError(f"Reference class {ref!r} is not a class of this task ({names}); pass "
                   "--reference=<class name or index>.")


def binary_splits(raw, positive: int, reference: int) -> Dict[str, tuple]:
  """``{split: (texts, labels)}`` keeping only ``positive`` (label 1) and ``reference`` (0)."""
  out = {}
  for split in SPLITS:
    texts, labels = raw[split]
    labels = np.asarray(labels)
    keep = np.flatnonzero((labels == positive) | (labels == reference))
    if not len(keep):
      raise ValueError(f"The {split} split has no example of classes {positive} and "
                       f"{reference}.")
    out[split] = ([texts[i] for i in keep], (labels[keep] == positive).astype(np.int32))
  return out


def training_data(splits: Mapping[str, tuple], config, label_names: Sequence[str],
                  metrics: Sequence[str] = ("accuracy", "f1"), main_metric: str = "accuracy"):
  """A classification ``TaskData`` from raw ``{split: (texts, labels)}``.

  Batching as every task's (``evaluation.task_data``: shuffled from (seed, epoch), length
  buckets, this host's slice of every global batch).
  """
  return task_data.from_splits(splits, config, num_labels=len(label_names), is_regression=False,
                     label_names=label_names, metrics=metrics, main_metric=main_metric)


# --- scoring -----------------------------------------------------------------------------

def split_probabilities(run_dir: str, test_batches: Sequence[dict]) -> np.ndarray:
  """Softmax probabilities ``[n, K_run]`` of a finished run on the given batches."""
  run = runs.load_run(run_dir)
  mesh = sharding.data_mesh()
  eval_step = scoring.make_eval_step(model_config=run.model_config, mesh=mesh,
                                  is_regression=False)
  # The binary models see K-class labels: zero them (only the logits are used).
  batches = ({**b, "labels": np.zeros_like(b["labels"])} for b in test_batches)
  pred = scoring.predict(eval_step, sharding.replicate(run.params, mesh), batches, mesh)
  logits = pred["logits"].astype(np.float64)
  z = np.exp(logits - logits.max(axis=1, keepdims=True))
  return z / z.sum(axis=1, keepdims=True)


def score(predictions, labels, label_names: Sequence[str]) -> Dict[str, Any]:
  """Per-class report, accuracy, macro F1 and confusion matrices (``tvgeo_jax.core.metrics``)."""
  rep = metrics.classification_report_dict(np.asarray(predictions), np.asarray(labels),
                                           label_names=list(label_names))
  return {"per_class": {c: rep[c] for c in label_names}, "accuracy": rep["accuracy"],
          "macro_f1": rep["macro avg"]["f1-score"],
          "confusion_matrix": rep["confusion_matrix"],
          "confusion_matrix_normalized": rep["confusion_matrix_normalized"]}


def plot_confusions(results: Mapping[str, Mapping[str, Any]], label_names: Sequence[str],
                    path: str) -> None:
  """Row-normalised confusion matrices, one panel per approach (PNG)."""
  fig, axes = figures.panels(len(results), "Row-normalised confusion matrices (test)",
                             size=3.8)
  for ax, (name, res) in zip(axes, results.items()):
    m = np.asarray(res["confusion_matrix_normalized"])
    ax.imshow(m, vmin=0.0, vmax=1.0, cmap="Blues")
    for i in range(m.shape[0]):
      for j in range(m.shape[1]):
        ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                color="white" if m[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(label_names)), label_names, rotation=45, fontsize=7)
    ax.set_yticks(range(len(label_names)), label_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(name, fontsize=9)
  figures.save_figure(fig, path)


def markdown_table(results: Mapping[str, Mapping[str, Any]], label_names: Sequence[str],
                   rule: str) -> str:
  """Summary and per-class tables in Markdown."""
  lines = ["| approach | models | accuracy | macro F1 | optimizer steps | wall time (s) | "
           "trainable | share (%) |", "|---|---|---|---|---|---|---|---|"]
  for name, r in results.items():
    lines.append(f"| {name} | {r['num_models']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | "
                 f"{r['optimizer_steps']} | {r['training_time_s']:.1f} | "
                 f"{r['trainable_parameters']:,} | "
                 f"{100 * r['trainable_share']:.3f} |")
  lines += ["", "| approach | class | precision | recall | F1 | support |",
            "|---|---|---|---|---|---|"]
  for name, r in results.items():
    for c in label_names:
      m = r["per_class"][c]
      lines.append(f"| {name} | {c} | {m['precision']:.4f} | {m['recall']:.4f} | "
                   f"{m['f1-score']:.4f} | {int(m['support'])} |")
  return "\n".join(lines + ["", f"Binary combination rule: {rule}", "",
                             "Wall time: until the approach's last model finished; the "
                             "binary models train in one concurrent group.", ""])


RULE = ("each binary LoRA model (class c vs the reference class) gives P(c | text); the "
        "prediction is the non-reference class with the highest probability if it exceeds "
        "0.5, else the reference class.")


# --- the study ----------------------------------------------------------------------------

def run_study(task: str, out_dir: str, *, model: str = "tiny", preset: Optional[str] = None,
              overrides: Optional[Mapping[str, Any]] = None, reference: Optional[str] = None,
              overwrite: bool = False) -> Dict[str, Any]:
  """Train (or resume / reuse) every model, score all approaches on the K-class test set.

  Writes ``one_vs_rest.json``, ``one_vs_rest.md``, ``predictions.npz`` (labels,
  per-approach predictions, the binary probabilities) and ``confusion_matrices.png``
  into ``out_dir``; returns the JSON content.
  """
  spec = data.get_task(task)
  if spec.is_regression:
    raise ValueError(f"{task} is a regression task; one-vs-rest needs classes.")
  names = list(spec.label_names)
  ref = reference_index(names, reference)
  others = [c for c in range(len(names)) if c != ref]
  os.makedirs(out_dir, exist_ok=True)

  configs = {m: presets.resolve(task, m, model, preset, overrides) for m in ("full", "lora")}
  t0 = time.time()
  run_results = {m: [loop.finetune(configs[m], os.path.join(out_dir, m), overwrite=overwrite)]
                 for m in ("full", "lora")}
  base = configs["lora"]
  raw = data.load_task_data(task, data_dir=base.data_dir, seed=base.seed,
                            scale=base.data_scale)
  # The K − 1 binary models train as one concurrent group (tvgeo_jax.training.group;
  # each member as its run alone): equal-sized datasets, so no member idles. (The K-class
  # model has about twice their steps: in the group the binaries would idle through half
  # of every epoch.)
  binary_configs = [base.replace(task=f"{task}/{names[c]}_vs_{names[ref]}") for c in others]
  binary_dirs = [os.path.join(out_dir, f"binary_{names[c]}") for c in others]
  binary_data = [training_data(binary_splits(raw, c, ref), cfg, (names[ref], names[c]))
                 for c, cfg in zip(others, binary_configs)]
  run_results["binary_lora"] = group.finetune_many(binary_configs, binary_dirs,
                                                   data=binary_data, overwrite=overwrite)
  train_elapsed = time.time() - t0

  # The full K-class test set, once tokenised.
  tokenizer = data.load_tokenizer(model)
  enc = data.encode(tokenizer, *raw["test"], max_length=base.max_seq_len)
  test_batches = list(data.Batches(enc, base.eval_batch_size).epoch(0))
  labels = np.asarray(enc.labels, np.int64)
  preds = {m: np.argmax(split_probabilities(os.path.join(out_dir, m), test_batches), axis=1)
           for m in ("full", "lora")}
  binary_p = np.stack([split_probabilities(d, test_batches)[:, 1] for d in binary_dirs], 1)
  preds["binary_lora"] = combine_one_vs_rest(binary_p, others, ref)

  results: Dict[str, Any] = {}
  for m in APPROACHES:
    res = score(preds[m], labels, names)
    rr = run_results[m]
    trainable = sum(r["parameters"]["trainable"] for r in rr)
    total = rr[0]["parameters"]["total"]
    res.update(num_models=len(rr), training_time_s=float(max(r["wall_time_s"] for r in rr)),
               optimizer_steps=int(sum(r["steps"] for r in rr)),
               trainable_parameters=int(trainable), total_parameters_per_model=int(total),
               trainable_share=trainable / max(total, 1),
               runs=[r_dir for r_dir in ([os.path.join(out_dir, m)] if m != "binary_lora"
                                         else binary_dirs)])
    results[m] = res
  out = {"task": task, "model": model, "label_names": names, "reference": names[ref],
         "binary_classes": [names[c] for c in others], "threshold": THRESHOLD,
         "combination_rule": RULE, "num_test_examples": int(labels.shape[0]),
         "session_training_elapsed_s": train_elapsed, "approaches": results}
  buf_path = os.path.join(out_dir, PREDICTIONS)
  _write_npz(buf_path, labels=labels, binary_probabilities=binary_p,
             binary_classes=np.asarray(others), **{f"pred_{m}": p for m, p in preds.items()})
  plot_confusions(results, names, os.path.join(out_dir, CONFUSION_FIGURE))
  io_utils.atomic_write_text(os.path.join(out_dir, TABLE_MD), markdown_table(results, names, RULE))
  io_utils.atomic_write_json(os.path.join(out_dir, RESULTS_JSON), out)
  return out


def _write_npz(path: str, **arrays) -> None:
  import io
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  io_utils.atomic_write_bytes(path, buf.getvalue())


def study_findings(res: Mapping[str, Any]) -> List[Dict[str, Any]]:
  """Paper D: macro-F1 of multiclass vs one-vs-rest LoRA (the paper found one-vs-rest
  competitive); descriptive (one task: no test over tasks). ``evidence.Finding`` dicts."""
  scores = {name: float(e["macro_f1"]) for name, e in res.get("approaches", {}).items()
            if e.get("macro_f1") is not None}
  if not scores:
    return []
  best = max(scores, key=scores.get)
  return [evidence.Finding(
      claim="(paper D: multiclass vs one-vs-rest LoRA)",
      measured="macro-F1 " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
               + f"; best: {best}").to_dict()]
