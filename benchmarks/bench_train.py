r"""Training-step throughput: our jitted JAX step vs transformers + peft in PyTorch.

  python -m benchmarks.bench_train                      # CPU, float32, roberta-base shape
  python -m benchmarks.bench_train --dtype=bfloat16 --batch_size=256 --torch=false  # GPU/TPU

Random weights at the roberta-base shape (12 layers, hidden 768), sequence length 128,
the same batch for both frameworks, dropout on (training mode), AdamW with clipping.
Reports steady-state tokens/s and sequences/s (compile / first-step time separately),
the JAX/PyTorch ratio, and two utilisations against a measured matmul peak:

* MFU: model FLOPs per training sequence, counted per method from the parameter tree
  (``tvgeo_jax.training.flops.train_flops_per_sequence``): the forward products plus
  the backward products the method needs. Full FT is 3 × forward (≈ 67 GFLOP for
  roberta-base at 128 tokens, the issue's yardstick); LoRA and bottleneck adapters
  ≈ 2 × forward. Every layer counts every token, though the classification step runs
  the last layer's queries, attention output and FFN for the first token only.
* XLA utilisation: the FLOPs XLA counts in the compiled JAX step (its cost analysis:
  every dot and elementwise op it executes, per sequence) at the measured speed.

The peak is re-measured after every round and the best of the run counts, as the
best round does for the steps (on a shared CPU a single early measurement can be
low enough to put the utilisation above 100%).
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_list("methods", ["full", "lora"], "Methods to time (full, lora, bottleneck).")
flags.DEFINE_integer("batch_size", 8, "Sequences per step.")
flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
flags.DEFINE_integer("steps", 3, "Timed steps per round.")
flags.DEFINE_integer("rounds", 3, "Interleaved timing rounds (the best round counts).")
flags.DEFINE_integer("warmup", 1, "Untimed steps after compilation.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "JAX compute dtype.")
flags.DEFINE_bool("torch", True,
                  "Also time transformers + peft in PyTorch: on CUDA when torch sees a GPU "
                  "(bfloat16 autocast when --dtype=bfloat16), else on the CPU in float32.")
flags.DEFINE_list("torch_threads", ["1", "2"],
                  "torch intra-op thread counts to time; the fastest is the reference (on a "
                  "shared CPU, OpenMP spin-waiting can make 2 threads far slower than 1).")
flags.DEFINE_enum("shape", "roberta-base", ["roberta-base", "tiny"], "Model shape.")
flags.DEFINE_integer("peak_size", 2048, "Square matmul size for the measured peak "
                     "(8192 fills a GPU).")
flags.DEFINE_string("profile_dir", None, "Also trace 3 JAX steps per method here "
                    "(jax.profiler, with a Perfetto JSON trace) after timing.")
flags.DEFINE_float("dropout", -1.0, "Override hidden and attention dropout (ablation; "
                   "-1 keeps the model's 0.1). With 0, attention takes the fused kernel.")
flags.DEFINE_enum("prng_impl", "threefry2x32", ["threefry2x32", "rbg", "unsafe_rbg"],
                  "Dropout random-number generator of the JAX step.")


def model_config(shape: str, dropout: float):
  from tvgeo_jax.models.config import EncoderConfig, tiny_config
  cfg = EncoderConfig(num_labels=2) if shape == "roberta-base" else tiny_config(num_labels=2)
  if dropout >= 0:
    cfg = cfg.replace(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
  return cfg


def measured_peak(dtype, n: int, runs: int = 3, chain: int = 8) -> Dict[str, float]:
  """FLOP/s of large square matmuls on the default device, through JAX and (on a
  GPU) through PyTorch: random operands (zeros or ones can run faster than real
  data), ``chain`` products queued per synchronisation, best of ``runs`` one-second
  runs."""
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)

  def time_it(call, sync):
    sync(call())
    best = 0.0
    for _ in range(runs):
      reps, t = 0, time.perf_counter()
      while reps < 3 or time.perf_counter() - t < 1.0:
        outs = [call() for _ in range(chain)]
        sync(outs[-1])
        reps += chain
      best = max(best, 2.0 * n ** 3 * reps / (time.perf_counter() - t))
    return best

  peaks = {"jax": time_it(lambda: f(a, b), jax.block_until_ready)}
  try:
    import torch
  except ImportError:
    torch = None
  if torch is not None and torch.cuda.is_available() and jax.devices()[0].platform == "gpu":
    tdt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[jnp.dtype(dtype).name]
    ta = torch.randn(n, n, device="cuda", dtype=tdt)
    tb = torch.randn(n, n, device="cuda", dtype=tdt)
    peaks["torch"] = time_it(lambda: ta @ tb, lambda _: torch.cuda.synchronize())
  return peaks


def make_batch(cfg, b: int, t: int) -> Dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  ids = rng.integers(3, cfg.vocab_size, (b, t)).astype(np.int32)
  ids[:, 0] = cfg.bos_token_id
  return {"input_ids": ids, "attention_mask": np.ones((b, t), np.int32),
          "token_type_ids": np.zeros((b, t), np.int32),
          "labels": rng.integers(0, 2, b).astype(np.int32), "weights": np.ones(b, np.float32)}


def prepared_params(cfg, method: str):
  """Random roberta-shaped weights with ``method``'s adapters injected."""
  from tvgeo_jax.models import init_params
  from tvgeo_jax.training import methods as methods_lib
  from tvgeo_jax.training.config import TrainConfig
  return methods_lib.prepare_params(init_params(cfg), cfg,
                                    TrainConfig(method=method, model="bench"))


def xla_flops(compiled) -> float:
  """FLOPs XLA counts in a compiled executable (0 where the backend gives no count)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def build_jax(cfg, method: str, params, batch, dtype, prng_impl: str):
  """(compile seconds, run(n) -> loss, XLA FLOPs per step): our jitted step."""
  from tvgeo_jax.adapters import partition
  from tvgeo_jax.training import optim, step as step_lib
  from tvgeo_jax.core import sharding
  trainable, frozen = partition.split(params, method)
  tx = optim.make_optimizer(trainable, learning_rate=1e-4, total_steps=1000,
                            warmup_ratio=0.06, weight_decay=0.01, max_grad_norm=1.0)
  mesh = sharding.data_mesh()
  box = {"state": sharding.replicate(step_lib.init_state(trainable, tx), mesh)}
  frozen = sharding.replicate(frozen, mesh)
  fn = step_lib.make_train_step(model_config=cfg, optimizer=tx, mesh=mesh,
                                is_regression=False, dtype=dtype, prng_impl=prng_impl)
  gbatch = sharding.shard_batch(batch, mesh)
  t0 = time.perf_counter()
  compiled = fn._fn.lower(box["state"], frozen, gbatch).compile()
  compile_s = time.perf_counter() - t0

  def run(n: int) -> float:
    for _ in range(n):
      box["state"], m = compiled(box["state"], frozen, gbatch)
    jax.block_until_ready((box["state"], m))
    return float(m["loss"])

  return compile_s, run, xla_flops(compiled)


def build_torch(cfg, method: str, batch, threads: int, bfloat16: bool):
  """(first-step seconds, run(n) -> loss): transformers (+ peft) with torch AdamW,
  on CUDA when available (``bfloat16``: autocast, float32 weights, as our JAX step)."""
  import contextlib
  import torch
  torch.manual_seed(0)
  torch.set_num_threads(threads)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  import transformers
  hf = transformers.RobertaConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                     if k not in ("model_type", "architectures")})
  model = transformers.RobertaForSequenceClassification(hf)
  if method == "lora":
    import peft
    model = peft.get_peft_model(model, peft.LoraConfig(
        task_type=peft.TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.0,
        target_modules=["query", "value"]))
  elif method != "full":
    raise ValueError(f"No PyTorch reference for method {method!r}.")
  model.to(device).train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
  tb = {k: torch.tensor(batch[k]).long().to(device)
        for k in ("input_ids", "attention_mask", "labels")}
  autocast = (torch.autocast(device, dtype=torch.bfloat16) if bfloat16
              else contextlib.nullcontext())

  def one_step():
    with autocast:
      out = model(input_ids=tb["input_ids"], attention_mask=tb["attention_mask"],
                  labels=tb["labels"])
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss

  t0 = time.perf_counter()
  one_step()
  first_s = time.perf_counter() - t0

  def run(n: int) -> float:
    torch.set_num_threads(threads)
    for _ in range(n):
      loss = one_step()
    return loss.item()

  return first_s, run


def main(argv):
  del argv
  from tvgeo_jax.training import flops
  cfg = model_config(FLAGS.shape, FLAGS.dropout)
  dtype = jnp.dtype(FLAGS.dtype)
  b, t = FLAGS.batch_size, FLAGS.seq_len
  batch = make_batch(cfg, b, t)
  peaks = measured_peak(dtype, FLAGS.peak_size)

  def remeasure_peak():  # once per round: the ceiling is the best seen, like the steps
    for k, v in measured_peak(dtype, FLAGS.peak_size, runs=1).items():
      peaks[k] = max(peaks[k], v)

  dev = jax.devices()[0]
  print(f"device: {jax.device_count()} x {getattr(dev, 'device_kind', dev.platform)}; "
        f"shape {FLAGS.shape}, batch {b} x seq {t}, JAX dtype {FLAGS.dtype}; "
        f"dropout {cfg.hidden_dropout_prob}, PRNG {FLAGS.prng_impl}")
  report = {"device": str(dev), "batch_size": b, "seq_len": t, "dtype": FLAGS.dtype,
            "dropout": cfg.hidden_dropout_prob, "prng_impl": FLAGS.prng_impl,
            "methods": {}}
  for method in FLAGS.methods:
    params = prepared_params(cfg, method)
    r = {"model_flops_per_sequence": flops.train_flops_per_sequence(params, cfg, t, method)}
    builders = {"jax": lambda params=params: build_jax(cfg, method, params, batch, dtype,
                                                       FLAGS.prng_impl)}
    if FLAGS.torch:
      bf16 = FLAGS.dtype == "bfloat16"
      for k in map(int, FLAGS.torch_threads):
        builders[f"torch_t{k}"] = lambda k=k: build_torch(cfg, method, batch, k, bf16)
    runners = {}
    for name, build in builders.items():
      first_s, run, *xla = build()
      run(FLAGS.warmup)
      runners[name], r[name] = run, {"compile_s": first_s, "round_step_s": []}
      if xla and xla[0]:
        r[name]["xla_flops_per_sequence"] = xla[0] / b
    # Interleaved rounds, best round per framework: the machine is shared and noisy.
    for _ in range(FLAGS.rounds):
      for name, run in runners.items():
        t0 = time.perf_counter()
        r[name]["loss"] = run(FLAGS.steps)
        r[name]["round_step_s"].append((time.perf_counter() - t0) / FLAGS.steps)
      remeasure_peak()
    if FLAGS.profile_dir:
      with jax.profiler.trace(os.path.join(FLAGS.profile_dir, method), create_perfetto_trace=True):
        runners["jax"](3)
    report["methods"][method] = r

  peak = max(peaks.values())  # the machine's ceiling, whichever library reaches it
  report.update(peak_flops=peak, peaks=peaks)
  print(f"measured matmul peak {peak / 1e12:.3f} TFLOP/s ({FLAGS.peak_size}^2 {FLAGS.dtype}, "
        "best of the run; " + ", ".join(f"{k} {v / 1e12:.3f}" for k, v in peaks.items()) + ")")
  for method, r in report["methods"].items():
    names = [k for k in r if k == "jax" or k.startswith("torch_t")]
    for name in names:
      v = r[name]
      v["step_s"] = min(v["round_step_s"])
      v["median_step_s"] = float(np.median(v["round_step_s"]))
      v["tokens_per_s"] = b * t / v["step_s"]
      v["sequences_per_s"] = b / v["step_s"]
      v["mfu"] = v["sequences_per_s"] * r["model_flops_per_sequence"] / peak
      util = f"MFU {100 * v['mfu']:5.1f}%"
      if "xla_flops_per_sequence" in v:
        v["xla_utilisation"] = v["sequences_per_s"] * v["xla_flops_per_sequence"] / peak
        util += f", XLA {100 * v['xla_utilisation']:5.1f}%"
      print(f"{method:>10} {name:>8}: {v['tokens_per_s']:>10,.0f} tokens/s "
            f"{v['sequences_per_s']:>8.2f} seq/s  step {1e3 * v['step_s']:8.1f} ms "
            f"(rounds {', '.join(f'{1e3 * x:.0f}' for x in v['round_step_s'])})  "
            f"compile/first step {v['compile_s']:6.1f} s  {util}")
    torch_names = [k for k in names if k.startswith("torch")]
    if torch_names:
      best = max(torch_names, key=lambda k: r[k]["tokens_per_s"])
      r["torch_reference"] = best
      r["ratio_jax_over_torch"] = r["jax"]["tokens_per_s"] / r[best]["tokens_per_s"]
      r["median_ratio_jax_over_torch"] = r[best]["median_step_s"] / r["jax"]["median_step_s"]
      print(f"{method:>10} ratio JAX / PyTorch (fastest torch setting, {best}): "
            f"{r['ratio_jax_over_torch']:.2f}x on the best rounds, "
            f"{r['median_ratio_jax_over_torch']:.2f}x on the median rounds")
    xla_seq = r["jax"].get("xla_flops_per_sequence", 0.0)
    print(f"{method:>10} model FLOPs {r['model_flops_per_sequence'] / 1e9:.3g} GFLOP per "
          f"training sequence; XLA counts {xla_seq / 1e9:.3g} GFLOP executed per sequence")
  print("JSON " + json.dumps(report))


if __name__ == "__main__":
  app.run(main)
