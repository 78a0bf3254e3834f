#!/usr/bin/env bash
# Prepared GPU check, built around the headline (issue 15): the graphed meta-step table first, then what
# explains it and what backs it.
#
#   bash benchmarks/gpu_check.sh                          # from the repository root; results under $OUT
#   GPU_CHECK_DRY_RUN=1 OUT=/tmp/x bash benchmarks/gpu_check.sh   # CPU rehearsal: every stage, tiny sizes
#
# Stages, in order, each with its own time limit (a failing stage does not stop the next; the limits of the
# required ones sum to 350 s, so that a run takes under 6 minutes and a second run fits the GPU time):
#   install         80 s  the C++/CUDA extension (maml_fast runs without it: later stages go on if it fails)
#   bench_graphed   70 s  the headline: eager loop / vmap / torch / fused / triton and the graphed peers
#                         (CUDA graph of the whole MetaStep: median of >= 50 replays after warm-up), Omniglot
#                         5w1s and 20w1s, MiniImageNet 5w1s
#   op_error_probe  40 s  every compiled op called directly with each bad value, one process per call (issue
#                         14: on the H100 image such calls died of a segfault)
#   profile         20 s  torch.profiler: top 25 kernels by GPU time of one graphed MiniImageNet step
#   paper           75 s  the paper's Omniglot 5-way 1-shot protocol (meta-batch 32, 60,000 iterations,
#                         graphed) stopped by a time limit, then its 600-episode evaluation
#   tests           40 s  the CUDA/Triton test modules, each in a process of its own (a crash takes down
#                         one module only), all at once
#   sanitizer_memcheck 25 s  compute-sanitizer memcheck over real "fused" meta-steps (every compiled kernel)
# then, only while the budget lasts: racecheck, the per-primitive conv benchmark and the ResNet-12 row.
#
# Each stage's exit code and seconds go to $OUT/status.txt ("NAME rc=N Ss"; 124 = hit its limit; "NAME
# rc=skipped (why)"). At most 8 files are written under $OUT (what the device tool brings back): status.txt,
# build.log, bench_graphed.log, bench_graphed.json, profile_miniimagenet.txt, paper_omniglot_5w1s.log,
# paper_omniglot_5w1s_eval.json, tests.log.
#
# Made for the H200 device machine (Python 3.12, torch 2.11 cu130, triton 3.6, no internet). The dry run
# (GPU_CHECK_DRY_RUN=1) runs every stage on the CPU with tiny sizes (the install as pip --dry-run), skipping
# the CUDA-only ones with the reason, in about a minute; tests/test_gpu_check.py runs it.
set -u

DRY=${GPU_CHECK_DRY_RUN:-0}
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
STATUS="$OUT/status.txt"
: > "$STATUS"
WORK=$(mktemp -d)  # files that do not come back (logdirs, per-primitive JSON)
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16}
# maml_fast and benchmarks importable from the checkout (the Triton kernels are imported as
# maml_fast.kernels, which the install of stage 1 maps to the repository's kernels/).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
if [ "$DRY" = 1 ]; then
    BUDGET=${GPU_CHECK_BUDGET_S:-240}
else
    unset TRITON_INTERPRET  # compiled Triton kernels on the GPU
    BUDGET=${GPU_CHECK_BUDGET_S:-355}
fi

START=$(date +%s)
DEADLINE=$((START + BUDGET))

# capped LIMIT_S: the limit, shrunk to what is left before the deadline
capped() {
    local left=$((DEADLINE - $(date +%s)))
    [ "$1" -gt "$left" ] && echo "$left" || echo "$1"
}

skip() {  # skip NAME REASON
    echo "$1 rc=skipped ($2)" | tee -a "$STATUS"
}

# stage NAME LIMIT_S LOGFILE COMMAND...
stage() {
    local name=$1 limit log=$3 rc t0
    limit=$(capped "$2")
    shift 3
    if [ "$limit" -lt 20 ]; then
        skip "$name" "out of time budget"
        return 0
    fi
    echo "=== $name (limit ${limit}s) -> $log"
    t0=$(date +%s)
    echo "### stage $name: $*" >> "$log"
    timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
    rc=$?
    echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$STATUS"
    tail -n 15 "$log"
    return 0
}

# module_tests PYTEST_ARGS MODULE...: one pytest process per module, all at once; each line of output
# prefixed with its module; "module rc=N" per module to $STATUS; fails if any module failed.
module_tests() {
    local args=$1 module name pids=() rc=0 pid
    shift
    for module in "$@"; do
        name=$(basename "$module" .py)
        (
            $PY -m pytest -q -rs -p no:cacheprovider $args "$module" 2>&1 | sed -u "s|^|[$name] |"
            code=${PIPESTATUS[0]}
            echo "  $name rc=$code" >> "$STATUS"
            exit "$code"
        ) &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do
        wait "$pid" || rc=1
    done
    return $rc
}
export -f module_tests
export PY STATUS

{
    echo "# gpu_check $(date -u +%FT%TZ)  commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(
        [ "$DRY" = 1 ] && echo "  DRY RUN (CPU, tiny sizes)")"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | head -2
    else
        echo "nvidia-smi: not on PATH"
    fi
    $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| triton', triton.__version__, '| cuda', torch.version.cuda, '| gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
} | tee -a "$STATUS"

GPU_REASON=""
[ "$DRY" = 1 ] && GPU_REASON="dry run: CUDA only"
BENCH="import sys; from benchmarks.bench_table import main; main(sys.argv[1:])"

# 1. build (dry run: pip resolves and prepares the metadata, builds nothing; the checkout's build is used).
#    The CUDA kernels for this GPU's architecture only: one nvcc pass per file instead of three.
if [ "$DRY" != 1 ]; then
    MAML_FAST_CUDA_ARCHS=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
    [ -n "$MAML_FAST_CUDA_ARCHS" ] && export MAML_FAST_CUDA_ARCHS && echo "building for sm $MAML_FAST_CUDA_ARCHS" >> "$STATUS"
fi
stage install 80 "$OUT/build.log" $PY -m pip install -e . --no-build-isolation --no-deps $(
    [ "$DRY" = 1 ] && echo --dry-run)

# 2. the headline: the graphed peers next to the eager ones (functorch is left out for time: its meta-gradient
#    through BatchNorm is not MAML's anyway, benchmarks/RESULTS.md)
CONFIGS="omniglot_5w1s omniglot_20w1s miniimagenet_5w1s"
if [ "$DRY" = 1 ]; then  # the CPU's peers (the graphed ones are listed as not timed, with the reason)
    stage bench_graphed 60 "$OUT/bench_graphed.log" $PY -c "$BENCH" --configs $CONFIGS --tasks 1 --rounds 1 \
        --replays 1 --out "$OUT/bench_graphed.json"
else
    stage bench_graphed 70 "$OUT/bench_graphed.log" $PY -c "$BENCH" --configs $CONFIGS --rounds 5 --replays 50 \
        --peers loop vmap torch fused triton vmap+graph torch+graph fused+graph triton+graph \
        --out "$OUT/bench_graphed.json"
fi
grep -E "^(## |\| |# not timed|# .* failed)" "$OUT/bench_graphed.log" >> "$STATUS"

# 3. the compiled ops' error path (issue 14): CPU cases forked from one interpreter, CUDA cases each in a
#    fresh one; the first crash, if any, rerun under cuda-gdb for its native backtrace
if [ "$DRY" = 1 ]; then
    stage op_error_probe 60 "$OUT/tests.log" $PY tests/op_error_probe.py --devices cpu cuda --isolation spawn \
        --jobs 2 --only "batch_norm_relu:eps=-1" "fast_weight_update:mismatched grad shape"
else
    stage op_error_probe 40 "$OUT/tests.log" $PY tests/op_error_probe.py --devices cpu cuda --isolation fork \
        --jobs 16 --backtrace --backtrace-timeout 15
fi
grep -E "^(crashed|failed|skipped|ok): |^  skipped because|cases in .* s \(" "$OUT/tests.log" | sed 's/^/  probe /' \
    >> "$STATUS"

# 4. per-kernel table of one graphed MiniImageNet step (dry run: CPU ops of an eager step)
PROFILE_ARGS="--config miniimagenet_5w1s --peer fused+graph --rows 25 --out $OUT/profile_miniimagenet.txt"
[ "$DRY" = 1 ] && PROFILE_ARGS="$PROFILE_ARGS --dry-run"
stage profile 20 "$OUT/tests.log" $PY -m benchmarks.profile_step $PROFILE_ARGS
grep -E "^# .*(kernels|CPU ops)" "$OUT/profile_miniimagenet.txt" 2>/dev/null | sed 's/^#/  profile/' >> "$STATUS"

# 5. the paper's Omniglot 5w1s protocol (preset omniglot-5w1s: meta-batch 32, 60,000 iterations), graphed,
#    stopped by --time-limit so that start-up, capture and the 600-episode evaluation fit the stage
PAPER_LIMIT=$(capped 75)
if [ "$DRY" = 1 ]; then
    PAPER_ARGS="--iterations 20 --meta-batch-size 2 --eval-episodes 20 --cuda-graph off --time-limit 0.5"
else
    # (40 s of the stage for start-up, capture, checkpoint and evaluation; at least 6 s of training)
    PAPER_ARGS="--cuda-graph on --eval-episodes 600 --time-limit $(awk "BEGIN {t = ($PAPER_LIMIT - 40) / 60; \
        print (t < 0.1 ? 0.1 : t)}")"
fi
stage paper "$PAPER_LIMIT" "$OUT/paper_omniglot_5w1s.log" $PY -m maml_fast train --preset omniglot-5w1s \
    --logdir "$WORK/paper" --no-resume --no-progress $PAPER_ARGS
cp "$WORK/paper/eval.json" "$OUT/paper_omniglot_5w1s_eval.json" 2>/dev/null || echo "  paper: no eval.json" >> "$STATUS"
grep -E "^(trained|RESULT|maml-fast train)" "$OUT/paper_omniglot_5w1s.log" | sed 's/^/  paper /' >> "$STATUS"

# 6. the CUDA and Triton tests, TF32 off for exactness (NVIDIA_TF32_OVERRIDE=0 keeps cuBLAS/cuDNN off TF32;
#    the Triton modules switch PyTorch's flags off themselves). Every module in a process of its own: the
#    compiled ops' modules call the ops directly with bad values, which crashed whole processes before.
GPU_TESTS=$(ls tests/test_batch_norm_relu.py tests/test_batch_norm_relu_pool.py tests/test_loss_ops.py tests/test_pooled_linear.py \
    tests/test_task_broadcast.py \
    tests/test_direct_conv.py tests/test_fast_weight_update.py tests/test_op_autograd.py tests/test_triton_conv.py \
    tests/test_triton_fusion.py tests/test_triton_linear.py tests/test_extension.py tests/test_cuda_graph.py \
    tests/test_graphed_cuda.py tests/test_precision.py 2>/dev/null)
if [ "$DRY" = 1 ]; then  # two modules collected, each in its own process (on the CPU they all run in CI)
    stage tests 60 "$OUT/tests.log" bash -c 'module_tests --collect-only "$@"' _ tests/test_fast_weight_update.py \
        tests/test_cuda_graph.py
else
    stage tests 40 "$OUT/tests.log" env NVIDIA_TF32_OVERRIDE=0 bash -c 'module_tests "" "$@"' _ $GPU_TESTS
fi

# 7. compute-sanitizer memcheck (out-of-bounds and misaligned accesses) over real "fused" meta-steps, which
#    launch every compiled kernel of the step (BN+ReLU(+pool) to second order, losses, fast-weight update);
#    --error-exitcode makes a finding fail the stage
SANITIZED="$PY -c $(printf %q "$BENCH") --configs omniglot_5w1s miniimagenet_5w1s --peers fused --tasks 1 --rounds 1"
if [ -n "$GPU_REASON" ]; then
    skip sanitizer_memcheck "$GPU_REASON"
elif ! command -v compute-sanitizer > /dev/null; then
    skip sanitizer_memcheck "compute-sanitizer is not on PATH"
else
    stage sanitizer_memcheck 25 "$OUT/tests.log" bash -c "compute-sanitizer --tool memcheck --error-exitcode 86 \
        --target-processes all $SANITIZED"
fi

# --- only while the budget lasts (each is skipped with less than 20 s left)
if [ -n "$GPU_REASON" ] || ! command -v compute-sanitizer > /dev/null; then
    skip sanitizer_racecheck "${GPU_REASON:-compute-sanitizer is not on PATH}"
else  # shared-memory races
    stage sanitizer_racecheck 25 "$OUT/tests.log" bash -c "compute-sanitizer --tool racecheck --error-exitcode 86 \
        --target-processes all $SANITIZED"
fi

# per-primitive benchmark: Triton vs cuDNN grouped conv at the benchmark configurations' layers (GPU only:
# on the CPU every case skips with the reason). All 216 cases, each Triton one compiling and autotuning its
# tiles, do not fit a stage, and pytest-benchmark writes its JSON only at the end: by default MiniImageNet's
# layers in fp32 (24 cases); GPU_CHECK_CONV_CASES (a pytest -k expression) picks others in a later run.
CONV_CASES=${GPU_CHECK_CONV_CASES:-"miniimagenet_5w1s and fp32"}
stage conv_primitives 60 "$OUT/bench_graphed.log" $PY -m pytest -q -rs benchmarks/test_conv_primitives.py \
    -k "$CONV_CASES" --benchmark-json="$WORK/conv_primitives.json" \
    --benchmark-columns=min,median,mean,stddev,rounds --benchmark-sort=name
# summary: median time per REPEAT calls and error against float64, cuDNN and Triton, per layer, primitive
# and precision; then the measured winners as the fused backend's conv-choice table (to $OUT)
$PY - "$WORK/conv_primitives.json" >> "$STATUS" 2>&1 <<'EOF'
import json, sys
try:
    data = json.load(open(sys.argv[1]))
except (OSError, ValueError) as error:
    print(f"no per-primitive results ({error})")
    raise SystemExit
rows = {}
for bench in data["benchmarks"]:
    info = bench["extra_info"]
    rows.setdefault(bench["group"], {})[bench["params"]["impl"]] = (
        bench["stats"]["median"] * 1e3 / info["repeat"], info["relative_error_vs_float64"])
fmt = lambda v, spec: format(v, spec) if v is not None else "-"
print("\n| layer-primitive-precision | cuDNN ms | triton ms | triton/cuDNN | cuDNN err vs fp64 | triton err vs fp64 |")
print("|---|---|---|---|---|---|")
for group, impls in sorted(rows.items()):
    (cudnn_ms, cudnn_err), (triton_ms, triton_err) = impls.get("cudnn", (None, None)), impls.get("triton", (None, None))
    ratio = f"{triton_ms / cudnn_ms:.2f}" if cudnn_ms and triton_ms else "-"
    print(f"| {group} | {fmt(cudnn_ms, '.4f')} | {fmt(triton_ms, '.4f')} | {ratio} | {fmt(cudnn_err, '.1e')} | {fmt(triton_err, '.1e')} |")
if data["benchmarks"]:
    print("device:", data["benchmarks"][0]["extra_info"]["device"])
EOF
if [ -s "$WORK/conv_primitives.json" ]; then
    $PY -m maml_fast.backends.conv_choice "$WORK/conv_primitives.json" --table "$OUT/conv_choices.json" >> "$STATUS" 2>&1
fi

# ResNet-12 (full width, 32x32 images, T=8) in the same table, eager and graphed (dry run: the narrow one)
if [ "$DRY" = 1 ]; then
    stage bench_resnet12 40 "$OUT/bench_graphed.log" $PY -c "$BENCH" --configs resnet12_narrow_5w1s_32px \
        --tasks 1 --rounds 1 --peers torch fused
else
    stage bench_resnet12 60 "$OUT/bench_graphed.log" $PY -c "$BENCH" --configs resnet12_5w1s_32px --rounds 3 \
        --replays 20 --peers loop vmap torch fused fused+graph
fi

rm -rf "$WORK"
echo "total $(( $(date +%s) - START ))s" | tee -a "$STATUS"
echo "===== status"
cat "$STATUS"
