#!/usr/bin/env bash
# One device call: GPU tests and benchmarks on one H100/H200, within a total deadline.
#
#   OUT=dir BUDGET_S=500 EPLB_DATA=path/prefill_in1024.json bash scripts/gpu_check.sh
#
# tokamax (the gpu extra) is used where the image has it; else, without network, it is installed
# from wheels in $GPU_WHEELS if that folder exists (made beforehand, on a machine with network:
# pip download tokamax -d .gpu_wheels --python-version 3.12 --only-binary=:all:), else its rows say
# it is missing.
#
# Needs no network and no build: an editable install of this checkout is used if there is one,
# else the three source folders are copied under their import names into a scratch folder (the
# layout pyproject.toml installs); the GPU image's jax, flax, orbax, hypothesis, ... are used. Steps run in priority order; each gets at most its own
# limit and what is left of BUDGET_S, and is skipped when under 20 s are left. Logs and JSON go
# to $OUT; a short summary is printed last. The recorded DeepSeek-V3 loads are not part of the
# repository: copy prefill_in1024.json into an ignored folder that travels with the working tree
# and point EPLB_DATA at it (without it, bench_moe draws a synthetic log-normal skew).
set -uo pipefail
OUT=${OUT:-gpu_out}
BUDGET_S=${BUDGET_S:-500}
DATA=${EPLB_DATA:-../shared/data/deepseek-v3-sglang/prefill_in1024.json}
START=$(date +%s)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# The three import names of the project: jax_eplb, jax_eplb_kernels (from kernels/), jax_eplb_configs.
if ! python3 -c "import jax_eplb, jax_eplb_kernels, jax_eplb_configs, sys; sys.exit(not jax_eplb.__file__.startswith('$PWD/'))" 2>/dev/null; then
    SITE=$(mktemp -d)
    cp -r jax_eplb "$SITE/jax_eplb"; cp -r kernels "$SITE/jax_eplb_kernels"; cp -r configs "$SITE/jax_eplb_configs"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

if ! python3 -c "import tokamax" 2>/dev/null && [[ -d "${GPU_WHEELS:-.gpu_wheels}" ]]; then
    python3 -m pip install -q --no-index --find-links "${GPU_WHEELS:-.gpu_wheels}" tokamax 2>&1 | tail -2
fi
MATMULS=(ragged_dot pallas)
python3 -c "import tokamax" 2>/dev/null && MATMULS+=(tokamax) || echo "note: tokamax is not installed: no tokamax rows"

step() {  # step NAME LIMIT_S CMD...: run with the smaller of LIMIT_S and the time left; log to $OUT/NAME.txt
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET_S - ($(date +%s) - START)))
    if ((left < 20)); then echo "[$name] skipped: ${left}s left" | tee "$OUT/$name.txt"; return; fi
    ((limit > left)) && limit=$left
    echo "== [$name] (limit ${limit}s) $*"
    local t0=$(date +%s)
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    echo "[$name] exit ${PIPESTATUS[0]} in $(($(date +%s) - t0))s" | tee -a "$OUT/$name.txt"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
  date -u +%Y-%m-%dT%H:%MZ; } 2>&1 | tee "$OUT/gpu.txt"

# 1. GPU-only tests: compiled Mosaic GPU and Triton kernels == XLA; ragged_all_to_all transport == dense
#    MoE; the timed auto transport; then the lowering tests with DeprecationWarning an error on the
#    default paths. (If a kernel fails here, the benchmarks still run: 'auto' measures each candidate,
#    leaves out what fails and says so in one line; explicit rows report FAILED.)
step tests 170 python3 -m pytest tests/test_kernels.py tests/test_moe_block.py tests/test_gpu_lowering.py -q \
    -k "gpu or cuda" -p no:cacheprovider
# 2. Histogram kernels vs XLA, in-device: Mosaic GPU and Triton Pallas vs XLA at 65,536 and 8.4M ids.
step kernels 120 python3 scripts/bench_kernels.py --reps 100 --json "$OUT/bench_kernels.json"
# 3. DeepSeek-V3-shaped MoE layer on one GPU (ep=1, 288 slots; at ep=1 both transports are local, so the
#    ragged one only): ragged_dot vs the Pallas tile-grouped matmul, TFLOP/s vs dense, step times; then the
#    load-aware split alone on the GPU (32 accelerated passes vs the 16 damped ones, tables tight and padded) at
#    EP1/288 and EP36/288.
#    ragged_dot vs tokamax vs ours (Triton), TFLOP/s next to dense. Both dispatch modes (token: once per
#    rank, combined there; entry); the timed auto transport is checked by the GPU tests of step 1.
DATA_ARG=(); [[ -f "$DATA" ]] && DATA_ARG=(--data "$DATA")
step moe 200 python3 scripts/bench_moe.py --ep 1 --emulate_devices 0 --tokens 8192 --hidden 7168 --ffn 2048 \
    --experts 256 --top_k 8 --slots_per_rank 288 --repeats 3 --matmul_rows 2048 8192 16384 \
    --transports ragged --dispatches token entry --matmuls "${MATMULS[@]}" "${DATA_ARG[@]}"
# 4. Online rebalance: rewriting changed slots (88 MB each) from host memory vs from device copies
#    (at ep=1 all local), vs one host-to-device transfer of the same bytes.
step rebalance 75 python3 scripts/bench_rebalance.py --ep 1 --slots_per_rank 36 --moved 4 8 16
# 5. DeepSeek-V3-shaped model slice on one GPU (ep=1: the step cost of the slot machinery, not balance),
#    with XLA's ragged_dot and with the Pallas tile-grouped matmul.
step inference 120 python3 scripts/bench_inference.py --model deepseek_v3_slice --ep 1 --emulate_devices 0 \
    --num_slots 288 --requests 64 --input_len 128 --output_len 16 --max_batch_size 64 \
    --grouped_matmul ragged_dot pallas --json "$OUT/bench_inference.json"

echo "== summary ($(($(date +%s) - START))s) =="
cat "$OUT/gpu.txt"
grep -E "passed|failed|error" "$OUT/tests.txt" | tail -2
grep -E "mosaic|pallas|bincount|floor|bandwidth" "$OUT/kernels.txt"
grep -E "^ *(no EPLB|balanced)|^ *[0-9]+( +([0-9.]+|nan))+$|TFLOP|sequential|vectorised" "$OUT/moe.txt"
grep -E "^ *[0-9]+ +(host|device) " "$OUT/rebalance.txt"
grep -E "^(no EPLB|EPLB)" "$OUT/inference.txt"
grep -hE " -> [a-z_]+$|FAILED" "$OUT"/*.txt | sort -u | cut -c1-240
grep -hE "^\[[a-z]+\] (exit|skipped)" "$OUT"/*.txt
