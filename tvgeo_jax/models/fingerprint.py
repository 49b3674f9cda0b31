"""A short stable hash of a base model: which θ0 a task vector is relative to.

``base_fingerprint(params, config)`` hashes the architecture (the ``EncoderConfig``
fields that shape the backbone) and every byte of the backbone's weights (float32,
C order, leaves in sorted path order), with BLAKE2b. Left out: the classifier / MLM
head (task-specific, re-initialised per run) and the leaves fine-tuning adds (LoRA
factors, bottleneck adapters). So the fingerprint of a LoRA run's trained tree equals
the one of its base, and two runs, adapters or bases compare by string equality.
Cost: one pass over the weights (BUILD_NOTES, "Base fingerprints": roberta-base in
about half a second on this machine).
"""
from __future__ import annotations

import hashlib
import json
from typing import Mapping, Optional

import numpy as np

from tvgeo_jax.adapters.leaves import is_adapter_path
from tvgeo_jax.core import trees
from tvgeo_jax.models.config import EncoderConfig

VERSION = "b2v1"
# Architecture fields: equal shapes but another model type or activation is another base.
ARCHITECTURE_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                       "num_attention_heads", "intermediate_size", "hidden_act",
                       "max_position_embeddings", "type_vocab_size", "layer_norm_eps",
                       "pad_token_id")
_HEADS = ("classifier", "mlm_head")
_ADDED_LEAVES = ("lora_a", "lora_b", "lora_scale")


def is_base_leaf(path) -> bool:
  """True for the leaves a base model contributes (not the head, not LoRA, not adapters)."""
  return (path[0] not in _HEADS and path[-1] not in _ADDED_LEAVES
          and not is_adapter_path(path))


def _digest(params: Mapping, config: EncoderConfig, keep) -> str:
  """BLAKE2b-128 of the architecture and the bytes of the leaves ``keep(path)`` selects."""
  h = hashlib.blake2b(digest_size=16)
  arch = {k: getattr(config, k) for k in ARCHITECTURE_FIELDS}
  h.update(json.dumps(arch, sort_keys=True).encode())
  flat = trees.flatten(params)
  for path in sorted(p for p in flat if keep(p)):
    v = np.ascontiguousarray(np.asarray(flat[path], dtype="<f4"))
    h.update(f"{trees.path_str(path)}{v.shape}".encode())
    h.update(memoryview(v).cast("B"))
  return h.hexdigest()


def base_fingerprint(params: Mapping, config: EncoderConfig) -> str:
  """``'b2v1:<32 hex>'``: BLAKE2b-128 of the architecture and the base leaves' bytes.

  ``params`` is a base tree or a tree fine-tuned with frozen base leaves (LoRA);
  for full fine-tuning and bottleneck adapters (trained LayerNorms) pass the base.
  """
  return f"{VERSION}:{_digest(params, config, is_base_leaf)}"


def model_fingerprint(params: Mapping, config: EncoderConfig) -> str:
  """``'m1:<32 hex>'``: the same hash over every leaf (head, LoRA factors, adapters
  included): equal for two trees exactly when they are the same fine-tuned model. Keys
  results derived from a model's weights (``studies.merge_study``'s evaluation cache)."""
  return f"m1:{_digest(params, config, lambda _: True)}"


def short(fingerprint: Optional[str]) -> str:
  """The first 12 hex digits, for messages."""
  return fingerprint.split(":", 1)[-1][:12] if fingerprint else "unknown"
