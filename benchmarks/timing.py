"""Timing helper shared by the benchmark scripts."""
from __future__ import annotations

import time


def best_time(fn, repeats: int) -> float:
  """The shortest of ``repeats`` wall-clock timings of ``fn()`` (which must block
  until its work is done, e.g. end in ``jax.block_until_ready``)."""
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)
