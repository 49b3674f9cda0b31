"""Multi-host start-up flags, shared by the entry points that train (finetune, reproduce).

On Cloud TPU, SLURM, Open MPI or Kubernetes ``--multihost`` alone is enough: JAX
detects the coordinator and the process ids. Anywhere else (several GPU machines,
or several processes on one machine) name them: run the same command on every host
with ``--multihost --coordinator_address=HOST0:PORT --num_processes=N
--process_id=I``.
"""
from __future__ import annotations

from absl import app, flags
from tvgeo_jax.core import sharding

FLAGS = flags.FLAGS
flags.DEFINE_bool("multihost", False,
                  "Start the multi-host runtime (jax.distributed.initialize) first: one "
                  "process per host, each loading its own slice of the data.")
flags.DEFINE_string("coordinator_address", None,
                    "--multihost: host:port of process 0 (default: detected on Cloud TPU, "
                    "SLURM, Open MPI, Kubernetes).")
flags.DEFINE_integer("num_processes", None, "--multihost: number of processes (default: "
                     "detected).", lower_bound=1)
flags.DEFINE_integer("process_id", None, "--multihost: this process's id, 0 .. "
                     "num_processes - 1 (default: detected).", lower_bound=0)

_DETAILS = ("coordinator_address", "num_processes", "process_id")


def initialize_if_requested() -> None:
  """Start the multi-host runtime when ``--multihost`` is given; call before any device
  is touched."""
  given = [name for name in _DETAILS if FLAGS[name].value is not None]
  if not FLAGS.multihost:
    if given:
      verb = "is" if len(given) == 1 else "are"
      raise app.UsageError(f"--{', --'.join(given)} {verb} for --multihost runs; add "
                           "--multihost, or leave it out for a single-host run.")
    return
  sharding.initialize_multihost(**{name: FLAGS[name].value for name in _DETAILS})
