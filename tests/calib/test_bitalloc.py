"""Per-channel bit allocation (ACIQ eq. 10-11)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxquant.calib.bitalloc import allocate_bits, bin_budget
from onnxquant.errors import BadRulesError, InternalError


def test_paper_example():
    np.testing.assert_allclose(bin_budget([1, 2, 4, 8], 4), [7.03, 11.16, 17.71, 28.11], atol=6e-3)
    bits = allocate_bits(np.array([1, 2, 4, 8]), 4)
    assert bits.tolist() == [3, 4, 4, 5]
    assert bits.mean() == 4


@pytest.mark.parametrize("mean_bits", [2, 3, 4, 6, 8])
def test_mean_within_budget_and_bounds(mean_bits):
    alphas = np.random.default_rng(0).lognormal(0, 1.5, 257)
    bits = allocate_bits(alphas, mean_bits, lo=2, hi=8)
    assert bits.min() >= 2 and bits.max() <= 8
    assert bits.sum() <= mean_bits * alphas.size
    assert bits.sum() >= mean_bits * alphas.size - 1 or bits.min() == 8  # budget is used
    order = np.argsort(alphas, kind="stable")
    assert np.all(np.diff(bits[order]) >= -1)  # larger ranges never get much fewer bits


def test_equal_ranges_get_equal_bits_and_zero_ranges_are_handled():
    assert allocate_bits(np.ones(8), 4).tolist() == [4] * 8
    bits = allocate_bits(np.array([0.0, 1.0, 1.0, 1.0]), 4, lo=2)
    assert bits[0] == 2 and bits.sum() <= 16


def test_bad_input():
    with pytest.raises(InternalError, match="finite"):  # ranges come from finite statistics
        allocate_bits(np.array([1.0, np.nan]), 4)
    with pytest.raises(BadRulesError, match=r"mean width 9 outside \[1, 8\]"):
        allocate_bits(np.array([1.0]), 9)
