"""Layer 2: task vectors (fine-tuned minus base, base first) and the per-module,
per-layer stacks the geometry kernels take."""
