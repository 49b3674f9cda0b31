"""Concurrent fine-tuning: the tasks of a study in one compiled train step, vmapped over tasks.

``finetune_group(configs, run_dirs)`` trains T tasks of one method on one base at once:
- The train step is ``jax.vmap`` of the single-task step over a leading task axis, jitted
  once per (group, bucket length). LoRA and adapter groups pass the frozen base once (not
  stacked); the trainable leaves (adapters, heads, full FT's whole tree), their optimizer
  state and step counters are stacked ``[T, ...]``.
- Each member keeps what its single-task run has: its data order (seeded as alone), its
  dropout keys ``fold_in(key(seed), own step)``, its learning-rate schedule over its own
  step count (selected per member with ``lax.switch``), class weights, validation each
  epoch, early stopping and best checkpoint.
- Epochs run in lockstep: a group epoch has as many steps as the largest member's epoch; a
  member whose epoch has ended, or that stopped early, gets a weight-0 dummy batch and its
  update is discarded with ``jnp.where(active, new, old)`` (bit-identical state, Adam
  moments included). Heads of different label counts are zero-padded to the widest; the
  padded logits are masked to the float32 minimum, so their weights get exactly zero
  gradient and stay zero; outputs are saved at the real shapes. Batches are padded to the
  longest member's bucket length (masked tokens).
- Devices: a 2-D mesh ``("tasks", "data")``; the task axis shards the stacked trees and
  the batch rows shard over ``"data"``. Single host.
- Files: each member's run directory is exactly a single-task run's (run_config.json,
  metrics.jsonl, tensorboard/, checkpoints/best, then params/, hf/, adapter/,
  results.json when the member finishes); the group's latest stacked state lives in
  ``group_dir/checkpoints`` and is removed when every member has finished. A killed group
  resumes from it with the same command.
Results equal the single-task runs' within float32 rounding, not bitwise: the batched
(vmapped) matrix products and the wider softmax sum in another order (tested).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shutil
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax

from tvgeo_jax.core import io_utils, trees
from tvgeo_jax.adapters import partition
from tvgeo_jax.training import runs
from tvgeo_jax.models import apply as model_apply
from tvgeo_jax.training import checkpoint as ckpt_lib
from tvgeo_jax.training import loop, metric_writers, methods, optim, run_dir as run_dir_lib
from tvgeo_jax.core import sharding
from tvgeo_jax.evaluation import losses, scoring
from tvgeo_jax.evaluation import task_data
from tvgeo_jax.evaluation.task_data import TaskData
from tvgeo_jax.training import step as step_lib
from tvgeo_jax.training.config import TrainConfig
from tvgeo_jax.training.early_stopping import EarlyStopping

TASK_AXIS, DATA_AXIS = "tasks", sharding.DATA_AXIS
# Fields every member of a group must share: they shape the compiled step or the data.
SHARED_FIELDS = ("method", "model", "batch_size", "eval_batch_size", "max_seq_len", "dtype",
                 "dropout", "weight_decay", "max_grad_norm", "adam_b1", "adam_b2", "adam_eps",
                 "warmup_ratio", "class_weights", "lora_rank", "lora_alpha", "lora_targets",
                 "fast_modules", "other_lr_scale", "bottleneck_size",
                 "bottleneck_reduction_factor", "checkpoint_every", "log_every",
                 "stop_after_steps")
MASKED_LOGIT = float(np.finfo(np.float32).min)


# --- the mesh ----------------------------------------------------------------------

def group_mesh(num_tasks: int, devices: Optional[Sequence] = None,
               task_parallel: Optional[int] = None) -> Mesh:
  """A ``(tasks, data)`` mesh; by default the task axis is gcd(tasks, devices) wide."""
  devices = list(jax.devices() if devices is None else devices)
  k = math.gcd(num_tasks, len(devices)) if task_parallel is None else int(task_parallel)
  if k < 1 or len(devices) % k or num_tasks % k:
    raise ValueError(f"task_parallel={k} must divide both the {num_tasks} tasks and the "
                     f"{len(devices)} devices.")
  return Mesh(np.asarray(devices).reshape(k, len(devices) // k), (TASK_AXIS, DATA_AXIS))


def _stacked(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(TASK_AXIS))


def _batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(TASK_AXIS, DATA_AXIS))


# --- trees of different heads --------------------------------------------------------

def pad_to(tree: Mapping, shapes: Mapping) -> dict:
  """Zero-pad every leaf of ``tree`` to the shape of the same path in ``shapes``."""
  def pad(path, x):
    target = trees.get_path(shapes, path)
    x = np.asarray(x)
    if x.shape == tuple(target):
      return x
    return np.pad(x, [(0, t - s) for s, t in zip(x.shape, target)])
  return trees.map_with_path(pad, tree)


def slice_to(tree: Mapping, like: Mapping) -> dict:
  """Cut every leaf of ``tree`` back to the shape of the same path in ``like``."""
  return trees.map_with_path(
      lambda p, x: np.asarray(x)[tuple(slice(0, n) for n in np.shape(trees.get_path(like, p)))],
      tree)


def _widest_shapes(trainables: Sequence[Mapping]) -> dict:
  shapes = [trees.map_with_path(lambda p, x: np.shape(x), t) for t in trainables]
  return trees.map_with_path(
      lambda p, _: tuple(max(dims) for dims in zip(*(trees.get_path(s, p) for s in shapes))),
      trainables[0])


def _stack(trees_: Sequence[Any]) -> Any:
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees_)


def _row(tree: Any, t: int) -> Any:
  return jax.tree.map(lambda x: np.asarray(x[t]), tree)


# --- the compiled steps --------------------------------------------------------------

def mask_logits(logits: jax.Array, num_labels: jax.Array) -> jax.Array:
  """Columns at or beyond a member's label count → float32 minimum (zero probability)."""
  valid = jnp.arange(logits.shape[-1]) < num_labels
  return jnp.where(valid, logits.astype(jnp.float32), MASKED_LOGIT)


def make_group_train_step(*, model_config, schedules: Sequence[optax.Schedule],
                          optimizer_kwargs: Mapping[str, Any], trainable_like: Mapping,
                          mesh: Mesh, is_regression: bool, dtype: Any):
  """``step(state, frozen, batch, members) -> (state, metrics)``: one jit of the vmapped
  single-task step. ``members`` holds per-task arrays ``seed``, ``num_labels``,
  ``class_weights [T, labels]``, ``active`` and ``index`` (its schedule)."""

  def member_step(state, frozen, batch, m):
    rng = jax.random.fold_in(jax.random.key(m["seed"]), state["step"])

    def loss_of(trainable):
      params = partition.combine(trainable, frozen)
      out = model_apply(params, batch, config=model_config, train=True, rng=rng, dtype=dtype,
                        logits_only=True)
      logits = out["logits"] if is_regression else mask_logits(out["logits"], m["num_labels"])
      cw = None if m.get("class_weights") is None else m["class_weights"]
      return losses.weighted_mean_loss(logits, batch, is_regression, cw)

    loss, grads = jax.value_and_grad(loss_of)(state["trainable"])
    schedule = lambda count: jax.lax.switch(m["index"], schedules, count)
    optimizer = optim.make_optimizer(trainable_like, schedule=schedule, **optimizer_kwargs)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
    new = {"step": state["step"] + 1,
           "trainable": optax.apply_updates(state["trainable"], updates),
           "opt_state": opt_state}
    new = jax.tree.map(lambda n, o: jnp.where(m["active"], n, o), new, state)
    return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  vmapped = jax.vmap(member_step, in_axes=(0, None, 0, 0))
  stacked, rep, data = _stacked(mesh), sharding.replicated(mesh), _batch_sharding(mesh)
  return jax.jit(vmapped, in_shardings=(stacked, rep, data, stacked),
                 out_shardings=(stacked, stacked), donate_argnums=(0,))


def make_group_eval_step(*, model_config, mesh: Mesh, is_regression: bool, dtype: Any):
  """``eval(trainable, frozen, batch, num_labels) -> {"logits", "loss"}`` per member row."""

  def member_eval(trainable, frozen, batch, num_labels):
    params = partition.combine(trainable, frozen)
    out = model_apply(params, batch, config=model_config, train=False, dtype=dtype,
                      logits_only=True)
    logits = out["logits"].astype(jnp.float32)
    scored = logits if is_regression else mask_logits(logits, num_labels)
    return {"logits": logits,
            "loss": losses.per_example_loss(scored, batch["labels"], is_regression)}

  stacked, rep, data = _stacked(mesh), sharding.replicated(mesh), _batch_sharding(mesh)
  return jax.jit(jax.vmap(member_eval, in_axes=(0, None, 0, 0)),
                 in_shardings=(stacked, rep, data, stacked), out_shardings=data)


# --- batches ---------------------------------------------------------------------------

def _dummy_like(batch: Mapping[str, np.ndarray]) -> dict:
  """A batch of the same shape whose rows all have weight 0 (and label 0)."""
  out = {k: np.array(v) for k, v in batch.items()}
  out["weights"] = np.zeros_like(out["weights"])
  out["labels"] = np.zeros_like(out["labels"])
  return out


def _pad_length(batch: Mapping[str, np.ndarray], length: int) -> dict:
  out = {}
  for k, v in batch.items():
    if v.ndim == 2 and v.shape[1] < length:
      fill = 1 if k == "input_ids" else 0  # any id: the attention mask hides it
      v = np.pad(v, [(0, 0), (0, length - v.shape[1])], constant_values=fill)
    out[k] = v
  return out


def stack_batches(batches: Sequence[Mapping[str, np.ndarray]], data_shards: int) -> dict:
  """``[T, B, L]`` arrays: rows padded to a multiple of the data shards, tokens to the
  longest member's length."""
  batches = [sharding.pad_rows(b, data_shards) for b in batches]
  length = max(b["input_ids"].shape[1] for b in batches)
  batches = [_pad_length(b, length) for b in batches]
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


# --- members ---------------------------------------------------------------------------

@dataclasses.dataclass
class _Member:
  config: TrainConfig
  run_dir: str
  data: TaskData
  model_config: Any
  trainable: Any          # the member's own (unpadded) step-0 trainable tree
  frozen: Any             # after the set-up check, the one frozen tree all members share
  base: Any               # the pretrained tree (its fingerprint goes into results.json)
  parameter_counts: Any   # (trainable, total)
  guard: Any
  best: ckpt_lib.RunCheckpoints
  stopper: EarlyStopping = None
  history: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
  finished: bool = False
  results: Optional[Dict[str, Any]] = None
  writer: Any = None
  elapsed_before: float = 0.0

  @property
  def num_batches(self) -> int:
    return self.data.num_train_batches

  def to_meta(self) -> Dict[str, Any]:
    return {"task": self.config.task, "early_stopping": self.stopper.to_dict(),
            "history": self.history, "finished": self.finished}


def check_compatible(configs: Sequence[TrainConfig]) -> None:
  """Raise ValueError naming the tasks and the field if they cannot share one step."""
  first = configs[0]
  for c in configs[1:]:
    for f in SHARED_FIELDS:
      if getattr(c, f) != getattr(first, f):
        raise ValueError(
            f"Tasks {first.task!r} and {c.task!r} cannot train in one group: {f} differs "
            f"({getattr(first, f)!r} vs {getattr(c, f)!r}). Train them in separate groups "
            "(or with --max_concurrent=1).")
  names = [(c.task, c.seed) for c in configs]   # seeds of one task are distinct members
  if len(set(names)) != len(names):
    raise ValueError(f"A task appears twice with one seed in the group "
                     f"{[c.task for c in configs]}; list each (task, seed) once.")


def default_group_dir(run_dirs: Sequence[str], method: str) -> str:
  """``<common parent>/_group_<method>_<hash of the run directories>``."""
  dirs = sorted(os.path.abspath(d) for d in run_dirs)
  parent = os.path.commonpath(dirs) if len(dirs) > 1 else os.path.dirname(dirs[0])
  if parent in dirs:
    parent = os.path.dirname(parent)
  digest = hashlib.sha1("\n".join(dirs).encode()).hexdigest()[:8]
  return os.path.join(parent, f"_group_{method}_{digest}")


# --- the group run ----------------------------------------------------------------------

def _check_one_per_config(configs, run_dirs, data, caller: str) -> None:
  if len(configs) != len(run_dirs) or (data is not None and len(data) != len(configs)):
    raise ValueError(f"{caller} needs one run directory (and data) per config.")


def finetune_group(configs: Sequence[TrainConfig], run_dirs: Sequence[str], *,
                   data: Optional[Sequence[TaskData]] = None,
                   group_dir: Optional[str] = None, overwrite: bool = False,
                   mesh: Optional[Mesh] = None,
                   max_concurrent: Optional[int] = None) -> List[Dict[str, Any]]:
  """Fine-tune every ``configs[i]`` into ``run_dirs[i]`` concurrently; their results.json.

  Members already finished are returned as they are (unless ``overwrite``); the rest
  train in one group. See the module docstring for what is shared and what is not.
  """
  _check_one_per_config(configs, run_dirs, data, "finetune_group")
  configs = list(configs)
  for c in configs:
    c.validate()
  check_compatible(configs)
  if jax.process_count() > 1:
    raise ValueError("Concurrent groups run on one host; train with one task per command "
                     "under --multihost.")
  run_dirs = [os.path.abspath(d) for d in run_dirs]
  for d in run_dirs:
    run_dir_lib.check_usable(d)
  results: List[Optional[Dict[str, Any]]] = [None] * len(configs)
  todo = []
  for i, (c, d) in enumerate(zip(configs, run_dirs)):
    if runs.is_finished(d) and not overwrite:
      results[i] = loop.finetune(c, d)  # checks the config and returns the saved results
    else:
      todo.append(i)
  if not todo:
    return results
  group_dir = os.path.abspath(group_dir or default_group_dir([run_dirs[i] for i in todo],
                                                             configs[0].method))
  datas = [data[i] if data is not None and data[i] is not None
           else task_data.build(configs[i]) for i in todo]
  bases = [loop.load_base(configs[i], d) for i, d in zip(todo, datas)]
  trainer = _GroupTrainer([configs[i] for i in todo], [run_dirs[i] for i in todo], datas,
                          bases, group_dir, overwrite, mesh, max_concurrent)
  try:
    done = trainer.run()
  finally:
    trainer.close()
  if os.path.isdir(group_dir) and not os.listdir(group_dir):
    os.rmdir(group_dir)  # every member finished: the group's checkpoints are gone
  for i, r in zip(todo, done):
    results[i] = r
  return results


class _GroupTrainer:
  """The group's phases: set-up, restore, one group epoch, validate and checkpoint,
  finish each member as it stops."""

  def __init__(self, configs, run_dirs, datas, bases, group_dir, overwrite, mesh,
               max_concurrent):
    self.group_dir = group_dir
    self.t_start = time.time()
    self._lock = run_dir_lib.RunLock(group_dir)
    created = not os.path.exists(group_dir)
    os.makedirs(group_dir, exist_ok=True)
    self._lock.acquire()
    self.members: List[_Member] = []
    self.ckpts: Optional[ckpt_lib.RunCheckpoints] = None
    try:
      self._set_up_members(configs, run_dirs, datas, bases, overwrite, max_concurrent, mesh)
    except BaseException:  # refused (e.g. different bases): release what was taken
      self.close()
      if created and not os.listdir(group_dir):
        os.rmdir(group_dir)
      raise
    self.ckpts = ckpt_lib.RunCheckpoints(group_dir)

  def _set_up_members(self, configs, run_dirs, datas, bases, overwrite, max_concurrent,
                      mesh) -> None:
    for config, run_dir, data, (model_config, base) in zip(configs, run_dirs, datas, bases):
      guard = loop.RunDirectoryGuard(run_dir, overwrite)
      params = methods.prepare_params(base, model_config, config)
      trainable, frozen = partition.split(params, config.method)
      self.members.append(_Member(
          config=config, run_dir=run_dir, data=data, model_config=model_config,
          trainable=trainable, frozen=frozen, base=base,
          parameter_counts=partition.count_parameters(params, config.method), guard=guard,
          best=ckpt_lib.RunCheckpoints(run_dir), stopper=EarlyStopping(patience=config.patience)))
    self._check_same_frozen()
    self._check_memory(max_concurrent)
    self._set_up(mesh)

  # --- phase 1: set-up ----------------------------------------------------------------
  def _check_same_frozen(self) -> None:
    first = self.members[0]
    for m in self.members[1:]:
      a, b = trees.flatten(first.frozen), trees.flatten(m.frozen)
      if a.keys() != b.keys() or any(not np.array_equal(a[k], b[k]) for k in a):
        raise ValueError(
            f"Tasks {first.config.task!r} and {m.config.task!r} have different frozen "
            f"weights (different base models or, for random bases, seeds); they cannot "
            "share a step. Train them in separate groups.")
      m.frozen = first.frozen  # equal: keep one copy
    if any(m.data.is_regression != first.data.is_regression for m in self.members):
      names = [m.config.task for m in self.members]
      raise ValueError(f"Regression and classification tasks cannot share a step ({names}); "
                       "train them in separate groups.")

  def _check_memory(self, max_concurrent: Optional[int]) -> None:
    ms = self.members
    need = group_memory_bytes([m.config for m in ms], ms[0].model_config, ms[0].trainable,
                              ms[0].frozen)
    have = available_memory_bytes()
    if have is not None and need > 0.9 * have:
      fits = max(1, int(0.9 * have / max(need / len(ms), 1)))
      raise ValueError(
          f"A group of {len(ms)} tasks needs about {need / 2**30:.1f} GiB and "
          f"{have / 2**30:.1f} GiB is free; pass --max_concurrent={fits} (tasks per group, "
          "the rest queued)" + ("." if max_concurrent is None else
                                f" instead of {max_concurrent}."))

  def _set_up(self, mesh) -> None:
    ms = self.members
    c0 = ms[0].config
    self.mesh = mesh if mesh is not None else group_mesh(len(ms))
    self.data_shards = self.mesh.shape[DATA_AXIS]
    self.is_regression = ms[0].data.is_regression
    self.num_labels = np.array([m.data.num_labels for m in ms], np.int32)
    widest = max(int(n) for n in self.num_labels)
    self.model_config = ms[0].model_config.replace(num_labels=widest, label_names=())
    self.shapes = _widest_shapes([m.trainable for m in ms])
    padded = [pad_to(m.trainable, self.shapes) for m in ms]
    self.totals = [m.config.epochs * m.num_batches for m in ms]
    self.schedules = [optim.linear_schedule(m.config.learning_rate, total, c0.warmup_ratio)
                      for m, total in zip(ms, self.totals)]
    self.optimizer_kwargs = dict(optim.config_kwargs(c0), total_steps=1)
    init_opt = optim.make_optimizer(padded[0], **self.optimizer_kwargs)
    state = _stack([step_lib.init_state(p, init_opt) for p in padded])
    self.state = jax.device_put(state, _stacked(self.mesh))
    self.frozen = jax.device_put(ms[0].frozen, sharding.replicated(self.mesh))
    cw = None
    if c0.class_weights and not self.is_regression:
      cw = np.zeros((len(ms), widest), np.float32)
      for t, m in enumerate(ms):
        cw[t, :m.data.num_labels] = scoring.class_weights(True, m.data)
    self.member_arrays = {"seed": np.array([m.config.seed for m in ms], np.int32),
                          "num_labels": self.num_labels,
                          "index": np.arange(len(ms), dtype=np.int32)}
    if cw is not None:
      self.member_arrays["class_weights"] = cw
    dtype = jnp.dtype(c0.dtype)
    self.train_step = make_group_train_step(
        model_config=self.model_config, schedules=self.schedules,
        optimizer_kwargs=self.optimizer_kwargs, trainable_like=padded[0], mesh=self.mesh,
        is_regression=self.is_regression, dtype=dtype)
    self.eval_step = make_group_eval_step(model_config=self.model_config, mesh=self.mesh,
                                          is_regression=self.is_regression, dtype=dtype)
    self.epoch, self.position = 0, 0
    self.group_steps = 0
    self.host_steps = np.zeros(len(ms), np.int64)  # each member's own step count
    self.needs_first_save = True
    self.timings = {"train steps": 0.0, "validation": 0.0, "finish": 0.0, "checkpoints": 0.0}

  # --- phase 2: restore ---------------------------------------------------------------
  def _restore(self) -> Optional[int]:
    restored = self.ckpts.restore_latest(self.state)
    if restored is None:
      for m in self.members:
        loop.write_run_config(m.run_dir, m.config, [])
      return None
    self.state, meta = restored
    saved = [x["task"] for x in meta["members"]]
    if saved != [m.config.task for m in self.members]:
      raise ValueError(f"{self.group_dir} holds a group of tasks {saved}; rerun with exactly "
                       "those tasks, or remove that directory to start afresh.")
    self.epoch, self.position = int(meta["epoch"]), int(meta["position"])
    self.group_steps = int(meta["group_steps"])
    self.host_steps = np.asarray(self.state["step"]).astype(np.int64)
    self.needs_first_save = False
    for m, x in zip(self.members, meta["members"]):
      m.stopper = EarlyStopping.from_dict(x["early_stopping"])
      m.history = list(x["history"])
      m.finished = bool(x["finished"]) and runs.is_finished(m.run_dir)
      m.elapsed_before = float(meta.get("elapsed_s", 0.0))
      if m.finished:
        m.results = io_utils.read_json(os.path.join(m.run_dir, runs.RESULTS))
    logging.info("Resuming group %s from epoch %d, batch %d.", self.group_dir, self.epoch,
                 self.position)
    return self.group_steps

  def run(self) -> List[Dict[str, Any]]:
    resumed = self._restore()
    for t, m in enumerate(self.members):
      m.writer = metric_writers.make_writers(
          m.run_dir, runs.METRICS_LOG, None if resumed is None else int(self.host_steps[t]),
          primary=True)
    while not all(m.finished for m in self.members):
      self._run_epoch()
      self._validate_and_checkpoint()
    self.ckpts.wait()
    self.ckpts.close()
    shutil.rmtree(os.path.join(self.group_dir, "checkpoints"), ignore_errors=True)
    logging.info("Group of %d tasks: %d group steps in %.1f s (compiles included); %s.",
        len(self.members), self.group_steps, time.time() - self.t_start,
        ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items()))
    return [m.results for m in self.members]

  def _active(self, m: _Member, position: int) -> bool:
    return not m.finished and not m.stopper.stop and position < m.num_batches

  # --- phase 3: one group epoch ---------------------------------------------------------
  def _run_epoch(self) -> None:
    """The rest of the group epoch: as many steps as its largest unfinished member has."""
    config = self.members[0].config
    iters = [iter(m.data.train_batches(self.epoch)) for m in self.members]
    for it, m in zip(iters, self.members):  # a resumed epoch: skip the consumed batches
      for _ in range(min(self.position, m.num_batches)):
        next(it)
    steps = max(m.num_batches for m in self.members if not m.finished)
    self._t0, self._tokens = time.time(), 0
    pending = None
    for p in range(self.position, steps):
      active = np.array([self._active(m, p) for m in self.members])
      got = [next(it) if p < m.num_batches else None for it, m in zip(iters, self.members)]
      template = next(b for b, a in zip(got, active) if a)
      batches = [b if a else _dummy_like(template) for b, a in zip(got, active)]
      self._tokens += sum(int(np.sum(b["attention_mask"])) for b, a in zip(got, active) if a)
      batch = jax.device_put(stack_batches(batches, self.data_shards),
                             _batch_sharding(self.mesh))
      self.state, metrics = self.train_step(self.state, self.frozen, batch,
                                            dict(self.member_arrays, active=active))
      self.host_steps = self.host_steps + active
      self.group_steps += 1
      if pending is not None:
        self._report(*pending)
      pending = (metrics, active, self.host_steps.copy())
      if self.group_steps % config.checkpoint_every == 0 and p + 1 < steps:
        self._report(*pending)  # never checkpoint a state whose loss was not finite
        pending = None
        self._save_latest(self.epoch, p + 1)
      if config.stop_after_steps and self.group_steps >= config.stop_after_steps:
        raise loop.StopRequested(f"stop_after_steps={config.stop_after_steps} reached at "
                                 f"group step {self.group_steps}; rerun to resume.")
    if pending is not None:
      self._report(*pending)
    self.timings["train steps"] += time.time() - self._t0

  def _report(self, metrics, active, step_nos) -> None:
    """Each active member's loss checked and, every ``log_every`` of its steps, logged."""
    losses, gnorms = np.asarray(metrics["loss"]), np.asarray(metrics["grad_norm"])
    rate = self._tokens_per_s()
    for t, m in enumerate(self.members):
      if not active[t]:
        continue
      loss, gnorm, step_no = float(losses[t]), float(gnorms[t]), int(step_nos[t])
      if not (math.isfinite(loss) and math.isfinite(gnorm)):
        raise loop.NonFiniteLossError(
            f"Non-finite training loss {loss} (gradient norm {gnorm}) for task "
            f"{m.config.task!r} at its step {step_no}; the group stopped. Train that task "
            "alone with a lower --learning_rate, or check its data.")
      if step_no % m.config.log_every == 0:
        m.writer.write({"kind": "step", "step": step_no, "epoch": self.epoch, "loss": loss,
                        "grad_norm": gnorm,
                        "learning_rate": float(self.schedules[t](step_no - 1)),
                        "tokens_per_s": rate})

  def _tokens_per_s(self) -> float:
    """The group's throughput since the epoch started (all active members' real tokens)."""
    return self._tokens / max(time.time() - self._t0, 1e-9)

  def _save_latest(self, epoch: int, position: int) -> None:
    meta = {"epoch": epoch, "position": position, "group_steps": self.group_steps,
            "members": [m.to_meta() for m in self.members],
            "elapsed_s": time.time() - self.t_start}
    self.ckpts.save_latest(self.group_steps, self.state, meta)
    if self.needs_first_save:  # pending --overwrites are complete at the first checkpoint
      self.ckpts.wait()
      for m in self.members:
        m.guard.checkpoint_saved()
      self.needs_first_save = False

  # --- phase 4: validate and checkpoint ---------------------------------------------------
  def _evaluate(self, split: str, trainable,
                only: Optional[Sequence[int]] = None) -> List[Dict[str, np.ndarray]]:
    """Per member (those in ``only``, default all): logits (its own label count),
    per-row loss, labels, weights."""
    ms = self.members
    iters = [iter(m.data.eval_batches(split)) if only is None or t in only else iter(())
             for t, m in enumerate(ms)]
    out = [{"logits": [], "loss": [], "labels": [], "weights": []} for _ in ms]
    while True:
      got = [next(it, None) for it in iters]
      if all(b is None for b in got):
        break
      first = next(b for b in got if b is not None)
      batches = [b if b is not None else _dummy_like(first) for b in got]
      stacked = stack_batches(batches, self.data_shards)
      res = self.eval_step(trainable, self.frozen,
                           jax.device_put(stacked, _batch_sharding(self.mesh)),
                           jax.device_put(self.num_labels, _stacked(self.mesh)))
      logits, loss = np.asarray(res["logits"]), np.asarray(res["loss"])
      for t, m in enumerate(ms):
        if got[t] is None:
          continue
        keep = stacked["weights"][t] > 0
        width = 1 if self.is_regression else m.data.num_labels
        out[t]["logits"].append(logits[t][keep][:, :width])
        out[t]["loss"].append(loss[t][keep])
        out[t]["labels"].append(stacked["labels"][t][keep])
        out[t]["weights"].append(stacked["weights"][t][keep])
    return [{k: np.concatenate(v) if v else np.zeros((0,)) for k, v in o.items()} for o in out]

  def _validate_and_checkpoint(self) -> None:
    step_nos = self.host_steps
    t0 = time.time()
    live = [t for t, m in enumerate(self.members) if not m.finished and not m.stopper.stop]
    preds = self._evaluate("validation", self.state["trainable"], only=live)
    self.timings["validation"] += time.time() - t0
    for t, m in enumerate(self.members):
      if m.finished or m.stopper.stop:
        continue
      val = scoring.split_metrics(preds[t], m.data, self._class_weights(t))
      m.stopper = m.stopper.update(self.epoch, val["loss"])
      record = {"kind": "epoch", "step": int(step_nos[t]), "epoch": self.epoch,
                "validation_loss": val["loss"],
                "validation": {k: v for k, v in val.items() if np.isscalar(v)},
                "best_epoch": m.stopper.best_epoch, "seconds": time.time() - self._t0}
      m.history.append(record)
      m.writer.write(record)
      logging.info("%s epoch %d: validation loss %.4f (best epoch %d)",
                             m.config.task, self.epoch + 1, val["loss"], m.stopper.best_epoch + 1)
      if m.stopper.improved_last:
        best = slice_to(_row(self.state["trainable"], t), m.trainable)
        m.best.save_best(int(step_nos[t]), best, {"epoch": self.epoch, "validation": val})
    self.epoch, self.position = self.epoch + 1, 0
    finishing = [t for t, m in enumerate(self.members)
                 if not m.finished and (m.stopper.stop or self.epoch >= m.config.epochs)]
    t0 = time.time()
    if finishing:
      self._finish(finishing)
    self.timings["finish"] += time.time() - t0
    t0 = time.time()
    self._save_latest(self.epoch, 0)
    self.timings["checkpoints"] += time.time() - t0

  def _class_weights(self, t: int) -> Optional[np.ndarray]:
    cw = self.member_arrays.get("class_weights")
    return None if cw is None else cw[t, :self.members[t].data.num_labels]

  # --- phase 5: finish a member ---------------------------------------------------------
  def _finish(self, finishing: Sequence[int]) -> None:
    """Members that stopped: their best params scored on validation and test in one
    stacked pass (each in its own row), then their run directories written."""
    bests = {}
    for t in finishing:
      m = self.members[t]
      m.best.wait()
      best = m.best.restore_best(m.trainable)
      if best is None:
        raise RuntimeError(f"{m.run_dir}: no best checkpoint was saved (no epoch ran?).")
      bests[t] = best
    rows = [pad_to(bests[t][0] if t in bests else m.trainable, self.shapes)
            for t, m in enumerate(self.members)]
    stacked_best = jax.device_put(_stack(rows), _stacked(self.mesh))
    preds = {split: self._evaluate(split, stacked_best, only=finishing)
             for split in ("validation", "test")}
    for t in finishing:
      self._write_member(t, self.members[t], *bests[t],
                         {split: scoring.split_metrics(preds[split][t], self.members[t].data,
                                                    self._class_weights(t))
                          for split in preds})

  def _write_member(self, t: int, m: _Member, best_trainable, best_meta,
                    results_by_split) -> None:
    m.results = loop.write_run(
        m.run_dir, m.config, m.model_config, m.data,
        partition.combine(best_trainable, self.frozen), m.base, metrics=results_by_split,
        best_epoch=int(best_meta["epoch"]), history=m.history,
        stopped_early=bool(m.stopper.stop), steps=int(self.host_steps[t]),
        wall_time_s=m.elapsed_before + time.time() - self.t_start,
        parameter_counts=m.parameter_counts,
        devices={**loop.devices_info(self.mesh),
                 "group": [x.config.task for x in self.members]},
        resumed_with=[])
    m.best.close()
    m.writer.close()
    m.finished = True
    logging.info("%s finished: best epoch %d of %d.", m.config.task,
                           int(best_meta["epoch"]) + 1, len(m.history))

  def close(self) -> None:
    for m in self.members:
      if m.writer is not None and not m.finished:
        m.writer.close()
      m.best.close()
      if m.guard is not None:
        m.guard.release()
    if self.ckpts is not None:
      self.ckpts.close()
    self._lock.release()


# --- queues of groups and their memory ----------------------------------------------------

def group_memory_bytes(configs: Sequence[TrainConfig], model_config, trainable: Mapping,
                       frozen: Mapping) -> int:
  """Estimated device memory of one group step: per member the trainable leaves, their
  gradient and two Adam moments, plus the activations kept for the backward pass
  (float32, every layer, the longest bucket); the frozen leaves once."""
  t = len(configs)
  c = configs[0]
  leaf_bytes = lambda tree: sum(int(np.prod(np.shape(x))) * 4 for x in jax.tree.leaves(tree))
  h, layers = model_config.hidden_size, model_config.num_hidden_layers
  tokens = c.batch_size * c.max_seq_len
  per_token = 4 * layers * (10 * h + 2 * model_config.intermediate_size
                            + model_config.num_attention_heads * c.max_seq_len)
  return t * (4 * leaf_bytes(trainable) + tokens * per_token) + leaf_bytes(frozen)


def available_memory_bytes(device=None) -> Optional[int]:
  """The device's memory limit (accelerators) or the host's available memory (CPU)."""
  device = device or jax.devices()[0]
  stats = getattr(device, "memory_stats", lambda: None)() or {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  try:
    import psutil
    return int(psutil.virtual_memory().available)
  except ImportError:
    return None


def length_groups(lengths: Sequence[int], max_concurrent: int) -> List[List[int]]:
  """Indices of ``lengths`` in groups of at most ``max_concurrent``, longest first.

  A group epoch lasts as long as its longest member's and the shorter members idle
  through the rest of it (weight-0 rows that still cost compute), so members of similar
  length share a group: with the ten offline tasks (57 to 282 steps per epoch) groups of
  four compute 2,086 member-steps per epoch where one group of ten computes 2,820 for the
  1,848 that train. Ties keep the given order. (``plan_groups`` also weighs token lengths.)
  """
  order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
  return [order[s:s + max_concurrent] for s in range(0, len(order), max_concurrent)]


# A group's fixed cost (compiles per bucket length, validations, saves) in member-token-
# steps: fitted on the 2-core CPU to the offline study's six groups of session 12 (group
# wall time = 20-36 s + 1.1 ms per member-token-step; BUILD_NOTES).
GROUP_OVERHEAD = 25_000
_EXACT_UP_TO = 12  # members: subsets searched exactly (3^12 steps, ~2 s); more: length_groups


def group_cost(steps: Sequence[int], tokens: Sequence[float]) -> float:
  """Estimated compute of one group: every member computes every group step (idle ones a
  weight-0 batch) at the longest active member's length; ``tokens`` are the members'
  mean padded training lengths."""
  total, done = 0.0, 0
  for n in sorted(set(steps)):
    total += (n - done) * max(t for s, t in zip(steps, tokens) if s >= n)
    done = n
  return len(steps) * total + GROUP_OVERHEAD


def plan_groups(steps: Sequence[int], tokens: Sequence[float],
                max_concurrent: int) -> List[List[int]]:
  """Indices in groups of at most ``max_concurrent`` that minimise the summed
  ``group_cost`` (an exact search over subsets up to 12 members, ``length_groups``
  beyond). ``steps``: each member's optimizer steps (epochs × batches); ``tokens``: its
  mean padded batch length. A short-text member in a group of long-text ones computes at
  their length, and a short member idles while the longest trains, so the plan weighs
  both (the offline study: 8-11% less estimated compute than ``length_groups``, 23-33%
  less wall time measured; BUILD_NOTES)."""
  n = len(steps)
  if n > _EXACT_UP_TO:
    return length_groups(steps, max_concurrent)
  full = (1 << n) - 1
  best: Dict[int, Any] = {0: (0.0, ())}
  for mask in range(1, full + 1):
    low = (mask & -mask).bit_length() - 1   # the group holding the lowest member
    rest = mask & ~(1 << low)
    choice = None
    sub = rest
    while True:  # every subset of the rest joins it
      if bin(sub).count("1") < max_concurrent:
        members = [low] + [i for i in range(n) if sub >> i & 1]
        left = best[rest & ~sub]
        c = left[0] + group_cost([steps[i] for i in members], [tokens[i] for i in members])
        if choice is None or c < choice[0] - 1e-9:
          choice = (c, (tuple(members),) + left[1])
      if sub == 0:
        break
      sub = (sub - 1) & rest
    best[mask] = choice
  groups = [list(g) for g in best[full][1]]
  # Longest first (as length_groups), then by first index: a stable, readable order.
  return sorted(groups, key=lambda g: (-max(steps[i] for i in g), g[0]))


def mean_padded_length(d: TaskData) -> float:
  """The mean token length of a member's training batches (epoch 0, after bucketing)."""
  widths = [b["input_ids"].shape[1] for b in d.train_batches(0)]
  return float(np.mean(widths)) if widths else 0.0


def finetune_many(configs: Sequence[TrainConfig], run_dirs: Sequence[str], *,
                  max_concurrent: Optional[int] = None, overwrite: bool = False,
                  mesh: Optional[Mesh] = None,
                  data: Optional[Sequence[Optional[TaskData]]] = None) -> List[Dict[str, Any]]:
  """Train the tasks in groups of at most ``max_concurrent`` (default: all in one), one
  group after another, in the groups ``plan_groups`` estimates cheapest (from each
  member's steps, epochs times batches per epoch, and its mean padded batch length); the
  results in the order given. ``data``: a member's ``TaskData`` (None entries are built
  from the config)."""
  if max_concurrent is not None and max_concurrent < 1:
    raise ValueError(f"--max_concurrent must be >= 1, got {max_concurrent}.")
  _check_one_per_config(configs, run_dirs, data, "finetune_many")
  n = len(configs)
  datas: List[Optional[TaskData]] = list(data) if data is not None else [None] * n
  k = max_concurrent or n
  if k >= n:
    groups = [list(range(n))]
  else:
    # Every member's length, finished ones too: a resumed study forms the same groups
    # (and finds each group's checkpoint directory again).
    datas = [d if d is not None else task_data.build(c) for c, d in zip(configs, datas)]
    groups = plan_groups([c.epochs * d.num_train_batches for c, d in zip(configs, datas)],
                         [mean_padded_length(d) for d in datas], k)
  out: List[Optional[Dict[str, Any]]] = [None] * n
  for g in groups:
    done = finetune_group([configs[i] for i in g], [run_dirs[i] for i in g],
                          overwrite=overwrite, mesh=mesh, data=[datas[i] for i in g],
                          max_concurrent=max_concurrent)
    for i, r in zip(g, done):
      out[i] = r
  return out
