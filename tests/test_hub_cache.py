"""Hub task data from a real huggingface_hub cache layout on disk, offline (issue 17, item 10).

The cache is built as huggingface_hub lays it out (``datasets--nyu-mll--glue/refs/main``,
``snapshots/<commit>/<config>/<split>-00000-of-00001.parquet``) and read with
``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE=1``: nothing here touches the network.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest
import pyarrow as pa
import pyarrow.parquet as pq

from tvgeo_jax import data, hub, runs
from tvgeo_jax.data import hub_loading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def _pairs(n, tag):
  return {"sentence1": [f"{tag} one {i}" for i in range(n)],
          "sentence2": [f"{tag} two {i}" for i in range(n)],
          "label": pa.array([i % 2 for i in range(n)], pa.int64()),
          "idx": pa.array(list(range(n)), pa.int32())}


class HubCacheTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.cache = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.cache, ignore_errors=True)
    for key, value in (("HF_HUB_CACHE", self.cache), ("HF_HUB_OFFLINE", "1")):
      old = os.environ.get(key)
      os.environ[key] = value
      self.addCleanup(lambda k=key, v=old: os.environ.pop(k) if v is None
                      else os.environ.__setitem__(k, v))
    self.repo = os.path.join(self.cache, "datasets--nyu-mll--glue")

  def _cache(self, commit, config, splits, n=20, main=True):
    for split in splits:
      path = os.path.join(self.repo, "snapshots", commit, config,
                          f"{split}-00000-of-00001.parquet")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      pq.write_table(pa.table(_pairs(n, f"{config}@{commit[0]}")), path)
    if main:
      os.makedirs(os.path.join(self.repo, "refs"), exist_ok=True)
      with open(os.path.join(self.repo, "refs", "main"), "w") as f:
        f.write(commit)

  def test_another_config_in_the_cache_is_never_used(self):
    self._cache(COMMIT_A, "mrpc", ("train", "validation"))
    # rte (same columns, same labels) must not train on MRPC: offline, the folder is named.
    # In a fresh process, so huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE at import.
    code = textwrap.dedent("""
        from tvgeo_jax import data
        try:
          d = data.load_task_data("rte")
        except data.HubUnavailableError as e:
          print("MESSAGE", e)
        else:
          print("LOADED", d["test"].texts[0])
        """)
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=ROOT),
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    self.assertIn("MESSAGE", out.stdout, out.stdout + out.stderr[-2000:])
    self.assertRegex(out.stdout, r"'nyu-mll/glue' is cached without the folder 'rte/'.*"
                                 r"HF_HUB_OFFLINE.*--data_dir.*synth_rte")
    # The cached config itself loads, and its commit is what a run records.
    mrpc = data.load_task_data("mrpc")
    self.assertTrue(mrpc["test"].texts[0][0].startswith("mrpc@a"))
    self.assertEqual(runs.data_revision({"task": "mrpc", "data_dir": None}), COMMIT_A)

  def test_a_missing_split_is_named(self):
    self._cache(COMMIT_A, "rte", ("train",))
    with self.assertRaisesRegex(hub.HubUnavailableError,
                                r"without the split\(s\) \['validation'\] in 'rte/'"):
      data.load_task_data("rte")

  def test_data_revision_selects_the_snapshot(self):
    self._cache(COMMIT_A, "rte", ("train", "validation"))
    self._cache(COMMIT_B, "rte", ("train", "validation"), main=False)
    self.assertTrue(data.load_task_data("rte")["test"].texts[0][0].startswith("rte@a"))
    pinned = data.load_task_data("rte", revision=COMMIT_B)
    self.assertTrue(pinned["test"].texts[0][0].startswith("rte@b"))
    self.assertEqual(runs.data_revision({"task": "rte", "data_revision": COMMIT_B}), COMMIT_B)
    self.assertIsNone(runs.data_revision({"task": "synth_rte"}))
    with self.assertRaisesRegex(hub.HubUnavailableError, "not cached at revision 'c{40}'"):
      data.load_task_data("rte", revision="c" * 40)
    with self.assertRaisesRegex(ValueError, "does not apply to --data_dir"):
      data.load_task_data("rte", data_dir=self.cache, revision=COMMIT_B)
    with self.assertRaisesRegex(ValueError, "--data_revision applies to real tasks"):
      data.load_task_data("synth_rte", revision=COMMIT_B)

  def test_a_run_records_the_dataset_commit(self):
    from tvgeo_jax.training import compile_cache, loop, presets
    compile_cache.enable(os.path.join(tempfile.gettempdir(), "tvgeo_jax_test_xla_cache"))
    self._cache(COMMIT_A, "rte", ("train", "validation"), n=40)
    self._cache(COMMIT_B, "rte", ("train", "validation"), n=40, main=False)
    config = presets.resolve("rte", "lora", "tiny-random", overrides=dict(
        epochs=1, max_seq_len=16, batch_size=16, eval_batch_size=16, progress=False,
        lora_rank=2, data_revision=COMMIT_B))
    results = loop.finetune(config, os.path.join(self.cache, "run"))
    saved = runs.load_run(os.path.join(self.cache, "run"), load_params=False).results
    self.assertEqual((results["data_revision"], saved["data_revision"]), (COMMIT_B, COMMIT_B))
    self.assertEqual(saved["config"]["data_revision"], COMMIT_B)

  def test_local_copy_with_another_task_only_is_refused(self):
    # The same fallback in a --data_dir copy: a parent holding only mrpc/ is not rte.
    self._cache(COMMIT_A, "mrpc", ("train", "validation"))
    root = os.path.join(self.repo, "snapshots", COMMIT_A)
    with self.assertRaisesRegex(data.DataNotFoundError,
                                r"holds no 'rte/' folder.*its folders: \['mrpc'\]"):
      data.load_task_data("rte", data_dir=root)

  def test_only_the_needed_splits_are_requested(self):
    # huggingface_hub's own filter applied to the files of nyu-mll/glue's mnli config.
    from huggingface_hub.utils import filter_repo_objects
    files = [f"mnli/{s}-00000-of-00001.parquet" for s in (
        "train", "validation_matched", "validation_mismatched", "test_matched",
        "test_mismatched")] + ["mrpc/train-00000-of-00001.parquet", "README.md"]
    task = data.get_task("mnli")
    patterns = [f"mnli/{g}" for s in ("train", task.test_split)
                for g in hub_loading._split_globs(s)]
    self.assertEqual(sorted(filter_repo_objects(files, allow_patterns=patterns)),
                     ["mnli/train-00000-of-00001.parquet",
                      "mnli/validation_matched-00000-of-00001.parquet"])


if __name__ == "__main__":
  absltest.main()
