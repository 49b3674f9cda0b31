"""Unit tests of the training core: losses, optimizer, early stopping, trace counts.

References are independent: torch's cross_entropy/mse_loss and AdamW with
transformers' linear warm-up schedule, scikit-learn's balanced class weights.
"""
from __future__ import annotations

import os
import tempfile

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np
import torch

from tvgeo_jax.adapters import partition
from tvgeo_jax.models import load_pretrained
from tvgeo_jax.training import compile_cache, optim, presets
from tvgeo_jax.core import sharding
from tvgeo_jax.training import step as step_lib
from tvgeo_jax.training.config import TrainConfig, config_differences
from tvgeo_jax.training.early_stopping import EarlyStopping
from tvgeo_jax.evaluation import losses, scoring

import test_training_fixtures as fx


def setUpModule():
  compile_cache.enable(os.path.join(tempfile.gettempdir(), "tvgeo_jax_test_xla_cache"))


class LossTest(absltest.TestCase):

  def setUp(self):
    rng = np.random.default_rng(0)
    self.logits = rng.normal(size=(12, 3)).astype(np.float32)
    self.labels = rng.integers(0, 3, 12).astype(np.int32)

  def test_cross_entropy_with_padding_rows_matches_torch(self):
    weights = np.ones(12, np.float32)
    weights[9:] = 0.0  # padding rows
    got = losses.weighted_mean_loss(self.logits, {"labels": self.labels, "weights": weights},
                                      False)
    want = torch.nn.functional.cross_entropy(torch.tensor(self.logits[:9]),
                                             torch.tensor(self.labels[:9]).long())
    np.testing.assert_allclose(float(got), want.item(), rtol=1e-6)

  def test_balanced_class_weights_match_sklearn_and_torch(self):
    from sklearn.utils.class_weight import compute_class_weight
    train = np.array([0, 0, 0, 0, 1, 1, 2, 0, 1, 0])
    cw = losses.balanced_class_weights(train, 3)
    np.testing.assert_allclose(cw, compute_class_weight("balanced", classes=np.arange(3),
                                                        y=train), rtol=1e-6)
    got = losses.weighted_mean_loss(
        self.logits, {"labels": self.labels, "weights": np.ones(12, np.float32)}, False,
        jnp.asarray(cw))
    want = torch.nn.functional.cross_entropy(torch.tensor(self.logits),
                                             torch.tensor(self.labels).long(),
                                             weight=torch.tensor(cw))
    np.testing.assert_allclose(float(got), want.item(), rtol=1e-6)

  def test_regression_is_mse(self):
    y = np.linspace(0, 5, 12).astype(np.float32)
    got = losses.weighted_mean_loss(self.logits[:, :1], {"labels": y,
                                                           "weights": np.ones(12, np.float32)},
                                      True)
    want = torch.nn.functional.mse_loss(torch.tensor(self.logits[:, 0]), torch.tensor(y))
    np.testing.assert_allclose(float(got), want.item(), rtol=1e-6)


class OptimizerTest(absltest.TestCase):

  def test_decay_mask_skips_biases_and_layer_norm_scales(self):
    _, params = load_pretrained("tiny-random", num_labels=2)
    mask = optim.decay_mask(params)
    self.assertTrue(mask["encoder"]["layer_0"]["query"]["kernel"])
    self.assertTrue(mask["embeddings"]["word_embeddings"]["embedding"])
    self.assertFalse(mask["encoder"]["layer_0"]["query"]["bias"])
    self.assertFalse(mask["encoder"]["layer_0"]["attention_layer_norm"]["scale"])
    self.assertFalse(mask["embeddings"]["layer_norm"]["bias"])

  def test_adamw_schedule_and_clipping_match_torch(self):
    from transformers import get_linear_schedule_with_warmup
    rng = np.random.default_rng(1)
    params = {"dense": {"kernel": rng.normal(size=(4, 3)).astype(np.float32),
                        "bias": rng.normal(size=(3,)).astype(np.float32)},
              "norm": {"scale": rng.normal(size=(3,)).astype(np.float32)}}
    total, lr, wd = 10, 0.05, 0.1
    grads = [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32) * 3, params)
             for _ in range(6)]
    tx = optim.make_optimizer(params, learning_rate=lr, total_steps=total, warmup_ratio=0.3,
                              weight_decay=wd, max_grad_norm=1.0)
    state, p = tx.init(params), params
    for g in grads:
      upd, state = tx.update(g, state, p)
      p = jax.tree.map(lambda a, b: a + b, p, upd)
    # torch: two parameter groups (decay on kernels only), clip, AdamW, linear schedule.
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in
          (("k", params["dense"]["kernel"]), ("b", params["dense"]["bias"]),
           ("s", params["norm"]["scale"]))}
    opt = torch.optim.AdamW([{"params": [tp["k"]], "weight_decay": wd},
                             {"params": [tp["b"], tp["s"]], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.999), eps=1e-8)
    sched = get_linear_schedule_with_warmup(opt, 3, total)
    for g in grads:
      for k, v in (("k", g["dense"]["kernel"]), ("b", g["dense"]["bias"]),
                   ("s", g["norm"]["scale"])):
        tp[k].grad = torch.tensor(v)
      torch.nn.utils.clip_grad_norm_(list(tp.values()), 1.0)
      opt.step()
      sched.step()
    np.testing.assert_allclose(p["dense"]["kernel"], tp["k"].detach().numpy(), rtol=2e-5,
                               atol=1e-6)
    np.testing.assert_allclose(p["dense"]["bias"], tp["b"].detach().numpy(), rtol=2e-5,
                               atol=1e-6)
    np.testing.assert_allclose(p["norm"]["scale"], tp["s"].detach().numpy(), rtol=2e-5,
                               atol=1e-6)

  def test_discriminative_rates_match_torch_parameter_groups(self):
    """The head and ``fast_modules`` at the peak rate, every other weight at
    ``other_lr_scale`` times it (decay included): torch's AdamW with two parameter groups
    under one linear schedule."""
    from transformers import get_linear_schedule_with_warmup
    rng = np.random.default_rng(2)
    shapes = {("classifier", "dense", "kernel"): (4, 3), ("encoder", "query", "kernel"): (4, 4),
              ("encoder", "key", "kernel"): (4, 4)}
    params = {"classifier": {"dense": {}}, "encoder": {"query": {}, "key": {}}}
    for path, shape in shapes.items():
      params[path[0]][path[1]][path[2]] = rng.normal(size=shape).astype(np.float32)
    mask = optim.slow_mask(params, ("query",))
    self.assertEqual((mask["classifier"]["dense"]["kernel"], mask["encoder"]["query"]["kernel"],
                      mask["encoder"]["key"]["kernel"]), (False, False, True))
    total, lr, wd, scale = 8, 0.05, 0.1, 0.1
    grads = [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
             for _ in range(5)]
    tx = optim.make_optimizer(params, learning_rate=lr, total_steps=total, warmup_ratio=0.25,
                              weight_decay=wd, max_grad_norm=1.0, fast_modules=("query",),
                              other_lr_scale=scale)
    state, p = tx.init(params), params
    for g in grads:
      upd, state = tx.update(g, state, p)
      p = jax.tree.map(lambda a, b: a + b, p, upd)
    tp = {path: torch.tensor(params[path[0]][path[1]][path[2]], requires_grad=True)
          for path in shapes}
    key = ("encoder", "key", "kernel")
    opt = torch.optim.AdamW([{"params": [v for k, v in tp.items() if k != key], "lr": lr},
                             {"params": [tp[key]], "lr": lr * scale}],
                            lr=lr, weight_decay=wd, betas=(0.9, 0.999), eps=1e-8)
    sched = get_linear_schedule_with_warmup(opt, 2, total)
    for g in grads:
      for path, v in tp.items():
        v.grad = torch.tensor(g[path[0]][path[1]][path[2]])
      torch.nn.utils.clip_grad_norm_(list(tp.values()), 1.0)
      opt.step()
      sched.step()
    for path, v in tp.items():
      np.testing.assert_allclose(p[path[0]][path[1]][path[2]], v.detach().numpy(), rtol=2e-5,
                                 atol=1e-6, err_msg="/".join(path))
    moved = {path: np.abs(p[path[0]][path[1]][path[2]] - params[path[0]][path[1]][path[2]]).mean()
             for path in shapes}
    self.assertLess(moved[key], 0.3 * moved[("encoder", "query", "kernel")])

  def test_a_fast_module_that_matches_nothing_is_refused(self):
    """A misspelled module name would otherwise slow every weight but the head."""
    params = {"classifier": {"dense": {"kernel": np.zeros((2, 2))}},
              "encoder": {"layer": {"0": {"query": {"kernel": np.zeros((2, 2))}}}}}
    with self.assertRaisesRegex(ValueError, r"\['qeury'\] match no trainable.*'query'"):
      optim.make_optimizer(params, learning_rate=1e-3, total_steps=4,
                           fast_modules=("query", "qeury"), other_lr_scale=0.1)


class EarlyStoppingTest(parameterized.TestCase):

  @parameterized.parameters(
      # (losses, patience, epoch at which it stops or None, best epoch)
      ([1.0, 0.8, 0.85, 0.9, 0.7, 0.75, 0.76, 0.77, 0.5], 3, 7, 4),
      ([1.0, 0.9, 0.8, 0.7], 1, None, 3),
      ([1.0, 1.0, 0.99], 1, 1, 0),       # equal is no improvement
      ([0.5, float("nan"), 0.6], 2, 2, 0),  # NaN never improves
      ([0.5, 0.6, 0.7, 0.8], 0, None, 0),   # patience 0: never stops
  )
  def test_stops_at_the_right_epoch(self, losses, patience, stop_epoch, best_epoch):
    es = EarlyStopping(patience=patience)
    stopped_at = None
    for epoch, loss in enumerate(losses):
      es = es.update(epoch, loss)
      if es.stop:
        stopped_at = epoch
        break
    self.assertEqual(stopped_at, stop_epoch)
    self.assertEqual(es.best_epoch, best_epoch)
    self.assertEqual(EarlyStopping.from_dict(es.to_dict()), es)


class ConfigTest(absltest.TestCase):

  def test_paper_preset(self):
    full = presets.resolve("qnli", "full", "roberta-base")
    lora = presets.resolve("qnli", "lora", "roberta-base")
    self.assertEqual((full.learning_rate, full.batch_size, full.epochs, full.patience),
                     (2e-5, 20, 20, 5))
    self.assertEqual((lora.learning_rate, lora.lora_rank, lora.lora_alpha, lora.lora_targets),
                     (1e-4, 8, 16.0, ("query", "value")))
    self.assertEqual(presets.resolve("synth_sst2", "lora", "tiny").learning_rate, 3e-3)
    self.assertEqual(presets.resolve("x", "lora", "tiny", "paper",
                                     {"learning_rate": 5e-4}).learning_rate, 5e-4)

  def test_a_preset_can_set_values_per_task_and_method(self):
    """Down the lineage: values, methods[m], then tasks[t].values, tasks[t].methods[m]."""
    fake = presets.Preset("per_task", "tiny", values=dict(epochs=3), tasks={
        "synth_rte": presets.TaskValues(values=dict(train_scale=4.0, epochs=5),
                                        methods={"lora": dict(train_scale=6.0)})})
    try:
      presets.PRESETS["per_task"] = fake
      got = {(t, m): presets.resolve(t, m, "tiny", "per_task")
             for t in ("synth_rte", "synth_cola") for m in ("full", "lora")}
    finally:
      del presets.PRESETS["per_task"]
    self.assertEqual({k: (c.train_scale, c.epochs) for k, c in got.items()},
                     {("synth_rte", "full"): (4.0, 5), ("synth_rte", "lora"): (6.0, 5),
                      ("synth_cola", "full"): (1.0, 3), ("synth_cola", "lora"): (1.0, 3)})
    self.assertEqual(got["synth_rte", "lora"].learning_rate, 3e-3)  # tiny's, inherited
    self.assertEqual(presets.resolve("synth_rte", "lora", "tiny", "tiny",
                                     {"train_scale": 2.0}).train_scale, 2.0)  # flags win

  def test_per_task_preset_values_name_registered_tasks(self):
    from tvgeo_jax import data
    for p in presets.PRESETS.values():
      for task, own in p.tasks.items():
        self.assertEqual(data.get_task(task).name, task, f"{p.name}: {task}")
        self.assertLessEqual(set(own.methods), set(partition.METHODS))

  def test_bad_values_are_named(self):
    with self.assertRaisesRegex(ValueError, "lora_rank must be > 0"):
      TrainConfig(method="lora", lora_rank=0)
    with self.assertRaisesRegex(ValueError, "learning_rate must be > 0"):
      TrainConfig(learning_rate=-1e-3)
    with self.assertRaisesRegex(ValueError, "valid methods: full, lora, bottleneck"):
      TrainConfig(method="ia3")
    with self.assertRaisesRegex(ValueError, "valid presets"):
      presets.resolve("t", "lora", "tiny", "fast")

  def test_config_differences_ignore_book_keeping(self):
    a = TrainConfig(method="lora")
    b = a.replace(checkpoint_every=7, learning_rate=0.5, lora_targets=("query",))
    self.assertEqual(set(config_differences(a.to_dict(), b)), {"learning_rate", "lora_targets"})

  def test_a_field_missing_from_a_saved_config_counts_as_its_default(self):
    """A run directory written before a field existed resumes under its default."""
    saved = TrainConfig(method="full").to_dict()
    del saved["fast_modules"], saved["other_lr_scale"]
    self.assertEqual(config_differences(saved, TrainConfig(method="full")), {})
    self.assertEqual(set(config_differences(saved, TrainConfig(method="full",
                                                               other_lr_scale=0.1))),
                     {"other_lr_scale"})


class TraceCountTest(absltest.TestCase):

  def test_train_and_eval_steps_trace_once_per_bucket_shape(self):
    cfg, params = load_pretrained("tiny-random", num_labels=2)
    trainable, frozen = partition.split(params, "full")
    tx = optim.make_optimizer(trainable, learning_rate=1e-3, total_steps=10)
    mesh = sharding.data_mesh()
    state = sharding.replicate(step_lib.init_state(trainable, tx), mesh)
    frozen = sharding.replicate(frozen, mesh)
    train = step_lib.make_train_step(model_config=cfg.replace(hidden_dropout_prob=0.0,
                                                              attention_probs_dropout_prob=0.0),
                                     optimizer=tx, mesh=mesh, is_regression=False)
    evaluate = scoring.make_eval_step(model_config=cfg, mesh=mesh, is_regression=False)
    shapes = [8, 16, 8, 16, 8]
    for t in shapes:
      batch = next(fx.batches(fx.topic_examples(4, seq_len=t), 4))
      state, metrics = train(state, frozen, sharding.shard_batch(batch, mesh))
      evaluate(partition.combine(state["trainable"], frozen), sharding.shard_batch(batch, mesh))
    # jax's own count of the executables each jitted step compiled (one per bucket shape).
    self.assertEqual(train._cache_size(), 2)
    self.assertEqual(evaluate._cache_size(), 2)
    self.assertEqual(int(state["step"]), len(shapes))
    self.assertTrue(np.isfinite(float(metrics["loss"])))


if __name__ == "__main__":
  absltest.main()
