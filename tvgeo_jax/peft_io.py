"""Two-way peft compatibility: LoRA trees <-> peft adapter directories.

An adapter directory holds ``adapter_config.json`` and
``adapter_model.safetensors`` with keys such as::

  base_model.model.roberta.encoder.layer.0.attention.self.query.lora_A.weight  (r, in)
  base_model.model.roberta.encoder.layer.0.attention.self.query.lora_B.weight  (out, r)
  base_model.model.classifier.dense.weight                                     (modules_to_save)

(peft 0.21 drops the adapter name ``default`` and the ``modules_to_save``
wrapper from saved keys). Ours → peft: ``lora_A.weight = lora_a.T``,
``lora_B.weight = lora_b.T``, ``lora_alpha = lora_scale · r``; full weights use
``tvgeo_jax.models.hf_io``'s name map (kernels transposed).

``save_peft`` writes what ``peft.PeftModel.from_pretrained(model, dir)`` loads onto
the transformers model; ``load_peft`` reads adapters written by peft (also the
ones on the hub) into our tree. Only plain LoRA on nn.Linear modules of the
encoder layers is supported; DoRA, LoRA biases, embedding LoRA and initialisations
that rewrite the base weights are refused with a message that names them.
"""
from __future__ import annotations

import collections
import logging
import os
import re
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from tvgeo_jax import io_utils, lora, trees
from tvgeo_jax.models import hf_io
from tvgeo_jax.models.config import EncoderConfig

Path = Tuple[str, ...]
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"


class BaseMismatchError(ValueError):
  """An adapter's weights do not fit the base model it is loaded onto (keys or shapes)."""
KEY_PREFIX = "base_model.model."
_TASK_TYPES = {"classification": "SEQ_CLS", "mlm": None, "none": "FEATURE_EXTRACTION"}
# init_lora_weights values whose adapters only make sense on rewritten base weights.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_BACKBONE_STARTS = ("encoder.", "embeddings.", "pooler.")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


def _model_prefix(config: EncoderConfig, head: str) -> str:
  """transformers' backbone attribute ('roberta.'), absent for a bare RobertaModel."""
  return "" if head == "none" else config.model_type + "."


def _lora_module_names(config: EncoderConfig, head: str) -> Dict[Path, str]:
  """{our module path: peft module name relative to the transformers model}."""
  prefix = _model_prefix(config, head)
  return {ours[:-1]: prefix + theirs[:-len(".weight")]
          for ours, theirs, _ in hf_io.backbone_names(config)
          if ours[-1] == "kernel"}


def _full_weight_names(config: EncoderConfig, head: str) -> Dict[str, Tuple[Path, bool]]:
  """{transformers weight name (with backbone prefix): (our leaf path, transpose?)}."""
  prefix = config.model_type + "."
  names = {prefix + theirs: (ours, tr) for ours, theirs, tr in hf_io.backbone_names(config)}
  names.update({theirs: (ours, tr) for ours, theirs, tr in hf_io.head_names(config, head)})
  return names


def _number(x: float):
  return int(x) if float(x).is_integer() else float(x)


# --- writing ----------------------------------------------------------------

def save_peft(directory: str, params: Mapping, config: EncoderConfig, *,
              base_model_name_or_path: str, head: str = "classification",
              lora_dropout: float = 0.0) -> None:
  """Write a peft LoRA adapter (config + safetensors) for a tree carrying LoRA.

  The rank/alpha used most often become ``r``/``lora_alpha``; other modules go
  to ``rank_pattern``/``alpha_pattern`` under their full module names.
  ``target_modules`` are the short names (``query``...) when every layer is
  adapted, the full module names otherwise. With ``head="classification"`` the
  classifier is saved as peft's ``modules_to_save`` (BERT's pooler is frozen in
  peft and is not saved: it must equal the base's).

  Raises:
    ValueError: no LoRA in the tree, LoRA outside the encoder layers' dense
      modules, or an unknown head.
  """
  if head not in _TASK_TYPES:
    raise ValueError(f"Unknown head {head!r}; choose one of {tuple(_TASK_TYPES)}.")
  paths = lora.lora_paths(params)
  if not paths:
    raise ValueError("These params carry no LoRA factors; inject_lora(...) first, or save a "
                     "plain tree with tvgeo_jax.models.save_pretrained.")
  names = _lora_module_names(config, head)
  unmapped = [trees.path_str(p) for p in paths if p not in names]
  if unmapped:
    raise ValueError(f"LoRA on modules peft cannot name for a {config.model_type} model: "
                     f"{unmapped}. save_peft supports the dense modules of encoder layers.")
  state: Dict[str, np.ndarray] = {}
  ranks, alphas = {}, {}
  for p in paths:
    m = trees.get_path(params, p)
    a = np.asarray(m["lora_a"], np.float32)
    b = np.asarray(m["lora_b"], np.float32)
    r = a.shape[1]
    ranks[p] = r
    alphas[p] = _number(round(float(np.asarray(m["lora_scale"])) * r, 6))
    state[f"{KEY_PREFIX}{names[p]}.lora_A.weight"] = np.ascontiguousarray(a.T)
    state[f"{KEY_PREFIX}{names[p]}.lora_B.weight"] = np.ascontiguousarray(b.T)
  r0 = collections.Counter(ranks.values()).most_common(1)[0][0]
  alpha0 = collections.Counter(alphas.values()).most_common(1)[0][0]
  rank_pattern = {names[p]: r for p, r in ranks.items() if r != r0}
  alpha_pattern = {names[p]: a for p, a in alphas.items() if a != alpha0}

  targets = []
  by_leaf = collections.defaultdict(set)
  for p in paths:
    by_leaf[p[-1]].add(p)
  for leaf, adapted in sorted(by_leaf.items()):
    every = {p for p in names if p[-1] == leaf}
    if leaf in ("query", "key", "value") and adapted == every:
      targets.append(leaf)  # peft matches a name suffix: unique for q/k/v
    else:
      targets.extend(sorted(names[p] for p in adapted))

  modules_to_save = None
  if head == "classification":
    modules_to_save = ["classifier", "score"]
    for ours, theirs, transpose in hf_io.head_names(config, head):
      if ours[0] != "classifier":
        continue  # BERT's pooler: frozen under peft
      v = np.asarray(trees.get_path(params, ours), np.float32)
      state[KEY_PREFIX + theirs] = np.ascontiguousarray(v.T if transpose else v)

  adapter_config = {
      "peft_type": "LORA",
      "task_type": _TASK_TYPES[head],
      "base_model_name_or_path": base_model_name_or_path,
      "r": int(r0),
      "lora_alpha": alpha0,
      "target_modules": targets,
      "modules_to_save": modules_to_save,
      "rank_pattern": rank_pattern,
      "alpha_pattern": alpha_pattern,
      "lora_dropout": lora_dropout,
      "fan_in_fan_out": False,
      "bias": "none",
      "use_rslora": False,
      "use_dora": False,
      "init_lora_weights": True,
      "inference_mode": True,
      "layers_to_transform": None,
      "layers_pattern": None,
  }
  from safetensors.numpy import save_file
  with io_utils.atomic_directory(directory) as tmp:
    io_utils.atomic_write_json(os.path.join(tmp, CONFIG_FILE), adapter_config)
    save_file(state, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})


# --- reading ----------------------------------------------------------------

def read_adapter_config(directory: str) -> dict:
  """``adapter_config.json`` of an adapter directory (clear errors when absent)."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No adapter directory {directory!r}.")
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory!r} has no {CONFIG_FILE}; a peft adapter directory "
                            f"holds {CONFIG_FILE} and {WEIGHTS_FILE}.")
  return io_utils.read_json(path)


def _weights_file(directory: str) -> str:
  for name in (WEIGHTS_FILE, LEGACY_WEIGHTS_FILE):
    if os.path.exists(os.path.join(directory, name)):
      return os.path.join(directory, name)
  raise FileNotFoundError(f"{directory!r} has no adapter weights: expected {WEIGHTS_FILE} "
                          f"(or the older {LEGACY_WEIGHTS_FILE}) beside {CONFIG_FILE}.")


def _unreadable(path: str, e: Exception) -> ValueError:
  return ValueError(f"Cannot read adapter weights {path!r} ({type(e).__name__}: "
                    f"{str(e)[:120]}); the file is truncated or corrupt: download or save it "
                    "again.")


def _read_weights(directory: str) -> Dict[str, np.ndarray]:
  path = _weights_file(directory)
  try:
    if path.endswith(".safetensors"):
      from safetensors.numpy import load_file
      return load_file(path)
    import torch
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in sd.items()}
  except Exception as e:  # safetensors / pickle raise their own types for bad files
    raise _unreadable(path, e) from e


def adapter_num_labels(directory: str) -> Optional[int]:
  """Rows of the adapter's saved classifier output layer; None if it saved no head."""
  path = _weights_file(directory)
  if path.endswith(".safetensors"):
    from safetensors import safe_open
    try:
      with safe_open(path, "numpy") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception as e:
      raise _unreadable(path, e) from e
  else:
    shapes = {k: v.shape for k, v in _read_weights(directory).items()}
  for k, shape in shapes.items():
    if k.endswith("out_proj.weight") or k.endswith("classifier.weight"):
      return int(shape[0])
  return None


# peft's default targets for the model types we implement (its LoRA target mapping).
_DEFAULT_TARGETS = ("query", "value")


def _is_targeted(cfg: Mapping, name: str) -> bool:
  """Whether peft would put LoRA on module ``name`` (peft's check_target_module_exists)."""
  def listed(keys) -> bool:
    if isinstance(keys, str):
      return re.fullmatch(keys, name) is not None
    return name in keys or any(name.endswith(f".{k}") for k in keys)

  if cfg.get("exclude_modules") and listed(cfg["exclude_modules"]):
    return False
  targets = cfg.get("target_modules") or list(_DEFAULT_TARGETS)
  if targets == "all-linear":
    return True
  if not listed(targets):
    return False
  layers = cfg.get("layers_to_transform")
  if isinstance(targets, str) or layers is None or layers == []:
    return True
  m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
  if m is None:
    return False
  return int(m["idx"]) in ([layers] if isinstance(layers, int) else layers)


def _check_targets(cfg: Mapping, directory: str, loaded: Mapping[Path, str],
                   candidates: Sequence[str]) -> None:
  """Weights outside target_modules are refused (peft would drop them); targets without
  weights are warned about (peft leaves them at init, lora_B = 0: no change)."""
  stray = sorted(n for n in loaded.values() if not _is_targeted(cfg, n))
  if stray:
    raise ValueError(
        f"{directory!r}: {CONFIG_FILE} has target_modules={cfg.get('target_modules')!r} but "
        f"the weights hold LoRA factors for {len(stray)} other module(s) (e.g. {stray[0]}); "
        f"peft would not load those: fix target_modules in {CONFIG_FILE}.")
  have = set(loaded.values())
  empty = sorted(n for n in candidates if _is_targeted(cfg, n) and n not in have)
  if empty:
    logging.warning("%s: target_modules=%r match %d module(s) with no LoRA weights (e.g. %s); "
                    "they are loaded without LoRA (peft would leave them at lora_B = 0).",
                    directory, cfg.get("target_modules"), len(empty), empty[0])


def _check_supported(cfg: Mapping, directory: str) -> None:
  peft_type = cfg.get("peft_type")
  if peft_type != "LORA":
    raise ValueError(f"{directory!r} is a peft {peft_type!r} adapter; load_peft reads LoRA "
                     "adapters (peft_type 'LORA') only.")
  unsupported = []
  if cfg.get("use_dora"):
    unsupported.append("DoRA (use_dora=True)")
  if cfg.get("lora_bias"):
    unsupported.append("LoRA biases (lora_bias=True)")
  if cfg.get("bias", "none") != "none":
    unsupported.append(f"trained biases (bias={cfg['bias']!r})")
  init = cfg.get("init_lora_weights", True)
  if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
    unsupported.append(f"init_lora_weights={init!r} (it rewrites the base weights; convert "
                       "the adapter to plain LoRA with peft's "
                       "path_initial_model_for_weight_conversion)")
  for key, what in (("use_qalora", "QA-LoRA"), ("use_bdlora", "BD-LoRA"),
                    ("layer_replication", "layer_replication"),
                    ("target_parameters", "target_parameters (LoRA on nn.Parameter)"),
                    ("trainable_token_indices", "trainable_token_indices"),
                    ("alora_invocation_tokens", "aLoRA (alora_invocation_tokens)"),
                    ("megatron_config", "megatron_config"), ("arrow_config", "Arrow routing")):
    if cfg.get(key):
      unsupported.append(what)
  if unsupported:
    raise ValueError(f"{directory!r} uses peft features tvgeo_jax does not implement: "
                     + ", ".join(unsupported) + ". Only plain LoRA on linear layers loads.")


def _pattern_value(patterns: Optional[Mapping], name: str, default):
  """peft's get_pattern_key: a regex key matching a '.'-aligned suffix of the name."""
  for key, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({key})$", name):
      return value
  return default


def load_peft(directory: str, base_params: Mapping, config: EncoderConfig,
              head: str = "classification") -> dict:
  """Read a peft LoRA adapter into a copy of ``base_params`` (our tree).

  Handles key names with or without the backbone prefix (``roberta.``), ranks
  from the weights (``r``/``rank_pattern``), ``lora_alpha``/``alpha_pattern``
  (peft's suffix-regex rule), ``use_rslora`` (scale alpha/sqrt(r)) and
  ``modules_to_save`` weights (classifier, or any other module of the model).
  ``fan_in_fan_out`` is accepted and ignored, as peft ignores it for
  ``nn.Linear`` targets (BERT/RoBERTa): lora_A/lora_B keep their layout.

  Raises:
    FileNotFoundError: missing directory, config or weights.
    ValueError: unreadable weights, LoRA weights on modules ``target_modules`` does not
      name (a warning for targets without weights), not a LoRA adapter, unsupported
      peft features, LoRA already in
      ``base_params``, keys our model does not have, or shapes that do not fit
      this base (the key and both shapes are named).
  """
  cfg = read_adapter_config(directory)
  _check_supported(cfg, directory)
  if lora.has_lora(base_params):
    raise ValueError("base_params already carry LoRA factors; pass the base tree "
                     "(lora.strip_lora(params) or lora.merge_lora(params)).")
  state = _read_weights(directory)
  base_name = cfg.get("base_model_name_or_path")
  prefix = config.model_type + "."
  lora_names = {n: p for p, n in _lora_module_names(config, "classification").items()}
  full_names = _full_weight_names(config, head)

  def strip(key: str) -> str:
    k = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
    return k.replace(".modules_to_save.default", "")

  def canonical(name: str) -> str:
    # Adapters of a bare RobertaModel/BertModel name modules without the prefix.
    return prefix + name if name.startswith(_BACKBONE_STARTS) else name

  factors: Dict[Path, Dict[str, np.ndarray]] = collections.defaultdict(dict)
  peft_name: Dict[Path, str] = {}  # as peft knows the module (alpha_pattern matches it)
  full: Dict[str, np.ndarray] = {}
  unknown, unsupported = [], []
  for key, value in state.items():
    raw = strip(key)
    is_variant = ("lora_magnitude_vector" in raw or "lora_embedding_" in raw or
                  (re.search(r"\.lora_[AB]\.", raw) is not None and raw.endswith(".bias")))
    if is_variant:
      unsupported.append(key)
      continue
    m = _LORA_KEY.match(raw)
    if m:
      name = canonical(m.group("module"))
      if name not in lora_names:
        unknown.append(key)
        continue
      factors[lora_names[name]][m.group("factor")] = np.asarray(value, np.float32)
      peft_name[lora_names[name]] = m.group("module")
      continue
    name = canonical(raw)
    if name not in full_names:
      unknown.append(key)
      continue
    full[name] = np.asarray(value, np.float32)
  if unsupported:
    raise ValueError(f"{directory!r} holds weights of unsupported LoRA variants "
                     f"(DoRA magnitudes, embedding LoRA or LoRA biases): {unsupported[:8]}.")
  if unknown:
    raise BaseMismatchError(
        f"{directory!r} has weights a {config.model_type} model with head {head!r} does not "
        f"have: {sorted(unknown)[:8]}. The adapter was made for another architecture "
        f"(base_model_name_or_path={base_name!r}).")
  if not factors:
    raise ValueError(f"{directory!r} holds no lora_A/lora_B weights.")

  bare = not any(n.startswith(prefix) for n in peft_name.values())
  _check_targets(cfg, directory, peft_name,
                 [n[len(prefix):] if bare else n for n in lora_names])
  use_rslora = bool(cfg.get("use_rslora", False))
  params = lora._copy_dicts(base_params)
  bad = []
  for path, ab in sorted(factors.items()):
    if set(ab) != {"A", "B"}:
      raise ValueError(f"{directory!r}: {trees.path_str(path)} has lora_{sorted(ab)} "
                       "but not both lora_A and lora_B.")
    try:
      module = trees.get_path(params, path)
    except KeyError:
      raise ValueError(f"base_params have no {trees.path_str(path)}; is config the adapter's "
                       f"base ({base_name!r})?") from None
    fan_in, fan_out = np.shape(module["kernel"])
    a, b = ab["A"], ab["B"]
    r = a.shape[0]
    if a.shape[1] != fan_in or b.shape != (fan_out, r):
      bad.append(f"{peft_name[path]}: lora_A {a.shape}, lora_B {b.shape} vs base kernel "
                 f"(out, in) = {(fan_out, fan_in)}")
      continue
    alpha = _pattern_value(cfg.get("alpha_pattern"), peft_name[path], cfg.get("lora_alpha", 8))
    module["lora_a"] = np.ascontiguousarray(a.T)
    module["lora_b"] = np.ascontiguousarray(b.T)
    module["lora_scale"] = np.asarray(lora.lora_scale_value(float(alpha), r, use_rslora),
                                      np.float32)
  for name, value in sorted(full.items()):
    ours, transpose = full_names[name]
    try:
      want = tuple(np.shape(trees.get_path(params, ours)))
    except KeyError:
      raise ValueError(f"{directory!r} holds {name} but base_params have no "
                       f"{trees.path_str(ours)}; load the base with head={head!r}.") from None
    want_torch = want[::-1] if transpose else want  # compare in the file's layout
    if value.shape != want_torch:
      bad.append(f"{name}: adapter {value.shape} vs base {want_torch}")
      continue
    trees.set_path(params, ours, np.ascontiguousarray(value.T) if transpose else value)
  if bad:
    raise BaseMismatchError(
        f"Adapter {directory!r} does not fit this base model (it was saved for "
        f"{base_name!r}): " + "; ".join(bad[:12]) +
        ". Load the base it was trained on (for the classifier: the right num_labels).")
  if head == "classification" and not any(n.startswith("classifier") for n in full):
    logging.info("%s: no classifier weights in the adapter; the base's head is kept.", directory)
  return params
