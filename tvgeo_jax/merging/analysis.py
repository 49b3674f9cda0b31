"""Paper C's analysis of interference: sign conflicts among trimmed task vectors.

``sign_conflict_share``: after trimming every task vector to its top-k fraction
(``keep_top_k``), an entry is *in conflict* within a set S of task vectors when
some member of S is positive there and another negative. For each n = 2..T the
share of conflicting entries is averaged over subsets S of size n: all
``C(T, n)`` subsets when there are at most ``max_subsets`` of them, otherwise
``max_subsets`` distinct subsets drawn at random (``seed``). The share is taken
over all entries (``denominator="all"``) or over
the entries where at least two members of S are non-zero (``"overlap"``).
"""
from __future__ import annotations

import itertools
import math
from typing import Dict, List, Mapping, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from tvgeo_jax.core import trees
from tvgeo_jax.merging.ties import GRANULARITIES, check_density, keep_top_k

DENOMINATORS = ("all", "overlap")


def subsets(num_tasks: int, n: int, max_subsets: int, seed: int) -> List[Tuple[int, ...]]:
  """All n-subsets of range(num_tasks) if at most ``max_subsets``, else a seeded sample."""
  total = math.comb(num_tasks, n)
  if total <= max_subsets:
    return list(itertools.combinations(range(num_tasks), n))
  rng = np.random.default_rng(seed + 1000 * n)
  chosen = set()
  while len(chosen) < max_subsets:
    chosen.add(tuple(sorted(rng.choice(num_tasks, n, replace=False).tolist())))
  return sorted(chosen)


@jax.jit
def _conflict_counts(signs: jax.Array, member: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """(#entries with both signs present, #entries with ≥2 non-zero) within ``member``."""
  m = member.reshape((-1,) + (1,) * (signs.ndim - 1))
  pos = jnp.any((signs > 0) & m, axis=0)
  neg = jnp.any((signs < 0) & m, axis=0)
  nonzero = jnp.sum((signs != 0) & m, axis=0)
  return jnp.sum(pos & neg, dtype=jnp.int32), jnp.sum(nonzero >= 2, dtype=jnp.int32)


def sign_conflict_share(task_vectors: Sequence[Mapping], k: float = 0.2, *,
                        granularity: str = "global", denominator: str = "all",
                        max_subsets: int = 20, seed: int = 0) -> Dict[int, Dict[str, float]]:
  """``{n: {"mean", "std", "subsets"}}`` for n = 2..T: the share of entries with a
  sign conflict among n trimmed task vectors (mean/std over the subsets used).

  Args:
    task_vectors: T ≥ 2 task-vector trees with the same leaves (``task_vectors()``).
    k: kept fraction per task vector, in (0, 1].
    granularity: trimming granularity, "global" or "per_tensor" (as in ``ties``).
    denominator: "all" entries, or "overlap" (entries with ≥ 2 non-zero members).
    max_subsets: subsets per n before sampling at random.
    seed: seed of the subset sample.
  """
  what = "sign_conflict_share"
  tvs = list(task_vectors)
  if len(tvs) < 2:
    raise ValueError(f"{what}: needs at least 2 task vectors, got {len(tvs)}.")
  k = check_density(k, what)
  if granularity not in GRANULARITIES or denominator not in DENOMINATORS:
    raise ValueError(f"{what}: granularity must be one of {GRANULARITIES} and denominator one "
                     f"of {DENOMINATORS}; got {granularity!r}, {denominator!r}.")
  if max_subsets < 1:
    raise ValueError(f"{what}: max_subsets must be >= 1, got {max_subsets}.")
  flats = [trees.flatten(keep_top_k(tv, k, granularity)) for tv in tvs]
  paths = sorted(flats[0])
  for i, f in enumerate(flats[1:], 1):
    if sorted(f) != paths or any(np.shape(f[p]) != np.shape(flats[0][p]) for p in paths):
      raise ValueError(f"{what}: task vector {i} has other leaves or shapes than task vector 0; "
                       "build them with the same modules= selection.")
  num = len(tvs)
  plan = {n: subsets(num, n, max_subsets, seed) for n in range(2, num + 1)}
  members = {n: [np.isin(np.arange(num), s) for s in ss] for n, ss in plan.items()}
  conflicts = {n: np.zeros(len(ss)) for n, ss in plan.items()}
  overlaps = {n: np.zeros(len(ss)) for n, ss in plan.items()}
  entries = 0
  for p in paths:
    signs = jnp.stack([jnp.sign(f[p]).astype(jnp.int8) for f in flats])
    entries += int(np.prod(signs.shape[1:]))
    for n in plan:
      for j, m in enumerate(members[n]):
        c, o = _conflict_counts(signs, jnp.asarray(m))
        conflicts[n][j] += int(c)
        overlaps[n][j] += int(o)
  out = {}
  for n in plan:
    denom = np.full(len(plan[n]), float(entries)) if denominator == "all" else overlaps[n]
    share = np.where(denom > 0, conflicts[n] / np.maximum(denom, 1), np.nan)
    out[n] = {"mean": float(np.mean(share)), "std": float(np.std(share)),
              "subsets": len(plan[n])}
  return out
