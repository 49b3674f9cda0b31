"""The fine-tuning loop: epochs, per-epoch validation, early stopping, checkpoints, outputs.

``finetune(config, run_dir)`` is a whole run. It is preemption-safe: the latest
train state (and where in the epoch's deterministic data order it stood) is saved
every ``checkpoint_every`` steps and at each epoch end; rerunning the same call
resumes from it and ends with the same params as an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from tvgeo_jax.core import io_utils
from tvgeo_jax.adapters import partition
from tvgeo_jax.training import runs
from tvgeo_jax.training import checkpoint as ckpt_lib
from tvgeo_jax.training import hooks as hooks_lib
from tvgeo_jax.training import metric_writers
from tvgeo_jax.training import run_dir as run_dir_lib
from tvgeo_jax.training import methods, optim, step as step_lib
from tvgeo_jax.core import sharding
from tvgeo_jax.evaluation import scoring
from tvgeo_jax.evaluation import task_data as task_data_lib
from tvgeo_jax.evaluation.task_data import TaskData
from tvgeo_jax.training.config import TrainConfig, check_resume_changes, config_differences
from tvgeo_jax.training.early_stopping import EarlyStopping
from tvgeo_jax import pretraining

class StopRequested(Exception):
  """Raised by ``stop_after_steps`` (simulates a kill; nothing is saved at that moment)."""


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient norm became NaN/inf."""


# --- run-directory helpers -------------------------------------------------------

def _raise_on_config_change(run_dir: str, saved: Mapping[str, Any], config: TrainConfig,
                            what: str) -> None:
  diff = config_differences(saved, config)
  if diff:
    fields = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
    raise ValueError(
        f"{run_dir!r} holds {what} with a different configuration ({fields}). Rerun with "
        "the saved values, pass --overwrite to start afresh, or choose another --out.")


def _start_or_resume(run_dir: str, config: TrainConfig, has_checkpoint: bool,
                     resume_with: Mapping[str, Any]) -> Tuple[bool, TrainConfig, list]:
  """(resuming, the config to train with, the ``resume_with`` record) for ``run_dir``.

  A run with a checkpoint resumes: the command's config must match the saved one in every
  result-relevant field, except those changed on purpose with ``resume_with`` (recorded
  with the step they apply from). A run that never reached a checkpoint starts afresh
  with the command's config, whatever it saved before.
  """
  path = os.path.join(run_dir, runs.RUN_CONFIG)
  saved = io_utils.read_json(path) if os.path.exists(path) else None
  if saved is not None and has_checkpoint:
    record = list(saved.pop("resume_with", []))
    _raise_on_config_change(run_dir, saved, config, "an unfinished run")
    if resume_with and (not record or record[-1]["changes"] != dict(resume_with)):
      record.append({"from_step": None, "changes": dict(resume_with)})  # step set on restore
    effective = config
    for entry in record:
      effective = effective.replace(**entry["changes"])
    return True, effective, record
  if resume_with:
    raise ValueError(f"--resume_with needs a checkpoint to resume from and {run_dir!r} has "
                     "none; pass the new values as ordinary flags instead (the run starts "
                     "afresh).")
  if saved is not None:
    logging.info("%s never reached a checkpoint; starting afresh with this configuration.",
                 run_dir)
  write_run_config(run_dir, config, [])
  return False, config, []


def write_run_config(run_dir: str, config: TrainConfig, resume_record: list) -> None:
  if jax.process_index() == 0:
    d = config.to_dict()
    if resume_record:
      d["resume_with"] = resume_record
    io_utils.atomic_write_json(os.path.join(run_dir, runs.RUN_CONFIG), d)


def _non_finite_message(loss: float, gnorm: float, at_step: int, epoch: int, run_dir: str,
                        last: Optional[int], config: TrainConfig) -> str:
  where = (f"Non-finite training loss {loss} (gradient norm {gnorm}) at step {at_step} "
           f"(epoch {epoch}); stopped.")
  changes = f"learning_rate={config.learning_rate / 10:g}"
  if config.dtype != "float32":
    changes += ",dtype=float32"
  if last is None:
    flags_ = " ".join("--" + c for c in changes.split(","))
    return (f"{where} No checkpoint was saved yet: rerun with {flags_} (or other values); "
            "the run starts afresh with them.")
  return (f"{where} The last good checkpoint (step {last}) is kept in {run_dir}/checkpoints: "
          f"rerun the same command with --resume_with={changes} to continue from it (recorded "
          "in results.json), or with --overwrite and new flags to start afresh; also check "
          "the data.")


def devices_info(mesh) -> Dict[str, Any]:
  d = mesh.devices.flat[0]
  return {"count": int(mesh.devices.size), "platform": d.platform,
          "kind": getattr(d, "device_kind", d.platform), "processes": jax.process_count()}


# --- the run -----------------------------------------------------------------------

def finetune(config: TrainConfig, run_dir: str, *, data: Optional[TaskData] = None,
             overwrite: bool = False, mesh=None,
             resume_with: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """Fine-tune ``config.model`` on ``config.task`` into ``run_dir``; returns results.json.

  A finished run is returned as is unless ``overwrite`` (its config must match);
  an unfinished one resumes from its latest readable checkpoint (same config
  required, except the fields of ``resume_with``, e.g. ``{"learning_rate": 1e-4}``
  after a non-finite loss; see ``config.RESUME_CHANGEABLE``). ``overwrite`` replaces
  only a run directory, and only after the task, model and data have loaded; the old
  run is kept aside until the new one saves its first checkpoint.
  """
  config.validate()
  resume_with = dict(resume_with or {})
  check_resume_changes(resume_with)
  run_dir = os.path.abspath(run_dir)
  run_dir_lib.check_usable(run_dir)
  if runs.is_finished(run_dir) and not overwrite:
    results = io_utils.read_json(os.path.join(run_dir, runs.RESULTS))
    _raise_on_config_change(run_dir, results["config"], config, "a finished run")
    logging.info("%s is a finished run; skipping (pass --overwrite to redo it).", run_dir)
    return results
  # Everything that can fail on a bad task, model or data name fails before run_dir is touched.
  data = data if data is not None else task_data_lib.build(config)
  model_config, base = load_base(config, data)
  guard = RunDirectoryGuard(run_dir, overwrite)
  ckpts = None
  try:
    ckpts = ckpt_lib.RunCheckpoints(run_dir)
    return _train(config, run_dir, data, model_config, base, mesh, resume_with, guard, ckpts)
  except BaseException:
    if ckpts is not None:
      ckpts.wait()
      ckpts.close()
    guard.failed()
    raise
  finally:
    guard.release()


def load_base(config: TrainConfig, data: TaskData):
  """(model config, pretrained tree) with the task's head and ``config.dropout`` applied."""
  model_config, base = pretraining.load_model(config.model, num_labels=data.num_labels,
                                       label_names=tuple(data.label_names) or None,
                                       seed=config.seed)
  if config.dropout is not None:
    model_config = model_config.replace(hidden_dropout_prob=config.dropout,
                                        attention_probs_dropout_prob=config.dropout)
  return model_config, base


class RunDirectoryGuard:
  """The run directory's lock and a pending ``--overwrite`` (process 0 does the file work)."""

  def __init__(self, run_dir: str, overwrite: bool):
    self.primary = jax.process_index() == 0
    self.lock = run_dir_lib.RunLock(run_dir)
    self.replace = run_dir_lib.Overwrite(run_dir)
    if self.primary:
      if overwrite or os.path.exists(self.replace.previous):
        if os.path.isdir(run_dir):
          self.lock.acquire().release()  # refuses while another process trains here
        self.replace.move_aside()
      os.makedirs(run_dir, exist_ok=True)
      self.lock.acquire()
    sharding.wait_for_all_processes(f"tvgeo_jax run directory {run_dir} ready")

  def checkpoint_saved(self) -> None:
    if self.primary:
      self.replace.commit()

  def failed(self) -> None:
    if self.primary:
      self.lock.release()
      self.replace.roll_back()

  def release(self) -> None:
    if self.primary:
      self.lock.release()


@dataclasses.dataclass
class _Setup:
  """What stays fixed through a run: the configs, the data, the compiled steps, the frozen
  leaves (placed on the mesh)."""
  config: TrainConfig          # as the command gave it (the run's identity)
  train_config: TrainConfig    # with --resume_with changes applied
  resume_record: list
  run_dir: str
  data: TaskData
  model_config: Any
  mesh: Any
  frozen: Any
  train_step: Callable
  eval_step: Callable
  schedule: Callable
  class_weights: Optional[np.ndarray]
  parameter_counts: Tuple[int, int]
  base: Any                    # the pretrained tree (its fingerprint goes into results.json)


def _set_up(config: TrainConfig, run_dir: str, data: TaskData, model_config, base, mesh,
            resume_with: Mapping[str, Any], has_checkpoint: bool):
  """Phase 1: the run's fixed parts and its step-0 train state; whether it resumes."""
  resuming, train_config, resume_record = _start_or_resume(run_dir, config, has_checkpoint,
                                                           resume_with)
  params = methods.prepare_params(base, model_config, train_config)
  trainable, frozen = partition.split(params, train_config.method)
  mesh = mesh if mesh is not None else sharding.data_mesh()
  dtype = jnp.dtype(train_config.dtype)
  class_weights = scoring.class_weights(train_config.class_weights, data)
  total_steps = train_config.epochs * data.num_train_batches
  optimizer = optim.make_optimizer(trainable, total_steps=total_steps,
                                   **optim.config_kwargs(train_config))
  setup = _Setup(
      config=config, train_config=train_config, resume_record=resume_record, run_dir=run_dir,
      data=data, model_config=model_config, mesh=mesh,
      frozen=sharding.replicate(frozen, mesh),
      train_step=step_lib.make_train_step(
          model_config=model_config, optimizer=optimizer, mesh=mesh,
          is_regression=data.is_regression, seed=config.seed, dtype=dtype,
          class_weights=class_weights),
      eval_step=scoring.make_eval_step(model_config=model_config, mesh=mesh,
                                        is_regression=data.is_regression, dtype=dtype),
      schedule=optim.linear_schedule(train_config.learning_rate, total_steps,
                                     train_config.warmup_ratio),
      class_weights=class_weights,
      parameter_counts=partition.count_parameters(params, train_config.method), base=base)
  state = sharding.replicate(step_lib.init_state(trainable, optimizer), setup.mesh)
  return setup, state, resuming


class _Trainer:
  """The run's changing parts (train state, epoch, position in it, early stopping, history)
  and the phases that advance them: restore, one epoch, validate and checkpoint, finish."""

  def __init__(self, setup: _Setup, state, ckpts: ckpt_lib.RunCheckpoints,
               guard: RunDirectoryGuard):
    self.s, self.state, self.ckpts, self.guard = setup, state, ckpts, guard
    self.epoch, self.position = 0, 0
    self.stopper = EarlyStopping(patience=setup.config.patience)
    self.history: List[Dict[str, Any]] = []
    self.elapsed_before = 0.0  # wall time of earlier (interrupted) sessions of this run
    self.t_start = time.time()
    self.needs_first_save = True  # an --overwrite is complete at the first checkpoint
    self.writer: metric_writers.MetricWriter = metric_writers.MultiWriter([])
    self.hooks: List[hooks_lib.Hook] = []

  # --- phase 2: restore ------------------------------------------------------------
  def restore(self) -> Optional[int]:
    """Resume from the newest readable checkpoint; the restored step, or None."""
    restored = self.ckpts.restore_latest(self.state)
    if restored is None:
      logging.info("%s: no complete checkpoint yet; starting from step 0.", self.s.run_dir)
      return None
    self.state, meta = restored
    self.epoch, self.position = int(meta["epoch"]), int(meta["position"])
    self.stopper = EarlyStopping.from_dict(meta["early_stopping"])
    self.history = list(meta["history"])
    self.elapsed_before = float(meta.get("elapsed_s", 0.0))
    self.needs_first_save = False
    step = int(self.state["step"])
    logging.info("Resuming %s from step %d (epoch %d, batch %d).", self.s.run_dir, step,
                 self.epoch, self.position)
    record = self.s.resume_record
    if record and record[-1]["from_step"] is None:
      record[-1]["from_step"] = step
      logging.warning("Resuming with %s from step %d.", record[-1]["changes"], step)
    write_run_config(self.s.run_dir, self.s.config, record)
    return step

  def start_reporting(self, resumed_step: Optional[int]) -> None:
    primary = jax.process_index() == 0
    self.writer = metric_writers.make_writers(self.s.run_dir, runs.METRICS_LOG, resumed_step,
                                              primary)
    self.hooks = [hooks_lib.NonFiniteCheck(self._raise_non_finite)]
    if self.s.config.progress and primary:
      self.hooks.append(hooks_lib.ProgressBar(self.s.config.epochs))

  @property
  def done(self) -> bool:
    return self.epoch >= self.s.config.epochs or self.stopper.stop

  # --- phase 3: one epoch ------------------------------------------------------------
  def run_epoch(self) -> None:
    """The rest of the current epoch's steps, with mid-epoch checkpoints."""
    s, config = self.s, self.s.config
    for h in self.hooks:
      h.epoch_start(self.epoch, self.position, s.data.num_train_batches)
    pending = None  # (step number, metrics) of the previous step: fetched one step late
    self._t0, self._tokens = time.time(), 0
    for i, batch in enumerate(s.data.train_batches(self.epoch)):
      if i < self.position:
        continue
      self.state, metrics = s.train_step(self.state, s.frozen,
                                         sharding.shard_batch(batch, s.mesh))
      step_no = i + 1 + self.epoch * s.data.num_train_batches
      self._tokens += int(np.sum(batch["attention_mask"])) * jax.process_count()
      if pending is not None:
        self._report_step(*pending)
      pending = (step_no, metrics)
      if step_no % config.checkpoint_every == 0 and i + 1 < s.data.num_train_batches:
        self._report_step(step_no, metrics)  # never checkpoint a state whose loss was not finite
        pending = None
        self._save_latest(step_no, self.epoch, i + 1)
      if config.stop_after_steps and step_no >= config.stop_after_steps:
        raise StopRequested(f"stop_after_steps={config.stop_after_steps} reached at step "
                            f"{step_no}; rerun the same command to resume.")
    if pending is not None:
      self._report_step(*pending)

  def _report_step(self, step_no: int, metrics) -> None:
    """A finished step's loss to the hooks; a metrics record every ``log_every`` steps."""
    loss, gnorm = float(metrics["loss"]), float(metrics["grad_norm"])
    record = None
    if step_no % self.s.config.log_every == 0 and math.isfinite(loss):
      record = {"kind": "step", "step": step_no, "epoch": self.epoch, "loss": loss,
                "grad_norm": gnorm, "learning_rate": float(self.s.schedule(step_no - 1)),
                "tokens_per_s": self._tokens / max(time.time() - self._t0, 1e-9)}
    for h in self.hooks:
      h.step_end(step_no, loss, gnorm, record)
    if record is not None:
      self.writer.write(record)

  def _raise_non_finite(self, step_no: int, loss: float, gnorm: float) -> None:
    self.ckpts.wait()
    raise NonFiniteLossError(_non_finite_message(
        loss, gnorm, step_no, self.epoch, self.s.run_dir, self.ckpts.latest.latest_step(),
        self.s.train_config))

  def _save_latest(self, step_no: int, epoch: int, position: int) -> None:
    meta = {"epoch": epoch, "position": position, "early_stopping": self.stopper.to_dict(),
            "history": self.history,
            "elapsed_s": self.elapsed_before + time.time() - self.t_start}
    self.ckpts.save_latest(step_no, self.state, meta)
    if self.needs_first_save:
      self.ckpts.wait()
      self.guard.checkpoint_saved()
      self.needs_first_save = False

  # --- phase 4: validate and checkpoint ------------------------------------------------
  def validate_and_checkpoint(self) -> None:
    """Validation loss and metrics, early stopping, the best params, the epoch-end state."""
    s = self.s
    step_no = (self.epoch + 1) * s.data.num_train_batches
    full = partition.combine(self.state["trainable"], s.frozen)
    pred = scoring.predict(s.eval_step, full, s.data.eval_batches("validation"), s.mesh)
    val = scoring.split_metrics(pred, s.data, s.class_weights)
    self.stopper = self.stopper.update(self.epoch, val["loss"])
    record = {"kind": "epoch", "step": step_no, "epoch": self.epoch,
              "validation_loss": val["loss"],
              "validation": {k: v for k, v in val.items() if np.isscalar(v)},
              "best_epoch": self.stopper.best_epoch, "seconds": time.time() - self._t0}
    self.history.append(record)
    self.writer.write(record)
    for h in self.hooks:
      h.epoch_end(record)
    logging.info("epoch %d: validation loss %.4f %s (best epoch %d)", self.epoch + 1,
        val["loss"], {k: round(v, 4) for k, v in record["validation"].items()
                      if isinstance(v, float)}, self.stopper.best_epoch + 1)
    if self.stopper.improved_last:
      self.ckpts.save_best(step_no, self.state["trainable"],
                           {"epoch": self.epoch, "validation": val})
    self.epoch, self.position = self.epoch + 1, 0
    self._save_latest(step_no, self.epoch, 0)

  def close(self) -> None:
    for h in self.hooks:
      h.close()
    self.writer.close()

  # --- phase 5: finish -----------------------------------------------------------------
  def finish(self) -> Dict[str, Any]:
    """The best params evaluated on validation and test; the run's outputs written."""
    s, config = self.s, self.s.config
    self.ckpts.wait()
    best = self.ckpts.restore_best(self.state["trainable"])
    self.ckpts.close()
    if best is None:
      raise RuntimeError(f"{s.run_dir}: no best checkpoint was saved (no epoch ran?).")
    best_trainable, best_meta = best
    best_params = partition.combine(best_trainable, s.frozen)
    results_by_split = {}
    for split in ("validation", "test"):
      pred = scoring.predict(s.eval_step, best_params, s.data.eval_batches(split), s.mesh)
      results_by_split[split] = scoring.split_metrics(pred, s.data, s.class_weights)
    return write_run(s.run_dir, config, s.model_config, s.data, best_params, s.base,
                     metrics=results_by_split, best_epoch=int(best_meta["epoch"]),
                     history=self.history, stopped_early=bool(self.stopper.stop),
                     steps=int(self.state["step"]),
                     wall_time_s=self.elapsed_before + time.time() - self.t_start,
                     parameter_counts=s.parameter_counts, devices=devices_info(s.mesh),
                     resumed_with=s.resume_record)


def write_run(run_dir: str, config: TrainConfig, model_config, data: TaskData, params,
              base, *, metrics: Mapping[str, Any], best_epoch: int, history: list,
              stopped_early: bool, steps: int, wall_time_s: float,
              parameter_counts: Tuple[int, int], devices: Mapping[str, Any],
              resumed_with: list) -> Dict[str, Any]:
  """A finished run's results.json record and outputs (params/, hf/, adapter/), written
  by a single run and by each member of a concurrent group; returns the record."""
  n_trainable, n_total = parameter_counts
  results = {
      "task": config.task, "method": config.method, "base_model": config.model,
      "base_model_path": runs.resolve_base_path(config.model),
      "config": config.to_dict(), "resumed_with": resumed_with,
      "model_config": model_config.to_hf_dict(),
      "metrics": dict(metrics), "main_metric": data.main_metric,
      "best_epoch": best_epoch, "epochs_trained": len(history),
      "stopped_early": stopped_early, "steps": steps, "wall_time_s": wall_time_s,
      "parameters": {"trainable": n_trainable, "total": n_total,
                     "trainable_share": n_trainable / max(n_total, 1)},
      "devices": dict(devices), "history": history,
  }
  runs.write_outputs(run_dir, jax.tree.map(np.asarray, params), model_config, config.method,
                     results, base_model=runs.resolve_base_path(config.model) or config.model,
                     base_params=base)
  return results


def _train(config: TrainConfig, run_dir: str, data: TaskData, model_config, base, mesh,
           resume_with: Mapping[str, Any], guard: RunDirectoryGuard,
           ckpts: ckpt_lib.RunCheckpoints) -> Dict[str, Any]:
  setup, state, resuming = _set_up(config, run_dir, data, model_config, base, mesh,
                                   resume_with, bool(ckpts.latest.all_steps()))
  trainer = _Trainer(setup, state, ckpts, guard)
  trainer.start_reporting(trainer.restore() if resuming else None)
  try:
    while not trainer.done:
      trainer.run_epoch()
      trainer.validate_and_checkpoint()
  finally:
    trainer.close()
  return trainer.finish()
