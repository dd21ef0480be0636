#!/usr/bin/env bash
# Everything a GPU owner can run for ropekit in one command, every output under one folder:
#   1. the `gpu` tests (the kernel at real sizes, past 2^31 elements, under torch.compile; the patch)
#      and the static compile test;
#   2. `ropekit bench` on the training shapes against every peer that runs here (HF eager, torch.compile,
#      Liger-Kernel, flash-attention's Triton rotary), with a plot, and the static report beside it;
#   3. the `small` ablation (`ropekit demo --preset small`) on a folder of novels.
#
#   bash experiments/device/gpu_all.sh OUT_DIR [DATA_DIR]
#     OUT_DIR   where everything goes (created); default runs/gpu-<UTC date>
#     DATA_DIR  .txt/.txt.gz documents for the ablation; default ../shared/corpora/clic
#   FLASH_ATTN_ROTARY=path/to/flash_attn/ops/triton/rotary.py adds flash-attention's kernel to the bench.
#   SKIP_SMALL=1 skips the ablation (hours); SKIP_TESTS=1 the tests.
# Run from an environment with ropekit installed (`pip install -e ".[eval,dev]"`, plus `liger-kernel`).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-runs/gpu-$(date -u +%Y%m%dT%H%M)}"
DATA="${2:-../shared/corpora/clic}"
mkdir -p "$OUT"
python3 - > "$OUT/environment.txt" <<'EOF'
import torch, triton, transformers
print(torch.__version__, triton.__version__, transformers.__version__)
print(torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
EOF
cat "$OUT/environment.txt"
FA=()
[ -n "${FLASH_ATTN_ROTARY:-}" ] && FA=(--flash-attn-rotary "$FLASH_ATTN_ROTARY")
LIGER=()
LIGER_ROPE="$(python3 -c 'import liger_kernel.ops.rope as m; print(m.__file__)' 2>/dev/null || true)"
[ -n "$LIGER_ROPE" ] && LIGER=(--liger-rope "$LIGER_ROPE")

if [ -z "${SKIP_TESTS:-}" ]; then
    python3 -m pytest -q -m gpu tests/ 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
    python3 -m pytest -q tests/test_kernel_compile.py 2>&1 | tee "$OUT/compile_test.log" | tail -3
fi
python3 -m ropekit.cli bench --out "$OUT/bench_rope.csv" --plot "$OUT/bench_rope.png" "${FA[@]}" 2>&1 \
    | tee "$OUT/bench.log"
python3 -m ropekit.cli bench --static --stage "$(git rev-parse --short HEAD 2>/dev/null || echo current)" \
    --jobs 8 "${LIGER[@]}" "${FA[@]}" --out "$OUT/kernel_static.csv" > "$OUT/kernel_static.log" 2>&1
tail -4 "$OUT/kernel_static.log"
if [ -z "${SKIP_SMALL:-}" ]; then
    python3 -m ropekit.cli demo --preset small --data "$DATA" --out "$OUT/small" 2>&1 | tee "$OUT/small.log" | tail -20
fi
echo "everything is under $OUT"
