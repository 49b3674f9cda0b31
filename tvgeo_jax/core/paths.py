"""Where tvgeo_jax keeps files it builds itself (the synthetic tokenizer, the embedded model)."""
from __future__ import annotations

import os


def cache_dir() -> str:
  """The cache directory: ``$TVGEO_CACHE`` or ``~/.cache/tvgeo_jax``, created on demand."""
  path = os.environ.get("TVGEO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                       "tvgeo_jax")
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  return path
