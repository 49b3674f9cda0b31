"""The one place that talks to the Hugging Face hub; fails fast and clearly offline."""
from __future__ import annotations

import os
from typing import Optional, Sequence


class HubUnavailableError(RuntimeError):
  """The hub cannot be reached (offline, or HF_HUB_OFFLINE=1) and nothing is cached."""


def is_offline() -> bool:
  return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def snapshot(repo_id: str, kind: str = "model",
             allow_patterns: Optional[Sequence[str]] = None) -> str:
  """Local path of a hub repo (cached copy first, then a download).

  Raises HubUnavailableError naming the repo and the local alternative when
  the hub is unreachable and no cached copy exists.
  """
  from huggingface_hub import snapshot_download
  repo_type = "dataset" if kind == "dataset" else "model"
  try:
    return snapshot_download(repo_id, repo_type=repo_type, allow_patterns=allow_patterns,
                             local_files_only=True)
  except Exception:  # not cached: try the network below
    pass
  hint = ("pass a local directory in the Hugging Face layout (config.json + "
          "model.safetensors) instead of a hub id, or use --model=tiny (the built-in "
          "pretrained tiny base)"
          if kind == "model" else
          "pass --data_dir with a local copy in the hub's formats, or use the offline "
          "synthetic suite (synth_* tasks)")
  if is_offline():
    raise HubUnavailableError(
        f"{kind} {repo_id!r} is not cached and HF_HUB_OFFLINE is set, so the Hugging Face "
        f"hub is not contacted: {hint}.")
  os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
  os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
  try:
    return snapshot_download(repo_id, repo_type=repo_type, allow_patterns=allow_patterns)
  except Exception as e:  # huggingface_hub raises many types for network failures
    raise HubUnavailableError(
        f"Could not fetch {kind} {repo_id!r} from the Hugging Face hub "
        f"({type(e).__name__}: {str(e)[:200]}). The hub is unreachable or the id is wrong: "
        f"{hint}.") from e
