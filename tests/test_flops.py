"""Model-FLOP count (training.flops) against the products JAX's autodiff emits."""
import math

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tvgeo_jax.adapters import partition
from tvgeo_jax.models import apply, init_params
from tvgeo_jax.models.config import EncoderConfig, tiny_config
from tvgeo_jax.training import flops, methods
from tvgeo_jax.training.config import TrainConfig


def _dot_flops(jaxpr) -> float:
  """FLOPs of every ``dot_general`` in a jaxpr, sub-jaxprs included (scan bodies
  times their length): 2 × output elements × contracted size."""
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    if eqn.primitive.name == "while":
      raise AssertionError("a while loop: its trip count is unknown to this counter")
    times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          total += times * _dot_flops(inner)
  return total


def _loss_dot_flops(config, method: str, batch_size: int, seq_len: int,
                    gradient: bool = True) -> float:
  """Products in the jaxpr of the classification loss's gradient with respect to
  ``method``'s trainable partition (``gradient=False``: of the loss alone), every token
  through every layer."""
  # Traced, never run: the zero-memory tree of parameter_shapes (checked against the
  # real prepared tree below) stands in for the weights.
  params = flops.parameter_shapes(config, TrainConfig(method=method, model="test"))
  trainable, frozen = partition.split(params, method)
  rng = np.random.default_rng(0)
  batch = {"input_ids": rng.integers(3, config.vocab_size, (batch_size, seq_len)),
           "attention_mask": np.ones((batch_size, seq_len), np.int32)}
  labels = rng.integers(0, config.num_labels, batch_size)

  def loss(tr, fr):
    logits = apply(partition.combine(tr, fr), batch, config=config)["logits"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  fn = jax.grad(loss) if gradient else loss
  return _dot_flops(jax.make_jaxpr(fn)(trainable, frozen).jaxpr)


class TrainFlopsTest(parameterized.TestCase):

  @parameterized.product(model_type=["roberta", "bert"],
                         method=["full", "lora", "bottleneck"])
  def test_equals_the_products_autodiff_emits(self, model_type, method):
    config = tiny_config(model_type, num_labels=3)
    b, t = 2, 16
    reference = _loss_dot_flops(config, method, b, t)
    shapes = flops.parameter_shapes(config, TrainConfig(method=method, model="test"))
    self.assertEqual(flops.train_flops_per_sequence(shapes, config, t, method) * b, reference)

  def test_roberta_base_full_is_three_forwards_and_frozen_methods_about_two(self):
    config, t = EncoderConfig(num_labels=2), 128
    forward = _loss_dot_flops(config, "full", 1, t, gradient=False)
    count = {m: flops.train_flops_per_sequence(
        flops.parameter_shapes(config, TrainConfig(method=m, model="test")), config, t, m)
             for m in partition.METHODS}
    self.assertAlmostEqual(count["full"] / forward, 3.0, places=9)
    self.assertAlmostEqual(count["full"] / 1e9, 67.0, delta=0.1)  # the yardstick
    for method in ("lora", "bottleneck"):  # input gradients only, plus the adapters
      self.assertBetween(count[method] / forward, 2.0, 2.1)
    self.assertEqual(count["lora"], _loss_dot_flops(config, "lora", 1, t))

  def test_parameter_shapes_match_the_prepared_tree(self):
    config = tiny_config(num_labels=2)
    for method in partition.METHODS:
      tc = TrainConfig(method=method, model="test")
      real = methods.prepare_params(init_params(config), config, tc)
      shapes = flops.parameter_shapes(config, tc)
      self.assertEqual(jax.tree.structure(real), jax.tree.structure(shapes))
      for a, b in zip(jax.tree.leaves(real), jax.tree.leaves(shapes)):
        self.assertEqual(np.shape(a), np.shape(b))
        self.assertEqual(jnp.asarray(a).dtype, jnp.asarray(b).dtype)

  def test_unknown_method_names_the_valid_ones(self):
    config = tiny_config(num_labels=2)
    with self.assertRaisesRegex(ValueError, "Unknown fine-tuning method 'prefix'.*full"):
      flops.train_flops_per_sequence({}, config, 8, "prefix")


if __name__ == "__main__":
  absltest.main()
