"""A cut-down reproduction end to end (three tasks, one short epoch), and the dry-run plan."""
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import numpy as np

from tvgeo_jax import data
from tvgeo_jax.core import io_utils
from tvgeo_jax.studies import reproduce
from tvgeo_jax.training import runs


class SmokeReproductionTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.out = tempfile.mkdtemp()
    cls.pipe = reproduce.Pipeline(reproduce.get_preset("smoke"), cls.out)
    cls.state = cls.pipe.run(progress=False)
    with open(os.path.join(cls.out, "report.md")) as f:
      cls.report = f.read()

  def test_every_step_ran_and_wrote_its_outputs(self):
    p = self.pipe.preset
    for task in p.tasks:
      for method in p.methods:
        self.assertTrue(runs.is_finished(self.pipe.run_dir(task, method)), (task, method))
    for method in p.methods:
      z = np.load(os.path.join(self.out, "distances", method, "distances.npz"))
      self.assertEqual(z["value/product/cosine"].shape[:2], (3, 3))
    self.assertTrue(os.path.exists(os.path.join(self.out, "merge", "summary.json")))
    self.assertTrue(os.path.exists(os.path.join(self.out, "report.html")))

  def test_table2_is_filled_from_the_saved_results(self):
    table = self.report.split("## Table 2")[1].split("##")[0]
    for task in self.pipe.preset.tasks:
      row = [l for l in table.splitlines() if l.startswith(f"| {task} ")]
      self.assertLen(row, 1)
      cells = [c.strip() for c in row[0].strip("|").split("|")][1:]
      for method, cell in zip(self.pipe.preset.methods, cells):
        res = io_utils.read_json(os.path.join(self.pipe.run_dir(task, method), runs.RESULTS))
        self.assertEqual(cell, f"{100 * res['metrics']['test']['main']:.2f}")

  def test_findings_and_table3_are_in_the_report(self):
    self.assertIn("cosine groups better than L2", self.report)
    self.assertIn("B closer to BA than A", self.report)
    self.assertIn("Spearman ρ between δ(i, ·) and T̄_d(i, ·)", self.report)
    self.assertRegex(self.report, r"mean ρ L2 (-?\d\.\d\d|nan), cos")
    with open(os.path.join(self.out, "report.html")) as f:
      page = f.read()
    self.assertIn("data:image/png;base64,", page)  # figures inlined: self-contained
    self.assertNotRegex(page, r'<img src="(?!data:)')

  def test_summaries_carry_chance_levels_p_values_and_not_evaluated(self):
    sc = io_utils.read_json(os.path.join(self.out, "scores", "summary.json"))
    self.assertLen(sc["models"], 6)
    for key, r in sc["models"].items():
      spec = data.get_task(r["task"])
      y = np.asarray(data.load_task_data(r["task"], seed=r["seed"], scale=0.1)["test"].labels)
      p = np.bincount(y, minlength=2) / len(y)              # independent: label shares
      want = p.max() if spec.main_metric == "accuracy" else 2 * p[1] / (1 + p[1])
      self.assertAlmostEqual(r["chance"], want, msg=key)
      self.assertEqual(r["near_chance"], not r["main"] >= r["chance"] + 0.05, key)
    near = set(sc["near_chance"])
    found = io_utils.read_json(os.path.join(self.out, "merge", "summary.json"))["findings"]
    for method in self.pipe.preset.methods:
      found += io_utils.read_json(os.path.join(self.out, "distances", method,
                                               "summary.json"))["findings"]
    self.assertGreater(sum(len(f["tests"]) for f in found), 4)
    for f in found:
      self.assertIn("verdict", f)
      for t in f["tests"]:
        self.assertTrue(0 < t["p_value"] <= 1, t)
        self.assertGreater(t["n_permutations"], 0)
        self.assertEqual(t["level"], 0.05)
      if f["near_chance"]:
        self.assertTrue(set(f["near_chance"]) <= near)
        self.assertEqual(f["verdict"], "not evaluated: near chance — "
                         + ", ".join(f["near_chance"]))
    for m in near:
      self.assertIn(m, self.report)
    self.assertIn("## How the findings are judged", self.report)
    self.assertIn("p (permutations)", self.report)
    self.assertIn("| finding | test | statistic | p | permutations |", self.report)
    self.assertIn("Not run in this preset (needs LoRA runs of at least 4 tasks).", self.report)
    self.assertIn("| task | full | lora | chance | bag of words |", self.report)

  def test_training_only_runs_the_base_and_the_fine_tuning_alone(self):
    # What --multihost runs on every host; the analysis is left to a single-host rerun.
    names = [s.name for s in self.pipe.steps() if s.training]
    self.assertEqual(names, ["base"] + [f"finetune {m} (3 tasks concurrently)"
                                        for m in self.pipe.preset.methods])
    report = os.path.join(self.out, "report.md")
    before = os.stat(report).st_mtime_ns
    self.pipe.run(progress=False, training_only=True)
    self.assertEqual(os.stat(report).st_mtime_ns, before)  # the report step did not run

  def test_rerun_skips_finished_steps(self):
    state = reproduce.Pipeline(self.pipe.preset, self.out).run(progress=False)
    # Only the report is rebuilt; every other step was found done.
    self.assertLess(state["last_total_seconds"], 30)


class DryRunTest(absltest.TestCase):

  def test_paper_plan_offline(self):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "experiments.reproduce", "--preset=paper",
                          "--dry_run"], env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    self.assertEqual(out.returncode, 0, out.stderr[-2000:])
    self.assertIn('"num_runs": 21', out.stdout)
    self.assertRegex(out.stdout, r'"total_pflops_upper_bound": \d+')

  def test_offline_plan_counts_the_synthetic_rows_it_trains_on(self):
    plan = reproduce.dry_run_plan(reproduce.get_preset("offline"))
    run = next(r for r in plan["runs"] if r["task"] == "synth_cola" and r["method"] == "full")
    cfg = reproduce.get_preset("offline").train_config("synth_cola", "full")
    raw = data.load_task_data("synth_cola", seed=cfg.seed, scale=cfg.data_scale)
    n = len(raw["train"][0])
    self.assertLessEqual(abs(run["train_examples"] - n), 2)   # the generator rounds per class
    self.assertEqual(run["max_steps"], cfg.epochs * -(-run["train_examples"] // 32))
    self.assertLess(run["max_steps"], 300)   # 4,050 rows, not CoLA's real 8,551 × 0.9

  def test_unknown_preset(self):
    with self.assertRaisesRegex(ValueError, "Unknown preset 'x'; choose one of offline"):
      reproduce.get_preset("x")


if __name__ == "__main__":
  absltest.main()
