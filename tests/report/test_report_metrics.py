"""Report metrics against hand-computed values; streaming equals one pass over the concatenation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxquant.report.metrics import (
    ClassAgreement,
    CodeHistogram,
    ErrorAccumulator,
    code_entropy,
    compare,
)


def test_sqnr_of_known_noise():
    # signal: a sine of amplitude 2 (power 2); noise: ±0.02 alternating (power 4e-4): SQNR = 10·log10(5000)
    n = 100_000
    x = (2 * np.sin(np.arange(n) * 2 * np.pi / 100)).astype(np.float32)
    e = np.where(np.arange(n) % 2 == 0, 0.02, -0.02).astype(np.float32)
    m = compare(x, x + e)
    px, pe = float(np.sum(x.astype(np.float64) ** 2)), float(np.sum((x + e - x).astype(np.float64) ** 2))
    assert m.sqnr_db == pytest.approx(10 * math.log10(px / pe), abs=1e-4)  # float32 partial sums
    assert m.sqnr_db == pytest.approx(10 * math.log10(2 / 4e-4), abs=0.01)  # 36.99 dB
    assert m.mse == pytest.approx(4e-4, rel=1e-3)
    assert m.max_abs_error == pytest.approx(0.02, rel=1e-3)
    assert m.rel_error == pytest.approx(10 ** (-m.sqnr_db / 20), rel=1e-9)
    assert m.count == n


def test_hand_computed_small_vectors():
    x = np.array([3.0, 4.0], np.float32)
    y = np.array([3.0, 5.0], np.float32)
    m = compare(x, y)
    assert m.mse == pytest.approx(0.5)  # (0² + 1²) / 2
    assert m.sqnr_db == pytest.approx(10 * math.log10(25.0))  # Σx² = 25, Σe² = 1
    assert m.cosine == pytest.approx((9 + 20) / (5 * math.sqrt(34)))
    assert m.max_abs_error == 1.0
    assert m.rel_error == pytest.approx(1 / 5)


def test_exact_and_degenerate():
    x = np.ones(10, np.float32)
    m = compare(x, x)
    assert m.sqnr_db == math.inf and m.mse == 0 and m.cosine == pytest.approx(1.0) and m.rel_error == 0
    assert m.to_json()["sqnr_db"] is None  # JSON has no inf
    assert np.isnan(ErrorAccumulator().result().sqnr_db)
    with pytest.raises(ValueError):
        compare(np.zeros(3, np.float32), np.zeros(4, np.float32))


def test_streaming_equals_one_shot():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 4, 33, 33)).astype(np.float32) * 3
    y = x + rng.laplace(0, 0.05, x.shape).astype(np.float32)
    whole = compare(x, y)
    acc = ErrorAccumulator()
    for i in range(0, len(x), 5):
        acc.update(x[i : i + 5], y[i : i + 5])
    streamed = acc.result()
    for field in ("sqnr_db", "cosine", "mse", "max_abs_error", "rel_error"):
        assert getattr(streamed, field) == pytest.approx(getattr(whole, field), rel=1e-5), field
    assert streamed.count == whole.count
    # merge of two halves equals the whole, too
    a, b = ErrorAccumulator(), ErrorAccumulator()
    a.update(x[:20], y[:20])
    b.update(x[20:], y[20:])
    assert a.merge(b).result().sqnr_db == pytest.approx(whole.sqnr_db, rel=1e-6)
    # float64 reference of the sums
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    assert whole.sqnr_db == pytest.approx(10 * np.log10(np.sum(x64**2) / np.sum((y64 - x64) ** 2)), rel=1e-5)


def test_code_entropy_and_clip_fraction():
    assert code_entropy(np.ones(16)) == pytest.approx(4.0)  # uniform over 16 codes: 4 bits
    assert code_entropy([5, 0, 0]) == 0.0
    assert code_entropy([1, 1, 2]) == pytest.approx(1.5)  # p = 1/4, 1/4, 1/2
    h = CodeHistogram(signed=True)
    h.update(np.array([-7, -7, 0, 3, 7], np.int8))
    assert h.total == 5
    assert h.counts[-7 + 128] == 2 and h.counts[7 + 128] == 1
    assert h.clip_fraction(-7, 7, 0) == pytest.approx(3 / 5)
    u = CodeHistogram(signed=False)
    u.update(np.array([0, 0, 0, 15, 4], np.uint8))
    assert u.clip_fraction(0, 15, 0) == pytest.approx(1 / 5)  # zeros after Relu are not clipped
    assert u.clip_fraction(0, 15, 3) == pytest.approx(4 / 5)
    assert u.entropy() == pytest.approx(code_entropy([3, 1, 1]))


def test_byte_histogram_matches_bincount():
    from onnxquant.report.metrics import _byte_histogram

    for n in (1, 2, 7, 300_001):  # odd sizes leave one byte outside the pairs
        q = np.random.default_rng(n).integers(0, 256, n).astype(np.uint8)
        assert np.array_equal(_byte_histogram(q), np.bincount(q, minlength=256))
    h = CodeHistogram(signed=True)
    codes = np.random.default_rng(0).integers(-128, 128, (3, 5, 7)).astype(np.int8)
    h.update(codes)
    assert np.array_equal(h.counts, np.bincount(codes.ravel().astype(np.int64) + 128, minlength=256))


def test_class_agreement():
    x = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 2, 0]], np.float32)
    y = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 2, 0]], np.float32)
    c = ClassAgreement()
    c.update(x, y, np.array([0, 1, 1, 1]))
    assert c.agreement == 0.75
    assert c.accuracy_float == 0.75 and c.accuracy_quant == 0.5
