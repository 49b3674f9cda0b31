"""Tokenizers: the synthetic suite's byte-level BPE, or a checkpoint's own tokenizer.

The offline ``tiny`` / ``embedded`` models use a byte-level BPE trained (with the
``tokenizers`` library) on the synthetic corpus, with RoBERTa's special tokens
(``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, ``<mask>``=4) and RoBERTa's pair template
``<s> a </s></s> b </s>``. It is trained on first use, deterministically, and cached in
the Hugging Face format under ``tvgeo_jax.paths.cache_dir()``, so
``transformers.AutoTokenizer.from_pretrained(synthetic_tokenizer_dir())`` loads it.
"""
from __future__ import annotations

import os

from tvgeo_jax import hub, io_utils, paths
from tvgeo_jax.data import synthetic

VOCAB_SIZE = 2048  # the embedding size of the built-in tiny config; the BPE uses <= this
MAX_LENGTH = 256   # the tiny RoBERTa's 258 positions minus the padding offset
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
SYNTHETIC_NAMES = ("tiny", "embedded", "tiny-random", "tiny-bert-random", "synthetic")
_TOKENIZER_VERSION = f"synth-bpe-v1-g{synthetic.GENERATOR_VERSION}"


def synthetic_tokenizer_dir() -> str:
  """Directory of the cached synthetic tokenizer (created on first call)."""
  path = os.path.join(paths.cache_dir(), "tokenizers", _TOKENIZER_VERSION)
  if not os.path.exists(os.path.join(path, "tokenizer.json")):
    with io_utils.atomic_directory(path) as tmp:
      save_synthetic_tokenizer(tmp)
  return path


def train_synthetic_bpe():
  """A ``tokenizers.Tokenizer``: byte-level BPE on the synthetic corpus (deterministic)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2,
                                special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(synthetic.corpus(seed=0, scale=1.0), trainer)
  tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True,
                                                    add_prefix_space=False)
  for i, t in enumerate(SPECIAL_TOKENS):
    assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
  return tok


def save_synthetic_tokenizer(directory: str) -> None:
  """Train the synthetic BPE and write it to ``directory`` in the Hugging Face format."""
  from tokenizers import AddedToken
  from transformers import RobertaTokenizerFast
  hf = RobertaTokenizerFast(
      tokenizer_object=train_synthetic_bpe(), bos_token="<s>", eos_token="</s>",
      sep_token="</s>", cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
      mask_token=AddedToken("<mask>", lstrip=True, rstrip=False), model_max_length=MAX_LENGTH)
  hf.save_pretrained(directory)


def load_tokenizer(model_name_or_dir: str):
  """A fast ``transformers`` tokenizer for a model.

  Args:
    model_name_or_dir: a built-in model name (``tiny``, ``embedded``, ``tiny-random``,
      ``tiny-bert-random``: the synthetic BPE), a local
      directory with a Hugging Face tokenizer, or a hub id (through
      ``tvgeo_jax.hub.snapshot``, so offline it fails fast with a clear message).
  """
  from transformers import AutoTokenizer
  name = str(model_name_or_dir)
  if name in SYNTHETIC_NAMES:
    path = synthetic_tokenizer_dir()
  elif os.path.isdir(name):
    path = name
  else:
    if os.path.sep in name.strip("/").replace("/", "", 1) or name.startswith((".", "/")):
      raise FileNotFoundError(f"No such model directory: {name!r}; pass an existing "
                              f"directory, a hub id, or one of {SYNTHETIC_NAMES}.")
    path = hub.snapshot(name, kind="model", allow_patterns=[
        "*.json", "*.txt", "*.model", "vocab.*", "merges.txt"])
  tok = AutoTokenizer.from_pretrained(path)
  if not getattr(tok, "is_fast", False):
    raise ValueError(f"The tokenizer at {path!r} is not a fast tokenizer; tvgeo_jax needs one "
                     "(a tokenizer.json, or vocab files transformers can convert).")
  return tok
