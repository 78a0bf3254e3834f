#!/usr/bin/env bash
# Prepared GPU check (issues 4, 5, 6, 14): build, the compiled ops' error path (first: every op called
# directly with each bad value, one process per call, CPU and CUDA tensors), the CUDA/Triton tests,
# compute-sanitizer memcheck and racecheck over the compiled ops' CUDA tests, the meta-step ratio table
# with the "cuda" and "triton" peers, and the per-primitive Triton-vs-cuDNN benchmark.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; results under $OUT
#
# Made for the H100 device machine (Python 3.12, torch 2.11 cu130, triton 3.6, no internet) and to
# finish in under 8.5 minutes: every stage has its own time limit, a failing stage does not stop the
# next, and each stage's exit code and duration go to $OUT/status.txt (124 = hit its time limit).
# At most 8 files are written under $OUT (what the device tool brings back).
set -u

OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
STATUS="$OUT/status.txt"
: > "$STATUS"
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16}
# maml_fast and benchmarks importable from the checkout (the Triton kernels are imported as
# maml_fast.kernels, which the install of stage 1 maps to the repository's kernels/).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
PY=${PYTHON:-python3}

START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_BUDGET_S:-500}))

# stage NAME LIMIT_S LOGFILE COMMAND...   (the limit shrinks to what is left before the deadline)
stage() {
    local name=$1 limit=$2 log=$3
    shift 3
    local now left rc t0
    now=$(date +%s)
    left=$((DEADLINE - now))
    if [ "$left" -lt 20 ]; then
        echo "$name rc=skipped (out of time budget)" | tee -a "$STATUS"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit}s) -> $log"
    t0=$(date +%s)
    echo "### stage $name: $*" >> "$log"
    timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
    rc=$?
    echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$STATUS"
    tail -n 15 "$log"
    return 0
}

{
    echo "# gpu_check $(date -u +%FT%TZ)  commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | head -2
    $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| triton', triton.__version__, '| cuda', torch.version.cuda, '| gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
} | tee -a "$STATUS"

# 1. build (the C++/CUDA extension; maml_fast runs without it, so later stages go on if it fails)
stage install 180 "$OUT/install.log" $PY -m pip install -e . --no-build-isolation --no-deps

# 2. the compiled ops' error path, before any other check (issue 14: on the H100 image every direct
#    torch.ops.maml_fast call that raised ValueError died of a segfault and took a test stage down):
#    tests/op_error_probe.py calls every op with each bad value its C++ checks reject, one fresh
#    interpreter per call, on CPU and CUDA tensors; a call whose process dies by a signal is reported as
#    crashed, and the first crash is rerun under gdb (or cuda-gdb, which debugs host code too) for the
#    native backtrace and the loaded libraries. Its log goes to tests.log (at most 8 files come back).
stage op_error_probe 180 "$OUT/tests.log" $PY tests/op_error_probe.py --devices cpu cuda --isolation spawn \
    --jobs 12 --backtrace --backtrace-timeout 90
grep -E "^(crashed|failed|skipped|ok): |^  skipped because|cases in .* s \(" "$OUT/tests.log" | sed 's/^/  probe /' >> "$STATUS"

# 3. CUDA and Triton tests, TF32 off for exactness (the Triton test module switches PyTorch's flags
#    off itself; NVIDIA_TF32_OVERRIDE=0 also keeps cuBLAS/cuDNN off TF32 in every other test)
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 4"
# The compiled ops' test modules (each parametrised over cpu/cuda devices), present or not in this tree.
OP_TESTS=$(ls tests/test_batch_norm_relu.py tests/test_batch_norm_relu_pool.py tests/test_loss_ops.py \
    tests/test_direct_conv.py tests/test_fast_weight_update.py 2>/dev/null)
GPU_TESTS="$OP_TESTS $(ls tests/test_triton_conv.py tests/test_triton_fusion.py tests/test_triton_linear.py tests/test_extension.py \
    tests/test_cuda_graph.py tests/test_precision.py 2>/dev/null)"
stage tests 150 "$OUT/tests.log" env NVIDIA_TF32_OVERRIDE=0 $PY -m pytest -q -rs $XDIST --durations=15 $GPU_TESTS

# 4. the meta-step ratio table with the Triton peer (the "triton" backend is always registered in
#    maml_fast.backends; its kernels load on first use); without "triton" again if that run fails
BENCH_PEERS="loop vmap functorch torch fused triton"
BENCH_RUN="import sys; from benchmarks.bench_table import main; main(sys.argv[1:])"
stage bench_table 100 "$OUT/bench_table.log" $PY -c "$BENCH_RUN" --peers $BENCH_PEERS --rounds 3 --out "$OUT/bench.json"
if ! grep -q "^bench_table rc=0" "$STATUS"; then
    stage bench_table_without_triton 80 "$OUT/bench_table.log" $PY -c "$BENCH_RUN" \
        --peers loop vmap functorch torch fused --rounds 3 --out "$OUT/bench.json"
fi

# 5. compute-sanitizer over the CUDA cases of the compiled ops (kernel launches only: "cuda" in the
#    test id). memcheck: out-of-bounds and misaligned accesses; racecheck: shared-memory races.
#    --error-exitcode makes a finding fail the stage even when pytest passes.
for tool in memcheck racecheck; do
    stage "sanitizer_$tool" 70 "$OUT/sanitizer.log" compute-sanitizer --tool "$tool" --error-exitcode 86 \
        --target-processes all $PY -m pytest -q -x -p no:cacheprovider -k "cuda and not meta_gradient" $OP_TESTS
done

# 6. per-primitive benchmark: Triton vs cuDNN grouped conv at the Omniglot / MiniImageNet layers
stage conv_primitives 90 "$OUT/conv_primitives.log" $PY -m pytest -q benchmarks/test_conv_primitives.py \
    --benchmark-json="$OUT/conv_primitives.json" --benchmark-columns=min,median,mean,stddev,rounds \
    --benchmark-sort=name

# summary: median time per REPEAT calls, triton / cuDNN, per layer and primitive
$PY - "$OUT/conv_primitives.json" >> "$STATUS" 2>&1 <<'EOF'
import json, sys
try:
    data = json.load(open(sys.argv[1]))
except (OSError, ValueError) as error:
    print(f"no per-primitive results ({error})")
    raise SystemExit
rows = {}
for bench in data["benchmarks"]:
    impl = bench["params"]["impl"]
    rows.setdefault(bench["group"], {})[impl] = bench["stats"]["median"] * 1e3 / bench["extra_info"]["repeat"]
print("\n| layer-primitive | cuDNN ms | triton ms | triton/cuDNN |")
print("|---|---|---|---|")
for group, times in sorted(rows.items()):
    torch_ms, triton_ms = times.get("torch"), times.get("triton")
    ratio = f"{triton_ms / torch_ms:.2f}" if torch_ms and triton_ms else "-"
    fmt = lambda v: f"{v:.4f}" if v is not None else "-"
    print(f"| {group} | {fmt(torch_ms)} | {fmt(triton_ms)} | {ratio} |")
if data["benchmarks"]:
    print("fp32 precision:", data["benchmarks"][0]["extra_info"].get("fp32_precision"))
EOF

# 6. ResNet-12 (full width, 32x32 images, T=8) in the same ratio table (slow: last)
stage bench_resnet12 90 "$OUT/bench_resnet12.log" $PY -c "$BENCH_RUN" --configs resnet12_5w1s_32px \
    --peers loop vmap torch fused --rounds 3 --out "$OUT/bench_resnet12.json"

echo "total $(( $(date +%s) - START ))s" | tee -a "$STATUS"
echo "===== status"
cat "$STATUS"
