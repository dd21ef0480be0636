"""Closed-form curves of Xiong et al. 2023 and related work, from ropekit's method definitions.

- ``attention_decay``: the paper's Fig. 4, pre-softmax score of all-ones q = k at distance D:
  score(D) = (1/sqrt d) * sum_j 2 cos(D theta_j) [* zeta_j^(D/B) for xPos]; score(0) = sqrt(d).
- ``helix``: Fig. 8, the curve (Re f_0, Im f_0, Re f_j) of a fixed x under RoPE, RoPE+PI, RoPE+ABF,
  idealised as (cos w0 t, sin w0 t, sin a t) with 11 integer positions marked.
- ``granularity``: Theorem 1's C_d = sum_j sin(omega_j), omega_j = alpha b^(-2j/d) (PI) or
  (beta b)^(-2j/d) (ABF), as the finite sum and per rotary pair (C_d / (d/2)), with the paper's
  limits C_ABF ~ 1/(ln b + ln beta), C_PI ~ alpha / ln b.
- ``base_lower_bound``: Men et al. 2024: the smallest base b with B(m) = sum_j cos(m theta_j) >= 0 for
  every m <= L (found by bisection on log b).
"""

from __future__ import annotations

import math

import numpy as np

from ropekit.methods import parse

__all__ = [
    "PAPER_VARIANTS",
    "attention_decay",
    "helix",
    "granularity_sum",
    "granularity_limit",
    "base_lower_bound",
    "bound_holds",
]

# Fig. 4 / Fig. 5 variants at the paper's 7B scale (d = 128, base 10,000; PI for 4k -> 32k).
PAPER_VARIANTS = {
    "RoPE": "rope:base=10000",
    "RoPE PI": "pi:factor=8,base=10000",
    "RoPE ABF": "abf:base=500000",
    "xPos ABF": "xpos:base=500000,scale_base=512",
}


def attention_decay(spec: str, distances: np.ndarray, head_dim: int = 128) -> np.ndarray:
    """Pre-softmax score of all-ones q and k (query after key by ``distances``), 1/sqrt(d) scaling."""
    method = parse(spec)
    theta = method.inv_freq64(head_dim).numpy()
    dist = np.asarray(distances, dtype=np.float64)[:, None]
    terms = 2 * np.cos(dist * theta[None, :])
    rate = method.xpos_rate(head_dim)
    if rate is not None:  # q at n scaled zeta^(n/B), k at m by zeta^(-m/B): the pair carries zeta^((n-m)/B)
        terms = terms * np.exp(dist * rate.numpy()[None, :])
    return terms.sum(axis=1) / math.sqrt(head_dim)


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


def bound_holds(base: float, length: int, head_dim: int) -> bool:
    """Men et al.'s condition: B(m) = sum_j cos(m theta_j) >= 0 for every integer 0 <= m <= length."""
    theta = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    for start in range(0, length + 1, 8192):  # in blocks: (8192, d/2) at a time
        m = np.arange(start, min(length, start + 8191) + 1, dtype=np.float64)[:, None]
        if (np.cos(m * theta[None, :]).sum(axis=1) < 0).any():
            return False
    return True


def base_lower_bound(length: int, head_dim: int = 128, *, lo: float = 10.0, hi: float = 1e12, iters: int = 40) -> float:
    """Smallest base (to ~1e-3 relative) for which ``bound_holds``; bisection on log(base)."""
    if not bound_holds(hi, length, head_dim):
        raise ValueError(f"even base {hi:g} does not satisfy the bound at length {length}")
    a, b = math.log(lo), math.log(hi)
    for _ in range(iters):
        mid = 0.5 * (a + b)
        if bound_holds(math.exp(mid), length, head_dim):
            b = mid
        else:
            a = mid
        if b - a < 1e-3:
            break
    return math.exp(b)
