"""Figures: the paper's analytic figures (from ``ropekit.analysis``) and result figures drawn only from
result CSVs. Each figure is written as a PNG beside the CSV it was drawn from.

    ropekit figures --out figures/ [--results runs/demo/results.csv ...]
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from ropekit import analysis
from ropekit.files import atomic_path, atomic_write_text
from ropekit.results import read_rows

__all__ = [
    "draw_analytic",
    "draw_results",
    "draw_all",
    "draw_bench",
    "draw_advice",
    "draw_sweep",
    "ablation_table",
    "draw_ablation",
]

PAPER_NAMES = {"rope": "RoPE", "pi": "RoPE PI", "abf": "RoPE ABF", "xpos": "xPos ABF"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, bbox_inches="tight", format="png")


def fig4_attention_decay(out: Path) -> list[Path]:
    plt = _plt()
    dist = np.arange(0, 30_001, 10)
    curves = {name: analysis.attention_decay(spec, dist) for name, spec in analysis.PAPER_VARIANTS.items()}
    _write_csv(out / "fig4_attention_decay.csv", ["distance", *curves],
               [[int(d), *(round(float(c[i]), 6) for c in curves.values())] for i, d in enumerate(dist)])  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in curves.items():
        ax.plot(dist, c, lw=0.8, label=f"{name} ({analysis.PAPER_VARIANTS[name]})")
    ax.set(xlabel="distance between query and key tokens", ylabel="attention score before softmax",
           title="Fig. 4: score decay of all-ones q = k (d = 128, 1/sqrt(d))")  # fmt: skip
    ax.axhline(0, color="k", lw=0.4)
    ax.legend(fontsize=7)
    _save(fig, out / "fig4_attention_decay.png")
    plt.close(fig)
    return [out / "fig4_attention_decay.png", out / "fig4_attention_decay.csv"]


def fig8_helix(out: Path) -> list[Path]:
    plt = _plt()
    t_line, t_dots = np.linspace(0, 10, 500), np.arange(11)
    kinds = ["RoPE", "RoPE+PI", "RoPE+ABF"]
    rows = [[k, float(t), *analysis.helix(k, np.array([t]))[0].round(6)] for k in kinds for t in t_dots]
    _write_csv(out / "fig8_helix.csv", ["variant", "position", "x", "y", "z"], rows)
    fig = plt.figure(figsize=(11, 3.6))
    for i, kind in enumerate(kinds):
        ax = fig.add_subplot(1, 3, i + 1, projection="3d")
        line, dots = analysis.helix(kind, t_line), analysis.helix(kind, t_dots)
        ax.plot(*line.T, lw=0.8)
        ax.scatter(*dots.T, color="red", s=12)
        ax.set_title(f"({'abc'[i]}) {kind}", fontsize=9)
        ax.set_xlim(-1, 1), ax.set_ylim(-1, 1), ax.set_zlim(-1, 1)
    fig.suptitle("Fig. 8: RoPE variants as helices; red dots = positions 0..10", fontsize=10)
    _save(fig, out / "fig8_helix.png")
    plt.close(fig)
    return [out / "fig8_helix.png", out / "fig8_helix.csv"]


def theorem1_granularity(out: Path) -> list[Path]:
    plt = _plt()
    betas = np.geomspace(1, 1000, 60)
    alphas = np.geomspace(1 / 64, 1, 60)
    rows = []
    for b in betas:
        rows.append(["ABF", float(b), analysis.granularity_sum("ABF", b) / 64, analysis.granularity_limit("ABF", b)])
    for a in alphas:
        rows.append(["PI", float(a), analysis.granularity_sum("PI", a) / 64, analysis.granularity_limit("PI", a)])
    _write_csv(out / "theorem1_granularity.csv", ["method", "factor", "per_pair_sum_d128", "limit"], rows)
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
    _save(fig, out / "theorem1_granularity.png")
    plt.close(fig)
    return [out / "theorem1_granularity.png", out / "theorem1_granularity.csv"]


def base_bound(out: Path, lengths: tuple[int, ...]) -> list[Path]:
    plt = _plt()
    rows = [[d, L, analysis.base_lower_bound(L, d)] for d in (64, 128) for L in lengths]
    _write_csv(out / "base_lower_bound.csv", ["head_dim", "context_length", "min_base"], rows)
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
    _save(fig, out / "base_lower_bound.png")
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
def _label(variant: str) -> str:
    name = variant.split(":", 1)[0]
    paper = PAPER_NAMES.get(name)
    return f"{paper} ({variant})" if paper else variant


def _series(rows, metric, x: str = "context_length"):
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
    plt = _plt()
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
        if not any(_series(rows, metric, x) for metric, *_ in panels):
            return  # nothing of this kind in the CSV
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
        used = []
        for ax, (metric, ylabel, title, log_y) in zip(axes[0], panels, strict=True):
            lows, highs = _series(rows, f"{metric}_low", x), _series(rows, f"{metric}_high", x)
            for variant, pts in _series(rows, metric, x).items():
                line = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=_label(variant))[0]
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
        if not any(_series(rows, m, x) for m in used):
            plt.close(fig)
            return
        device = sorted({r["device"] for r in sub})
        fig.suptitle(f"{', '.join(experiments)}: {', '.join(device)}", fontsize=8)
        png = out / f"{prefix}_{name}.png"
        _save(fig, png)
        plt.close(fig)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(sub[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(sub)
        atomic_write_text(out / f"{prefix}_{name}.csv", buf.getvalue())
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
        lines.append(f"| {_label(variant)} | {ppl} | {low:.3f}-{high:.3f} | {v['n']} |")
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


# ---------------------------------------------------------------------------------------------
# The positional-encoding ablation (ropekit demo): from its summary rows (ropekit.ablation.summarize)
# ---------------------------------------------------------------------------------------------
# metric -> (label, higher is better, shown as perplexity)
ABLATION_METRICS = {
    "fsr_sample_token_accuracy": ("FSR teacher-forced token accuracy", True, False),
    "fsr_sample_rouge_l": ("FSR ROUGE-L F1 x 100 (greedy generation)", True, False),
    "window_nll": ("perplexity", False, True),
}


def _ablation_values(summary) -> dict[tuple[str, str, int, int | None], float]:
    """{(variant, kind:metric, length, position): value} from summary rows (dicts or CSV rows)."""
    out = {}
    for r in summary:
        pos = r["position"]
        out[(r["variant"], r["metric"], int(r["context_length"]), int(pos) if pos not in (None, "") else None)] = float(
            r["value"]
        )
    return out


def _variant_label(variant: str, cfg) -> str:
    from ropekit.ablation import CONTROL

    if variant == CONTROL:
        return f"base model, no extension ({cfg.base.method}; control)"
    return _label(variant) + (" (reference)" if variant == cfg.reference else "")


def ablation_table(summary, cfg) -> str:
    """Markdown: the controls' verdict, then per metric a variant x length table of means with 95%
    intervals and each variant's paired difference to the reference (bold: the interval excludes 0)."""
    from ropekit.ablation import CONTROL

    val = _ablation_values(summary)
    L = cfg.trained_length
    variants = [v for v in [CONTROL, *cfg.variants] if any(k[0] == v for k in val)]
    acc = "fsr_sample_token_accuracy"
    lines = []
    short = sorted(n for (v, m, n, p) in val if v == CONTROL and m == f"mean:{acc}" and n <= L)
    if short:
        worst = min(val[(CONTROL, f"mean:{acc}", n, None)] for n in short)
        verdict = ("passes" if worst >= cfg.control_accuracy else
                   "FAILS: the base model retrieves too little at its own length for the FSR comparisons below "
                   "to measure more than a weak skill")  # fmt: skip
        lines.append(f"- **Positive control** {verdict}: the base model's lowest FSR accuracy at "
                     f"{', '.join(map(str, short))} tokens (<= its length {L}) is {worst:.2f} (threshold "
                     f"{cfg.control_accuracy}).")  # fmt: skip
    longest = max((n for (v, m, n, p) in val if v == CONTROL and m == f"mean:{acc}"), default=0)
    if longest > L:  # the longest FSR length (the target, where the lengths reach it)
        far = val[(CONTROL, f"mean:{acc}", longest, None)]
        lo, hi = val[(CONTROL, f"low:{acc}", longest, None)], val[(CONTROL, f"high:{acc}", longest, None)]
        lines.append(f"- **Negative control**: the same model at {longest} tokens with no extension: {far:.2f} "
                     f"[{lo:.2f}, {hi:.2f}].")  # fmt: skip
    for metric, (label, higher, as_ppl) in ABLATION_METRICS.items():
        lengths = sorted({n for (v, m, n, p) in val if m == f"mean:{metric}" and p is None})
        if not lengths:
            continue
        f = math.exp if as_ppl else (lambda x: x)
        lines += ["", f"**{label}** (mean [95% interval]; Δ: paired difference to {_label(cfg.reference)}"
                  f"{' in NLL' if as_ppl else ''}, {'higher' if higher else 'lower'} is better; **bold**: resolved)",
                  "", "| variant | " + " | ".join(str(n) for n in lengths) + " |",
                  "|---|" + "---|" * len(lengths)]  # fmt: skip
        for v in variants:
            cells = []
            for n in lengths:
                key = (v, f"mean:{metric}", n, None)
                if key not in val:
                    cells.append("")
                    continue
                lo, hi = val[(v, f"low:{metric}", n, None)], val[(v, f"high:{metric}", n, None)]
                cell = f"{f(val[key]):.2f}" + ("" if math.isnan(lo) else f" [{f(lo):.2f}, {f(hi):.2f}]")
                if (v, f"delta:{metric}", n, None) in val:
                    d, dlo, dhi = (val[(v, f"{k}:{metric}", n, None)] for k in ("delta", "delta_low", "delta_high"))
                    delta = f"Δ {d:+.3f}" + ("" if math.isnan(dlo) else f" [{dlo:+.3f}, {dhi:+.3f}]")
                    cell += f"<br>{'**' + delta + '**' if val[(v, f'resolved:{metric}', n, None)] else delta}"
                cells.append(cell)
            lines.append(f"| {_variant_label(v, cfg)} | " + " | ".join(cells) + " |")
    n_fsr = next((int(r["n"]) for r in summary if r["metric"] == f"mean:{acc}"), 0)
    n_ppl = next((int(r["n"]) for r in summary if r["metric"] == "mean:window_nll"), 0)
    lines += ["", f"FSR: {n_fsr} prompts per length, PPL: {n_ppl} windows per length, the same for every variant; "
              "intervals: 95% percentile bootstrap (scipy.stats.bootstrap), deltas paired by sample."]  # fmt: skip
    return "\n".join(lines) + "\n"


def draw_ablation(summary, cfg, out: str | Path, *, prefix: str) -> list[Path]:
    """``<prefix>_fsr.png`` (teacher-forced accuracy and ROUGE-L against length, the control dashed),
    ``<prefix>_ppl.png`` and ``<prefix>_position_loss.png`` (at the target length only), each with 95%
    intervals, and ``<prefix>_summary.csv`` (the rows they were drawn from)."""
    from ropekit.ablation import CONTROL
    from ropekit.results import COLUMNS

    plt = _plt()
    val = _ablation_values(summary)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    L, target = cfg.trained_length, cfg.extend.seq_len
    variants = [v for v in [CONTROL, *cfg.variants] if any(k[0] == v for k in val)]
    device = ", ".join(sorted({r["device"] for r in summary}))

    def curve(ax, metric, *, by_position=False, transform=lambda x: x):
        for v in variants:
            xs = sorted(p if by_position else n for (vv, m, n, p) in val
                        if vv == v and m == f"mean:{metric}" and (p is not None) == by_position
                        and (not by_position or n == target))  # fmt: skip
            if not xs:
                continue
            key = (lambda x: (target, x)) if by_position else (lambda x: (x, None))
            y = [transform(val[(v, f"mean:{metric}", *key(x))]) for x in xs]
            lo = [transform(val[(v, f"low:{metric}", *key(x))]) for x in xs]
            hi = [transform(val[(v, f"high:{metric}", *key(x))]) for x in xs]
            style = (dict(color="k", ls="--", marker="s") if v == CONTROL
                     else dict(color=f"C{cfg.variants.index(v)}", marker="o"))  # fmt: skip
            ax.plot(xs, y, ms=3, label=_variant_label(v, cfg), **style)
            ax.fill_between(xs, lo, hi, alpha=0.15, color=style["color"])
        if not by_position:
            ax.set_xscale("log", base=2)
            ax.axvline(L, color="grey", lw=0.6, ls=":")
            ax.set_xlabel(f"context length (tokens); dotted: the base model's length {L}")
        ax.legend(fontsize=6)

    written = []
    panels = [("fsr", [("fsr_sample_token_accuracy", "teacher-forced token accuracy"),
                       ("fsr_sample_rouge_l", "ROUGE-L F1 x 100")]),
              ("ppl", [("window_nll", "perplexity")])]  # fmt: skip
    for name, metrics in panels:
        metrics = [(m, y) for m, y in metrics if any(k[1] == f"mean:{m}" for k in val)]
        if not metrics:
            continue
        fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
        for ax, (m, ylabel) in zip(axes[0], metrics, strict=True):
            curve(ax, m, transform=math.exp if m == "window_nll" else (lambda x: x))
            ax.set_ylabel(ylabel)
            ax.set_title(ABLATION_METRICS[m][0] if m != "window_nll" else "validation perplexity", fontsize=9)
            if m == "window_nll":
                ax.set_yscale("log")
        fig.suptitle(f"{prefix}: mean and 95% bootstrap interval; {device}", fontsize=8)
        _save(fig, out / f"{prefix}_{name}.png")
        plt.close(fig)
        written.append(out / f"{prefix}_{name}.png")
    if any(k[1] == "mean:position_nll" for k in val):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        curve(ax, "position_nll", by_position=True)
        ax.axvline(L, color="grey", lw=0.6, ls=":")
        ax.set(xlabel=f"position in a {target}-token window (bins; dotted: {L})", ylabel="mean NLL in bin")
        ax.set_title(f"per-position loss at the target length {target}", fontsize=9)
        fig.suptitle(f"{prefix}: mean and 95% bootstrap interval over windows; {device}", fontsize=8)
        _save(fig, out / f"{prefix}_position_loss.png")
        plt.close(fig)
        written.append(out / f"{prefix}_position_loss.png")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(summary)
    atomic_write_text(out / f"{prefix}_summary.csv", buf.getvalue())
    return [*written, out / f"{prefix}_summary.csv"]


# ---------------------------------------------------------------------------------------------
# ropekit advise / ropekit sweep
# ---------------------------------------------------------------------------------------------
def draw_advice(advice, png: str | Path) -> list[Path]:
    """Fig. 4-form decay curves of every advised candidate on one plot (0 .. 1.25 L'), as moving
    averages (the raw curves oscillate too fast to tell apart), and their CSV (raw and averaged) beside
    it as ``<name>_decay.csv``; a file of that name that advise did not write is refused, not replaced."""
    png = Path(png)
    csv_path = png.with_name(f"{png.stem}_decay.csv")
    if csv_path.is_file() and not csv_path.read_bytes().startswith(b"distance,"):
        raise ValueError(f"{str(csv_path)!r} exists and holds no decay curves; pass another --plot name")
    plt = _plt()
    png.parent.mkdir(parents=True, exist_ok=True)
    a = advice
    every = np.arange(int(1.25 * a.target_length) + 1)
    width = max(1, a.target_length // 128)
    kernel = np.ones(width) / width
    raw = {c.label: analysis.attention_decay(c.spec, every, a.head_dim, a.target_length) for c in a.candidates}
    smooth = {k: np.convolve(v, kernel, mode="same") for k, v in raw.items()}
    pick = np.unique(np.linspace(0, every[-1], 2001).round().astype(int))
    header = ["distance", *(c.spec for c in a.candidates), *(f"{c.spec} (mean over {width})" for c in a.candidates)]
    _write_csv(csv_path, header, [[int(d), *(round(float(raw[k][d]), 6) for k in raw),
                                   *(round(float(smooth[k][d]), 6) for k in raw)] for d in pick])  # fmt: skip
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, (label, c) in enumerate(smooth.items()):
        style = dict(lw=2.0, color="k") if i == a.advised else dict(lw=1.0)
        name = f"{label}{' (advised)' if i == a.advised else ''}: {a.candidates[i].spec}"
        ax.plot(pick[pick >= width], c[pick[pick >= width]], label=name, **style)
    for x, name in ((a.trained_length, "L"), (a.target_length, "L′")):
        ax.axvline(x, color="gray", ls=":", lw=0.8)
        ax.annotate(f"{name} = {x}", (x, 0), xytext=(3, 3), textcoords="offset points", fontsize=7)
    ax.axhline(0, color="k", lw=0.4)
    ax.set(xlabel="distance between query and key tokens",
           ylabel=f"score before softmax, mean over {width} tokens",
           title=f"Score decay of all-ones q = k (d = {a.head_dim}, base {a.base:g}; dynamic NTK at L′)")  # fmt: skip
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    _save(fig, png)
    plt.close(fig)
    return [png, csv_path]


def draw_sweep(summary_csv: str | Path, png: str | Path) -> list[Path]:
    """One panel per metric of a sweep summary: each candidate's paired difference to the baseline with
    its 95% interval, in rank order (filled markers: the interval excludes 0)."""
    from ropekit.sweep import SAMPLE_METRICS

    plt = _plt()
    rows = read_rows(summary_csv)
    if not rows:
        raise ValueError(f"no summary rows in {summary_csv}")
    val = {(r["variant"], r["metric"]): float(r["value"]) for r in rows}
    ranked = [v for _, v in sorted((int(val[(v, "rank")]), v) for v, m in val if m == "rank")]
    metrics = [m for m in SAMPLE_METRICS if any((v, f"delta:{m}") in val for v in ranked)]
    if not metrics:
        raise ValueError(f"no paired differences in {summary_csv}")
    cands = [v for v in ranked if (v, f"delta:{metrics[0]}") in val]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 0.5 * len(cands) + 1.8), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        for y, v in enumerate(cands):
            if (v, f"delta:{m}") not in val:
                continue
            d, lo, hi = (val[(v, f"{k}:{m}")] for k in ("delta", "delta_low", "delta_high"))
            filled = bool(val.get((v, f"resolved:{m}")))
            ax.errorbar([d], [y], xerr=[[d - lo], [hi - d]] if lo == lo else None, fmt="o",
                        mfc="C0" if filled else "white", color="C0", capsize=3)  # fmt: skip
        ax.axvline(0, color="k", lw=0.6)
        ax.set_yticks(range(len(cands)), cands if ax is axes[0][0] else [""] * len(cands), fontsize=6)
        ax.invert_yaxis()
        better = "higher" if SAMPLE_METRICS[m][1] else "lower"
        ax.set_title(f"Δ {SAMPLE_METRICS[m][2]} ({better} is better)", fontsize=8)
    n = int(next(r["n"] for r in rows if r["metric"].startswith("delta:")))
    fig.suptitle(f"{Path(summary_csv).stem}: paired difference to the model as it is, 95% bootstrap "
                 f"interval (n = {n}); rank order top to bottom", fontsize=8)  # fmt: skip
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, png)
    plt.close(fig)
    return [png]


def draw_bench(results: str | Path, png: str | Path, *, op: str = "fwd", measure: str = "gb_per_s",
               family: str | None = None, min_length: int = 1) -> Path:  # fmt: skip
    """``measure`` (GB/s, or pct_of_copy) against sequence length, one line per provider and shape family, from
    ``ropekit bench`` rows; ``family`` keeps one shape family (e.g. ``"B=1,Hq=32,Hk=8,D=128,bfloat16"``) and
    ``min_length`` drops shorter rows (2: leave out the decoding shapes, T = 1)."""
    plt = _plt()
    rows = [r for r in read_rows(results)
            if r["experiment"] == "kernel_bench" and int(r["context_length"]) >= min_length]  # fmt: skip
    if family:
        rows = [r for r in rows if r["variant"].endswith(f" @ {family}")]
    series = _series(rows, f"{op} {measure}")
    if not series:
        raise ValueError(f"no '{op} {measure}' kernel_bench rows in {results}" + (f" for {family}" if family else ""))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for variant, pts in sorted(series.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=variant)
    label = "% of device-to-device copy" if measure == "pct_of_copy" else "GB/s"
    ax.set(xscale="log", xlabel="sequence length T", ylabel=f"{label} ({op})")
    ax.set_title(", ".join(sorted({r["device"] for r in rows})), fontsize=8)
    ax.legend(fontsize=6)
    png = Path(png)
    _save(fig, png)
    plt.close(fig)
    return png
