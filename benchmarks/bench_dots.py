"""Benchmark: the roberta-base FFN matmuls alone, jitted JAX vs PyTorch, same process.

    python -m benchmarks.bench_dots [--tokens=1024] [--repeats=7] [--torch_threads=2]

The training step's four FFN products at batch 8 x 128 tokens (hidden 768,
intermediate 3072), in the layouts the step uses: the forward ``x·W1``, ``a·W2``
and the input gradients ``a·W1ᵀ``, ``x·W2ᵀ`` (Flax kernels are ``(in, out)``), plus
the weight gradient ``xᵀ·a``. Each is timed alone (best of ``--repeats``, after a
warm-up), so the ratio to torch is the libraries' GEMM speed, apart from what the
compilers do around it. This is how BUILD_NOTES rules out slow or single-threaded
XLA:CPU dots as the cause of a slow CPU train step.
"""
from __future__ import annotations

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import best_time

FLAGS = flags.FLAGS
flags.DEFINE_integer("tokens", 1024, "Rows of the activations (batch x sequence).")
flags.DEFINE_integer("hidden", 768, "Hidden size.")
flags.DEFINE_integer("intermediate", 3072, "FFN size.")
flags.DEFINE_integer("repeats", 7, "Timed calls per product (the best counts).")
flags.DEFINE_integer("torch_threads", 2, "torch intra-op threads (0: skip torch).")

# name, lhs, rhs, contracting dims (lhs, rhs); the torch form is derived from them.
_FORMS = (("forward x·W1", "x", "w1", (1, 0)), ("forward a·W2", "a", "w2", (1, 0)),
          ("input grad a·W1ᵀ", "a", "w1", (1, 1)), ("input grad x·W2ᵀ", "x", "w2", (1, 1)),
          ("weight grad xᵀ·a", "x", "a", (0, 0)))


def _warm_best(fn, repeats):
  fn()  # compile / first-touch outside the timing
  return best_time(fn, repeats)


def main(argv):
  del argv
  m, h, i = FLAGS.tokens, FLAGS.hidden, FLAGS.intermediate
  r = np.random.default_rng(0)
  arrays = {"x": r.standard_normal((m, h), np.float32), "a": r.standard_normal((m, i), np.float32),
            "w1": r.standard_normal((h, i), np.float32), "w2": r.standard_normal((i, h), np.float32)}
  torch = None
  if FLAGS.torch_threads > 0:
    import torch
    torch.set_num_threads(FLAGS.torch_threads)
  print(f"device: {jax.devices()[0].platform}; tokens {m}, hidden {h}, intermediate {i}, "
        f"float32; torch threads {FLAGS.torch_threads}")
  for name, ln, rn, (lc, rc) in _FORMS:
    lhs, rhs = jnp.asarray(arrays[ln]), jnp.asarray(arrays[rn])
    f = jax.jit(lambda p, q, lc=lc, rc=rc: jax.lax.dot_general(p, q, (((lc,), (rc,)), ((), ()))))
    flops = 2.0 * np.prod(lhs.shape) * np.prod(rhs.shape) / lhs.shape[lc]
    tj = _warm_best(lambda: jax.block_until_ready(f(lhs, rhs)), FLAGS.repeats)
    line = f"{name:18s} jax {tj * 1e3:7.1f} ms {flops / tj / 1e9:6.0f} GFLOP/s"
    if torch is not None:
      tl, tr = torch.from_numpy(arrays[ln]), torch.from_numpy(arrays[rn])
      tl = tl.T if lc == 0 else tl
      tr = tr.T if rc == 1 else tr
      tt = _warm_best(lambda: tl @ tr, FLAGS.repeats)
      line += f" | torch {tt * 1e3:7.1f} ms {flops / tt / 1e9:6.0f} GFLOP/s | JAX/torch {tt / tj:.2f}x"
    print(line, flush=True)


if __name__ == "__main__":
  app.run(main)
