"""Score parameter trees on a task's split: one model (``evaluate``) or many at once.

"The metrics of these params on task X's validation/test split", from the same pieces a
run validates with (``task_data.build``, ``scoring.make_eval_step``, ``scoring.predict``,
``scoring.split_metrics``), so scores match a run's ``results.json``.

* Tokenised data (``TaskData``) is cached per (task, model, seed, max_seq_len,
  data_scale, data_dir, eval_batch_size): scoring many merged models tokenises once.
* ``evaluate_stacked`` scores K trees of one structure (e.g. every merge(i, ·) of
  task i: same base, same head) in one compiled forward: the leaves that differ
  between the trees are stacked and ``jax.vmap``-ed over, the shared ones (base,
  head) are passed once. K is processed in chunks of ``chunk_size``.
"""
from __future__ import annotations

import itertools
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from tvgeo_jax.core import trees
from tvgeo_jax.models import apply as model_apply
from tvgeo_jax.models.config import EncoderConfig
from tvgeo_jax.core import sharding
from tvgeo_jax.evaluation import losses, scoring
from tvgeo_jax.evaluation import task_data as task_data_lib
from tvgeo_jax.evaluation.task_data import Batch, TaskData

SPLITS = ("validation", "test")
DEFAULT_CHUNK = 16

_DATA_CACHE: Dict[Tuple, Any] = {}
_STEP_CACHE: Dict[Tuple, Any] = {}
_MESH = []


def data_key(train_config) -> Tuple:
  """What determines the tokenised eval batches of a run's config (not ``train_scale``:
  it changes the train split alone, which evaluation never reads)."""
  c = train_config
  return (c.task, c.model, int(c.seed), int(c.max_seq_len), float(c.data_scale), c.data_dir,
          int(c.eval_batch_size))


def cached_task_data(train_config) -> TaskData:
  """``task_data.build(config)``, cached (see ``data_key``)."""
  key = data_key(train_config)
  if key not in _DATA_CACHE:
    _DATA_CACHE[key] = task_data_lib.build(train_config)
  return _DATA_CACHE[key]


def set_task_data(train_config, data: TaskData) -> None:
  """Use ``data`` for ``train_config``'s key (in-memory tasks: benchmarks, fixtures)."""
  _DATA_CACHE[data_key(train_config)] = data


def _mesh():
  if not _MESH:
    _MESH.append(sharding.data_mesh())
  return _MESH[0]


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")


def _check_head(model_config: EncoderConfig, data: TaskData, task: str) -> None:
  if model_config.num_labels != data.num_labels:
    raise ValueError(f"The model has {model_config.num_labels} labels but task {task!r} has "
                     f"{data.num_labels}; score a model with that task's head "
                     "(tvgeo_jax.merging.with_head).")


def _eval_step(model_config: EncoderConfig, is_regression: bool, dtype: str):
  key = ("single", model_config, is_regression, dtype)
  if key not in _STEP_CACHE:
    _STEP_CACHE[key] = scoring.make_eval_step(model_config=model_config, mesh=_mesh(),
                                               is_regression=is_regression,
                                               dtype=jnp.dtype(dtype))
  return _STEP_CACHE[key]


def split_batches(data: TaskData, split: str, eval_batch_size: int,
                  max_examples: Optional[int] = None) -> Iterator[Batch]:
  """The split's eval batches; with ``max_examples``, only its first
  ``ceil(max_examples / eval_batch_size)`` batches (whole batches, so every host stops at
  the same one): a fixed subset of the split, the same for every model scored on it."""
  batches = data.eval_batches(split)
  if max_examples is None:
    return batches
  if max_examples < 1:
    raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}.")
  return itertools.islice(batches, -(-max_examples // eval_batch_size))


def evaluate(params: Mapping, model_config: EncoderConfig, train_config,
             split: str = "test", max_examples: Optional[int] = None) -> Dict[str, Any]:
  """Metrics of ``params`` on ``train_config.task``'s ``split`` (as in ``results.json``);
  ``max_examples``: on the split's first examples only (``split_batches``)."""
  _check_split(split)
  data = cached_task_data(train_config)
  _check_head(model_config, data, train_config.task)
  step = _eval_step(model_config, data.is_regression, train_config.dtype)
  params = sharding.replicate(params, _mesh())
  pred = scoring.predict(step, params, split_batches(data, split, train_config.eval_batch_size,
                                                     max_examples), _mesh())
  return scoring.split_metrics(pred, data, scoring.class_weights(train_config.class_weights, data))


# --- stacked evaluation ---------------------------------------------------------------

def split_shared(params_list: Sequence[Mapping]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """``(shared, varying)`` keyed by path string: leaves equal in every tree (passed
  once) and the others stacked ``[K, ...]``. Raises if the trees' structures differ."""
  flats = [trees.flatten(p) for p in params_list]
  ref = flats[0]
  for i, f in enumerate(flats[1:], 1):
    if f.keys() != ref.keys():
      odd = sorted(set(f) ^ set(ref))[0]
      raise ValueError(f"evaluate_stacked: tree {i} and tree 0 differ in structure "
                       f"({trees.path_str(odd)} is in one only); stack only trees with the "
                       "same leaves (e.g. the merges of one task, with its head).")
    for p, v in f.items():
      if np.shape(v) != np.shape(ref[p]):
        raise ValueError(f"evaluate_stacked: {trees.path_str(p)} has shape {np.shape(v)} in "
                         f"tree {i} but {np.shape(ref[p])} in tree 0.")
  shared, varying = {}, {}
  for p, v0 in ref.items():
    leaves = [f[p] for f in flats]
    same = all(l is v0 for l in leaves[1:]) or all(
        bool(jnp.array_equal(jnp.asarray(l), jnp.asarray(v0))) for l in leaves[1:])
    if same:
      shared[trees.path_str(p)] = v0
    else:
      varying[trees.path_str(p)] = jnp.stack([jnp.asarray(l) for l in leaves])
  return shared, varying


def _unflatten_str(flat: Mapping[str, Any]) -> dict:
  return trees.unflatten({tuple(k.split("/")): v for k, v in flat.items()})


def _stacked_step(model_config: EncoderConfig, is_regression: bool, dtype: str):
  """``step(varying [K,...], shared, batch) -> {"logits" [B, K, C], "loss" [B, K], ...}``.

  Batch-major outputs, so ``scoring.predict`` drops padding rows along axis 0 as for
  one model.
  """
  key = ("stacked", model_config, is_regression, dtype)
  if key in _STEP_CACHE:
    return _STEP_CACHE[key]
  mesh = _mesh()
  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)

  def forward(varying, shared, batch):
    def one(v):
      params = _unflatten_str({**shared, **v})
      out = model_apply(params, batch, config=model_config, train=False,
                        dtype=jnp.dtype(dtype), logits_only=True)
      logits = out["logits"].astype(jnp.float32)
      return logits, losses.per_example_loss(logits, batch["labels"], is_regression)
    logits, loss = jax.vmap(one)(varying)                       # [K, B, C], [K, B]
    return {"logits": jnp.swapaxes(logits, 0, 1), "loss": jnp.swapaxes(loss, 0, 1),
            "labels": batch["labels"], "weights": batch["weights"]}

  jitted = jax.jit(forward, in_shardings=(rep, rep, data), out_shardings=data)
  _STEP_CACHE[key] = jitted
  return jitted


def evaluate_stacked(params_list: Sequence[Mapping], model_config: EncoderConfig,
                     train_config, split: str = "test",
                     chunk_size: Optional[int] = DEFAULT_CHUNK,
                     max_examples: Optional[int] = None) -> List[Dict[str, Any]]:
  """``[evaluate(p, ..., max_examples) for p in params_list]``, K trees per compiled forward.

  The trees must share structure and shapes (the merges scored on one task carry
  that task's head). Leaves identical across the trees are not copied K times.
  ``chunk_size`` bounds K per forward (memory: K copies of the varying leaves and
  K activations of an eval batch); ``None`` stacks them all.
  """
  _check_split(split)
  params_list = list(params_list)
  if not params_list:
    raise ValueError("evaluate_stacked: no parameter trees given.")
  if chunk_size is not None and chunk_size < 1:
    raise ValueError(f"evaluate_stacked: chunk_size must be >= 1 or None, got {chunk_size}.")
  data = cached_task_data(train_config)
  _check_head(model_config, data, train_config.task)
  cw = scoring.class_weights(train_config.class_weights, data)
  step = _stacked_step(model_config, data.is_regression, train_config.dtype)
  mesh = _mesh()
  size = len(params_list) if chunk_size is None else chunk_size
  out: List[Dict[str, Any]] = []
  for start in range(0, len(params_list), size):
    chunk = params_list[start:start + size]
    if len(chunk) == 1:
      out.append(evaluate(chunk[0], model_config, train_config, split, max_examples))
      continue
    shared, varying = split_shared(chunk)
    if not varying:   # identical trees: score one, copy the metrics
      res = evaluate(chunk[0], model_config, train_config, split, max_examples)
      out.extend(dict(res) for _ in chunk)
      continue
    shared = sharding.replicate(shared, mesh)
    varying = sharding.replicate(varying, mesh)
    pred = scoring.predict(lambda v, batch: step(v, shared, batch), varying,
                        split_batches(data, split, train_config.eval_batch_size,
                                      max_examples), mesh)
    for k in range(len(chunk)):
      one = {"logits": pred["logits"][:, k], "loss": pred["loss"][:, k],
             "labels": pred["labels"], "weights": pred["weights"]}
      out.append(scoring.split_metrics(one, data, cw))
  return out
