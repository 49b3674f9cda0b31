"""Seed floor, permutation p-values and the chance rule on planted data.

Independent references: p-values by brute-force enumeration of every permutation
(itertools, ``scipy.stats.spearmanr`` in a plain loop), the grouping share of
``tvgeo_jax.studies.findings.group_agreement``, chance levels from scikit-learn / the project's
``metrics.compute_metrics`` scoring constant predictions.
"""
from __future__ import annotations

import itertools

from absl.testing import absltest
import numpy as np
import scipy.stats

from tvgeo_jax.studies import findings
from tvgeo_jax.core import metrics
from tvgeo_jax.studies import evidence as ev


def _points_distance(x):
  return np.linalg.norm(x[:, None] - x[None], axis=-1)


def _clustered(rng, sizes, spread=0.05, dim=3):
  centres = rng.normal(size=(len(sizes), dim)) * 3
  x = np.concatenate([c + spread * rng.normal(size=(n, dim)) for c, n in zip(centres, sizes)])
  return _points_distance(x)


class SeedFloorTest(absltest.TestCase):

  def setUp(self):
    rng = np.random.default_rng(0)
    self.names = ["a", "a#2", "b", "b#2", "c", "c#2"]
    d = rng.uniform(1.0, 2.0, size=(6, 6, 3))
    d = (d + d.transpose(1, 0, 2)) / 2
    for i, j in [(0, 1), (2, 3), (4, 5)]:      # same-task pairs, small
      d[i, j] = d[j, i] = rng.uniform(0.1, 0.3, size=3)
    self.d = d

  def test_floor_is_max_of_same_task_pairs_per_layer(self):
    f = ev.seed_floor(self.d, self.names)
    same = np.stack([self.d[0, 1], self.d[2, 3], self.d[4, 5]])
    np.testing.assert_allclose(f.floor, same.max(0))
    np.testing.assert_allclose(f.same_task_mean, same.mean(0))
    between = [self.d[i, j] for i in range(6) for j in range(i + 1, 6)
               if self.names[i][0] != self.names[j][0]]
    np.testing.assert_allclose(f.between_task_mean, np.mean(between, 0))
    self.assertEqual((f.num_same_task_pairs, f.num_between_task_pairs), (3, 12))
    np.testing.assert_allclose(f.per_task["b"], self.d[2, 3])
    np.testing.assert_allclose(ev.seed_floor(self.d, self.names, quantile=0.5).floor,
                               np.median(same, 0))

  def test_floors_of_a_distances_npz_skip_ranks_and_names(self):
    arrays = {"query/product/cosine": self.d, "query/product/rank": np.ones((6, 3)),
              "task_names": np.asarray(self.names), "query/layer_names": np.asarray(["0"])}
    self.assertEqual(list(ev.seed_floors(arrays, self.names)), ["query/product/cosine"])

  def test_clears_floor_only_when_families_are_apart(self):
    layer = self.d[..., 0]
    fams = {"a": "x", "b": "y", "c": "z"}
    check = ev.clears_floor(layer, self.names, fams)
    self.assertTrue(check.clears)
    self.assertEqual(check.share_above, 1.0)
    noisy = layer.copy()
    noisy[0, 1] = noisy[1, 0] = 5.0             # one seed pair far apart: floor 5
    check = ev.clears_floor(noisy, self.names, fams)
    self.assertFalse(check.clears)
    self.assertEqual(check.floor, 5.0)
    with self.assertRaisesRegex(ValueError, "two runs"):
      ev.seed_floor(layer[:3:2, :3:2], ["a", "b"])

  def test_task_mean_matrix_averages_run_pairs(self):
    m, order = ev.task_mean_matrix(self.d[..., 0], self.names)
    self.assertEqual(order, ["a", "b", "c"])
    d = self.d[..., 0]
    self.assertAlmostEqual(m[0, 1], np.mean([d[0, 2], d[0, 3], d[1, 2], d[1, 3]]))
    self.assertAlmostEqual(m[2, 2], d[4, 5])


def _brute_force_p(observed, null, alternative="greater"):
  null = np.asarray(null)
  eps = 1e-12
  if alternative == "greater":
    return np.mean(null >= observed - eps)
  return np.mean(null <= observed + eps)


class PermutationTest(absltest.TestCase):

  def test_result_verdict_comes_from_the_p_value_only(self):
    small = ev.PermutationResult("s", -3.0, 0.01, 999, "greater")
    large = ev.PermutationResult("s", 99.0, 0.2, 999, "greater")
    self.assertTrue(small.significant() and small.verdict().startswith("shown"))
    self.assertTrue(large.verdict().startswith("not shown"))
    self.assertTrue(large.significant(level=0.25))
    self.assertIn("999 random permutations", small.describe())
    self.assertEqual(small.to_dict()["p_value"], 0.01)

  def test_grouping_share_matches_findings_group_agreement(self):
    rng = np.random.default_rng(1)
    names = ["sst2", "yelp", "imdb", "mnli", "snli", "qnli", "rte", "mrpc", "cola", "qqp"]
    d = _points_distance(rng.normal(size=(10, 4)))
    fams = ev.paper_families(names)
    self.assertEqual(ev.paper_families(["synth_sst2#2", "synth_cola"]), ["sentiment", None])
    res = ev.grouping_test(d, fams, n_permutations=99)
    self.assertAlmostEqual(res.statistic, findings.group_agreement(d, names)["share"])

  def test_grouping_planted_families_small_p_orthogonal_labels_large_p(self):
    rng = np.random.default_rng(2)
    d = _clustered(rng, (3, 3, 3))
    planted = ["x"] * 3 + ["y"] * 3 + ["z"] * 3
    res = ev.grouping_test(d, planted, n_permutations=1999)
    self.assertEqual(res.statistic, 1.0)
    self.assertLess(res.p_value, 0.01)
    across = ["x", "y", "z"] * 3                  # each family takes one task of each cluster
    res = ev.grouping_test(d, across, n_permutations=1999)
    self.assertEqual(res.statistic, 0.0)
    self.assertGreater(res.p_value, 0.5)
    self.assertFalse(res.significant())

  def test_grouping_exact_p_equals_brute_force_enumeration(self):
    rng = np.random.default_rng(3)
    d = _points_distance(rng.normal(size=(6, 2)))
    fams = ["x", "x", "y", "y", None, "y"]
    nn = [min((j for j in range(6) if j != i), key=lambda j: d[i, j]) for i in range(6)]

    def share(labels):
      counted = [i for i in range(6) if labels[i] is not None and labels.count(labels[i]) >= 2]
      return sum(labels[nn[i]] == labels[i] for i in counted) / len(counted)

    null = [share(list(p)) for p in itertools.permutations(fams)]
    res = ev.grouping_test(d, fams, n_permutations=np.inf)
    self.assertTrue(res.exact)
    self.assertEqual(res.n_permutations, 720)
    self.assertAlmostEqual(res.statistic, share(fams))
    self.assertAlmostEqual(res.p_value, _brute_force_p(share(fams), null))

  def test_table3_exact_p_equals_brute_force_enumeration(self):
    rng = np.random.default_rng(4)
    t = 4
    delta, dist = rng.normal(size=(t, t)), rng.uniform(size=(t, t))
    rows_d = [np.delete(delta[i], i) for i in range(t)]
    rows_x = [np.delete(dist[i], i) for i in range(t)]

    def stat(rows):
      return np.mean([scipy.stats.spearmanr(a, b).statistic for a, b in zip(rows_d, rows)])

    null = [stat([r[list(p)] for r, p in zip(rows_x, perms)])
            for perms in itertools.product(itertools.permutations(range(t - 1)), repeat=t)]
    res = ev.table3_test(delta, dist, n_permutations=np.inf)
    self.assertEqual(res.n_permutations, 6 ** 4)
    self.assertAlmostEqual(res.statistic, stat(rows_x))
    self.assertAlmostEqual(res.p_value, _brute_force_p(stat(rows_x), null))

  def test_table3_small_p_for_monotone_delta_and_calibrated_for_independent_delta(self):
    rng = np.random.default_rng(5)
    t = 10
    d = _points_distance(rng.normal(size=(t, 3)))
    delta = np.exp(d) + 0.05 * rng.normal(size=(t, t))
    res = ev.table3_test(delta, d, n_permutations=999)
    self.assertGreater(res.statistic, 0.9)
    self.assertLess(res.p_value, 0.01)
    ps = []
    for seed in range(40):
      r = np.random.default_rng(100 + seed)
      d = _points_distance(r.normal(size=(t, 3)))
      ps.append(ev.table3_test(r.normal(size=(t, t)), d, n_permutations=499, seed=seed).p_value)
    ps = np.asarray(ps)
    self.assertLessEqual(np.mean(ps < 0.05), 0.15)
    self.assertTrue(0.3 < ps.mean() < 0.7, ps.mean())     # roughly uniform under the null

  def test_paired_sign_flip_equals_enumeration_and_is_directional(self):
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=8) + 0.8, rng.normal(size=8)
    diff = a - b
    null = [np.mean(diff * np.array(s)) for s in itertools.product((1, -1), repeat=8)]
    res = ev.paired_test(a, b)
    self.assertTrue(res.exact)
    self.assertEqual(res.n_permutations, 256)
    self.assertAlmostEqual(res.p_value, _brute_force_p(diff.mean(), null))
    self.assertLess(res.p_value, 0.05)
    self.assertGreater(ev.paired_test(b, a).p_value, 0.9)          # "b beats a": no
    with_nan = ev.paired_test(np.append(a, np.nan), np.append(b, 0.0))
    self.assertAlmostEqual(with_nan.p_value, res.p_value)

  def test_trend_exact_equals_enumeration_and_detects_a_fall(self):
    values = np.array([0.98, 0.9, 0.93, 0.7, 0.5, 0.35])
    layers = np.arange(6)
    obs = scipy.stats.spearmanr(layers, values).statistic
    null = [scipy.stats.spearmanr(layers, values[list(p)]).statistic
            for p in itertools.permutations(range(6))]
    res = ev.trend_test(values, alternative="less")
    self.assertAlmostEqual(res.statistic, obs)
    self.assertAlmostEqual(res.p_value, _brute_force_p(obs, null, "less"))
    self.assertLess(res.p_value, 0.05)
    self.assertGreater(ev.trend_test(values, alternative="greater").p_value, 0.95)
    conflicts = {str(n): {"mean": m, "std": 0.0, "subsets": 3}
                 for n, m in zip(range(2, 7), (0.1, 0.15, 0.2, 0.22, 0.3))}
    res = ev.sign_conflict_trend(conflicts)
    self.assertEqual(res.statistic, 1.0)
    self.assertAlmostEqual(res.p_value, 1 / 120)       # the one increasing order of five


class MergeStudyEvidenceTest(absltest.TestCase):

  def test_table3_and_cosine_vs_l2_from_a_pairs_document(self):
    rng = np.random.default_rng(7)
    t = 8
    cos = _points_distance(rng.normal(size=(t, 3)))
    l2 = _points_distance(rng.normal(size=(t, 3)))
    delta = cos + 0.01 * rng.normal(size=(t, t))
    np.fill_diagonal(delta, np.nan)
    from tvgeo_jax.studies import interference
    pairs = {"delta": delta.tolist(),
             "distances": {"query": {"cos": cos.tolist(), "l2": l2.tolist()}},
             "spearman": {"query": interference.spearman_table(delta, {"cos": cos, "l2": l2})}}
    tests = ev.table3_evidence(pairs, n_permutations=499)
    self.assertAlmostEqual(tests["query"]["cos"].statistic,
                           pairs["spearman"]["query"]["cos"]["mean"])
    self.assertLess(tests["query"]["cos"].p_value, 0.01)
    self.assertGreater(tests["query"]["l2"].p_value, 0.01)
    beats = ev.metric_beats(pairs, "query")
    self.assertLess(beats.p_value, 0.01)
    self.assertEqual(beats.n_permutations, 2 ** t)


class ChanceRuleTest(absltest.TestCase):

  def _constant_scores(self, counts, metric, cls):
    y = np.repeat(np.arange(len(counts)), counts)
    return metrics.compute_metrics([metric], np.full(y.shape, cls), y, details=False,
                                   label_names=[str(k) for k in range(len(counts))])[metric]

  def test_chance_levels_by_hand_and_against_constant_predictors(self):
    self.assertAlmostEqual(ev.chance_level("accuracy", [30, 70]), 0.7)
    self.assertAlmostEqual(ev.chance_level("f1", [30, 70]), 2 * 0.7 / 1.7)
    self.assertAlmostEqual(ev.chance_level("f1", [80, 20]), 2 * 0.2 / 1.2)   # positive = 1
    self.assertEqual(ev.chance_level("mcc", [50, 50]), 0.0)
    counts = [10, 20, 70]
    self.assertAlmostEqual(ev.chance_level("f1_macro", counts), 2 * 0.7 / 1.7 / 3)
    for metric, counts in [("accuracy", [30, 70]), ("f1", [30, 70]), ("f1", [80, 20]),
                           ("f1", [10, 20, 70]), ("f1_macro", [40, 35, 25])]:
      best = max(self._constant_scores(counts, metric, c) for c in range(len(counts)))
      self.assertAlmostEqual(ev.chance_level(metric, counts), best, msg=(metric, counts))
    np.testing.assert_array_equal(ev.label_counts([0, 1, 1, 2], 4), [1, 2, 1, 0])
    from tvgeo_jax.data import get_task
    cola, mrpc = get_task("synth_cola"), get_task("synth_mrpc")
    self.assertEqual(ev.task_chance_level(cola, [0, 1, 1]), 0.0)          # MCC
    self.assertAlmostEqual(ev.task_chance_level(mrpc, [0, 1, 1, 1]),
                           ev.chance_level(mrpc.main_metric, [1, 3]))

  def test_near_chance_lists_models_within_five_points(self):
    chance = {"sst2": 0.5, "cola": 0.0, "mrpc": 2 * 0.68 / 1.68, "rte": 0.5}
    scores = {"sst2": 0.91, "cola": 0.03, "mrpc": 0.83, "rte": 0.44}
    self.assertEqual(ev.near_chance(scores, chance), ["cola", "mrpc", "rte"])
    self.assertEqual(ev.near_chance(scores, chance, margin=0.02), ["rte"])
    self.assertEqual(ev.near_chance({"sst2": float("nan")}, chance), ["sst2"])
    verdict = ev.not_evaluated(["sst2", "rte"], scores, chance)
    self.assertFalse(verdict.evaluated)
    self.assertEqual(verdict.label(), "not evaluated: near chance — rte")
    self.assertIn("5 points", verdict.rule)
    self.assertTrue(ev.not_evaluated(["sst2"], scores, chance).evaluated)


if __name__ == "__main__":
  absltest.main()
