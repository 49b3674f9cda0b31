"""The whole study as one resumable pipeline (``python -m experiments.reproduce``).

Steps, each skipped when its outputs exist (so a rerun resumes):

1. ``base``: the pretrained model (the embedded base is built on first use);
2. ``finetune/<task>/<method>``: every task × method × seed (full FT and LoRA; plus a
   bottleneck run on the representation task); with ``seeds`` > 1 the extra seeds are
   more members of the same concurrent group, in ``runs/<task>_s<k>/<method>``;
3. ``scores``: Table 2 (every model's test score, its task's chance level, paper A's
   score, the bag-of-words baseline of synthetic tasks; ``studies.scores``);
4. ``distances/<method>``: T_d for every run pair × layer (query, value) in one call,
   and its findings with p-values and, with seeds, the seed floor
   (``studies.distance_study``);
5. ``merge``: δ(i, j) for LoRA factor and product averaging, Table 3, TIES analyses
   (first seed of each task), findings with p-values (``merge_study.study_findings``);
6. ``prediction``: δ(i, j) predicted from geometry on held-out tasks
   (``merge_prediction.run_prediction``; needs ≥ 4 tasks);
7. ``representations``: CKA and UMAP of PLM / full / LoRA / bottleneck on one task;
8. ``one_vs_rest``: multiclass full / LoRA against per-class binary LoRA models;
9. ``report``: report.md and report.html (figures inlined), rendering the findings each
   study wrote in its summary (a finding on near-chance models: "not evaluated").

Presets: ``offline`` (embedded base, synthetic suite, CPU minutes), ``paper``
(roberta-base, the hub tasks, paper A's recipe; for GPUs/TPUs) and ``smoke`` (a
three-task cut-down used by the tests).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import time

from absl import logging as absl_logging
import jax
import numpy as np
from tqdm.auto import tqdm
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from tvgeo_jax.core import io_utils
from tvgeo_jax.data import SYNTH_PAPER_TASKS
from tvgeo_jax.data import PAPER_TASKS
from tvgeo_jax.data import get_task, synthetic
from tvgeo_jax.data.hub_loading import validation_rows
from tvgeo_jax.models import EncoderConfig, names
from tvgeo_jax.training import flops as flops_lib
from tvgeo_jax.adapters import partition
from tvgeo_jax.training import group as group_lib
from tvgeo_jax import pretraining
from tvgeo_jax.training import presets
from tvgeo_jax.training import runs
from tvgeo_jax.pretraining import embedded
from tvgeo_jax.core.sharding import wait_for_all_processes
from tvgeo_jax.training import group, loop
from tvgeo_jax.studies import sources
from tvgeo_jax import geometry
from tvgeo_jax.studies import distance_study, evidence, merge_prediction, merge_study
from tvgeo_jax.studies import representations
from tvgeo_jax.studies import one_vs_rest
from tvgeo_jax.studies import report
from tvgeo_jax.studies import scores

STATE_FILE = "pipeline_state.json"


@dataclasses.dataclass(frozen=True)
class StudyPreset:
  """What one reproduction runs."""
  name: str
  model: str
  tasks: Tuple[str, ...]
  methods: Tuple[str, ...] = ("full", "lora")
  train_preset: str = "tiny"  # a preset of tvgeo_jax.training.presets (its values, all methods)
  repr_task: Optional[str] = None
  ovr_task: Optional[str] = None
  distance_top_k: int = 8
  repr_max_examples: int = 500
  umap: bool = True
  multitask_methods: Tuple[str, ...] = ("lora_factor_average", "task_arithmetic", "ties")
  max_concurrent: Optional[int] = None  # tasks per concurrent fine-tuning group (None: all)
  merge_max_examples: Optional[int] = None  # merge study: test rows scored per model (None: all)
  # merge study: also the product-averaged LoRA pair grid beside paper A's factor averaging
  merge_compare_averaging: bool = True
  seeds: int = 1   # runs per task and method (seed, seed + 1, ...): the seed noise floor
  seed_tasks: Optional[Tuple[str, ...]] = None  # the tasks that get ``seeds`` runs (None: all)

  def train_config(self, task: str, method: str, seed_index: int = 0):
    cfg = presets.resolve(task, method, self.model, self.train_preset)
    return cfg.replace(seed=cfg.seed + seed_index) if seed_index else cfg


def _offline() -> StudyPreset:
  # Measured choices (BUILD_NOTES, "The offline study's budget"): groups of four tasks of
  # similar length idle less than one group of ten; 500 test rows per merged model keep
  # δ paired (single and merged models on the same rows); second seeds of synth_sst2 and
  # synth_qnli (two families, learnt by both methods) give the report a seed floor (seeds
  # on every task would double the fine-tuning); the product-averaged LoRA pair grid (43 s
  # of the merge step's 111) is left to `experiments.merge_grid`. Paper B's representation
  # task is synth_qnli, a pair task every method learns (chosen while synth_mrpc, paper B's
  # own, sat near chance offline; it learns since session 12, at 3-6x the training pairs).
  # The per-task values (data and training scale) are the training preset's.
  return StudyPreset(
      name="offline", model="embedded", tasks=tuple(SYNTH_PAPER_TASKS), train_preset="offline",
      repr_task="synth_qnli", ovr_task="synth_authorship", max_concurrent=4,
      merge_max_examples=500, merge_compare_averaging=False, seeds=2,
      seed_tasks=("synth_sst2", "synth_qnli"))


def _paper() -> StudyPreset:
  return StudyPreset(name="paper", model="roberta-base", tasks=tuple(PAPER_TASKS),
                     train_preset="paper", repr_task="mrpc", ovr_task=None,
                     repr_max_examples=2000)


def _smoke() -> StudyPreset:
  """Three tasks, one short epoch each, no representation/one-vs-rest steps (those have
  their own end-to-end tests): the pipeline's plumbing in about a minute."""
  return StudyPreset(
      name="smoke", model="tiny-random", tasks=("synth_sst2", "synth_yelp", "synth_mrpc"),
      train_preset="smoke", repr_task=None, ovr_task=None)


PRESETS: Dict[str, Callable[[], StudyPreset]] = {
    "offline": _offline, "paper": _paper, "smoke": _smoke}


def get_preset(name: str, seeds: Optional[int] = None,
               seed_tasks: Optional[Sequence[str]] = None) -> StudyPreset:
  """A preset by name; ``seeds`` (≥ 1) overrides its number of seeds per task, on every
  task or on ``seed_tasks`` only."""
  if name not in PRESETS:
    raise ValueError(f"Unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
  preset = PRESETS[name]()
  if seeds is not None:
    if seeds < 1:
      raise ValueError(f"seeds must be >= 1, got {seeds}.")
    if seeds > 1 and preset.model in names.RANDOM_MODELS:
      raise ValueError(f"--seeds={seeds} needs a pretrained base: {preset.model!r} is drawn "
                       "from the training seed, so each seed would fine-tune another base "
                       "(use the offline or paper preset).")
    preset = dataclasses.replace(preset, seeds=seeds, seed_tasks=None)  # every task
  if seed_tasks:
    unknown = sorted(set(seed_tasks) - set(preset.tasks))
    if unknown:
      raise ValueError(f"--seed_tasks {unknown} are not tasks of preset {name!r} "
                       f"({', '.join(preset.tasks)}).")
    if preset.seeds < 2:
      raise ValueError(f"--seed_tasks needs --seeds=N (N >= 2): preset {name!r} trains one "
                       "seed per task.")
    preset = dataclasses.replace(preset, seed_tasks=tuple(seed_tasks))
  return preset


# --- the plan --------------------------------------------------------------------

@dataclasses.dataclass
class Step:
  name: str
  run: Callable[[], Any]
  done: Callable[[], bool]
  training: bool = False  # the base and the fine-tuning runs: multi-host capable


class Pipeline:
  """Builds the step list for a preset and output directory, and runs it."""

  def __init__(self, preset: StudyPreset, out_dir: str):
    self.preset = preset
    self.out = os.path.abspath(out_dir)

  # paths
  def run_dir(self, task: str, method: str, seed_index: int = 0) -> str:
    folder = task if seed_index == 0 else f"{task}_s{seed_index}"
    return os.path.join(self.out, "runs", folder, method)

  def seed_indices(self, task: str, all_seeds: bool = True) -> range:
    """The seed indices a task is trained with: ``seeds`` of them for the preset's
    ``seed_tasks`` (every task when None), else the first only."""
    p = self.preset
    several = all_seeds and (p.seed_tasks is None or task in p.seed_tasks)
    return range(p.seeds if several else 1)

  def finetune_jobs(self) -> List[Tuple[str, str, int]]:
    """(task, method, seed index) of every run: each task × method × its seeds, plus the
    representation task's bottleneck run (one seed)."""
    jobs = [(t, m, k) for t in self.preset.tasks for m in self.preset.methods
            for k in self.seed_indices(t)]
    if self.preset.repr_task:
      for m in ("full", "lora", "bottleneck"):
        if (self.preset.repr_task, m, 0) not in jobs:
          jobs.append((self.preset.repr_task, m, 0))
    return jobs

  def finetune_groups(self) -> List[Tuple[str, List[Tuple[str, int]]]]:
    """(method, [(task, seed index)]) per fine-tuning step: one concurrent group per
    method on one host (seeds are more members); one run per step under multi-host (each
    run is data-parallel over every host)."""
    jobs = self.finetune_jobs()
    if jax.process_count() > 1:
      return [(m, [(t, k)]) for t, m, k in jobs]
    methods = list(dict.fromkeys(m for _, m, _ in jobs))
    return [(m, [(t, k) for t, mm, k in jobs if mm == m]) for m in methods]

  def model_keys(self, method: str, tasks: Optional[Sequence[str]] = None,
                 all_seeds: bool = True) -> List[str]:
    """``scores.model_key`` of a method's runs (the names the scores summary uses)."""
    return [scores.model_key(t, method, k) for t in (tasks or self.preset.tasks)
            for k in self.seed_indices(t, all_seeds)]

  def prediction_ready(self) -> bool:
    return "lora" in self.preset.methods and len(self.preset.tasks) >= 4

  def steps(self) -> List[Step]:
    p = self.preset
    steps = [Step("base", self._base, lambda: False, training=True)]
    for method, members in self.finetune_groups():
      dirs = [self.run_dir(t, method, k) for t, k in members]
      if len(members) == 1:
        t, k = members[0]
        name = f"finetune {t}{'' if k == 0 else f' seed {k}'} {method}"
      else:
        how = ("concurrently" if not p.max_concurrent or p.max_concurrent >= len(members)
               else f"in concurrent groups of up to {p.max_concurrent}")
        seeds = (f"{p.seeds} seeds" if p.seed_tasks is None else
                 f"{p.seeds} seeds on {', '.join(p.seed_tasks)}")
        name = (f"finetune {method} ({len(members)} tasks {how})" if p.seeds == 1 else
                f"finetune {method} ({len(members)} runs {how}, {seeds})")
      steps.append(Step(name, lambda ms=members, m=method: self._finetune(ms, m),
                        lambda ds=dirs: all(runs.is_finished(d) for d in ds), training=True))
    so = os.path.join(self.out, "scores")
    steps.append(Step("scores", self._scores,
                      lambda: os.path.exists(os.path.join(so, scores.SUMMARY))))
    for method in p.methods:
      out = os.path.join(self.out, "distances", method)
      steps.append(Step(f"distances {method}", lambda m=method: self._distances(m),
                        lambda o=out: os.path.exists(os.path.join(o, "summary.json"))))
    merge_out = os.path.join(self.out, "merge")
    steps.append(Step("merge", self._merge,
                      lambda: os.path.exists(os.path.join(merge_out, "summary.json"))))
    if self.prediction_ready():
      po = os.path.join(self.out, "prediction")
      steps.append(Step("prediction", self._prediction,
                        lambda: os.path.exists(os.path.join(po, merge_prediction.SUMMARY_FILE))))
    if p.repr_task:
      ro = os.path.join(self.out, "representations")
      steps.append(Step("representations", self._representations,
                        lambda: os.path.exists(os.path.join(ro, "summary.json"))))
    if p.ovr_task:
      oo = os.path.join(self.out, "one_vs_rest")
      steps.append(Step("one_vs_rest", self._one_vs_rest,
                        lambda: os.path.exists(os.path.join(oo, "summary.json"))))
    steps.append(Step("report", self._report, lambda: False))
    return steps

  def run(self, progress: bool = True, training_only: bool = False) -> Dict[str, Any]:
    """Run every step not done yet (``training_only``: the base and the fine-tuning
    runs, which is what a multi-host launch runs: every host calls this, each run is
    data-parallel over all of them, process 0 writes). Returns the pipeline state."""
    steps = [s for s in self.steps() if s.training or not training_only]
    writer = jax.process_index() == 0
    state_path = os.path.join(self.out, STATE_FILE)
    state = io_utils.read_json(state_path) if os.path.exists(state_path) else {"steps": {}}
    t0 = time.time()
    bar = tqdm(steps, desc=f"reproduce ({self.preset.name})", disable=None if progress else True,
               unit="step")
    for i, step in enumerate(bar):
      bar.set_postfix_str(step.name)
      if step.done():
        bar.write(f"[{i + 1}/{len(steps)}] {step.name}: done already, skipped")
        continue
      t = time.time()
      with _own_lines_only():
        headline = step.run()
      seconds = time.time() - t
      bar.write(f"[{i + 1}/{len(steps)}] {step.name}: "
                f"{headline if isinstance(headline, str) else 'done'} ({seconds:.1f} s)")
      state["steps"][step.name] = {"seconds": round(seconds, 1)}
      if writer:
        io_utils.atomic_write_json(state_path, state)
    state["last_total_seconds"] = round(time.time() - t0, 1)
    if writer:
      io_utils.atomic_write_json(state_path, state)
    return state

  # --- steps ---------------------------------------------------------------------
  def _base(self):
    if names.is_embedded(self.preset.model):
      if jax.process_index() == 0:  # multi-host: one host builds, the others wait for it
        embedded.ensure_embedded_base()
      wait_for_all_processes("tvgeo_jax embedded base")

  def _finetune(self, members: Sequence[Tuple[str, int]], method: str):
    configs = [self.preset.train_config(t, method, k) for t, k in members]
    dirs = [self.run_dir(t, method, k) for t, k in members]
    if len(members) == 1:
      results = [loop.finetune(configs[0], dirs[0])]
    else:
      results = group.finetune_many(configs, dirs, max_concurrent=self.preset.max_concurrent)
    return finetune_headline(results)

  def _sources(self, method: str, tasks: Optional[Sequence[str]] = None,
               all_seeds: bool = False):
    """The runs of a method, task-major (``task``, ``task#2``... for the seeds)."""
    tasks = tasks or self.preset.tasks
    return sources.load_sources([self.run_dir(t, method, k) for t in tasks
                                 for k in self.seed_indices(t, all_seeds)])

  def _evaluability(self, models: Sequence[str]):
    return scores.evaluability(scores.read_summary(os.path.join(self.out, "scores")), models)

  def _scores(self):
    models = {scores.model_key(t, m, k): self.run_dir(t, m, k)
              for t, m, k in self.finetune_jobs()}
    summary = scores.score_study(models, os.path.join(self.out, "scores"))
    near = summary["near_chance"]
    return (f"{len(models) - len(near)} of {len(models)} models above chance"
            + (f"; near chance: {', '.join(near)}" if near else ""))

  def _distances(self, method: str):
    srcs = self._sources(method, all_seeds=True)
    stacks = sources.module_stacks(srcs, ("query", "value"))
    lora_kind = method == "lora"
    top_k = None if lora_kind else self.preset.distance_top_k
    names = [s.name for s in srcs]
    grids = geometry.distance_grids(
        stacks, task_names=names,
        metrics=geometry.meaningful_metrics(geometry.METRICS, lora_kind, top_k),
        factors=("product", "a", "b") if lora_kind else ("product",), top_k=top_k)
    out = os.path.join(self.out, "distances", method)
    geometry.write_distance_outputs(out, grids,
                                    kplus_figures=_kplus_for(srcs[0].config.num_hidden_layers),
                                    families=dict(zip(names, evidence.paper_families(names))))
    arrays, _ = merge_prediction.distance_arrays(grids)
    summary = distance_study.distance_findings(
        arrays, names, method=method, evaluability=self._evaluability(self.model_keys(method)))
    io_utils.atomic_write_json(os.path.join(out, "summary.json"), summary)

  def _merge(self):
    out = os.path.join(self.out, "merge")
    srcs = self._sources("lora")
    layers = srcs[0].config.num_hidden_layers
    res = merge_study.run_study(srcs, out, "lora_factor_average",
                                analyses=("pairs", "ties", "topk", "multitask"),
                                kplus=_kplus_for(layers),
                                multitask_methods=self.preset.multitask_methods,
                                max_examples=self.preset.merge_max_examples,
                                compare_lora_averaging=self.preset.merge_compare_averaging)
    md = []
    for name in ("table3_lora_factor_average.md", "lora_merges.md"):
      path = os.path.join(out, name)
      if os.path.exists(path):
        with open(path) as f:
          md.append(f.read())
    io_utils.atomic_write_text(os.path.join(out, "report.md"), "\n\n".join(md))
    ev = self._evaluability(self.model_keys("lora", all_seeds=False))
    io_utils.atomic_write_json(os.path.join(out, "summary.json"),
                               {"findings": merge_study.study_findings(res, ev)})

  def _prediction(self):
    """δ from geometry, leave-one-task-out: LoRA distances of the first seeds (the runs
    the merge study merged) against the merge study's δ."""
    arrays, names = merge_prediction.read_distances(os.path.join(self.out, "distances", "lora"))
    keep = [i for i, n in enumerate(names) if evidence.task_of(n) == n]
    arrays = evidence.select_runs(arrays, keep)
    pairs = merge_prediction.read_merge_pairs(os.path.join(self.out, "merge"))
    merge_prediction.run_prediction(arrays, [names[i] for i in keep], pairs,
                                    os.path.join(self.out, "prediction"))

  def _representations(self):
    t = self.preset.repr_task
    out = os.path.join(self.out, "representations")
    res = representations.run_study([self.run_dir(t, m) for m in ("full", "lora", "bottleneck")],
                                    out, max_examples=self.preset.repr_max_examples,
                                    umap=self.preset.umap)
    ev = self._evaluability([scores.model_key(t, m) for m in ("full", "lora", "bottleneck")])
    io_utils.atomic_write_json(os.path.join(out, "summary.json"),
                               {"findings": representations.study_findings(res, ev)})

  def _one_vs_rest(self):
    p = self.preset
    out = os.path.join(self.out, "one_vs_rest")
    res = one_vs_rest.run_study(p.ovr_task, out, model=p.model, preset=p.train_preset)
    md = os.path.join(out, "one_vs_rest.md")
    if os.path.exists(md):
      with open(md) as f:
        io_utils.atomic_write_text(os.path.join(out, "report.md"), f.read())
    io_utils.atomic_write_json(os.path.join(out, "summary.json"),
                               {"findings": one_vs_rest.study_findings(res)})

  def _report(self):
    report.write_report(self)


@contextlib.contextmanager
def _own_lines_only():
  """A step's INFO records (a run's per-epoch validation lines, resumptions) are shown
  only at ``--verbosity=1``: by default the study prints one line per step. Warnings
  and errors always show. The absl logger's own level is restored exactly (NOTSET stays
  NOTSET, so a caller's handlers, e.g. a test's, see INFO records again afterwards)."""
  logger = absl_logging.get_absl_logger()
  old = logger.level
  if absl_logging.get_verbosity() == absl_logging.INFO:
    logger.setLevel(logging.WARNING)
  try:
    yield
  finally:
    logger.setLevel(old)


def finetune_headline(results: Sequence[Mapping[str, Any]]) -> str:
  """One line for a fine-tuning step: each run's test main metric (×100), lowest first."""
  counts = collections.Counter(r["task"] for r in results)
  scored = sorted((r["metrics"]["test"][r.get("main_metric", "accuracy")],
                   r["task"] + (f" (seed {r['config']['seed']})" if counts[r["task"]] > 1
                                else "")) for r in results)
  return "test main metric ×100: " + ", ".join(f"{task} {100 * v:.1f}" for v, task in scored)


def _kplus_for(num_layers: int) -> Tuple[int, ...]:
  """Paper A's best range is 5+ of 12 layers; keep the same share of a deeper/shallower model."""
  return (max(1, min(num_layers, round(5 * num_layers / 12))),)


# --- dry run ---------------------------------------------------------------------

# Paper A, Table 1: train sizes (GLUE dev / test sizes are not trained on).
PAPER_TRAIN_SIZES = {"cola": 8551, "mrpc": 3668, "rte": 2490, "qnli": 104743, "qqp": 363846,
                     "mnli": 392702, "sst2": 67349, "snli": 550152, "yelp": 560000,
                     "imdb": 25000}


def _train_rows(task: str, scale: float, train_scale: float = 1.0) -> int:
  """Training rows of a task after the validation split: the generator's pool at
  ``scale`` (and its extra training rows at ``train_scale``) for synthetic tasks, paper
  A's Table 1 size for real ones (10,000 if unknown)."""
  spec = get_task(task)
  if not spec.is_synthetic:
    pool = PAPER_TRAIN_SIZES.get(spec.name, 10000)
    return pool - validation_rows(pool)
  pool = synthetic.sizes(spec.name, scale)[0]
  return pool - validation_rows(pool) + int(round(pool * (train_scale - 1)))


def dry_run_plan(preset: StudyPreset) -> Dict[str, Any]:
  """Runs, optimizer steps, FLOPs and memory, computed offline from the architecture.

  Training FLOPs are ``training.flops.train_flops_per_sequence`` (the products forward
  and backward need under each method) for every training example of every epoch, an
  upper bound: every sequence is counted at ``max_seq_len`` and early stopping
  usually ends runs sooner.
  """
  config = EncoderConfig() if preset.model == "roberta-base" else None
  if config is None:
    config, _ = pretraining.load_model(preset.model)
  h, l, f, v = (config.hidden_size, config.num_hidden_layers, config.intermediate_size,
                config.vocab_size)
  layer_params = 4 * h * h + 2 * h * f
  dense = l * layer_params + h * h  # + classifier dense
  total = dense + (v + config.max_position_embeddings + config.type_vocab_size) * h
  runs, total_flops, trees_by_method = [], 0.0, {}
  for task, method, k in Pipeline(preset, "/dev/null").finetune_jobs():
    tc = preset.train_config(task, method, k)
    n_train = _train_rows(task, tc.data_scale, tc.train_scale)
    steps_per_epoch = -(-n_train // tc.batch_size)
    adapter_key = (method, tc.lora_rank, tuple(tc.lora_targets), tc.bottleneck_size,
                   tc.bottleneck_reduction_factor)
    if adapter_key not in trees_by_method:  # shapes only, ~1 s per method at roberta-base
      trees_by_method[adapter_key] = flops_lib.parameter_shapes(config, tc)
    flops = (flops_lib.train_flops_per_sequence(trees_by_method[adapter_key], config,
                                                tc.max_seq_len, method)
             * tc.epochs * n_train)
    total_flops += flops
    runs.append({"task": task, "method": method, "seed": tc.seed,
                 "max_steps": tc.epochs * steps_per_epoch,
                 "epochs": tc.epochs, "batch_size": tc.batch_size, "train_examples": n_train,
                 "tflops_upper_bound": round(flops / 1e12, 1)})
  groups = []
  for method, members in Pipeline(preset, "/dev/null").finetune_groups():
    tasks = [t for t, _ in members]
    tc = preset.train_config(tasks[0], method)
    tree = trees_by_method[(method, tc.lora_rank, tuple(tc.lora_targets), tc.bottleneck_size,
                            tc.bottleneck_reduction_factor)]
    trainable, frozen = partition.split(tree, method)
    size = min(len(tasks), preset.max_concurrent or len(tasks))
    need = group_lib.group_memory_bytes([tc] * size, config, trainable, frozen)
    groups.append({"method": method, "tasks": len(tasks), "tasks_per_group": size,
                   "group_memory_gb": round(need / 2**30, 2)})
  act = 20 * 128 * h * l * 4 * 16  # batch 20, seq 128: ~16 saved activations per layer
  memory = {"params_fp32_mb": round(total * 4 / 2**20), "adam_full_ft_mb": round(total * 12 / 2**20),
            "activations_batch20_seq128_mb": round(act / 2**20)}
  return {"preset": preset.name, "model": preset.model, "runs": runs, "num_runs": len(runs),
          "concurrent_groups": groups,
          "total_pflops_upper_bound": round(total_flops / 1e15, 2), "memory": memory,
          "h100_hours_at_40pct_mfu": round(total_flops / (0.4 * 989e12) / 3600, 2)}
