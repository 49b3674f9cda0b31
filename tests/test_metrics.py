"""Tests for tvgeo_jax.core.metrics against scikit-learn / scipy computed independently here."""
import json

import numpy as np
import scipy.stats
from absl.testing import absltest, parameterized
from sklearn import metrics as skm

from tvgeo_jax.core import metrics


def _logits(rng, labels, k, flip=0.3):
  """Noisy logits whose argmax is the label except for a ``flip`` share of rows."""
  n = labels.shape[0]
  pred = np.where(rng.rand(n) < flip, rng.randint(0, k, n), labels)
  logits = rng.randn(n, k).astype(np.float32)
  logits[np.arange(n), pred] += 5.0
  return logits, pred


class MetricsTest(parameterized.TestCase):

  def test_binary_f1_accuracy_and_mcc(self):
    rng = np.random.RandomState(0)
    y = rng.randint(0, 2, 200)
    logits, pred = _logits(rng, y, 2)
    out = metrics.compute_metrics(["f1", "accuracy", "mcc"], logits, y)
    self.assertAlmostEqual(out["f1"], skm.f1_score(y, pred), places=12)
    self.assertAlmostEqual(out["accuracy"], np.mean(y == pred), places=12)
    self.assertAlmostEqual(out["mcc"], skm.matthews_corrcoef(y, pred), places=12)
    self.assertEqual(out["main_metric"], "f1")
    self.assertEqual(out["main"], out["f1"])
    # Positive-class F1 differs from the negative-class/macro ones on unbalanced data.
    y2 = np.r_[np.ones(30, int), np.zeros(170, int)]
    p2 = np.r_[np.ones(20, int), np.zeros(10, int), np.ones(20, int), np.zeros(150, int)]
    f1 = metrics.compute_metrics(["f1"], p2, y2)["f1"]
    self.assertAlmostEqual(f1, 2 * 20 / (2 * 20 + 20 + 10), places=12)
    self.assertNotAlmostEqual(f1, skm.f1_score(y2, p2, average="macro"), places=3)

  def test_main_metric_argument(self):
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0, 1, 0, 0, 1])
    out = metrics.compute_metrics(["f1", "accuracy"], p, y, main="accuracy")
    self.assertEqual(out["main"], 0.8)
    with self.assertRaisesRegex(ValueError, "main metric"):
      metrics.compute_metrics(["f1"], p, y, main="mcc")

  def test_padding_rows_with_weight_zero_are_ignored(self):
    rng = np.random.RandomState(1)
    y = rng.randint(0, 3, 50)
    logits, pred = _logits(rng, y, 3)
    # Padding rows: garbage labels/logits that would change every score if counted.
    y_pad = np.r_[y, np.zeros(14, int)]
    logits_pad = np.r_[logits, np.tile([[0, 0, 9.0]], (14, 1)).astype(np.float32)]
    w = np.r_[np.ones(50), np.zeros(14)].astype(np.float32)
    names = ["a", "b", "c"]
    got = metrics.compute_metrics(["accuracy", "mcc", "f1"], logits_pad, y_pad, weights=w,
                                  label_names=names)
    ref = metrics.compute_metrics(["accuracy", "mcc", "f1"], logits, y, label_names=names)
    self.assertEqual(got, ref)
    self.assertEqual(got["num_scored"], 50)
    self.assertAlmostEqual(got["accuracy"], skm.accuracy_score(y, pred), places=12)
    self.assertNotAlmostEqual(metrics.compute_metrics(["accuracy"], logits_pad, y_pad)
                              ["accuracy"], got["accuracy"], places=3)
    with self.assertRaisesRegex(ValueError, "0 \\(padding"):
      metrics.compute_metrics(["accuracy"], logits, y, weights=np.full(50, 0.5))

  def test_multiclass_per_class_report_and_confusion_matrices(self):
    rng = np.random.RandomState(2)
    names = ["chatgpt", "davinci", "cohere", "human"]
    y = rng.randint(0, 4, 300)
    logits, pred = _logits(rng, y, 4, flip=0.4)
    out = metrics.compute_metrics(["accuracy", "f1"], logits, y, label_names=names)
    self.assertAlmostEqual(out["f1"], skm.f1_score(y, pred, average="macro"), places=12)
    prec, rec, f1, sup = skm.precision_recall_fscore_support(y, pred, labels=[0, 1, 2, 3])
    for i, n in enumerate(names):
      self.assertAlmostEqual(out["per_class"][n]["precision"], prec[i], places=12)
      self.assertAlmostEqual(out["per_class"][n]["recall"], rec[i], places=12)
      self.assertAlmostEqual(out["per_class"][n]["f1-score"], f1[i], places=12)
      self.assertEqual(out["per_class"][n]["support"], sup[i])
    cm = np.zeros((4, 4), int)
    for t, p in zip(y, pred):
      cm[t, p] += 1
    np.testing.assert_array_equal(out["confusion_matrix"], cm)
    np.testing.assert_allclose(out["confusion_matrix_normalized"],
                               cm / cm.sum(1, keepdims=True), atol=1e-15)
    json.dumps(out)  # JSON-ready

  def test_classification_report_dict_and_absent_classes(self):
    y = np.array([0, 0, 1, 1, 0])
    p = np.array([0, 1, 1, 1, 0])
    rep = metrics.classification_report_dict(p, y, label_names=["neg", "pos", "other"])
    ref = skm.classification_report(y, p, labels=[0, 1, 2], output_dict=True,
                                    zero_division=0)
    self.assertAlmostEqual(rep["pos"]["precision"], ref["1"]["precision"], places=12)
    self.assertAlmostEqual(rep["macro avg"]["f1-score"], ref["macro avg"]["f1-score"],
                           places=12)
    self.assertEqual(rep["other"]["support"], 0)
    self.assertEqual(rep["confusion_matrix_normalized"][2], [0.0, 0.0, 0.0])
    self.assertAlmostEqual(rep["accuracy"], 0.8, places=12)

  def test_regression_pearson_and_spearman(self):
    rng = np.random.RandomState(3)
    y = rng.rand(80) * 5
    p = y + rng.randn(80)
    w = np.r_[np.ones(70), np.zeros(10)]
    out = metrics.compute_metrics(["pearson", "spearman"], p[:, None], y, weights=w)
    self.assertAlmostEqual(out["pearson"], scipy.stats.pearsonr(p[:70], y[:70])[0], places=12)
    self.assertAlmostEqual(out["spearman"], scipy.stats.spearmanr(p[:70], y[:70])[0],
                           places=12)
    self.assertEqual(out["main_metric"], "pearson")
    self.assertNotIn("confusion_matrix", out)
    self.assertTrue(np.isnan(metrics.compute_metrics(["pearson"], np.ones(5), y[:5])["main"]))

  @parameterized.named_parameters(
      ("unknown", ["bleu"], "Unknown metric"),
      ("mixed", ["accuracy", "pearson"], "Cannot mix"),
      ("empty", [], "No metric"))
  def test_bad_metric_names(self, names, msg):
    with self.assertRaisesRegex(ValueError, msg):
      metrics.compute_metrics(names, np.zeros(3), np.zeros(3))

  def test_bad_shapes(self):
    with self.assertRaisesRegex(ValueError, "predictions but"):
      metrics.compute_metrics(["accuracy"], np.zeros(3), np.zeros(4))
    with self.assertRaisesRegex(ValueError, "integer class ids"):
      metrics.compute_metrics(["accuracy"], np.array([0.5, 1.0]), np.zeros(2))
    with self.assertRaisesRegex(ValueError, "all weights are 0"):
      metrics.compute_metrics(["accuracy"], np.zeros(2), np.zeros(2), weights=np.zeros(2))
    with self.assertRaisesRegex(ValueError, "outside"):
      metrics.compute_metrics(["accuracy"], np.zeros((2, 2)), np.array([0, 2]))


if __name__ == "__main__":
  absltest.main()
