#!/usr/bin/env bash
# The GPU training-step measurements of BUILD_NOTES.md, in one device call:
#   bash benchmarks/gpu_train.sh      (logs, JSON and a kernel trace go to ${OUT:-/tmp/gpu_train})
# roberta-base shape, seq 128, bfloat16 compute with float32 parameters, dropout 0.1;
# PyTorch (transformers + peft, bf16 autocast) on the same GPU and batch in the first run.
# Summarise the trace here with: python -m benchmarks.trace_summary trace_full.json.gz
set -uo pipefail
out=${OUT:-/tmp/gpu_train}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# JAX and PyTorch share the GPU in one process: no up-front 75% grab by JAX.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$out/runs.log"
python3 -c "import jax, flax, torch, transformers, peft; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/runs.log"
common="--dtype=bfloat16 --peak_size=8192 --steps=10 --rounds=3 --warmup=2 --torch_threads=1"
run() {  # name, flags...
  local name=$1; shift
  echo "=== $name: $*" | tee -a "$out/runs.log"
  timeout 300 python3 -m benchmarks.bench_train $common "$@" 2>&1 | grep -v Warning \
    | grep -E "device:|tokens/s|ratio|Error|error|^JSON" | tee -a "$out/runs.log"
}
run b256 --methods=full,lora --batch_size=256 --profile_dir=/tmp/prof
run b512 --methods=full --batch_size=512 --torch=false
cp /tmp/prof/full/plugins/profile/*/perfetto_trace.json.gz "$out/trace_full.json.gz"
