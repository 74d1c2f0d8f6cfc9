#!/usr/bin/env bash
# One device call: GPU tests and benchmarks, sized for a few minutes on one H100/H200.
# Writes logs and JSON under $OUT (default ./gpu_out) and prints a short table last.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q -e ".[test]" 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
# 1. GPU-only tests: compiled Pallas kernels vs XLA; the ragged_all_to_all transport vs the dense MoE.
timeout 240 python3 -m pytest tests/test_kernels.py tests/test_moe_block.py -q -k "gpu" 2>&1 \
    | tee "$OUT/tests.log" | tail -3
if grep -qE "failed|error" "$OUT/tests.log"; then
    export JAX_EPLB_KERNELS=xla  # keep the model benchmarks running on the XLA routing kernels
    echo "GPU tests failed: the benchmarks below use JAX_EPLB_KERNELS=xla" | tee -a "$OUT/gpu.txt"
fi
# 2. Kernels vs XLA.
timeout 180 python3 scripts/bench_kernels.py --json "$OUT/bench_kernels.json" 2>&1 | tee "$OUT/bench_kernels.txt"
# 3. DeepSeek-V3-shaped MoE layer on one GPU (ep=1, 288 slots): transports, grouped matmul TFLOP/s vs dense.
timeout 240 python3 scripts/bench_moe.py --ep 1 --emulate_devices 0 --tokens 8192 --hidden 7168 --ffn 2048 \
    --experts 256 --top_k 8 --slots_per_rank 288 --repeats 3 --matmul_rows 2048 8192 16384 2>&1 \
    | tee "$OUT/bench_moe.txt"
# 4. Online rebalance: rewriting changed slots (88 MB each) vs host-to-device bandwidth.
timeout 180 python3 scripts/bench_rebalance.py --ep 1 --slots_per_rank 36 --moved 4 8 16 2>&1 \
    | tee "$OUT/bench_rebalance.txt"
# 5. DeepSeek-V3-shaped model slice on one GPU (ep=1: measures step cost of the slot machinery, not balance).
timeout 300 python3 scripts/bench_inference.py --model deepseek_v3_slice --ep 1 --emulate_devices 0 \
    --num_slots 288 --requests 64 --input_len 128 --output_len 16 --max_batch_size 64 \
    --json "$OUT/bench_inference.json" 2>&1 | tee "$OUT/bench_inference.txt"
echo "== summary =="
tail -n 3 "$OUT/tests.log"
grep -E "pallas|bincount|floor|bandwidth" "$OUT/bench_kernels.txt"
grep -E "^ *(no EPLB|balanced)|^ *[0-9]+ +[0-9.]+ +[0-9.]+ +[0-9.]+$" "$OUT/bench_moe.txt"
grep -E "^ *[0-9]+ +[0-9.]+ +[0-9.]+" "$OUT/bench_rebalance.txt"
grep -E "^(no EPLB|EPLB)" "$OUT/bench_inference.txt"
