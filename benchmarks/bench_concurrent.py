r"""Concurrent vs one-at-a-time fine-tuning of the ten synthetic paper tasks, end to end.

  python -m benchmarks.bench_concurrent                      # embedded base, LoRA and full FT
  python -m benchmarks.bench_concurrent --methods=lora --epochs=1

For each method, two fresh child processes (each with an empty XLA compilation cache, as a
new user's commands would have) train the same ten tasks with the same configs and the same
number of optimizer steps per task (``patience=0``: no early stopping): one runs them one
after another through ``loop.finetune``, the other as one group through
``group.finetune_group``. Both times include data loading, compilation, every validation,
the checkpoints and the outputs. Prints per-task steps/s and the ratio.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("methods", ["lora", "full"], "Methods to measure.")
flags.DEFINE_string("model", "embedded", "Base model.")
flags.DEFINE_integer("epochs", 2, "Epochs per task (no early stopping).")
flags.DEFINE_float("data_scale", 0.5, "Synthetic task size multiplier.")
flags.DEFINE_integer("max_seq_len", 64, "Maximum tokens per example.")
flags.DEFINE_integer("batch_size", 32, "Batch size of every task.")
flags.DEFINE_string("mode", None, "Internal: run one mode in this process and print JSON.")
flags.DEFINE_string("method", None, "Internal: the method of --mode.")
flags.DEFINE_string("out", None, "Internal: the run directory root of --mode.")


def _configs(method: str):
  from tvgeo_jax.data import SYNTH_PAPER_TASKS
  from tvgeo_jax.training import presets
  overrides = dict(epochs=FLAGS.epochs, patience=0, data_scale=FLAGS.data_scale,
                   max_seq_len=FLAGS.max_seq_len, batch_size=FLAGS.batch_size,
                   progress=False, checkpoint_every=100000)
  return [presets.resolve(t, method, FLAGS.model, "tiny", overrides) for t in SYNTH_PAPER_TASKS]


def _child() -> None:
  from tvgeo_jax.training import compile_cache, group, loop
  compile_cache.enable(os.path.join(FLAGS.out, "xla"))  # empty: compile as a new user does
  configs = _configs(FLAGS.method)
  dirs = [os.path.join(FLAGS.out, c.task) for c in configs]
  t0 = time.time()
  if FLAGS.mode == "sequential":
    results = [loop.finetune(c, d) for c, d in zip(configs, dirs)]
  else:
    results = group.finetune_group(configs, dirs)
  wall = time.time() - t0
  print(json.dumps({"wall_s": wall, "steps": {r["task"]: r["steps"] for r in results},
                    "test": {r["task"]: r["metrics"]["test"]["main"] for r in results}}))


def _run_mode(mode: str, method: str) -> dict:
  out = tempfile.mkdtemp(prefix=f"bench_concurrent_{method}_{mode}_")
  cmd = [sys.executable, "-m", "benchmarks.bench_concurrent", f"--mode={mode}",
         f"--method={method}", f"--out={out}", f"--model={FLAGS.model}",
         f"--epochs={FLAGS.epochs}", f"--data_scale={FLAGS.data_scale}",
         f"--max_seq_len={FLAGS.max_seq_len}", f"--batch_size={FLAGS.batch_size}"]
  t0 = time.time()
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode:
    sys.exit(f"bench_concurrent: the {mode} {method} run failed:\n{proc.stderr[-3000:]}")
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  res["process_wall_s"] = time.time() - t0  # with interpreter and JAX start-up
  return res


def main(argv):
  del argv
  if FLAGS.mode:
    _child()
    return
  for method in FLAGS.methods:
    seq = _run_mode("sequential", method)
    con = _run_mode("concurrent", method)
    if seq["steps"] != con["steps"]:
      sys.exit(f"bench_concurrent: step counts differ: {seq['steps']} vs {con['steps']}")
    total = sum(seq["steps"].values())
    print(f"\n{method}: {len(seq['steps'])} tasks, {total} optimizer steps in all, "
          f"{FLAGS.epochs} epochs each ({FLAGS.model}, batch {FLAGS.batch_size}, "
          f"max_seq_len {FLAGS.max_seq_len})")
    print(f"  {'task':<14}{'steps':>6}{'seq steps/s':>13}{'conc steps/s':>14}"
          f"{'seq test':>10}{'conc test':>11}")
    for task, n in seq["steps"].items():
      print(f"  {task:<14}{n:>6}{n / seq['wall_s']:>13.2f}{n / con['wall_s']:>14.2f}"
            f"{seq['test'][task]:>10.3f}{con['test'][task]:>11.3f}")
    print(f"  one-at-a-time {seq['wall_s']:.1f} s, concurrent {con['wall_s']:.1f} s "
          f"(in-process; {seq['process_wall_s']:.1f} / {con['process_wall_s']:.1f} s with "
          f"start-up): concurrent/one-at-a-time speed-up {seq['wall_s'] / con['wall_s']:.2f}x")


if __name__ == "__main__":
  app.run(main)
