#!/usr/bin/env bash
# Profile the bf16 roberta-base train step on a GPU and try XLA flag variants, one call:
#   bash benchmarks/gpu_profile.sh     (traces, optimized HLO and logs to ${OUT:-/tmp/gpu_profile})
# Summarise a trace here with: python -m benchmarks.trace_summary trace_full.json.gz
set -uo pipefail
out=${OUT:-/tmp/gpu_profile}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_PREALLOCATE=false
common="--dtype=bfloat16 --peak_size=8192 --steps=10 --rounds=2 --warmup=2 --batch_size=256 --torch=false"
run() {  # name, extra XLA flags, bench flags...
  local name=$1 xla=$2; shift 2
  echo "=== $name: XLA_FLAGS=$xla $*" | tee -a "$out/runs.log"
  XLA_FLAGS="$xla" timeout 200 python3 -m benchmarks.bench_train $common "$@" 2>&1 \
    | grep -v Warning | grep -E "device:|tokens/s|ratio|Error|error|^JSON" | tee -a "$out/runs.log"
}
run profile "--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*step.*" \
  --methods=full,lora --profile_dir=/tmp/prof
for m in full lora; do cp /tmp/prof/$m/plugins/profile/*/perfetto_trace.json.gz "$out/trace_$m.json.gz"; done
(cd /tmp/hlo && tar czf "$out/hlo.tar.gz" $(ls | grep -E "after_optimizations.txt$|buffer-assignment" | head -8))
run cublaslt "--xla_gpu_enable_cublaslt=true" --methods=full
run no_triton_gemm "--xla_gpu_enable_triton_gemm=false" --methods=full
run b512 "" --methods=full --batch_size=512
