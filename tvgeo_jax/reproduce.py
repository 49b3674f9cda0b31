"""The whole study as one resumable pipeline (``python -m experiments.reproduce``).

Steps, each skipped when its outputs exist (so a rerun resumes):

1. ``base``: the pretrained model (the embedded base is built on first use);
2. ``finetune/<task>/<method>``: every task × method (full FT and LoRA; plus a
   bottleneck run on the representation task);
3. ``distances/<method>``: T_d for every task pair × layer (query, value) in one call;
4. ``merge``: δ(i, j) for LoRA factor and product averaging, Table 3, TIES analyses;
5. ``representations``: CKA and UMAP of PLM / full / LoRA / bottleneck on one task;
6. ``one_vs_rest``: multiclass full / LoRA against per-class binary LoRA models;
7. ``report``: report.md and report.html (figures inlined) with each paper finding
   checked on the measured numbers.

Presets: ``offline`` (embedded base, synthetic suite, CPU minutes), ``paper``
(roberta-base, the hub tasks, paper A's recipe; for GPUs/TPUs) and ``smoke`` (a
three-task cut-down used by the tests).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from tvgeo_jax import io_utils

STATE_FILE = "pipeline_state.json"


@dataclasses.dataclass(frozen=True)
class StudyPreset:
  """What one reproduction runs."""
  name: str
  model: str
  tasks: Tuple[str, ...]
  methods: Tuple[str, ...] = ("full", "lora")
  train_preset: str = "tiny"
  # Overrides of the training preset, per method ("*" for all).
  train_overrides: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  repr_task: Optional[str] = None
  ovr_task: Optional[str] = None
  distance_top_k: int = 8
  repr_max_examples: int = 500
  umap: bool = True
  multitask_methods: Tuple[str, ...] = ("lora_factor_average", "task_arithmetic", "ties")
  max_concurrent: Optional[int] = None  # tasks per concurrent fine-tuning group (None: all)

  def train_config(self, task: str, method: str):
    from tvgeo_jax.training import presets
    overrides = dict(self.train_overrides.get("*", {}))
    overrides.update(self.train_overrides.get(method, {}))
    return presets.resolve(task, method, self.model, self.train_preset, overrides)


def _offline() -> StudyPreset:
  from tvgeo_jax.data import SYNTH_PAPER_TASKS
  return StudyPreset(
      name="offline", model="embedded", tasks=tuple(SYNTH_PAPER_TASKS),
      # Issue 19 (BUILD_NOTES): data scale 5 gives every task a validation set of at
      # least 200 (RTE: 2000 pool rows, 10%); 2 epochs (564 steps for the largest tasks)
      # fill the study's budget; on the v3 base full FT needs 3e-4 (1e-3 stays at chance
      # on synth_sst2) and LoRA 3e-3 (1e-2 and 3e-2 learn less on synth_qnli).
      train_overrides={"*": dict(epochs=2, patience=1, data_scale=5.0, max_seq_len=64,
                                 progress=False, checkpoint_every=100000),
                       "full": dict(learning_rate=3e-4),
                       "lora": dict(learning_rate=3e-3),
                       "bottleneck": dict(learning_rate=3e-3)},
      repr_task="synth_mrpc", ovr_task="synth_authorship")


def _paper() -> StudyPreset:
  from tvgeo_jax.data import PAPER_TASKS
  return StudyPreset(name="paper", model="roberta-base", tasks=tuple(PAPER_TASKS),
                     train_preset="paper", repr_task="mrpc", ovr_task=None,
                     repr_max_examples=2000)


def _smoke() -> StudyPreset:
  """Three tasks, one short epoch each, no representation/one-vs-rest steps (those have
  their own end-to-end tests): the pipeline's plumbing in about a minute."""
  return StudyPreset(
      name="smoke", model="tiny-random", tasks=("synth_sst2", "synth_yelp", "synth_mrpc"),
      train_overrides={"*": dict(epochs=1, patience=0, data_scale=0.1, max_seq_len=32,
                                 batch_size=16, progress=False, checkpoint_every=100000)},
      repr_task=None, ovr_task=None)


PRESETS: Dict[str, Callable[[], StudyPreset]] = {
    "offline": _offline, "paper": _paper, "smoke": _smoke}


def get_preset(name: str) -> StudyPreset:
  if name not in PRESETS:
    raise ValueError(f"Unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
  return PRESETS[name]()


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
  def run_dir(self, task: str, method: str) -> str:
    return os.path.join(self.out, "runs", task, method)

  def finetune_jobs(self) -> List[Tuple[str, str]]:
    jobs = [(t, m) for t in self.preset.tasks for m in self.preset.methods]
    if self.preset.repr_task:
      for m in ("full", "lora", "bottleneck"):
        if (self.preset.repr_task, m) not in jobs:
          jobs.append((self.preset.repr_task, m))
    return jobs

  def finetune_groups(self) -> List[Tuple[str, List[str]]]:
    """(method, tasks) per fine-tuning step: one concurrent group per method on one host;
    one task per step under multi-host (each run is data-parallel over every host)."""
    import jax
    jobs = self.finetune_jobs()
    if jax.process_count() > 1:
      return [(m, [t]) for t, m in jobs]
    methods = list(dict.fromkeys(m for _, m in jobs))
    return [(m, [t for t, mm in jobs if mm == m]) for m in methods]

  def steps(self) -> List[Step]:
    from tvgeo_jax import runs
    p = self.preset
    steps = [Step("base", self._base, lambda: False, training=True)]
    for method, tasks in self.finetune_groups():
      dirs = [self.run_dir(t, method) for t in tasks]
      name = f"finetune {tasks[0]} {method}" if len(tasks) == 1 else \
          f"finetune {method} ({len(tasks)} tasks concurrently)"
      steps.append(Step(name, lambda ts=tasks, m=method: self._finetune(ts, m),
                        lambda ds=dirs: all(runs.is_finished(d) for d in ds), training=True))
    for method in p.methods:
      out = os.path.join(self.out, "distances", method)
      steps.append(Step(f"distances {method}", lambda m=method: self._distances(m),
                        lambda o=out: os.path.exists(os.path.join(o, "distances.json"))))
    merge_out = os.path.join(self.out, "merge")
    steps.append(Step("merge", self._merge,
                      lambda: os.path.exists(os.path.join(merge_out, "summary.json"))))
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
    import jax
    from tqdm.auto import tqdm
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
        logging.info("[%d/%d] %s: done already, skipped", i + 1, len(steps), step.name)
        continue
      logging.info("[%d/%d] %s ...", i + 1, len(steps), step.name)
      t = time.time()
      step.run()
      state["steps"][step.name] = {"seconds": round(time.time() - t, 1)}
      if writer:
        io_utils.atomic_write_json(state_path, state)
    state["last_total_seconds"] = round(time.time() - t0, 1)
    if writer:
      io_utils.atomic_write_json(state_path, state)
    return state

  # --- steps ---------------------------------------------------------------------
  def _base(self):
    if self.preset.model == "embedded":
      import jax
      from tvgeo_jax import embedded
      from tvgeo_jax.training.sharding import wait_for_all_processes
      if jax.process_index() == 0:  # multi-host: one host builds, the others wait for it
        embedded.ensure_embedded_base()
      wait_for_all_processes("tvgeo_jax embedded base")

  def _finetune(self, tasks: Sequence[str], method: str):
    from tvgeo_jax.training import group, loop
    configs = [self.preset.train_config(t, method) for t in tasks]
    dirs = [self.run_dir(t, method) for t in tasks]
    if len(tasks) == 1:
      loop.finetune(configs[0], dirs[0])
    else:
      group.finetune_many(configs, dirs, max_concurrent=self.preset.max_concurrent)

  def _sources(self, method: str, tasks: Optional[Sequence[str]] = None):
    from tvgeo_jax import sources
    tasks = tasks or self.preset.tasks
    return sources.load_sources([self.run_dir(t, method) for t in tasks])

  def _distances(self, method: str):
    from tvgeo_jax import geometry, sources
    srcs = self._sources(method)
    stacks = sources.module_stacks(srcs, ("query", "value"))
    lora_kind = method == "lora"
    grids = geometry.distance_grids(
        stacks, task_names=[s.name for s in srcs],
        factors=("product", "a", "b") if lora_kind else ("product",),
        top_k=None if lora_kind else self.preset.distance_top_k)
    geometry.write_distance_outputs(os.path.join(self.out, "distances", method), grids,
                                    kplus_figures=_kplus_for(srcs[0].config.num_hidden_layers))

  def _merge(self):
    from tvgeo_jax import merge_study
    out = os.path.join(self.out, "merge")
    srcs = self._sources("lora")
    layers = srcs[0].config.num_hidden_layers
    res = merge_study.run_study(srcs, out, "lora_factor_average",
                                analyses=("pairs", "ties", "topk", "multitask"),
                                kplus=_kplus_for(layers),
                                multitask_methods=self.preset.multitask_methods)
    md = []
    for name in ("table3_lora_factor_average.md", "lora_merges.md"):
      path = os.path.join(out, name)
      if os.path.exists(path):
        with open(path) as f:
          md.append(f.read())
    io_utils.atomic_write_text(os.path.join(out, "report.md"), "\n\n".join(md))
    io_utils.atomic_write_json(os.path.join(out, "summary.json"),
                               {"findings": merge_findings(res)})

  def _representations(self):
    from tvgeo_jax import representations
    t = self.preset.repr_task
    out = os.path.join(self.out, "representations")
    res = representations.run_study([self.run_dir(t, m) for m in ("full", "lora", "bottleneck")],
                                    out, max_examples=self.preset.repr_max_examples,
                                    umap=self.preset.umap)
    io_utils.atomic_write_json(os.path.join(out, "summary.json"),
                               {"findings": representation_findings(res)})

  def _one_vs_rest(self):
    from tvgeo_jax import one_vs_rest
    p = self.preset
    out = os.path.join(self.out, "one_vs_rest")
    overrides = dict(p.train_overrides.get("*", {}))
    res = one_vs_rest.run_study(p.ovr_task, out, model=p.model, preset=p.train_preset,
                                overrides=overrides)
    md = os.path.join(out, "one_vs_rest.md")
    if os.path.exists(md):
      with open(md) as f:
        io_utils.atomic_write_text(os.path.join(out, "report.md"), f.read())
    io_utils.atomic_write_json(os.path.join(out, "summary.json"),
                               {"findings": one_vs_rest_findings(res)})

  def _report(self):
    from tvgeo_jax import report
    report.write_report(self)


def merge_findings(res: Mapping[str, Any]) -> List[str]:
  """Paper A Table 3 and paper C, checked on the study's numbers."""
  import numpy as np
  from tvgeo_jax import findings
  lines = []
  pairs = res.get("pairs", {})
  fa = pairs.get("lora_factor_average")
  if fa:
    for module, table in fa["spearman"].items():
      get = lambda c: table.get(c, {}).get("mean", float("nan"))
      l2, cos, dg = get("l2"), get("cos"), get("d_G")
      lines.append(
          f"(paper A, Table 3, {module}: cosine and Grassmann correlate with δ more than L2; "
          f"paper {'0.65/0.65 vs 0.45' if module == 'query' else '0.68/0.64 vs 0.48'}): "
          f"mean ρ L2 {l2:.2f}, cos {cos:.2f}, d_G {dg:.2f} — cosine > L2: "
          f"{'yes' if cos > l2 else 'no'}; d_G > L2: {'yes' if dg > l2 else 'no'}; "
          f"positive correlation (cos): {'yes' if cos > 0 else 'no'}.")
  fp = pairs.get("lora_product_average")
  if fa and fp:
    da, dp = np.nanmean(np.asarray(fa["delta"], float)), np.nanmean(np.asarray(fp["delta"], float))
    lines.append(f"(factor vs product averaging: factor averaging adds cross terms B1A2 + B2A1): "
                 f"mean δ factor {da:.3f} vs product {dp:.3f} — product averaging hurts less: "
                 f"{'yes' if dp < da else 'no'}.")
  conflicts = res.get("ties", {}).get("0.2")
  if conflicts:
    ns = sorted(conflicts, key=int)
    share = [conflicts[n]["mean"] for n in ns]
    lines.append(f"(paper C: sign conflicts grow with the number of merged task vectors, top-20%): "
                 f"{share[0]:.3f} at n={ns[0]} → {share[-1]:.3f} at n={ns[-1]} — grows: "
                 f"{'yes' if findings.increasing(share) else 'no'}.")
  multi = res.get("multitask", {}).get("methods", {})
  if multi:
    parts, drops = [], []
    for m, v in multi.items():
      rows = v["rows"]
      parts.append(f"{m} {rows[0]['mean_normalised']:.2f}→{rows[-1]['mean_normalised']:.2f}")
      drops.append(rows[-1]["mean_normalised"] < rows[0]["mean_normalised"])
    lines.append("(paper C: merging more tasks lowers the normalised score): n=2 → n=T: "
                 + ", ".join(parts) + f" — lower for {sum(drops)} of {len(drops)} methods.")
  return lines


def representation_findings(res: Mapping[str, Any]) -> List[str]:
  """Paper B: PLM-vs-FT similarity fades with depth; BN stays closer to the PLM early."""
  import numpy as np
  from tvgeo_jax import findings
  lines = []
  diag = {pair: np.asarray(d, float) for pair, d in res.get("cka_diagonal", {}).items()}
  for pair, d in diag.items():
    if "plm" in pair.lower() and "full" in pair.lower():
      f = findings.fading_similarity(d)
      lines.append(f"(paper B: PLM vs FT similarity fades from ~1 to ~0.2 across layers): "
                   f"layer-wise CKA {f['first']:.2f} (layer {f['first_layer']}) → "
                   f"{f['last']:.2f} (last layer), Spearman trend {f['trend_rho']:.2f} — fades: "
                   f"{'yes' if f['fades'] else 'no'}.")
  full = [d for p, d in diag.items() if "plm" in p.lower() and "full" in p.lower()]
  bn = [d for p, d in diag.items() if "plm" in p.lower() and "bottleneck" in p.lower()]
  if full and bn:
    h = max(1, len(full[0]) // 2)
    a, b = float(np.nanmean(bn[0][:h + 1])), float(np.nanmean(full[0][:h + 1]))
    lines.append(f"(paper B: bottleneck adapters stay closer to the PLM in early layers): mean "
                 f"CKA to PLM over layers ≤ {h} (NaN layers skipped) BN {a:.2f} vs FT {b:.2f} — "
                 f"{'yes' if a > b else 'no'}.")
  return lines


def one_vs_rest_findings(res: Mapping[str, Any]) -> List[str]:
  """Paper D: compare macro-F1 of the approaches (the paper found one-vs-rest competitive)."""
  scores = {}
  for name, entry in res.get("approaches", {}).items():
    f1 = entry.get("macro_f1")
    if f1 is not None:
      scores[name] = float(f1)
  if not scores:
    return []
  best = max(scores, key=scores.get)
  return ["(paper D: multiclass vs one-vs-rest LoRA): macro-F1 " + ", ".join(
      f"{k} {v:.3f}" for k, v in scores.items()) + f" — best: {best}."]


def _kplus_for(num_layers: int) -> Tuple[int, ...]:
  """Paper A's best range is 5+ of 12 layers; keep the same share of a deeper/shallower model."""
  return (max(1, min(num_layers, round(5 * num_layers / 12))),)


# --- dry run ---------------------------------------------------------------------

# Paper A, Table 1: train sizes (GLUE dev / test sizes are not trained on).
PAPER_TRAIN_SIZES = {"cola": 8551, "mrpc": 3668, "rte": 2490, "qnli": 104743, "qqp": 363846,
                     "mnli": 392702, "sst2": 67349, "snli": 550152, "yelp": 560000,
                     "imdb": 25000}


def dry_run_plan(preset: StudyPreset) -> Dict[str, Any]:
  """Runs, optimizer steps, FLOPs and memory, computed offline from the architecture.

  Training FLOPs are ``training.flops.train_flops_per_sequence`` (the products forward
  and backward need under each method) for every training example of every epoch, an
  upper bound: every sequence is counted at ``max_seq_len`` and early stopping
  usually ends runs sooner.
  """
  from tvgeo_jax.models import EncoderConfig
  from tvgeo_jax.training import flops as flops_lib
  config = EncoderConfig() if preset.model == "roberta-base" else None
  if config is None:
    from tvgeo_jax.models import load_pretrained
    config, _ = load_pretrained(preset.model)
  h, l, f, v = (config.hidden_size, config.num_hidden_layers, config.intermediate_size,
                config.vocab_size)
  layer_params = 4 * h * h + 2 * h * f
  dense = l * layer_params + h * h  # + classifier dense
  total = dense + (v + config.max_position_embeddings + config.type_vocab_size) * h
  runs, total_flops, trees_by_method = [], 0.0, {}
  for task, method in Pipeline(preset, "/dev/null").finetune_jobs():
    tc = preset.train_config(task, method)
    name = task.replace("synth_", "")
    n_train = int(PAPER_TRAIN_SIZES.get(name, 10000) * 0.9)
    steps_per_epoch = -(-n_train // tc.batch_size)
    adapter_key = (method, tc.lora_rank, tuple(tc.lora_targets), tc.bottleneck_size,
                   tc.bottleneck_reduction_factor)
    if adapter_key not in trees_by_method:  # shapes only, ~1 s per method at roberta-base
      trees_by_method[adapter_key] = flops_lib.parameter_shapes(config, tc)
    flops = (flops_lib.train_flops_per_sequence(trees_by_method[adapter_key], config,
                                                tc.max_seq_len, method)
             * tc.epochs * n_train)
    total_flops += flops
    runs.append({"task": task, "method": method, "max_steps": tc.epochs * steps_per_epoch,
                 "epochs": tc.epochs, "batch_size": tc.batch_size, "train_examples": n_train,
                 "tflops_upper_bound": round(flops / 1e12, 1)})
  groups = []
  from tvgeo_jax import partition
  from tvgeo_jax.training import group as group_lib
  for method, tasks in Pipeline(preset, "/dev/null").finetune_groups():
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
