"""Orbax checkpoints of a run: the latest train state and the best trainable params.

``RUN/checkpoints/latest/<step>/``: ``state`` (step, trainable, optimizer state) and
``meta`` (JSON: epoch, batches consumed in it, early-stopping state, history).
``RUN/checkpoints/best/<step>/``: ``trainable`` (best by validation loss) and ``meta``.
Orbax writes each step to a temporary directory and renames it when complete, so
a kill mid-save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import itertools
import os
import shutil
from typing import Any, Mapping, Optional, Tuple

from absl import logging
import jax
import orbax.checkpoint as ocp
from tvgeo_jax.core import io_utils
from tvgeo_jax.core.interrupts import deferred_interrupt
from tvgeo_jax.core.sharding import wait_for_all_processes


# Multi-host: orbax names its cross-process barriers after the step, so every manager a
# process opens gets a name of its own. Without it, the latest and best managers that save
# the same step collide ("Barrier _async_write_complete.20 is already ongoing", then a
# timeout). The run number keeps names from repeating across the runs of one process (a
# precaution; the hang seen with two runs in one process came from the params save, see
# save_tree). Every process opens the same runs in the same order, so the numbers agree.
_RUN_COUNT = itertools.count()
CHECKPOINTS = "checkpoints"  # RUN/checkpoints/{latest,best}


def _manager(directory: str, max_to_keep: int, name: str) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True,
      multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name))
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def abstract_like(tree: Any) -> Any:
  """Shapes, dtypes and shardings of ``tree`` (a restore target)."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class RunCheckpoints:
  """The two orbax managers of a run directory."""

  def __init__(self, run_dir: str):
    root = self.root = os.path.join(os.path.abspath(run_dir), CHECKPOINTS)
    n = next(_RUN_COUNT)
    self.latest = _manager(os.path.join(root, "latest"), max_to_keep=2, name=f"run{n}-latest")
    self.best = _manager(os.path.join(root, "best"), max_to_keep=1, name=f"run{n}-best")

  # --- latest state ----------------------------------------------------------
  # Saves, waits and close run to their end under Ctrl-C (see core/interrupts.py).
  def save_latest(self, step: int, state: Mapping, meta: Mapping) -> None:
    with deferred_interrupt():
      self.latest.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))), force=True)

  def restore_latest(self, target_state: Any) -> Optional[Tuple[Any, dict]]:
    """(state, meta) of the newest readable checkpoint, or None if there is none.

    A checkpoint that cannot be read (truncated data, missing metadata) is moved to
    ``RUN/checkpoints/unreadable/`` with a warning and the next older one is tried; if
    checkpoints exist but none is readable, a ValueError says what to do.
    """
    steps = sorted(self.latest.all_steps(), reverse=True)
    skipped = []
    for step in steps:
      try:
        got = self.latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_like(target_state)),
            meta=ocp.args.JsonRestore()))
      except Exception as e:  # orbax/TensorStore raise many types for a damaged checkpoint
        skipped.append(step)
        aside = self._set_aside(step)
        logging.warning("Checkpoint step %d of %s is unreadable (%s: %s); moved to %s, "
                        "trying the previous one.", step, self.root, type(e).__name__,
                        str(e).splitlines()[0][:200] if str(e) else "", aside)
        continue
      if skipped:
        logging.warning("Resuming from step %d; skipped unreadable checkpoint(s) %s.", step,
                        skipped)
      self._drop_best_after(step)
      return got["state"], dict(got["meta"])
    if skipped:
      raise ValueError(
          f"No readable checkpoint in {self.root}/latest (unreadable steps {skipped} were "
          f"moved to {self.root}/unreadable). Rerun with --overwrite to start the run afresh.")
    return None

  def _drop_best_after(self, step: int) -> None:
    """Best params saved after ``step`` (a kill between the two saves of an epoch end, or a
    skipped unreadable checkpoint) are recomputed, bit for bit, by the resumed run."""
    for later in [s for s in self.best.all_steps() if s > step]:
      logging.info("Dropping best params of step %d: the run resumes from step %d.", later, step)
      self.best.delete(later)

  def _set_aside(self, step: int) -> str:
    """Move a damaged step directory out of the manager's sight (kept for inspection)."""
    src = os.path.join(self.root, "latest", str(step))
    dst = os.path.join(self.root, "unreadable", f"latest-{step}")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.exists(dst):
      shutil.rmtree(dst)
    if os.path.exists(src):
      os.replace(src, dst)
    self.latest.reload()
    return dst

  # --- best params -----------------------------------------------------------
  def save_best(self, step: int, trainable: Mapping, meta: Mapping) -> None:
    with deferred_interrupt():
      self.best.save(step, args=ocp.args.Composite(
          trainable=ocp.args.StandardSave(trainable), meta=ocp.args.JsonSave(dict(meta))),
          force=True)

  def restore_best(self, target_trainable: Any) -> Optional[Tuple[Any, dict]]:
    step = self.best.latest_step()
    if step is None:
      return None
    got = self.best.restore(step, args=ocp.args.Composite(
        trainable=ocp.args.StandardRestore(abstract_like(target_trainable)),
        meta=ocp.args.JsonRestore()))
    return got["trainable"], dict(got["meta"])

  def wait(self) -> None:
    with deferred_interrupt():
      self.latest.wait_until_finished()
      self.best.wait_until_finished()

  def close(self) -> None:
    with deferred_interrupt():
      self.latest.close()
      self.best.close()


def _this_process_checkpointer() -> ocp.StandardCheckpointer:
  """A checkpointer that involves this process alone: no cross-process barriers, so
  one host may read while the others do something else (multi-host)."""
  me = jax.process_index()
  options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
  return ocp.StandardCheckpointer(multiprocessing_options=options)


def save_tree(directory: str, tree: Mapping) -> None:
  """Write a plain params tree (host arrays) to ``directory`` atomically (orbax, sync):
  into ``<directory>.saving``, then swapped into place, so an interrupted save leaves
  the previous tree intact (and its leftover is cleared by the next save).

  Multi-host: every process calls it and process 0 writes. Orbax numbers its saves per
  process and pairs the hosts' later checkpoint saves by that number, so a save by one
  host alone would leave the next run's saves waiting forever.
  """
  staging = os.path.abspath(directory).rstrip(os.sep) + ".saving"  # the same on every host
  if jax.process_index() == 0 and os.path.exists(staging):
    shutil.rmtree(staging)
  wait_for_all_processes(f"tvgeo_jax save_tree {staging}")
  with deferred_interrupt(), ocp.StandardCheckpointer() as ckptr:  # orbax: temp, rename
    ckptr.save(staging, tree)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    io_utils.replace_directory(staging, directory)
  wait_for_all_processes(f"tvgeo_jax save_tree {directory} done")


def load_tree(directory: str) -> dict:
  """A tree written by ``save_tree``, as numpy arrays (read by this process alone)."""
  import numpy as np
  with _this_process_checkpointer() as ckptr:
    meta = ckptr.metadata(os.path.abspath(directory))
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    # This process's own CPU device: jax.devices("cpu")[0] is process 0's on the others.
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), tree)
    restored = ckptr.restore(os.path.abspath(directory), target)
  return jax.tree.map(np.asarray, restored)
