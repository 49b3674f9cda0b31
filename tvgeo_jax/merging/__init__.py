"""Model merging as pytree arithmetic (paper A section 3.2, paper C).

Averaging merges (``weight_average``, ``lora_factor_average``,
``lora_product_average``) and task-vector merges (``task_arithmetic``, ``ties``,
``dare``) map parameter trees to a parameter tree. Heads are never merged: the
result carries the head of ``head_from`` (default the first model), or swap it
with ``with_head``. Leaf selection, LoRA handling and checks: ``inputs``.
"""
from tvgeo_jax.merging.analysis import sign_conflict_share
from tvgeo_jax.merging.averaging import (lora_factor_average, lora_product_average,
                                         weight_average)
from tvgeo_jax.merging.inputs import with_head
from tvgeo_jax.merging.task_vectors import (apply_task_vector, dare, task_arithmetic,
                                            task_vector, task_vectors)
from tvgeo_jax.merging.ties import keep_top_k, kth_largest_magnitude, ties

__all__ = ["weight_average", "lora_factor_average", "lora_product_average",
           "task_arithmetic", "ties", "dare", "task_vector", "task_vectors",
           "apply_task_vector", "keep_top_k", "kth_largest_magnitude",
           "sign_conflict_share", "with_head"]
