"""Atomic file and directory writes: nothing already saved is lost on a crash."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator


def atomic_write_text(path: str, text: str) -> None:
  """Write ``text`` (UTF-8) to ``path`` via a temp file and ``os.replace``."""
  atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
  import numpy as np
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, tuple):
    return list(o)
  raise TypeError(f"Cannot serialise {type(o).__name__} to JSON")


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
  """Yield a temp directory; on success it replaces ``path`` in one rename."""
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-" + os.path.basename(path))
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  replace_directory(tmp, path)


def replace_directory(src: str, path: str) -> None:
  """Move the complete directory ``src`` to ``path``, replacing what is there: the old
  directory is moved aside first and removed only once ``src`` is in place."""
  path = os.path.abspath(path)
  old = None
  if os.path.exists(path):
    old = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=".old-" + os.path.basename(path))
    os.rmdir(old)
    os.replace(path, old)
  os.replace(src, path)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Write ``data`` to ``path`` via a temp file and ``os.replace`` (e.g. a PNG)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
