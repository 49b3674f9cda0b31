"""Paper B's representation study: how far fine-tuning moves each layer's representations.

For one task, the frozen base model (PLM) and fine-tuned runs (full FT, LoRA,
bottleneck adapters, labelled by method) represent the *same* examples of a split;
per layer we take the first token (or the token mean) and compare:

* CKA heatmaps (``tvgeo_jax.analysis.cka``, unbiased minibatch estimator by default)
  between every pair of models, layers × layers, each model against itself and against
  the PLM included, with the quartiles and maximum of every row and column (paper B);
* SVCCA, PWCCA and the orthogonal Procrustes distance (``tvgeo_jax.analysis.similarity``;
  Raghu et al. 2017, Morcos et al. 2018, Ding et al. 2021) for the same pairs and layers,
  beside the CKA heatmaps (``similarities``);
* UMAP (``tvgeo_jax.analysis.umap_analysis``) per chosen layer, fitted on one model
  (default the bottleneck run, as in paper B, else the first run) and applied to the
  others with ``transform``; the mean 2-D distance between two models' projections of
  the same example;
* k-means clusters of all models' points in the full representation space and their
  composition by model.

``extract_representations`` maps models to ``[L + 1, n, d]`` stacks; ``analyse`` turns
stacks into numbers and figures; ``run_study`` does both from run directories.
Everything is seeded (example subset, UMAP, k-means): the same seed gives identical
numbers and figures. CKA is NaN (written as ``NaN`` in the JSON) where a model's
features are constant over the examples: with ``token="first"`` this is layer 0, the
embeddings of the first token (<s> / [CLS] at position 0), identical for every example.
"""
from __future__ import annotations

import collections
import os
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from tvgeo_jax import io_utils
from tvgeo_jax.analysis import cka as cka_lib
from tvgeo_jax.analysis import similarity as sim_lib
from tvgeo_jax.analysis import umap_analysis as ua

PLM = "plm"
CKA_JSON = "cka.json"
CKA_FIGURE = "cka_heatmaps.png"
SIMILARITIES_JSON = "similarities.json"
UMAP_JSON = "umap.json"
UMAP_FIGURE = "umap.png"
CLUSTERS_JSON = "clusters.json"
SUMMARY_JSON = "representations.json"


# --- models -------------------------------------------------------------------------

def load_models(run_dirs: Sequence[str], base: Optional[str] = None
                ) -> Tuple["collections.OrderedDict[str, Tuple[dict, Any]]", Any]:
  """``{label: (params, model_config)}`` for the PLM and each run, and the first Run.

  The PLM is the runs' shared base model (``Run.base_params``) or ``base`` when given.
  Runs are labelled by method (``full``, ``lora``, ``bottleneck``); a repeated method
  gets ``_2``, ``_3``... All runs must share the task and the base model (the examples
  are tokenised once, with that model's tokenizer).
  """
  from tvgeo_jax import runs as runs_lib
  if not run_dirs:
    raise ValueError("No run directory given; pass --runs=DIR[,DIR...] (finished runs of "
                     "experiments.finetune).")
  loaded = [runs_lib.load_run(d) for d in run_dirs]
  first = loaded[0]
  for r in loaded[1:]:
    if (r.task, r.base_model) != (first.task, first.base_model):
      raise ValueError(
          f"Runs must share task and base model: {first.run_dir} is {first.task} on "
          f"{first.base_model}, {r.run_dir} is {r.task} on {r.base_model}.")
  models: "collections.OrderedDict[str, Tuple[dict, Any]]" = collections.OrderedDict()
  if base:
    from tvgeo_jax.models import load_pretrained
    config, params = load_pretrained(base, num_labels=first.model_config.num_labels,
                                     seed=first.config.seed)
    models[PLM] = (params, config)
  else:
    models[PLM] = (first.base_params(), first.model_config)
  counts: Dict[str, int] = collections.Counter()
  for r in loaded:
    counts[r.method] += 1
    label = r.method if counts[r.method] == 1 else f"{r.method}_{counts[r.method]}"
    models[label] = (r.params, r.model_config)
  return models, first


def example_batches(task: str, model: str, *, split: str = "test", max_examples: int = 2000,
                    seed: int = 0, max_seq_len: int = 128, batch_size: int = 64,
                    data_scale: float = 1.0, data_dir: Optional[str] = None
                    ) -> Tuple[List[dict], np.ndarray]:
  """Batches of up to ``max_examples`` examples of a split (a seeded random subset).

  Returns the batches (batch format; padding rows have weight 0) and the examples'
  labels in order. The same arguments give the same examples in the same order.
  """
  from tvgeo_jax import data
  if max_examples < cka_lib.min_rows("unbiased"):
    raise ValueError(f"max_examples={max_examples} is too small; CKA needs at least 4.")
  raw = data.load_task_data(task, data_dir=data_dir, seed=seed, scale=data_scale)
  texts, labels = raw[split]
  order = np.random.RandomState(seed).permutation(len(texts))[:max_examples]
  enc = data.encode(data.load_tokenizer(model), [texts[i] for i in order],
                    np.asarray(labels)[order], max_length=max_seq_len)
  return list(data.Batches(enc, batch_size).epoch(0)), np.asarray(enc.labels)


def extract_representations(models: Mapping[str, Tuple[dict, Any]], batches: Sequence[dict],
                            token: str = "first") -> Dict[str, np.ndarray]:
  """``{label: [L + 1, n, d]}`` (index 0 the embeddings, i the output of layer i)."""
  return {name: cka_lib.layer_representations(params, config, batches, token=token)
          for name, (params, config) in models.items()}


# --- analysis -----------------------------------------------------------------------

def default_fit_on(names: Sequence[str]) -> str:
  """Paper B fits UMAP on the bottleneck model; else the first fine-tuned one."""
  for n in names:
    if n.startswith("bottleneck"):
      return n
  others = [n for n in names if n != PLM]
  return others[0] if others else names[0]


def default_layers(num_layers: int) -> List[int]:
  """First, middle and last encoder layer (1-indexed; 0 is the embeddings)."""
  return sorted({1, (num_layers + 1) // 2, num_layers})


def pairwise_matrices(reps: Mapping[str, np.ndarray], estimator: str = "unbiased",
                      batch_size: Optional[int] = None) -> Dict[Tuple[str, str], np.ndarray]:
  """CKA ``[L_a, L_b]`` for every unordered pair (a, b), a before or equal to b."""
  return cka_lib.pairwise_cka(reps, batch_size=batch_size, estimator=estimator)


def analyse(reps: Mapping[str, np.ndarray], out_dir: str, *, layers: Optional[Sequence[int]] = None,
            estimator: str = "unbiased", cka_batch_size: Optional[int] = 256,
            umap: bool = True, fit_on: Optional[str] = None, n_neighbors: int = 15,
            approximate: bool = True, n_clusters: int = 4, seed: int = 0,
            labels: Optional[np.ndarray] = None,
            similarities: Sequence[str] = sim_lib.MEASURES) -> Dict[str, Any]:
  """CKA, UMAP and cluster numbers and figures of ``{model: [L + 1, n, d]}`` stacks.

  Writes ``cka.json`` + ``cka_heatmaps.png``, ``similarities.json`` +
  ``{svcca,pwcca,procrustes}_heatmaps.png`` (those in ``similarities``), (with ``umap``)
  ``umap.json`` +
  ``umap.png``, ``clusters.json`` and the summary ``representations.json`` into
  ``out_dir``; returns the summary.

  Args:
    reps: model label -> ``[L + 1, n, d]`` representations of the same examples.
    out_dir: output directory (created).
    layers: layers (0 = embeddings) for UMAP and clusters; default first/middle/last.
    estimator: CKA estimator, ``"unbiased"`` (default) or ``"biased"``.
    cka_batch_size: minibatch size of the CKA accumulation (None: one batch).
    umap: False skips UMAP (its numba kernels compile slowly on first use).
    fit_on: model the UMAP is fitted on (default ``default_fit_on``).
    n_neighbors, approximate: UMAP settings (see ``umap_analysis.umap_projections``).
    n_clusters: k of the k-means clustering.
    seed: UMAP and k-means seed.
    labels: the examples' class labels, stored with the projections when given.
    similarities: representation similarities besides CKA (``similarity.MEASURES``).
  """
  names = list(reps)
  if not names:
    raise ValueError("No representations to analyse.")
  similarities = sim_lib.check_measures(similarities)
  depth = {k: np.shape(v)[0] for k, v in reps.items()}
  num_layers = min(depth.values()) - 1
  layers = list(layers) if layers else default_layers(num_layers)
  bad = [l for l in layers if not 0 <= l <= num_layers]
  if bad:
    raise ValueError(f"Layers {bad} out of range: the models have layers 0..{num_layers} "
                     "(0 = embeddings).")
  os.makedirs(out_dir, exist_ok=True)
  n = int(np.shape(reps[names[0]])[1])

  matrices = pairwise_matrices(reps, estimator, cka_batch_size)
  with warnings.catch_warnings():  # all-NaN rows (constant features) warn in nanpercentile
    warnings.simplefilter("ignore", RuntimeWarning)
    cka_out = {f"{a}|{b}": {"a": a, "b": b, "matrix": np.asarray(m).tolist(),
                            "summary": ua.cka_summary(m)} for (a, b), m in matrices.items()}
  io_utils.atomic_write_json(os.path.join(out_dir, CKA_JSON),
                             {"estimator": estimator, "batch_size": cka_batch_size,
                              "num_examples": n, "models": names, "pairs": cka_out})
  ua.plot_cka_heatmaps(matrices, os.path.join(out_dir, CKA_FIGURE),
                       title=f"Linear CKA ({estimator}, n={n})")
  summary: Dict[str, Any] = {
      "models": names, "num_examples": n, "layers": layers, "estimator": estimator,
      "cka_diagonal": {f"{a}|{b}": np.diag(np.asarray(m)).tolist()
                       for (a, b), m in matrices.items()},
  }
  if similarities:
    summary["similarity_diagonal"] = _similarities(reps, out_dir, similarities, n)

  clusters = {}
  for layer in layers:
    layer_reps = {k: np.asarray(v)[layer] for k, v in reps.items()}
    comp = ua.cluster_composition(layer_reps, n_clusters, seed=seed)
    comp["full_space_paired_distances"] = ua.paired_distances(layer_reps)
    clusters[str(layer)] = comp
  io_utils.atomic_write_json(os.path.join(out_dir, CLUSTERS_JSON),
                             {"n_clusters": n_clusters, "seed": seed, "layers": clusters})
  summary["cluster_share_of_cluster"] = {k: v["share_of_cluster"] for k, v in clusters.items()}

  if umap:
    fit_on = fit_on or default_fit_on(names)
    proj = ua.umap_by_layer(reps, layers, fit_on, seed=seed, n_neighbors=n_neighbors,
                            approximate=approximate)
    dists = {str(l): ua.paired_distances(p) for l, p in proj.items()}
    io_utils.atomic_write_json(os.path.join(out_dir, UMAP_JSON), {
        "fit_on": fit_on, "seed": seed, "n_neighbors": n_neighbors,
        "labels": None if labels is None else np.asarray(labels).tolist(),
        "paired_distances": dists,
        "points": {str(l): {k: v.tolist() for k, v in p.items()} for l, p in proj.items()}})
    ua.plot_umap(proj, os.path.join(out_dir, UMAP_FIGURE), fit_on=fit_on)
    summary.update(umap_fit_on=fit_on, umap_paired_distances=dists)
  io_utils.atomic_write_json(os.path.join(out_dir, SUMMARY_JSON), summary)
  return summary


def _similarities(reps, out_dir: str, measures: Sequence[str], n: int) -> Dict[str, Any]:
  """SVCCA / PWCCA / Procrustes: ``similarities.json``, one heatmap figure per measure."""
  mats = sim_lib.pairwise_similarities(reps, measures)
  width = max(int(np.shape(v)[-1]) for v in reps.values())
  # CCA of two d-dimensional representations of n <= 2d examples finds correlations of 1
  # whatever the models are (their column spaces must intersect); say so where it shows.
  caveat = (f"n={n} <= 2 x {width} features: CCA over all features gives correlations of 1 "
            "whatever the models (PWCCA); SVCCA's kept directions saturate less; use "
            f"n > {2 * width}" if n <= 2 * width else None)
  doc: Dict[str, Any] = {"num_examples": n, "models": list(reps), "warning": caveat,
                         "measures": {}}
  diagonals = {}
  for m, pairs in mats.items():
    with warnings.catch_warnings():  # all-NaN rows (constant features)
      warnings.simplefilter("ignore", RuntimeWarning)
      doc["measures"][m] = {
          "kind": sim_lib.KIND[m], "range": list(sim_lib.RANGE[m]),
          "pairs": {f"{a}|{b}": {"a": a, "b": b, "matrix": np.asarray(x).tolist(),
                                 "summary": ua.cka_summary(x)} for (a, b), x in pairs.items()}}
      top = float(np.nanmax([np.nanmax(x) for x in pairs.values()]))
    diagonals[m] = {f"{a}|{b}": np.diag(np.asarray(x)).tolist() for (a, b), x in pairs.items()}
    # similarities on CKA's fixed [0, 1]; a distance on [0, its largest value] (shared)
    lo, hi = sim_lib.RANGE[m] if sim_lib.KIND[m] == "similarity" else (0.0, max(top, 1e-6))
    title = _SIMILARITY_TITLES[m].format(n=n)
    if caveat and m in ("svcca", "pwcca"):
      title += f"\n{caveat}"
    ua.plot_cka_heatmaps(pairs, os.path.join(out_dir, f"{m}_heatmaps.png"), title=title,
                         vmin=lo, vmax=hi)
  io_utils.atomic_write_json(os.path.join(out_dir, SIMILARITIES_JSON), doc)
  return diagonals


_SIMILARITY_TITLES = {
    "svcca": "SVCCA similarity (Raghu et al. 2017; 99% variance kept, n={n})",
    "pwcca": "PWCCA similarity (Morcos et al. 2018; weights of the row model, n={n})",
    "procrustes": "Orthogonal Procrustes distance (Ding et al. 2021; 0 = same up to "
                  "rotation, range 0-2, n={n})",
}


def run_study(run_dirs: Sequence[str], out_dir: str, *, task: Optional[str] = None,
              base: Optional[str] = None, split: str = "test", max_examples: int = 2000,
              token: str = "first", batch_size: int = 64, **analyse_kwargs) -> Dict[str, Any]:
  """Load runs (+ PLM), represent the same examples of ``split``, ``analyse`` them.

  ``task`` (if given) must match the runs' task. Data settings (seed, scale, data
  directory, maximum length) are the first run's, so the examples are the run's.
  """
  sim_lib.check_measures(analyse_kwargs.get("similarities", ()))   # before the slow part
  models, first = load_models(run_dirs, base)
  if task and task != first.task:
    raise ValueError(f"--task={task} but the runs were trained on {first.task}.")
  cfg = first.config
  batches, labels = example_batches(
      first.task, first.base_model, split=split,
      max_examples=max_examples, seed=cfg.seed, max_seq_len=cfg.max_seq_len,
      batch_size=batch_size, data_scale=cfg.data_scale, data_dir=cfg.data_dir)
  reps = extract_representations(models, batches, token=token)
  analyse_kwargs.setdefault("seed", cfg.seed)
  summary = analyse(reps, out_dir, labels=labels, **analyse_kwargs)
  summary.update(task=first.task, split=split, token=token,
                 runs={k: d for k, d in zip(list(models)[1:], run_dirs)})
  io_utils.atomic_write_json(os.path.join(out_dir, SUMMARY_JSON), summary)
  return summary
