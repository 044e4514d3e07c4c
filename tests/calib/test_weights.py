"""Weight ranges from the weights themselves, and ACIQ bias correction."""

from __future__ import annotations

import numpy as np
import pytest

from onnxquant.calib.aciq import laplace_alpha
from onnxquant.calib.weights import apply_bias_correction, bias_correction, weight_range
from onnxquant.errors import BadModelError, BadRulesError, InternalError
from onnxquant.quant import fake_quantize, qparams_from_range


def _w(seed=0, shape=(6, 4, 3, 3)):
    rng = np.random.default_rng(seed)
    scale = np.linspace(0.1, 2.0, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    return (rng.laplace(0, 1, shape) * scale).astype(np.float32)


def test_minmax_per_channel_and_per_tensor():
    w = _w()
    lo, hi = weight_range(w, 0, 8)
    np.testing.assert_array_equal(lo, w.reshape(6, -1).min(axis=1))
    np.testing.assert_array_equal(hi, w.reshape(6, -1).max(axis=1))
    lo, hi = weight_range(w, 1, 8)
    assert lo.shape == (4,)
    np.testing.assert_array_equal(hi, np.moveaxis(w, 1, 0).reshape(4, -1).max(axis=1))
    lo, hi = weight_range(w, None, 8)
    assert lo.shape == () and float(lo) == w.min() and float(hi) == w.max()


def test_laplace_per_channel():
    w = _w(shape=(3, 4000))
    lo, hi = weight_range(w, 0, 4, "laplace")
    w64 = w.astype(np.float64)
    mean = w64.mean(axis=1)
    b = np.abs(w64 - mean[:, None]).mean(axis=1)
    np.testing.assert_allclose(hi, np.minimum(w64.max(axis=1), mean + laplace_alpha(4) * b), rtol=1e-9)
    np.testing.assert_allclose(lo, np.maximum(w64.min(axis=1), mean - laplace_alpha(4) * b), rtol=1e-9)
    _, ghi = weight_range(w, 0, 4, "gauss")
    assert np.all(ghi < hi)


def _reference_mse(w, axis, bits, symmetric):
    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.float64)
    out_lo, out_hi = [], []
    for row in rows:
        best, best_range = np.inf, None
        for k in range(1, 101):
            lo, hi = min(row.min(), 0) * k / 100, max(row.max(), 0) * k / 100
            if symmetric:
                s = max(-lo, hi) / (2 ** (bits - 1) - 1)
                q = np.clip(np.rint(row / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
                err = np.sum((row - s * q) ** 2)
            else:
                s = (hi - lo) / (2**bits - 1)
                z = np.clip(np.rint(-lo / s), 0, 2**bits - 1)
                q = np.clip(np.rint(row / s) + z, 0, 2**bits - 1)
                err = np.sum((row - s * (q - z)) ** 2)
            if err < best:
                best, best_range = err, (row.min() * k / 100, row.max() * k / 100)
        out_lo.append(best_range[0])
        out_hi.append(best_range[1])
    return np.array(out_lo), np.array(out_hi)


@pytest.mark.parametrize("bits,symmetric", [(4, True), (8, True), (4, False)])
def test_mse_matches_brute_force(bits, symmetric):
    w = _w(seed=1, shape=(5, 3, 3, 3))
    lo, hi = weight_range(w, 0, bits, "mse", symmetric=symmetric)
    rlo, rhi = _reference_mse(w, 0, bits, symmetric)
    np.testing.assert_allclose(lo, rlo, rtol=1e-12)
    np.testing.assert_allclose(hi, rhi, rtol=1e-12)


def test_bias_correction_restores_mean_and_spread():
    w = _w(seed=2, shape=(8, 16, 3, 3))
    lo, hi = weight_range(w, 0, 3)
    w_deq = fake_quantize(w, qparams_from_range(lo, hi, 3, True, axis=0))
    shift, ratio = bias_correction(w, w_deq, 0, full=False)
    rows, qrows = w.reshape(8, -1).astype(np.float64), w_deq.reshape(8, -1).astype(np.float64)
    np.testing.assert_allclose(shift, rows.mean(axis=1) - qrows.mean(axis=1), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(ratio, np.ones(8))
    shift, ratio = bias_correction(w, w_deq, 0, full=True)
    xi = np.linalg.norm(rows - rows.mean(1, keepdims=True), axis=1) / np.linalg.norm(
        qrows - qrows.mean(1, keepdims=True), axis=1
    )
    np.testing.assert_allclose(ratio, xi, rtol=1e-9)
    fixed = apply_bias_correction(w_deq, shift, ratio, 0).reshape(8, -1).astype(np.float64)
    np.testing.assert_allclose(fixed.mean(axis=1), rows.mean(axis=1), atol=1e-6)
    np.testing.assert_allclose(fixed.std(axis=1), rows.std(axis=1), rtol=1e-5)
    with pytest.raises(InternalError, match="shapes differ"):
        bias_correction(w, w_deq[:4], 0, True)


def test_bad_weights():
    with pytest.raises(BadRulesError, match="accepted: minmax, laplace, gauss, mse"):
        weight_range(_w(), 0, 4, "kl")
    w = _w()
    w[0, 0, 0, 0] = np.inf
    with pytest.raises(BadModelError, match="NaN or Inf"):
        weight_range(w, 0, 4)
    with pytest.raises(InternalError, match="axis"):
        weight_range(_w(), 5, 4)
