"""Closed-form curves of Xiong et al. 2023 and related work, from ropekit's method definitions.

- ``attention_decay``: the paper's Fig. 4, pre-softmax score of all-ones q = k at distance D:
  score(D) = (1/sqrt d) * sum_j 2 cos(D theta_j) [* zeta_j^(D/B) for xPos]; score(0) = sqrt(d).
- ``helix``: Fig. 8, the curve (Re f_0, Im f_0, Re f_j) of a fixed x under RoPE, RoPE+PI, RoPE+ABF,
  idealised as (cos w0 t, sin w0 t, sin a t) with 11 integer positions marked.
- ``granularity``: Theorem 1's C_d = sum_j sin(omega_j), omega_j = alpha b^(-2j/d) (PI) or
  (beta b)^(-2j/d) (ABF), as the finite sum and per rotary pair (C_d / (d/2)), with the paper's
  limits C_ABF ~ 1/(ln b + ln beta), C_PI ~ alpha / ln b.
- ``base_lower_bound``: Men et al. 2024: the smallest base b with B(m) = sum_j cos(m theta_j) >= 0 for
  every m <= L. The condition is not monotone in b (a base can pass while a slightly larger one fails),
  so the search scans a log grid upwards and refines the first bracket where the condition flips.
- ``bound_length``, ``granularity_per_pair``, ``full_period_pairs``: the same quantities for any
  frequencies (a method's ``inv_freq64``), for ``ropekit.studies.advise``.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ropekit.methods import parse

__all__ = [
    "PAPER_VARIANTS",
    "attention_decay",
    "xpos_envelope",
    "helix",
    "granularity_sum",
    "granularity_limit",
    "base_lower_bound",
    "bound_holds",
    "bound_length",
    "granularity_per_pair",
    "full_period_pairs",
    "PAPER_REGIME",
    "regime_mismatch",
    "regime_base",
    "regime_variants",
]

# Fig. 4 / Fig. 5 variants at the paper's 7B scale (d = 128, base 10,000; PI for 4k -> 32k).
PAPER_VARIANTS = {
    "RoPE": "rope:base=10000",
    "RoPE PI": "pi:factor=8,base=10000",
    "RoPE ABF": "abf:base=500000",
    "xPos ABF": "xpos:base=500000,scale_base=512",
}


def attention_decay(spec: str, distances: np.ndarray, head_dim: int = 128, seq_len: int | None = None) -> np.ndarray:
    """Pre-softmax score of all-ones q and k (query after key by ``distances``), 1/sqrt(d) scaling.

    ``seq_len`` is the current length for methods whose frequencies depend on it (dynamic NTK). The
    rotation alone: YaRN's attention factor (q and k both scaled) would multiply the score by its square.
    """
    method = parse(spec)
    theta = method.inv_freq64(head_dim, seq_len).numpy()
    rate = method.xpos_rate(head_dim)
    distances = np.asarray(distances, dtype=np.float64)
    out = np.empty(distances.shape[0])
    block = max(1, (1 << 22) // theta.size)  # a few MB at a time, whatever the number of distances
    for start in range(0, distances.shape[0], block):
        dist = distances[start : start + block, None]
        terms = 2 * np.cos(dist * theta[None, :])
        if rate is not None:  # q at n scaled zeta^(n/B), k at m by zeta^(-m/B): the pair carries zeta^((n-m)/B)
            terms = terms * np.exp(dist * rate.numpy()[None, :])
        out[start : start + block] = terms.sum(axis=1)
    return out / math.sqrt(head_dim)


def helix(kind: str, t: np.ndarray, *, a: float = 0.6, alpha: float = 0.25) -> np.ndarray:
    """(x, y, z) of Fig. 8's idealised helix for ``kind`` in {"RoPE", "RoPE+PI", "RoPE+ABF"}.

    RoPE: (cos t, sin t, sin a t). PI scales every frequency by alpha. ABF keeps theta_0 = 1 and halves
    the higher pair's frequency (the paper: a in (a) is twice that in (c)).
    """
    t = np.asarray(t, dtype=np.float64)
    w0, wz = {"RoPE": (1.0, a), "RoPE+PI": (alpha, alpha * a), "RoPE+ABF": (1.0, a / 2)}[kind]
    return np.stack([np.cos(w0 * t), np.sin(w0 * t), np.sin(wz * t)], axis=-1)


def granularity_sum(kind: str, factor: float, *, base: float = 10_000.0, head_dim: int = 128) -> float:
    """Finite-d C_d = sum_j sin(omega_j); ``factor`` is alpha for "PI" and beta for "ABF"."""
    j = np.arange(head_dim // 2, dtype=np.float64)
    if kind == "PI":
        omega = factor * base ** (-2 * j / head_dim)
    elif kind == "ABF":
        omega = (factor * base) ** (-2 * j / head_dim)
    else:
        raise ValueError(f"kind must be 'PI' or 'ABF'; got {kind!r}")
    return float(np.sin(omega).sum())


def granularity_limit(kind: str, factor: float, *, base: float = 10_000.0) -> float:
    """The paper's d -> infinity per-pair limits: C_ABF ~ 1/(ln b + ln beta), C_PI ~ alpha / ln b."""
    if kind == "PI":
        return factor / math.log(base)
    if kind == "ABF":
        return 1.0 / (math.log(base) + math.log(factor))
    raise ValueError(f"kind must be 'PI' or 'ABF'; got {kind!r}")


def granularity_per_pair(inv_freq) -> float:
    """Theorem 1's C_d / (d/2) for any frequencies: mean over pairs of sin(omega_j)."""
    omega = np.asarray(inv_freq, dtype=np.float64)
    return float(np.sin(omega).mean())


def full_period_pairs(inv_freq, length: int) -> int:
    """Rotary pairs whose wavelength 2 pi / omega_j fits within ``length`` tokens (a full period seen;
    the pairs below Liu et al. 2023's critical dimension when ``length`` is the trained length)."""
    omega = np.asarray(inv_freq, dtype=np.float64)
    return int((2 * math.pi / omega <= length).sum())


def bound_length(inv_freq, max_length: int, *, block: int = 2048) -> int:
    """Largest L <= ``max_length`` with B(m) = sum_j cos(m omega_j) >= 0 for every 0 <= m <= L
    (Men et al.'s condition for these frequencies); ``max_length`` when it holds throughout."""
    omega = np.asarray(inv_freq, dtype=np.float64)
    for start in range(0, max_length + 1, block):  # in blocks: (block, d/2) at a time; most failures come early
        m = np.arange(start, min(max_length, start + block - 1) + 1, dtype=np.float64)
        bad = np.flatnonzero(np.cos(m[:, None] * omega[None, :]).sum(axis=1) < 0)
        if bad.size:
            return int(m[bad[0]]) - 1
    return max_length


def bound_holds(base: float, length: int, head_dim: int) -> bool:
    """Men et al.'s condition: B(m) = sum_j cos(m theta_j) >= 0 for every integer 0 <= m <= length."""
    theta = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    # From the far end first, in growing blocks: just below the bound the condition fails at large m.
    end, size = length + 1, 128
    while end > 0:
        m = np.arange(max(0, end - size), end, dtype=np.float64)
        if (np.cos(m[:, None] * theta[None, :]).sum(axis=1) < 0).any():
            return False
        end, size = end - size, min(4 * size, 8192)
    return True


@functools.lru_cache(maxsize=128)  # a pure function of numbers, and seconds at 32k+
def base_lower_bound(
    length: int,
    head_dim: int = 128,
    *,
    lo: float = 10.0,
    hi: float = 1e12,
    points_per_decade: int = 1000,
    rtol: float = 1e-4,
) -> float:
    """Smallest base (to ``rtol``) for which ``bound_holds``, by a grid search refined where it flips.

    The condition is not monotone in the base (d = 64, L = 8192: a dozen passing islands between
    3.9e5 and 1.9e6, some under 1% wide), so bisection lands on any flip. Instead: a coarse scan (100
    points a decade) upwards from ``lo`` finds a passing base g; a scan of ``points_per_decade`` points
    a decade from g / 10 up to g finds the first passing grid base; the step below it, where the
    condition flips, is scanned again on a finer grid until it is within ``rtol``. Returns the passing
    end of that step. Exact for the grid: an island narrower than one fine step (0.23% at 1,000 a
    decade) or lying more than a decade below g would be missed (tests/test_advise.py compares with
    a dense scan).
    """
    if not bound_holds(hi, length, head_dim):
        raise ValueError(f"even base {hi:g} does not satisfy the bound at length {length}")

    def first_passing(grid) -> int:  # the last grid point is known to pass
        return next(i for i, b in enumerate(grid) if i == len(grid) - 1 or bound_holds(float(b), length, head_dim))

    coarse = np.geomspace(lo, hi, int(math.ceil(math.log10(hi / lo) * 100)) + 1)
    g = float(coarse[first_passing(coarse)])
    start = max(lo, g / 10)
    fine = np.geomspace(start, g, max(2, int(math.ceil(math.log10(g / start) * points_per_decade)) + 1))
    k = first_passing(fine)
    if k == 0:
        return float(fine[0])
    a, b = float(fine[k - 1]), float(fine[k])  # a fails, b passes
    while b / a - 1 > rtol:
        steps = np.geomspace(a, b, 17)[1:]  # (a, b]: the last one is b, known to pass
        i = first_passing(steps)
        a, b = (a if i == 0 else float(steps[i - 1])), float(steps[i])
    return b


def xpos_envelope(spec: str, distance: float, head_dim: int) -> tuple[float, float]:
    """xPos's factor on one rotary pair's score contribution at ``distance`` (query after key), zeta_j^(D / B):
    (the fastest-decaying pair's, the slowest pair's). (1.0, 1.0) for a method without xPos."""
    rate = parse(spec).xpos_rate(head_dim)
    if rate is None:
        return 1.0, 1.0
    factors = torch.exp(distance * rate)
    return float(factors.min()), float(factors.max())


# The paper's 7B run (Section 4.1): d = 128, trained at 4,096, extended 8x to 32,768; RoPE base 10,000.
PAPER_REGIME = {"head_dim": 128, "trained_length": 4096, "base": 10_000.0}


def regime_mismatch(spec: str, head_dim: int, trained_length: int, reference_spec: str | None = None) -> float:
    """How far a model at (``head_dim``, ``trained_length``) with ``spec`` sits from the paper's 7B run
    on Fig. 4's curve, distances measured in trained lengths: the mean over Delta = 16, 32, ..., 8 x 4,096
    of |score_ref(Delta) / sqrt(128) - score(Delta x L / 4,096) / sqrt(d)| (scores normalised to 1 at 0;
    at L = 256 the small model's distances are 1, 2, ..., 2,048).
    ``reference_spec``: the paper's method to compare with (default plain RoPE at base 10,000)."""
    ref = PAPER_REGIME
    step = ref["trained_length"] // 256
    distances = np.arange(step, 8 * ref["trained_length"] + 1, step, dtype=np.float64)
    ref_spec = reference_spec or f"rope:base={ref['base']:g}"
    ref_curve = attention_decay(ref_spec, distances, ref["head_dim"]) / math.sqrt(ref["head_dim"])
    ratio = trained_length / ref["trained_length"]
    curve = attention_decay(spec, distances * ratio, head_dim) / math.sqrt(head_dim)
    return float(np.abs(ref_curve - curve).mean())


def regime_base(head_dim: int, trained_length: int, *, grid=None) -> dict:
    """The RoPE base that puts a small model where the paper's 7B run sits relative to its length.

    The rule: scale the paper's base by the length ratio, b = 10,000 x L / 4,096, which keeps the
    slowest pair's wavelength (~2 pi b) the same multiple of the trained length. The check: the
    ``regime_mismatch`` of that base against a log grid of bases (the best grid base is reported, so
    the rule's cost is visible). -> {"base", "mismatch", "best_base", "best_mismatch", "table"}."""
    ref = PAPER_REGIME
    base = ref["base"] * trained_length / ref["trained_length"]
    grid = np.geomspace(base / 16, base * 16, 33) if grid is None else np.asarray(grid, dtype=np.float64)
    table = [(float(b), regime_mismatch(f"rope:base={b:g}", head_dim, trained_length)) for b in grid]
    best = min(table, key=lambda t: t[1])
    return {
        "base": base,
        "mismatch": regime_mismatch(f"rope:base={base:g}", head_dim, trained_length),
        "best_base": best[0],
        "best_mismatch": best[1],
        "table": table,
    }


def regime_variants(trained_length: int, factor: int = 8) -> tuple[str, ...]:
    """The paper's four variants at a model trained at ``trained_length``: RoPE at the base of the
    paper's regime (``analysis.regime_base``: 10,000 x L / 4,096), PI by ``factor``, ABF at 50x that
    base (the paper's 500,000 / 10,000), xPos at the ABF base with its scale base 512 scaled alike."""
    ratio = trained_length / PAPER_REGIME["trained_length"]
    base = PAPER_REGIME["base"] * ratio
    abf = 50 * base
    return (f"rope:base={base:g}", f"pi:factor={factor},base={base:g}", f"abf:base={abf:g}",
            f"xpos:base={abf:g},scale_base={512 * ratio:g}")  # fmt: skip


def regime_derivation(head_dim: int, trained_length: int) -> str:
    """The printed derivation of ``regime_variants`` for a model of ``head_dim`` trained at ``trained_length``."""
    ref = PAPER_REGIME
    r = regime_base(head_dim, trained_length)
    rope, _, abf, xpos = regime_variants(trained_length)
    ratio = trained_length / ref["trained_length"]
    paper_xpos = f"xpos:base={50 * ref['base']:g},scale_base=512"
    unscaled = xpos.split(",scale_base=")[0] + ",scale_base=512"
    return "\n".join([
        f"  regime (the paper's 7B run: d={ref['head_dim']}, L={ref['trained_length']:,}, base {ref['base']:,.0f}; "
        f"here d={head_dim}, L={trained_length:,}; distances compared at the same multiple of L):",
        f"    RoPE base {r['base']:g} = {ref['base']:,.0f} x {trained_length} / {ref['trained_length']}: Fig. 4 "
        f"curve mismatch {r['mismatch']:.3f} (best base on a 33-point grid: {r['best_base']:.0f}, "
        f"{r['best_mismatch']:.3f})",
        f"    ABF {abf.split('=')[1]} = 50 x the base (500,000 / 10,000): mismatch "
        f"{regime_mismatch(abf, head_dim, trained_length, 'abf:base=500000'):.3f} against the paper's ABF",
        f"    PI factor 8 (the paper's 4k -> 32k); xPos at the ABF base, scale base {512 * ratio:g} = 512 x "
        f"{trained_length} / {ref['trained_length']}: mismatch "
        f"{regime_mismatch(xpos, head_dim, trained_length, paper_xpos):.3f} "
        f"(at 512: {regime_mismatch(unscaled, head_dim, trained_length, paper_xpos):.3f})",
    ])  # fmt: skip
