"""XLA's persistent compilation cache: a rerun (or a resumed run) skips recompiling.

Compiling the train step of even the tiny model takes seconds on a CPU; with the
cache a second process with the same program loads the executable instead.
"""
from __future__ import annotations

import os
from typing import Optional

import jax
from tvgeo_jax.core import paths


def enable(directory: Optional[str]) -> Optional[str]:
  """Cache every compiled executable under ``directory`` (None/"" leaves it off)."""
  if not directory:
    return None
  directory = os.path.abspath(os.path.expanduser(directory))
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return directory


def default_directory() -> str:
  return os.path.join(paths.cache_dir(), "xla")
