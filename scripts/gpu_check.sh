#!/usr/bin/env bash
# The checks that need a GPU, as one prepared script for a lent CUDA machine (the image there has PyTorch with CUDA
# but no diffusers, and reaches no package registry).
#
# Here, once, while a registry is reachable:
#     bash scripts/gpu_check.sh --fetch      # the wheels that machine lacks -> .gpu/ (about 40 MB, ignored by git)
# There (carrying .gpu), with what it measured written under $OUT (default .gpu/out):
#     bash scripts/gpu_check.sh [--quick]    # --quick: the CUDA tests and a 2-engine table only
#
# It installs the wheels offline beside the image's torch, then runs, each step's log kept:
#   1. tests/nodes/test_cuda.py: the graphs on the GPU in float16 and float32 against the CPU and diffusers;
#   2. every node test with NODEGRAPH_TEST_DEVICE=cuda (parity tolerances may be exceeded by rounding; nothing may
#      raise) -- skipped with --quick;
#   3. benchmarks/speed.py --device cuda: our graph against diffusers in fp32 and fp16 (+ tiny VAE), peak VRAM.
set -uo pipefail
cd "$(dirname "$0")/.."
GPU=.gpu
PACKAGES="diffusers transformers tokenizers huggingface_hub accelerate peft"
# already in the image, or not needed there: never carried
SKIP='^(torch|triton|nvidia_|numpy|sympy|mpmath|networkx|pillow|setuptools|opencv)'

if [ "${1:-}" = "--fetch" ]; then
  rm -rf "$GPU/wheels" && mkdir -p "$GPU/wheels"
  pins=$(python - "$PACKAGES" <<'PY'
import importlib.metadata as m, sys
print(" ".join(f"{p}=={m.version(p)}" for p in sys.argv[1].split()))
PY
)
  echo "$pins" > "$GPU/pins.txt"
  # shellcheck disable=SC2086
  python -m pip download -q -d "$GPU/wheels" --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 $pins
  find "$GPU/wheels" -name '*.whl' | while read -r w; do
    basename "$w" | grep -Eq "$SKIP" && rm -f "$w"
  done
  du -sh "$GPU/wheels" && echo "pins: $pins"
  exit 0
fi

OUT=${OUT:-$GPU/out}
mkdir -p "$OUT"
PY=$(command -v python3 || command -v python)
quick=${1:-}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
# shellcheck disable=SC2046
"$PY" -m pip install -q --no-index --find-links "$GPU/wheels" $(cat "$GPU/pins.txt") > "$OUT/install.log" 2>&1 \
  || { echo "offline install failed"; tail -20 "$OUT/install.log"; exit 1; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
status=0
"$PY" -m pytest -q -p no:cacheprovider tests/nodes/test_cuda.py > "$OUT/cuda_tests.log" 2>&1 || status=1
tail -3 "$OUT/cuda_tests.log"
if [ "$quick" != "--quick" ]; then
  NODEGRAPH_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/nodes > "$OUT/nodes_on_cuda.log" 2>&1
  tail -3 "$OUT/nodes_on_cuda.log"
fi
engines=("diffusers fp32" "nodegraph fp32" "diffusers fp16" "nodegraph fp16" "diffusers fp16 tiny VAE"
         "nodegraph fp16 tiny VAE")
[ "$quick" = "--quick" ] && engines=("diffusers fp16" "nodegraph fp16")
"$PY" benchmarks/speed.py --device cuda --sizes 512 768 --rounds 3 --cache /tmp/nodegraph-bench \
  --engines "${engines[@]}" --json "$OUT/speed.json" > "$OUT/speed.md" 2> "$OUT/speed.log" || status=1
cat "$OUT/speed.md"
exit $status
