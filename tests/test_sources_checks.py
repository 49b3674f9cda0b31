"""Analyses compare only what is comparable (issue 17, items 9 and 11; issue 21, item 4).

Real tiny runs (four steps each, trained once in setUpClass): tiny-random with seeds 0
and 1 (different random bases), a seed-0 full fine-tuning run and a tiny-bert-random
run. Fingerprints are checked against the bases rebuilt with
``load_pretrained``; pools and manifests are real files, hub ids a real huggingface_hub
cache layout read offline.
"""
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
import numpy as np

from tvgeo_jax import fingerprint, io_utils, lora, runs, sources, trees
from tvgeo_jax.data import load_tokenizer
from tvgeo_jax.models import load_pretrained, save_pretrained
from tvgeo_jax.training import compile_cache, loop, presets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {"r0": ("synth_sst2", "lora", "tiny-random", 0),
        "r1": ("synth_sst2", "lora", "tiny-random", 1),
        "full0": ("synth_sst2", "full", "tiny-random", 0),
        "bert0": ("synth_sst2", "lora", "tiny-bert-random", 0)}


def setUpModule():
  compile_cache.enable(os.path.join(tempfile.gettempdir(), "tvgeo_jax_test_xla_cache"))


class BaseChecksTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dir = tempfile.mkdtemp()
    cls.paths = {}
    for key, (task, method, model, seed) in RUNS.items():
      config = presets.resolve(task, method, model, overrides=dict(
          epochs=1, data_scale=0.05, max_seq_len=16, batch_size=16, eval_batch_size=16,
          progress=False, lora_rank=2, seed=seed))
      cls.paths[key] = os.path.join(cls.dir, key)
      loop.finetune(config, cls.paths[key])

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.dir, ignore_errors=True)
    super().tearDownClass()

  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)

  def _adapter(self, key):
    return os.path.join(self.paths[key], runs.ADAPTER)

  def _stored(self, key):
    return io_utils.read_json(os.path.join(self.paths[key], runs.RESULTS))["base_fingerprint"]

  def test_fingerprint_is_the_base_weights(self):
    config, base = load_pretrained("tiny-random", num_labels=2, seed=0)
    fp = fingerprint.base_fingerprint(base, config)
    # Stored by every run: LoRA (frozen leaves) and full fine-tuning (the base) alike.
    self.assertEqual(self._stored("r0"), fp)
    self.assertEqual(self._stored("full0"), fp)
    self.assertNotEqual(self._stored("r1"), fp)
    self.assertNotEqual(self._stored("bert0"), fp)
    # Heads and LoRA leaves do not count; one changed weight (1 ulp) does.
    _, other_head = load_pretrained("tiny-random", num_labels=5, seed=0)
    self.assertEqual(fingerprint.base_fingerprint(other_head, config), fp)
    with_lora = lora.inject_lora(base, rank=2, seed=3)
    self.assertEqual(fingerprint.base_fingerprint(with_lora, config), fp)
    nudged = trees.map_with_path(lambda p, v: np.array(v), base)
    k = nudged["encoder"]["layer_1"]["value"]["kernel"]
    k[0, 0] = np.nextafter(k[0, 0], np.float32(1), dtype=np.float32)
    self.assertNotEqual(fingerprint.base_fingerprint(nudged, config), fp)
    self.assertNotEqual(fingerprint.base_fingerprint(base, config.replace(hidden_act="relu")), fp)

  def test_different_seeds_are_refused_or_warned(self):
    with self.assertRaisesRegex(ValueError, rf"2 different bases: \[{self.paths['r0']}\] on "
                                r"tiny-random \(roberta, base [0-9a-f]{12}\) vs "
                                rf"\[{self.paths['r1']}\].*--allow_different_bases"):
      sources.load_sources([self.paths["r0"], self.paths["r1"]])
    with self.assertLogs(level=logging.WARNING) as logs:
      srcs = sources.load_sources([self.paths["r0"], self.paths["r1"]], allow_different_bases=True)
    self.assertLen(srcs, 2)
    self.assertIn("computing anyway", "\n".join(logs.output))
    # A run and its own peft adapter: one base.
    self.assertLen(sources.load_sources([self.paths["r0"], self._adapter("r0")]), 2)

  def test_roberta_and_bert_are_refused(self):
    with self.assertRaisesRegex(ValueError, r"on tiny-random \(roberta.* on tiny-bert-random "
                                r"\(bert"):
      sources.load_sources([self.paths["r0"], self.paths["bert0"]])

  def test_old_runs_get_a_recomputed_fingerprint(self):
    for key in ("r0", "full0"):
      old = os.path.join(self.tmp, key)
      shutil.copytree(self.paths[key], old)
      results = io_utils.read_json(os.path.join(old, runs.RESULTS))
      del results["base_fingerprint"]
      io_utils.atomic_write_json(os.path.join(old, runs.RESULTS), results)
      self.assertEqual(sources.load_source(old).base_fingerprint, self._stored(key))
    with self.assertRaisesRegex(ValueError, "different bases"):
      sources.load_sources([os.path.join(self.tmp, "r0"), self.paths["r1"]])

  def test_grid_distances_cli_refuses_and_warns(self):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "experiments.grid_distances", "--nofigures",
           f"--out={self.tmp}/grid"]
    bad = subprocess.run(cmd + [f"--runs={self.paths['r0']},{self.paths['r1']}"], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    self.assertEqual(bad.returncode, 1, bad.stderr[-2000:])
    self.assertIn("different bases", bad.stderr)
    one = subprocess.run(cmd + [f"--runs={self.paths['r0']}", "--factors=product",
                                "--metrics=l2"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    self.assertEqual(one.returncode, 0, one.stderr[-2000:])
    self.assertIn("the grid is 1 x 1", one.stderr)

  # --- pools and manifests ---------------------------------------------------------

  def _manifest(self, lines):
    path = os.path.join(self.tmp, "pool.txt")
    with open(path, "w") as f:
      f.write("\n".join(lines) + "\n")
    return path

  def test_literal_paths_with_commas_and_glob_characters(self):
    odd = os.path.join(self.tmp, "w[1],seed=0")
    shutil.copytree(self.paths["r0"], odd)
    self.assertEqual(sources.expand_paths([odd]), [odd])
    bracket = os.path.join(self.tmp, "w[1]")
    shutil.copytree(self.paths["r0"], bracket)   # glob would read [1] as a character class
    self.assertEqual(sources.expand_paths([bracket]), [bracket])
    manifest = self._manifest(["# odd names are literal", "w[1],seed=0", "",
                               f"{self._adapter('r0')}   # a comment after an entry"])
    srcs = sources.load_pool(manifest)
    self.assertEqual([s.path for s in srcs], [odd, self._adapter("r0")])

  def test_pool_skips_other_bases_or_refuses_with_strict(self):
    # r1: another seed; bert0's adapter: another architecture; a copy of r0's adapter
    # whose config names a local base with other weights (seed 1), available offline.
    seed1 = os.path.join(self.tmp, "base_seed1")
    save_pretrained(seed1, *load_pretrained("tiny-random", seed=1))
    moved = os.path.join(self.tmp, "adapter_on_seed1")
    shutil.copytree(os.path.join(self.paths["r0"], runs.ADAPTER), moved)
    cfg_path = os.path.join(moved, "adapter_config.json")
    cfg = io_utils.read_json(cfg_path)
    io_utils.atomic_write_json(cfg_path, dict(cfg, base_model_name_or_path=seed1))
    entries = [self.paths["r0"], self.paths["r1"], self._adapter("r0"),
               os.path.join(self.paths["bert0"], runs.ADAPTER), moved]
    manifest = self._manifest(entries)
    with self.assertLogs(level=logging.WARNING) as logs:
      srcs = sources.load_pool(manifest, base="tiny-random")
    self.assertEqual([s.path for s in srcs], [self.paths["r0"], entries[2]])
    warning = "\n".join(logs.output)
    self.assertIn("3 of 5 models", warning)
    for skipped in (self.paths["r1"], entries[3], moved):
      self.assertIn(skipped, warning)
    with self.assertRaisesRegex(ValueError, r"3 of 5 models .* --strict"):
      sources.load_pool(manifest, base="tiny-random", strict=True)
    # Without --base the pool's base is the one most models share.
    kept = sources.load_pool(self._manifest(entries[:3]))
    self.assertEqual([s.path for s in kept], [self.paths["r0"], entries[2]])

  def test_pool_reads_hub_adapter_ids_offline(self):
    cache = os.path.join(self.tmp, "hub")
    snap = os.path.join(cache, "models--someone--sst2-lora", "snapshots", "c" * 40)
    shutil.copytree(os.path.join(self.paths["r0"], runs.ADAPTER), snap)
    os.makedirs(os.path.join(cache, "models--someone--sst2-lora", "refs"))
    with open(os.path.join(cache, "models--someone--sst2-lora", "refs", "main"), "w") as f:
      f.write("c" * 40)
    for key, value in (("HF_HUB_CACHE", cache), ("HF_HUB_OFFLINE", "1")):
      old = os.environ.get(key)
      os.environ[key] = value
      self.addCleanup(lambda k=key, v=old: os.environ.pop(k) if v is None
                      else os.environ.__setitem__(k, v))
    srcs = sources.load_pool(self._manifest(["someone/sst2-lora", self.paths["r0"]]),
                             base="tiny-random")
    self.assertEqual([s.name for s in srcs], ["sst2-lora", "synth_sst2"])
    np.testing.assert_array_equal(
        srcs[0].params["encoder"]["layer_0"]["query"]["lora_b"],
        sources.load_source(self.paths["r0"]).params["encoder"]["layer_0"]["query"]["lora_b"])
    with self.assertRaisesRegex(Exception, "'someone/missing' is not cached"):
      sources.load_pool(self._manifest(["someone/missing"]), base="tiny-random")


class MissingModelDirectoryTest(absltest.TestCase):

  def test_named_as_a_model_directory(self):
    with self.assertRaisesRegex(FileNotFoundError, r"No such model directory: "
                                r"'/nonexistent/models/roberta'"):
      load_tokenizer("/nonexistent/models/roberta")


if __name__ == "__main__":
  absltest.main()
