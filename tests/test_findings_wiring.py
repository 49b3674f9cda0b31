"""Findings as evidence, wired into the study (issue 20): each study's findings carry
p-values and "not evaluated"; the distance step's seed floor; the seeds plan; the report
renders the summaries (prediction section included); the one Grassmann rule; PCA colours.

The smoke study's outputs are checked in tests/test_reproduce.py; here the pieces run
in-process on planted numbers, against independent references (brute-force permutation
enumeration, numpy nearest neighbours).
"""
import dataclasses
import itertools
import os
import tempfile

from absl.testing import absltest
import numpy as np

from tvgeo_jax import geometry
from tvgeo_jax.core import figures, io_utils
from tvgeo_jax.studies import distance_study, evidence, merge_prediction, merge_study, report
from tvgeo_jax.studies import reproduce


def _euclidean(points):
  return np.linalg.norm(points[:, None] - points[None], axis=-1)


def _planted(rng, tasks, seeds, family_gap, seed_noise, layers=3):
  """``{module/product/metric: [R, R, L]}`` of runs (task-major, ``task#2`` for seed 2):
  points at family centres ``family_gap`` apart, tasks 1 apart within a family, each
  seed displaced by ``seed_noise``."""
  fams = evidence.paper_families(tasks)
  centres = {f: rng.normal(size=4) * family_gap for f in set(fams)}
  names, pts = [], []
  for t, f in zip(tasks, fams):
    base = centres[f] + rng.normal(size=4)
    for k in range(seeds):
      names.append(t if k == 0 else f"{t}#{k + 1}")
      pts.append(base + seed_noise * rng.normal(size=4))
  d = _euclidean(np.asarray(pts))
  arr = np.repeat(d[..., None], layers, axis=-1)
  return {f"query/product/{m}": arr.copy() for m in ("l2", "cosine")}, names


TASKS = ["sst2", "yelp", "imdb", "mnli", "snli", "qnli"]


def _grouping_share(arrays, names):
  """The independent reference: each task's nearest neighbour under the mean query
  cosine distance, and ``share(families)`` of tasks whose neighbour shares its family."""
  d = np.nanmean(arrays["query/product/cosine"], -1)
  np.fill_diagonal(d, np.inf)
  nn = d.argmin(1)
  return (lambda f: np.mean([f[i] == f[nn[i]] for i in range(len(f))]),
          evidence.paper_families(names))


class DistanceFindingsTest(absltest.TestCase):

  def test_grouping_p_value_matches_brute_force_enumeration(self):
    rng = np.random.default_rng(0)
    arrays, names = _planted(rng, TASKS, 1, family_gap=10.0, seed_noise=0.0)
    s = distance_study.distance_findings(arrays, names, method="lora")
    row = next(r for r in s["grouping"] if r["metric"] == "cosine")
    share, fams = _grouping_share(arrays, names)
    self.assertEqual(share(fams), 1.0)
    null = [share(list(p)) for p in itertools.permutations(fams)]  # every relabelling
    self.assertEqual(row["share"], 1.0)
    self.assertEqual(row["test"]["n_permutations"], 720)    # 6! relabellings: exact
    self.assertAlmostEqual(row["test"]["p_value"], np.mean(np.array(null) >= 1.0))
    self.assertAlmostEqual(row["test"]["p_value"], 0.1)     # two families of 3: little power
    self.assertIn("not shown", s["findings"][0]["verdict"])
    self.assertNotIn("seed_floor", s)                       # one seed: no floor
    # Eight tasks (families of 3, 3, 2): 8! relabellings, 9999 drawn at random.
    tasks = TASKS + ["rte", "mrpc"]
    arrays, names = _planted(rng, tasks, 1, family_gap=10.0, seed_noise=0.0)
    s = distance_study.distance_findings(arrays, names, method="lora")
    row = next(r for r in s["grouping"] if r["metric"] == "cosine")
    share, fams = _grouping_share(arrays, names)
    exact = np.mean([share(list(p)) >= row["share"] for p in itertools.permutations(fams)])
    self.assertEqual(row["share"], 1.0)
    self.assertEqual(row["test"]["n_permutations"], 9999)
    self.assertAlmostEqual(row["test"]["p_value"], exact, delta=0.003)
    f = s["findings"][0]
    self.assertIn("cosine groups better than L2", f["measured"])
    self.assertTrue(f["verdict"].startswith("grouping share, cosine (query): shown"), f)

  def test_seed_floor_is_reported_and_gates_the_grouping(self):
    rng = np.random.default_rng(1)
    arrays, names = _planted(rng, TASKS, 2, family_gap=10.0, seed_noise=0.05)
    s = distance_study.distance_findings(arrays, names)
    self.assertTrue(s["seeds"])
    floor = s["seed_floor"]["query/product/cosine"]
    d = arrays["query/product/cosine"][..., 0]
    same = [d[2 * k, 2 * k + 1] for k in range(len(TASKS))]   # runs are task-major
    self.assertAlmostEqual(floor["floor"][0], max(same))
    row = next(r for r in s["grouping"] if r["metric"] == "cosine")
    self.assertTrue(row["seed_floor"]["clears"])
    self.assertNotIn("not counted", s["findings"][0]["verdict"])
    # Seed noise far above the family gap: the grouping does not count.
    arrays, names = _planted(rng, TASKS, 2, family_gap=0.1, seed_noise=50.0)
    s = distance_study.distance_findings(arrays, names)
    row = next(r for r in s["grouping"] if r["metric"] == "cosine")
    self.assertFalse(row["seed_floor"]["clears"])
    self.assertTrue(s["findings"][0]["verdict"].startswith("not counted"))

  def test_near_chance_models_make_the_finding_not_evaluated(self):
    rng = np.random.default_rng(2)
    arrays, names = _planted(rng, TASKS + ["rte", "mrpc"], 1, family_gap=10.0, seed_noise=0.0)
    ev = evidence.not_evaluated(["sst2/lora", "mnli/lora"], {"sst2/lora": 0.52,
                                                             "mnli/lora": 0.9},
                                {"sst2/lora": 0.5, "mnli/lora": 0.34})
    f = distance_study.distance_findings(arrays, names, evaluability=ev)["findings"][0]
    self.assertFalse(f["evaluated"])
    self.assertEqual(f["near_chance"], ["sst2/lora"])
    self.assertEqual(f["verdict"], "not evaluated: near chance — sst2/lora")
    self.assertLess(f["tests"][0]["p_value"], 0.05)    # the test is kept, not the verdict

  def test_the_grouping_is_also_judged_on_the_tasks_above_chance(self):
    rng = np.random.default_rng(3)
    tasks = TASKS + ["rte", "mrpc"]
    arrays, names = _planted(rng, tasks, 1, family_gap=10.0, seed_noise=0.0)
    ev = evidence.not_evaluated(["rte/lora", "sst2/lora"], {"rte/lora": 0.5, "sst2/lora": 0.9},
                                {"rte/lora": 0.5, "sst2/lora": 0.5})
    s = distance_study.distance_findings(arrays, names, method="lora", evaluability=ev)
    self.assertEqual(s["learnt_tasks"], [t for t in tasks if t != "rte"])
    first, learnt = s["findings"][0], s["findings"][1]
    self.assertFalse(first["evaluated"])
    self.assertTrue(learnt["evaluated"])
    self.assertIn("the 7 tasks above chance", learnt["claim"])
    # The same numbers as the study run on the seven tasks alone.
    keep = [i for i, n in enumerate(names) if n != "rte"]
    alone = distance_study.distance_findings(
        {k: (np.asarray(v)[np.ix_(keep, keep)] if k in evidence.distance_keys(arrays) else v)
         for k, v in arrays.items()}, [names[i] for i in keep], method="lora")
    self.assertEqual(learnt["tests"][0]["p_value"], alone["findings"][0]["tests"][0]["p_value"])
    self.assertEqual(learnt["measured"].split(":", 1)[1], alone["findings"][0]["measured"]
                     .split(":", 1)[1])
    self.assertTrue(learnt["verdict"].startswith("grouping share, cosine (query, the 7 tasks "
                                                 "above chance): "), learnt["verdict"])


class Table3LearntTest(absltest.TestCase):

  def test_table3_is_also_judged_on_the_tasks_above_chance(self):
    rng = np.random.default_rng(4)
    names = [f"synth_t{k}" for k in range(7)]
    x = rng.normal(size=(7, 3))
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    cols = {"l2": d + rng.normal(scale=0.5, size=d.shape), "cos": d, "d_G": d ** 2}
    delta = 0.1 * d + 0.001 * rng.normal(size=d.shape)
    delta[0] = rng.normal(size=7)                    # a task that did not learn
    np.fill_diagonal(delta, np.nan)
    distances = {"query": cols}
    grid = {"task_names": names, "delta": delta.tolist(), "distances": distances,
            "spearman": merge_study.interference_tables(delta, distances, names)}
    ev = evidence.not_evaluated(["synth_t0/lora", "synth_t1/lora"],
                                {"synth_t0/lora": 0.51, "synth_t1/lora": 0.9},
                                {"synth_t0/lora": 0.5, "synth_t1/lora": 0.5})
    found = merge_study.study_findings({"pairs": {"lora_factor_average": grid}}, ev,
                                       n_permutations=999)
    first, learnt = found[0], found[1]
    self.assertFalse(first["evaluated"])
    self.assertTrue(learnt["evaluated"])
    self.assertIn("query, the 6 tasks above chance", learnt["claim"])
    # The same numbers as the study on the six learnt tasks alone.
    keep = list(range(1, 7))
    ix = np.ix_(keep, keep)
    sub_cols = {"query": {c: v[ix] for c, v in cols.items()}}
    alone = {"task_names": names[1:], "delta": delta[ix].tolist(), "distances": sub_cols,
             "spearman": merge_study.interference_tables(delta[ix], sub_cols, names[1:])}
    ref = merge_study.study_findings({"pairs": {"lora_factor_average": alone}},
                                     n_permutations=999)[0]
    self.assertEqual(learnt["measured"], ref["measured"])
    self.assertEqual([t["p_value"] for t in learnt["tests"]],
                     [t["p_value"] for t in ref["tests"]])
    self.assertEqual(learnt["tests"][-1]["name"],
                     "mean ρ_cos − ρ_l2 (query, the 6 tasks above chance)")
    self.assertLess(learnt["tests"][0]["p_value"], 0.05)   # δ follows the cosine here
    # Too few learnt tasks: no second finding.
    few = evidence.not_evaluated([f"synth_t{k}/lora" for k in range(4)],
                                 {f"synth_t{k}/lora": 0.5 for k in range(4)},
                                 {f"synth_t{k}/lora": 0.5 for k in range(4)})
    self.assertLen(merge_study.study_findings({"pairs": {"lora_factor_average": grid}}, few,
                                              n_permutations=99), 1)


class FindingTest(absltest.TestCase):

  def test_verdict_comes_from_the_p_value_only(self):
    t = evidence.PermutationResult("s", statistic=9.0, p_value=0.2, n_permutations=99,
                                   alternative="greater")
    self.assertEqual(evidence.Finding("c", "m", (t,)).verdict(), "s: not shown (p = 0.2 ≥ 0.05)")
    t2 = evidence.PermutationResult("s", statistic=0.01, p_value=0.01, n_permutations=99,
                                    alternative="greater")
    self.assertEqual(evidence.Finding("c", "m", (t2,)).verdict(), "s: shown (p = 0.01 < 0.05)")
    self.assertEqual(evidence.Finding("c", "m", untested="n < 3").verdict(),
                     "descriptive (no test: n < 3)")
    d = evidence.Finding("c", "m", (t2,)).to_dict()
    self.assertEqual((d["tests"][0]["p_value"], d["tests"][0]["level"]), (0.01, 0.05))
    # In the report's test table a finding that is not evaluated says so beside its test.
    ev = evidence.Evaluability(evaluated=False, near_chance=("rte/lora",), rule="r")
    blocks = report.finding_blocks([d, evidence.Finding("c", "m", (t2,), evaluability=ev)
                                    .to_dict()])
    table = blocks[-1][2]
    self.assertEqual(table[0][-1], "shown (p = 0.01 < 0.05)")
    self.assertEqual(table[1][-1], "not evaluated (near chance; the test alone: shown "
                                   "(p = 0.01 < 0.05))")
    self.assertIn("not evaluated: near chance — rte/lora", blocks[1][1])


class SeedsPlanTest(absltest.TestCase):

  def test_the_headline_names_the_seed_of_a_repeated_task(self):
    runs = [{"task": t, "config": {"seed": k}, "main_metric": "accuracy",
             "metrics": {"test": {"accuracy": a}}}
            for t, k, a in (("qnli", 0, 0.893), ("qnli", 1, 0.82), ("sst2", 0, 0.97))]
    self.assertEqual(reproduce.finetune_headline(runs), "test main metric ×100: qnli (seed 1) "
                     "82.0, qnli (seed 0) 89.3, sst2 97.0")

  def test_seed_tasks_get_the_seeds_and_the_other_tasks_one_run(self):
    preset = dataclasses.replace(reproduce.get_preset("smoke"), model="embedded", seeds=2,
                                 seed_tasks=("synth_yelp",))
    pipe = reproduce.Pipeline(preset, "/tmp/x")
    self.assertEqual([(t, k) for t, m, k in pipe.finetune_jobs() if m == "lora"],
                     [("synth_sst2", 0), ("synth_yelp", 0), ("synth_yelp", 1),
                      ("synth_mrpc", 0)])
    self.assertEqual(pipe.model_keys("full"),
                     ["synth_sst2/full", "synth_yelp/full", "synth_yelp#2/full",
                      "synth_mrpc/full"])
    self.assertEqual(pipe.model_keys("full", all_seeds=False),
                     ["synth_sst2/full", "synth_yelp/full", "synth_mrpc/full"])
    # --seeds on the command line puts the seeds on every task
    self.assertIsNone(reproduce.get_preset("offline", seeds=2).seed_tasks)
    # the offline default: a second seed of one task (its seed floor); --seeds=1 drops it
    offline = reproduce.get_preset("offline")
    self.assertEqual((offline.seeds, offline.seed_tasks), (2, ("synth_sst2", "synth_qnli")))
    self.assertEqual(reproduce.get_preset("offline", seeds=1).seeds, 1)
    self.assertEqual(reproduce.get_preset("offline", seed_tasks=["synth_qnli"]).seed_tasks,
                     ("synth_qnli",))
    with self.assertRaisesRegex(ValueError, "--seed_tasks needs --seeds=N"):
      reproduce.get_preset("paper", seed_tasks=["mrpc"])
    names = [s.name for s in reproduce.Pipeline(offline, "/tmp/z").steps()]
    self.assertIn("finetune full (12 runs in concurrent groups of up to 4, 2 seeds on "
                  "synth_sst2, synth_qnli)", names)

  def test_seeds_are_extra_members_of_each_group_with_their_own_run_dirs(self):
    preset = dataclasses.replace(reproduce.get_preset("smoke"), model="embedded", seeds=2)
    pipe = reproduce.Pipeline(preset, "/tmp/x")
    groups = pipe.finetune_groups()
    self.assertEqual([m for m, _ in groups], ["full", "lora"])
    self.assertLen(groups[0][1], 6)
    self.assertEqual(pipe.run_dir("synth_sst2", "lora", 1), "/tmp/x/runs/synth_sst2_s1/lora")
    self.assertEqual(pipe.run_dir("synth_sst2", "lora"), "/tmp/x/runs/synth_sst2/lora")
    c0, c1 = (preset.train_config("synth_sst2", "lora", k) for k in (0, 1))
    self.assertEqual(c1.seed, c0.seed + 1)
    self.assertEqual(c0.replace(seed=c1.seed), c1)              # only the seed differs
    names = [s.name for s in pipe.steps()]
    self.assertIn("finetune lora (6 runs concurrently, 2 seeds)", names)
    self.assertEqual(names.index("scores"), 3)
    self.assertNotIn("prediction", names)                      # 3 tasks < 4
    self.assertIn("prediction", [s.name for s in reproduce.Pipeline(
        reproduce.get_preset("offline"), "/tmp/y").steps()])
    with self.assertRaisesRegex(ValueError, "seeds must be >= 1"):
      reproduce.get_preset("offline", seeds=0)
    with self.assertRaisesRegex(ValueError, "needs a pretrained base"):
      reproduce.get_preset("smoke", seeds=2)       # tiny-random: the base is drawn per seed
    self.assertEqual(reproduce.get_preset("paper", seeds=3).seeds, 3)


class PredictionSectionTest(absltest.TestCase):

  def test_report_renders_the_prediction_summary(self):
    rng = np.random.default_rng(3)
    t = 6
    names = [f"synth_t{k}" for k in range(t)]
    x = rng.normal(size=(t, 3))
    d = _euclidean(x)
    arrays = {f"query/product/{m}": np.repeat(d[..., None], 2, -1) for m in ("l2", "cosine")}
    delta = 0.1 * d + 0.001 * rng.normal(size=d.shape)
    np.fill_diagonal(delta, np.nan)
    out = tempfile.mkdtemp()
    pairs = {"task_names": names, "delta": delta.tolist(), "method": "lora_factor_average",
             "score": "main"}
    res = merge_prediction.run_prediction(arrays, names, pairs, os.path.join(out, "prediction"))
    pipe = reproduce.Pipeline(reproduce.get_preset("offline"), out)
    blocks = report.prediction_section(pipe)
    table = next(b for b in blocks if b[0] == "table")
    got = {r[0]: r for r in table[2]}
    self.assertEqual(set(got), {"ridge", "gradient_boosting", "mean", "best_feature"})
    self.assertEqual(got["ridge"][2], f"{res['predictors']['ridge']['mean_spearman']:.3f}")
    self.assertEqual(got["mean"][1], "baseline")
    self.assertTrue(any(b[0] == "img" and b[1].endswith(merge_prediction.FIGURE_FILE)
                        for b in blocks))
    md = report.to_markdown(blocks, out)
    self.assertIn("Leave-one-task-out over 6 tasks", md)


class GrassmannRuleTest(absltest.TestCase):

  def test_one_rule(self):
    self.assertEqual(geometry.meaningful_metrics(geometry.METRICS, is_lora=True),
                     ("l2", "cosine", "grassmann"))
    self.assertEqual(geometry.meaningful_metrics(geometry.METRICS, is_lora=False),
                     ("l2", "cosine"))
    self.assertEqual(geometry.meaningful_metrics(geometry.METRICS, False, top_k=8),
                     ("l2", "cosine", "grassmann"))


class PcaFamiliesTest(absltest.TestCase):

  def test_points_are_coloured_by_family_with_a_legend(self):
    d = _euclidean(np.random.default_rng(4).normal(size=(5, 3)))
    fig, (ax,) = figures.panels(1)
    groups = ["sentiment", "sentiment", "inference", None, "inference"]
    figures.plot_pca(ax, d, ["a", "b", "c", "d", "e"], groups=groups)
    self.assertEqual([t.get_text() for t in ax.get_legend().get_texts()],
                     ["sentiment", "inference", "other"])
    sizes = [len(c.get_offsets()) for c in ax.collections]
    self.assertEqual(sizes, [2, 2, 1])
    colours = [tuple(c.get_facecolor()[0]) for c in ax.collections]
    self.assertLen(set(colours), 3)


if __name__ == "__main__":
  absltest.main()
