"""Input pipeline: tokenise once, then yield fixed-shape numpy batches.

* Pairs are encoded by the fast tokenizer as the model expects (RoBERTa
  ``<s> a </s></s> b </s>``, BERT ``[CLS] a [SEP] b [SEP]`` with segment ids), truncated
  (longest first) to ``max_length``.
* Each batch is padded to the smallest *bucket* length holding its longest row (powers of
  two up to ``max_length``), so ``jax.jit`` compiles a handful of shapes.
* Batches always hold ``batch_size`` rows; a final partial batch is filled with copies of
  real rows whose ``weights`` are 0, so evaluation counts every example exactly once.
* Shuffling is a permutation drawn from ``(seed, epoch)``: reproducible, different per epoch.
* Multi-host: ``host_index`` / ``host_count`` make each host yield only its slice of every
  global batch (same order, same bucket length on every host).

Batches follow BUILD_NOTES: ``input_ids``, ``attention_mask``, ``token_type_ids`` int32
``[B, T]``; ``labels`` ``[B]`` (int32, float32 for regression); ``weights`` float32 ``[B]``.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

Batch = Dict[str, np.ndarray]


def bucket_lengths(max_length: int, min_length: int = 16) -> Tuple[int, ...]:
  """Powers of two from ``min_length`` up to ``max_length`` (which is always included)."""
  if max_length < 2:
    raise ValueError(f"max_length must be at least 2, got {max_length}.")
  out, b = [], min(min_length, max_length)
  while b < max_length:
    out.append(b)
    b *= 2
  return tuple(out) + (max_length,)


@dataclasses.dataclass
class EncodedSplit:
  """Token ids of one split, unpadded; ``labels`` int32 or float32."""
  input_ids: List[np.ndarray]
  token_type_ids: List[np.ndarray]
  labels: np.ndarray
  pad_token_id: int
  max_length: int

  def __len__(self) -> int:
    return len(self.input_ids)

  @property
  def lengths(self) -> np.ndarray:
    return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self))


def encode(tokenizer, texts: Sequence[Tuple[str, ...]], labels, max_length: int = 128
           ) -> EncodedSplit:
  """Tokenise single texts or pairs with a fast ``transformers`` tokenizer.

  Args:
    tokenizer: e.g. from ``tvgeo_jax.data.load_tokenizer``.
    texts: one tuple per example, of one or two strings.
    labels: class ids or regression targets, one per example.
    max_length: rows are truncated (longest sequence first for pairs) to this many tokens.
  """
  labels = np.asarray(labels)
  if len(texts) != len(labels):
    raise ValueError(f"{len(texts)} texts but {len(labels)} labels.")
  if tokenizer.pad_token_id is None:
    raise ValueError("The tokenizer has no pad token; set tokenizer.pad_token first.")
  model_max = getattr(tokenizer, "model_max_length", None)
  if model_max and model_max < 10**6 and max_length > model_max:
    raise ValueError(f"max_length={max_length} exceeds the tokenizer's model_max_length="
                     f"{model_max} (the model's position embeddings); lower --max_length.")
  widths = {len(t) for t in texts}
  if len(widths) > 1 or (widths and widths.pop() not in (1, 2)):
    raise ValueError("Every example must be a tuple of one text or of two texts (a pair).")
  first = [t[0] for t in texts]
  second = [t[1] for t in texts] if texts and len(texts[0]) == 2 else None
  enc = tokenizer(first, second, truncation=True, max_length=max_length,
                  return_token_type_ids=True, return_attention_mask=False)
  ids = [np.asarray(x, dtype=np.int32) for x in enc["input_ids"]]
  types = enc.get("token_type_ids") or [None] * len(ids)
  types = [np.zeros_like(i) if t is None else np.asarray(t, dtype=np.int32)
           for i, t in zip(ids, types)]
  dtype = np.int32 if np.issubdtype(labels.dtype, np.integer) else np.float32
  return EncodedSplit(ids, types, labels.astype(dtype), int(tokenizer.pad_token_id), max_length)


class Batches:
  """Fixed-size batches over an ``EncodedSplit``; iterate ``epoch(e)`` (or the object).

  Args:
    data: the encoded split.
    batch_size: the *global* batch size (all hosts and devices together).
    shuffle: permute the rows each epoch (from ``(seed, epoch)``).
    seed: shuffling seed.
    drop_remainder: drop a final partial batch instead of filling it with weight-0 rows
      (training only; evaluation must keep it).
    buckets: allowed padded lengths (default: ``bucket_lengths(data.max_length)``).
    host_index, host_count: yield only rows ``[host_index * B / host_count, ...)`` of
      every global batch; ``batch_size`` must be divisible by ``host_count``.
  """

  def __init__(self, data: EncodedSplit, batch_size: int, *, shuffle: bool = False,
               seed: int = 0, drop_remainder: bool = False,
               buckets: Optional[Sequence[int]] = None, host_index: int = 0,
               host_count: int = 1):
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if host_count < 1 or not 0 <= host_index < host_count:
      raise ValueError(f"host_index={host_index} must lie in [0, host_count={host_count}).")
    if batch_size % host_count:
      raise ValueError(f"batch_size={batch_size} is not divisible by host_count={host_count}.")
    if len(data) == 0:
      raise ValueError("Cannot batch an empty split.")
    self.data = data
    self.batch_size = batch_size
    self.shuffle = shuffle
    self.seed = seed
    self.drop_remainder = drop_remainder
    self.buckets = tuple(sorted(buckets or bucket_lengths(data.max_length)))
    longest = int(data.lengths.max())
    if longest > self.buckets[-1]:
      raise ValueError(f"A row has {longest} tokens, more than the largest bucket "
                       f"{self.buckets[-1]}; encode with a smaller max_length.")
    self.host_index, self.host_count = host_index, host_count
    self._lengths = data.lengths

  def __len__(self) -> int:
    n = len(self.data)
    return n // self.batch_size if self.drop_remainder else -(-n // self.batch_size)

  @property
  def num_examples(self) -> int:
    return len(self.data)

  def order(self, epoch: int) -> np.ndarray:
    """Row order of ``epoch``."""
    n = len(self.data)
    if not self.shuffle:
      return np.arange(n)
    return np.random.default_rng(np.random.SeedSequence([self.seed, epoch, 1234])).permutation(n)

  def bucket_for(self, length: int) -> int:
    return next(b for b in self.buckets if b >= length)

  def epoch(self, epoch: int = 0) -> Iterator[Batch]:
    """The batches of one epoch (this host's slice of each)."""
    order = self.order(epoch)
    b = self.batch_size
    per_host = b // self.host_count
    lo = self.host_index * per_host
    for start in range(0, len(self) * b, b):
      idx = order[start:start + b]
      weights = np.ones(b, np.float32)
      if len(idx) < b:  # final partial batch: repeat real rows with weight 0
        weights[len(idx):] = 0.0
        idx = np.concatenate([idx, np.resize(idx, b - len(idx))])
      t = self.bucket_for(int(self._lengths[idx].max()))
      yield self._assemble(idx[lo:lo + per_host], weights[lo:lo + per_host], t)

  def __iter__(self) -> Iterator[Batch]:
    return self.epoch(0)

  def _assemble(self, idx: np.ndarray, weights: np.ndarray, t: int) -> Batch:
    d = self.data
    ids = np.full((len(idx), t), d.pad_token_id, np.int32)
    types = np.zeros((len(idx), t), np.int32)
    mask = np.zeros((len(idx), t), np.int32)
    for row, i in enumerate(idx):
      n = len(d.input_ids[i])
      ids[row, :n] = d.input_ids[i]
      types[row, :n] = d.token_type_ids[i]
      mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
            "labels": d.labels[idx], "weights": weights}
