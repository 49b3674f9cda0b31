"""glibc malloc settings that stop XLA's CPU programs from faulting in fresh pages each call.

An XLA CPU executable takes its temporaries from buffers allocated at each call (tens of
MB for a concurrent group's train step), mostly on XLA's worker threads. glibc gives each
thread its own arena, whose heaps are at most 64 MB, serves larger blocks (and, by default,
any block over its mmap threshold) with ``mmap``, and returns freed memory to the kernel,
so every call page-faults its buffers in again, zeroed by the kernel. Three settings remove
that: one arena for every thread (``M_ARENA_MAX`` 1: the main heap, which can grow past
64 MB), blocks up to 1 GiB from the heap (``M_MMAP_THRESHOLD``) and up to 1 GiB of freed
memory kept for reuse (``M_TRIM_THRESHOLD``). The arena setting must come before the
threads exist: ``experiments/__init__.py`` and ``tests/conftest.py`` apply it before jax is
imported.

Measured on the 2-core machine (BUILD_NOTES, "Session 13"): a four-task full fine-tuning
group of the offline preset (``experiments.finetune --task=synth_mnli,synth_snli,synth_mrpc,
synth_qqp --method=full --model=embedded --preset=offline --epochs=1``) 87.6 s wall, 45 s
in the kernel, 21.2 M minor page faults with glibc's defaults; 51.6 s, 6.5 s, 0.42 M with
these. The thresholds without the single arena: 74.9 s.

The price: memory a program freed stays with the process (reused by its next allocation,
not returned to the system), so the resident size stays near its peak, and threads share
one heap's lock. ``TVGEO_KEEP_FREED_MEMORY=0`` keeps glibc's defaults. Other C libraries
(macOS, musl): nothing to do, nothing done.
"""
from __future__ import annotations

import ctypes
import os

ENV_VAR = "TVGEO_KEEP_FREED_MEMORY"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8   # glibc's <malloc.h>
LIMIT = 1 << 30


def keep_freed_memory(limit: int = LIMIT) -> bool:
  """Tell glibc to use one arena for every thread created after this call, to serve
  blocks up to ``limit`` bytes from the heap and to keep up to ``limit`` of freed memory;
  True when the three settings took effect (glibc only, and not
  disabled by ``TVGEO_KEEP_FREED_MEMORY=0``)."""
  if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt   # the process's own C library, no search
  except (OSError, AttributeError):
    return False   # not glibc
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  return all([mallopt(M_ARENA_MAX, 1), mallopt(M_MMAP_THRESHOLD, limit),
              mallopt(M_TRIM_THRESHOLD, limit)])
