"""Which base, which factor: closed-form advice for extending a RoPE model from length L to L'.

For each method, the hyper-parameters its published rule gives for L -> L' (s = L'/L), the rule and
its source, and the closed-form diagnostics of ``ropekit.analysis`` at L':

- score at L': the pre-softmax score of all-ones q = k at distance L' (Xiong et al. 2023, Fig. 4);
- C_d per pair: Theorem 1's granularity sum_j sin(omega_j) / (d/2) (Xiong et al. 2023, App. B);
- full periods: rotary pairs whose wavelength fits within L and within L' (Liu et al. 2023's critical
  dimension: pairs beyond it never saw a full period in training);
- Men et al. to: the largest length up to which B(m) = sum_j cos(m omega_j) >= 0 holds (Men et al. 2024);
  a method whose frequencies keep it to L' passes that paper's lower-bound condition.

The rules:

- ABF: the paper's base 500,000 (Xiong et al. 2023, 10,000 -> 500,000 for 4k -> 32k at d = 128), and
  the smallest base that satisfies Men et al.'s condition at L' (``analysis.base_lower_bound``);
- PI: factor s (Chen et al. 2023); NTK: factor s, base b s^(d/(d-2)) (bloc97; Peng et al. 2023 §3.1);
  dynamic NTK: factor s, original length L (emozilla; Hugging Face ``dynamic``), frequencies at L';
- YaRN: factor s, original L, beta_fast = 32, beta_slow = 1, attention factor 0.1 ln s + 1 (Peng et al. 2023);
- Llama 3: factor s, original L, low_freq_factor 1, high_freq_factor 4 (Meta 2024, Llama 3.1).

The advised candidate (a rule of this kit, stated so a sweep can test it): among the candidates whose
frequencies satisfy Men et al.'s condition up to L', the one with the largest C_d per pair (Theorem
1: finer granularity); the first listed on ties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ropekit import analysis
from ropekit.figures import pyplot, save_png
from ropekit.files import write_csv
from ropekit.methods import MAX_HEAD_DIM, parse

__all__ = ["Candidate", "Advice", "candidates", "diagnose", "advise", "format_table", "draw_advice", "PAPER_ABF_BASE"]

PAPER_ABF_BASE = 500_000.0  # Xiong et al. 2023 §4.1


@dataclass(frozen=True)
class Candidate:
    label: str  # short name in tables and figures
    spec: str  # full method spec string, base included
    rule: str  # how the numbers follow from (d, b, L, L')
    source: str


@dataclass(frozen=True)
class Diagnostics:
    score_at_target: float  # Fig. 4 score of all-ones q = k at distance L'
    granularity: float  # Theorem 1: C_d / (d/2)
    full_periods_trained: int  # pairs with wavelength <= L
    full_periods_target: int  # pairs with wavelength <= L'
    bound_length: int  # Men et al.'s condition holds for every m up to this (capped at L')
    attention_factor: float

    @property
    def bound_ok(self) -> bool:
        """Men et al.'s condition holds all the way to L' (``bound_length`` is capped there)."""
        return self.bound_length >= self.target_length

    target_length: int = 0


@dataclass(frozen=True)
class Advice:
    head_dim: int
    base: float
    trained_length: int
    target_length: int
    candidates: list[Candidate]
    diagnostics: list[Diagnostics]
    advised: int  # index into candidates (never the native row)

    @property
    def advised_candidate(self) -> Candidate:
        return self.candidates[self.advised]


MAX_TARGET_LENGTH = 1 << 20  # the closed forms scan every position up to it: minutes at 1M, hours past


def _check(head_dim: int, base: float, trained_length: int, target_length: int) -> None:
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or not 2 < head_dim <= MAX_HEAD_DIM or head_dim % 2:
        raise ValueError(f"head dim must be an even integer in (2, {MAX_HEAD_DIM}]; got {head_dim!r}")
    if not (isinstance(base, (int, float)) and math.isfinite(base) and base > 1):
        raise ValueError(f"base (rope_theta) must be a number > 1; got {base!r}")
    if not (isinstance(trained_length, int) and trained_length > 0):
        raise ValueError(f"trained length must be a positive integer; got {trained_length!r}")
    if not (isinstance(target_length, int) and trained_length < target_length <= MAX_TARGET_LENGTH):
        raise ValueError(
            f"target length must be an integer > the trained length {trained_length} and <= {MAX_TARGET_LENGTH}; "
            f"got {target_length!r}"
        )


def _round_up_holding(bound: float, length: int, head_dim: int) -> int:
    """The bound rounded up to the fewest significant digits (2 to 6) at which the base still satisfies
    the condition (it is not monotone in the base), else up to an integer."""
    for digits in range(2, 7):
        scale = 10 ** max(0, math.floor(math.log10(bound)) - digits + 1)
        rounded = int(math.ceil(bound / scale) * scale)
        if analysis.bound_holds(rounded, length, head_dim):
            return rounded
    return int(math.ceil(bound))


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.6g}"


def candidates(head_dim: int, base: float, trained_length: int, target_length: int) -> list[Candidate]:
    """The model as it is, then one candidate per rule (module docstring), for L -> L'."""
    _check(head_dim, base, trained_length, target_length)
    L, Lp, d, b = trained_length, target_length, head_dim, float(base)
    s = Lp / L
    sf = _fmt(s)
    bound = _round_up_holding(analysis.base_lower_bound(Lp, d), Lp, d)
    ntk_base = b * s ** (d / (d - 2))
    return [
        Candidate("native", f"rope:base={_fmt(b)}", "the model as trained", "-"),
        Candidate(
            "ABF paper",
            f"abf:base={_fmt(PAPER_ABF_BASE)}",
            "base 500,000 (the paper's, for 4k -> 32k at d = 128)",
            "Xiong et al. 2023 §4.1",
        ),
        Candidate(
            "ABF bound",
            f"abf:base={_fmt(bound)}",
            f"smallest base with sum_j cos(m theta_j) >= 0 for all m <= {Lp} (d = {d})",
            "Men et al. 2024 (arXiv 2405.14591)",
        ),
        Candidate("PI", f"pi:base={_fmt(b)},factor={sf}", f"factor = L'/L = {sf}", "Chen et al. 2023 (2306.15595)"),
        Candidate(
            "NTK",
            f"ntk:base={_fmt(b)},factor={sf}",
            f"factor = L'/L = {sf}: base b s^(d/(d-2)) = {_fmt(ntk_base)}",
            "bloc97 2023; Peng et al. 2023 §3.1",
        ),
        Candidate(
            "dynamic NTK",
            f"dynamic:base={_fmt(b)},factor={sf},original_max_position_embeddings={L}",
            f"factor = L'/L = {sf}, original L = {L}; base grows with the length",
            "emozilla 2023; HF 'dynamic'",
        ),
        Candidate(
            "YaRN",
            f"yarn:base={_fmt(b)},factor={sf},original_max_position_embeddings={L}",
            f"factor = {sf}, beta_fast = 32, beta_slow = 1, attention factor 0.1 ln s + 1 = "
            f"{0.1 * math.log(s) + 1:.4f}",
            "Peng et al. 2023 (arXiv 2309.00071)",
        ),
        Candidate(
            "Llama 3",
            f"llama3:base={_fmt(b)},factor={sf},original_max_position_embeddings={L}",
            f"factor = {sf}, low_freq_factor = 1, high_freq_factor = 4",
            "Meta 2024 (Llama 3.1)",
        ),
    ]


def diagnose(spec: str, head_dim: int, trained_length: int, target_length: int) -> Diagnostics:
    """The closed-form diagnostics of one method at L' (module docstring)."""
    method = parse(spec)
    inv = method.inv_freq64(head_dim, target_length).numpy()
    reach = analysis.bound_length(inv, target_length)
    return Diagnostics(
        score_at_target=float(analysis.attention_decay(str(method), [target_length], head_dim, target_length)[0]),
        granularity=analysis.granularity_per_pair(inv),
        full_periods_trained=analysis.full_period_pairs(inv, trained_length),
        full_periods_target=analysis.full_period_pairs(inv, target_length),
        bound_length=reach,
        attention_factor=method.attention_factor,
        target_length=target_length,
    )


def advise(head_dim: int, base: float, trained_length: int, target_length: int) -> Advice:
    """Candidates, their diagnostics, and the advised one (module docstring)."""
    cands = candidates(head_dim, base, trained_length, target_length)
    diags = [diagnose(c.spec, head_dim, trained_length, target_length) for c in cands]
    ok = [i for i in range(1, len(cands)) if diags[i].bound_ok]
    pool = ok or list(range(1, len(cands)))
    advised = max(pool, key=lambda i: (diags[i].granularity, -i))
    return Advice(head_dim, float(base), trained_length, target_length, cands, diags, advised)


def format_table(advice: Advice) -> str:
    """A plain-text table: one row per candidate, the advised one marked with '*'."""
    a = advice
    s = _fmt(a.target_length / a.trained_length)
    head = (
        f"RoPE advice: d = {a.head_dim}, base {_fmt(a.base)}, trained at L = {a.trained_length}, "
        f"target L' = {a.target_length} (s = {s}); d/2 = {a.head_dim // 2} rotary pairs"
    )
    cols = (
        f"  {'candidate':12} {'score@L′':>9} {'C_d/pair':>9} {'periods≤L':>9} {'periods≤L′':>10} "
        f"{'Men et al. to':>13} {'attn':>6}  spec"
    )
    lines = [head, "", cols]
    for i, (c, g) in enumerate(zip(a.candidates, a.diagnostics, strict=True)):
        mark = "*" if i == a.advised else " "
        reach = "L′ ok" if g.bound_ok else str(g.bound_length)
        lines.append(
            f"{mark} {c.label:12} {g.score_at_target:9.3f} {g.granularity:9.4f} {g.full_periods_trained:9d} "
            f"{g.full_periods_target:10d} {reach:>13} {g.attention_factor:6.3f}  {c.spec}"
        )
    lines += ["", "rules and sources:"]
    lines += [f"  {c.label:12} {c.rule}  [{c.source}]" for c in a.candidates]
    c = a.advised_candidate
    lines += [
        "",
        f"* advised: {c.label} ({c.spec}): the largest C_d per pair among candidates whose frequencies "
        "satisfy Men et al.'s condition up to L′ (a closed-form rule: test it with `ropekit sweep --from-advise`).",
    ]
    return "\n".join(lines)


def draw_advice(advice, png: str | Path) -> list[Path]:
    """Fig. 4-form decay curves of every advised candidate on one plot (0 .. 1.25 L'), as moving
    averages (the raw curves oscillate too fast to tell apart), and their CSV (raw and averaged) beside
    it as ``<name>_decay.csv``; a file of that name that advise did not write is refused, not replaced."""
    png = Path(png)
    csv_path = png.with_name(f"{png.stem}_decay.csv")
    if csv_path.is_file() and not csv_path.read_bytes().startswith(b"distance,"):
        raise ValueError(f"{str(csv_path)!r} exists and holds no decay curves; pass another --plot name")
    plt = pyplot()
    png.parent.mkdir(parents=True, exist_ok=True)
    a = advice
    every = np.arange(int(1.25 * a.target_length) + 1)
    width = max(1, a.target_length // 128)
    kernel = np.ones(width) / width
    raw = {c.label: analysis.attention_decay(c.spec, every, a.head_dim, a.target_length) for c in a.candidates}
    smooth = {k: np.convolve(v, kernel, mode="same") for k, v in raw.items()}
    pick = np.unique(np.linspace(0, every[-1], 2001).round().astype(int))
    header = ["distance", *(c.spec for c in a.candidates), *(f"{c.spec} (mean over {width})" for c in a.candidates)]
    write_csv(csv_path, [[int(d), *(round(float(raw[k][d]), 6) for k in raw),
                          *(round(float(smooth[k][d]), 6) for k in raw)] for d in pick], header)  # fmt: skip
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
    save_png(fig, png)
    plt.close(fig)
    return [png, csv_path]
