#!/usr/bin/env bash
# Every check that needs a GPU, in one go, for a machine lent for a few minutes:
#   1. build the extension with its CUDA kernels (only this GPU's architecture: a faster build)
#   2. the CUDA tests (native op against torchvision in fp32/fp64/fp16/bf16, autocast, CPU vs GPU; SyncBN under NCCL)
#   3. a training step of every Table 3 model at the coco size, native vs torchvision deformable conv
#   4. the op benchmark in bfloat16 and float32 (mini, reference and coco shapes)
#   5. `dyhead train` + `dyhead evaluate` end to end on the GPU (the tiny profile with runtime.device cuda)
# Logs go to $1 (default ./gpu-logs). Needs torch with CUDA, nvcc, pycocotools, jsonschema, pyyaml, pytest.
#   bash benchmarks/gpu_checks.sh /tmp/gpu-logs
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-gpu-logs}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" DYHEAD_TRACKING=off
export DYHEAD_EXT_DIR=${DYHEAD_EXT_DIR:-$PWD/build/ext-gpu}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
PY=${PYTHON:-python3}
cap=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || { echo "no CUDA device"; exit 2; }
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap}
status=0
step() { echo; echo "=== $1 ($(date -u +%T))"; }

step "environment"
nvidia-smi -L; $PY -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__)"

step "1. build the extension for sm_$cap"
SECONDS=0
$PY -c "from dyhead.ops import build; build.build_extension(cuda='on')" 2>&1 | tail -4 | tee "$OUT_DIR/build.log" || status=1
echo "build took ${SECONDS}s"

step "2. CUDA tests"
$PY -m pytest -p no:cacheprovider -q -rA -m "not slow" -k "cuda or nccl" tests/test_dcn_native.py tests/test_distributed.py \
    2>&1 | tee "$OUT_DIR/pytest_cuda.log" | tail -15 || status=1

step "3. training step at the coco size (batch 2 per GPU, fp32)"
$PY benchmarks/train_step.py --device cuda --steps 10 --warmup 3 --json "$OUT_DIR/train_step.json" \
    2>&1 | tee "$OUT_DIR/train_step.log" || status=1

step "4. op benchmark"
for dtype in bfloat16 float32; do
    $PY benchmarks/dcn.py --device cuda --dtype $dtype --reps 20 --budget 1 --json "$OUT_DIR/dcn_$dtype.json" \
        2>&1 | tee "$OUT_DIR/dcn_$dtype.log" || status=1
done

step "5. dyhead train + evaluate on the GPU (tiny profile, device cuda)"
$PY - <<'EOF' || status=1
import yaml, pathlib
p = yaml.safe_load(pathlib.Path("params/profiles/tiny.yaml").read_text())
p["runtime"]["device"] = "cuda"
p["description"] = "tiny on a GPU (gpu_checks.sh)"
pathlib.Path("params/profiles/tinygpu.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
EOF
( $PY -m dyhead.cli synth --profile tinygpu && $PY -m dyhead.cli train atss-r50-dyh6-LSC-1x --profile tinygpu \
  && $PY -m dyhead.cli evaluate atss-r50-dyh6-LSC-1x --profile tinygpu ) 2>&1 | tail -12 | tee "$OUT_DIR/train_gpu.log" || status=1
rm -f params/profiles/tinygpu.yaml
echo; echo "gpu_checks: exit $status"
exit $status
