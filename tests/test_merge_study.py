"""The merge/interference study end to end on three tiny synthetic LoRA runs.

Runs are trained once (a few steps); the study then works from the saved run
directories only. References: ``scipy.stats.spearmanr`` on the saved δ and
distances, ``merging`` + ``evaluation.evaluate`` for one merged model, the runs'
results.json for the single-task scores.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import warnings

from absl.testing import absltest
import jax
import numpy as np
import scipy.stats

from tvgeo_jax.core import trees
from tvgeo_jax import evaluation, merging
from tvgeo_jax.core import sharding
from tvgeo_jax.evaluation import scoring
from tvgeo_jax.core import io_utils
from tvgeo_jax.studies import merge_study, sources
from tvgeo_jax.training import compile_cache, loop, presets

TASKS = ("synth_sst2", "synth_rte", "synth_mrpc")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setUpModule():
  compile_cache.enable(os.path.join(tempfile.gettempdir(), "tvgeo_jax_test_xla_cache"))


class MergeStudyTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dir = tempfile.mkdtemp()
    cls.paths = []
    for task in TASKS:
      config = presets.resolve(task, "lora", "tiny-random", overrides=dict(
          epochs=1, data_scale=0.1, max_seq_len=16, batch_size=16, eval_batch_size=16,
          progress=False, lora_rank=4, learning_rate=2e-2))
      path = os.path.join(cls.dir, task)
      loop.finetune(config, path)
      cls.paths.append(path)
    cls.out = os.path.join(cls.dir, "study")
    srcs = sources.load_sources(cls.paths)     # from disk: nothing is retrained
    cls.first = merge_study.run_study(srcs, cls.out, "lora_avg", analyses=("pairs",),
                                      score="neg_loss", figures=True)
    cls.srcs = srcs

  def test_delta_shape_diagonal_and_single_scores(self):
    grid = io_utils.read_json(os.path.join(self.out, "pairs_lora_factor_average.json"))
    delta, merged = np.asarray(grid["delta"]), np.asarray(grid["merged"])
    self.assertEqual(delta.shape, (3, 3))
    self.assertTrue(np.all(np.isnan(np.diag(delta))))
    off = ~np.eye(3, dtype=bool)
    self.assertTrue(np.all(np.isfinite(delta[off])))
    single = np.asarray(grid["single"])
    np.testing.assert_allclose(delta[off], (single[:, None] - merged)[off])
    # Re-evaluated single scores equal the runs' own test losses.
    np.testing.assert_allclose(single, grid["single_results_json"], atol=1e-5)
    # One merged model scored independently: merge(sst2, rte) with sst2's head.
    s0, s1 = self.srcs[0], self.srcs[1]
    direct = evaluation.evaluate(merging.lora_factor_average([s0.params, s1.params]),
                                 s0.config, merge_study.train_configs([s0])[0])
    self.assertAlmostEqual(merged[0, 1], -direct["loss"], places=5)

  def test_a_capped_test_subset_scores_every_model_on_the_same_first_rows(self):
    out = os.path.join(self.dir, "capped")
    res = merge_study.run_study(self.srcs, out, "lora_avg", analyses=("pairs",),
                                score="neg_loss", figures=False, max_examples=16)
    grid = res["pairs"]["lora_factor_average"]
    self.assertEqual(grid["max_examples"], 16)
    saved = io_utils.read_json(os.path.join(out, "cache", "evaluations.json"))
    self.assertEqual({e["num_examples"] for e in saved["entries"].values()}, {16})
    # Reference: per-row losses over the whole split, then the mean of the first 16 rows.
    s0, s1 = self.srcs[0], self.srcs[1]
    config = merge_study.train_configs([s0])[0]
    merged = merging.lora_factor_average([s0.params, s1.params])
    data = evaluation.cached_task_data(config)
    step = scoring.make_eval_step(model_config=s0.config, mesh=sharding.data_mesh(),
                                  is_regression=False)
    rows = scoring.predict(step, merged, data.eval_batches("test"), sharding.data_mesh())
    self.assertGreater(len(rows["loss"]), 16)
    self.assertAlmostEqual(grid["merged"][0][1], -float(rows["loss"][:16].mean()), places=5)
    self.assertAlmostEqual(grid["single"][0], -evaluation.evaluate(
        s0.params, s0.config, config, "test", max_examples=16)["loss"], places=6)
    # The uncapped study's cache is not mixed with capped scores.
    with self.assertRaisesRegex(ValueError, "another study"):
      merge_study.run_study(self.srcs, self.out, "lora_avg", analyses=("pairs",),
                            score="neg_loss", figures=False, max_examples=16)

  def test_without_the_averaging_comparison_only_the_chosen_grid_is_scored(self):
    out = os.path.join(self.dir, "factor_only")
    res = merge_study.run_study(self.srcs, out, "lora_avg", analyses=("pairs",),
                                score="neg_loss", figures=False, max_examples=16,
                                compare_lora_averaging=False)
    self.assertEqual(list(res["pairs"]), ["lora_factor_average"])
    self.assertFalse(os.path.exists(os.path.join(out, "lora_merges.md")))
    self.assertFalse(os.path.exists(os.path.join(out, "pairs_lora_product_average.json")))
    t = len(self.srcs)
    self.assertEqual(res["evaluations"], t + t * (t - 1))   # singles + one grid's pairs
    s0, s1 = self.srcs[0], self.srcs[1]
    direct = evaluation.evaluate(merging.lora_factor_average([s0.params, s1.params]), s0.config,
                                 merge_study.train_configs([s0])[0], "test", max_examples=16)
    self.assertAlmostEqual(res["pairs"]["lora_factor_average"]["merged"][0][1],
                           -direct["loss"], places=5)

  def test_table_entries_equal_scipy_spearman(self):
    grid = io_utils.read_json(os.path.join(self.out, "pairs_lora_factor_average.json"))
    delta = np.asarray(grid["delta"])
    checked = 0
    for module in ("query", "value"):
      for col, dist in grid["distances"][module].items():
        dist = np.asarray(dist)
        rho = []
        for i in range(3):
          keep = np.arange(3) != i
          with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rho.append(scipy.stats.spearmanr(delta[i, keep], dist[i, keep]).statistic)
        entry = grid["spearman"][module][col]
        np.testing.assert_allclose(entry["per_task"], rho, equal_nan=True)
        valid = ~np.isnan(rho)
        self.assertEqual(entry["n_nan"], int((~valid).sum()))
        if valid.any():
          self.assertAlmostEqual(entry["mean"], float(np.mean(np.asarray(rho)[valid])))
        checked += 1
    self.assertEqual(checked, 2 * 3 * 2)   # 2 modules x (l2, cos, d_G) x (all, 2+)
    md = open(os.path.join(self.out, "table3_lora_factor_average.md")).read()
    self.assertIn("| Query |", md)
    self.assertIn("d_G 2+", md)
    for name in ("scatter_query.png", "scatter_value.png"):
      with open(os.path.join(self.out, "figures", "lora_factor_average", name), "rb") as f:
        self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    both = open(os.path.join(self.out, "lora_merges.md")).read()
    self.assertIn("mean δ product", both)

  def test_constant_delta_rows_are_reported_as_nan(self):
    # A score that every merge leaves unchanged: δ = 0 everywhere -> ρ undefined.
    grid = merge_study.merge_grid(self.srcs, "lora_avg", score="num_examples",
                                  cache=merge_study.open_cache(self.out, self.srcs))
    cols = merge_study.distance_columns(self.srcs, ("query",), metrics=("cosine",))
    table = merge_study.interference_tables(grid["delta"], cols, grid["task_names"])
    entry = table["query"]["cos"]
    self.assertEqual(entry["n_nan"], 3)
    self.assertEqual(entry["nan_tasks"], list(TASKS))
    self.assertIn("[3 NaN]", merge_study.table3_markdown(table))

  def test_resume_does_no_new_evaluations(self):
    self.assertEqual(self.first["evaluations"], 3 + 2 * 6)   # singles + 2 methods x 6 pairs
    cache_path = os.path.join(self.out, "cache", "evaluations.json")
    saved = io_utils.read_json(cache_path)
    dropped = [k for k in saved["entries"] if k.startswith("pair|lora_factor")][:2]
    for k in dropped:
      del saved["entries"][k]
    io_utils.atomic_write_json(cache_path, saved)
    again = merge_study.run_study(self.srcs, self.out, "lora_avg", analyses=("pairs",),
                                  score="neg_loss", figures=False)
    self.assertEqual(again["evaluations"], 2)
    # The CLI on the same output directory: everything is cached.
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.merge_grid", f"--runs={self.dir}/synth_*",
         "--method=lora_avg", f"--out={self.out}", "--score=neg_loss", "--nofigures"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    self.assertIn("3 runs, 0 new evaluations", proc.stdout)

  def test_the_cache_follows_weights_not_paths(self):
    """A moved run keeps its cached scores; a run trained again in place loses them."""
    cached = merge_study.open_cache(self.out, self.srcs)
    self.assertIn(f"single|{self.srcs[0].name}", cached)
    moved = [dataclasses.replace(s, path=s.path + "_moved") for s in self.srcs]
    self.assertEqual(merge_study.open_cache(self.out, moved).entries, cached.entries)
    head = self.srcs[0].params["classifier"]
    retrained = [dataclasses.replace(self.srcs[0], params=dict(
        self.srcs[0].params, classifier=jax.tree.map(lambda x: x + 1.0, head)))]
    retrained += self.srcs[1:]
    with self.assertLogs(level="WARNING") as logs:
      fresh = merge_study.open_cache(self.out, retrained)
    self.assertEqual(fresh.entries, {})
    self.assertIn(f"{self.srcs[0].name} changed", logs.output[0])
    with self.assertRaisesRegex(ValueError, "another study"):
      merge_study.open_cache(self.out, self.srcs[:2])

  def test_paper_c_analyses(self):
    conflicts = merge_study.sign_conflicts(self.srcs, ks=(0.2,), max_subsets=5)
    self.assertEqual(sorted(conflicts["0.2"]), ["2", "3"])
    # Independent count for all three trimmed task vectors.
    base = merge_study.base_tree(self.srcs[0])
    tvs = [merging.keep_top_k(t, 0.2) for t in
           merging.task_vectors(base, [s.params for s in self.srcs])]
    flat = [np.concatenate([np.ravel(v) for _, v in sorted(
        trees.flatten(t).items())]) for t in tvs]
    s = np.sign(np.stack(flat))
    want = np.mean((s > 0).any(0) & (s < 0).any(0))
    self.assertAlmostEqual(conflicts["0.2"]["3"]["mean"], want, places=6)
    configs = merge_study.train_configs(self.srcs)
    cache = merge_study.open_cache(self.out, self.srcs)
    topk = merge_study.topk_sweep(self.srcs[:1], configs[:1], cache, (0.5, 1.0),
                                  score="neg_loss")
    # k = 1 keeps the whole task vector: the model itself.
    single = -io_utils.read_json(os.path.join(self.paths[0], "results.json"))[
        "metrics"]["test"]["loss"]
    self.assertAlmostEqual(topk["tasks"]["synth_sst2"][1], single, places=5)
    multi = merge_study.multitask(self.srcs, configs, cache, ["ties"], score="neg_loss")
    rows = multi["methods"]["ties"]["rows"]
    self.assertEqual([r["n"] for r in rows], [2, 3])
    self.assertLen(rows[-1]["scores"], 3)


if __name__ == "__main__":
  absltest.main()
