"""Turn a base parameter tree into the tree a fine-tuning method trains."""
from __future__ import annotations

from typing import Mapping

from tvgeo_jax.adapters import partition
from tvgeo_jax.models.config import EncoderConfig
from tvgeo_jax.training.config import TrainConfig
from tvgeo_jax.adapters import lora
from tvgeo_jax.adapters import bottleneck


def prepare_params(base: Mapping, model_config: EncoderConfig, config: TrainConfig) -> dict:
  """``full``: the base tree; ``lora``: LoRA factors injected; ``bottleneck``: adapters.

  Deterministic in ``config.seed``, so a resumed run rebuilds the same frozen part.
  """
  if config.method == "full":
    return dict(base)
  if config.method == "lora":
    return lora.inject_lora(base, targets=config.lora_targets, rank=config.lora_rank,
                            alpha=config.lora_alpha, seed=config.seed)
  if config.method == "bottleneck":
    kwargs = ({"size": config.bottleneck_size} if config.bottleneck_size
              else {"reduction_factor": config.bottleneck_reduction_factor})
    return bottleneck.inject_bottleneck(base, model_config, seed=config.seed, **kwargs)
  raise ValueError(f"Unknown fine-tuning method {config.method!r}; valid methods: "
                   f"{', '.join(partition.METHODS)}.")
