"""δ prediction from geometry, leave-one-task-out, on planted data; the entry point end to
end on a distances.npz written by the project's writer and a merge study's pairs file.

References: ``DistanceGrid.kplus_mean`` for the k+ features, hand-computed seed floors,
``evidence.table3_test`` for the significance of the planted δ, and the mean baseline
(a predictor that knows nothing) for the independent plant.
"""
from __future__ import annotations

import os
import tempfile

import subprocess
import sys

from absl.testing import absltest
import numpy as np

from tvgeo_jax.studies import interference
from tvgeo_jax.core import io_utils
from tvgeo_jax.geometry.grid import DistanceGrid
from tvgeo_jax.geometry.outputs import write_distance_outputs
from tvgeo_jax.studies import evidence
from tvgeo_jax.studies import merge_prediction as mp

DRIVER = "value/product/cosine"


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
  """``python -m experiments.predict_merge ARGS`` in its own process (entry points define
  their flags globally, so each CLI's test runs it as a user does)."""
  return subprocess.run([sys.executable, "-m", "experiments.predict_merge", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def plant_distances(rng, t, layers=4, modules=("query", "value"), factors=("product", "a"),
                    metrics=("l2", "cosine", "grassmann")):
  """Independent random Euclidean distance tensors [T, T, L] per module/factor/metric."""
  arrays = {}
  for mod in modules:
    for fac in factors:
      for met in metrics:
        x = rng.normal(size=(layers, t, 3))
        arrays[f"{mod}/{fac}/{met}"] = np.linalg.norm(
            x[:, :, None] - x[:, None], axis=-1).transpose(1, 2, 0)
  return arrays


def monotone_delta(rng, arrays, k=3, noise=0.02):
  """δ = 0.3 tanh(d / 2) of the driver's k+ mean, plus noise of 2% of its spread."""
  driver = arrays[DRIVER][..., k - 1:].mean(-1)
  y = 0.3 * np.tanh(driver / 2)
  delta = y + noise * y.std() * rng.normal(size=y.shape)
  np.fill_diagonal(delta, np.nan)
  return delta


def _names(t):
  return [f"synth_t{k}" for k in range(t)]


class FeaturesTest(absltest.TestCase):

  def test_layers_and_kplus_means_match_the_distance_grid(self):
    rng = np.random.default_rng(0)
    arrays = plant_distances(rng, 5, layers=4, modules=("query",), factors=("product",),
                             metrics=("cosine",))
    d = arrays["query/product/cosine"]
    d[0, 1, 2] = d[1, 0, 2] = np.nan                        # a NaN layer is skipped
    feats = mp.geometry_features(arrays, _names(5))
    self.assertEqual(sorted(feats), sorted(
        [f"query/product/cosine layer{l}" for l in range(1, 5)]
        + [f"query/product/cosine {k}+" for k in range(1, 4)]))
    grid = DistanceGrid("query", tuple(_names(5)), ("0", "1", "2", "3"),
                        {("product", "cosine"): d}, {}, {}, (), "lora")
    for k in (1, 2, 3):
      np.testing.assert_allclose(feats[f"query/product/cosine {k}+"],
                                 grid.kplus_mean("product", "cosine", k))
    np.testing.assert_array_equal(feats["query/product/cosine layer2"], d[..., 1])

  def test_seed_floor_feature_only_when_every_task_has_seeds(self):
    rng = np.random.default_rng(1)
    names = ["a", "a#2", "b", "b#2", "c", "c#2"]
    arrays = plant_distances(rng, 6, layers=2, modules=("query",), factors=("product",),
                             metrics=("l2",))
    d = arrays["query/product/l2"]
    feats = mp.geometry_features(arrays, names)
    floor = feats["query/product/l2 seed floor"]
    fa, fb = d[0, 1].mean(), d[2, 3].mean()
    self.assertAlmostEqual(floor[1, 2], (fa + fb) / 2)
    self.assertAlmostEqual(floor[0, 1], fa)
    self.assertNotIn("query/product/l2 seed floor", mp.geometry_features(arrays, _names(6)))
    self.assertNotIn("query/product/l2 seed floor",
                     mp.geometry_features(arrays, names, seed_floor=False))

  def test_task_folds_never_validate_on_a_task_seen_in_training(self):
    t = 7
    gi, gj = map(np.ravel, np.meshgrid(range(t), range(t), indexing="ij"))
    off = gi != gj
    gi, gj = gi[off].astype(str), gj[off].astype(str)
    splits = mp.task_folds(gi, gj, 3)
    self.assertLen(splits, 3)
    for train, val in splits:
      held = set(gi[val])
      self.assertFalse(held & (set(gi[train]) | set(gj[train])))
      self.assertFalse(held & set(gj[val]))


class LeaveOneTaskOutTest(absltest.TestCase):

  def test_monotone_delta_is_recovered_on_held_out_tasks(self):
    rng = np.random.default_rng(2)
    t = 10
    arrays = plant_distances(rng, t)
    delta = monotone_delta(rng, arrays)
    names = _names(t)
    res = mp.leave_one_task_out(delta, mp.geometry_features(arrays, names), names)
    p = res["predictors"]
    self.assertEqual(res["num_pairs"], t * (t - 1))
    self.assertGreater(p["ridge"]["mean_spearman"], 0.9)
    self.assertGreater(p["best_feature"]["mean_spearman"], 0.9)
    self.assertGreater(p["gradient_boosting"]["mean_spearman"], 0.8)
    self.assertLess(p["ridge"]["mean_mae"], 0.5 * p["mean"]["mean_mae"])
    self.assertIsNone(p["mean"]["mean_spearman"])                  # constant: undefined
    self.assertEqual(p["mean"]["num_undefined_spearman"], t)
    chosen = {v["info"]["feature"] for v in p["best_feature"]["per_task"].values()}
    self.assertEqual(chosen, {f"{DRIVER} 3+"})
    driver = arrays[DRIVER][..., 2:].mean(-1)
    test = evidence.table3_test(delta, driver, n_permutations=999)
    self.assertLess(test.p_value, 0.01)

  def test_independent_delta_is_predicted_no_better_than_the_mean(self):
    t = 10
    rhos, ratios, ps = [], [], []
    for seed in range(3):
      rng = np.random.default_rng(10 + seed)
      arrays = plant_distances(rng, t, factors=("product",))
      delta = rng.normal(size=(t, t))
      np.fill_diagonal(delta, np.nan)
      names = _names(t)
      res = mp.leave_one_task_out(delta, mp.geometry_features(arrays, names), names,
                                  predictors=("ridge", "mean"))
      p = res["predictors"]
      rhos.append(p["ridge"]["mean_spearman"])
      ratios.append(p["ridge"]["mean_mae"] / p["mean"]["mean_mae"])
      ps.append(evidence.table3_test(delta, arrays[DRIVER].mean(-1), n_permutations=199,
                                     seed=seed).p_value)
    # Stated margin: averaged over three plants, |mean held-out ρ| < 0.25 and the MAE is
    # at most 10% below the mean baseline's.
    self.assertLess(abs(np.mean(rhos)), 0.25, rhos)
    self.assertGreater(np.mean(ratios), 0.9, ratios)
    self.assertGreater(min(ps), 0.01, ps)

  def test_a_held_out_tasks_delta_never_reaches_its_own_prediction(self):
    rng = np.random.default_rng(3)
    t = 6
    arrays = plant_distances(rng, t, layers=2, modules=("query",), factors=("product",))
    delta = monotone_delta(rng, arrays | {DRIVER: arrays["query/product/cosine"]}, k=1)
    names = _names(t)
    feats = mp.geometry_features(arrays, names)
    preds = ("ridge", "best_feature", "mean")
    first = mp.leave_one_task_out(delta, feats, names, predictors=preds)
    changed = delta.copy()
    changed[0, 1:] += 10.0                       # task 0's own merges...
    changed[1:, 0] -= 10.0                       # ...and the merges scored on its partners
    second = mp.leave_one_task_out(changed, feats, names, predictors=preds)
    for p in preds:
      np.testing.assert_allclose(first["predicted"][p][0], second["predicted"][p][0])
      self.assertFalse(np.allclose(first["predicted"][p][1], second["predicted"][p][1]))

  def test_seeds_are_held_out_together_and_same_task_pairs_not_scored(self):
    rng = np.random.default_rng(4)
    names = [n for k in range(4) for n in (f"t{k}", f"t{k}#2")]
    arrays = plant_distances(rng, 8, layers=2, modules=("value",), factors=("product",))
    delta = monotone_delta(rng, arrays, k=1)
    res = mp.leave_one_task_out(delta, mp.geometry_features(arrays, names), names,
                                predictors=("best_feature",))
    self.assertEqual(res["tasks"], ["t0", "t1", "t2", "t3"])
    self.assertEqual(res["num_pairs"], 8 * 7 - 8)
    self.assertIn(f"{DRIVER} seed floor", res["features"])
    per = res["predictors"]["best_feature"]["per_task"]
    self.assertEqual({v["num_pairs"] for v in per.values()}, {2 * 6})
    self.assertTrue(np.isnan(res["predicted"]["best_feature"][0, 1]))
    with self.assertRaisesRegex(ValueError, "at least 4 tasks"):
      mp.leave_one_task_out(delta[:6, :6], mp.geometry_features(
          {k: v[:6, :6] for k, v in arrays.items()}, names[:6]), names[:6])


def _write_study(root, t=8, seed=5):
  """A distances.npz (project writer, tasks in reverse order) and a pairs_*.json."""
  rng = np.random.default_rng(seed)
  names = _names(t)
  arrays = plant_distances(rng, t, layers=3, factors=("product",), metrics=("l2", "cosine"))
  delta = monotone_delta(rng, arrays, k=2)
  single = np.full(t, 0.9)
  merged = single[:, None] - np.nan_to_num(delta)
  rev = np.arange(t)[::-1]
  grids = {}
  for mod in ("query", "value"):
    dist = {("product", m): arrays[f"{mod}/product/{m}"][np.ix_(rev, rev)]
            for m in ("l2", "cosine")}
    grids[mod] = DistanceGrid(mod, tuple(names[k] for k in rev), ("0", "1", "2"), dist,
                              {"product": np.full((t, 3), 4)}, {}, (), "lora")
  write_distance_outputs(os.path.join(root, "distances"), grids, figures=False)
  pairs = {"method": "lora_factor_average", "options": {}, "task_names": names,
           "score": "accuracy", "single": single.tolist(), "single_results_json": single.tolist(),
           "merged": merged.tolist(),
           "delta": interference.delta_matrix(single, merged).tolist(), "metrics": {}}
  io_utils.atomic_write_json(os.path.join(root, "merge", "pairs_lora_factor_average.json"), pairs)
  return names, delta


class EntryPointTest(absltest.TestCase):

  def test_predict_merge_end_to_end_on_the_real_file_formats(self):
    root = tempfile.mkdtemp()
    names, delta = _write_study(root)
    out = os.path.join(root, "pred")
    proc = run_cli(f"--distances={os.path.join(root, 'distances')}",
                   f"--merge={os.path.join(root, 'merge')}", f"--out={out}")
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    doc = io_utils.read_json(os.path.join(out, mp.SUMMARY_FILE))
    self.assertEqual(doc["method"], "lora_factor_average")
    self.assertEqual(doc["names"], names)
    self.assertEqual(set(doc["predictors"]), {"ridge", "gradient_boosting", "mean",
                                              "best_feature"})
    self.assertGreater(doc["predictors"]["ridge"]["mean_spearman"], 0.9)
    self.assertIsNone(doc["measured"][0][0])               # NaN written as null
    np.testing.assert_allclose(np.asarray(doc["measured"], float)[0, 1:], delta[0, 1:],
                               atol=1e-12)
    with open(os.path.join(out, mp.FIGURE_FILE), "rb") as f:
      self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    with open(os.path.join(out, "prediction.md")) as f:
      self.assertIn("| ridge |", f.read())

  def test_flag_mistakes_are_usage_errors(self):
    proc = run_cli("--distances=x")
    self.assertEqual(proc.returncode, 2, proc.stderr)
    self.assertIn("--merge", proc.stderr)
    proc = run_cli("--distances=x", "--merge=y", "--runs=r")
    self.assertEqual(proc.returncode, 2, proc.stderr)
    self.assertIn("not both", proc.stderr)

  def test_distances_of_other_runs_are_refused(self):
    root = tempfile.mkdtemp()
    _write_study(root)
    arrays, names = mp.read_distances(os.path.join(root, "distances", "distances.npz"))
    pairs = mp.read_merge_pairs(os.path.join(root, "merge"))
    pairs["task_names"] = pairs["task_names"][:-1] + ["synth_other"]
    with self.assertRaisesRegex(ValueError, "different runs"):
      mp.run_prediction(arrays, names, pairs, os.path.join(root, "p"), figures=False)


if __name__ == "__main__":
  absltest.main()
