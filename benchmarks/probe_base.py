r"""Does a base carry the features the synthetic suite needs? (issue 19's acceptance check)

  python -m benchmarks.probe_base --model=embedded
  python -m benchmarks.probe_base --model=/path/to/hf_dir

Prints, for the word embeddings of the suite's two polarity lexicons
(``synthetic.POS_ADJ`` / ``NEG_ADJ``): the mean cosine similarity within a polarity and
across, and a leave-one-out nearest-centroid classification of polarity (chance 10/20);
the same test for adjectives against nouns as a control. Sentiment is learnable by LoRA
(which cannot change embeddings) only if the polarity test is clearly above chance
(BUILD_NOTES, issue 19, session 7).
"""
from __future__ import annotations

from absl import app, flags
import numpy as np

from experiments import cli
from tvgeo_jax import data, pretraining
from tvgeo_jax.data import synthetic

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "embedded", "Base model: a built-in name or a directory.")


def word_vectors(embeddings: np.ndarray, tokenizer, words):
  """Mean embedding of each word's tokens as it appears mid-sentence (leading space)."""
  return np.stack([embeddings[tokenizer(" " + w, add_special_tokens=False)["input_ids"]]
                   .mean(0) for w in words])


def nearest_centroid_loo(x: np.ndarray, y: np.ndarray) -> int:
  """Leave-one-out nearest-centroid: how many rows land nearer their own class's centroid."""
  right = 0
  for i in range(len(x)):
    keep = np.arange(len(x)) != i
    centroids = {c: x[keep & (y == c)].mean(0) for c in np.unique(y)}
    guess = min(centroids, key=lambda c: np.linalg.norm(x[i] - centroids[c]))
    right += int(guess == y[i])
  return right


def mean_cosine(a: np.ndarray, b: np.ndarray, same: bool) -> float:
  an = a / np.linalg.norm(a, axis=1, keepdims=True)
  bn = b / np.linalg.norm(b, axis=1, keepdims=True)
  c = an @ bn.T
  return float(c[np.triu_indices(len(a), 1)].mean() if same else c.mean())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  _, params = pretraining.load_model(FLAGS.model, head="mlm")
  emb = np.asarray(params["embeddings"]["word_embeddings"]["embedding"])
  tok = data.load_tokenizer(pretraining.model_dir(FLAGS.model))
  pos, neg = word_vectors(emb, tok, synthetic.POS_ADJ), word_vectors(emb, tok, synthetic.NEG_ADJ)
  nouns = word_vectors(emb, tok, [n.split()[-1] for n in synthetic.SST_NOUNS][:len(pos)])
  within = (mean_cosine(pos, pos, True) + mean_cosine(neg, neg, True)) / 2
  x = np.concatenate([pos, neg])
  y = np.array([1] * len(pos) + [0] * len(neg))
  print(f"{FLAGS.model}: polarity: cosine within {within:.3f}, across "
        f"{mean_cosine(pos, neg, False):.3f}; leave-one-out nearest centroid "
        f"{nearest_centroid_loo(x, y)}/{len(x)} (chance {len(x) // 2})")
  xa = np.concatenate([pos, nouns])
  ya = np.array([1] * len(pos) + [0] * len(nouns))
  print(f"{FLAGS.model}: control, adjectives vs nouns: nearest centroid "
        f"{nearest_centroid_loo(xa, ya)}/{len(xa)}")


if __name__ == "__main__":
  cli.run(main)
