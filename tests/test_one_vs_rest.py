"""``python -m experiments.one_vs_rest`` end to end on the tiny base and synth_authorship
(one epoch, a few dozen examples), plus the binary combination rule and the derived
binary data on hand-made inputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import numpy as np
from sklearn import metrics as skm

from tvgeo_jax.studies import one_vs_rest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(tempfile.gettempdir(), "tvgeo_jax_test_xla_cache")
WRITERS = ["chatgpt", "davinci", "cohere", "human"]


class CombinationRuleTest(absltest.TestCase):

  def test_highest_probability_above_half_else_reference(self):
    p = np.array([[0.90, 0.20, 0.10],   # chatgpt clearly
                  [0.40, 0.30, 0.20],   # none above 0.5 -> reference
                  [0.60, 0.70, 0.10],   # two above 0.5 -> the highest
                  [0.50, 0.50, 0.50],   # exactly 0.5 does not exceed -> reference
                  [0.20, 0.51, 0.90],   # cohere
                  [0.80, 0.80, 0.10]])  # tie -> the first column
    np.testing.assert_array_equal(one_vs_rest.combine_one_vs_rest(p, [0, 1, 2], 3),
                                  [0, 3, 1, 3, 2, 0])
    # Reference in the middle of the class ids: columns are classes 0, 2, 3.
    np.testing.assert_array_equal(one_vs_rest.combine_one_vs_rest(p, [0, 2, 3], 1),
                                  [0, 1, 2, 1, 3, 0])
    with self.assertRaisesRegex(ValueError, r"\[n, 2\]"):
      one_vs_rest.combine_one_vs_rest(p, [0, 1], 3)
    with self.assertRaisesRegex(ValueError, "reference class 1"):
      one_vs_rest.combine_one_vs_rest(p, [0, 1, 2], 1)

  def test_binary_splits_and_reference(self):
    texts = [(f"t{i}",) for i in range(8)]
    labels = np.array([0, 1, 2, 3, 3, 2, 1, 0])
    raw = {s: (texts, labels) for s in ("train", "validation", "test")}
    out = one_vs_rest.binary_splits(raw, positive=2, reference=3)
    t, y = out["test"]
    self.assertEqual(t, [("t2",), ("t3",), ("t4",), ("t5",)])
    np.testing.assert_array_equal(y, [1, 0, 0, 1])
    self.assertEqual(one_vs_rest.reference_index(WRITERS, None), 3)
    self.assertEqual(one_vs_rest.reference_index(WRITERS, "davinci"), 1)
    self.assertEqual(one_vs_rest.reference_index(WRITERS, "0"), 0)
    with self.assertRaisesRegex(ValueError, "--reference"):
      one_vs_rest.reference_index(["a", "b", "c", "d"], None)


class OneVsRestCliTest(absltest.TestCase):

  def test_trains_every_model_and_reports_all_approaches(self):
    out = os.path.join(tempfile.mkdtemp(), "ovr")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "experiments.one_vs_rest", "--task=synth_authorship",
           "--model=tiny-random", f"--out={out}", "--epochs=1", "--data_scale=0.05",
           "--max_seq_len=32", "--batch_size=64", "--eval_batch_size=64", "--progress=false",
           f"--compilation_cache={CACHE}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn("| binary_lora | human |", proc.stdout)
    for name in ("one_vs_rest.json", "one_vs_rest.md", "predictions.npz",
                 "confusion_matrices.png", "full/results.json", "lora/results.json",
                 "binary_chatgpt/results.json", "binary_davinci/results.json",
                 "binary_cohere/results.json"):
      self.assertTrue(os.path.exists(os.path.join(out, name)), name)
    with open(os.path.join(out, "confusion_matrices.png"), "rb") as f:
      self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

    res = json.load(open(os.path.join(out, "one_vs_rest.json")))
    self.assertEqual(res["label_names"], WRITERS)
    self.assertEqual(res["reference"], "human")
    self.assertEqual(res["binary_classes"], ["chatgpt", "davinci", "cohere"])
    self.assertIn("exceeds 0.5, else the reference class", res["combination_rule"])
    pred = np.load(os.path.join(out, "predictions.npz"))
    y = pred["labels"]
    self.assertLen(y, res["num_test_examples"])
    self.assertEqual(sorted(set(y.tolist())), [0, 1, 2, 3])  # the full 4-class test set

    # The binary predictions follow the rule on the saved probabilities (numpy loop).
    probs = pred["binary_probabilities"]
    self.assertEqual(probs.shape, (len(y), 3))
    self.assertTrue(np.all((probs >= 0) & (probs <= 1)))
    expected = [[0, 1, 2][int(np.argmax(r))] if r.max() > 0.5 else 3 for r in probs]
    np.testing.assert_array_equal(pred["pred_binary_lora"], expected)

    for name, r in res["approaches"].items():
      p = pred[f"pred_{name}"]
      prec, rec, f1, sup = skm.precision_recall_fscore_support(
          y, p, labels=[0, 1, 2, 3], zero_division=0)
      for k, c in enumerate(WRITERS):
        got = r["per_class"][c]
        self.assertAlmostEqual(got["precision"], prec[k], places=12)
        self.assertAlmostEqual(got["recall"], rec[k], places=12)
        self.assertAlmostEqual(got["f1-score"], f1[k], places=12)
        self.assertEqual(got["support"], sup[k])
      self.assertAlmostEqual(r["accuracy"], skm.accuracy_score(y, p), places=12)
      np.testing.assert_allclose(r["confusion_matrix_normalized"],
                                 skm.confusion_matrix(y, p, labels=[0, 1, 2, 3],
                                                      normalize="true"), atol=1e-12)
      self.assertGreater(r["training_time_s"], 0)
      runs_of = r["runs"]
      self.assertEqual(r["optimizer_steps"], sum(
          json.load(open(os.path.join(d, "results.json")))["steps"] for d in runs_of))

    # Parameter shares: one full model trains everything; three binary LoRA models
    # train three times one binary model's parameters.
    full, lora, binary = (res["approaches"][k] for k in ("full", "lora", "binary_lora"))
    self.assertEqual(full["trainable_share"], 1.0)
    self.assertLess(lora["trainable_parameters"], full["trainable_parameters"])
    b_runs = [json.load(open(os.path.join(out, f"binary_{c}", "results.json")))
              for c in ("chatgpt", "davinci", "cohere")]
    self.assertEqual(binary["trainable_parameters"],
                     sum(b["parameters"]["trainable"] for b in b_runs))
    self.assertEqual(binary["num_models"], 3)
    # Each binary model was trained and tested on its two classes only.
    for k, b in enumerate(b_runs):
      self.assertEqual(b["model_config"]["num_labels"] if "num_labels" in b["model_config"]
                       else len(b["model_config"]["id2label"]), 2)
      self.assertEqual(b["metrics"]["test"]["num_examples"],
                       int(np.sum((y == k) | (y == 3))))
    md = open(os.path.join(out, "one_vs_rest.md")).read()
    self.assertIn("| approach | class | precision | recall | F1 | support |", md)


if __name__ == "__main__":
  absltest.main()
