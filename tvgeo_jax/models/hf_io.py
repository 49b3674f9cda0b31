"""Hugging Face checkpoint I/O: map transformers' state-dict names onto our tree.

``load_pretrained`` reads a local directory or a hub id (config.json +
model.safetensors, or pytorch_model.bin where only that exists);
``save_pretrained`` writes a directory that ``transformers`` loads.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from typing import Dict, Iterator, Optional, Tuple

import jax
import numpy as np

from tvgeo_jax.core import io_utils, trees
from tvgeo_jax.models import names
from tvgeo_jax.models.config import EncoderConfig, tiny_config
from tvgeo_jax.models.encoder import Encoder
from tvgeo_jax.core import hub
from tvgeo_jax.adapters import lora

Path = Tuple[str, ...]
_ARCH = {
    ("roberta", "classification"): "RobertaForSequenceClassification",
    ("roberta", "mlm"): "RobertaForMaskedLM",
    ("roberta", "none"): "RobertaModel",
    ("bert", "classification"): "BertForSequenceClassification",
    ("bert", "mlm"): "BertForMaskedLM",
    ("bert", "none"): "BertModel",
}
_LAYER_MODULES = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_output": "attention.output.dense",
    "attention_layer_norm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
    "output_layer_norm": "output.LayerNorm",
}


def _linear(ours: Path, theirs: str):
  yield ours + ("kernel",), theirs + ".weight", True
  yield ours + ("bias",), theirs + ".bias", False


def _norm(ours: Path, theirs: str):
  yield ours + ("scale",), theirs + ".weight", False
  yield ours + ("bias",), theirs + ".bias", False


def backbone_names(config: EncoderConfig) -> Iterator[Tuple[Path, str, bool]]:
  """(our path, HF name without the model prefix, transpose?) for the encoder."""
  for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
    yield ("embeddings", name, "embedding"), f"embeddings.{name}.weight", False
  yield from _norm(("embeddings", "layer_norm"), "embeddings.LayerNorm")
  for i in range(config.num_hidden_layers):
    for ours, theirs in _LAYER_MODULES.items():
      make = _norm if ours.endswith("layer_norm") else _linear
      yield from make(("encoder", f"layer_{i}", ours), f"encoder.layer.{i}.{theirs}")


def head_names(config: EncoderConfig, head: str) -> Iterator[Tuple[Path, str, bool]]:
  """(our path, full HF name, transpose?) for the head's weights."""
  p = config.model_type
  if head == "classification":
    if config.is_roberta:
      yield from _linear(("classifier", "dense"), "classifier.dense")
      yield from _linear(("classifier", "out_proj"), "classifier.out_proj")
    else:
      yield from _linear(("pooler",), f"{p}.pooler.dense")
      yield from _linear(("classifier", "out_proj"), "classifier")
  elif head == "mlm":
    base = "lm_head" if config.is_roberta else "cls.predictions"
    dense = "lm_head.dense" if config.is_roberta else "cls.predictions.transform.dense"
    norm = "lm_head.layer_norm" if config.is_roberta else "cls.predictions.transform.LayerNorm"
    yield from _linear(("mlm_head", "dense"), dense)
    yield from _norm(("mlm_head", "layer_norm"), norm)
    yield ("mlm_head", "bias"), f"{base}.bias", False


def init_params(config: EncoderConfig, head: str = "classification", seed: int = 0,
                seq_len: int = 8) -> dict:
  """Random parameters (BERT-style N(0, 0.02) init) as a plain dict."""
  ids = np.full((1, seq_len), 3, dtype=np.int32)
  variables = _jitted_init(config, head)(jax.random.PRNGKey(seed), ids)
  return jax.tree.map(np.asarray, _to_dict(variables["params"]))


@functools.lru_cache(maxsize=32)
def _jitted_init(config: EncoderConfig, head: str):
  # One compiled init per architecture: op-by-op init is ~10x slower on CPU.
  return jax.jit(Encoder(config, head).init)


def _to_dict(tree):
  if hasattr(tree, "items"):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree


# --- reading -----------------------------------------------------------------

def _read_state_dict(directory: str) -> Dict[str, np.ndarray]:
  st = os.path.join(directory, "model.safetensors")
  index = os.path.join(directory, "model.safetensors.index.json")
  binf = os.path.join(directory, "pytorch_model.bin")
  if os.path.exists(st) or os.path.exists(index):
    from safetensors.numpy import load_file
    files = [st] if os.path.exists(st) else sorted(
        {os.path.join(directory, f) for f in json.load(open(index))["weight_map"].values()})
    state = {}
    for f in files:
      state.update(load_file(f))
    return state
  if os.path.exists(binf):
    try:
      import torch
    except ImportError as e:
      raise ImportError(
          f"{binf} is a PyTorch pickle; reading it needs torch (pip install torch). "
          "Or convert it to model.safetensors.") from e
    sd = torch.load(binf, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}
  raise FileNotFoundError(
      f"No weights in {directory!r}: expected model.safetensors (or its index) or "
      "pytorch_model.bin.")


def _strip_prefix(state: Dict[str, np.ndarray], model_type: str) -> Dict[str, np.ndarray]:
  """Backbone names lose their 'roberta.'/'bert.' prefix; heads keep theirs."""
  out = {}
  for k, v in state.items():
    out[k[len(model_type) + 1:] if k.startswith(model_type + ".") else k] = v
  return out


def params_from_state_dict(state: Dict[str, np.ndarray], config: EncoderConfig,
                           head: str = "classification", seed: int = 0,
                           source: str = "state dict") -> dict:
  """Build our tree from a transformers state dict (numpy arrays).

  Backbone weights must all be present with the right shapes. Head weights that
  are missing are initialised randomly (as transformers does when a
  classifier is put on a pretrained encoder) and logged.
  """
  state = _strip_prefix(state, config.model_type)
  fresh = init_params(config, head, seed)
  params: dict = {}
  used = set()
  missing, bad_shape = [], []
  # BERT's pooler lives under the model prefix; after stripping it is 'pooler.dense'.
  heads = [(o, t[len(config.model_type) + 1:] if t.startswith(config.model_type + ".") else t, tr)
           for o, t, tr in head_names(config, head)]
  for group, entries in (("backbone", backbone_names(config)), ("head", heads)):
    head_missing = []
    for ours, theirs, transpose in entries:
      want = trees.get_path(fresh, ours)
      if theirs not in state and theirs.endswith(".weight") and "LayerNorm" in theirs:
        theirs = theirs[:-len("weight")] + "gamma"  # old BERT checkpoints
      if theirs not in state and theirs.endswith(".bias") and "LayerNorm" in theirs \
          and theirs[:-len("bias")] + "beta" in state:
        theirs = theirs[:-len("bias")] + "beta"
      if theirs not in state:
        (missing if group == "backbone" else head_missing).append(theirs)
        trees.set_path(params, ours, want)
        continue
      value = np.asarray(state[theirs], dtype=np.float32)
      value = value.T if transpose else value
      if value.shape != want.shape:
        bad_shape.append(f"{theirs}: checkpoint {value.shape} vs model {want.shape}")
        continue
      used.add(theirs)
      trees.set_path(params, ours, value)
    if group == "head" and head_missing:
      logging.debug("%s: head weights not in checkpoint, initialised randomly (seed %d): %s",
                    source, seed, ", ".join(head_missing))
  if missing or bad_shape:
    lines = []
    if missing:
      lines.append("missing weights: " + ", ".join(missing[:20]) +
                   (f" (+{len(missing) - 20} more)" if len(missing) > 20 else ""))
    if bad_shape:
      lines.append("wrongly shaped weights: " + "; ".join(bad_shape[:20]))
    raise ValueError(
        f"{source} does not fit a {config.model_type} encoder with {config.num_hidden_layers} "
        f"layers and hidden size {config.hidden_size}: " + " | ".join(lines) +
        ". Check that config.json belongs to these weights.")
  known_other = ("lm_head.", "cls.", "classifier", "pooler.", "qa_outputs", "embeddings.position_ids")
  unexpected = [k for k in state if k not in used and not k.startswith(known_other)]
  if unexpected:
    raise ValueError(
        f"{source} has weights that a {config.model_type} encoder does not have: "
        + ", ".join(sorted(unexpected)[:20]) + ". Is config.json's model_type right?")
  return params


def resolve_model_dir(name_or_path: str) -> str:
  """A local directory as is; otherwise a hub id, downloaded (fails fast offline)."""
  if os.path.isdir(name_or_path):
    return name_or_path
  if os.path.exists(name_or_path):
    raise ValueError(f"{name_or_path!r} is a file; pass the directory holding config.json.")
  if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
    raise FileNotFoundError(f"No such model directory: {name_or_path!r}.")
  return hub.snapshot(name_or_path, kind="model",
                      allow_patterns=["config.json", "*.safetensors", "*.json", "*.txt",
                                      "merges.txt", "vocab.*", "pytorch_model.bin"])


def load_pretrained(name_or_path: str, head: str = "classification",
                    num_labels: Optional[int] = None, seed: int = 0,
                    label_names: Optional[Tuple[str, ...]] = None
                    ) -> Tuple[EncoderConfig, dict]:
  """Read ``config`` and ``params`` from a directory, a hub id or a random built-in
  (``tiny-random``, ``tiny-bert-random``; ``tvgeo_jax.models.names``). The pretrained
  tiny base (``tiny``/``embedded``) is built and found by ``tvgeo_jax.pretraining``:
  load it with ``tvgeo_jax.pretraining.load_model``.

  ``num_labels``/``label_names`` override the checkpoint's (a new head is
  initialised where the shapes change).
  """
  name_or_path = names.check(name_or_path)
  if names.is_random(name_or_path):
    config = tiny_config(names.RANDOM_MODELS[name_or_path])
    config = _with_labels(config, num_labels, label_names)
    return config, init_params(config, head, seed)
  if names.is_embedded(name_or_path):
    raise ValueError(f"{name_or_path!r} is the embedded base, which tvgeo_jax.pretraining "
                     "builds on first use: load it with tvgeo_jax.pretraining.load_model.")
  directory = resolve_model_dir(name_or_path)
  cfg_file = os.path.join(directory, "config.json")
  if not os.path.exists(cfg_file):
    raise FileNotFoundError(f"{directory!r} has no config.json; a Hugging Face model "
                            "directory holds config.json and model.safetensors.")
  with open(cfg_file) as f:
    hf = json.load(f)
  config = EncoderConfig.from_hf_dict(hf)
  checkpoint_labels = config.num_labels
  config = _with_labels(config, num_labels, label_names)
  state = _read_state_dict(directory)
  if head == "classification" and config.num_labels != checkpoint_labels:
    state = {k: v for k, v in state.items() if not k.startswith("classifier")}
  return config, params_from_state_dict(state, config, head, seed, source=directory)


def _with_labels(config, num_labels, label_names):
  if label_names:
    return config.replace(label_names=tuple(label_names), num_labels=len(label_names))
  if num_labels is not None and num_labels != config.num_labels:
    return config.replace(num_labels=num_labels, label_names=())
  return config


# --- writing -----------------------------------------------------------------

def state_dict_from_params(params: dict, config: EncoderConfig,
                           head: str = "classification") -> Dict[str, np.ndarray]:
  """Our tree (plain kernels, no LoRA leaves) → transformers names, numpy."""
  prefix = config.model_type + "."
  state = {}
  for ours, theirs, transpose in backbone_names(config):
    v = np.asarray(trees.get_path(params, ours), dtype=np.float32)
    state[prefix + theirs] = np.ascontiguousarray(v.T if transpose else v)
  for ours, theirs, transpose in head_names(config, head):
    v = np.asarray(trees.get_path(params, ours), dtype=np.float32)
    state[theirs] = np.ascontiguousarray(v.T if transpose else v)
  return state


def save_pretrained(directory: str, config: EncoderConfig, params: dict,
                    head: str = "classification") -> None:
  """Write config.json + model.safetensors that ``transformers`` loads."""
  if lora.has_lora(params):
    raise ValueError("These params carry LoRA factors; fold them first with "
                     "tvgeo_jax.adapters.lora.merge_lora(params) or save them with save_peft.")
  from safetensors.numpy import save_file
  state = state_dict_from_params(params, config, head)
  with io_utils.atomic_directory(directory) as tmp:
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config.to_hf_dict(_ARCH[(config.model_type, head)]), f, indent=2)
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
