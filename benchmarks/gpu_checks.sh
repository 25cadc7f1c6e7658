#!/usr/bin/env bash
# Every check that needs a GPU, in one go, for a machine lent for a few minutes. In order of what matters
# most, each step limited to what is left of the budget ($GPU_CHECKS_BUDGET_S, default 540 s, so that
# the whole run stays under 10 minutes; a step that would get less than 20 s is skipped and listed):
#   build         the extension with its CUDA kernels, for this GPU's architecture only
#   pytest_cuda   the CUDA tests: the op against torchvision in fp64/fp32 (every named case), fp16/bf16,
#                 pixel blocks, the atomic grad_x mode, determinism, autocast, CPU vs GPU; SyncBN on NCCL
#   dcn_*         the op: `dcn.py --coco` (every shape, then the COCO P3 check: native vs a plain 3x3 conv
#                 vs torchvision fp32, the ratios and their targets, numerics) in bfloat16 and float32
#   train_step_*  a training step of the five detectors, baseline and 6 DyHead blocks, at the coco size
#                 (batch 2): bfloat16 and float32, DyHead / baseline per detector; ATSS again in bfloat16
#                 with runtime.memory_format channels_last (ratio to contiguous in the summary)
#   profile_*     torch.profiler's top kernels of an ATSS + 6 DyHead step and of the ATSS baseline
#   dcn_bfloat16_atomic  the P3 check again with grad_x by fp32 atomics (the alternative to the gather)
#   train_gpu     `dyhead train` + `dyhead evaluate` end to end (tiny profile, runtime.device cuda)
#   train_throughput_*   benchmarks/train_throughput.py (real data loader), when that script exists
# Logs (NAME.log, NAME.json, profile_*.md) and summary.md go to $1 (default ./gpu-logs).
# Needs torch with CUDA, nvcc, pycocotools, jsonschema, pyyaml, pytest.
#   bash benchmarks/gpu_checks.sh /tmp/gpu-logs
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-gpu-logs}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" DYHEAD_TRACKING=off
export DYHEAD_EXT_DIR=${DYHEAD_EXT_DIR:-$PWD/build/ext-gpu}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECKS_BUDGET_S:-540}
cap=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || { echo "no CUDA device"; exit 2; }
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap}
# The five detectors, baseline and DyHead (Table 3's rows without the `official` placements).
EXPS="atss-r50-base-1x atss-r50-dyh6-LSC-1x retinanet-r50-base-1x retinanet-r50-dyh6-LSC-1x fcos-r50-base-1x
fcos-r50-dyh6-LSC-1x reppoints-r50-base-1x reppoints-r50-dyh6-LSC-1x faster_rcnn-r50-base-1x faster_rcnn-r50-dyh6-LSC-1x"
status=0
failed=()
START=$SECONDS

# run NAME LIMIT_S CMD...: output to $OUT_DIR/NAME.log and the terminal, at most LIMIT_S seconds and no
# more than the budget has left; a failure, timeout or skip is listed in the summary.
run() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    [ "$left" -lt "$limit" ] && limit=$left
    echo; echo "=== $name ($(date -u +%T), $((SECONDS - START)) s in, limit ${limit} s)"
    if [ "$limit" -lt 20 ]; then
        status=1
        failed+=("$name (skipped: the time budget is spent)")
        return 1
    fi
    timeout --kill-after=10 "$limit" "$@" > >(tee "$OUT_DIR/$name.log") 2>&1
    local rc=$?
    if [ $rc -ne 0 ]; then
        status=1
        failed+=("$name (exit $rc$([ $rc -eq 124 ] && echo ", timed out after ${limit} s"))")
    fi
    return $rc
}

{ nvidia-smi -L; $PY -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__)"; } \
    2>&1 | tee "$OUT_DIR/environment.log"

run build 240 $PY -m dyhead.cli build-ext --cuda on || { echo "build failed: nothing else can run"; exit 1; }

run pytest_cuda 120 $PY -m pytest -p no:cacheprovider -q -rfEs -m "not slow" -k "cuda or nccl" \
    tests/test_dcn_native.py tests/test_distributed.py

for dtype in bfloat16 float32; do
    run dcn_$dtype 60 $PY benchmarks/dcn.py --device cuda --dtype $dtype --coco --reps 20 --budget 1 \
        --json "$OUT_DIR/dcn_$dtype.json"
done

run train_step_bfloat16 100 $PY benchmarks/train_step.py --device cuda --dtype bfloat16 --backends native \
    --steps 5 --warmup 2 --json "$OUT_DIR/train_step_bfloat16.json" $EXPS

run profile_bfloat16 60 $PY benchmarks/profile_step.py --device cuda --dtype bfloat16 --steps 3 --warmup 2 \
    --json "$OUT_DIR/profile_bfloat16.json" --md "$OUT_DIR/profile_bfloat16.md"

run train_step_float32 100 $PY benchmarks/train_step.py --device cuda --dtype float32 --backends native \
    --steps 5 --warmup 2 --json "$OUT_DIR/train_step_float32.json" $EXPS

run profile_float32 60 $PY benchmarks/profile_step.py --device cuda --dtype float32 --steps 3 --warmup 2 \
    --json "$OUT_DIR/profile_float32.json" --md "$OUT_DIR/profile_float32.md"

run train_step_bfloat16_channels_last 60 $PY benchmarks/train_step.py --device cuda --dtype bfloat16 \
    --backends native --memory-format channels_last --steps 5 --warmup 2 \
    --json "$OUT_DIR/train_step_bfloat16_channels_last.json" atss-r50-base-1x atss-r50-dyh6-LSC-1x

run dcn_bfloat16_atomic 40 env DYHEAD_DCN_CUDA_GRAD_INPUT=atomic $PY benchmarks/dcn.py --device cuda \
    --dtype bfloat16 --coco --only check --reps 20 --budget 1 --json "$OUT_DIR/dcn_bfloat16_atomic.json"

$PY - <<'EOF' || status=1
import yaml, pathlib
p = yaml.safe_load(pathlib.Path("params/profiles/tiny.yaml").read_text())
p["runtime"]["device"] = "cuda"
p["description"] = "tiny on a GPU (gpu_checks.sh)"
pathlib.Path("params/profiles/tinygpu.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
EOF
run train_gpu 90 bash -c "$PY -m dyhead.cli synth --profile tinygpu && $PY -m dyhead.cli train atss-r50-dyh6-LSC-1x \
    --profile tinygpu && $PY -m dyhead.cli evaluate atss-r50-dyh6-LSC-1x --profile tinygpu"
rm -f params/profiles/tinygpu.yaml

if [ -f benchmarks/train_throughput.py ]; then
    # written by another change: pass only the options its --help offers
    help=$($PY benchmarks/train_throughput.py --help 2>&1)
    opts=(--device cuda --workers 4 --evaluate --eval-images 50)
    grep -q -- "--iterations" <<<"$help" && opts+=(--iterations 30)
    dtypes=(default)
    grep -q -- "--dtype" <<<"$help" && dtypes=(bfloat16 float32)
    for dtype in "${dtypes[@]}"; do
        extra=()
        [ "$dtype" != default ] && extra=(--dtype "$dtype")
        grep -q -- "--json" <<<"$help" && extra+=(--json "$OUT_DIR/train_throughput_$dtype.json")
        run train_throughput_$dtype 120 $PY benchmarks/train_throughput.py "${opts[@]}" ${extra[@]+"${extra[@]}"}
    done
else
    echo "benchmarks/train_throughput.py does not exist here: skipped" | tee "$OUT_DIR/train_throughput.log"
fi

echo; echo "=== summary ($((SECONDS - START)) s in)"
$PY benchmarks/gpu_summary.py "$OUT_DIR" 2>&1 | tee "$OUT_DIR/summary.md"
for f in ${failed[@]+"${failed[@]}"}; do echo "- FAILED: $f"; done | tee -a "$OUT_DIR/summary.md"
echo "gpu_checks: exit $status after $((SECONDS - START)) s" | tee -a "$OUT_DIR/summary.md"
exit $status
