"""Encoder configuration, read from (and written to) a Hugging Face ``config.json``.

One frozen, hashable dataclass so it can be a static argument of ``jax.jit``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple

SUPPORTED_MODEL_TYPES = ("roberta", "bert")

# Keys of config.json that map 1:1 onto EncoderConfig fields.
_HF_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "intermediate_size", "hidden_act", "hidden_dropout_prob",
    "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
    "layer_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id",
)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Architecture of a BERT-family encoder (RoBERTa, DistilRoBERTa, BERT)."""
  model_type: str = "roberta"
  vocab_size: int = 50265
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 514
  type_vocab_size: int = 1
  layer_norm_eps: float = 1e-5
  pad_token_id: int = 1
  bos_token_id: int = 0
  eos_token_id: int = 2
  num_labels: int = 2
  # Label names in class-index order (empty: "LABEL_i").
  label_names: Tuple[str, ...] = ()

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f"Unsupported model_type {self.model_type!r}: tvgeo_jax implements "
          f"{', '.join(SUPPORTED_MODEL_TYPES)} (DistilRoBERTa is model_type "
          "'roberta' with 6 layers). Point at a checkpoint of one of these.")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"hidden_size={self.hidden_size} is not divisible by "
          f"num_attention_heads={self.num_attention_heads}.")
    if self.hidden_act not in ("gelu", "gelu_new", "relu", "gelu_pytorch_tanh"):
      raise ValueError(f"Unsupported hidden_act {self.hidden_act!r}.")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def is_roberta(self) -> bool:
    return self.model_type == "roberta"

  def replace(self, **changes) -> "EncoderConfig":
    return dataclasses.replace(self, **changes)

  # --- Hugging Face config.json -------------------------------------------
  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any]) -> "EncoderConfig":
    if "model_type" not in d:
      raise ValueError("config.json has no 'model_type'; expected 'roberta' or 'bert'.")
    kwargs = {k: d[k] for k in _HF_KEYS if k in d and d[k] is not None}
    kwargs["model_type"] = d["model_type"]
    id2label = d.get("id2label")
    if id2label:
      items = sorted(((int(k), v) for k, v in id2label.items()))
      kwargs["label_names"] = tuple(v for _, v in items)
      kwargs["num_labels"] = len(items)
    elif "num_labels" in d:
      kwargs["num_labels"] = int(d["num_labels"])
    return cls(**kwargs)

  def to_hf_dict(self, architecture: Optional[str] = None) -> dict:
    d = {k: getattr(self, k) for k in _HF_KEYS}
    d["model_type"] = self.model_type
    names = self.label_names or tuple(f"LABEL_{i}" for i in range(self.num_labels))
    d["id2label"] = {str(i): n for i, n in enumerate(names)}
    d["label2id"] = {n: i for i, n in enumerate(names)}
    if self.num_labels == 1:
      d["problem_type"] = "regression"
    if architecture:
      d["architectures"] = [architecture]
    return d


def tiny_config(model_type: str = "roberta", **overrides) -> EncoderConfig:
  """The built-in ``tiny`` configuration: random init, for tests and smoke runs.

  Its vocabulary size matches the synthetic suite's tokenizer
  (``tvgeo_jax.data.tokenizer.VOCAB_SIZE``) so the pair works out of the box.
  """
  base = dict(model_type=model_type, vocab_size=2048, hidden_size=64,
              num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              max_position_embeddings=258 if model_type == "roberta" else 256,
              type_vocab_size=1 if model_type == "roberta" else 2,
              layer_norm_eps=1e-5 if model_type == "roberta" else 1e-12,
              pad_token_id=1 if model_type == "roberta" else 0)
  base.update(overrides)
  return EncoderConfig(**base)

