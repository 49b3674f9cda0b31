"""peft adapter directories as analysis inputs: .bin weights, bad files, target_modules
that disagree with the weights (issue 17, item 8). Adapters are written by peft itself."""
import json
import logging
import os
import shutil
import tempfile
import warnings

from absl.testing import absltest
import numpy as np
import peft
import torch
import transformers

from tvgeo_jax import lora, sources
from tvgeo_jax.models import apply, init_params, save_pretrained, tiny_config

warnings.filterwarnings("ignore")
_SMALL = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=48, max_position_embeddings=40)


class AdapterFilesTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    config = tiny_config("roberta", num_labels=3, **_SMALL)
    cls.base_dir = os.path.join(cls.tmp, "base")
    save_pretrained(cls.base_dir, config, init_params(config, seed=0))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(cls.base_dir)
    model = peft.get_peft_model(hf, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                    target_modules=["query", "value"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
      for name, p in model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
          p.copy_(0.2 * torch.randn(p.shape, generator=g))
    cls.model = model.eval()
    cls.bin_dir = os.path.join(cls.tmp, "bin_adapter")
    model.save_pretrained(cls.bin_dir, safe_serialization=False)
    cls.st_dir = os.path.join(cls.tmp, "st_adapter")
    model.save_pretrained(cls.st_dir)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def setUp(self):
    super().setUp()
    self.work = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.work, ignore_errors=True)

  def _copy(self, src, name, **config_changes):
    dst = os.path.join(self.work, name)
    shutil.copytree(src, dst)
    if config_changes:
      path = os.path.join(dst, "adapter_config.json")
      with open(path) as f:
        cfg = json.load(f)
      with open(path, "w") as f:
        json.dump(dict(cfg, **config_changes), f)
    return dst

  def test_bin_adapter_through_sources(self):
    files = os.listdir(self.bin_dir)
    self.assertIn("adapter_model.bin", files)
    self.assertNotIn("adapter_model.safetensors", files)
    src = sources.load_source(self.bin_dir, base=self.base_dir)
    self.assertEqual(src.config.num_labels, 3)   # the head's rows, read from the .bin
    ids = np.random.RandomState(0).randint(5, 97, (2, 7)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "token_type_ids": np.zeros_like(ids)}
    with torch.no_grad():
      ref = self.model(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}).logits
    got = np.asarray(apply(src.params, batch, config=src.config)["logits"])
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-5, rtol=0)
    self.assertEqual(src.base_fingerprint,
                     sources.load_source(self.st_dir, base=self.base_dir).base_fingerprint)

  def test_missing_or_corrupt_weights_are_named(self):
    missing = self._copy(self.st_dir, "missing")
    os.remove(os.path.join(missing, "adapter_model.safetensors"))
    with self.assertRaisesRegex(FileNotFoundError, r"has no adapter weights: expected "
                                r"adapter_model.safetensors \(or the older adapter_model.bin\)"):
      sources.load_source(missing, base=self.base_dir)
    truncated = os.path.join(self.work, "truncated")
    shutil.copytree(self.st_dir, truncated)
    path = os.path.join(truncated, "adapter_model.safetensors")
    with open(path, "rb") as f:
      data = f.read()
    with open(path, "wb") as f:
      f.write(data[:len(data) // 2])
    with self.assertRaisesRegex(ValueError, r"Cannot read adapter weights .*truncated or corrupt"):
      sources.load_source(truncated, base=self.base_dir)

  def test_target_modules_that_disagree_with_the_weights(self):
    # Weights for value but target_modules without it: peft itself would drop them.
    narrow = self._copy(self.st_dir, "narrow", target_modules=["query"])
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(self.base_dir)
    loaded = peft.PeftModel.from_pretrained(hf, narrow)
    self.assertFalse(any("value.lora_A" in n for n, _ in loaded.named_parameters()))
    with self.assertRaisesRegex(ValueError, r"target_modules=\['query'\] but the weights hold "
                                r"LoRA factors for 2 other module\(s\).*value"):
      sources.load_source(narrow, base=self.base_dir)
    # Targets with no weights: loaded, with a warning (peft leaves them at lora_B = 0).
    wide = self._copy(self.st_dir, "wide", target_modules=["query", "value", "key"])
    with self.assertLogs(level=logging.WARNING) as logs:
      src = sources.load_source(wide, base=self.base_dir)
    self.assertIn("match 2 module(s) with no LoRA weights", "\n".join(logs.output))
    self.assertLen(lora.lora_paths(src.params), 4)
    # A regex target_modules (peft: re.fullmatch) and layers_to_transform are peft's rules.
    regex = self._copy(self.st_dir, "regex", target_modules=r".*layer\.0\..*(query|value)")
    with self.assertRaisesRegex(ValueError, r"2 other module\(s\) \(e.g. .*layer.1.attention"):
      sources.load_source(regex, base=self.base_dir)
    layers = self._copy(self.st_dir, "layers", layers_to_transform=[1])
    with self.assertRaisesRegex(ValueError, r"2 other module\(s\) \(e.g. .*layer.0.attention"):
      sources.load_source(layers, base=self.base_dir)


if __name__ == "__main__":
  absltest.main()
