#!/usr/bin/env bash
# Every GPU check and GPU benchmark in one call, for a session that is lent a GPU machine.
# On that machine, from the project root, after the two-call set-up of ../shared/device/README.md:
#
#     source .device/on-device.sh; bash benchmarks/gpu_session.sh
#
# Runs the CUDA tests, the LoRAPrune-vs-LoRA step benchmark (bf16 and fp32, device synchronised,
# tokens/s) and the 2:4 sparse-kernel speed benchmark, each under its own time limit, and copies
# the logs and the result JSONs to $OUT (the device tool brings that folder back). About 6 minutes
# on an H100 is the budget it is written for; every step goes on if an earlier one fails.
set -u
out=${OUT:-/tmp/gpu_out}
mkdir -p "$out"
step() {  # name, time limit (s), command...
    local name=$1 limit=$2
    shift 2
    echo "== $name" | tee -a "$out/summary.txt"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "   exit $?" | tee -a "$out/summary.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
step cuda_tests 150 python3 -m pytest -q -rs tests/test_layerwise.py tests/test_semi_structured.py -k "cuda"
step overhead_bf16 150 python3 benchmarks/loraprune_overhead.py --device cuda --mixed-precision bf16 --batch-size 4 --seq-len 512 --steps 10 --rounds 3 --name loraprune_overhead_gpu_bf16
step overhead_fp32 120 python3 benchmarks/loraprune_overhead.py --device cuda --batch-size 4 --seq-len 512 --steps 10 --rounds 3 --name loraprune_overhead_gpu_fp32
step sparse24_speed 90 python3 benchmarks/sparse24_speed.py --dtype float16
cp benchmarks/results/loraprune_overhead_gpu_*.json benchmarks/results/sparse24_speed.json "$out"/ 2>/dev/null
cat "$out/summary.txt"
