"""The one place that talks to the Hugging Face hub; fails fast and clearly offline."""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence


class HubUnavailableError(RuntimeError):
  """The hub cannot be reached (offline, or HF_HUB_OFFLINE=1) and nothing is cached."""


def is_offline() -> bool:
  return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def snapshot(repo_id: str, kind: str = "model",
             allow_patterns: Optional[Sequence[str]] = None, *,
             revision: Optional[str] = None,
             missing: Optional[Callable[[str], Optional[str]]] = None) -> str:
  """Local path of a hub repo at ``revision`` (cached copy first, then a download).

  A cached snapshot is used only when ``missing(path)`` is None: ``missing`` names
  what the caller needs that a partial snapshot lacks (some huggingface_hub versions
  return any cached snapshot offline, whatever ``allow_patterns`` asks for). Else
  the missing files are downloaded (``allow_patterns`` only), or, offline, a
  HubUnavailableError names them.

  Raises HubUnavailableError naming the repo and the local alternative when
  the hub is unreachable and no (complete) cached copy exists; FileNotFoundError
  when even a fresh download lacks what ``missing`` asks for.
  """
  from huggingface_hub import snapshot_download
  repo_type = "dataset" if kind == "dataset" else "model"
  # Read at call time (huggingface_hub reads it once, at import).
  kw = dict(repo_type=repo_type, allow_patterns=allow_patterns, revision=revision,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None)
  at = f" at revision {revision!r}" if revision else ""
  try:
    path = snapshot_download(repo_id, local_files_only=True, **kw)
  except Exception:  # not cached: try the network below
    path = None
  lacking = missing(path) if path and missing else None
  if path and lacking is None:
    return path
  hint = ("pass a local directory in the Hugging Face layout (config.json + "
          "model.safetensors) instead of a hub id, or use --model=tiny (the built-in "
          "pretrained tiny base)"
          if kind == "model" else
          "pass --data_dir with a local copy in the hub's formats, or use the offline "
          "synthetic suite (synth_* tasks)")
  if is_offline():
    state = (f"is cached{at} without {lacking}" if lacking else f"is not cached{at}")
    raise HubUnavailableError(
        f"{kind} {repo_id!r} {state} and HF_HUB_OFFLINE is set, so the Hugging Face "
        f"hub is not contacted: {hint}.")
  os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
  os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
  try:
    path = snapshot_download(repo_id, **kw)
  except Exception as e:  # huggingface_hub raises many types for network failures
    raise HubUnavailableError(
        f"Could not fetch {kind} {repo_id!r}{at} from the Hugging Face hub "
        f"({type(e).__name__}: {str(e)[:200]}). The hub is unreachable or the id is wrong: "
        f"{hint}.") from e
  lacking = missing(path) if missing else None
  if lacking:
    raise FileNotFoundError(f"{kind} {repo_id!r}{at} on the hub has no {lacking}; check the "
                            "repo's files (and --data_revision).")
  return path


def snapshot_revision(path: str) -> Optional[str]:
  """The commit of a hub-cache snapshot path (``.../snapshots/<commit>``), else None."""
  parent, name = os.path.split(os.path.normpath(path))
  return name if os.path.basename(parent) == "snapshots" else None
