"""AdamW with a linear warm-up/decay schedule, decay masked off biases and LayerNorm scales;
optionally discriminative rates (the head and ``fast_modules`` at the peak rate, every other
weight ``other_lr_scale`` times slower)."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import optax

from tvgeo_jax.adapters.leaves import is_head
from tvgeo_jax.core import trees

# Leaves that get no weight decay (as in BERT/RoBERTa recipes): biases and LayerNorm scales.
NO_DECAY_LEAVES = ("bias", "scale", "lora_scale")


def decay_mask(params: Mapping) -> dict:
  """True where weight decay applies: kernels, embeddings and LoRA factors."""
  return trees.map_with_path(lambda p, _: p[-1] not in NO_DECAY_LEAVES, params)


def slow_mask(params: Mapping, fast_modules: Sequence[str]) -> dict:
  """True where a leaf trains at the slower rate: outside the head and ``fast_modules``
  (module names such as ``query``, matched against every component of a leaf's path)."""
  fast = tuple(fast_modules)
  paths = list(trees.flatten(params))
  unknown = [m for m in fast if not any(m in p for p in paths)]
  if unknown:
    names = sorted({c for p in paths for c in p[:-1] if not c.isdigit()})
    raise ValueError(f"fast_modules {unknown} match no trainable weight; the trainable "
                     f"modules are {names}. Fix the spelling, or drop the name.")
  return trees.map_with_path(lambda p, _: not (is_head(p) or any(m in p for m in fast)),
                             params)


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
                   schedule: Optional[optax.Schedule] = None,
                   fast_modules: Sequence[str] = (),
                   other_lr_scale: float = 1.0) -> optax.GradientTransformation:
  """AdamW (decoupled decay, masked) after optional global-norm clipping.

  ``schedule`` replaces the linear warm-up/decay built from ``learning_rate``,
  ``total_steps`` and ``warmup_ratio`` (a concurrent group picks each member's own).
  ``other_lr_scale`` < 1 scales the updates (decay included) of every leaf ``slow_mask``
  marks: those weights follow the same schedule at ``other_lr_scale`` times the rate.
  """
  if schedule is None:
    schedule = linear_schedule(learning_rate, total_steps, warmup_ratio)
  adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                      mask=decay_mask(trainable))
  if other_lr_scale != 1.0:
    adamw = optax.chain(adamw, optax.masked(optax.scale(other_lr_scale),
                                            slow_mask(trainable, fast_modules)))
  if max_grad_norm and max_grad_norm > 0:
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)
  return adamw


def config_kwargs(config: Any) -> Dict[str, Any]:
  """``make_optimizer``'s keyword arguments from a ``TrainConfig`` (all but the step count
  and schedule, which the caller knows)."""
  return dict(learning_rate=config.learning_rate, warmup_ratio=config.warmup_ratio,
              weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
              b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
              fast_modules=config.fast_modules, other_lr_scale=config.other_lr_scale)
