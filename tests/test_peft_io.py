"""peft adapters both ways: logits parity with peft-wrapped transformers models."""
import json
import os
import shutil
import tempfile
import warnings

from absl.testing import absltest, parameterized
import numpy as np
import peft
import torch
import transformers

from tvgeo_jax.adapters import lora, peft_io
from tvgeo_jax.core import trees
from tvgeo_jax.models import apply, init_params, load_pretrained, save_pretrained, tiny_config

warnings.filterwarnings("ignore")

_SMALL = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=48, max_position_embeddings=40)


def _batch(config, seed=0, shape=(3, 9)):
  rng = np.random.RandomState(seed)
  ids = rng.randint(5, config.vocab_size, size=shape).astype(np.int32)
  mask = np.ones(shape, np.int32)
  mask[1, 6:] = 0
  mask[2, 3:] = 0
  ids[mask == 0] = config.pad_token_id
  return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros(shape, np.int32)}


def _torch_logits(model, batch):
  kwargs = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
  with torch.no_grad():
    return model(**kwargs).logits.numpy()


def _randomise_lora_torch(model, seed):
  """Non-zero random lora_A/lora_B and classifier (modules_to_save copy) in a peft model."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name or "modules_to_save" in name:
        p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _randomise_ours(params, seed):
  rng = np.random.RandomState(seed)
  return trees.map_with_path(
      lambda p, v: (0.2 * rng.randn(*np.shape(v))).astype(np.float32)
      if p[-1] in ("lora_a", "lora_b") or p[0] == "classifier" else v, params)


class PeftParityTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)

  def _base(self, model_type, num_labels=4, seed=0, **kw):
    """Our random base, exported with save_pretrained and reloaded by transformers."""
    config = tiny_config(model_type, num_labels=num_labels, **{**_SMALL, **kw})
    params = init_params(config, seed=seed)
    params = trees.map_with_path(  # non-trivial LayerNorms/biases too
        lambda p, v: (np.asarray(v) + 0.05 * np.random.RandomState(len(p)).randn(*np.shape(v))
                      ).astype(np.float32), params)
    base_dir = os.path.join(self.tmp, f"base_{model_type}_{seed}")
    save_pretrained(base_dir, config, params)
    config, params = load_pretrained(base_dir)
    return config, params, base_dir

  def _hf(self, base_dir):
    return transformers.AutoModelForSequenceClassification.from_pretrained(base_dir).eval()

  @parameterized.parameters("roberta", "bert")
  def test_peft_saved_adapter_loads_into_our_tree(self, model_type):
    config, params, base_dir = self._base(model_type)
    model = peft.get_peft_model(self._hf(base_dir), peft.LoraConfig(
        task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"]))
    _randomise_lora_torch(model, seed=1)
    model.eval()
    adapter = os.path.join(self.tmp, "adapter")
    model.save_pretrained(adapter)
    ours = peft_io.load_peft(adapter, params, config)
    self.assertEqual(len(lora.lora_paths(ours)), 2 * config.num_hidden_layers)
    self.assertAlmostEqual(float(ours["encoder"]["layer_0"]["query"]["lora_scale"]), 2.0)
    batch = _batch(config)
    ref = _torch_logits(model, batch)
    got = np.asarray(apply(ours, batch, config=config)["logits"])
    base_logits = np.asarray(apply(params, batch, config=config)["logits"])
    self.assertGreater(np.abs(ref - base_logits).max(), 1e-2)  # the adapter matters
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    merged = np.asarray(apply(lora.merge_lora(ours), batch, config=config)["logits"])
    np.testing.assert_allclose(merged, ref, atol=1e-5, rtol=0)

  @parameterized.parameters("roberta", "bert")
  def test_our_adapter_loads_into_peft(self, model_type):
    config, params, base_dir = self._base(model_type)
    ours = _randomise_ours(lora.inject_lora(params, targets=("query", "value"), rank=8,
                                            alpha=16.0), seed=2)
    adapter = os.path.join(self.tmp, "ours")
    peft_io.save_peft(adapter, ours, config, base_model_name_or_path=base_dir)
    self.assertEqual(sorted(os.listdir(adapter)),
                     ["adapter_config.json", "adapter_model.safetensors"])
    model = peft.PeftModel.from_pretrained(self._hf(base_dir), adapter).eval()
    peft_cfg = model.peft_config["default"]
    self.assertEqual((peft_cfg.r, peft_cfg.lora_alpha), (8, 16))
    self.assertEqual(set(peft_cfg.target_modules), {"query", "value"})
    batch = _batch(config)
    np.testing.assert_allclose(np.asarray(apply(ours, batch, config=config)["logits"]),
                               _torch_logits(model, batch), atol=1e-5, rtol=0)
    # Same key names as peft writes itself.
    ref_model = peft.get_peft_model(self._hf(base_dir), peft.LoraConfig(
        task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"]))
    ref_dir = os.path.join(self.tmp, "ref")
    ref_model.save_pretrained(ref_dir)
    from safetensors.numpy import load_file
    mine = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    theirs = load_file(os.path.join(ref_dir, "adapter_model.safetensors"))
    self.assertEqual({k: v.shape for k, v in mine.items()},
                     {k: v.shape for k, v in theirs.items()})

  def test_patterns_rslora_and_partial_targets_both_ways(self):
    config, params, base_dir = self._base("roberta", num_labels=3, seed=5)
    lcfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, use_rslora=True,
                           target_modules=["query", "key", "value", "intermediate.dense"],
                           rank_pattern={"key": 2, "layer.1.attention.self.value": 6},
                           alpha_pattern={"intermediate.dense": 3}, fan_in_fan_out=True)
    model = peft.get_peft_model(self._hf(base_dir), lcfg)
    _randomise_lora_torch(model, seed=3)
    model.eval()
    adapter = os.path.join(self.tmp, "patterned")
    model.save_pretrained(adapter)
    ours = peft_io.load_peft(adapter, params, config)
    ranks = lora.lora_ranks(ours)
    self.assertEqual(ranks[("encoder", "layer_0", "key")], 2)
    self.assertEqual(ranks[("encoder", "layer_1", "value")], 6)
    self.assertEqual(ranks[("encoder", "layer_0", "value")], 4)
    self.assertAlmostEqual(float(ours["encoder"]["layer_1"]["intermediate"]["lora_scale"]),
                           3 / np.sqrt(4), places=6)
    batch = _batch(config, seed=1)
    ref = _torch_logits(model, batch)
    np.testing.assert_allclose(np.asarray(apply(ours, batch, config=config)["logits"]), ref,
                               atol=1e-5, rtol=0)
    # Back out through save_peft (rank/alpha patterns, full names) and into peft again.
    partial = lora.strip_lora(ours)
    partial = lora.inject_lora(partial, targets=("layer_1/query", "intermediate"), rank=3,
                               alpha=5.0, rank_pattern={"layer_0/intermediate": 5})
    partial = _randomise_ours(partial, seed=7)
    out_dir = os.path.join(self.tmp, "partial")
    peft_io.save_peft(out_dir, partial, config, base_model_name_or_path=base_dir)
    written = json.load(open(os.path.join(out_dir, "adapter_config.json")))
    self.assertIn("roberta.encoder.layer.1.attention.self.query", written["target_modules"])
    back = peft.PeftModel.from_pretrained(self._hf(base_dir), out_dir).eval()
    np.testing.assert_allclose(np.asarray(apply(partial, batch, config=config)["logits"]),
                               _torch_logits(back, batch), atol=1e-5, rtol=0)
    reread = peft_io.load_peft(out_dir, params, config)
    for p, v in trees.flatten(partial).items():
      np.testing.assert_allclose(np.asarray(trees.get_path(reread, p)), np.asarray(v),
                                 rtol=1e-6, err_msg=trees.path_str(p))


class PeftErrorsTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.addClassCleanup(shutil.rmtree, cls.tmp, ignore_errors=True)
    cls.config = tiny_config("roberta", num_labels=2, **_SMALL)
    cls.params = init_params(cls.config)
    cls.base_dir = os.path.join(cls.tmp, "base")
    save_pretrained(cls.base_dir, cls.config, cls.params)

  def _hf(self):
    return transformers.AutoModelForSequenceClassification.from_pretrained(self.base_dir)

  def test_missing_files(self):
    with self.assertRaisesRegex(FileNotFoundError, "No adapter directory"):
      peft_io.load_peft(os.path.join(self.tmp, "nope"), self.params, self.config)
    empty = os.path.join(self.tmp, "empty")
    os.makedirs(empty)
    with self.assertRaisesRegex(FileNotFoundError, "has no adapter_config.json"):
      peft_io.load_peft(empty, self.params, self.config)
    with open(os.path.join(empty, "adapter_config.json"), "w") as f:
      json.dump({"peft_type": "LORA", "r": 8, "lora_alpha": 16}, f)
    with self.assertRaisesRegex(FileNotFoundError, "no adapter weights"):
      peft_io.load_peft(empty, self.params, self.config)

  def test_unsupported_peft_types_and_features(self):
    ia3 = peft.get_peft_model(self._hf(), peft.IA3Config(
        task_type="SEQ_CLS", target_modules=["key", "value"], feedforward_modules=[]))
    d = os.path.join(self.tmp, "ia3")
    ia3.save_pretrained(d)
    with self.assertRaisesRegex(ValueError, "peft 'IA3' adapter; load_peft reads LoRA"):
      peft_io.load_peft(d, self.params, self.config)
    dora = peft.get_peft_model(self._hf(), peft.LoraConfig(
        task_type="SEQ_CLS", r=4, target_modules=["query"], use_dora=True))
    d = os.path.join(self.tmp, "dora")
    dora.save_pretrained(d)
    with self.assertRaisesRegex(ValueError, r"DoRA \(use_dora=True\)"):
      peft_io.load_peft(d, self.params, self.config)

  def test_adapter_for_another_base(self):
    other = tiny_config("roberta", num_labels=2, **{**_SMALL, "hidden_size": 16,
                                                     "intermediate_size": 24})
    other_dir = os.path.join(self.tmp, "other_base")
    save_pretrained(other_dir, other, init_params(other))
    model = peft.get_peft_model(
        transformers.AutoModelForSequenceClassification.from_pretrained(other_dir),
        peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    d = os.path.join(self.tmp, "other_adapter")
    model.save_pretrained(d)
    with self.assertRaisesRegex(ValueError, r"roberta\.encoder\.layer\.0\.attention\.self\.query: "
                                r"lora_A \(4, 16\)"):
      peft_io.load_peft(d, self.params, self.config)
    three = self.config.replace(num_labels=3)
    with self.assertRaisesRegex(ValueError, r"classifier\.out_proj\.weight: adapter \(2, 32\) "
                                r"vs base \(3, 32\)"):
      src = peft.get_peft_model(self._hf(), peft.LoraConfig(
          task_type="SEQ_CLS", r=4, target_modules=["query"]))
      d2 = os.path.join(self.tmp, "two_labels")
      src.save_pretrained(d2)
      peft_io.load_peft(d2, init_params(three), three)

  def test_save_errors(self):
    with self.assertRaisesRegex(ValueError, "carry no LoRA factors"):
      peft_io.save_peft(os.path.join(self.tmp, "x"), self.params, self.config,
                        base_model_name_or_path=self.base_dir)
    on_head = lora.inject_lora(self.params, targets=("classifier/dense",), rank=2)
    with self.assertRaisesRegex(ValueError, "peft cannot name.*classifier/dense"):
      peft_io.save_peft(os.path.join(self.tmp, "x"), on_head, self.config,
                        base_model_name_or_path=self.base_dir)
    with self.assertRaisesRegex(ValueError, "already carry LoRA"):
      adapter = os.path.join(self.tmp, "ok")
      tree = lora.inject_lora(self.params, rank=2)
      peft_io.save_peft(adapter, tree, self.config, base_model_name_or_path=self.base_dir)
      peft_io.load_peft(adapter, tree, self.config)


if __name__ == "__main__":
  absltest.main()
