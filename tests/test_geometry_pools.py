"""Adapter pools as found on the hub: mixed LoRA ranks (peft's own adapters, rank_pattern)
through the grid_distances CLI, and near pairs, against float64 references."""
import contextlib
import io
import json
import os
import shutil
import tempfile
import warnings

from absl.testing import absltest, flagsaver, parameterized
import jax
import jax.numpy as jnp
import numpy as np
import peft
import torch
import transformers

from experiments import grid_distances
from tvgeo_jax import geometry as geo
from tvgeo_jax.geometry import grid as grid_lib
from tvgeo_jax.models import init_params, save_pretrained, tiny_config
from test_geometry import ref_angles

warnings.filterwarnings("ignore")

_SMALL = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=48, max_position_embeddings=40)
# (r, rank_pattern): one adapter per row; the second gives its value modules another rank,
# the third mixes ranks across the layers of one module.
_POOL = {"r4": (4, {}), "r4_value2": (4, {"value": 2}),
         "r6_mixed": (6, {"layer.1.attention.self.value": 3}), "r3": (3, {})}


def _deltas(model):
  """float64 ``{module: [(scale·B, A) per layer]}`` read from the live peft model."""
  out = {"query": [], "value": []}
  for layer in model.base_model.model.roberta.encoder.layer:
    for name in out:
      m = getattr(layer.attention.self, name)
      a = m.lora_A["default"].weight.detach().double().numpy()
      b = m.lora_B["default"].weight.detach().double().numpy() * m.scaling["default"]
      out[name].append((b, a))
  return out


def _ref(x, y, metric):
  if metric == "l2":
    return np.linalg.norm(x - y)
  if metric == "cosine":
    return 1 - np.sum(x * y) / (np.linalg.norm(x) * np.linalg.norm(y))
  return np.sqrt(np.sum(ref_angles(x, y) ** 2))


class MixedRankPoolTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.addClassCleanup(shutil.rmtree, cls.tmp, ignore_errors=True)
    config = tiny_config("roberta", num_labels=2, **_SMALL)
    base_dir = os.path.join(cls.tmp, "base")
    save_pretrained(base_dir, config, init_params(config, seed=0))
    cls.refs, cls.dirs = {}, []
    g = torch.Generator().manual_seed(0)
    for name, (r, pattern) in _POOL.items():
      hf = transformers.AutoModelForSequenceClassification.from_pretrained(base_dir)
      model = peft.get_peft_model(hf, peft.LoraConfig(
          task_type="SEQ_CLS", r=r, lora_alpha=2 * r, target_modules=["query", "value"],
          rank_pattern=pattern))
      with torch.no_grad():
        for pname, p in model.named_parameters():
          if "lora_" in pname:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
      path = os.path.join(cls.tmp, name)
      model.save_pretrained(path)
      cls.dirs.append(path)
      cls.refs[name] = _deltas(model)
    cls.out = os.path.join(cls.tmp, "out")
    if not grid_distances.FLAGS.is_parsed():     # under pytest, absl has not parsed argv
      grid_distances.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver(runs=cls.dirs, base=base_dir, out=cls.out, figures=False,
                             modules=["query", "value"]):
      grid_distances.main([])
    cls.base_dir = base_dir
    cls.npz = np.load(os.path.join(cls.out, "distances.npz"))
    with open(os.path.join(cls.out, "distances.json")) as f:
      cls.doc = json.load(f)

  def test_every_metric_matches_float64(self):
    names = list(_POOL)
    self.assertEqual(list(self.npz["task_names"]), names)
    for module in ("query", "value"):
      np.testing.assert_array_equal(
          self.npz[f"{module}/lora_rank"],
          [[4, 4], [4, 4], [6, 6], [3, 3]] if module == "query" else [[4, 4], [2, 2], [6, 3], [3, 3]])
      for factor in ("product", "a", "b"):
        for metric in ("l2", "cosine", "grassmann"):
          got = self.npz[f"{module}/{factor}/{metric}"]
          self.assertEqual(got.shape, (4, 4, 2))
          for i in range(4):
            for j in range(4):
              for layer in range(2):
                b1, a1 = self.refs[names[i]][module][layer]
                b2, a2 = self.refs[names[j]][module][layer]
                x, y = {"product": (b1 @ a1, b2 @ a2), "a": (a1.T, a2.T), "b": (b1, b2)}[factor]
                where = f"{module}/{factor}/{metric} ({names[i]}, {names[j]}) layer {layer}"
                if i == j:
                  self.assertEqual(got[i, j, layer], 0.0, where)
                elif factor != "product" and metric != "grassmann" and x.shape != y.shape:
                  self.assertTrue(np.isnan(got[i, j, layer]), where)   # different ranks
                else:
                  ref = _ref(x, y, metric)
                  tol = 3e-5 if metric == "grassmann" else 1e-5 * max(1.0, abs(ref))
                  self.assertAlmostEqual(float(got[i, j, layer]), ref, delta=tol, msg=where)

  def test_outputs_state_the_definitions(self):
    value = self.doc["modules"]["value"]
    self.assertIn(geo.grid.MIXED_RANK_NOTE, value["notes"])
    self.assertIn(geo.grid.GRASSMANN_NOTE, value["notes"])
    self.assertEqual(value["lora_ranks"][2], [6, 3])
    self.assertIsNone(value["distances"]["a"]["l2"]["layer_mean"][0][2])   # r4 vs r6: NaN

  def test_dry_run_prints_the_plan_and_computes_nothing(self):
    out, buf = os.path.join(self.tmp, "dry"), io.StringIO()
    with flagsaver.flagsaver(runs=self.dirs, base=self.base_dir, out=out, dry_run=True,
                             max_memory=1.0, modules=["value"]), contextlib.redirect_stdout(buf):
      grid_distances.main([])
    text = buf.getvalue()
    self.assertIn("value: distance grid plan: lora, T=4 tasks, L=2 layers, out=32, in=32, r=6",
                  text)
    self.assertIn("FLOPs", text)
    self.assertFalse(os.path.exists(out))


def _near_pair(rng, sep, out=64, inn=48, r=6):
  """float32 factors of two updates ``‖ΔW1 − ΔW2‖ ≈ sep ‖ΔW1‖`` apart (perturbed factors)."""
  b1 = rng.standard_normal((out, r)).astype(np.float32)
  a1 = rng.standard_normal((r, inn)).astype(np.float32)
  eb, ea = rng.standard_normal((out, r)), rng.standard_normal((r, inn))
  w1 = b1.astype(np.float64) @ a1
  s = sep * np.linalg.norm(w1) / np.linalg.norm(eb @ a1 + b1 @ ea)
  return b1, a1, (b1 + s * eb).astype(np.float32), (a1 + s * ea).astype(np.float32)


class NearPairTest(parameterized.TestCase):
  """Relative error of L2 and cosine distances <= 1e-5 in float32 at every separation."""

  @parameterized.parameters(1e-1, 1e-2, 1e-3, 1e-4)
  def test_lora_and_dense_near_pairs(self, sep):
    rng = np.random.default_rng(int(-np.log10(sep)))
    pairs = [_near_pair(rng, sep) for _ in range(3)]
    # three near pairs side by side in one grid (tasks 2k, 2k+1), 2 x 2 tiles
    b = np.stack([[p[0], p[2]] for p in pairs]).reshape(6, 1, 64, 6)
    a = np.stack([[p[1], p[3]] for p in pairs]).reshape(6, 1, 6, 48)
    w = np.einsum("tlor,tlri->tloi", b.astype(np.float64), a.astype(np.float64))
    grid = geo.distance_grid((a, b), metrics=("l2", "cosine"), tile=2)
    dense = geo.distance_grid(w.astype(np.float32), metrics=("l2", "cosine"), tile=2)
    w32 = w.astype(np.float32).astype(np.float64)            # the dense grid's own inputs
    for k in range(3):
      i, j = 2 * k, 2 * k + 1
      self.assertAlmostEqual(np.linalg.norm(w[i, 0] - w[j, 0]) / np.linalg.norm(w[i, 0]), sep,
                             delta=0.2 * sep)
      b1, a1, b2, a2 = pairs[k]
      for metric in ("l2", "cosine"):
        ref = _ref(w[i, 0], w[j, 0], metric)
        for got in (grid.get("product", metric)[i, j, 0],
                    geo.lora_l2_distance(b1, a1, b2, a2) if metric == "l2"
                    else geo.lora_cosine_distance(b1, a1, b2, a2)):
          self.assertLessEqual(abs(float(got) - ref) / ref, 1e-5, f"lora {metric} sep {sep}")
        ref32 = _ref(w32[i, 0], w32[j, 0], metric)
        got = dense.get("product", metric)[i, j, 0]
        self.assertLessEqual(abs(float(got) - ref32) / ref32, 1e-5, f"dense {metric} sep {sep}")
      # the Gram path alone loses digits here (what the differenced path fixes)
    if sep <= 1e-3:
      gram = geo.distance_grid((a, b), metrics=("l2",), tile=2, flat_method="gram")
      ref = _ref(w[0, 0], w[1, 0], "l2")
      self.assertGreater(abs(float(gram.get("product", "l2")[0, 1, 0]) - ref) / ref, 1e-5)

  def test_far_pairs_unchanged_by_the_method(self):
    rng = np.random.default_rng(5)
    a = rng.standard_normal((5, 2, 4, 30)).astype(np.float32)
    b = rng.standard_normal((5, 2, 40, 4)).astype(np.float32)
    res = {m: geo.distance_grid((a, b), factors=("product", "a", "b"), metrics=("l2", "cosine"),
                                flat_method=m, tile=3) for m in ("auto", "gram")}
    for key in res["auto"].distances:
      np.testing.assert_array_equal(res["auto"].distances[key], res["gram"].distances[key])


class PlanTest(absltest.TestCase):

  def test_tile_fits_the_memory_budget_and_errors_name_the_fix(self):
    p = geo.plan_grid("lora", 1000, 24, 768, 768, 16, devices=8, max_memory=4 * 2 ** 30,
                      factors=("product", "a", "b"))
    self.assertLessEqual(p.memory["total"], 4 * 2 ** 30)
    self.assertEqual(p.tiles, (-(-1000 // p.tile)) * (-(-1000 // p.tile) + 1) // 2)
    self.assertIn("TFLOP", p.describe())
    small = geo.plan_grid("lora", 10, 2, 64, 64, 4)
    self.assertEqual(small.tile, 10)                       # one tile when it fits
    with self.assertRaisesRegex(ValueError, "raise it to at least"):
      geo.plan_grid("lora", 1000, 24, 768, 768, 16, max_memory=2 ** 20)

  def test_xla_temporaries_stay_within_the_plan_and_grow_with_the_tile(self):
    t, l, d, r = 40, 2, 256, 8
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    shapes = ((jax.ShapeDtypeStruct((t, l, r, d), jnp.float32),
               jax.ShapeDtypeStruct((t, l, d, r), jnp.float32),
               jax.ShapeDtypeStruct((t, l), jnp.int32)),)
    temps = []
    for tile in (4, 16):
      fn, _ = grid_lib._compiled(mesh, "lora", geo.METRICS, ("product",), None, None, tile, t, l,
                                 "auto")
      temps.append(fn.lower(*shapes).compile().memory_analysis().temp_size_in_bytes)
      p = geo.plan_grid("lora", t, l, d, d, r, tile=tile)
      self.assertLessEqual(temps[-1], p.memory["tile"] + p.memory["layer_tasks"])
    self.assertGreater(temps[1], 2 * temps[0])     # one tile's intermediates, not all pairs'

  def test_tiling_does_not_change_the_numbers(self):
    rng = np.random.default_rng(6)
    a = rng.standard_normal((7, 2, 3, 20)).astype(np.float32)
    b = rng.standard_normal((7, 2, 24, 3)).astype(np.float32)
    b[1] = b[0] + 1e-3 * b[1]                                # a near pair and small angles
    a[1] = a[0]
    one = geo.grid_arrays((a, b), factors=("product", "b"))
    other = geo.grid_arrays((a, b), factors=("product", "b"), tile=3)
    for key in one:
      np.testing.assert_allclose(other[key], one[key], rtol=2e-6, atol=2e-7, err_msg=key)


if __name__ == "__main__":
  absltest.main()
