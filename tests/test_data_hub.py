"""Real-task loading from local copies in the hub's formats, the split policy, offline errors."""
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from absl.testing import absltest

from tvgeo_jax import data

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_parquet(path, columns):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pq.write_table(pa.table(columns), path)


def _qnli_columns(n, offset=0, label=None):
  rng = np.random.default_rng(offset)
  return {"question": [f"what is item {i}?" for i in range(offset, offset + n)],
          "sentence": [f"item {i} is a thing." for i in range(offset, offset + n)],
          "label": pa.array(rng.integers(0, 2, n) if label is None else [label] * n,
                            pa.int64()),
          "idx": pa.array(np.arange(n), pa.int32())}


class RegistryTest(absltest.TestCase):

  def test_tasks(self):
    self.assertLen(data.PAPER_TASKS, 10)
    self.assertEqual(data.SYNTH_PAPER_TASKS, tuple("synth_" + t for t in data.PAPER_TASKS))
    for name in data.PAPER_TASKS + ("stsb",):
      spec = data.get_task(name)
      self.assertFalse(spec.is_synthetic)
      self.assertEqual(data.get_task(spec.counterpart).counterpart, name)
    self.assertEqual(data.get_task("cola").main_metric, "mcc")
    self.assertEqual(data.get_task("mrpc").metrics, ("f1", "accuracy"))
    self.assertEqual(data.get_task("mnli").test_split, "validation_matched")
    stsb = data.get_task("stsb")
    self.assertTrue(stsb.is_regression)
    self.assertEqual(stsb.num_labels, 1)
    self.assertEqual(data.get_task("SST-2").name, "sst2")
    self.assertEqual(data.get_task("synth_authorship").num_labels, 4)

  def test_unknown_task_lists_valid_ones(self):
    with self.assertRaisesRegex(ValueError, r"Unknown task 'qnlii'.*qnli.*synth_imdb"):
      data.get_task("qnlii")


class LocalCopyTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)

  def test_glue_parquet_hub_layout(self):
    # nyu-mll/glue layout: <config>/<split>-00000-of-00001.parquet
    _write_parquet(f"{self.root}/qnli/train-00000-of-00001.parquet", _qnli_columns(100))
    _write_parquet(f"{self.root}/qnli/validation-00000-of-00001.parquet",
                   _qnli_columns(30, offset=1000))
    _write_parquet(f"{self.root}/qnli/test-00000-of-00001.parquet",
                   _qnli_columns(20, offset=2000, label=-1))
    d = data.load_task_data("qnli", data_dir=self.root)
    self.assertEqual(d.sizes(), {"train": 90, "validation": 10, "test": 30})
    # The GLUE dev split is the test set, in order, with its labels.
    dev = _qnli_columns(30, offset=1000)
    self.assertEqual(d["test"].texts, list(zip(dev["question"], dev["sentence"])))
    np.testing.assert_array_equal(d["test"].labels, dev["label"].to_numpy())
    self.assertEqual(d["test"].labels.dtype, np.int32)
    # Train and validation partition the train file, labels travelling with their texts.
    full = _qnli_columns(100)
    label_of = {(q, s): y for q, s, y in zip(full["question"], full["sentence"],
                                             full["label"].to_pylist())}
    both = d["train"].texts + d["validation"].texts
    self.assertCountEqual(both, label_of)
    for split in ("train", "validation"):
      self.assertEqual([label_of[t] for t in d[split].texts], d[split].labels.tolist())
    # Deterministic for a seed, different across seeds; the task folder itself also works.
    again = data.load_task_data("qnli", data_dir=os.path.join(self.root, "qnli"))
    self.assertEqual(again["validation"].texts, d["validation"].texts)
    other = data.load_task_data("qnli", data_dir=self.root, seed=1)
    self.assertNotEqual(set(other["validation"].texts), set(d["validation"].texts))

  def test_mnli_uses_validation_matched(self):
    cols = lambda n, off: {"premise": [f"p{i}" for i in range(off, off + n)],
                           "hypothesis": [f"h{i}" for i in range(off, off + n)],
                           "label": pa.array(np.arange(n) % 3, pa.int64()),
                           "idx": pa.array(np.arange(n), pa.int32())}
    _write_parquet(f"{self.root}/mnli/train-00000-of-00001.parquet", cols(50, 0))
    _write_parquet(f"{self.root}/mnli/validation_matched-00000-of-00001.parquet", cols(12, 100))
    _write_parquet(f"{self.root}/mnli/validation_mismatched-00000-of-00001.parquet",
                   cols(17, 200))
    d = data.load_task_data("mnli", data_dir=self.root)
    self.assertEqual(d.sizes(), {"train": 45, "validation": 5, "test": 12})
    self.assertEqual(d["test"].texts[0], ("p100", "h100"))

  def test_snli_drops_unlabelled_rows(self):
    labels = [0, 1, 2, -1] * 25
    cols = lambda off: {"premise": [f"p{off + i}" for i in range(100)],
                        "hypothesis": [f"h{off + i}" for i in range(100)],
                        "label": pa.array(labels, pa.int64())}
    for split, off in (("train", 0), ("validation", 1000), ("test", 2000)):
      _write_parquet(f"{self.root}/plain_text/{split}-00000-of-00001.parquet", cols(off))
    d = data.load_task_data("snli", data_dir=self.root)
    # 75 labelled train rows -> 90/10; SNLI keeps its own test split (75 labelled rows).
    self.assertEqual(d.sizes(), {"train": 67, "validation": 8, "test": 75})
    for split in d.splits.values():
      self.assertGreaterEqual(split.labels.min(), 0)

  def test_stsb_regression_single_file_names(self):
    rng = np.random.default_rng(0)
    cols = lambda n: {"sentence1": [f"a{i}" for i in range(n)],
                      "sentence2": [f"b{i}" for i in range(n)],
                      "label": pa.array(rng.uniform(0, 5, n).astype(np.float32)),
                      "idx": pa.array(np.arange(n), pa.int32())}
    _write_parquet(f"{self.root}/train.parquet", cols(40))
    _write_parquet(f"{self.root}/validation.parquet", cols(8))
    d = data.load_task_data("stsb", data_dir=self.root)
    self.assertEqual(d.sizes(), {"train": 36, "validation": 4, "test": 8})
    self.assertEqual(d["train"].labels.dtype, np.float32)

  def test_imdb_save_to_disk_dataset_dict(self):
    import datasets
    mk = lambda n, off, label=None: datasets.Dataset.from_dict(
        {"text": [f"review {off + i}" for i in range(n)],
         "label": [label if label is not None else i % 2 for i in range(n)]})
    path = os.path.join(self.root, "imdb_copy")
    datasets.DatasetDict({"train": mk(60, 0), "test": mk(24, 100),
                          "unsupervised": mk(10, 500, -1)}).save_to_disk(path)
    d = data.load_task_data("imdb", data_dir=path)
    self.assertEqual(d.sizes(), {"train": 54, "validation": 6, "test": 24})
    self.assertEqual(d["test"].texts[3], ("review 103",))

  def test_yelp_arrow_split_folders(self):
    import datasets
    for split, n in (("train", 30), ("test", 10)):
      datasets.Dataset.from_dict({"label": [i % 2 for i in range(n)],
                                  "text": [f"{split} {i}" for i in range(n)]}).save_to_disk(
                                      os.path.join(self.root, "yelp", split))
    d = data.load_task_data("yelp", data_dir=self.root)
    self.assertEqual(d.sizes(), {"train": 27, "validation": 3, "test": 10})

  def test_clear_errors_for_bad_copies(self):
    _write_parquet(f"{self.root}/rte/train-00000-of-00001.parquet",
                   {"premise": ["a"] * 10, "hypothesis": ["b"] * 10, "label": [0] * 10})
    with self.assertRaisesRegex(data.DataNotFoundError, "no 'validation' split"):
      data.load_task_data("rte", data_dir=self.root)
    _write_parquet(f"{self.root}/rte/validation-00000-of-00001.parquet",
                   {"premise": ["a"] * 3, "hypothesis": ["b"] * 3, "label": [0] * 3})
    with self.assertRaisesRegex(data.DataNotFoundError, r"lacks columns \['sentence1'"):
      data.load_task_data("rte", data_dir=self.root)
    with self.assertRaisesRegex(data.DataNotFoundError, "not a directory"):
      data.load_task_data("rte", data_dir=os.path.join(self.root, "nope"))
    # Two tasks' folders and neither is the one asked for: refuse rather than mix them.
    for task in ("mrpc", "wnli"):
      for split in ("train", "validation"):
        _write_parquet(f"{self.root}/other/{task}/{split}-00000-of-00001.parquet",
                       {"sentence1": ["a"] * 4, "sentence2": ["b"] * 4, "label": [0] * 4})
    with self.assertRaisesRegex(data.DataNotFoundError,
                                r"holds no 'rte/' folder.*its folders: \['mrpc', 'wnli'\]"):
      data.load_task_data("rte", data_dir=os.path.join(self.root, "other"))
    with self.assertRaisesRegex(ValueError, "real tasks only"):
      data.load_task_data("synth_rte", data_dir=self.root)


class OfflineTest(absltest.TestCase):

  def test_hub_task_fails_fast_and_clearly_offline(self):
    code = textwrap.dedent("""
        import time
        from tvgeo_jax import data
        t = time.perf_counter()
        try:
          data.load_task_data("qnli")
        except data.HubUnavailableError as e:
          print("ELAPSED", time.perf_counter() - t)
          print("MESSAGE", e)
        else:
          print("NO ERROR")
        """)
    hf_home = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, hf_home, ignore_errors=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=hf_home,
               PYTHONPATH=REPO_ROOT)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60, cwd=REPO_ROOT)
    wall = time.perf_counter() - start
    self.assertIn("MESSAGE", out.stdout, out.stdout + out.stderr)
    elapsed = float(out.stdout.split("ELAPSED")[1].split()[0])
    self.assertLess(elapsed, 5.0)
    self.assertLess(wall, 30.0)
    msg = out.stdout.split("MESSAGE", 1)[1]
    for needle in ("'qnli'", "nyu-mll/glue", "unreachable", "--data_dir", "synth_qnli"):
      self.assertIn(needle, msg)


if __name__ == "__main__":
  absltest.main()
