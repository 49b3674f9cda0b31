"""MLM masking, loss, unigram baseline, and a short embedded-base pretraining run."""
import tempfile

from absl.testing import absltest
import jax
import numpy as np
import transformers
import torch

from tvgeo_jax.pretraining import embedded, mlm
from tvgeo_jax import data, models
from tvgeo_jax.data import synthetic


class MaskingTest(absltest.TestCase):

  def test_masks_only_real_non_special_tokens_fixed_count(self):
    rng = np.random.RandomState(0)
    ids = rng.randint(5, 100, size=(64, 40)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 0, 2
    att = np.ones_like(ids)
    att[:3, 30:] = 0
    ids[:3, 30:] = 1
    masked, pos, targets, w = mlm.mask_tokens(
        jax.random.PRNGKey(0), ids, att, mask_token_id=4, vocab_size=100,
        special_ids=(0, 1, 2, 3, 4), mask_prob=0.15)
    masked, pos, targets, w = map(np.asarray, (masked, pos, targets, w))
    self.assertEqual(pos.shape, (64, 6))  # ceil(0.15 * 40)
    np.testing.assert_array_equal(targets, np.take_along_axis(ids, pos, 1))
    self.assertTrue(np.all(w == 1))
    self.assertTrue(np.all((pos > 0) & (pos < 39)))
    self.assertTrue(np.all(pos[:3] < 30))
    for row in range(64):  # positions are distinct within a row
      self.assertLen(set(pos[row]), 6)
    changed = masked != ids
    self.assertTrue(np.all(np.take_along_axis(changed, pos, 1) | (targets == np.take_along_axis(masked, pos, 1))))
    outside = np.ones_like(changed)
    np.put_along_axis(outside, pos, False, 1)
    self.assertFalse(np.any(changed & outside))
    share_mask = np.mean(np.take_along_axis(masked, pos, 1) == 4)
    self.assertAlmostEqual(share_mask, 0.8, delta=0.05)

  def test_loss_equals_torch_cross_entropy(self):
    rng = np.random.RandomState(1)
    logits = rng.randn(3, 5, 11).astype(np.float32)
    targets = rng.randint(0, 11, size=(3, 5))
    w = (rng.rand(3, 5) > 0.3).astype(np.float32)
    ours = float(mlm.mlm_loss(logits, targets, w))
    ref = torch.nn.functional.cross_entropy(
        torch.tensor(logits[w > 0]), torch.tensor(targets[w > 0]))
    self.assertAlmostEqual(ours, float(ref), places=5)

  def test_unigram_baseline_is_entropy(self):
    rows = [np.array([0, 5, 5, 6, 2]), np.array([0, 7, 2])]
    p = np.array([2, 1, 1]) / 4
    self.assertAlmostEqual(mlm.unigram_baseline(rows, (0, 1, 2)), float(-(p * np.log(p)).sum()))

  def test_pack_corpus(self):
    blocks = embedded.pack_corpus([[0, 5, 2], [0, 6, 7, 2], [0, 9, 2]], 4)
    np.testing.assert_array_equal(blocks, [[0, 5, 2, 0], [6, 7, 2, 0]])

  def test_pack_aligned_starts_every_block_at_a_text(self):
    rows = [[0, 5, 2], [0, 6, 7, 2], [0, 9, 2], [0, 8, 8, 8, 2]]
    blocks = embedded.pack_aligned(rows, 4)
    np.testing.assert_array_equal(blocks, [[0, 5, 2, 0], [0, 9, 2, 0]])

  def test_cls_bag_targets_draw_distinct_content_tokens(self):
    ids = np.array([[0, 11, 12, 13, 2, 0, 14, 2], [0, 21, 2, 1, 1, 1, 1, 1]], np.int32)
    targets, w = map(np.asarray, embedded.cls_bag_targets(jax.random.PRNGKey(3), ids, 3,
                                                          embedded.SPECIAL_IDS))
    self.assertEqual(targets.shape, (2, 3))
    self.assertLen(set(targets[0]), 3)
    self.assertTrue(set(targets[0]) <= {11, 12, 13, 14})
    np.testing.assert_array_equal(w, [[1, 1, 1], [1, 0, 0]])
    self.assertEqual(targets[1][w[1] > 0].tolist(), [21])


  def test_word_ids_join_a_words_two_spellings(self):
    from tvgeo_jax import data
    tok = data.load_tokenizer("tiny")
    words = embedded.word_ids(tok)
    vocab = tok.get_vocab()
    self.assertEqual(words[vocab["anna"]], vocab["Ġanna"])
    self.assertEqual(words[vocab["Ġanna"]], vocab["Ġanna"])
    self.assertNotEqual(words[vocab["anna"]], words[vocab["kim"]])

  def test_pair_novelty_targets_name_the_words_new_in_each_text(self):
    from tvgeo_jax import data
    tok = data.load_tokenizer("tiny")
    ids = np.asarray(tok(["the nurse is awake at the park .", "anna is here ."],
                         ["the nurse is asleep .", "anna is here ."], padding="max_length",
                         max_length=24)["input_ids"], np.int32)
    words = np.asarray(embedded.word_ids(tok))
    new_b, w_b, new_a, w_a, sep = map(np.asarray, embedded.pair_novelty_targets(
        jax.random.PRNGKey(0), ids, 3, embedded.SPECIAL_IDS, words))
    names = lambda row, w: sorted(tok.convert_ids_to_tokens(row[w > 0].tolist()))
    self.assertEqual(names(new_b[0], w_b[0]), ["Ġasleep"])
    # "the" opens b and occurs inside a: one word in two spellings, so not new.
    self.assertEqual(names(new_a[0], w_a[0]), ["Ġat", "Ġawake", "Ġpark"])
    # Nothing new: </s> is the one target.
    self.assertEqual(names(new_b[1], w_b[1]), ["</s>"])
    self.assertEqual(names(new_a[1], w_a[1]), ["</s>"])
    np.testing.assert_array_equal(sep, [list(ids[0]).index(2), list(ids[1]).index(2)])


class EmbeddedBaseTest(absltest.TestCase):

  def test_short_pretraining_is_reproducible(self):
    cfg = embedded.PretrainConfig(steps=4, batch_size=8, seq_len=16, long_every=0,
                                  corpus_scale=0.05, eval_blocks=16, cls_targets=4)
    config = embedded.embedded_config().replace(num_hidden_layers=1)
    runs = [embedded.pretrain(cfg, config=config, progress=False) for _ in range(2)]
    for a, b in zip(jax.tree.leaves(runs[0][1]), jax.tree.leaves(runs[1][1])):
      np.testing.assert_array_equal(a, b)
    self.assertEqual(runs[0][2]["mlm_loss_final"], runs[1][2]["mlm_loss_final"])
    with tempfile.TemporaryDirectory() as d:  # the saved base re-evaluates to its record
      embedded.save(d, *runs[0])
      self.assertAlmostEqual(embedded.evaluate_base(d), runs[0][2]["mlm_loss_final"], places=4)

  def test_word_init_std_rescales_the_initial_word_embeddings_only(self):
    config = embedded.embedded_config().replace(num_hidden_layers=1)
    plain = embedded.initial_params(config, embedded.PretrainConfig())
    wide = embedded.initial_params(config, embedded.PretrainConfig(word_init_std=0.1))
    emb = lambda p: np.asarray(p["embeddings"]["word_embeddings"]["embedding"])
    self.assertAlmostEqual(float(emb(plain).std()), 0.02, places=3)
    self.assertAlmostEqual(float(emb(wide).std()), 0.1, places=5)
    np.testing.assert_allclose(emb(wide), emb(plain) * (0.1 / emb(plain).std()), rtol=1e-6)
    wide["embeddings"]["word_embeddings"]["embedding"] = emb(plain)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(wide)):
      np.testing.assert_array_equal(a, b)

  def test_polar_reviews_join_the_training_texts_only(self):
    base = embedded.PretrainConfig(corpus_scale=0.05, polar_reviews=0)
    train, held = embedded._corpus_rows(base)
    train_p, held_p = embedded._training_rows(embedded.PretrainConfig(corpus_scale=0.05,
                                                                      polar_reviews=1000))
    self.assertEqual([list(r) for r in held_p], [list(r) for r in held])  # same held-out
    self.assertLen(train_p, len(train) + 50)
    tok = data.load_tokenizer("tiny")
    extra = tok(synthetic.polar_reviews(50, seed=embedded.CORPUS_SEED),
                add_special_tokens=True)["input_ids"]
    self.assertCountEqual([tuple(r) for r in train_p],
                          [tuple(r) for r in train] + [tuple(r) for r in extra])

  def test_short_pretraining_learns_and_saves_a_transformers_checkpoint(self):
    cfg = embedded.PretrainConfig(steps=40, batch_size=16, seq_len=32, long_seq_len=64,
                                  long_every=0, corpus_scale=0.1, eval_blocks=32)
    config = embedded.embedded_config().replace(num_hidden_layers=1)
    config, params, report = embedded.pretrain(cfg, config=config, progress=False)
    self.assertLess(report["mlm_loss_final"], report["mlm_loss_initial"] - 1.0)
    with tempfile.TemporaryDirectory() as d:
      embedded.save(d, config, params, report)
      self.assertTrue(embedded.is_built(d))
      hf = transformers.AutoModelForMaskedLM.from_pretrained(d).eval()
      tok = transformers.AutoTokenizer.from_pretrained(d)
      enc = tok(["the old bridge feels too crowded."], return_tensors="np")
      with torch.no_grad():
        ref = hf(**{k: torch.tensor(v) for k, v in enc.items()}).logits.numpy()
      cfg2, p2 = models.load_pretrained(d, head="mlm")
      ours = models.apply(p2, dict(enc), config=cfg2, head="mlm")["logits"]
      np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-4)
      # Used as a base for classification, the MLM head is dropped and a head initialised.
      _, cls = models.load_pretrained(d, num_labels=3)
      self.assertEqual(cls["classifier"]["out_proj"]["kernel"].shape, (64, 3))


if __name__ == "__main__":
  absltest.main()
