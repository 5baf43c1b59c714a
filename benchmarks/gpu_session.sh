#!/usr/bin/env bash
# Every GPU check and GPU benchmark in one call, for a session that is lent a GPU machine.
# On that machine, from the project root, after the two-call set-up of ../shared/device/README.md:
#
#     source .device/on-device.sh; bash benchmarks/gpu_session.sh
#
# First, alone on the GPU (timed): the LoRAPrune-vs-LoRA step in bf16, eager (importance one
# projection at a time, then stacked across layers) and with --compile,
# and the 2:4 sparse-kernel speed. Then, side by side (untimed): the CUDA tests and the
# standard-preset comparison (benchmarks/standard_preset.py). Everything must end inside one call
# of the device tool (10 minutes), so each step gets what is left of GPU_BUDGET_S (default 560 s).
# The standard-preset runs get what the timed steps leave, about 4 minutes; six side by side took
# about 4.5 minutes for five on an H200, so list fewer in STANDARD_ONLY (comma-separated) when
# the others are already measured: runs still going at the deadline are recorded as stopped.
# The device tool brings back at most 8 files: logs.txt (every step's log tail and exit status)
# and the result JSONs, copied to $OUT as soon as each exists.
set -u
out=${OUT:-/tmp/gpu_out}
mkdir -p "$out"
budget=${GPU_BUDGET_S:-560}
only=${STANDARD_ONLY:-loraprune,loraprune_lora_plus,taylor,grad,mask_fisher,loraprune_distill}
t0=$(date +%s)
left() { echo $(( budget - ($(date +%s) - t0) )); }
log=$out/logs.txt
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$log" 2>&1

step() {  # name, time limit (s), command...
    local name=$1 limit=$2
    shift 2
    local remaining
    remaining=$(left)
    [ "$limit" -gt "$remaining" ] && limit=$remaining
    if [ "$limit" -lt 20 ]; then echo "== $name: skipped, $remaining s left" >> "$log"; return; fi
    local t=$(date +%s)
    timeout "$limit" "$@" > "/tmp/$name.log" 2>&1
    local rc=$?
    { echo "== $name: exit $rc after $(( $(date +%s) - t )) s (limit $limit s)"; tr '\r' '\n' < "/tmp/$name.log" | grep -v '^ *$' | grep -v '%|' | tail -n 60; } >> "$log"
    cp benchmarks/results/*gpu*.json benchmarks/results/sparse24_speed.json "$out"/ 2>/dev/null
}

step overhead_bf16 110 python3 benchmarks/loraprune_overhead.py --device cuda --mixed-precision bf16 --batch-size 4 --seq-len 512 \
    --steps 10 --rounds 3 --warmup 2 --name loraprune_overhead_gpu_bf16
step overhead_bf16_stacked 90 python3 benchmarks/loraprune_overhead.py --device cuda --mixed-precision bf16 --batch-size 4 --seq-len 512 \
    --steps 10 --rounds 3 --warmup 2 --stack-mib 64 --name loraprune_overhead_gpu_bf16_stacked
step overhead_bf16_compile 150 python3 benchmarks/loraprune_overhead.py --device cuda --mixed-precision bf16 --batch-size 4 --seq-len 512 \
    --steps 8 --rounds 2 --warmup 3 --compile --name loraprune_overhead_gpu_bf16_compile
step sparse24_speed 110 python3 benchmarks/sparse24_speed.py --dtype float16 --backend auto cutlass

# untimed: the CUDA tests next to the standard-preset runs
( step cuda_tests 150 python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda_step.py \
    tests/test_layerwise.py::test_runs_on_cuda_in_bfloat16 tests/test_semi_structured.py::test_converted_model_gives_the_dense_logits_on_cuda ) &
deadline=$(( $(left) - 50 ))
step standard_preset $(( deadline + 45 )) python3 benchmarks/standard_preset.py --only "$only" --deadline "$deadline" --copy-to "$out"
wait
echo "== done after $(( $(date +%s) - t0 )) s" >> "$log"
cat "$log"
