"""Guards around a run directory: usable paths, one trainer at a time, overwrite that loses nothing.

- ``check_usable(path)``: refuses, before any work, paths a run could never finish in
  (a file, glob characters that orbax's checkpoint merge reads as patterns, a read-only
  parent).
- ``RunLock``: ``RUN/run.lock`` holds the PID of the process training into RUN, under an
  ``fcntl`` lock; the kernel drops the lock when that process dies, so a stale file from a
  killed run is simply taken over.
- ``Overwrite``: ``--overwrite`` of an existing run moves it aside to ``RUN.previous`` and
  deletes it only once the new run has saved its first checkpoint; a new run that fails
  before that puts the old one back. Only directories that hold nothing but a run's own
  files are touched.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
from typing import Optional

from absl import logging

from tvgeo_jax import runs

LOCK = "run.lock"
PREVIOUS_SUFFIX = ".previous"
GLOB_CHARS = "[]*?"
# What a run directory may hold: the files a run writes and the temporaries of atomic writes.
RUN_ENTRIES = frozenset({runs.RESULTS, runs.RUN_CONFIG, runs.METRICS_LOG, runs.PARAMS,
                         runs.PARAMS + ".saving", runs.HF, runs.ADAPTER, runs.CHECKPOINTS,
                         LOCK, "tensorboard"})
TEMP_PREFIXES = (".tmp-", ".old-")


def check_usable(run_dir: str) -> None:
  """Raise ValueError if a run could not be trained and saved into ``run_dir``."""
  bad = sorted({c for c in run_dir if c in GLOB_CHARS})
  if bad:
    raise ValueError(
        f"--out {run_dir!r} contains {' '.join(bad)}: orbax's checkpoint merge reads these as "
        "glob patterns, so the run could never be restored. Choose a name without [ ] * ?.")
  if os.path.exists(run_dir) and not os.path.isdir(run_dir):
    raise ValueError(f"--out {run_dir!r} is a file, not a directory; choose another --out.")
  parent = run_dir
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f"--out {run_dir!r}: {parent!r} is not writable; choose a writable --out.")


def is_run_directory(path: str) -> bool:
  """True if ``path`` holds a run's marker files and nothing else but a run's own entries."""
  entries = os.listdir(path)
  if not ({runs.RESULTS, runs.RUN_CONFIG} & set(entries)):
    return False
  return not foreign_entries(path)


def foreign_entries(path: str):
  """The entries of ``path`` that a run does not write."""
  return sorted(e for e in os.listdir(path)
                if e not in RUN_ENTRIES and not e.startswith(TEMP_PREFIXES))


def _refuse_to_overwrite(run_dir: str) -> ValueError:
  foreign = foreign_entries(run_dir)
  if foreign:
    found = f"it holds files a run does not write: {', '.join(foreign[:5])}"
  else:
    found = f"it has neither {runs.RESULTS} nor {runs.RUN_CONFIG}"
  return ValueError(f"--overwrite refused: {run_dir!r} is not a tvgeo_jax run directory ({found}). "
                    "Nothing was deleted; choose another --out or remove it yourself.")


class RunLock:
  """An exclusive lock on a run directory while a process trains into it."""

  def __init__(self, run_dir: str):
    self.path = os.path.join(run_dir, LOCK)
    self._fd: Optional[int] = None

  def acquire(self) -> "RunLock":
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      raise ValueError(f"{os.path.dirname(self.path)!r} is being trained into by another "
                       f"process ({holder(self.path)}); wait for it to finish or stop it, "
                       "or choose another --out.") from None
    previous = _read(fd)
    if previous:
      logging.info("Taking over the stale lock of %s (that process is gone).", previous)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.unlink(self.path)
    except FileNotFoundError:
      pass
    os.close(self._fd)
    self._fd = None


def _read(fd: int) -> str:
  os.lseek(fd, 0, os.SEEK_SET)
  return os.read(fd, 256).decode(errors="replace").strip()


def holder(lock_path: str) -> str:
  try:
    with open(lock_path) as f:
      return f.read().strip() or "PID unknown"
  except OSError:
    return "PID unknown"


class Overwrite:
  """``--overwrite`` that keeps the old run until the new one has a checkpoint."""

  def __init__(self, run_dir: str):
    self.run_dir = run_dir
    self.previous = run_dir.rstrip(os.sep) + PREVIOUS_SUFFIX
    self.moved = False

  def move_aside(self) -> None:
    """Validate that ``run_dir`` is a run, then move it to ``RUN.previous``."""
    if not os.path.exists(self.run_dir) or not os.listdir(self.run_dir):
      return
    if not is_run_directory(self.run_dir):
      raise _refuse_to_overwrite(self.run_dir)
    if os.path.exists(self.previous):
      # An earlier --overwrite was killed before the new run's first checkpoint: the real
      # old run is already aside and run_dir holds the unfinished replacement.
      logging.warning("%s from an interrupted --overwrite is kept until this run's first "
                      "checkpoint.", self.previous)
      shutil.rmtree(self.run_dir)
    else:
      os.replace(self.run_dir, self.previous)
    self.moved = True
    logging.info("--overwrite: the old run is in %s until the new one saves a checkpoint.",
                 self.previous)

  def commit(self) -> None:
    """The new run has a checkpoint: the old one can go."""
    if self.moved and os.path.exists(self.previous):
      shutil.rmtree(self.previous)
    self.moved = False

  def roll_back(self) -> None:
    """The new run failed before its first checkpoint: put the old one back."""
    if not self.moved:
      return
    if os.path.exists(self.run_dir):
      shutil.rmtree(self.run_dir)
    os.replace(self.previous, self.run_dir)
    self.moved = False
    logging.warning("The new run failed before its first checkpoint; the old run is back in "
                    "%s.", self.run_dir)
