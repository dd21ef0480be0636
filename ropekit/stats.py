"""Intervals for what ropekit reports: every one a 95% percentile bootstrap (``scipy.stats.bootstrap``).

- ``mean_interval``: the mean of per-sample values (windows, prompts) and its interval;
- ``paired_interval``: the mean of candidate - reference over the same samples and its interval
  (paired resampling: a sample's two values stay together, so the variance shared by both methods,
  an easy or a hard prompt, cancels);
- ``compare``: both, for every variant of a {variant: {sample: value}} table against a reference,
  with ``resolved`` (the paired interval excludes 0).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["CONFIDENCE", "mean_interval", "paired_interval", "compare"]

CONFIDENCE = 0.95
N_RESAMPLES = 2000
MIN_RESOLVED = 5  # fewer paired samples never count as resolved (a bootstrap of 2-4 points says little)


def _bootstrap(data: tuple[np.ndarray, ...], statistic, *, paired: bool, seed: int) -> tuple[float, float]:
    from scipy.stats import bootstrap

    res = bootstrap(data, statistic, paired=paired, vectorized=True, n_resamples=N_RESAMPLES,
                    confidence_level=CONFIDENCE, method="percentile", rng=np.random.default_rng(seed))  # fmt: skip
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def mean_interval(values, *, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high); the interval is the point itself when every value is equal, (mean, nan, nan)
    for a single value."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no values to average")
    mean = float(a.mean())
    if a.size < 2:
        return mean, float("nan"), float("nan")
    if np.ptp(a) == 0:
        return mean, mean, mean
    low, high = _bootstrap((a,), lambda x, axis: x.mean(axis=axis), paired=False, seed=seed)
    return mean, low, high


def paired_interval(candidate, baseline, *, seed: int = 0) -> tuple[float, float, float]:
    """Mean of candidate - baseline over paired samples and its interval; (mean, nan, nan) with fewer
    than two samples."""
    a, b = np.asarray(candidate, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in number: {a.shape} vs {b.shape}")
    mean = float((a - b).mean())
    if a.size < 2:
        return mean, float("nan"), float("nan")
    if np.ptp(a - b) == 0:  # every difference equal: the interval is that point
        return mean, mean, mean
    low, high = _bootstrap((a, b), lambda x, y, axis: (x - y).mean(axis=axis), paired=True, seed=seed)
    return mean, low, high


def compare(samples: dict[str, dict], reference: str | None, *, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per variant: ``mean``, ``low``, ``high``, ``n`` and, against ``reference`` on the samples both
    have (refused unless the reference has every sample of the variant), ``delta``, ``delta_low``,
    ``delta_high`` and ``resolved`` (1.0 when the paired interval excludes 0 and n >= ``MIN_RESOLVED``)."""
    out = {}
    for variant, values in samples.items():
        keys = sorted(values)
        mean, low, high = mean_interval([values[k] for k in keys], seed=seed)
        row = {"mean": mean, "low": low, "high": high, "n": float(len(keys))}
        ref = samples.get(reference) if reference is not None else None
        if ref is not None and variant != reference:
            missing = set(keys) - set(ref)
            if missing:
                raise ValueError(f"{variant!r} has samples {sorted(missing)[:5]} that {reference!r} lacks: not paired")
            d, dlo, dhi = paired_interval([values[k] for k in keys], [ref[k] for k in keys], seed=seed)
            resolved = float(len(keys) >= MIN_RESOLVED and not (math.isnan(dlo) or dlo <= 0 <= dhi))
            row.update(delta=d, delta_low=dlo, delta_high=dhi, resolved=resolved)
        out[variant] = row
    return out
