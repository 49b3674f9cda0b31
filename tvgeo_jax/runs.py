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
and devices.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Mapping, Optional

from tvgeo_jax import io_utils
from tvgeo_jax.models.config import EncoderConfig

RESULTS = "results.json"
RUN_CONFIG = "run_config.json"
METRICS_LOG = "metrics.jsonl"
PARAMS = "params"
HF = "hf"
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"


def is_finished(run_dir: str) -> bool:
  return os.path.exists(os.path.join(run_dir, RESULTS))


def resolve_base_path(model: str) -> Optional[str]:
  """The absolute path of a local base-model directory, else None (a hub id or a built-in name)."""
  return os.path.abspath(model) if os.path.isdir(model) else None


def write_outputs(run_dir: str, params: Mapping, model_config: EncoderConfig,
                  method: str, results: Dict[str, Any], base_model: str) -> None:
  """params/, hf/, adapter/ (as the method has them), then results.json last.

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
    try:
      from tvgeo_jax import peft_io
    except ImportError:
      peft_io = None
    if peft_io is not None:
      peft_io.save_peft(os.path.join(run_dir, ADAPTER), params, model_config,
                        base_model_name_or_path=base_model)
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
    from tvgeo_jax.models import load_pretrained
    source = self.results.get("base_model_path") or self.base_model
    if source and not os.path.isdir(source):
      source = self.base_model
    _, params = load_pretrained(source, num_labels=self.model_config.num_labels,
                                label_names=self.model_config.label_names or None,
                                seed=self.config.seed)
    return params


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
