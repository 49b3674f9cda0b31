"""The embedded base model: a tiny RoBERTa pretrained (MLM) on the synthetic corpus.

It is the offline study's "pretrained model" W0: ``--model=embedded`` anywhere a model
name is accepted. It is built on first use (``ensure_embedded_base``) and cached under
``tvgeo_jax.core.paths.cache_dir()`` in the Hugging Face layout (config.json,
model.safetensors with the MLM head, the synthetic tokenizer's files), so every later
step treats it exactly like ``roberta-base``.

The pretraining corpus is the synthetic grammar sampled with a different seed than the
fine-tuning tasks (seed ``CORPUS_SEED``), i.e. the same language, other sentences; the
pair tasks' text pairs of that seed are also read as pairs, without their labels
(``PretrainConfig.pair_every``), with cross-text targets computed from each pair.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import time
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tvgeo_jax.core import io_utils, paths
from tvgeo_jax.pretraining import mlm
from tvgeo_jax.models import EncoderConfig, apply, init_params, save_pretrained
from tvgeo_jax.data import load_tokenizer, synthetic
from tvgeo_jax.core import sharding
from tvgeo_jax.training import step as step_lib
from tvgeo_jax.training.optim import make_optimizer
from tvgeo_jax.data.tokenizer import synthetic_tokenizer_dir
from tvgeo_jax.models import load_pretrained

CORPUS_SEED = 1000
# The base pretrained once with ``python -m experiments.pretrain_mlm`` (see BUILD_NOTES),
# shipped so the offline study spends no budget on pretraining.
# The shipped base is package data at the package root (tvgeo_jax/assets/embedded_base).
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "assets", "embedded_base")
# v4: polarity-coherent reviews in the MLM corpus, 3,200 steps; v5: v4's weights (the
# same recipe), its config without dropout, as it was pretrained; v6: v5's recipe for
# 19,200 steps (six times as long: the NLI tasks and CoLA by LoRA learn on it, BUILD_NOTES
# session 11)
VERSION = "v6"
SPECIAL_IDS = (0, 1, 2, 3, 4)  # <s> <pad> </s> <unk> <mask>
PAD_ID = 1
MASK_ID = 4


def embedded_config() -> EncoderConfig:
  """4 layers, hidden 64, 4 heads: small enough to fine-tune 20 runs on 2 CPU cores.

  No dropout: the base is pretrained without it, and fine-tuning it with dropout 0.1 (a
  noise its features never met) kept most pair tasks at chance (BUILD_NOTES, session 9:
  LoRA synth_snli 0.36 -> 0.80, full synth_cola MCC 0.49 -> 0.92 at dropout 0). A run can
  still ask for dropout (``TrainConfig.dropout``)."""
  return EncoderConfig(model_type="roberta", vocab_size=2048, hidden_size=64,
                       num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                       max_position_embeddings=130, type_vocab_size=1, layer_norm_eps=1e-5,
                       pad_token_id=1, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """MLM recipe. Short blocks train fast; every ``long_every``-th step uses blocks of
  ``long_seq_len`` (same token count) so every position embedding fine-tuning uses is
  trained. Dropout is off while pretraining (and in the saved config, from v5 on)."""
  steps: int = 19200
  batch_size: int = 64
  seq_len: int = 32
  long_seq_len: int = 128
  long_every: int = 4
  learning_rate: float = 2e-3
  warmup_ratio: float = 0.1
  weight_decay: float = 0.01
  mask_prob: float = 0.15
  corpus_scale: float = 1.0
  eval_blocks: int = 256
  seed: int = 0
  # Sentence-level signal: blocks start at a text's <s>, and the first position's final
  # state predicts ``cls_targets`` tokens drawn from its block (a bag-of-words objective
  # through the MLM head), so the state a classification head reads summarises its input.
  cls_targets: int = 8
  aligned_blocks: bool = False  # text-aligned blocks without the bag-of-words loss
  # Cross-text signal: every ``pair_every``-th step (0: never) is a batch of the pair
  # tasks' unlabelled text pairs, one pair per row as fine-tuning tokenises it
  # (``<s> a </s></s> b </s>``, padded to ``pair_seq_len``), so a masked word of one text
  # that the other contains is predicted by matching across the pair.
  pair_every: int = 2
  pair_seq_len: int = 64
  # On pair rows the first position predicts the words of b that a lacks, and the first
  # </s> the words of a that b lacks (instead of the block's bag of words).
  pair_novelty: bool = True
  # On pair rows every content token also predicts (a linear probe on its last-layer
  # state, discarded after pretraining) whether its word occurs in the other text.
  pair_match: bool = True
  # Polarity signal: this many (times ``corpus_scale``) label-free, negation-free,
  # polarity-coherent reviews
  # (``synthetic.polar_reviews``) join the MLM training texts (not the held-out texts,
  # not the tokenizer's corpus, not any task), so that masked-language modelling has a
  # reason to separate the positive and negative adjectives (0: off). Base v4 uses
  # 30,000: without them LoRA cannot learn sentiment (BUILD_NOTES, session 8).
  polar_reviews: int = 30000
  # The share of those reviews' opinion clauses that are negated with the opposite
  # adjective, keeping the review's polarity ("not awful" in a positive review): MLM then
  # has to compose negation with polarity, as the sentiment tasks do (0: no negation).
  polar_negation: float = 0.0
  # Standard deviation of the word embeddings at initialisation (0: the encoder's
  # N(0, 0.02)). MLM gives every word of a grammatical class the same contexts, so the
  # learnt class direction swamps a small random start and the words of a class end up
  # nearly parallel (cosine 0.85-0.92 on v5); a larger start keeps each word its own
  # direction (BUILD_NOTES, session 10: measured, not shipped).
  word_init_std: float = 0.0


def _generator_version() -> str:
  return synthetic.GENERATOR_VERSION


def default_dir() -> str:
  """The cache directory of the base; named after the recipe and the generator version
  (the corpus and the tokenizer change with it)."""
  return os.path.join(paths.cache_dir(),
                      f"embedded-base-{VERSION}-g{synthetic.GENERATOR_VERSION}")


def pack_corpus(token_rows, seq_len: int) -> np.ndarray:
  """Concatenate tokenised texts (each ``<s> … </s>``) and cut ``[N, seq_len]`` blocks."""
  flat = np.concatenate([np.asarray(r, np.int32) for r in token_rows])
  n = len(flat) // seq_len
  return flat[: n * seq_len].reshape(n, seq_len)


def pack_aligned(token_rows, seq_len: int) -> np.ndarray:
  """``[N, seq_len]`` blocks of the concatenated texts, each starting at a text's first
  token (``<s>``), as a fine-tuning input does; blocks do not overlap."""
  flat = np.concatenate([np.asarray(r, np.int32) for r in token_rows])
  starts = np.cumsum([0] + [len(r) for r in token_rows[:-1]])
  chosen, last = [], -seq_len
  for s in starts:
    if s >= last + seq_len and s + seq_len <= len(flat):
      chosen.append(s)
      last = s
  return np.stack([flat[s:s + seq_len] for s in chosen])


def cls_bag_targets(rng: jax.Array, input_ids: jax.Array, k: int,
                    special_ids: Tuple[int, ...]) -> Tuple[jax.Array, jax.Array]:
  """``k`` tokens drawn without replacement from each row's non-special tokens:
  (targets [B, k], weights [B, k]; 0 where a row has fewer than k such tokens)."""
  candidate = jnp.ones(input_ids.shape, bool)
  for s in special_ids:
    candidate &= input_ids != s
  scores = jnp.where(candidate, jax.random.uniform(rng, input_ids.shape), -1.0)
  top, pos = jax.lax.top_k(scores, k)
  return jnp.take_along_axis(input_ids, pos, axis=1), (top >= 0).astype(jnp.float32)


def _corpus_rows(cfg: PretrainConfig, tokenizer: str = "tiny"):
  """Tokenised corpus texts in a seeded order; the first 5% are held out."""
  tok = load_tokenizer(tokenizer)
  texts = synthetic.corpus(seed=CORPUS_SEED, scale=cfg.corpus_scale)
  order = np.random.RandomState(cfg.seed).permutation(len(texts))
  rows = tok([texts[i] for i in order], add_special_tokens=True)["input_ids"]
  n_eval = max(1, len(rows) // 20)
  return rows[n_eval:], rows[:n_eval]


def _training_rows(cfg: PretrainConfig, tokenizer: str = "tiny"):
  """``_corpus_rows`` with the polar reviews (``cfg.polar_reviews`` × ``corpus_scale``)
  mixed into the training rows in a seeded order; the held-out rows are the corpus's."""
  train, held = _corpus_rows(cfg, tokenizer)
  n_polar = int(round(cfg.polar_reviews * cfg.corpus_scale))
  if n_polar:
    extra = load_tokenizer(tokenizer)(
        synthetic.polar_reviews(n_polar, seed=CORPUS_SEED, negation=cfg.polar_negation),
        add_special_tokens=True)["input_ids"]
    mixed = list(train) + list(extra)
    train = [mixed[i] for i in np.random.RandomState(cfg.seed + 2).permutation(len(mixed))]
  return train, held


def pair_rows(cfg: PretrainConfig, tokenizer: str = "tiny"):
  """Tokenised unlabelled corpus pairs ``[N, pair_seq_len]`` (padded, truncated), seeded
  order; the first 5% are held out."""
  tok = load_tokenizer(tokenizer)
  pairs = synthetic.pair_corpus(seed=CORPUS_SEED, scale=cfg.corpus_scale)
  order = np.random.RandomState(cfg.seed + 1).permutation(len(pairs))
  enc = tok([pairs[i][0] for i in order], [pairs[i][1] for i in order],
            add_special_tokens=True, truncation=True, max_length=cfg.pair_seq_len,
            padding="max_length")["input_ids"]
  rows = np.asarray(enc, np.int32)
  n_eval = max(1, len(rows) // 20)
  return rows[n_eval:], rows[:n_eval]


class _BlockSampler:
  """Epochs over packed blocks of one length, reshuffled by a seeded generator."""

  def __init__(self, blocks: np.ndarray, batch_size: int, rng: np.random.RandomState):
    self.blocks, self.batch_size, self.rng = blocks, batch_size, rng
    self.perm, self.pos = rng.permutation(len(blocks)), 0

  def next(self) -> np.ndarray:
    if self.pos + self.batch_size > len(self.perm):
      self.perm, self.pos = self.rng.permutation(len(self.blocks)), 0
    out = self.blocks[self.perm[self.pos:self.pos + self.batch_size]]
    self.pos += self.batch_size
    return out


SEP_ID = 2


def word_ids(tokenizer) -> np.ndarray:
  """``[vocab]`` map of token ids to a word id: a byte-level BPE spells a word differently
  at a text's start (``nurse``) and inside it (``Ġnurse``); both map to one id."""
  vocab = tokenizer.get_vocab()
  out = np.arange(max(vocab.values()) + 1, dtype=np.int32)
  for t, i in vocab.items():
    if not t.startswith("Ġ") and "Ġ" + t in vocab:
      out[i] = vocab["Ġ" + t]
  return out


def cross_occurrence(input_ids: jax.Array, words: jax.Array, special_ids: Tuple[int, ...]):
  """(in_a, in_b content masks, b_in_a, a_in_b): whether a token's word occurs in the
  other text of a pair row ``<s> a </s></s> b </s>``."""
  seps = jnp.cumsum(input_ids == SEP_ID, axis=1)
  content = jnp.ones(input_ids.shape, bool)
  for s in special_ids:
    content &= input_ids != s
  in_a, in_b = content & (seps == 0), content & (seps >= 2)
  w = words[input_ids]
  same = w[:, :, None] == w[:, None, :]  # [B, T, T]
  return (in_a, in_b, jnp.any(same & in_a[:, None, :], axis=2),
          jnp.any(same & in_b[:, None, :], axis=2))


def pair_novelty_targets(rng: jax.Array, input_ids: jax.Array, k: int,
                         special_ids: Tuple[int, ...], words: Optional[jax.Array] = None):
  """For pair rows ``<s> a </s></s> b </s>``: ``k`` tokens of b that a does not contain,
  and ``k`` tokens of a that b does not contain (drawn without replacement), each with
  ``</s>`` as the single target where there is none; and the position of the first
  ``</s>``. Returns (new_in_b, w_b, new_in_a, w_a, sep_position): a self-supervised
  cross-text target computed from the input alone (no task labels)."""
  if words is None:
    words = jnp.arange(int(input_ids.max()) + 1)
  in_a, in_b, b_in_a, a_in_b = cross_occurrence(input_ids, words, special_ids)
  k_b, k_a = jax.random.split(rng)

  def draw(key, cand):
    scores = jnp.where(cand, jax.random.uniform(key, input_ids.shape), -1.0)
    top, pos = jax.lax.top_k(scores, k)
    targets = jnp.take_along_axis(input_ids, pos, axis=1)
    weights = (top >= 0).astype(jnp.float32)
    none = weights[:, :1] == 0  # nothing new: predict </s> in the first slot
    targets = targets.at[:, 0].set(jnp.where(none[:, 0], SEP_ID, targets[:, 0]))
    weights = weights.at[:, 0].set(jnp.where(none[:, 0], 1.0, weights[:, 0]))
    return targets, weights

  new_b, w_b = draw(k_b, in_b & ~b_in_a)
  new_a, w_a = draw(k_a, in_a & ~a_in_b)
  sep_pos = jnp.argmax(input_ids == SEP_ID, axis=1).astype(jnp.int32)
  return new_b, w_b, new_a, w_a, sep_pos


def _loss_fn(p, ids, rng, *, config: EncoderConfig, mask_prob: float, cls_targets: int = 0,
             pair_novelty: bool = False, match=None, words=None):
  """MLM loss (nats); with ``cls_targets`` plus the first position's bag-of-words loss
  (for pair rows with ``pair_novelty``: the first position predicts the words of b that a
  lacks, the first ``</s>`` the words of a that b lacks)."""
  att = (ids != PAD_ID).astype(jnp.int32)
  k_mask, k_cls = jax.random.split(rng)
  masked, positions, targets, weights = mlm.mask_tokens(
      k_mask, ids, att, mask_token_id=MASK_ID, vocab_size=config.vocab_size,
      special_ids=SPECIAL_IDS, mask_prob=mask_prob)
  p_mlm = positions.shape[1]
  extra = []
  if cls_targets and pair_novelty:
    new_b, w_b, new_a, w_a, sep_pos = pair_novelty_targets(k_cls, ids, cls_targets,
                                                           SPECIAL_IDS, words)
    extra = [(jnp.zeros_like(new_b), new_b, w_b),
             (jnp.broadcast_to(sep_pos[:, None], new_a.shape), new_a, w_a)]
  elif cls_targets:
    bag, bag_w = cls_bag_targets(k_cls, ids, cls_targets, SPECIAL_IDS)
    extra = [(jnp.zeros_like(bag), bag, bag_w)]
  if extra:
    positions = jnp.concatenate([positions] + [x[0] for x in extra], axis=1)
  out = apply(p, {"input_ids": masked, "attention_mask": att}, config=config,
              head="mlm", mlm_positions=positions, output_hidden_states=match is not None)
  loss = mlm.mlm_loss(out["logits"][:, :p_mlm], targets, weights)
  if match is not None:  # does each content token's word occur in the other text?
    in_a, in_b, b_in_a, a_in_b = cross_occurrence(ids, words, SPECIAL_IDS)
    z = out["hidden_states"][-1] @ match["kernel"] + match["bias"]
    y = jnp.where(in_a, a_in_b, b_in_a).astype(jnp.float32)
    w = (in_a | in_b).astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(z, y)
    loss = loss + jnp.sum(bce * w) / jnp.maximum(jnp.sum(w), 1.0)
  start = p_mlm
  for pos, tgt, w in extra:
    loss = loss + mlm.mlm_loss(out["logits"][:, start:start + pos.shape[1]], tgt, w)
    start += pos.shape[1]
  return loss


@functools.lru_cache(maxsize=8)
def _eval_fn(config: EncoderConfig, mask_prob: float):
  """The jitted held-out MLM loss, compiled once per (config, mask_prob)."""
  return jax.jit(lambda p, ids, rng: _loss_fn(p, ids, rng, config=config, mask_prob=mask_prob))


def held_out_loss(params, config: EncoderConfig, cfg: PretrainConfig, held_out: np.ndarray
                  ) -> float:
  """Mean MLM loss over the held-out blocks, with the same masks at every call."""
  fn = _eval_fn(config.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                cfg.mask_prob)
  rng = jax.random.PRNGKey(12345)
  losses = [fn(params, held_out[i:i + cfg.batch_size], jax.random.fold_in(rng, i))
            for i in range(0, len(held_out) - cfg.batch_size + 1, cfg.batch_size)]
  return float(np.mean([float(x) for x in losses]))


def held_out_blocks(cfg: PretrainConfig, tokenizer: str = "tiny") -> np.ndarray:
  """The held-out MLM blocks of a pretraining run (tokenised with ``tokenizer``)."""
  return pack_corpus(_corpus_rows(cfg, tokenizer)[1], cfg.seq_len)[:cfg.eval_blocks]


def evaluate_base(directory: str) -> float:
  """Recompute a saved base's held-out MLM loss (``pretrain.json``'s recipe and corpus,
  the base's own tokenizer); it equals the recorded ``mlm_loss_final``."""
  report = io_utils.read_json(os.path.join(directory, "pretrain.json"))
  cfg = PretrainConfig(**report["pretrain_config"])
  config, params = load_pretrained(directory, head="mlm")
  return held_out_loss(params, config, cfg, held_out_blocks(cfg, directory))


def initial_params(config: EncoderConfig, cfg: PretrainConfig) -> dict:
  """The encoder's random start (seed ``cfg.seed``), its word embeddings rescaled to
  standard deviation ``cfg.word_init_std`` when that is set."""
  params = init_params(config, head="mlm", seed=cfg.seed)
  if cfg.word_init_std:
    emb = params["embeddings"]["word_embeddings"]["embedding"]
    params["embeddings"]["word_embeddings"]["embedding"] = emb * (cfg.word_init_std / emb.std())
  return params


def pretrain(cfg: PretrainConfig, config: Optional[EncoderConfig] = None,
             progress: bool = True) -> tuple:
  """Pretrain with MLM; returns (config, params, report dict)."""
  config = config or embedded_config()
  if cfg.long_seq_len + 2 > config.max_position_embeddings:
    raise ValueError(f"long_seq_len={cfg.long_seq_len} needs {cfg.long_seq_len + 2} positions; "
                     f"the model has {config.max_position_embeddings}.")
  train_config = config.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  train_rows, held_rows = _training_rows(cfg)
  order_rng = np.random.RandomState(cfg.seed)
  pack = pack_aligned if cfg.aligned_blocks or cfg.cls_targets else pack_corpus
  short = _BlockSampler(pack(train_rows, cfg.seq_len), cfg.batch_size, order_rng)
  long_batch = max(1, cfg.batch_size * cfg.seq_len // cfg.long_seq_len)
  long = _BlockSampler(pack(train_rows, cfg.long_seq_len), long_batch, order_rng)
  held_out = pack_corpus(held_rows, cfg.seq_len)[:cfg.eval_blocks]
  pairs = held_pairs = words = None
  if cfg.pair_every:
    if cfg.pair_seq_len + 2 > config.max_position_embeddings:
      raise ValueError(f"pair_seq_len={cfg.pair_seq_len} needs {cfg.pair_seq_len + 2} "
                       f"positions; the model has {config.max_position_embeddings}.")
    train_pairs, held_pairs = pair_rows(cfg)
    words = jnp.asarray(word_ids(load_tokenizer("tiny")))
    pair_batch = max(1, cfg.batch_size * cfg.seq_len // cfg.pair_seq_len)
    pairs = _BlockSampler(train_pairs, pair_batch, order_rng)
    held_pairs = held_pairs[:cfg.eval_blocks]
  params = {"encoder": initial_params(config, cfg),
            "match": {"kernel": jnp.zeros((config.hidden_size,)), "bias": jnp.zeros(())}}
  opt = make_optimizer(params, learning_rate=cfg.learning_rate, total_steps=cfg.steps,
                       warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
                       max_grad_norm=1.0)
  # The training package's optimizer step (step.make_step: donated state, the step's rng
  # fold_in(key(seed), step)); one compiled step per objective (pairs add the novelty loss).
  mesh = sharding.data_mesh()

  def objective(novelty: bool):
    def loss_of(trainable, frozen, ids, rng):
      del frozen  # every leaf trains
      return _loss_fn(trainable["encoder"], ids, rng, config=train_config,
                      mask_prob=cfg.mask_prob, cls_targets=cfg.cls_targets,
                      pair_novelty=novelty and cfg.pair_novelty,
                      match=trainable["match"] if novelty and cfg.pair_match else None,
                      words=words)
    return step_lib.make_step(loss_of, optimizer=opt, mesh=mesh, seed=cfg.seed,
                              batch_sharded=False)

  train_steps = {False: objective(False)}
  if pairs:
    train_steps[True] = objective(True)
  state = step_lib.init_state(params, opt)

  baseline = mlm.unigram_baseline(train_rows, SPECIAL_IDS)
  initial = held_out_loss(params["encoder"], config, cfg, held_out)
  initial_pairs = held_out_loss(params["encoder"], config, cfg, held_pairs) if pairs else None
  t0 = time.time()
  bar = _progress(cfg.steps, progress)
  losses = []
  for step in range(cfg.steps):
    use_long = cfg.long_every > 0 and step % cfg.long_every == cfg.long_every - 1
    use_pairs = bool(pairs) and not use_long and step % cfg.pair_every == 0
    ids = (pairs if use_pairs else long if use_long else short).next()
    state, metrics = train_steps[use_pairs](state, {}, ids)
    loss = metrics["loss"]
    if step % 50 == 0 or step == cfg.steps - 1:
      losses.append((step, float(loss)))
      bar.set_postfix(loss=f"{float(loss):.3f}")
    bar.update(1)
  bar.close()
  params = state["trainable"]["encoder"]
  final = held_out_loss(params, config, cfg, held_out)
  pair_losses = {}
  if pairs:
    pair_losses = {"mlm_loss_pairs_initial": initial_pairs,
                   "mlm_loss_pairs_final": held_out_loss(params, config, cfg, held_pairs)}
  report = {
      "steps": cfg.steps, "train_texts": len(train_rows), "held_out_blocks": int(len(held_out)),
      "tokens_seen": int(cfg.steps * cfg.batch_size * cfg.seq_len),
      "wall_time_s": round(time.time() - t0, 1),
      "mlm_loss_initial": initial, "mlm_loss_final": final,
      "unigram_baseline_loss": baseline, **pair_losses, "train_loss_log": losses,
      "pretrain_config": dataclasses.asdict(cfg), "corpus_seed": CORPUS_SEED,
      "base_version": VERSION, "generator_version": _generator_version(),
  }
  return config, jax.tree.map(np.asarray, params), report


def _progress(total: int, enabled: bool):
  from tqdm.auto import tqdm
  # disable=None: tqdm switches itself off when stderr is not a terminal (logs, CI).
  return tqdm(total=total, desc="pretrain MLM", disable=None if enabled else True,
              leave=False, mininterval=2.0)


def save(directory: str, config: EncoderConfig, params: dict, report: Dict) -> None:
  """HF layout (config + weights with the MLM head), tokenizer files, pretrain.json."""
  with io_utils.atomic_directory(directory) as tmp:
    model_dir = os.path.join(tmp, "model")
    save_pretrained(model_dir, config, params, head="mlm")
    for name in os.listdir(model_dir):
      shutil.move(os.path.join(model_dir, name), os.path.join(tmp, name))
    os.rmdir(model_dir)
    tok_dir = synthetic_tokenizer_dir()
    for name in os.listdir(tok_dir):
      shutil.copy(os.path.join(tok_dir, name), os.path.join(tmp, name))
    io_utils.atomic_write_json(os.path.join(tmp, "pretrain.json"), report)


def is_built(directory: str) -> bool:
  return all(os.path.exists(os.path.join(directory, f))
             for f in ("config.json", "model.safetensors", "pretrain.json"))


def shipped_is_current() -> bool:
  """Whether the base shipped in the package matches this recipe and generator version."""
  if not is_built(SHIPPED_DIR):
    return False
  report = io_utils.read_json(os.path.join(SHIPPED_DIR, "pretrain.json"))
  return (report.get("base_version") == VERSION
          and report.get("generator_version") == _generator_version())


def ensure_embedded_base(directory: Optional[str] = None,
                         cfg: Optional[PretrainConfig] = None) -> str:
  """The embedded base's directory.

  Without ``directory``: a base rebuilt into the cache (``experiments.pretrain_mlm``)
  if there is one, else the base shipped in the package, else one pretrained now
  into the cache. With ``directory``: that one, pretrained first if it is not built.
  """
  if directory is None and not is_built(default_dir()) and shipped_is_current():
    return SHIPPED_DIR
  directory = directory or default_dir()
  if not is_built(directory):
    logging.info("Embedded base not found in %s: pretraining it (once).", directory)
    config, params, report = pretrain(cfg or PretrainConfig())
    save(directory, config, params, report)
    logging.info("Embedded base: MLM loss %.3f (unigram baseline %.3f) -> %s",
                 report["mlm_loss_final"], report["unigram_baseline_loss"], directory)
  return directory
