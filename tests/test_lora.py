"""LoRA tree transforms: injection, merge, parameter counts vs peft, trainable partition."""
import math
import warnings

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import torch
import transformers

from tvgeo_jax.adapters import lora, partition
from tvgeo_jax.core import trees
from tvgeo_jax.models import EncoderConfig, Encoder, apply, init_params, tiny_config

warnings.filterwarnings("ignore", module="peft")

_SMALL = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=48, max_position_embeddings=40)


def _config(model_type, num_labels=3, **kw):
  return tiny_config(model_type, num_labels=num_labels, **{**_SMALL, **kw})


def _batch(config, seed=0, shape=(3, 9)):
  rng = np.random.RandomState(seed)
  ids = rng.randint(5, config.vocab_size, size=shape).astype(np.int32)
  mask = np.ones(shape, np.int32)
  mask[1, 6:] = 0
  ids[mask == 0] = config.pad_token_id
  return {"input_ids": ids, "attention_mask": mask,
          "token_type_ids": np.zeros(shape, np.int32),
          "labels": rng.randint(0, config.num_labels, size=shape[0]).astype(np.int32)}


def _randomise_b(params, seed=1, scale=0.1):
  """Non-zero B (and A) so that LoRA actually changes the function."""
  rng = np.random.RandomState(seed)
  out = trees.map_with_path(
      lambda p, v: (scale * rng.randn(*np.shape(v))).astype(np.float32)
      if p[-1] in ("lora_a", "lora_b") else v, params)
  return out


def _zeros_like_model(config: EncoderConfig, head="classification"):
  """A zero tree of the model's shapes without running the initialisers (cheap at 82M)."""
  ids = jnp.zeros((1, 4), jnp.int32)
  shapes = jax.eval_shape(lambda: Encoder(config, head).init(jax.random.PRNGKey(0), ids))
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), dict(shapes["params"]))


def _peft_counts(model_type, config: EncoderConfig, rank, alpha, targets):
  """peft's get_nb_trainable_parameters() for the transformers model of this shape."""
  cls = transformers.RobertaConfig if model_type == "roberta" else transformers.BertConfig
  hf_cfg = cls(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
               num_hidden_layers=config.num_hidden_layers,
               num_attention_heads=config.num_attention_heads,
               intermediate_size=config.intermediate_size,
               max_position_embeddings=config.max_position_embeddings,
               type_vocab_size=config.type_vocab_size, num_labels=config.num_labels)
  model_cls = (transformers.RobertaForSequenceClassification if model_type == "roberta"
               else transformers.BertForSequenceClassification)
  with torch.device("meta"):  # shapes only: no memory, no init time
    model = model_cls(hf_cfg)
  hf_names = {"attention_output": "attention.output.dense", "intermediate": "intermediate.dense"}
  wrapped = peft.get_peft_model(model, peft.LoraConfig(
      task_type="SEQ_CLS", r=rank, lora_alpha=alpha,
      target_modules=[hf_names.get(t, t) for t in targets]))
  return wrapped.get_nb_trainable_parameters()


class InjectTest(parameterized.TestCase):

  def test_leaves_shapes_and_scale(self):
    config = _config("roberta")
    params = init_params(config)
    out = lora.inject_lora(params, targets=("query", "value"), rank=4, alpha=8.0)
    self.assertFalse(lora.has_lora(params))  # input untouched
    self.assertTrue(lora.has_lora(out))
    want = [("encoder", f"layer_{i}", m) for i in range(2) for m in ("query", "value")]
    self.assertEqual(lora.lora_paths(out), sorted(want))
    m = out["encoder"]["layer_1"]["value"]
    self.assertEqual(m["lora_a"].shape, (32, 4))
    self.assertEqual(m["lora_b"].shape, (4, 32))
    np.testing.assert_array_equal(m["lora_b"], 0.0)
    self.assertEqual(m["lora_scale"].dtype, np.float32)
    self.assertEqual(float(m["lora_scale"]), 2.0)
    self.assertIs(m["kernel"], params["encoder"]["layer_1"]["value"]["kernel"])
    self.assertNotIn("lora_a", out["encoder"]["layer_0"]["key"])

  def test_zero_b_leaves_the_function_unchanged(self):
    config = _config("roberta")
    params = init_params(config)
    out = lora.inject_lora(params, rank=4)
    batch = _batch(config)
    np.testing.assert_array_equal(np.asarray(apply(out, batch, config=config)["logits"]),
                                  np.asarray(apply(params, batch, config=config)["logits"]))

  def test_a_is_distributed_like_torch_kaiming_uniform(self):
    fan_in, rank = 512, 64
    params = {"m": {"kernel": np.zeros((fan_in, 8), np.float32), "bias": np.zeros(8)}}
    a = lora.inject_lora(params, targets="m", rank=rank, seed=3)["m"]["lora_a"]
    torch.manual_seed(0)
    ref = torch.empty(rank, fan_in)
    torch.nn.init.kaiming_uniform_(ref, a=math.sqrt(5))  # what peft does to lora_A.weight
    ref = ref.numpy()
    bound = np.abs(ref).max()
    self.assertLessEqual(np.abs(a).max(), 1 / math.sqrt(fan_in) + 1e-7)
    self.assertGreater(np.abs(a).max(), 0.99 * bound)
    self.assertAlmostEqual(float(a.std()), float(ref.std()), delta=0.02 * ref.std())
    self.assertAlmostEqual(float(a.mean()), 0.0, delta=0.05 * ref.std())

  def test_seeded_and_gaussian_init(self):
    params = init_params(_config("roberta"))
    a0 = lora.inject_lora(params, seed=0)["encoder"]["layer_0"]["query"]["lora_a"]
    a0b = lora.inject_lora(params, seed=0)["encoder"]["layer_0"]["query"]["lora_a"]
    a1 = lora.inject_lora(params, seed=1)["encoder"]["layer_0"]["query"]["lora_a"]
    np.testing.assert_array_equal(a0, a0b)
    self.assertFalse(np.array_equal(a0, a1))
    g = lora.inject_lora(params, rank=4, init="gaussian")
    a = np.concatenate([g["encoder"][f"layer_{i}"][m]["lora_a"].ravel()
                        for i in range(2) for m in ("query", "value")])
    self.assertAlmostEqual(float(a.std()), 1 / 4, delta=0.03)

  def test_patterns_and_predicate(self):
    params = init_params(_config("roberta"))
    out = lora.inject_lora(params, targets=("query", "value", "intermediate"), rank=4, alpha=8,
                           rank_pattern={"layer_1/query": 2, "intermediate": 6},
                           alpha_pattern={"value": 3.0})
    ranks = lora.lora_ranks(out)
    self.assertEqual(ranks[("encoder", "layer_1", "query")], 2)
    self.assertEqual(ranks[("encoder", "layer_0", "query")], 4)
    self.assertEqual(ranks[("encoder", "layer_0", "intermediate")], 6)
    self.assertAlmostEqual(float(out["encoder"]["layer_0"]["value"]["lora_scale"]), 3.0 / 4)
    self.assertAlmostEqual(float(out["encoder"]["layer_1"]["query"]["lora_scale"]), 8.0 / 2)
    pred = lora.inject_lora(params, targets=lambda p: p[-1] == "key" and p[1] == "layer_1")
    self.assertEqual(lora.lora_paths(pred), [("encoder", "layer_1", "key")])
    rs = lora.inject_lora(params, rank=4, alpha=8, use_rslora=True)
    self.assertAlmostEqual(float(rs["encoder"]["layer_0"]["query"]["lora_scale"]), 8 / 2.0)

  def test_errors(self):
    params = init_params(_config("roberta"))
    with self.assertRaisesRegex(ValueError, "matched no dense module.*query"):
      lora.inject_lora(params, targets=("q_proj",))
    with self.assertRaisesRegex(ValueError, "positive integer"):
      lora.inject_lora(params, rank=0)
    with self.assertRaisesRegex(ValueError, "positive integer.*layer_1/value"):
      lora.inject_lora(params, rank_pattern={"layer_1/value": -2})
    with self.assertRaisesRegex(ValueError, "Unknown LoRA init"):
      lora.inject_lora(params, init="pissa")
    with self.assertRaisesRegex(ValueError, "already carries LoRA"):
      lora.inject_lora(lora.inject_lora(params), targets=("query",))


class MergeTest(parameterized.TestCase):

  @parameterized.parameters("roberta", "bert")
  def test_merge_equals_unmerged_apply(self, model_type):
    config = _config(model_type)
    params = init_params(config, seed=2)
    tree = _randomise_b(lora.inject_lora(params, targets=("query", "value", "output"), rank=4,
                                         alpha=16.0))
    merged = lora.merge_lora(tree)
    self.assertFalse(lora.has_lora(merged))
    self.assertTrue(lora.has_lora(tree))  # input untouched
    batch = _batch(config)
    y_lora = np.asarray(apply(tree, batch, config=config)["logits"])
    y_merged = np.asarray(apply(merged, batch, config=config)["logits"])
    y_base = np.asarray(apply(params, batch, config=config)["logits"])
    self.assertGreater(np.abs(y_lora - y_base).max(), 1e-3)  # LoRA really acts
    np.testing.assert_allclose(y_merged, y_lora, atol=1e-5, rtol=0)
    m = tree["encoder"]["layer_1"]["output"]
    ref = (m["kernel"].astype(np.float64) + 4.0 * m["lora_a"].astype(np.float64)
           @ m["lora_b"].astype(np.float64))
    np.testing.assert_allclose(merged["encoder"]["layer_1"]["output"]["kernel"], ref, atol=1e-6)
    np.testing.assert_array_equal(lora.strip_lora(tree)["encoder"]["layer_1"]["output"]["kernel"],
                                  params["encoder"]["layer_1"]["output"]["kernel"])


class CountTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("roberta_small_qv", "roberta", dict(num_labels=4), 8, 16, ("query", "value")),
      ("bert_small_qv", "bert", dict(num_labels=3), 8, 16, ("query", "value")),
      ("roberta_small_r4_qkv_ffn", "roberta", dict(num_labels=2), 4, 8,
       ("query", "key", "value", "attention_output", "intermediate")),
      ("bert_base_qv", "bert", dict(num_labels=2, vocab_size=30522, hidden_size=768,
                                    num_hidden_layers=12, num_attention_heads=12,
                                    intermediate_size=3072, max_position_embeddings=512),
       8, 16, ("query", "value")),
  )
  def test_counts_equal_peft(self, model_type, overrides, rank, alpha, targets):
    config = _config(model_type, **overrides)
    params = lora.inject_lora(_zeros_like_model(config), targets=targets, rank=rank,
                              alpha=alpha)
    want_trainable, want_all = _peft_counts(model_type, config, rank, alpha, targets)
    trainable, total = partition.count_parameters(params, "lora")
    self.assertEqual(trainable, want_trainable)
    head = trees.count(params["classifier"])
    self.assertEqual(total + head, want_all)  # peft also counts its head copy
    self.assertEqual(lora.peft_parameter_counts(params), (want_trainable, want_all))

  def test_distilroberta_shape(self):
    config = EncoderConfig(model_type="roberta", vocab_size=50265, hidden_size=768,
                           num_hidden_layers=6, num_attention_heads=12, intermediate_size=3072,
                           max_position_embeddings=514, type_vocab_size=1, num_labels=4)
    params = lora.inject_lora(_zeros_like_model(config), targets=("query", "value"), rank=8,
                              alpha=16.0)
    ours = partition.count_parameters(params, "lora")
    peft_style = lora.peft_parameter_counts(params)
    ref = _peft_counts("roberta", config, 8, 16, ("query", "value"))
    print(f"\nDistilRoBERTa shape, 4 labels, LoRA r=8 query/value: trainable={ours[0]:,} "
          f"total={ours[1]:,}; peft-style all={peft_style[1]:,}; peft says {ref}; "
          "paper D: 685,828 of 82,807,304")
    self.assertEqual(peft_style, tuple(ref))
    # Independent arithmetic: 12 adapted 768x768 matrices, r=8, plus the RoBERTa head.
    head = (768 * 768 + 768) + (768 * 4 + 4)
    self.assertEqual(ours[0], 6 * 2 * 8 * (768 + 768) + head)


class TrainablePartitionTest(parameterized.TestCase):

  @parameterized.parameters("roberta", "bert")
  def test_optax_step_touches_only_lora_and_classifier(self, model_type):
    config = _config(model_type, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    params = _randomise_b(lora.inject_lora(init_params(config, seed=4), rank=4))
    batch = _batch(config)
    trainable, frozen = partition.split(params, "lora")
    trainable_paths = set(trees.flatten(trainable))
    self.assertTrue(all(p[-1] in ("lora_a", "lora_b") or p[0] == "classifier"
                        for p in trainable_paths))
    self.assertIn(("encoder", "layer_0", "query", "lora_b"), trainable_paths)
    if model_type == "bert":  # peft keeps BERT's pooler frozen
      self.assertNotIn(("pooler", "kernel"), trainable_paths)

    def loss_fn(train):
      logits = apply(partition.combine(train, frozen), batch, config=config)["logits"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    opt = optax.adam(1e-2)
    state = opt.init(trainable)
    grads = jax.grad(loss_fn)(trainable)
    updates, _ = opt.update(grads, state, trainable)
    new = partition.combine(optax.apply_updates(trainable, updates), frozen)

    before, after = trees.flatten(params), trees.flatten(new)
    self.assertEqual(set(before), set(after))
    for p, v in before.items():
      changed = not np.array_equal(np.asarray(v), np.asarray(after[p]))
      if p in trainable_paths:
        self.assertTrue(changed, f"{trees.path_str(p)} did not move")
      else:
        self.assertFalse(changed, f"frozen {trees.path_str(p)} moved")
        self.assertEqual(np.asarray(after[p]).dtype, np.asarray(v).dtype)


if __name__ == "__main__":
  absltest.main()
