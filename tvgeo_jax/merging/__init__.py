"""Model merging as pytree arithmetic (paper A section 3.2, paper C).

Averaging merges (``weight_average``, ``lora_factor_average``,
``lora_product_average`` — with ``refactor_rank`` peft's ``svd`` merge) and
task-vector merges (``task_arithmetic``, ``ties``; drop-then-combine ``dare``,
``dare_ties``, ``magnitude_prune``, ``breadcrumbs``, ``della`` in ``sparsify``;
singular-basis ``tsv_merge``, ``iso_c``, ``knots`` in ``spectral``) map parameter
trees to a parameter tree. Heads are never merged: the
result carries the head of ``head_from`` (default the first model), or swap it
with ``with_head``. Leaf selection, LoRA handling and checks: ``inputs``.
"""
from tvgeo_jax.merging.analysis import sign_conflict_share
from tvgeo_jax.merging.averaging import (lora_factor_average, lora_product_average,
                                         weight_average)
from tvgeo_jax.merging.inputs import with_head
from tvgeo_jax.merging.sparsify import (breadcrumbs, dare, dare_ties, della,
                                        drop_and_combine, magnitude_prune)
from tvgeo_jax.merging.spectral import iso_c, knots, tsv_merge
from tvgeo_jax.merging.task_vectors import (apply_task_vector, task_arithmetic, task_vector,
                                            task_vectors)
from tvgeo_jax.merging.ties import keep_top_k, kth_largest_magnitude, ties

__all__ = ["weight_average", "lora_factor_average", "lora_product_average",
           "task_arithmetic", "ties", "dare", "dare_ties", "magnitude_prune", "breadcrumbs",
           "della", "drop_and_combine", "tsv_merge", "iso_c", "knots",
           "task_vector", "task_vectors",
           "apply_task_vector", "keep_top_k", "kth_largest_magnitude",
           "sign_conflict_share", "with_head"]
