"""The embedded base shipped inside the package: current, loadable, and what it records."""
import os
import tempfile
from unittest import mock

from absl.testing import absltest
import numpy as np

from benchmarks import probe_base

from tvgeo_jax import data, pretraining
from tvgeo_jax.data import synthetic
from tvgeo_jax.training import loop, presets
from tvgeo_jax.pretraining import embedded, probes
from tvgeo_jax.core import io_utils


class ShippedBaseTest(absltest.TestCase):

  def test_shipped_base_is_current_and_used_without_a_rebuilt_one(self):
    self.assertTrue(embedded.shipped_is_current(),
                    "the shipped base is missing or stale: rebuild it with "
                    "python -m experiments.pretrain_mlm --out=tvgeo_jax/assets/embedded_base")
    with tempfile.TemporaryDirectory() as cache, \
        mock.patch.dict(os.environ, {"TVGEO_CACHE": cache}):
      self.assertEqual(embedded.ensure_embedded_base(), embedded.SHIPPED_DIR)
      config, params = pretraining.load_model("embedded", num_labels=2)
      self.assertEqual(config.num_hidden_layers, embedded.embedded_config().num_hidden_layers)
      self.assertEqual(params["classifier"]["out_proj"]["kernel"].shape,
                       (config.hidden_size, 2))
      self.assertFalse(os.listdir(cache) and embedded.is_built(embedded.default_dir()))
    size = sum(os.path.getsize(os.path.join(embedded.SHIPPED_DIR, f))
               for f in os.listdir(embedded.SHIPPED_DIR))
    self.assertLess(size, 5 * 2**20)

  def test_shipped_tokenizer_is_the_suites(self):
    shipped = data.load_tokenizer(embedded.SHIPPED_DIR)
    self.assertEqual(shipped.get_vocab(), data.load_tokenizer("tiny").get_vocab())

  def test_held_out_mlm_loss_matches_the_record(self):
    report = io_utils.read_json(os.path.join(embedded.SHIPPED_DIR, "pretrain.json"))
    self.assertLess(report["mlm_loss_final"], report["unigram_baseline_loss"] - 1.0)
    self.assertAlmostEqual(embedded.evaluate_base(embedded.SHIPPED_DIR),
                           report["mlm_loss_final"], places=4)

  def test_the_shipped_embeddings_separate_the_polarity_lexicons(self):
    """What LoRA (frozen embeddings) needs to learn sentiment (BUILD_NOTES, session 8):
    base v3 scored 11/20 (chance), base v4 20/20; the control (adjectives vs nouns) is
    20/20 on both."""
    _, params = pretraining.load_model(embedded.SHIPPED_DIR, head="mlm")
    emb = np.asarray(params["embeddings"]["word_embeddings"]["embedding"])
    tok = data.load_tokenizer(embedded.SHIPPED_DIR)
    pos = probe_base.word_vectors(emb, tok, synthetic.POS_ADJ)
    neg = probe_base.word_vectors(emb, tok, synthetic.NEG_ADJ)
    x = np.concatenate([pos, neg])
    y = np.array([1] * len(pos) + [0] * len(neg))
    self.assertGreaterEqual(probe_base.nearest_centroid_loo(x, y), 18)
    self.assertGreater(probe_base.mean_cosine(pos, pos, True) - probe_base.mean_cosine(
        pos, neg, False), 0.1)

  def test_the_frozen_base_reads_qnli_and_cross_text_occurrence(self):
    """What benchmarks.probe_pairs measures (BUILD_NOTES, sessions 10-11): on the frozen
    base a linear probe reads synth_qnli's relation (v5: 0.74 at scale 1, chance 0.50) and
    each token's state tells whether its word occurs in the other text beyond what its
    identity alone tells (v5: 0.89 vs 0.75 in the last layer), what
    PretrainConfig.pair_match trains."""
    config, params = pretraining.load_model(embedded.SHIPPED_DIR, head="mlm")
    tok = data.load_tokenizer(embedded.SHIPPED_DIR)
    scores, counts = probes.relation_probe(params, config, tok, "synth_qnli", 1.0, 64)
    self.assertEqual(list(counts), [150, 150])  # chance 0.50
    self.assertGreater(scores["first token"], 0.65)
    layers, identity, base_rate = probes.cross_occurrence_probe(params, config, n_train=1000)
    self.assertLen(layers, config.num_hidden_layers + 1)
    self.assertGreater(identity, base_rate)
    self.assertGreater(layers[-1], identity + 0.1)

  def test_a_pair_task_learns_on_the_shipped_base_in_a_few_dozen_steps(self):
    """synth_qnli, full FT, 80 steps (2 epochs of 40): measured 0.69 test accuracy on
    the v3 base (300 balanced test pairs: chance 0.50, standard error 0.03)."""
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as run_dir, \
        mock.patch.dict(os.environ, {"TVGEO_CACHE": cache}):
      cfg = presets.resolve("synth_qnli", "full", "embedded", overrides=dict(
          epochs=2, patience=0, learning_rate=1e-3, data_scale=1.0, max_seq_len=64,
          progress=False, checkpoint_every=100000))
      res = loop.finetune(cfg, run_dir)
    self.assertEqual(res["metrics"]["test"]["num_examples"], 300)
    self.assertGreater(res["metrics"]["test"]["accuracy"], 0.62)


if __name__ == "__main__":
  absltest.main()
