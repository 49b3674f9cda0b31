r"""Run the whole study and write report.md / report.html.

  python -m experiments.reproduce                      # offline: embedded base, synthetic suite
  python -m experiments.reproduce --preset=paper       # roberta-base + hub tasks (GPU/TPU)
  python -m experiments.reproduce --preset=paper --dry_run   # the plan, offline
  python -m experiments.reproduce --seeds=2             # two seeds per task: the noise floor
  python -m experiments.reproduce --seeds=2 --seed_tasks=synth_sst2,synth_qnli   # on two tasks

Rerunning the same command resumes: finished steps (runs, grids, studies) are skipped.

With ``--multihost`` (run on every host, see ``experiments/multihost.py``) the study's
fine-tuning runs train data-parallel over all hosts, and the command stops there; the
analysis (distances, merges, representations, report) then runs on one host with the
same command without ``--multihost``, skipping the finished runs.
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags

from experiments import cli, multihost
from tvgeo_jax.studies import reproduce
from tvgeo_jax.training import compile_cache

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "offline", list(reproduce.PRESETS), "Study preset.")
flags.DEFINE_string("out", None, "Output directory (default out/<preset>).")
flags.DEFINE_integer("seeds", None, "Runs per task and method (seeds seed, seed+1, ...) "
                     "on every task, or on --seed_tasks (default: the preset's; offline: 2 "
                     "on synth_sst2 and synth_qnli, paper: 1). With 2 or more the distance "
                     "step reports the same-task, different-seed noise floor and a grouping "
                     "counts only where between-family distances clear it.", lower_bound=1)
flags.DEFINE_list("seed_tasks", None, "Only these tasks get the extra seeds (default: every "
                  "task with --seeds, the preset's own otherwise), e.g. the ones that fit a "
                  "time budget.")
flags.DEFINE_bool("dry_run", False, "Print the plan (runs, steps, FLOPs, memory) and exit.")
flags.DEFINE_bool("progress", True, "Show the overall progress bar.")
flags.DEFINE_string("compilation_cache", "default",
                    "XLA compilation cache ('default': under the tvgeo_jax cache; '' disables).")


def main(argv):
  del argv
  try:
    preset = reproduce.get_preset(FLAGS.preset, seeds=FLAGS.seeds, seed_tasks=FLAGS.seed_tasks)
  except ValueError as e:
    raise app.UsageError(str(e))
  if FLAGS.dry_run:
    print(json.dumps(reproduce.dry_run_plan(preset), indent=2))
    return
  multihost.initialize_if_requested()
  cache = FLAGS.compilation_cache
  compile_cache.enable(compile_cache.default_directory() if cache == "default" else cache)
  out = FLAGS.out or os.path.join("out", preset.name)
  t0 = time.time()
  reproduce.Pipeline(preset, out).run(progress=FLAGS.progress, training_only=FLAGS.multihost)
  if FLAGS.multihost:
    import jax
    print(f"fine-tuning runs done on {jax.process_count()} hosts in "
          f"{(time.time() - t0) / 60:.1f} min; the analysis runs on one host: python -m "
          f"experiments.reproduce --preset={preset.name} --out={out} (finished runs are "
          "skipped)")
    return
  print(f"report: {os.path.join(out, 'report.md')} and report.html "
        f"({(time.time() - t0) / 60:.1f} min)")


if __name__ == "__main__":
  cli.run(main)
