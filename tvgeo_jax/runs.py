"""Run directories: what ``experiments.finetune`` writes and ``load_run`` reads back.

Layout (see BUILD_NOTES.md, "Run directories")::

  RUN/run_config.json   the TrainConfig, written at start (resume checks against it)
  RUN/checkpoints/      orbax: latest train state + best trainable params (resumption)
  RUN/metrics.jsonl     one JSON record per logged step and per epoch
  RUN/params/           our full tree, best by validation loss (orbax)
  RUN/hf/               Hugging Face checkpoint: full FT, or LoRA merged into the base
  RUN/adapter/          LoRA: a peft adapter (adapter_config.json + safetensors)
  RUN/results.json      written last: its presence marks a finished run

``results.json`` holds task, method, base model (name and resolved path), the
config, metrics on validation and test, best epoch, wall time, parameter counts
and devices; ``write_outputs`` adds ``base_fingerprint`` (``tvgeo_jax.fingerprint``:
which base weights the run started from) and ``data_revision`` (the hub dataset's
commit for hub tasks, else None).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Mapping, Optional, Tuple

from tvgeo_jax import io_utils
from tvgeo_jax.models.config import EncoderConfig
from tvgeo_jax.training.checkpoint import CHECKPOINTS

RESULTS = "results.json"
RUN_CONFIG = "run_config.json"
METRICS_LOG = "metrics.jsonl"
PARAMS = "params"
HF = "hf"
ADAPTER = "adapter"


def is_finished(run_dir: str) -> bool:
  return os.path.exists(os.path.join(run_dir, RESULTS))


def resolve_base_path(model: str) -> Optional[str]:
  """The absolute path of a local base-model directory, else None (a hub id or a built-in name)."""
  return os.path.abspath(model) if os.path.isdir(model) else None


def write_outputs(run_dir: str, params: Mapping, model_config: EncoderConfig,
                  method: str, results: Dict[str, Any], base_model: str,
                  base_params: Optional[Mapping] = None) -> None:
  """params/, hf/, adapter/ (as the method has them), then results.json last.

  ``results`` gains ``base_fingerprint`` and ``data_revision`` (in place). The
  fingerprint of a LoRA run comes from its frozen leaves; full fine-tuning and
  bottleneck runs train base leaves, so theirs comes from ``base_params`` (the
  tree training started from), reloaded from the results when not given.
  Multi-host: every process calls this (the params save takes all of them); process 0
  writes the files.
  """
  import jax
  from tvgeo_jax import lora
  from tvgeo_jax.models import save_pretrained
  from tvgeo_jax.training.checkpoint import save_tree

  save_tree(os.path.join(run_dir, PARAMS), params)
  if jax.process_index() != 0:
    return
  if method == "full":
    save_pretrained(os.path.join(run_dir, HF), model_config, params)
  elif method == "lora":
    save_pretrained(os.path.join(run_dir, HF), model_config, lora.merge_lora(params))
    from tvgeo_jax import peft_io
    peft_io.save_peft(os.path.join(run_dir, ADAPTER), params, model_config,
                      base_model_name_or_path=base_model)
  from tvgeo_jax import fingerprint
  if method != "lora" and base_params is None:
    base_params = load_base_params(results)
  results["base_fingerprint"] = fingerprint.base_fingerprint(
      params if method == "lora" else base_params, model_config)
  results.setdefault("data_revision", data_revision(results["config"]))
  io_utils.atomic_write_json(os.path.join(run_dir, RESULTS), results)


@dataclasses.dataclass
class Run:
  """A finished fine-tuning run, as read from its directory."""
  run_dir: str
  task: str
  method: str
  base_model: str
  config: Any                      # tvgeo_jax.training.TrainConfig
  model_config: EncoderConfig
  results: Dict[str, Any]
  params: Optional[dict] = None    # best params, our tree (None if not loaded)

  def base_params(self) -> dict:
    """The pretrained tree the run started from (same seed, so the same head init)."""
    return load_base_params(self.results)

  def base_fingerprint(self, base_params: Optional[Mapping] = None) -> Tuple[str, bool]:
    """(fingerprint of the run's base, recomputed?): from results.json, or computed
    now for runs written before fingerprints (LoRA: from the frozen leaves; other
    methods: from ``base_params``, else the base reloaded as results.json names it)."""
    from tvgeo_jax import fingerprint
    stored = self.results.get("base_fingerprint")
    if stored:
      return stored, False
    tree = self.params if self.method == "lora" and self.params is not None else base_params
    tree = tree if tree is not None else self.base_params()
    return fingerprint.base_fingerprint(tree, self.model_config), True


def load_base_params(results: Mapping[str, Any]) -> dict:
  """The pretrained tree a run started from, from its results.json (name or path, seed)."""
  from tvgeo_jax.models import load_pretrained
  source = results.get("base_model_path") or results["base_model"]
  if source and not os.path.isdir(source):
    source = results["base_model"]
  model_config = EncoderConfig.from_hf_dict(results["model_config"])
  _, params = load_pretrained(source, num_labels=model_config.num_labels,
                              label_names=model_config.label_names or None,
                              seed=results["config"]["seed"])
  return params


def data_revision(config: Mapping[str, Any]) -> Optional[str]:
  """The hub dataset commit a run's data came from (None: synthetic or --data_dir)."""
  import logging
  from tvgeo_jax import data
  try:
    spec = data.get_task(config["task"])
  except ValueError:
    return None  # a task given in memory (loop.finetune(data=...)), not a registered one
  if spec.is_synthetic or config.get("data_dir"):
    return None
  try:  # the snapshot training just read; never lose a finished run over its record
    return data.hub_revision(spec, config.get("data_revision"))
  except (OSError, RuntimeError) as e:
    logging.warning("Could not look up the dataset commit of %s (%s); results.json records "
                    "data_revision None.", spec.name, e)
    return None


def load_run(run_dir: str, load_params: bool = True) -> Run:
  """Read a finished run directory (``results.json`` + ``params/``)."""
  from tvgeo_jax.training.checkpoint import load_tree
  from tvgeo_jax.training.config import TrainConfig

  path = os.path.join(run_dir, RESULTS)
  if not os.path.exists(path):
    state = ("an unfinished run (rerun the same command to resume it)"
             if os.path.exists(os.path.join(run_dir, RUN_CONFIG)) else "not a run directory")
    raise FileNotFoundError(f"{run_dir!r} has no {RESULTS}: {state}.")
  results = io_utils.read_json(path)
  config = TrainConfig.from_dict(results["config"])
  model_config = EncoderConfig.from_hf_dict(results["model_config"])
  params = load_tree(os.path.join(run_dir, PARAMS)) if load_params else None
  return Run(run_dir=os.path.abspath(run_dir), task=results["task"], method=results["method"],
             base_model=results["base_model"], config=config, model_config=model_config,
             results=results, params=params)
