"""Shared by the tests that merge peft adapters with peft itself."""
from __future__ import annotations

import json
import os

from tvgeo_jax import peft_io


def plain_adapter(directory: str) -> None:
  """Rewrite a saved peft adapter without task type or modules_to_save (LoRA factors
  only), so that two of them can be combined by ``add_weighted_adapter``; the head stays
  the base model's."""
  from safetensors.numpy import load_file, save_file
  cfg_path = os.path.join(directory, peft_io.CONFIG_FILE)
  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg.update(task_type=None, modules_to_save=None)
  with open(cfg_path, "w") as f:
    json.dump(cfg, f)
  w_path = os.path.join(directory, peft_io.WEIGHTS_FILE)
  save_file({k: v for k, v in load_file(w_path).items() if ".lora_" in k}, w_path)
