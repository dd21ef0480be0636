#!/usr/bin/env bash
# The one command run on a lent GPU machine (one H200, a short lease): ropekit's GPU evidence in stages ordered
# by value, each under its own time budget, each appending its result rows to OUT as it goes, so a run cut
# short still returns what finished. For a GPU you own, experiments/device/gpu_all.sh runs the long version.
#
#   bash experiments/device/gpu_check.sh OUT            on a CUDA GPU (at most 6.5 minutes on one H200)
#   bash experiments/device/gpu_check.sh --dry-run OUT  every stage on a CPU at micro sizes (CI runs this)
#
# Stages and budgets (seconds, GPU / dry run), run in the order a, c, b, d (by value: training at 32k is the
# open question, the kernel bench has rows from two earlier leases):
#   a. tests   60 / 150  the `gpu` tests: the kernel at real sizes in 3 dtypes x 9 methods x 2 layouts forward
#                        and backward, past 2^31 elements, torch.compile(fullgraph=True), the patch on CUDA;
#                        the trainer's loss under bf16 autocast against the plain loss, forward and backward
#                        (dry run: the same files' gpu selection, which skips, and one kernel test in
#                        Triton's interpreter)                                                -> gpu_tests.csv
#   b. bench  120 / 300  `ropekit bench`: the kernel against HF eager (table inside/outside the call),
#                        torch.compile of the reference, Liger-Kernel and flash-attention's Triton rotary, on
#                        the training shapes (fwd, bwd, fwd+bwd) and decoding shapes (fwd), GB/s and the
#                        fraction of a measured device-to-device copy (dry run: --smoke)      -> bench_rope.csv
#   c. train  140 / 120  `ropekit bench --train-step`: Llama-3.2-1B, then SmolLM2-135M shapes (random init) at
#                        8k/16k/32k, bf16 autocast, activation checkpointing; HF unpatched, patched, and
#                        ropekit's trainer loss: tokens/s, TFLOP/s, MFU, the allocator's peak memory, and
#                        the live tensors of one more, untimed step (57 s on an H200 before that step; rows
#                        land per shape and length, so a cut keeps the 1B rows)
#                        (dry run: the micro shape at 64/256)                                 -> train_step.csv
#   d. demo    70 / 150  `ropekit demo` (the tiny preset, its built-in default) on CUDA: controls first, then
#                        the variants; resumable; cut at 100 s on an H200 before (dry run: --preset micro)  -> demo_results.csv, demo_wall_times.json
# Every stage's wall time and exit status (124: cut at its budget) -> stages.csv; all output -> log.txt.
# Seven files: the device tool returns at most eight.
#
# On a lent machine (the device tool; its image has Python 3.12, torch, Triton, transformers, pytest):
#   1. here, once:  bash experiments/device/prepare_gpu_check.sh   (.whl/ and .carry/: wheels, the demo's
#      text, flash-attention's rotary file; its header lists them and how they are made). Commit first, so
#      the rows' git sha names the code that ran.
#   2. run once, with a timeout that leaves room to rerun one failed stage (STAGES=b,c reruns only those):
#        device run, kind nvidia-h200, carry [".whl", ".carry"], timeout_s 420 (an 80 GB H100 may not hold
#        HF's full-logit loss for the llama-1b shape at 32k: 70.8 GB on an H200; such a step is logged as out
#        of memory, with no rows):
#        ROPEKIT_GIT_SHA=<git rev-parse --short=12 HEAD> bash experiments/device/gpu_check.sh $OUT
#   3. hand the machine back at once; copy what came back to figures/gpu/ (append the rows to the CSVs
#      there) and commit it; `ropekit figures --results figures/gpu/bench_rope.csv` draws the plot.
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT="${1:?usage: gpu_check.sh [--dry-run] OUT}"
cd "$(dirname "$0")/../.."
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/log.txt"
WORK="$(mktemp -d)"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
STAGES="${STAGES:-a,b,c,d}"

# wheels the machine lacks (prepare_gpu_check.sh); the repository itself is imported from here
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        .whl/*.whl >> "$LOG" 2>&1 || echo "wheel install failed (see log.txt)"
    export PYTHONPATH="$WORK/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
[ -d .carry/cache ] && export ROPEKIT_CACHE="$PWD/.carry/cache"
FA=()
[ -f .carry/flash_attn_rotary.py ] && FA=(--flash-attn-rotary .carry/flash_attn_rotary.py)
if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
fi

python3 experiments/device/gpu_check.py environment 2>&1 | tee -a "$LOG"

run_stage() {  # run_stage NAME GPU_BUDGET DRY_BUDGET COMMAND...: its output to the log, its wall time to stages.csv
    local name="$1" budget="$2"
    [ "$DRY" = 1 ] && budget="$3"
    shift 3
    case ",$STAGES," in *",$name,"*) ;; *) return 0 ;; esac
    echo "== stage $name (budget ${budget}s): $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout --signal=INT --kill-after=15 "$budget" "$@" >> "$LOG" 2>&1
    local status=$? took=$((SECONDS - start))
    echo "== stage $name: exit $status after ${took}s" | tee -a "$LOG"
    python3 experiments/device/gpu_check.py stage "$OUT/stages.csv" "$name" "$status" "$took" "$budget" >> "$LOG" 2>&1
}

if [ "$DRY" = 1 ]; then
    run_stage a 60 150 python3 experiments/device/gpu_check.py tests "$OUT/gpu_tests.csv" -- \
        tests/test_kernel.py tests/test_loss.py -k "gpu or test_gqa_with_one_key_head"
    run_stage c 140 120 python3 -m ropekit.cli bench --train-step --models micro --lengths 64,256 \
        --out "$OUT/train_step.csv"
    run_stage b 120 300 python3 -m ropekit.cli bench --smoke --out "$OUT/bench_rope.csv" "${FA[@]}"
    run_stage d 70 150 python3 -m ropekit.cli demo --preset micro --out "$WORK/demo"
else
    run_stage a 60 150 python3 experiments/device/gpu_check.py tests "$OUT/gpu_tests.csv" -- \
        -m gpu tests/test_kernel.py tests/test_loss.py
    run_stage c 140 120 python3 -m ropekit.cli bench --train-step --models llama-1b,smollm2-135m \
        --out "$OUT/train_step.csv"
    run_stage b 120 180 python3 -m ropekit.cli bench --out "$OUT/bench_rope.csv" "${FA[@]}"
    run_stage d 70 150 python3 -m ropekit.cli demo --out "$WORK/demo"
fi
[ -f "$WORK/demo/results.csv" ] && cp "$WORK/demo/results.csv" "$OUT/demo_results.csv"
[ -f "$WORK/demo/wall_times.json" ] && cp "$WORK/demo/wall_times.json" "$OUT/demo_wall_times.json"
rm -rf "$WORK"
rm -f "$OUT"/*.lock  # the appends' locks: the device returns eight files at most
echo "gpu_check: done; stages:" | tee -a "$LOG"
grep -h "^== stage .*: exit" "$LOG"
ls "$OUT"
