#!/usr/bin/env bash
# The prepared GPU check: one command for a lent CUDA machine (no network; torch and triton
# present, transformers too on this workplace's image; peers such as Opacus only if carried as
# wheels). From the repository root:
#
#   bash bench/gpu.sh [OUT]            # OUT defaults to $OUT, else gpu-results/
#
# It runs, within about 8 minutes, and writes everything under OUT:
#   env.txt            torch, CUDA and GPU versions
#   gpu-tests.txt      the GPU-marked tests: norms against brute force on the device, a tracked
#                      step under torch.cuda.set_sync_debug_mode("error"), bf16 autocast
#   overhead-cuda.md   bench/overhead.py at CUDA sizes (the paper's CNN, a GPT, ResNet-GN and
#   overhead-cuda.json transformers GPT-2, Llama and ViT): time and peak memory against a plain step
#   gram-vs-products.txt  a layer's sub-batch norms by products or in Gram form per shape: what the
#                      engine's choice between them should be on this device (CPU-measured today)
# and exits non-zero if a part failed (each part still runs).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu-results}}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0

$PY - >"$OUT/env.txt" 2>&1 <<'PYEOF' || status=1
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0), "| capability", torch.cuda.get_device_capability(0))
try:
    import transformers; print("transformers", transformers.__version__)
except ImportError as e:
    print("transformers missing:", e)
PYEOF

# 1. the GPU-marked tests (about 1 minute)
timeout 240 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py \
    tests/test_gpu_distributed.py \
    >"$OUT/gpu-tests.txt" 2>&1 || status=1

# 2. overhead at CUDA sizes (about 5 minutes; a peer that is not installed is reported as such)
timeout 330 $PY bench/overhead.py --device cuda --steps 60 --warmup 10 --out "$OUT" \
    >"$OUT/overhead-log.txt" 2>&1 || status=1

# 3. products or Gram form on this device (seconds)
timeout 60 $PY bench/gram_vs_products.py --device cuda >"$OUT/gram-vs-products.txt" 2>&1 || status=1

echo "bench/gpu.sh: status $status; results in $OUT" | tee -a "$OUT/env.txt"
exit $status
