"""The pure forward function ``apply(params, batch, ...)``."""
from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from tvgeo_jax.models.config import EncoderConfig
from tvgeo_jax.models.encoder import Encoder


@functools.lru_cache(maxsize=None)
def _module(config: EncoderConfig, head: str, dtype_name: str) -> Encoder:
  return Encoder(config, head, jnp.dtype(dtype_name))


def apply(params: Mapping, batch: Mapping[str, Any], *, config: EncoderConfig,
          head: str = "classification", train: bool = False,
          rng: Optional[jax.Array] = None, dtype: Any = jnp.float32,
          output_hidden_states: bool = False, mlm_positions=None,
          logits_only: bool = False) -> dict:
  """Run the encoder. ``batch`` holds ``input_ids``, ``attention_mask`` and
  optionally ``token_type_ids``. ``train=True`` enables dropout (needs ``rng``).

  Parameters stay float32; ``dtype`` is the compute dtype (bfloat16 on
  accelerators). Works on trees carrying LoRA or bottleneck-adapter leaves.
  ``mlm_positions`` (head ``"mlm"``): score only these ``[B, P]`` positions.
  ``logits_only`` (head ``"classification"``): return only the logits, computing the
  last layer for the first token alone (what training and evaluation use).
  """
  if train and rng is None:
    raise ValueError("train=True enables dropout and needs an rng key.")
  model = _module(config, head, jnp.dtype(dtype).name)
  return model.apply({"params": params}, batch["input_ids"], batch.get("attention_mask"),
                     batch.get("token_type_ids"), deterministic=not train,
                     output_hidden_states=output_hidden_states, mlm_positions=mlm_positions,
                     logits_only=logits_only,
                     rngs={"dropout": rng} if train else None)


def make_apply(config: EncoderConfig, head: str = "classification", **kwargs):
  """``apply`` with the static arguments bound, ready for ``jax.jit``."""
  return functools.partial(apply, config=config, head=head, **kwargs)
