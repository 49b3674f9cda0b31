"""``--multihost``: two processes joined by ``jax.distributed`` over localhost give the
one-process run on two devices.

This is the Cloud TPU pod / multi-node GPU code path on one CPU machine: each process
has one device, loads only its slice of every batch
(``jax.make_array_from_process_local_data``), gathers evaluation outputs from the other
process, takes part in the orbax checkpoint saves, and process 0 alone writes the run
files. The reference is one process with two simulated devices, the same global batch.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile

from absl.testing import absltest
import numpy as np

from tvgeo_jax.training import runs
from tvgeo_jax.core import trees
import test_finetune_cli as cli

_COMMON = ("--task=synth_sst2", "--method=full", "--model=tiny-random", "--epochs=2",
           "--data_scale=0.25", "--max_seq_len=16", "--eval_batch_size=32")


# Run by two processes after the multi-host run: each reads it back (load_tree onto its own
# device, without waiting for the other), then they train two more runs one after the
# other, as the study pipeline does: the second run's checkpoint saves used to wait
# forever, because process 0's params save alone had put orbax's save count out of step.
_SECOND_SCRIPT = """
import os, sys
import jax
import numpy as np
jax.distributed.initialize(coordinator_address=sys.argv[2], num_processes=2,
                           process_id=int(sys.argv[3]))
from tvgeo_jax.training import runs
from tvgeo_jax.training import compile_cache, loop, presets
compile_cache.enable(sys.argv[5])
params = runs.load_run(sys.argv[1]).params
print("SUM", repr(sum(float(np.sum(np.asarray(v, np.float64)))
                      for v in jax.tree.leaves(params))))
for method in ("full", "lora"):
  config = presets.resolve("synth_sst2", method, "tiny-random", overrides=dict(
      epochs=1, data_scale=0.25, max_seq_len=16, eval_batch_size=32, progress=False))
  res = loop.finetune(config, os.path.join(sys.argv[4], method))
  print("RUN", method, res["devices"]["processes"])
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _trajectory(run_dir):
  """(kind, step, name, value) of every logged loss, gradient norm and validation loss."""
  with open(os.path.join(run_dir, runs.METRICS_LOG)) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [(r["kind"], r["step"], k, r[k]) for r in records
          for k in ("loss", "grad_norm", "validation_loss") if k in r]


class MultiHostTest(absltest.TestCase):

  def _run_processes(self, command, log_dir, name, n=2):
    """Run ``command(port, i)`` -> (argv, env) for processes i < n; all must succeed.

    Output goes to files, not pipes: a process blocked on a full pipe that nobody
    reads would stall the others at the next barrier."""
    port = _free_port()
    procs, logs = [], []
    for i in range(n):
      cmd, env = command(port, i)
      # Process 0 serves the coordinator on the loopback (JAX's default is every IPv6
      # interface, which a CI machine without IPv6 may not have).
      env = dict(env, JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}")
      logs.append(open(os.path.join(log_dir, f"{name}_{i}.log"), "w+"))
      procs.append(subprocess.Popen(cmd, cwd=cli.ROOT, env=env, stdout=logs[-1],
                                    stderr=subprocess.STDOUT, text=True))
    try:
      for p in procs:
        p.wait(timeout=300)
    finally:
      for p in procs:
        p.kill()
    outputs = []
    for p, log in zip(procs, logs):
      log.seek(0)
      outputs.append(log.read())
      log.close()
      self.assertEqual(p.returncode, 0, outputs[-1][-3000:])
    return outputs

  def test_two_processes_match_one_process_with_two_devices(self):
    base = tempfile.mkdtemp()
    one, two = os.path.join(base, "one"), os.path.join(base, "two")
    ref = cli.finetune(*_COMMON, f"--out={one}", timeout=300,
                       XLA_FLAGS="--xla_force_host_platform_device_count=2")
    self.assertEqual(ref.returncode, 0, ref.stderr[-3000:])

    self._run_processes(lambda port, i: cli.finetune_command(
        *_COMMON, f"--out={two}", "--multihost", f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2", f"--process_id={i}"), base, "finetune")

    a, b = runs.load_run(one), runs.load_run(two)
    self.assertEqual(a.results["devices"]["count"], 2)
    self.assertEqual((b.results["devices"]["count"], b.results["devices"]["processes"]), (2, 2))
    self.assertEqual(b.results["epochs_trained"], 2)
    # The same optimisation: logged losses, gradient norms, validation losses and the
    # trained weights agree to float32 rounding (the gradient sum crosses processes).
    ta, tb = _trajectory(one), _trajectory(two)
    self.assertEqual([t[:3] for t in tb], [t[:3] for t in ta])
    self.assertGreater(len(ta), 4)
    np.testing.assert_allclose([t[3] for t in tb], [t[3] for t in ta], rtol=1e-4, atol=1e-6)
    fa, fb = trees.flatten(a.params), trees.flatten(b.params)
    self.assertEqual(fa.keys(), fb.keys())
    for path in fa:
      np.testing.assert_allclose(fb[path], fa[path], rtol=1e-4, atol=1e-5, err_msg=str(path))
    # Every process reads the run back; then two runs in a row in the same processes.
    outputs = self._run_processes(lambda port, i: (
        [sys.executable, "-c", _SECOND_SCRIPT, two, f"127.0.0.1:{port}", str(i),
         os.path.join(base, "more"), cli.CACHE], cli.finetune_command()[1]), base, "second")
    total = sum(float(np.sum(np.asarray(v, np.float64))) for v in fb.values())
    for out in outputs:
      line = next(l for l in out.splitlines() if l.startswith("SUM "))
      self.assertAlmostEqual(float(line.split()[1]), total, places=6)
      self.assertIn("RUN lora 2", out)
      self.assertIn("RUN full 2", out)
    for method in ("lora", "full"):
      self.assertTrue(runs.is_finished(os.path.join(base, "more", method)), method)
    # Evaluation saw every example once, gathered across the two processes.
    for split in ("validation", "test"):
      self.assertEqual(b.results["metrics"][split]["num_examples"],
                       a.results["metrics"][split]["num_examples"])
      self.assertAlmostEqual(b.results["metrics"][split]["accuracy"],
                             a.results["metrics"][split]["accuracy"], places=6)

  def test_multihost_details_without_multihost_are_refused(self):
    proc = cli.finetune(*_COMMON, f"--out={tempfile.mkdtemp()}/run", "--num_processes=2",
                        timeout=120)
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("--num_processes is for --multihost runs; add --multihost", proc.stderr)


if __name__ == "__main__":
  absltest.main()
