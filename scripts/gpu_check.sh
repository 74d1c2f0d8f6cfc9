#!/usr/bin/env bash
# One device call: GPU tests (compiled Pallas vs XLA) and the kernel benchmark.
# Writes logs and JSON under $OUT (default ./gpu_out) and prints a short table last.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q -e ".[test]" 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest tests/test_kernels.py -q 2>&1 | tee "$OUT/tests.log" | tail -3
timeout 240 python3 scripts/bench_kernels.py --json "$OUT/bench_kernels.json" 2>&1 | tee "$OUT/bench_kernels.txt"
echo "== summary =="
tail -n 3 "$OUT/tests.log"
grep -E "pallas|bincount|floor|bandwidth" "$OUT/bench_kernels.txt"
