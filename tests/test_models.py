"""Encoder parity with transformers (PyTorch) and checkpoint I/O."""
import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from tvgeo_jax import models
from tvgeo_jax.models import hf_io

_CONFIGS = {
    "roberta_2x32": dict(family="roberta", hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64, vocab_size=100),
    "roberta_3x48": dict(family="roberta", hidden_size=48, num_hidden_layers=3,
                         num_attention_heads=6, intermediate_size=96, vocab_size=211),
    "bert_2x32": dict(family="bert", hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=80, vocab_size=120),
    "bert_1x64": dict(family="bert", hidden_size=64, num_hidden_layers=1,
                      num_attention_heads=8, intermediate_size=128, vocab_size=97),
}


def _hf_model(kind, head, num_labels=3, seed=0, **cfg):
  torch.manual_seed(seed)
  family = cfg.pop("family")
  config_cls = transformers.RobertaConfig if family == "roberta" else transformers.BertConfig
  config = config_cls(max_position_embeddings=40, num_labels=num_labels,
                      hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, **cfg)
  name = {"classification": "ForSequenceClassification", "mlm": "ForMaskedLM"}[head]
  cls = getattr(transformers, ("Roberta" if family == "roberta" else "Bert") + name)
  model = cls(config).eval()
  with torch.no_grad():  # heads and LayerNorms are initialised trivially; randomise them
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def _batch(vocab, pad_id, seed=0, shape=(3, 11)):
  rng = np.random.RandomState(seed)
  ids = rng.randint(5, vocab, size=shape).astype(np.int32)
  mask = np.ones(shape, np.int32)
  mask[1, 7:] = 0
  mask[2, 3:] = 0
  ids[mask == 0] = pad_id
  types = np.zeros(shape, np.int32)
  types[0, 6:] = 1
  return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _torch_outputs(model, batch, is_bert):
  kwargs = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
  if not is_bert:
    kwargs.pop("token_type_ids")
  with torch.no_grad():
    return model(**kwargs, output_hidden_states=True)


class ParityTest(parameterized.TestCase):

  @parameterized.product(name=list(_CONFIGS), head=["classification", "mlm"])
  def test_logits_and_hidden_states_match_transformers(self, name, head):
    cfg = dict(_CONFIGS[name])
    is_bert = cfg["family"] == "bert"
    model = _hf_model(name, head, **cfg)
    with tempfile.TemporaryDirectory() as d:
      model.save_pretrained(d)
      config, params = models.load_pretrained(d, head=head)
    batch = _batch(config.vocab_size, config.pad_token_id)
    if not is_bert:
      batch["token_type_ids"][:] = 0
    ref = _torch_outputs(model, batch, is_bert)
    out = models.apply(params, batch, config=config, head=head, output_hidden_states=True)
    np.testing.assert_allclose(np.asarray(out["logits"]), ref.logits.numpy(), atol=1e-5, rtol=0)
    self.assertLen(out["hidden_states"], config.num_hidden_layers + 1)
    for ours, theirs in zip(out["hidden_states"], ref.hidden_states):
      np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-5, rtol=0)
    if head == "classification":  # the training/evaluation path: last layer on token 0
      short = models.apply(params, batch, config=config, logits_only=True)
      self.assertEqual(set(short), {"logits"})
      np.testing.assert_allclose(np.asarray(short["logits"]), ref.logits.numpy(),
                                 atol=1e-5, rtol=0)

  @parameterized.parameters("roberta_2x32", "bert_2x32")
  def test_regression_head(self, name):
    cfg = dict(_CONFIGS[name])
    is_bert = cfg["family"] == "bert"
    model = _hf_model(name, "classification", num_labels=1, **cfg)
    with tempfile.TemporaryDirectory() as d:
      model.save_pretrained(d)
      config, params = models.load_pretrained(d)
    self.assertEqual(config.num_labels, 1)
    batch = _batch(config.vocab_size, config.pad_token_id)
    batch["token_type_ids"][:] = 0
    ref = _torch_outputs(model, batch, is_bert)
    for logits_only in (False, True):
      out = models.apply(params, batch, config=config, logits_only=logits_only)
      self.assertEqual(out["logits"].shape, (3, 1))
      np.testing.assert_allclose(np.asarray(out["logits"]), ref.logits.numpy(),
                                 atol=1e-5, rtol=0)

  @parameterized.parameters("roberta_3x48", "bert_1x64")
  def test_export_round_trip_loads_in_transformers(self, name):
    cfg = dict(_CONFIGS[name])
    is_bert = cfg["family"] == "bert"
    model = _hf_model(name, "classification", **cfg)
    batch = _batch(cfg["vocab_size"], model.config.pad_token_id)
    batch["token_type_ids"][:] = 0
    with tempfile.TemporaryDirectory() as d:
      model.save_pretrained(d)
      config, params = models.load_pretrained(d)
      out_dir = os.path.join(d, "export")
      models.save_pretrained(out_dir, config, params)
      reloaded = type(model).from_pretrained(out_dir).eval()
    ref = _torch_outputs(model, batch, is_bert).logits.numpy()
    again = _torch_outputs(reloaded, batch, is_bert).logits.numpy()
    np.testing.assert_allclose(again, ref, atol=1e-6, rtol=0)

  def test_bfloat16_within_rounding_of_float32(self):
    # bfloat16 keeps 8 mantissa bits (relative rounding 2^-8 ≈ 0.4%); errors compound
    # through the layers, so compare with a tolerance of a few percent of the logit scale.
    cfg = dict(_CONFIGS["roberta_3x48"])
    model = _hf_model("x", "classification", **cfg)
    with tempfile.TemporaryDirectory() as d:
      model.save_pretrained(d)
      config, params = models.load_pretrained(d)
    batch = _batch(config.vocab_size, config.pad_token_id)
    batch["token_type_ids"][:] = 0
    f32 = np.asarray(models.apply(params, batch, config=config)["logits"])
    bf16 = np.asarray(models.apply(params, batch, config=config, dtype=jnp.bfloat16)["logits"])
    self.assertEqual(bf16.dtype, np.float32)  # logits come back in float32
    scale = np.abs(f32).max()
    err = np.abs(bf16 - f32).max()
    self.assertLess(err, 0.03 * scale + 1e-2)
    self.assertGreater(err, 0.0)  # it really ran in bfloat16


class LogitsOnlyTest(parameterized.TestCase):
  """``logits_only``: the last layer for the first token only (training/evaluation)."""

  @parameterized.parameters("roberta", "bert")
  def test_lora_gradients_match_the_all_token_forward(self, family):
    from tvgeo_jax.adapters import lora, partition
    config = models.tiny_config(family, num_hidden_layers=3, num_labels=3)
    params = lora.inject_lora(models.init_params(config, seed=1), rank=4, alpha=8)
    params = jax.tree.map(lambda x: x + 0.05 * jnp.sin(jnp.arange(x.size).reshape(x.shape)
                                                        * 1.7), params)  # lora_b != 0
    train, frozen = partition.split(params, "lora")
    batch = _batch(config.vocab_size, config.pad_token_id)
    batch["token_type_ids"][:] = 0

    def loss(t, logits_only):
      out = models.apply(partition.combine(t, frozen), batch, config=config,
                         logits_only=logits_only)
      return jnp.sum(jnp.sin(out["logits"]))

    full = jax.grad(loss)(train, False)
    short = jax.grad(loss)(train, True)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(full), jax.tree.leaves(short)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-6, rtol=1e-5,
                                 err_msg=jax.tree_util.keystr(path))
    self.assertGreater(max(float(jnp.abs(g).max()) for g in jax.tree.leaves(full)), 1e-3)

  def test_compiled_flops_drop_by_the_last_layers_other_tokens(self):
    # XLA's own count of the compiled forward, against the products skipped on the
    # T-1 other tokens of the last layer: query, attention output, FFN, QKᵀ and PV.
    config = models.tiny_config(num_hidden_layers=2, num_labels=2)
    params = models.init_params(config)
    b, t, h, i = 4, 32, config.hidden_size, config.intermediate_size
    batch = {"input_ids": np.full((b, t), 7, np.int32),
             "attention_mask": np.ones((b, t), np.int32)}

    def flops(logits_only):
      f = jax.jit(lambda p: models.apply(p, batch, config=config,
                                          logits_only=logits_only)["logits"])
      cost = f.lower(params).compile().cost_analysis()
      return (cost[0] if isinstance(cost, list) else cost)["flops"]

    skipped_matmul = b * (t - 1) * 2 * (2 * h * h + 2 * h * i + 2 * t * h)
    saved = flops(False) - flops(True)
    self.assertGreaterEqual(saved, skipped_matmul)
    self.assertLess(saved, 1.25 * skipped_matmul)  # plus the skipped elementwise work

  def test_needs_the_classification_head_and_no_hidden_states(self):
    config, params = models.load_pretrained("tiny-random")
    batch = _batch(config.vocab_size, config.pad_token_id)
    with self.assertRaisesRegex(ValueError, "logits_only=True needs the classification"):
      models.apply(params, batch, config=config, logits_only=True, output_hidden_states=True)
    with self.assertRaisesRegex(ValueError, "head 'none'"):
      models.apply(params, batch, config=config, head="none", logits_only=True)


class CompileTest(absltest.TestCase):

  def test_jit_does_not_retrace_for_same_shapes(self):
    config, params = models.load_pretrained("tiny-random")
    traces = []

    def fwd(p, b):
      traces.append(1)
      return models.apply(p, b, config=config)["logits"]

    f = jax.jit(fwd)
    b1 = _batch(config.vocab_size, config.pad_token_id, seed=1)
    b2 = _batch(config.vocab_size, config.pad_token_id, seed=2)
    np.testing.assert_array_equal(np.asarray(f(params, b1)), np.asarray(f(params, b1)))
    f(params, b2)
    self.assertLen(traces, 1)
    f(params, _batch(config.vocab_size, config.pad_token_id, shape=(3, 16)))
    self.assertLen(traces, 2)

  def test_dropout_needs_rng_and_changes_output(self):
    config, params = models.load_pretrained("tiny-random")
    b = _batch(config.vocab_size, config.pad_token_id)
    with self.assertRaisesRegex(ValueError, "rng"):
      models.apply(params, b, config=config, train=True)
    a = models.apply(params, b, config=config, train=True, rng=jax.random.PRNGKey(0))["logits"]
    c = models.apply(params, b, config=config, train=True, rng=jax.random.PRNGKey(1))["logits"]
    self.assertFalse(np.allclose(np.asarray(a), np.asarray(c)))


class LoaderErrorTest(absltest.TestCase):

  def _saved(self, d, **cfg):
    model = _hf_model("x", "classification", **dict(_CONFIGS["roberta_2x32"], **cfg))
    model.save_pretrained(d)
    return model

  def test_builtin_names(self):
    """``tiny``/``embedded`` load the cached pretrained base; ``tiny-random`` and
    ``tiny-bert-random`` are random inits; other ``tiny-*`` names are errors."""
    from unittest import mock
    from tvgeo_jax import pretraining
    from tvgeo_jax.pretraining import embedded
    with tempfile.TemporaryDirectory() as cache, mock.patch.dict(os.environ, {"TVGEO_CACHE": cache}):
      config, saved = models.load_pretrained("tiny-random", head="mlm", seed=7)
      models.save_pretrained(embedded.default_dir(), config, saved, head="mlm")
      open(os.path.join(embedded.default_dir(), "pretrain.json"), "w").write("{}")
      for name in ("tiny", "embedded"):
        with self.assertRaisesRegex(ValueError, "pretraining.load_model"):
          models.load_pretrained(name)
        cfg, params = pretraining.load_model(name, num_labels=2)
        self.assertEqual(cfg.num_hidden_layers, config.num_hidden_layers)
        np.testing.assert_array_equal(
            params["encoder"]["layer_1"]["query"]["kernel"],
            saved["encoder"]["layer_1"]["query"]["kernel"])
    fresh = models.load_pretrained("tiny-random", seed=7)[1]
    other = models.load_pretrained("tiny-random", seed=8)[1]
    self.assertFalse(np.array_equal(fresh["encoder"]["layer_1"]["query"]["kernel"],
                                    other["encoder"]["layer_1"]["query"]["kernel"]))
    self.assertEqual(models.load_pretrained("tiny-bert-random")[0].model_type, "bert")
    with self.assertRaisesRegex(ValueError, "Unknown built-in model 'tiny-bert'.*tiny-random"):
      models.load_pretrained("tiny-bert")

  def test_missing_directory_and_files(self):
    with tempfile.TemporaryDirectory() as d:
      with self.assertRaisesRegex(FileNotFoundError, "config.json"):
        models.load_pretrained(d)
      self._saved(d)
      os.remove(os.path.join(d, "model.safetensors"))
      with self.assertRaisesRegex(FileNotFoundError, "model.safetensors"):
        models.load_pretrained(d)
    with self.assertRaisesRegex(FileNotFoundError, "No such model directory"):
      models.load_pretrained("./does/not/exist")

  def test_unknown_model_type(self):
    with tempfile.TemporaryDirectory() as d:
      self._saved(d)
      cfg = json.load(open(os.path.join(d, "config.json")))
      cfg["model_type"] = "gpt2"
      json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
      with self.assertRaisesRegex(ValueError, "Unsupported model_type 'gpt2'"):
        models.load_pretrained(d)

  def test_missing_unexpected_and_misshaped_weights_are_named(self):
    from safetensors.numpy import load_file, save_file
    with tempfile.TemporaryDirectory() as d:
      self._saved(d)
      path = os.path.join(d, "model.safetensors")
      state = load_file(path)
      broken = dict(state)
      del broken["roberta.encoder.layer.1.attention.self.key.weight"]
      save_file(broken, path)
      with self.assertRaisesRegex(ValueError, r"missing weights: encoder\.layer\.1\.attention"
                                  r"\.self\.key\.weight"):
        models.load_pretrained(d)
      broken = dict(state)
      broken["roberta.encoder.layer.0.intermediate.dense.weight"] = np.zeros((5, 32), np.float32)
      save_file(broken, path)
      with self.assertRaisesRegex(ValueError, r"wrongly shaped.*layer\.0\.intermediate"):
        models.load_pretrained(d)
      broken = dict(state)
      broken["roberta.encoder.layer.0.attention.self.rotary.weight"] = np.zeros((2,), np.float32)
      save_file(broken, path)
      with self.assertRaisesRegex(ValueError, "does not have.*rotary"):
        models.load_pretrained(d)

  def test_new_head_when_num_labels_changes(self):
    with tempfile.TemporaryDirectory() as d:
      self._saved(d)
      config, params = models.load_pretrained(d, num_labels=5)
    self.assertEqual(params["classifier"]["out_proj"]["kernel"].shape, (32, 5))
    self.assertEqual(config.num_labels, 5)

  def test_offline_hub_id_fails_fast_with_a_clear_message(self):
    code = ("from tvgeo_jax import models\n"
            "try:\n  models.load_pretrained('no-such-org/no-such-model-xyz')\n"
            "except Exception as e:\n  print(type(e).__name__, e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=tempfile.mkdtemp())
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=60).stdout
    self.assertIn("HubUnavailableError", out)
    self.assertIn("no-such-org/no-such-model-xyz", out)
    self.assertIn("local directory", out)

  def test_state_dict_round_trip_is_exact(self):
    config, params = models.load_pretrained("tiny-bert-random")
    state = hf_io.state_dict_from_params(params, config)
    again = hf_io.params_from_state_dict(state, config)
    for (p, a), (q, b) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                              jax.tree_util.tree_flatten_with_path(again)[0]):
      self.assertEqual(p, q)
      np.testing.assert_array_equal(a, b)


if __name__ == "__main__":
  absltest.main()
