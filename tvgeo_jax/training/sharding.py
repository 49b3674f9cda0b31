"""Data parallelism with ``jax.sharding``: a 1-D device mesh, batch split, state replicated.

The train step is one global-view ``jax.jit`` function: its inputs carry
``NamedSharding``s (batch over the ``"data"`` axis, parameters and optimizer
state replicated) and XLA's SPMD partitioner inserts the gradient all-reduce.
The same code runs on 1 CPU, 8 GPUs or every chip of a TPU pod slice (one
process per host, see ``initialize_multihost``).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_multihost(coordinator_address: Optional[str] = None,
                         num_processes: Optional[int] = None,
                         process_id: Optional[int] = None) -> None:
  """Start the multi-host runtime (Cloud TPU pods, multi-node GPU, several CPU processes).

  Arguments left ``None`` are detected by ``jax.distributed.initialize`` (Cloud TPU,
  SLURM, Open MPI, Kubernetes); elsewhere give all three. Must run before anything
  touches a device.
  """
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def wait_for_all_processes(name: str) -> None:
  """A barrier across the processes of a multi-host run (``name`` must agree on all of
  them); nothing to wait for in a single process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def data_mesh(devices: Optional[list] = None) -> Mesh:
  """A 1-D mesh over all (global) devices with axis ``"data"``."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Place every leaf of ``tree`` on every device of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))


def pad_rows(batch: Mapping[str, np.ndarray], multiple: int) -> dict:
  """Append weight-0 rows so the row count divides ``multiple`` (devices per process).

  Padding rows repeat the first row's tokens (any valid input) with weight 0, so
  losses and metrics ignore them.
  """
  rows = next(iter(batch.values())).shape[0]
  extra = (-rows) % multiple
  if not extra:
    return dict(batch)
  out = {}
  for k, v in batch.items():
    fill = np.zeros_like(v[:1]) if k == "weights" else v[:1]
    out[k] = np.concatenate([v, np.repeat(fill, extra, axis=0)], axis=0)
  return out


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """This process's rows → one global array per key, sharded over ``"data"``.

  Single-process: the batch is the global batch. Multi-host: each process passes
  its own slice (the pipeline's host slicing) and the global batch is the
  concatenation in process order.
  """
  local_devices = len(mesh.local_devices)
  batch = pad_rows(batch, local_devices)
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def to_host(x: jax.Array) -> np.ndarray:
  """A global array as one numpy array on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
