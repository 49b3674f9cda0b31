"""The synthetic BPE tokenizer and the batch pipeline (buckets, shuffling, exact-once eval)."""
import json
import os
import shutil
import tempfile

import numpy as np
from absl.testing import absltest, parameterized

_CACHE = tempfile.mkdtemp(prefix="tvgeo-test-cache-")
os.environ["TVGEO_CACHE"] = _CACHE

from tvgeo_jax import data  # noqa: E402  (after TVGEO_CACHE is set)
from tvgeo_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from tvgeo_jax.models import tiny_config  # noqa: E402


def tearDownModule():
  shutil.rmtree(_CACHE, ignore_errors=True)


class TokenizerTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tok = data.load_tokenizer("tiny")

  def test_cached_in_hf_format_and_loadable_by_autotokenizer(self):
    from transformers import AutoTokenizer
    path = tokenizer_lib.synthetic_tokenizer_dir()
    self.assertTrue(path.startswith(_CACHE))
    self.assertTrue(os.path.exists(os.path.join(path, "tokenizer.json")))
    auto = AutoTokenizer.from_pretrained(path)
    self.assertTrue(auto.is_fast)
    self.assertEqual([auto.convert_tokens_to_ids(t) for t in
                      ("<s>", "<pad>", "</s>", "<unk>", "<mask>")], [0, 1, 2, 3, 4])
    self.assertEqual(auto.pad_token_id, tiny_config().pad_token_id)
    self.assertLessEqual(len(auto), data.VOCAB_SIZE)
    self.assertEqual(data.VOCAB_SIZE, tiny_config().vocab_size)
    # A directory path goes through the same loader.
    self.assertEqual(data.load_tokenizer(path).get_vocab(), auto.get_vocab())

  def test_round_trip(self):
    texts = [t for name in ("synth_imdb", "synth_qqp", "synth_cola")
             for pair in data.load_task_data(name)["test"].texts[:50] for t in pair]
    texts += ["Unseen Words, CAPITALS & ünïcödé — 123!", "  two  spaces "]
    for t in texts:
      ids = self.tok(t, add_special_tokens=False)["input_ids"]
      self.assertEqual(self.tok.decode(ids), t)
    self.assertNotIn(self.tok.unk_token_id, self.tok(texts[-2])["input_ids"])  # byte-level

  def test_pairs_encoded_like_roberta(self):
    a, b = "the doctor is asleep.", "someone is awake."
    ids = self.tok(a, b)["input_ids"]
    ia = self.tok(a, add_special_tokens=False)["input_ids"]
    ib = self.tok(b, add_special_tokens=False)["input_ids"]
    self.assertEqual(ids, [0] + ia + [2, 2] + ib + [2])
    # Synthetic words are single tokens after the first merge steps.
    self.assertLen(self.tok(" doctor", add_special_tokens=False)["input_ids"], 1)

  def test_training_is_deterministic(self):
    first = json.loads(tokenizer_lib.train_synthetic_bpe().to_str())
    with open(os.path.join(tokenizer_lib.synthetic_tokenizer_dir(), "tokenizer.json")) as f:
      saved = json.load(f)
    self.assertEqual(first["model"]["vocab"], saved["model"]["vocab"])
    self.assertEqual(first["model"]["merges"], saved["model"]["merges"])

  def test_bad_name(self):
    # Issue 17: a missing model directory is named as such (it said "Tokenizer path").
    with self.assertRaisesRegex(FileNotFoundError, "No such model directory: '/no/such/dir'"):
      data.load_tokenizer("/no/such/dir")


def _encoded(n=53, max_length=64, pair=True, seed=0):
  rng = np.random.default_rng(seed)
  words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
  texts = [tuple(" ".join(rng.choice(words, rng.integers(1, 40))) for _ in range(1 + pair))
           for _ in range(n)]
  labels = rng.integers(0, 3, n)
  return texts, labels, data.encode(data.load_tokenizer("tiny"), texts, labels, max_length)


class PipelineTest(parameterized.TestCase):

  def test_encode_truncates_and_matches_tokenizer(self):
    tok = data.load_tokenizer("tiny")
    texts, labels, enc = _encoded(max_length=32)
    self.assertEqual(enc.labels.dtype, np.int32)
    self.assertLessEqual(enc.lengths.max(), 32)
    self.assertEqual(enc.lengths.max(), 32)  # some rows needed truncation
    for i in range(len(texts)):
      ref = tok(*texts[i], truncation="longest_first", max_length=32)["input_ids"]
      self.assertEqual(enc.input_ids[i].tolist(), ref)
    reg = data.encode(tok, texts[:4], np.array([0.5, 1, 2, 3.25]), 32)
    self.assertEqual(reg.labels.dtype, np.float32)
    with self.assertRaisesRegex(ValueError, "model_max_length"):
      data.encode(tok, texts, labels, 1024)
    with self.assertRaisesRegex(ValueError, "labels"):
      data.encode(tok, texts, labels[:-1], 32)

  def test_bucket_lengths(self):
    self.assertEqual(data.bucket_lengths(128), (16, 32, 64, 128))
    self.assertEqual(data.bucket_lengths(100), (16, 32, 64, 100))
    self.assertEqual(data.bucket_lengths(8), (8,))

  @parameterized.parameters(1, 7, 32)
  def test_every_example_evaluated_exactly_once(self, batch_size):
    texts, labels, enc = _encoded()
    batches = data.Batches(enc, batch_size)
    self.assertLen(batches, -(-len(texts) // batch_size))
    seen = []
    for b in batches:
      self.assertEqual(set(b), {"input_ids", "attention_mask", "token_type_ids", "labels",
                                "weights"})
      self.assertEqual(b["input_ids"].shape[0], batch_size)
      for k in ("input_ids", "attention_mask", "token_type_ids"):
        self.assertEqual(b[k].dtype, np.int32)
      self.assertEqual(b["weights"].dtype, np.float32)
      t = b["input_ids"].shape[1]
      self.assertIn(t, batches.buckets)
      longest = int(b["attention_mask"].sum(1).max())
      self.assertEqual(t, min(x for x in batches.buckets if x >= longest))  # smallest bucket
      for row in range(batch_size):
        n = int(b["attention_mask"][row].sum())
        self.assertTrue((b["input_ids"][row, n:] == 1).all())  # <pad>
        if b["weights"][row] > 0:
          seen.append((tuple(b["input_ids"][row, :n]), int(b["labels"][row])))
    expected = [(tuple(x.tolist()), int(y)) for x, y in zip(enc.input_ids, labels)]
    self.assertEqual(seen, expected)   # unshuffled: every example once, in order
    total_weight = sum(float(b["weights"].sum()) for b in batches)
    self.assertEqual(total_weight, len(texts))

  def test_shuffling_per_epoch(self):
    _, _, enc = _encoded()
    first = lambda b, e: np.concatenate([x["labels"] for x in b.epoch(e)])
    rows = lambda b, e: [tuple(x["input_ids"][r][x["attention_mask"][r] == 1])
                         for x in b.epoch(e) for r in range(len(x["labels"]))
                         if x["weights"][r] > 0]
    a = data.Batches(enc, 8, shuffle=True, seed=3)
    b = data.Batches(enc, 8, shuffle=True, seed=3)
    c = data.Batches(enc, 8, shuffle=True, seed=4)
    np.testing.assert_array_equal(first(a, 0), first(b, 0))
    self.assertEqual(rows(a, 1), rows(b, 1))
    self.assertNotEqual(rows(a, 0), rows(a, 1))
    self.assertNotEqual(rows(a, 0), rows(c, 0))
    self.assertCountEqual(rows(a, 2), [tuple(x) for x in enc.input_ids])
    dropped = data.Batches(enc, 8, shuffle=True, seed=3, drop_remainder=True)
    self.assertLen(dropped, len(enc) // 8)
    self.assertTrue(all(x["weights"].all() for x in dropped.epoch(0)))

  def test_host_slices_tile_the_global_batch(self):
    _, _, enc = _encoded()
    full = list(data.Batches(enc, 12, shuffle=True, seed=1).epoch(2))
    parts = [list(data.Batches(enc, 12, shuffle=True, seed=1, host_index=h, host_count=3)
                  .epoch(2)) for h in range(3)]
    for i, b in enumerate(full):
      for k in b:
        np.testing.assert_array_equal(np.concatenate([p[i][k] for p in parts]), b[k])
    with self.assertRaisesRegex(ValueError, "divisible"):
      data.Batches(enc, 10, host_count=3)
    with self.assertRaisesRegex(ValueError, "host_index"):
      data.Batches(enc, 12, host_index=3, host_count=3)

  def test_single_texts_and_synthetic_task_end_to_end(self):
    d = data.load_task_data("synth_sst2")
    enc = data.encode(data.load_tokenizer("tiny"), *d["test"], max_length=64)
    n = 0
    for b in data.Batches(enc, 32):
      self.assertTrue((b["token_type_ids"] == 0).all())
      self.assertTrue((b["input_ids"][:, 0] == 0).all())  # <s>
      n += int(b["weights"].sum())
    self.assertEqual(n, len(d["test"].texts))


if __name__ == "__main__":
  absltest.main()
