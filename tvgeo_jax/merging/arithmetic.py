"""Task arithmetic: ``θ_0 + Σ_t λ_t τ_t`` over the task vectors of
``tvgeo_jax.vectors.task_vectors`` (the merged update folded into the kernels, the base
elsewhere, the head of ``head_from``)."""
from __future__ import annotations

from typing import Mapping, Sequence

from tvgeo_jax.vectors import inputs
from tvgeo_jax.vectors.inputs import HeadFrom, Modules
from tvgeo_jax.vectors.task_vectors import TaskVectors


def task_arithmetic(base: Mapping, models: Sequence[Mapping], lam=1.0, *,
                    modules: Modules = None, head_from: HeadFrom = 0) -> dict:
  """Task arithmetic: ``θ_0 + Σ_t λ_t τ_t`` (``lam`` a number or one per model)."""
  what = "task_arithmetic"
  tv = TaskVectors(base, models, modules, what)
  lam = inputs.check_lam(lam, len(tv), what)
  delta = {p: sum(float(l) * tv.leaf(t, p) for t, l in enumerate(lam)) for p in tv.paths}
  return tv.merged(delta, tv.models, head_from)

