"""The synthetic suite: generation, determinism, balance, leakage and shortcut checks."""
import re
import time

import numpy as np
from absl.testing import absltest, parameterized
from scipy import stats
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression

from tvgeo_jax import data
from tvgeo_jax.data import synthetic

SYNTH = data.list_tasks("synthetic")


def _token_docs(texts):
  """One 'document' per example whose words are tagged with their side (a/b) of a pair."""
  out = []
  for t in texts:
    words = []
    for side, s in zip("ab", t):
      ws = re.findall(r"[a-z0-9]+|[^\sa-z0-9]", s.lower())
      words += [f"{side}_{w}" for w in ws] + [f"any_{w}" for w in ws]
    out.append(" ".join(words))
  return out


def _presence(train_texts, test_texts):
  v = CountVectorizer(binary=True, token_pattern=r"\S+", lowercase=False)
  return (v.fit_transform(_token_docs(train_texts)).toarray().astype(np.int64),
          v.transform(_token_docs(test_texts)).toarray().astype(np.int64))


def best_single_token_accuracy(train, test, k):
  """Held-out accuracy of the best 'token present -> class a, else class b' rule (chosen on train)."""
  xtr, xte = _presence(train[0], test[0])
  ytr = np.eye(k, dtype=np.int64)[train[1]]
  present = xtr.T @ ytr                       # [V, k] class counts where the token is present
  absent = ytr.sum(0)[None, :] - present
  acc = (present.max(1) + absent.max(1)) / len(ytr)
  j = int(np.argmax(acc))
  pred = np.where(xte[:, j] == 1, present[j].argmax(), absent[j].argmax())
  return float(np.mean(pred == test[1]))


def _length_features(texts):
  lens = np.array([[len(s.split()) for s in t] for t in texts])
  return np.concatenate([lens, lens.sum(1, keepdims=True)], axis=1)


def best_length_accuracy(train, test, k):
  """Held-out accuracy of a per-length majority vote (best length feature chosen on train)."""
  ftr, fte = _length_features(train[0]), _length_features(test[0])
  best = (-1.0, 0.0)
  fallback = np.bincount(train[1], minlength=k).argmax()
  for col in range(ftr.shape[1]):
    table = {}
    for L, y in zip(ftr[:, col], train[1]):
      table.setdefault(L, np.zeros(k))[y] += 1
    tr_acc = np.mean([table[L].argmax() == y for L, y in zip(ftr[:, col], train[1])])
    te_acc = np.mean([(table[L].argmax() if L in table else fallback) == y
                      for L, y in zip(fte[:, col], test[1])])
    best = max(best, (tr_acc, te_acc))
  return float(best[1])


class SyntheticTest(parameterized.TestCase):

  @parameterized.parameters(*SYNTH)
  def test_generates_fast_deterministic_balanced_no_leak(self, name):
    spec = data.get_task(name)
    start = time.perf_counter()
    a = synthetic.generate(name, seed=0)
    self.assertLess(time.perf_counter() - start, 2.0)
    b = synthetic.generate(name, seed=0)
    c = synthetic.generate(name, seed=1)
    for split in ("train", "test"):
      self.assertEqual(a[split][0], b[split][0])
      np.testing.assert_array_equal(a[split][1], b[split][1])
      self.assertNotEqual(a[split][0], c[split][0])
      texts, labels = a[split]
      self.assertLen(texts, len(labels))
      self.assertTrue(all(len(t) == len(spec.text_fields) for t in texts))
      self.assertTrue(all(isinstance(s, str) and s.strip() for t in texts for s in t))
      if spec.is_regression:
        self.assertEqual(labels.dtype, np.float32)
        self.assertGreaterEqual(labels.min(), 0.0)
        self.assertLessEqual(labels.max(), 5.0)
        counts = np.bincount(np.round(labels).astype(int), minlength=6)
      else:
        self.assertEqual(labels.dtype, np.int32)
        counts = np.bincount(labels, minlength=spec.num_labels)
        self.assertLen(counts, spec.num_labels)
      self.assertEqual(counts.min(), counts.max(), f"{name} {split} unbalanced: {counts}")
    train_keys = {"\t".join(t) for t in a["train"][0]}
    test_keys = {"\t".join(t) for t in a["test"][0]}
    self.assertLen(train_keys, len(a["train"][0]))   # no duplicates inside train
    self.assertEmpty(train_keys & test_keys)           # none shared by train and test

  @parameterized.parameters(*[n for n in SYNTH if n != "synth_stsb"])
  def test_no_single_token_or_length_shortcut(self, name):
    k = data.get_task(name).num_labels
    d = synthetic.generate(name, seed=0, scale=1.5)
    chance = 1.0 / k
    tok = best_single_token_accuracy(d["train"], d["test"], k)
    length = best_length_accuracy(d["train"], d["test"], k)
    self.assertLess(tok, chance + 0.1, f"{name}: single-token baseline {tok:.3f}")
    self.assertLess(length, chance + 0.1, f"{name}: length baseline {length:.3f}")

  def test_stsb_score_not_predicted_by_length_or_one_token(self):
    d = synthetic.generate("synth_stsb", seed=0, scale=1.5)
    (tr_x, tr_y), (te_x, te_y) = d["train"], d["test"]
    for col in range(3):
      rho = stats.spearmanr(_length_features(te_x)[:, col], te_y)[0]
      self.assertLess(abs(rho), 0.15)
    xtr, xte = _presence(tr_x, te_x)
    keep = xtr.std(0) > 0
    corr = np.nan_to_num([abs(np.corrcoef(xtr[:, j], tr_y)[0, 1]) if keep[j] else 0.0
                          for j in range(xtr.shape[1])])
    j = int(np.argmax(corr))
    self.assertLess(abs(stats.pearsonr(xte[:, j], te_y)[0]), 0.25)
    # The score is about content: more shared words, higher score.
    overlap = [len(set(a.split()) & set(b.split())) / len(set(a.split()) | set(b.split()))
               for a, b in te_x]
    self.assertGreater(stats.spearmanr(overlap, te_y)[0], 0.5)

  @parameterized.parameters(("synth_sst2", 0.6), ("synth_yelp", 0.85), ("synth_imdb", 0.8),
                            ("synth_authorship", 0.85))
  def test_label_is_in_word_order(self, name, floor):
    # Bag-of-words cannot read the label, word bigrams can: the label lives in content.
    d = synthetic.generate(name, seed=0)
    scores = []
    for ngram in (1, 2):
      v = CountVectorizer(ngram_range=(1, ngram), token_pattern=r"[a-z]+|[,.?]", binary=True)
      xtr = v.fit_transform([" ".join(t) for t in d["train"][0]])
      xte = v.transform([" ".join(t) for t in d["test"][0]])
      model = LogisticRegression(max_iter=3000).fit(xtr, d["train"][1])
      scores.append(model.score(xte, d["test"][1]))
    k = data.get_task(name).num_labels
    self.assertLess(scores[0], 1.0 / k + 0.3)
    self.assertGreater(scores[1], floor)
    self.assertGreater(scores[1], scores[0] + 0.05)

  @parameterized.parameters("synth_rte", "synth_stsb")
  def test_train_scale_adds_fresh_training_rows_and_keeps_validation_and_test(self, name):
    spec = data.get_task(name)
    one = data.load_task_data(name, seed=3, scale=0.5)
    more = data.load_task_data(name, seed=3, scale=0.5, train_scale=2.5)
    for split in ("validation", "test"):
      self.assertEqual(more[split].texts, one[split].texts)
      np.testing.assert_array_equal(more[split].labels, one[split].labels)
    n = len(one["train"].texts)
    self.assertEqual(more["train"].texts[:n], one["train"].texts)
    extra = more["train"].texts[n:]
    pool = synthetic.sizes(name, 0.5)[0]
    self.assertAlmostEqual(len(extra), 1.5 * pool, delta=spec.num_labels + 6)
    every = [t for s in ("train", "validation", "test") for t in more[s].texts]
    self.assertLen(set(every), len(every))  # the extra rows are new texts
    if not spec.is_regression:
      counts = np.bincount(more["train"].labels[n:], minlength=spec.num_labels)
      self.assertEqual(counts.min(), counts.max())
    with self.assertRaisesRegex(ValueError, "train_scale must be >= 1"):
      synthetic.generate(name, scale=0.5, train_scale=0.5)

  def test_train_scale_is_for_synthetic_tasks(self):
    with self.assertRaisesRegex(ValueError, "synthetic tasks only.*--train_scale"):
      data.load_task_data("rte", data_dir="/nonexistent", train_scale=2)

  def test_sizes_follow_paper_order_and_scale(self):
    train = {t: synthetic.sizes(t)[0] for t in data.SYNTH_PAPER_TASKS}
    order = ["synth_rte", "synth_mrpc", "synth_cola", "synth_imdb", "synth_sst2", "synth_qnli",
             "synth_qqp", "synth_mnli", "synth_snli"]
    self.assertEqual([train[t] for t in order], sorted(train[t] for t in order))
    self.assertEqual(synthetic.sizes("synth_qnli", 0.5)[0], train["synth_qnli"] // 2)
    d = data.load_task_data("synth_rte", scale=0.5)
    self.assertEqual(d.sizes(), {"train": 180, "validation": 20, "test": 100})
    with self.assertRaisesRegex(ValueError, "scale"):
      synthetic.sizes("synth_rte", 0)

  def test_authorship_writers(self):
    spec = data.get_task("synth_authorship")
    self.assertEqual(spec.label_names, ("chatgpt", "davinci", "cohere", "human"))
    self.assertEqual(data.AUTHORSHIP_REFERENCE, "human")
    d = synthetic.generate("synth_authorship")
    texts, labels = d["train"]
    # The human writer is the most varied: most distinct sentence openings.
    def variety(c):
      starts = [s.split()[0] for (t,), y in zip(texts, labels) if y == c
                for s in t.split(". ") if s]
      return len(set(zip(starts, starts[1:])))
    human = spec.label_names.index("human")
    self.assertEqual(max(range(4), key=variety), human)

  def test_sentiment_tasks_share_polarity_vocabulary(self):
    vocab = {}
    for name in ("synth_sst2", "synth_yelp", "synth_imdb"):
      vocab[name] = {w for (t,) in synthetic.generate(name)["train"][0]
                     for w in re.findall(r"[a-z]+", t)}
    shared = vocab["synth_sst2"] & vocab["synth_yelp"] & vocab["synth_imdb"]
    self.assertContainsSubset({"good", "awful", "not", "terrible", "excellent"}, shared)
    mean_len = {n: np.mean([len(t[0].split()) for t in synthetic.generate(n)["test"][0]])
                for n in vocab}
    self.assertLess(mean_len["synth_sst2"], mean_len["synth_yelp"])
    self.assertLess(mean_len["synth_yelp"], mean_len["synth_imdb"])

  def test_pair_corpus_holds_every_pair_task_train_pair_without_labels(self):
    pairs = synthetic.pair_corpus(seed=1000, scale=0.05)
    pair_tasks = [n for n in sorted(synthetic.GENERATORS)
                  if len(synthetic.generate(n, seed=1000, scale=0.05)["train"][0][0]) == 2]
    self.assertIn("synth_snli", pair_tasks)
    self.assertNotIn("synth_sst2", pair_tasks)
    expected = sum(len(synthetic.generate(n, seed=1000, scale=0.05)["train"][0])
                   for n in pair_tasks)
    self.assertLen(pairs, expected)
    self.assertTrue(all(isinstance(a, str) and isinstance(b, str) for a, b in pairs))
    # Other sentences than the fine-tuning tasks' (seed 0).
    snli = set(synthetic.generate("synth_snli", seed=0, scale=0.05)["train"][0])
    self.assertLess(len(snli & set(pairs)), len(snli) // 10 + 1)

  def test_polar_reviews_are_coherent_negation_free_and_in_the_tokenizer(self):
    reviews = synthetic.polar_reviews(400, seed=1000)
    self.assertLen(reviews, 400)
    self.assertEqual(reviews, synthetic.polar_reviews(400, seed=1000))
    pos, neg = set(synthetic.POS_ADJ), set(synthetic.NEG_ADJ)
    n_pos = 0
    for r in reviews:
      words = re.findall(r"[a-z]+", r)
      self.assertFalse({"not", "never", "nobody", "but"} & set(words), r)
      has_pos, has_neg = bool(pos & set(words)), bool(neg & set(words))
      self.assertNotEqual(has_pos, has_neg, r)  # every polarity word of a review agrees
      n_pos += has_pos
    self.assertEqual(n_pos, 200)  # both polarities, equally often
    # Words the suite's tokenizer already has as one token (it is trained on corpus(),
    # which the reviews do not join, so the option leaves it unchanged), but two:
    # "actors" (actor + s) and "our" (Ġ + our).
    vocab = set(data.load_tokenizer("tiny").get_vocab())
    words = {w for r in reviews for w in re.findall(r"[a-z]+", r)}
    self.assertEqual({w for w in words if "Ġ" + w not in vocab}, {"actors", "our"})
    # With negation, a negated clause takes the opposite adjective (the review keeps
    # its polarity).
    negated = synthetic.polar_reviews(200, seed=1000, negation=0.33)
    self.assertTrue(any(re.search(r"\b(not|never|nobody)\b", r) for r in negated))
    # Never a task text.
    sentiment = {t for n in ("synth_sst2", "synth_yelp", "synth_imdb")
                 for (t,) in synthetic.generate(n)["train"][0]}
    self.assertFalse(sentiment & set(reviews))


if __name__ == "__main__":
  absltest.main()
