"""Figures: the paper's analytic figures (from ``ropekit.analysis``), result figures drawn only from result CSVs,
and the plot helpers the studies share. Each figure is written as a PNG beside the CSV it was drawn from.

    ropekit figures --out figures/ [--results runs/demo/results.csv ...]
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from ropekit import analysis
from ropekit.files import atomic_path, write_csv
from ropekit.results import read_rows, write_rows

__all__ = ["draw_analytic", "draw_results", "draw_all", "table5", "pyplot", "save_png", "paper_label", "series"]

# a method name -> the paper's name for it (RoPE, RoPE PI, RoPE ABF, xPos ABF)
PAPER_NAMES = {spec.split(":")[0]: name for name, spec in analysis.PAPER_VARIANTS.items()}


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (an optional dependency: the ``eval`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | Path) -> None:
    """Write a figure as a PNG, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, bbox_inches="tight", format="png")


def fig4_attention_decay(out: Path) -> list[Path]:
    plt = pyplot()
    dist = np.arange(0, 30_001, 10)
    curves = {name: analysis.attention_decay(spec, dist) for name, spec in analysis.PAPER_VARIANTS.items()}
    write_csv(out / "fig4_attention_decay.csv",
              [[int(d), *(round(float(c[i]), 6) for c in curves.values())] for i, d in enumerate(dist)],
              ["distance", *curves])  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in curves.items():
        ax.plot(dist, c, lw=0.8, label=f"{name} ({analysis.PAPER_VARIANTS[name]})")
    ax.set(xlabel="distance between query and key tokens", ylabel="attention score before softmax",
           title="Fig. 4: score decay of all-ones q = k (d = 128, 1/sqrt(d))")  # fmt: skip
    ax.axhline(0, color="k", lw=0.4)
    ax.legend(fontsize=7)
    save_png(fig, out / "fig4_attention_decay.png")
    plt.close(fig)
    return [out / "fig4_attention_decay.png", out / "fig4_attention_decay.csv"]


def fig8_helix(out: Path) -> list[Path]:
    plt = pyplot()
    t_line, t_dots = np.linspace(0, 10, 500), np.arange(11)
    kinds = ["RoPE", "RoPE+PI", "RoPE+ABF"]
    rows = [[k, float(t), *analysis.helix(k, np.array([t]))[0].round(6)] for k in kinds for t in t_dots]
    write_csv(out / "fig8_helix.csv", rows, ["variant", "position", "x", "y", "z"])
    fig = plt.figure(figsize=(11, 3.6))
    for i, kind in enumerate(kinds):
        ax = fig.add_subplot(1, 3, i + 1, projection="3d")
        line, dots = analysis.helix(kind, t_line), analysis.helix(kind, t_dots)
        ax.plot(*line.T, lw=0.8)
        ax.scatter(*dots.T, color="red", s=12)
        ax.set_title(f"({'abc'[i]}) {kind}", fontsize=9)
        ax.set_xlim(-1, 1), ax.set_ylim(-1, 1), ax.set_zlim(-1, 1)
    fig.suptitle("Fig. 8: RoPE variants as helices; red dots = positions 0..10", fontsize=10)
    save_png(fig, out / "fig8_helix.png")
    plt.close(fig)
    return [out / "fig8_helix.png", out / "fig8_helix.csv"]


def theorem1_granularity(out: Path) -> list[Path]:
    plt = pyplot()
    betas = np.geomspace(1, 1000, 60)
    alphas = np.geomspace(1 / 64, 1, 60)
    rows = []
    for b in betas:
        rows.append(["ABF", float(b), analysis.granularity_sum("ABF", b) / 64, analysis.granularity_limit("ABF", b)])
    for a in alphas:
        rows.append(["PI", float(a), analysis.granularity_sum("PI", a) / 64, analysis.granularity_limit("PI", a)])
    write_csv(out / "theorem1_granularity.csv", rows, ["method", "factor", "per_pair_sum_d128", "limit"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, kind, xs, label in ((ax1, "ABF", betas, "beta = b'/b"), (ax2, "PI", alphas, "alpha = L/L'")):
        sub = [r for r in rows if r[0] == kind]
        ax.plot(xs, [r[2] for r in sub], label="finite sum / (d/2), d = 128")
        ax.plot(xs, [r[3] for r in sub], "--", label="paper's limit")
        ax.set_xscale("log")
        ax.set(xlabel=label, ylabel="C_d per rotary pair", title=f"{kind}: granularity (b = 10,000)")
    p_abf, p_pi = analysis.granularity_limit("ABF", 50), analysis.granularity_limit("PI", 0.25)
    ax1.plot([50], [p_abf], "ro")
    ax1.annotate(f"beta=50: {p_abf:.3f} (sum {analysis.granularity_sum('ABF', 50) / 64:.3f})", (50, p_abf), fontsize=7)
    ax2.plot([0.25], [p_pi], "ro")
    ax2.annotate(
        f"alpha=1/4: {p_pi:.3f} (sum {analysis.granularity_sum('PI', 0.25) / 64:.3f})", (0.25, p_pi), fontsize=7
    )
    ax1.legend(fontsize=7)
    fig.suptitle("Theorem 1: ABF granularity falls with log(beta), PI's linearly with alpha", fontsize=10)
    save_png(fig, out / "theorem1_granularity.png")
    plt.close(fig)
    return [out / "theorem1_granularity.png", out / "theorem1_granularity.csv"]


def base_bound(out: Path, lengths: tuple[int, ...]) -> list[Path]:
    plt = pyplot()
    rows = [[d, L, analysis.base_lower_bound(L, d)] for d in (64, 128) for L in lengths]
    write_csv(out / "base_lower_bound.csv", rows, ["head_dim", "context_length", "min_base"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for d in (64, 128):
        sub = [r for r in rows if r[0] == d]
        ax.plot([r[1] for r in sub], [r[2] for r in sub], "o-", label=f"d = {d}: min b with sum_j cos(m theta_j) >= 0")
    xs = np.array(lengths, dtype=float)
    ax.plot(xs, 0.0424 * xs**1.628, "k--", lw=0.8, label="Men et al. fit 0.0424 L^1.628")
    ax.axhline(500_000, color="gray", lw=0.6, ls=":")
    ax.text(lengths[0], 560_000, "ABF base 500,000", fontsize=7)
    ax.set(xscale="log", yscale="log", xlabel="context length L", ylabel="RoPE base lower bound",
           title="RoPE base lower bound vs context length")  # fmt: skip
    ax.legend(fontsize=7)
    save_png(fig, out / "base_lower_bound.png")
    plt.close(fig)
    return [out / "base_lower_bound.png", out / "base_lower_bound.csv"]


BOUND_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)


def draw_analytic(out: str | Path, *, bound_lengths: tuple[int, ...] = BOUND_LENGTHS) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return fig4_attention_decay(out) + fig8_helix(out) + theorem1_granularity(out) + base_bound(out, bound_lengths)


# ---------------------------------------------------------------------------------------------
# From result CSVs
# ---------------------------------------------------------------------------------------------
def paper_label(variant: str) -> str:
    """A variant as the paper names it, with its spec: ``RoPE ABF (abf:base=500000)``."""
    name = variant.split(":", 1)[0]
    paper = PAPER_NAMES.get(name)
    return f"{paper} ({variant})" if paper else variant


def series(rows, metric, x: str = "context_length"):
    """{line: sorted [(x, value)]} of one metric; x is the column on the horizontal axis. A line is a variant
    of one experiment (named "experiment: variant" when the rows hold several experiments); where a rerun
    wrote a point twice, the newest row is drawn."""
    several = len({r["experiment"] for r in rows}) > 1
    out = defaultdict(dict)
    for r in rows:
        if r["metric"] == metric and r[x]:
            line = f"{r['experiment']}: {r['variant']}" if several else r["variant"]
            out[line][int(r[x])] = float(r["value"])  # later rows (newer) replace earlier ones
    return {v: sorted(pts.items()) for v, pts in out.items()}


def _repeated_points(rows) -> int:
    """How many rows repeat an earlier row's point: its experiment, variant, metric, length, position, depth and
    settings (a rerun's rows; per-sample rows differ in their settings' sample)."""
    keys = [(r["experiment"], r["variant"], r["metric"], r["context_length"], r["position"], r["depth"], r["config"])
            for r in rows]  # fmt: skip
    return len(keys) - len(set(keys))


def _longest_window(rows, metric: str) -> list[dict]:
    """The rows of ``metric`` at its longest window (context_length): one curve per variant, never a mix."""
    sub = [r for r in rows if r["metric"] == metric and r["context_length"]]
    if not sub:
        return []
    longest = max(int(r["context_length"]) for r in sub)
    return [r for r in sub if int(r["context_length"]) == longest]


def draw_results(results: str | Path, out: str | Path, *, prefix: str | None = None) -> list[Path]:
    """FSR vs length (Fig. 5b form), PPL vs length and per-position loss from one result CSV."""
    plt = pyplot()
    rows = read_rows(results)
    if not rows:
        raise ValueError(f"no result rows in {results}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    experiments = list(dict.fromkeys(r["experiment"] for r in rows))
    prefix = prefix or (experiments[0] if len(experiments) == 1 else Path(results).stem)
    repeated = _repeated_points(rows)
    if repeated:
        warnings.warn(f"{results}: {repeated} rows repeat a point of an earlier row (a rerun?); the newest is drawn",
                      stacklevel=2)  # fmt: skip
    written = []

    def figure(name, panels, rows=rows, x="context_length"):
        if not any(series(rows, metric, x) for metric, *_ in panels):
            return  # nothing of this kind in the CSV
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
        used = []
        for ax, (metric, ylabel, title, log_y) in zip(axes[0], panels, strict=True):
            lows, highs = series(rows, f"{metric}_low", x), series(rows, f"{metric}_high", x)
            for variant, pts in series(rows, metric, x).items():
                line = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=paper_label(variant))[0]
                if variant in lows and variant in highs:  # the bootstrap interval, where the rows have one
                    lo, hi = dict(lows[variant]), dict(highs[variant])
                    xs = [p[0] for p in pts if p[0] in lo and p[0] in hi]
                    ax.fill_between(xs, [lo[x] for x in xs], [hi[x] for x in xs], color=line.get_color(), alpha=0.15)
            used += [metric, f"{metric}_low", f"{metric}_high"]
            ax.set(xlabel="context length (tokens)" if metric != "position_loss" else "position in window",
                   ylabel=ylabel, title=title)  # fmt: skip
            if x == "context_length":  # lengths double; positions in a window are binned linearly
                ax.set_xscale("log", base=2)
            if log_y:
                ax.set_yscale("log")
            ax.legend(fontsize=6)
        sub = [r for r in rows if r["metric"] in used]
        if not any(series(rows, m, x) for m in used):
            plt.close(fig)
            return
        device = sorted({r["device"] for r in sub})
        fig.suptitle(f"{', '.join(experiments)}: {', '.join(device)}", fontsize=8)
        png = out / f"{prefix}_{name}.png"
        save_png(fig, png)
        plt.close(fig)
        write_rows(out / f"{prefix}_{name}.csv", sub)
        written.extend([png, out / f"{prefix}_{name}.csv"])

    figure("fsr", [("fsr_rouge_l", "ROUGE-L F1 x 100", "FIRST-SENTENCE-RETRIEVAL (Fig. 5b form)", False),
                   ("fsr_target_nll", "NLL of the first sentence", "FSR, teacher-forced", False)])  # fmt: skip
    figure("ppl", [("ppl", "perplexity", "validation perplexity vs length", True)])
    window = _longest_window(rows, "position_loss")
    if window:
        title = f"per-position loss, window {window[0]['context_length']} tokens"
        figure("position_loss", [("position_loss", "mean NLL in bin", title, False)], rows=window, x="position")
    return written


def table5(results: str | Path, length: int) -> str:
    """A markdown table in the form of the paper's Table 5: PPL at ``length`` per variant (with 95% CI)."""
    rows = read_rows(results)
    by = defaultdict(dict)
    for r in rows:
        if r["context_length"] and int(r["context_length"]) == length and r["metric"] in ("ppl", "ppl_low", "ppl_high"):
            by[r["variant"]][r["metric"]] = float(r["value"])
            by[r["variant"]]["n"] = r["n"]
    if not by:
        raise ValueError(f"no ppl rows at length {length} in {results}")
    lines = [f"| PE | PPL at {length} | 95% CI | windows |", "|---|---|---|---|"]
    best = min(v["ppl"] for v in by.values() if "ppl" in v)
    for variant, v in by.items():
        ppl = f"**{v['ppl']:.3f}**" if math.isclose(v["ppl"], best) else f"{v['ppl']:.3f}"
        low, high = v.get("ppl_low", float("nan")), v.get("ppl_high", float("nan"))
        lines.append(f"| {paper_label(variant)} | {ppl} | {low:.3f}-{high:.3f} | {v['n']} |")
    return "\n".join(lines) + "\n"


def draw_all(out: str | Path, results: list[str | Path] = ()) -> list[Path]:
    for r in results:  # a wrong path fails before the analytic figures' seconds of work
        if Path(r).is_dir():
            raise ValueError(f"results {str(r)!r} is a folder; pass a result CSV")
        if not Path(r).is_file():
            raise ValueError(f"results file {str(r)!r} not found")
        if not read_rows(r):
            raise ValueError(f"no result rows in {r}")
    written = draw_analytic(out)
    for r in results:
        written += draw_results(r, out)
    return written
