"""Cost of SVCCA / PWCCA / Procrustes per layer pair vs CKA, at roberta-base width.

  python -m benchmarks.bench_similarity     (n=2000 examples, d=768, 2 layers per model)
"""
import time, numpy as np, jax
from tvgeo_jax.analysis import similarity as sim, cka
rng = np.random.default_rng(0)
n, d, L = 2000, 768, 2
x = rng.standard_normal((L, n, d)).astype(np.float32)
y = (x + rng.standard_normal(x.shape)).astype(np.float32)
def t(f, reps=2):
  f(); best = 1e9
  for _ in range(reps):
    s = time.perf_counter(); f(); best = min(best, time.perf_counter() - s)
  return best
tb = t(lambda: jax.block_until_ready(sim.representation_bases(x)))
bx, by = sim.representation_bases(x), sim.representation_bases(y)
for ms in [("svcca", "pwcca", "procrustes"), ("svcca",), ("procrustes",), ("pwcca",)]:
  tp = t(lambda: sim.layer_similarities(bx, by, ms))
  print(f"{ms}: {tp / L**2:.3f} s per layer pair")
tc = t(lambda: cka.minibatch_cka(x, y, 256))
print(f"bases: {tb / L:.3f} s per layer; CKA (batch 256): {tc / L**2:.3f} s per layer pair")
