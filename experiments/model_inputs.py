"""The model-input flags of the analysis entry points (grid_distances, merge_grid): one home.

``--runs`` (directories, globs expanded) or ``--runs_file`` (a pool manifest: one run or
adapter directory, or hub adapter id, per line; ``#`` comments; names literal). Models must
share one base: different bases are refused unless ``--allow_different_bases``; in a pool,
models of another base are skipped with a warning, or refused with ``--strict``.
"""
from __future__ import annotations

from typing import List, Optional

from absl import app, flags

from tvgeo_jax import sources

FLAGS = flags.FLAGS
flags.DEFINE_list("runs", None, "Finetune run (or peft adapter) directories, comma-separated; "
                  "globs allowed.")
flags.DEFINE_string("runs_file", None, "Pool manifest: one run/adapter directory or hub adapter "
                    "id per line, '#' comments, names literal (instead of --runs).")
flags.DEFINE_bool("strict", False, "--runs_file: refuse the pool if a model is on another base "
                  "(default: skip it with a warning).")
flags.DEFINE_bool("allow_different_bases", False,
                  "Go on although the models' base weights differ (a warning).")


def load_models(base: Optional[str] = None) -> List[sources.Source]:
  """The sources of --runs or --runs_file, checked to share one base."""
  if bool(FLAGS.runs) == bool(FLAGS.runs_file):
    raise app.UsageError("Pass --runs (finetune run or peft adapter directories) or "
                         "--runs_file (a pool manifest), one of them.")
  if FLAGS.runs_file:
    srcs = sources.load_pool(FLAGS.runs_file, base=base, strict=FLAGS.strict)
    sources.check_same_base(srcs, allow_different=FLAGS.allow_different_bases)
    return srcs
  return sources.load_sources(sources.expand_paths(FLAGS.runs), base=base,
                              allow_different_bases=FLAGS.allow_different_bases)
