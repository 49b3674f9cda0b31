"""Bag-of-words baselines: a word list reads word-list labels and not relations."""
import random

import numpy as np
from absl.testing import absltest, parameterized

from tvgeo_jax import data
from tvgeo_jax.data import baselines

_WORDS = "red blue green black white pink gray brown gold teal".split()


def _word_task(n, seed):
  """Single texts; the label is whether 'good' occurs (a word list reads it)."""
  r = random.Random(seed)
  texts, labels = [], []
  for i in range(n):
    y = i % 2
    words = r.sample(_WORDS, 4) + (["good"] if y else ["fine"])
    r.shuffle(words)
    texts.append((" ".join(words),))
    labels.append(y)
  return texts, np.array(labels, np.int32)


def _relation_task(n, seed):
  """Pairs; the label is whether both sides name the same colour (a relation)."""
  r = random.Random(seed)
  texts, labels = [], []
  for i in range(n):
    y = i % 2
    a = r.choice(_WORDS)
    b = a if y else r.choice([w for w in _WORDS if w != a])
    texts.append((f"the car is {a} .", f"the car is {b} ."))
    labels.append(y)
  return texts, np.array(labels, np.int32)


class BagOfWordsTest(parameterized.TestCase):

  def test_docs_tag_pair_sides(self):
    self.assertEqual(baselines.bag_of_words_docs([("Good film.",)]), ["good film ."])
    self.assertEqual(baselines.bag_of_words_docs([("a b", "b")]), ["a:a a:b b:b"])

  def test_reads_a_word_list_but_not_a_relation(self):
    word = baselines.bag_of_words_baseline(
        "synth_sst2", splits={"train": _word_task(400, 0), "test": _word_task(200, 1)})
    self.assertEqual(word["main_metric"], "accuracy")
    self.assertEqual(word["main"], 1.0)
    rel = baselines.bag_of_words_baseline(
        "synth_mrpc", splits={"train": _relation_task(400, 0), "test": _relation_task(200, 1)})
    self.assertEqual(rel["main_metric"], "f1")
    self.assertLess(rel["accuracy"], 0.65)      # a relation: near chance on held-out pairs
    self.assertGreater(rel["train_main"], rel["main"])

  @parameterized.parameters("synth_mnli", "synth_qnli", "synth_mrpc", "synth_rte")
  def test_synthetic_pair_tasks_stay_near_chance(self, name):
    res = baselines.bag_of_words_baseline(name)
    chance = 1.0 / data.get_task(name).num_labels
    self.assertLess(res["accuracy"], chance + 0.1, f"{name}: {res['accuracy']:.3f}")

  def test_sentiment_is_word_order_readable(self):
    uni = baselines.bag_of_words_baseline("synth_yelp")
    bi = baselines.bag_of_words_baseline("synth_yelp", ngram=2)
    self.assertGreater(bi["main"], 0.85)
    self.assertGreater(bi["main"], uni["main"] + 0.05)


if __name__ == "__main__":
  absltest.main()
