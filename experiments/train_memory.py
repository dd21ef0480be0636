"""docs/training.md: how `ropekit train` works (PREAMBLE below, fixed prose), then its measured memory section,
generated from figures/train_step_cpu.csv.

    # the measurement (two CPU cores: about an hour; each step in a fresh process)
    ropekit bench --train-step --models vocab49k-256 --lengths 8192,16384,32768 --providers ropekit-train \\
        --steps 1 --out figures/train_step_cpu.csv
    ropekit bench --train-step --models vocab49k-256 --lengths 8192,16384 --providers hf --steps 1 \\
        --out figures/train_step_cpu.csv
    ropekit bench --train-step --models smollm2-135m --lengths 8192 --providers ropekit-train,hf --steps 1 \\
        --out figures/train_step_cpu.csv
    # the trainer's per-layer release of freed pages against none, alternating, five runs each
    for i in 1 2 3 4 5; do
        ropekit bench --train-step --models vocab49k-256 --lengths 8192 --providers ropekit-train --steps 2 \\
            --out figures/train_step_cpu.csv
        ropekit bench --train-step --models vocab49k-256 --lengths 8192 --providers ropekit-train --steps 2 \\
            --keep-freed-pages --out figures/train_step_cpu.csv
    done
    # the goal's speed: the trainer's step and HF's, five pairs, the order swapped every other pair
    for order in ropekit-train,hf hf,ropekit-train ropekit-train,hf hf,ropekit-train ropekit-train,hf; do
        ropekit bench --train-step --models smollm2-135m --lengths 8192 --providers $order --steps 1 \\
            --out figures/train_step_cpu.csv
    done
    # the same at a small width (vocab49k-256), where the loss head is most of the step
    for order in ropekit-train,hf hf,ropekit-train ropekit-train,hf hf,ropekit-train ropekit-train,hf; do
        ropekit bench --train-step --models vocab49k-256 --lengths 8192 --providers $order --steps 1 \\
            --out figures/train_step_cpu.csv
    done
    # the same step with glibc's mmap threshold fixed at 1 MiB (freed tensors' pages go back to the system)
    ropekit bench --train-step --models smollm2-135m --lengths 8192 --providers ropekit-train --steps 1 \\
        --mmap-threshold-mib 1 --out figures/train_step_cpu.csv
    # the page
    python experiments/train_memory.py            # writes docs/training.md
    python experiments/train_memory.py --check    # exit 1 if it is stale (tests/test_loss.py runs this)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ropekit.results import read_rows
from ropekit.stats import MIN_RESOLVED
from ropekit.studies.bench import (
    allocator_table,
    labelled,
    live_table,
    memory_growth,
    paired_speed_ratio,
    repeated_runs,
    train_step_table,
    train_step_values,
)

ROOT = Path(__file__).resolve().parents[1]
ROWS = ROOT / "figures" / "train_step_cpu.csv"
PAGE = ROOT / "docs" / "training.md"

# The page's fixed first part: how `ropekit train` works (prose, not generated from the rows). Edit it here,
# then run this script; tests/test_readme.py runs its bash block's command lines through the CLI parser.
PREAMBLE = """\
# Training

```bash
# the shipped base (ropekit-tiny-256) at 2,048
ropekit train --preset tiny-extend --set method=pi:factor=8 --out runs/pi
# that base from scratch at 256 (~35 minutes)
ropekit train --preset cpu-base --out runs/base
ropekit train --preset tiny-extend --set init_from=runs/base/final --set method=pi:factor=8 --out runs/pi2
# continue where it stopped
ropekit train --preset tiny-extend --set init_from=runs/base/final --set method=pi:factor=8 --out runs/pi2 --resume
torchrun --nproc-per-node 8 -m ropekit.cli train --preset paper --set method=abf:base=500000 --out runs/7b-abf
```

The model is patched with the method first (recorded in every checkpoint's config), then AdamW with
linear warm-up and cosine decay, gradient accumulation to `tokens_per_step`, bf16 autocast on CUDA
and float32 on CPU, gradient clipping, SDPA attention, optional activation checkpointing and
`torch.compile`, on a CPU freed tensor pages handed back to the system between layers (below), JSONL
metrics and a tqdm bar with loss and tokens/s, periodic validation loss. Data:
a byte-level BPE trained on the training split (or the model's tokenizer), documents tokenised once
into a cached uint32 file, packed into sequences with EOS between documents, positions running on or
reset per document (`reset_positions`), optional upsampling of long documents. The loss is scored
from the head's input in chunks (64 MiB of float32 logits on a CPU, 512 MiB in whole 128-row tiles
on CUDA, where addmm's `out_dtype` sums the bf16 weight gradient into float32 if torch has it for
the device; the prepared GPU run tests it), each turned into its gradients while its logits exist
(`ropekit/loss.py`), so no (tokens × vocabulary) float32 tensor exists in a step; `ropekit bench
--train-step` measures a step's peak memory and splits it (below, generated from its rows). What a
model does to its head's output (Gemma's final soft-cap, Granite's, Cohere's and HyperCLOVA X's logit
scales, wherever the family keeps them) is read from the model's own code at every step, by passing
known values through it in place of the logits; any other transform of each logit, and logits rounded
below float32, are refused, before the data are prepared where the model brings its own tokenizer
(`init_from`, a resumed run). A model that keeps only the first outputs of a head padded past its
vocabulary (Inkling's `unpadded_vocab_size`) is scored on those: which outputs a model keeps is read
from a forward of a few tokens with probes as wide as the head, again whenever the head or the model's
config changes. The loss and the evaluation's scores equal the cross-entropy of the model's own logits,
and in training mode (dropout on) so do the loss's gradients, for each RoPE family transformers ships
that runs at toy size, with these transforms switched on (`tests/test_families.py`), and under FSDP2.

Checkpoints (weights as safetensors, optimizer, schedule position, RNG, data position, a manifest of
sha256 hashes) are folders written whole or not at all. `--resume` finds the newest checkpoint by
scanning the run folder (the `latest` file is only a hint), verifies it against its manifest, and
continues bit-for-bit on CPU (tested); it refuses a changed config (naming the difference), a corrupt
newest checkpoint (naming the file) and any pickled code: optimizer and RNG state hold only tensors
and plain values and load with `weights_only=True`. Without `--resume`, a folder that holds
checkpoints is never written to. `metrics.jsonl` holds each step once, also after a kill and resume.
One process writes a run folder at a time (`train`, `demo`, `sweep`): a second one is refused,
naming the holder's pid and host. A loss or gradient norm that is not finite stops the run with exit
2; nothing of that step is saved and the message names the intact checkpoint. A corrupt newest
checkpoint is refused with the name of an intact one before it; a save that fails (a full disk)
names the checkpoint still intact. `config.json` records the sizes of the model actually trained.

Presets are Python functions in `ropekit/train.py` built on one table of model sizes (`MODEL_SIZES`:
micro, tiny, small); the demo's presets are built from them. `small-*` and `paper` read PG19 from the
Hugging Face hub (`hf:emozilla/pg19`); offline, pass `--set data=FOLDER` (any folder of `.txt` /
`.txt.gz`). `--set key=value` overrides are typed, unknown keys refused, and every value is checked
before any work (`steps=-3`, `seq_len=0`, `micro_batch=0`, a bad method spec, a missing `init_from`, an
unwritable `--out`: exit 2 and one line); `--print-config` shows the resolved, validated config.

**Multi-GPU.** `fsdp=true` under `torchrun` shards each decoder layer and the root with FSDP2
(`fully_shard`), after activation checkpointing and compile. Tested on CPU with two gloo processes:
the losses equal a single-process run on the same global batch (to 1e-5). The paper preset (Llama 2
7B, 32,768 tokens, lr 2e-5, 2,000 warm-up steps, cosine, 4,194,304 tokens per step, 20,000 steps =
80B tokens) needs about 40 GB per GPU on 8 × 80 GB; the derivation, and what context parallelism adds
past one GPU's activation memory, are in `ropekit/parallel.py` (context parallelism is not wired in).
"""


OLD_ROWS = [
    "Rows without `sdpa_backends` in their config were measured before the bench used the trainer's optimizer",
    "(`ropekit.train.adamw`, a loop over parameters on CPU): they ran AdamW with `foreach=True`, whose",
    "temporaries count in their peaks.",
]
# How the live tensor count reads (prose; its table and numbers come from the rows).
LIVE = [
    "Rows measured since commit 16fdda1 also count the live tensors of one more, untimed step",
    "(`ropekit.live_memory`: the bytes of tensor storages alive on the device, op by op), which no allocator",
    "moves: the step's live peak and the phase it fell in (forward, loss head, backward, optimizer), what was",
    "alive then (parameters with buffers, gradients, optimizer state, the rest: activations, temporaries, the",
    "loss head's tensors), each phase's peak, the loss head's own memory (its phase's peak less what was alive",
    "when it began) and the largest tensor an op made, with the op: HF's (tokens x vocabulary) logits, or a",
    "(T x T) attention matrix, would show there. It cannot see a kernel's own workspace; the resident peak",
    "above includes it. Gradients at the peak are the storages alive then that become parameters' `.grad`,",
    "whether or not autograd had handed them over yet (a tied head's partial gradient, which autograd sums",
    "into a new tensor at the end of the backward, counts in the rest); rows measured before that was told",
    "(their gradients read '– (in rest)') count the ones autograd still held in the rest.",
]
GOAL_PEAK_OVER_KNOWN = 1.5  # issue: SmolLM2-135M at 8k peaks at most 1.5x what is known in advance,
GOAL_SPEED = 0.9  # at no less than 0.9x the tokens/s of the full-logit step

# What the CPU's resident peak counts besides tensors, and the rows that show it (prose; numbers from the rows).
ALLOCATOR = """\
### A CPU step's resident peak and the allocator

The resident high-water mark counts what glibc's malloc holds, not only live tensors. Below its mmap
threshold (by default it rises, as large blocks are freed, up to 32 MiB) malloc keeps freed blocks in the
process for reuse; a step frees and allocates activation-sized tensors thousands of times, between
long-lived ones (the checkpointed inputs, the gradients), so the heap keeps resident holes the next sizes
do not fit, and they grow from one step to the next. `ropekit train` on a CPU therefore hands the free
pages back (`malloc_trim`) before each decoder layer's forward and after its backward
(`ropekit.parallel.trim_between_layers`; `--set release_cpu_memory=false` turns it off); the bench's
`ropekit-train` step does the same. Each release costs time (the next tensors fault their pages in
again), how much is measured below. The rows whose config records a `release_slack` (commit bc731b3)
tried releasing only once the resident size had grown by that fraction since the last release: at
`smollm2-135m` it was no faster than a release at every layer and held more, so the trainer releases at
every layer. Fixing the threshold instead (`MALLOC_MMAP_THRESHOLD_=1048576` in the environment, or
`ropekit bench --train-step --mmap-threshold-mib 1`) gives every tensor of 1 MiB or more pages of its
own, returned when it is freed, paid for in page faults on every fresh tensor. The rows
below compare what was measured; rows from different sessions differ in this machine's speed as well.
"""


def _speeds(rows, provider: str) -> dict[tuple[str, int, str], float]:
    """{(model, T, commit): ``provider``'s tokens/s measured at that commit}, the newest row at each commit winning."""
    out = {}
    for r in rows:
        label, model = labelled(r)
        if label == provider and r["metric"] == "tokens_per_s":
            out[(model, int(r["context_length"]), r["git_sha"])] = float(r["value"])
    return out


def _speed(ours: dict, model: str, T: int, hf_speeds: dict) -> float | None:
    """ours / HF's tokens/s for the same model and length measured at ours' commit (this machine's speed
    varies between sessions), else None."""
    hf = hf_speeds.get((model, T, ours["commit"]))
    return ours["tokens_per_s"] / hf if hf else None


def _speed_history(rows, model: str, T: int) -> list[tuple[str, float]]:
    """(commit, ropekit-train's tokens/s over HF's) at every commit that measured both (newest row of each per
    commit), in the order the commits were first measured: one timed step a run, so the spread holds the
    instrument's noise as well as any change between commits."""
    ours, hf = _speeds(rows, "ropekit-train"), _speeds(rows, "hf")
    return [(sha, v / hf[(m, t, sha)]) for (m, t, sha), v in ours.items() if (m, t) == (model, T) and (m, t, sha) in hf]


def _versus_hf(values: dict, hf_speeds: dict) -> list[str]:
    """One line per model and length where both providers ran: the trainer's peak against HF's step's (each
    provider's newest row; the commits are named where they differ) and the tokens/s ratio where HF ran at the
    trainer's commit (``_speed``)."""
    lines = []
    for model, T in sorted({(m, t) for m, t, _ in values}):
        hf, ours = values.get((model, T, "hf")), values.get((model, T, "ropekit-train"))
        if hf and ours:
            mem, speed = ours["peak_mem_gb"] / hf["peak_mem_gb"], _speed(ours, model, T, hf_speeds)
            ratios = f"({mem:.2f}x), " + (f"at {speed:.2f}x its tokens/s" if speed else "its tokens/s measured "
                                          "at another commit: no speed ratio")  # fmt: skip
            if ours["commit"] != hf["commit"]:
                ratios += f" (peaks from two commits: ropekit's {ours['commit'][:7]}, HF's {hf['commit'][:7]})"
            lines.append(f"- `{model}` at {T:,}: ropekit's step peaks at {ours['peak_mem_gb']:.2f} GB against "
                         f"{hf['peak_mem_gb']:.2f} GB for HF's loss {ratios}.")  # fmt: skip
    return lines


def _paired_verdict(paired: dict, memory_met: bool) -> tuple[str, str]:
    """(verdict, speed text) of the goal from ``paired_speed_ratio``: met where the memory is and the ratio's
    interval lies at or above GOAL_SPEED over MIN_RESOLVED or more pairs, not met where it lies below."""
    n, low, high = len(paired["ratios"]), paired["low"], paired["high"]
    text = (f"at {paired['mean']:.2f}x HF's tokens/s (the mean of {n} paired runs at {paired['commit'][:7]}, "
            f"{paired['paired']}; 95% bootstrap {low:.2f}x to {high:.2f}x)")  # fmt: skip
    if not memory_met:
        return "not met", text
    if n < MIN_RESOLVED:
        return f"undecided ({n} pairs; {MIN_RESOLVED} needed)", text
    if low >= GOAL_SPEED:
        return "met", text
    if high < GOAL_SPEED:
        return "not met", text
    return f"undecided (the interval holds {GOAL_SPEED}x)", text


# Repeated runs at one commit (prose; the table and ratios come from the rows).
REPEATED = """\
The rows above are one run each, from different commits and sessions. Where two providers, or two ways
of handling malloc, were each run two or more times at one commit, alternating (`--providers
ropekit-train,hf` runs both in one call, in the order given; `ropekit bench --train-step
--keep-freed-pages` runs `ropekit-train` without the per-layer release), each run reads. The trainer's
step is paired against HF's, another way against the trainer's: by call where one call ran both (a run
whose partner failed is left out, never matched with another call's), else in the order they ran where
each ran equally often in calls of its own; runs of separate calls whose counts differ are not paired.
"""


def _allocator_section(rows) -> list[str]:
    table, repeated = allocator_table(rows), repeated_runs(rows)
    lines = ["", ALLOCATOR, *table] if table else []
    return [*lines, "", REPEATED, *repeated] if repeated else lines


def page() -> str:
    rows = read_rows(ROWS)
    values, hf_speeds = train_step_values(rows), _speeds(rows, "hf")
    device = rows[0]["device"]
    versions = json.loads(rows[0]["versions"])
    sha = sorted({r["git_sha"] for r in rows})
    lines = [
        PREAMBLE,
        "## Memory: what a long-context step costs",
        "",
        "`ropekit train` scores next tokens from the head's input in chunks (`ropekit.loss.linear_cross_entropy`:",
        "the forward turns each chunk's logits into the head's gradients while they exist, three head matmuls as",
        "in the plain loss; rows from commits up to fdb0177 measured a backward that recomputed the logits, four",
        "matmuls), so no (tokens x vocabulary) float32 tensor exists in a step; activation checkpointing keeps",
        "one input per layer. `ropekit bench --train-step` measures a step",
        "and splits its peak into what is known in advance (parameters, gradients and AdamW's two moments: 16",
        "bytes a parameter in float32; the checkpointed layer inputs: layers x T x width x 4 bytes) and the rest",
        "(the layer being recomputed, the loss head, attention's workspace). On a CPU each measurement runs in a",
        "fresh process and reads its resident high-water mark, less its value before the model was built; on",
        "CUDA the allocator's peak. Providers: `hf` is the unpatched model with its own loss",
        "(`model(input_ids, labels=...)`, full logits), `ropekit-train` the patched model with the trainer's loss.",
        "",
        *LIVE,
        "",
        f"Measured on {device} (torch {versions['torch']}, transformers {versions['transformers']}; git "
        f"{', '.join(sha)}) by the commands in `experiments/train_memory.py`'s header; rows in "
        "`figures/train_step_cpu.csv`; this page is generated from them.",
        *(OLD_ROWS if any("sdpa_backends" not in json.loads(r["config"]) for r in rows) else []),
        "",
        *train_step_table(rows),
        "",
        "Peak memory against length:",
        "",
        *memory_growth(rows),
        "",
    ]
    if live := live_table(rows):
        lines += ["What was alive at each step's peak (live tensors):", "", *live, "",
                  "Live tensor peak against length:", "", *memory_growth(rows, "live_peak_gb"), ""]  # fmt: skip
    lines += _versus_hf(values, hf_speeds)
    lines += _allocator_section(rows)
    goals = [(label, got) for (model, T, label), got in sorted(values.items())
             if label.startswith("ropekit-train") and (model, T) == ("smollm2-135m", 8192)]  # fmt: skip
    if goals:
        lines += ["", f"Goal: a SmolLM2-135M step at 8,192 tokens peaks at most {GOAL_PEAK_OVER_KNOWN}x what is known "
                  f"in advance, at no less than {GOAL_SPEED}x the tokens/s of the step with HF's full-logit loss (the "
                  "trainer's loss before the chunked one):", ""]  # fmt: skip
    paired = paired_speed_ratio(rows, "smollm2-135m", 8192)
    history = [(c, v) for c, v in _speed_history(rows, "smollm2-135m", 8192) if not paired or c != paired["commit"]]
    for label, got in goals:
        ratio, known = got["peak_over_static"], got["params_grads_adam_gb"] + got["checkpointed_inputs_gb"]
        speed = _speed(got, "smollm2-135m", 8192, hf_speeds)
        if label == "ropekit-train" and paired:  # repeated runs of both at one commit: the paired ratio decides
            verdict, speed_text = _paired_verdict(paired, ratio <= GOAL_PEAK_OVER_KNOWN)
        elif speed is None and label == "ropekit-train" and history:  # the newest commit that measured both
            speed = history[-1][1]
            speed_text = f"at {speed:.2f}x HF's tokens/s at {history[-1][0][:7]}, the newest commit that timed both"
            met = ratio <= GOAL_PEAK_OVER_KNOWN and speed >= GOAL_SPEED
            verdict = "met" if met else "not met"
        elif speed is None:  # a tree with uncommitted changes ("-dirty") is its own commit here
            verdict = (
                "undecided (no HF step at its commit to compare speed)" if ratio <= GOAL_PEAK_OVER_KNOWN else "not met"
            )
            speed_text = "speed not compared"
        else:
            met = ratio <= GOAL_PEAK_OVER_KNOWN and speed >= GOAL_SPEED
            verdict, speed_text = ("met" if met else "not met"), f"at {speed:.2f}x HF's tokens/s"
        live = (f"; live tensors {got['live_peak_over_static']:.2f}x ({got['live_peak_gb']:.2f} GB)"
                if "live_peak_gb" in got else "")  # fmt: skip
        lines.append(f"- `{label}`: {ratio:.2f}x ({got['peak_mem_gb']:.2f} GB against {known:.2f} GB), "
                     f"{speed_text}: {verdict} on this CPU{live}.")  # fmt: skip
    if goals and history:
        where = "the other commits" if paired else "every commit"
        lines += ["", f"`ropekit-train`'s tokens/s over HF's at {where} that measured both (the newest run at each): "
                  + ", ".join(f"{sha[:7]} {ratio:.2f}x" for sha, ratio in history) + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="docs/training.md from figures/train_step_cpu.csv")
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/training.md is stale")
    args = parser.parse_args(argv)
    text = page()
    if args.check:
        if not PAGE.is_file() or PAGE.read_text() != text:
            print(f"stale: {PAGE}; run python experiments/train_memory.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
