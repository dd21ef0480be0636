"""docs/training.md's measured section, generated from figures/train_step_cpu.csv.

    # the measurement (two CPU cores: about 40 minutes; each step in a fresh process)
    ropekit bench --train-step --models vocab49k-256 --lengths 8192,16384,32768 --providers ropekit-train \\
        --steps 1 --out figures/train_step_cpu.csv
    ropekit bench --train-step --models vocab49k-256 --lengths 8192,16384 --providers hf --steps 1 \\
        --out figures/train_step_cpu.csv
    ropekit bench --train-step --models smollm2-135m --lengths 8192 --providers ropekit-train,hf --steps 1 \\
        --out figures/train_step_cpu.csv
    # the page
    python experiments/train_memory.py            # writes docs/training.md
    python experiments/train_memory.py --check    # exit 1 if it is stale (tests/test_loss.py runs this)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from ropekit.bench import train_step_table
from ropekit.results import read_rows

ROOT = Path(__file__).resolve().parents[1]
ROWS = ROOT / "figures" / "train_step_cpu.csv"
PAGE = ROOT / "docs" / "training.md"


def _values(rows) -> dict[tuple[str, str, int], dict[str, float]]:
    out: dict[tuple[str, str, int], dict[str, float]] = defaultdict(dict)
    for r in rows:
        provider, model = r["variant"].split(" @ ")
        out[(provider, model, int(r["context_length"]))][r["metric"]] = float(r["value"])
    return out


def _slope_lines(values) -> list[str]:
    """Peak memory against length for each provider and model measured at three or more lengths."""
    lines = []
    series = defaultdict(list)
    for (provider, model, T), v in values.items():
        series[(provider, model)].append((T, v["peak_mem_gb"]))
    for (provider, model), pts in sorted(series.items()):
        pts.sort()
        if len(pts) < 2:
            continue
        (t0, m0), (t1, m1) = pts[0], pts[-1]
        slope = (m1 - m0) / (t1 - t0) * 1024
        growth = ", ".join(f"{T:,}: {m:.2f} GB" for T, m in pts)
        lines.append(f"- `{provider}` on `{model}`: {growth}; {slope:.3f} GB per 1,024 tokens from {t0:,} to {t1:,} "
                     f"(peak x{m1 / m0:.2f} for length x{t1 / t0:.0f})")  # fmt: skip
    return lines


def page() -> str:
    rows = read_rows(ROWS)
    values = _values(rows)
    device = rows[0]["device"]
    versions = json.loads(rows[0]["versions"])
    sha = sorted({r["git_sha"] for r in rows})
    lines = [
        "# Training memory: what a long-context step costs",
        "",
        "`ropekit train` scores next tokens from the head's input in chunks (`ropekit.loss.linear_cross_entropy`:",
        "the backward recomputes each chunk's logits), so no (tokens x vocabulary) float32 tensor exists in a",
        "step; activation checkpointing keeps one input per layer. `ropekit bench --train-step` measures a step",
        "and splits its peak into what is known in advance (parameters, gradients and AdamW's two moments: 16",
        "bytes a parameter in float32; the checkpointed layer inputs: layers x T x width x 4 bytes) and the rest",
        "(the layer being recomputed, the loss head, attention's workspace). On a CPU each measurement runs in a",
        "fresh process and reads its resident high-water mark, less its value before the model was built; on",
        "CUDA the allocator's peak. Providers: `hf` is the unpatched model with its own loss",
        "(`model(input_ids, labels=...)`, full logits), `ropekit-train` the patched model with the trainer's loss.",
        "",
        f"Measured on {device} (torch {versions['torch']}, transformers {versions['transformers']}; git "
        f"{', '.join(sha)}) by the commands in `experiments/train_memory.py`'s header; rows in "
        "`figures/train_step_cpu.csv`; this page is generated from them.",
        "",
        *train_step_table(rows),
        "",
        "Peak memory against length:",
        "",
        *_slope_lines(values),
        "",
    ]
    for model in sorted({m for _, m, _ in values}):
        for T in sorted({t for _, m, t in values if m == model}):
            hf, ours = values.get(("hf", model, T)), values.get(("ropekit-train", model, T))
            if hf and ours:
                mem, speed = ours["peak_mem_gb"] / hf["peak_mem_gb"], ours["tokens_per_s"] / hf["tokens_per_s"]
                ratios = f"({mem:.2f}x), at {speed:.2f}x its tokens/s"
                lines.append(f"- `{model}` at {T:,}: ropekit's step peaks at {ours['peak_mem_gb']:.2f} GB against "
                             f"{hf['peak_mem_gb']:.2f} GB for HF's loss {ratios}.")  # fmt: skip
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
