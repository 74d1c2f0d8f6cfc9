#!/usr/bin/env bash
# One device call on one H100/H200: environment, a smoke stage, the GPU tests, then benchmarks trimmed
# to fit, most informative first, within a total budget (default 480 s: a 10-minute device call with
# room for the machine's start).
#
#   OUT=dir BUDGET_S=480 EPLB_DATA=path/prefill_in1024.json bash scripts/gpu_check.sh
#
# Stops within seconds, with one line and exit 2, where JAX does not see a GPU. Needs no network and no
# build: an editable install of this checkout is used if there is one, else the three source folders are
# copied under their import names into a scratch folder; the GPU image's jax, flax, orbax, hypothesis, ...
# are used. tokamax (the gpu extra) is used where the image has it; else it is installed from wheels in
# $GPU_WHEELS (default .gpu_wheels, made beforehand on a machine with network:
#   pip download --no-deps -d .gpu_wheels --python-version 3.12 --only-binary=:all: \
#       tokamax qwix einshape immutabledict jaxtyping wadler-lindig tensorboardx \
#       pydantic pydantic-core annotated-types typing-inspection tqdm xprof fire termcolor six optax
# ) with --no-deps (JAX and its CUDA plugin stay the image's) under a 60 s limit; its import is then checked.
# Every step: a limit of its own cut to what is left of the budget, skipped under 20 s left; its exit
# status (124/137: stopped at its limit) and seconds are logged; output goes to $OUT/NAME.txt as it comes
# (pytest is sent SIGINT at its limit, so its summary is kept). Exit status: the number of steps that failed.
# XLA's persistent compile cache lives in .jax_cache (git-ignored), so an immediate rerun on the warm
# machine skips the compiles. The recorded DeepSeek-V3 loads are not part of the repository: copy
# prefill_in1024.json into an ignored folder that travels with the working tree and point EPLB_DATA at it
# (without it, bench_moe draws a synthetic log-normal skew).
set -uo pipefail
OUT=${OUT:-gpu_out}
BUDGET_S=${BUDGET_S:-480}
DATA=${EPLB_DATA:-../shared/data/deepseek-v3-sglang/prefill_in1024.json}
START=$(date +%s)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/.jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0.5}
export JAX_EPLB_PROBE_LIMIT_S=${JAX_EPLB_PROBE_LIMIT_S:-30}  # an 'auto' candidate over this is out
: > "$OUT/steps.txt"

# The three import names of the project: jax_eplb, jax_eplb_kernels (from kernels/), jax_eplb_configs.
if ! timeout 60 python3 -c "import jax_eplb, jax_eplb_kernels, jax_eplb_configs, sys; sys.exit(not jax_eplb.__file__.startswith('$PWD/'))" 2>/dev/null; then
    SITE=$(mktemp -d)
    cp -r jax_eplb "$SITE/jax_eplb"; cp -r kernels "$SITE/jax_eplb_kernels"; cp -r configs "$SITE/jax_eplb_configs"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

left() { echo $((BUDGET_S - ($(date +%s) - START))); }

FAILED_STEPS=0
step() {  # step NAME LIMIT_S CMD...: run with the smaller of LIMIT_S and the time left; log to $OUT/NAME.txt
    local name=$1 limit=$2; shift 2
    local remaining; remaining=$(left)
    if ((remaining < 20)); then
        echo "[$name] skipped: ${remaining}s of the budget left" | tee "$OUT/$name.txt" >> "$OUT/steps.txt"; return
    fi
    ((limit > remaining)) && limit=$remaining
    echo "== [$name] (limit ${limit}s) $*"
    local t0; t0=$(date +%s)
    timeout -s INT -k 15 "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    local status=${PIPESTATUS[0]}
    ((status != 0)) && FAILED_STEPS=$((FAILED_STEPS + 1))
    local line="[$name] exit $status in $(($(date +%s) - t0))s"
    ((status == 124 || status == 137)) && line+=" (stopped at its limit)"
    echo "$line" | tee -a "$OUT/$name.txt" >> "$OUT/steps.txt"
    echo "$line"
}

# 0. Environment: stop here, in one line, unless JAX sees a GPU.
{ command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  date -u +%Y-%m-%dT%H:%MZ; } 2>&1 | tee "$OUT/gpu.txt"
if ! timeout 90 python3 scripts/gpu_env.py >> "$OUT/gpu.txt" 2>&1; then
    echo "gpu_check: stopped: $(tail -n 1 "$OUT/gpu.txt")" | tee -a "$OUT/steps.txt"
    exit 2
fi
cat "$OUT/gpu.txt"

if ! timeout 60 python3 -c "import tokamax" 2>/dev/null && [[ -d "${GPU_WHEELS:-.gpu_wheels}" ]]; then
    timeout 60 python3 -m pip install -q --no-index --no-deps "${GPU_WHEELS:-.gpu_wheels}"/*.whl 2>&1 | tail -2
    timeout 60 python3 -c "from jax_eplb.moe import tokamax_unavailable as u; print('tokamax after install:', u() or 'available')"
fi
# tokamax first: XLA's ragged_dot on CUDA may run as a dense masked matmul over all groups (unmeasured)
MATMULS=()
timeout 60 python3 -c "from jax_eplb.moe import tokamax_unavailable as u; raise SystemExit(u() is not None)" \
    2>/dev/null && MATMULS+=(tokamax)
MATMULS+=(ragged_dot)
timeout 60 python3 -c "from jax_eplb_kernels import triton_in_auto as t; raise SystemExit(not t())" 2>/dev/null \
    && MATMULS+=(pallas)

# 1. Smoke (about a minute): every GPU kernel and transport once against its reference; auto's lines.
step smoke 100 python3 scripts/gpu_smoke.py --json "$OUT/smoke.jsonl"
# 2. The GPU-only tests (compiled kernels == XLA, ragged transport == dense MoE, auto on the GPU), then the
#    lowering tests with DeprecationWarning an error on the default paths.
JAX_EPLB_TEST_COMPILE_CACHE="$JAX_COMPILATION_CACHE_DIR/tests" step tests 100 python3 -m pytest tests/test_kernels.py \
    tests/test_moe_block.py tests/test_gpu_lowering.py tests/test_auto_choice.py -v -k "gpu or cuda" -p no:cacheprovider
# 3. DeepSeek-V3-shaped MoE layer on one GPU (ep=1, 288 slots, the balanced plan, load_aware, token dispatch,
#    the first grouped matmul): compile vs steady-state time, peak memory, max difference between
#    configurations; then the grouped SwiGLU of every matmul at 2048 rows against dense TFLOP/s.
DATA_ARG=(); [[ -f "$DATA" ]] && DATA_ARG=(--data "$DATA")
step moe 140 python3 scripts/bench_moe.py --ep 1 --emulate_devices 0 --tokens 4096 --hidden 7168 --ffn 2048 \
    --experts 256 --top_k 8 --slots_per_rank 288 --repeats 3 --matmul_rows 2048 --plans balanced \
    --policies load_aware --transports ragged --dispatches token --matmuls "${MATMULS[0]}" \
    --table_matmuls "${MATMULS[@]}" --no_split_table "${DATA_ARG[@]}"
# 4. Routing kernels in-device: Mosaic GPU (and Triton) vs XLA at 65,536 and 8.4M ids.
step kernels 50 python3 scripts/bench_kernels.py --reps 50 --json "$OUT/bench_kernels.json"
# 5. DeepSeek-V3-shaped model slice (ep=1: the step cost of the slot machinery), auto's choices.
step inference 60 python3 scripts/bench_inference.py --model deepseek_v3_slice --ep 1 --emulate_devices 0 \
    --num_slots 288 --requests 32 --input_len 128 --output_len 8 --max_batch_size 32 \
    --grouped_matmul auto --json "$OUT/bench_inference.json"
# 6. Online rebalance: rewriting changed slots (88 MB each in bf16, 44 MB in FP8) from host memory vs from device
#    copies.
step rebalance 30 python3 scripts/bench_rebalance.py --ep 1 --slots_per_rank 36 --experts 17 --moved 4 16 --repeats 2

echo "== summary ($(($(date +%s) - START))s of ${BUDGET_S}s) =="
grep -E "^(name|NVIDIA|jax:|jaxlib:|devices|Mosaic|tokamax|memory)" "$OUT/gpu.txt" | cut -c1-200
grep -hE "^(PASS|FAIL|ERROR)" "$OUT/smoke.txt" 2>/dev/null | cut -c1-200
grep -E "passed|failed|error" "$OUT/tests.txt" 2>/dev/null | tail -2
grep -hE " -> [a-z_]+$" "$OUT"/*.txt 2>/dev/null | sort -u | cut -c1-240
grep -hE "FAILED|compile|peak|TFLOP" "$OUT/moe.txt" 2>/dev/null | cut -c1-200
grep -E "mosaic|pallas|bincount|floor|bandwidth" "$OUT/kernels.txt" 2>/dev/null
grep -E "^(no EPLB|EPLB)" "$OUT/inference.txt" 2>/dev/null
grep -E "^ *[0-9]+ +(host|device) " "$OUT/rebalance.txt" 2>/dev/null
cat "$OUT/steps.txt"
exit "$FAILED_STEPS"
