"""AdamW with a linear warm-up/decay schedule, decay masked off biases and LayerNorm scales."""
from __future__ import annotations

from typing import Mapping, Optional

import optax

from tvgeo_jax import trees

# Leaves that get no weight decay (as in BERT/RoBERTa recipes): biases and LayerNorm scales.
NO_DECAY_LEAVES = ("bias", "scale", "lora_scale")


def decay_mask(params: Mapping) -> dict:
  """True where weight decay applies: kernels, embeddings and LoRA factors."""
  return trees.map_with_path(lambda p, _: p[-1] not in NO_DECAY_LEAVES, params)


def linear_schedule(learning_rate: float, total_steps: int,
                    warmup_ratio: float = 0.0) -> optax.Schedule:
  """0 → lr linearly over ``warmup_ratio·total_steps``, then lr → 0 at ``total_steps``."""
  total_steps = max(int(total_steps), 1)
  warmup = int(round(warmup_ratio * total_steps))
  decay = optax.linear_schedule(learning_rate, 0.0, max(total_steps - warmup, 1))
  if warmup == 0:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, warmup), decay], [warmup])


def make_optimizer(trainable: Mapping, *, learning_rate: float, total_steps: int,
                   warmup_ratio: float = 0.0, weight_decay: float = 0.0,
                   max_grad_norm: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8,
                   schedule: Optional[optax.Schedule] = None) -> optax.GradientTransformation:
  """AdamW (decoupled decay, masked) after optional global-norm clipping.

  ``schedule`` replaces the linear warm-up/decay built from ``learning_rate``,
  ``total_steps`` and ``warmup_ratio`` (a concurrent group picks each member's own).
  """
  if schedule is None:
    schedule = linear_schedule(learning_rate, total_steps, warmup_ratio)
  adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                      mask=decay_mask(trainable))
  if max_grad_norm and max_grad_norm > 0:
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)
  return adamw
