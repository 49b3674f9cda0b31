r"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs full fine-tuning: an illusion of
equivalence").

For one weight matrix, with ``W_base = U0 Σ0 V0ᵀ`` and the fine-tuned ``W = U Σ Vᵀ``
(PyTorch layout ``(out, in)``, singular values descending), the i-th left-singular
vector ``u_i`` of ``W`` is an *intruder dimension* when no left-singular vector of the
base resembles it::

  max_j |cos(u_i, u0_j)| < ε,       i = 1..k,  j = 1..min(out, in)

and the measure is the number of intruders among the top-k (the paper's code uses
k = 10 and compares against all of the base's singular vectors; ε = 0.5 is our default,
the paper sweeps it). Full fine-tuning rarely creates them; low-rank LoRA updates do.

Which weights: a module's *effective* kernel, LoRA updates folded in
(``W + scale·B·A``); the base is the run's pretrained tree (full FT) or the LoRA tree's
own frozen kernel. Bottleneck adapters leave every pretrained matrix frozen (they add
new modules), so their counts are those of unchanged matrices: 0, computed, not assumed.

* ``intruder_dimensions(w, w_base, k, eps)``: batched over leading axes (layers);
* ``weight_stack(params, module)``: ``[L, out, in]`` effective kernels of a tree;
* ``model_intruders(finetuned, base, modules)``: per module, counts per layer.
"""
from __future__ import annotations

import functools
from typing import Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from tvgeo_jax import lora, trees
from tvgeo_jax.geometry.linalg import einsum

DEFAULT_K = 10
DEFAULT_EPS = 0.5


@functools.partial(jax.jit, static_argnames=("k",))
def _intruders(w, w_base, eps, k):
  u, _, _ = jnp.linalg.svd(jnp.stack([w, w_base]), full_matrices=False)  # one SVD call
  cos = jnp.abs(einsum("...ni,...nj->...ij", u[0][..., :k], u[1]))      # [..., k, min(out, in)]
  best = jnp.max(cos, axis=-1)
  return jnp.sum(best < eps, axis=-1), best


def intruder_dimensions(w, w_base, k: int = DEFAULT_K, eps: float = DEFAULT_EPS
                        ) -> Tuple[np.ndarray, np.ndarray]:
  """Intruder count among the top-k left-singular vectors of ``w`` relative to ``w_base``.

  Args:
    w, w_base: fine-tuned and base weights ``[..., out, in]`` (same shape; leading
      axes, e.g. layers, are batched).
    k: how many of ``w``'s top singular vectors are tested.
    eps: cosine threshold; a vector whose best |cosine| with any base singular vector
      is below it counts.

  Returns:
    ``(count [...], max_cos [..., k])``: the count and, for each of the top-k vectors,
    its largest |cosine| with the base's singular vectors.
  """
  w = jnp.asarray(w, jnp.float32)
  w_base = jnp.asarray(w_base, jnp.float32)
  if w.shape != w_base.shape or w.ndim < 2:
    raise ValueError(f"Fine-tuned and base weights must be matrices of one shape, got "
                     f"{w.shape} and {w_base.shape}.")
  if not 1 <= int(k) <= min(w.shape[-2:]):
    raise ValueError(f"k={k} must lie in [1, {min(w.shape[-2:])}] for {w.shape[-2:]} weights.")
  if not 0.0 < float(eps) <= 1.0:
    raise ValueError(f"eps={eps} must lie in (0, 1]: it is a cosine threshold.")
  count, best = _intruders(w, w_base, jnp.float32(eps), int(k))
  return np.asarray(count), np.asarray(best)


def weight_stack(params: Mapping, module: str, layers: Optional[Sequence[int]] = None
                 ) -> np.ndarray:
  """Effective kernels of ``module`` per layer, ``[L, out, in]`` (LoRA folded in)."""
  merged = lora.merge_lora(params) if lora.has_lora(params) else params
  layers = trees.layer_indices(merged) if layers is None else list(layers)
  out = []
  for i in layers:
    try:
      kernel = trees.get_path(merged, ("encoder", f"layer_{i}") + tuple(module.split("/"))
                              + ("kernel",))
    except (KeyError, TypeError):
      raise ValueError(f"No encoder/layer_{i}/{module}/kernel in the tree; intruder "
                       "dimensions need a pretrained dense module (query, key, value, "
                       "attention_output, intermediate, output).") from None
    out.append(np.asarray(kernel, np.float32).T)
  return np.stack(out)


def model_intruders(finetuned: Mapping, base: Optional[Mapping], modules: Sequence[str],
                    k: int = DEFAULT_K, eps: float = DEFAULT_EPS
                    ) -> Dict[str, Dict[str, np.ndarray]]:
  """``{module: {"count": [L], "max_cos": [L, k]}}`` of one fine-tuned model.

  ``base`` is the pretrained tree; ``None`` for a LoRA tree, whose frozen kernels are
  its base.
  """
  if base is None:
    if not lora.has_lora(finetuned):
      raise ValueError("Intruder dimensions need the base weights: pass the pretrained "
                       "tree (only a LoRA tree carries its own).")
    base = lora.strip_lora(finetuned)
  res = {}
  for m in modules:
    w, w0 = weight_stack(finetuned, m), weight_stack(base, m)
    if w.shape != w0.shape:
      raise ValueError(f"{m}: fine-tuned kernels {w.shape} vs base {w0.shape}; are they "
                       "from the same base model?")
    count, best = intruder_dimensions(w, w0, k, eps)
    res[m] = {"count": count, "max_cos": best}
  return res
