"""Houlsby bottleneck adapters as parameter-tree transforms.

Houlsby et al. (2019) insert a small bottleneck, ``h + up(act(down(h)))``, twice
in every transformer layer: after the attention-output dense+dropout and after the
feed-forward-output dense+dropout, each before ``LayerNorm(x + residual)``. The
encoder (``tvgeo_jax.models.encoder.Layer``) runs these when the layer's dict holds
``attention_adapter`` / ``output_adapter`` sub-dicts::

  encoder/layer_i/{attention_adapter,output_adapter}/down/{kernel (hidden, m), bias (m)}
  encoder/layer_i/{attention_adapter,output_adapter}/up/{kernel (m, hidden), bias (hidden)}

so a base tree becomes an adapter model by adding leaves, and back by removing
them. ``tvgeo_jax.adapters.partition`` method ``"bottleneck"`` trains the adapters, every
LayerNorm and the head, and freezes the rest. The adapter sub-tree
(``adapter_params``) is an ordinary parameter tree that the task-vector tools can
compare between tasks (adapters start from the same init for a given seed, so
``trained − init`` is a task vector).
"""
from __future__ import annotations

from typing import Mapping, Optional

import jax
import numpy as np

from tvgeo_jax.adapters.leaves import is_adapter_path
from tvgeo_jax.core import trees
from tvgeo_jax.models.config import EncoderConfig

def has_adapters(params: Mapping) -> bool:
  """True if any layer of ``params`` carries a bottleneck adapter."""
  return any(is_adapter_path(p) for p in trees.flatten(params))


def bottleneck_size_for(hidden_size: int, size: Optional[int] = None,
                        reduction_factor: int = 16) -> int:
  """The bottleneck width m: ``size`` if given, else ``hidden_size // reduction_factor``.

  AdapterHub's default reduction factor is 16 (m = 48 for a 768-wide model).
  """
  if size is not None:
    if int(size) <= 0:
      raise ValueError(f"Adapter size must be a positive integer, got {size!r}.")
    return int(size)
  if reduction_factor is None or reduction_factor <= 0:
    raise ValueError(
        f"reduction_factor must be positive, got {reduction_factor!r}; or pass size=.")
  m = hidden_size // int(reduction_factor)
  if m < 1:
    raise ValueError(
        f"reduction_factor={reduction_factor} leaves no bottleneck for hidden_size="
        f"{hidden_size}; use a smaller factor or pass size= explicitly.")
  return m


def init_adapter(key: jax.Array, hidden_size: int, size: int,
                 init_std: float = 1e-2) -> dict:
  """One adapter ``{down, up}`` at near-identity: truncated-normal kernels, zero biases.

  Kernels are drawn from N(0, init_std²) truncated at ±2 standard deviations
  (TensorFlow's ``truncated_normal_initializer``, which Houlsby et al.'s code uses),
  so ``up(act(down(h)))`` is tiny and the adapter starts close to the identity.
  """
  if init_std < 0:
    raise ValueError(f"init_std must be >= 0, got {init_std}.")
  k_down, k_up = jax.random.split(key)
  normal = lambda k, shape: np.asarray(
      init_std * jax.random.truncated_normal(k, -2.0, 2.0, shape, dtype=np.float32))
  return {
      "down": {"kernel": normal(k_down, (hidden_size, size)),
               "bias": np.zeros((size,), np.float32)},
      "up": {"kernel": normal(k_up, (size, hidden_size)),
             "bias": np.zeros((hidden_size,), np.float32)},
  }


def inject_bottleneck(params: Mapping, config: EncoderConfig, *, size: Optional[int] = None,
                      reduction_factor: int = 16, seed: int = 0,
                      init_std: float = 1e-2) -> dict:
  """A copy of ``params`` with two Houlsby adapters added to every layer.

  Args:
    params: an encoder tree without adapters (leaves are shared, not copied).
    config: its configuration (hidden size and number of layers are checked).
    size: bottleneck width m; default ``hidden_size // reduction_factor``.
    reduction_factor: used when ``size`` is None (AdapterHub default 16).
    seed: adapter weights depend only on (seed, layer, position), so two tasks
      injected with the same seed start from the same adapters.
    init_std: standard deviation of the truncated-normal kernels.

  Returns:
    A new tree; the input is not modified.
  """
  if "encoder" not in params:
    raise ValueError("params has no 'encoder' sub-tree; pass a full encoder parameter tree.")
  if has_adapters(params):
    raise ValueError("params already carries bottleneck adapters; call strip_adapters first.")
  layers = trees.layer_indices(params)
  if len(layers) != config.num_hidden_layers:
    raise ValueError(f"params has {len(layers)} layers but config.num_hidden_layers="
                     f"{config.num_hidden_layers}; pass the config of this model.")
  hidden = config.hidden_size
  out_kernel = np.shape(params["encoder"][f"layer_{layers[0]}"]["output"]["kernel"])
  if out_kernel[-1] != hidden:
    raise ValueError(f"params has hidden size {out_kernel[-1]} but config.hidden_size="
                     f"{hidden}; pass the config of this model.")
  m = bottleneck_size_for(hidden, size, reduction_factor)
  root = jax.random.PRNGKey(seed)
  encoder = dict(params["encoder"])
  for i in layers:
    k_att, k_out = jax.random.split(jax.random.fold_in(root, i))
    layer = dict(encoder[f"layer_{i}"])
    layer["attention_adapter"] = init_adapter(k_att, hidden, m, init_std)
    layer["output_adapter"] = init_adapter(k_out, hidden, m, init_std)
    encoder[f"layer_{i}"] = layer
  out = dict(params)
  out["encoder"] = encoder
  return out


def strip_adapters(params: Mapping) -> dict:
  """A copy of ``params`` without adapter sub-trees (the base model's tree)."""
  return trees.unflatten({p: v for p, v in trees.flatten(params).items()
                          if not is_adapter_path(p)})


def adapter_params(params: Mapping) -> dict:
  """Only the adapter leaves, in the same nested layout (``encoder/layer_i/...``)."""
  return trees.unflatten({p: v for p, v in trees.flatten(params).items()
                          if is_adapter_path(p)})


def adapter_size(params: Mapping) -> int:
  """The bottleneck width m of the adapters in ``params`` (the same in every adapter)."""
  sizes = {np.shape(v)[-1] for p, v in trees.flatten(params).items()
           if is_adapter_path(p) and p[-2:] == ("down", "kernel")}
  if not sizes:
    raise ValueError("params carries no bottleneck adapters; use inject_bottleneck first.")
  if len(sizes) > 1:
    raise ValueError(f"Adapters of different sizes {sorted(sizes)} in one tree.")
  return int(sizes.pop())


def count_adapter_parameters(params: Mapping) -> int:
  """Number of adapter scalars: 2·L·(2·hidden·m + m + hidden) for L layers."""
  return int(sum(np.size(v) for p, v in trees.flatten(params).items()
                 if is_adapter_path(p)))
