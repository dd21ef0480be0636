"""The intervals ropekit prints: bootstrap of the mean, paired differences, and the comparison table."""

import numpy as np
import pytest

from ropekit import stats


def test_mean_interval_contains_the_mean_and_degenerates_honestly():
    values = [1.0, 2.0, 3.5, 0.5, 2.2, 1.9]
    mean, low, high = stats.mean_interval(values, seed=1)
    assert mean == pytest.approx(np.mean(values)) and low < mean < high
    assert stats.mean_interval([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)
    assert np.isnan(stats.mean_interval([0.5])[1])


def test_paired_interval_marks_a_consistent_difference():
    mean, low, high = stats.paired_interval([2.0, 3.0, 2.5, 2.2, 2.8], [1.0, 1.0, 1.1, 0.9, 1.2], seed=0)
    assert mean == pytest.approx(1.46) and 0 < low <= mean <= high
    assert stats.paired_interval([1.0, 2.0], [1.0, 2.0]) == (0.0, 0.0, 0.0)
    assert np.isnan(stats.paired_interval([1.0], [0.0])[1])


def test_pairing_resolves_a_small_difference_that_unpaired_intervals_cannot():
    # prompts differ a lot in difficulty; the candidate is better by 0.05 on every one of them
    rng = np.random.default_rng(0)
    hard = rng.uniform(0.1, 0.9, size=40)
    samples = {"ref": dict(enumerate(hard)), "cand": dict(enumerate(hard + 0.05 + rng.normal(0, 0.01, 40)))}
    table = stats.compare(samples, "ref")
    ref, cand = table["ref"], table["cand"]
    assert ref["low"] < cand["mean"] < ref["high"]  # the two means' intervals overlap ...
    assert cand["resolved"] == 1.0 and 0.03 < cand["delta_low"] < cand["delta_high"] < 0.07  # ... the pairing sees it
    assert "delta" not in ref


def test_compare_refuses_samples_the_reference_lacks():
    with pytest.raises(ValueError, match="not paired"):
        stats.compare({"ref": {0: 1.0, 1: 2.0}, "cand": {0: 1.0, 2: 2.0}}, "ref")
