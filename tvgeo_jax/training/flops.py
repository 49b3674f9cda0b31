"""Model FLOPs of a training step, counted from the parameter tree.

The count behind MFU in ``benchmarks/bench_train.py`` and the FLOP budget of
``reproduce.dry_run_plan``: the matrix products a training step needs for a given
fine-tuning method, whatever an implementation chooses to skip or recompute.
"""
from __future__ import annotations

from typing import Mapping

import jax
import numpy as np

from tvgeo_jax.adapters import partition
from tvgeo_jax.core import trees
from tvgeo_jax.models.config import EncoderConfig
from tvgeo_jax.models.encoder import Encoder
from tvgeo_jax.training import methods

_EMBEDDING_INPUT = ("query", "key", "value")  # layer 0's products of the embedding output
_FIRST_TOKEN = ("pooler", "classifier")  # head products, on the first token only


def train_flops_per_sequence(params: Mapping, config: EncoderConfig, seq_len: int,
                             method: str) -> float:
  """Model FLOPs of one training sequence (forward and backward) under ``method``.

  ``params`` is the tree the method trains (adapters injected); only leaf shapes are
  read, so ``parameter_shapes`` will do. Every 2-D weight of an encoder layer costs
  2·size FLOPs per token forward. Backward adds its weight gradient (2·size) if it
  trains, and its input gradient (2·size) unless nothing below it trains: layer 0's
  query/key/value products of the embedding output, LoRA factor A included, when the
  embeddings are frozen. QKᵀ and PV cost 2·t·h per token each, and backward needs both
  operand gradients (3× forward), except layer 0's key gradient when neither the
  embeddings nor the key projection train. The head (BERT's pooler, the classifier)
  runs on the first token only.

  Every layer counts every token: full fine-tuning is 3 × forward, ≈ 67 GFLOP for
  roberta-base at 128 tokens; frozen-weight methods are ≈ 2 × forward. (The
  classification step computes the last layer's queries, attention output and FFN for
  the first token only, so it executes fewer FLOPs than this.)
  """
  if method not in partition.METHODS:
    raise ValueError(f"Unknown fine-tuning method {method!r}; valid methods: "
                     f"{', '.join(partition.METHODS)}.")
  flat = trees.flatten(params)
  trains = lambda path: partition.is_trainable(path, method)
  embeddings_train = any(trains(p) for p in flat if p[0] == "embeddings")
  key0_trains = any(trains(p) for p in flat if p[:3] == ("encoder", "layer_0", "key"))
  t, h = seq_len, config.hidden_size
  total = 0.0
  for path, leaf in flat.items():
    if len(np.shape(leaf)) != 2 or path[0] not in ("encoder",) + _FIRST_TOKEN:
      continue  # biases, LayerNorms, scalars; embedding tables are gathers, not products
    size = float(np.prod(np.shape(leaf)))
    needs_dx = embeddings_train or not (path[1] == "layer_0" and path[2] in _EMBEDDING_INPUT
                                        and path[-1] in ("kernel", "lora_a"))
    per_token = 2 * size * (1 + trains(path) + needs_dx)
    total += per_token * (1 if path[0] in _FIRST_TOKEN else t)
  attention = 2 * (2 * t * h) * t  # QKᵀ and PV forward, per sequence and layer
  total += 3 * attention * config.num_hidden_layers
  if not (embeddings_train or key0_trains):
    total -= attention / 2  # layer 0's QKᵀ needs no key gradient
  return total


def parameter_shapes(config: EncoderConfig, train_config) -> dict:
  """The tree ``methods.prepare_params`` builds for ``train_config.method``, with
  zero-memory base leaves (broadcast views) of the right shapes: enough for
  ``train_flops_per_sequence`` without allocating roberta-base."""
  shapes = jax.eval_shape(Encoder(config, "classification").init, jax.random.key(0),
                          np.full((1, 8), 3, np.int32))["params"]
  base = trees.unflatten({p: np.broadcast_to(np.zeros((), s.dtype), s.shape)
                          for p, s in trees.flatten(shapes).items()})
  return methods.prepare_params(base, config, train_config)
