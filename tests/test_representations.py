"""``python -m experiments.representations`` end to end on the tiny base (small sizes).

Three run directories (full FT, LoRA, bottleneck) are written directly with
``runs.write_outputs`` from perturbed copies of the tiny base (training them would
only add compile time; the study reads finished run directories either way). The
CKA of the full and LoRA runs is checked against transformers' hidden states of their
saved Hugging Face checkpoints and a numpy float64 unbiased-HSIC reference.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import numpy as np

import cka_reference

from tvgeo_jax.studies import representations
from tvgeo_jax.training import runs
from tvgeo_jax.models import load_pretrained
from tvgeo_jax.training import methods, presets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(tempfile.gettempdir(), "tvgeo_jax_test_xla_cache")
TASK = "synth_sst2"
N = 40


def _perturbed(tree, rng, scale, keys=("kernel", "lora_b", "up")):
  """Add noise to leaves under the given names (a stand-in for training)."""
  def walk(node, path):
    if isinstance(node, dict):
      return {k: walk(v, path + (k,)) for k, v in node.items()}
    if any(k in path for k in keys) and "embeddings" not in path and np.ndim(node) == 2:
      return np.asarray(node) + scale * rng.standard_normal(np.shape(node)).astype(np.float32)
    return np.asarray(node)
  return walk(tree, ())


def _write_run(root, method, rng):
  config = presets.resolve(TASK, method, "tiny-random", None,
                           dict(max_seq_len=32, data_scale=0.2, progress=False))
  model_config, base = load_pretrained("tiny-random", num_labels=2, seed=config.seed)
  params = methods.prepare_params(base, model_config, config)
  params = _perturbed(params, rng, {"full": 0.05, "lora": 0.3, "bottleneck": 0.3}[method],
                      keys=({"full": ("kernel",), "lora": ("lora_b",),
                             "bottleneck": ("up",)}[method]))
  run_dir = os.path.join(root, method)
  os.makedirs(run_dir)
  results = {"task": TASK, "method": method, "base_model": "tiny-random", "base_model_path": None,
             "config": config.to_dict(), "model_config": model_config.to_hf_dict()}
  runs.write_outputs(run_dir, params, model_config, method, results, base_model="tiny-random")
  return run_dir


def _unbiased_cka64(x, y):
  """Song et al.'s unbiased HSIC in float64, CKA from it (independent of cka.py)."""
  return cka_reference.cka_ref(x, y, "unbiased")


def _hf_first_token_states(model_dir, batches):
  import torch
  import transformers
  model = transformers.AutoModel.from_pretrained(model_dir).eval()
  out = []
  with torch.no_grad():
    for b in batches:
      keep = np.asarray(b["weights"]) != 0
      res = model(input_ids=torch.tensor(np.asarray(b["input_ids"])[keep]).long(),
                  attention_mask=torch.tensor(np.asarray(b["attention_mask"])[keep]).long(),
                  output_hidden_states=True)
      out.append(np.stack([h[:, 0].numpy() for h in res.hidden_states]))
  return np.concatenate(out, axis=1)  # [L + 1, n, d]


class RepresentationsCliTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    rng = np.random.default_rng(0)
    cls.run_dirs = [_write_run(cls.root, m, rng) for m in ("full", "lora", "bottleneck")]

  def test_cli_writes_cka_umap_clusters_with_sane_numbers(self):
    out = os.path.join(self.root, "study")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "experiments.representations", f"--task={TASK}",
           f"--runs={','.join(self.run_dirs)}", f"--max_examples={N}", "--layers=1,2",
           "--n_neighbors=5", "--approximate=false", "--clusters=3", "--seed=1",
           "--cka_batch_size=0", f"--out={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    for name in ("cka.json", "cka_heatmaps.png", "umap.json", "umap.png", "clusters.json",
                 "representations.json"):
      path = os.path.join(out, name)
      self.assertTrue(os.path.exists(path), name)
      if name.endswith(".png"):
        with open(path, "rb") as f:
          self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

    cka = json.load(open(os.path.join(out, "cka.json")))
    models = ["plm", "full", "lora", "bottleneck"]
    self.assertEqual(cka["models"], models)
    self.assertEqual(cka["num_examples"], N)
    self.assertLen(cka["pairs"], 10)  # 4 self pairs + 6 cross pairs
    for m in models:
      self_m = np.asarray(cka["pairs"][f"{m}|{m}"]["matrix"])
      self.assertEqual(self_m.shape, (3, 3))  # embeddings + 2 tiny layers
      np.testing.assert_allclose(np.diag(self_m)[1:], 1.0, atol=1e-5)
      # The embeddings output of the first token (<s> at position 0) is the same for
      # every example: constant features, CKA undefined (NaN), never a made-up number.
      self.assertTrue(np.all(np.isnan(self_m[0])))
    plm = np.asarray(cka["pairs"]["plm|plm"]["matrix"])
    np.testing.assert_allclose(plm, plm.T, atol=1e-6, equal_nan=True)
    # Row/column summaries agree with numpy on the stored matrix.
    pair = cka["pairs"]["plm|full"]
    m = np.asarray(pair["matrix"])
    np.testing.assert_allclose(pair["summary"]["rows"]["max"][1:], m[1:, 1:].max(1),
                               atol=1e-12)
    np.testing.assert_allclose(pair["summary"]["columns"]["median"][1:],
                               np.median(m[1:, 1:], 0), atol=1e-12)

    # Full vs LoRA against transformers' hidden states of the saved HF checkpoints.
    cfg = runs.load_run(self.run_dirs[0], load_params=False).config
    batches, _ = representations.example_batches(
        TASK, "tiny-random", max_examples=N, seed=cfg.seed, max_seq_len=cfg.max_seq_len,
        data_scale=cfg.data_scale)
    full = _hf_first_token_states(os.path.join(self.run_dirs[0], "hf"), batches)
    lora = _hf_first_token_states(os.path.join(self.run_dirs[1], "hf"), batches)
    ours = np.asarray(cka["pairs"]["full|lora"]["matrix"])
    ref = np.array([[_unbiased_cka64(full[i], lora[j]) for j in range(3)] for i in range(3)])
    np.testing.assert_allclose(ours[1:, 1:], ref[1:, 1:], atol=2e-3)
    self.assertLess(ours[2, 2], 0.999)  # the perturbations did change the representations

    umap = json.load(open(os.path.join(out, "umap.json")))
    self.assertEqual(umap["fit_on"], "bottleneck")  # paper B's default
    self.assertEqual(set(umap["points"]), {"1", "2"})
    for layer, pts in umap["points"].items():
      arrays = {k: np.asarray(v) for k, v in pts.items()}
      self.assertEqual(set(arrays), set(models))
      for a in models:
        self.assertEqual(arrays[a].shape, (N, 2))
        for b in models:
          expected = np.mean(np.linalg.norm(arrays[a] - arrays[b], axis=1))
          self.assertAlmostEqual(umap["paired_distances"][layer][a][b], expected, places=4)

    clusters = json.load(open(os.path.join(out, "clusters.json")))
    for layer in ("1", "2"):
      comp = clusters["layers"][layer]
      counts = np.asarray(comp["counts"])
      self.assertEqual(counts.shape, (3, 4))
      np.testing.assert_array_equal(counts.sum(0), [N] * 4)  # every model's points
      np.testing.assert_allclose(np.asarray(comp["share_of_cluster"]).sum(1), 1.0)

  def test_analyse_is_reproducible_and_rejects_bad_layers(self):
    rng = np.random.RandomState(0)
    reps = {"plm": rng.randn(3, 24, 8).astype(np.float32),
            "lora": rng.randn(3, 24, 8).astype(np.float32)}
    a = representations.analyse(reps, os.path.join(self.root, "a"), umap=False, n_clusters=2)
    b = representations.analyse(reps, os.path.join(self.root, "b"), umap=False, n_clusters=2)
    self.assertEqual(a, b)
    for name in ("cka.json", "clusters.json"):
      self.assertEqual(open(os.path.join(self.root, "a", name)).read(),
                       open(os.path.join(self.root, "b", name)).read())
    with self.assertRaisesRegex(ValueError, r"out of range.*0\.\.2"):
      representations.analyse(reps, os.path.join(self.root, "c"), layers=[5], umap=False)
    self.assertEqual(representations.default_fit_on(["plm", "full", "lora"]), "full")
    self.assertEqual(representations.default_layers(12), [1, 6, 12])


if __name__ == "__main__":
  absltest.main()
