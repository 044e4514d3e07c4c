"""Error metrics between a float tensor x and its quantized counterpart y, accumulated batch by batch.

With e = y − x and the sums taken over every element seen (n of them):

- MSE = Σe² / n
- SQNR = 10·log10(Σx² / Σe²) dB (+inf when e = 0)
- cosine similarity = Σxy / √(Σx²·Σy²) (over the whole flattened tensor, all samples together)
- max abs error = max |e|
- relative error = √(Σe² / Σx²) = 10^(−SQNR/20) (the relative L2 error)

An `ErrorAccumulator` keeps n, Σx², Σxe, Σe² (float64 totals of float32 partial sums over chunks of `CHUNK`
elements: relative error about 1e-6) and max |e|; Σxy = Σx² + Σxe and Σy² = Σx² + 2Σxe + Σe². Memory is
constant in the number of samples, streaming equals one pass over the concatenated data up to that rounding,
and accumulators merge by adding the sums.

Code statistics: the entropy H = −Σ_k p_k·log2 p_k of the histogram of integer codes is the average number of
bits per value an ideal entropy coder (Huffman within one bit) needs, to compare with the nominal width; the
clip fraction is the share of codes at the ends of the code range (saturated values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CHUNK = 1 << 16


@dataclass(frozen=True)
class Metrics:
    """Error of a quantized tensor against its float reference (see the module docstring)."""

    count: int
    sqnr_db: float
    cosine: float
    mse: float
    max_abs_error: float
    rel_error: float

    def to_json(self) -> dict:
        return {
            "count": self.count,
            "sqnr_db": _finite(self.sqnr_db),
            "cosine": _finite(self.cosine),
            "mse": _finite(self.mse),
            "max_abs_error": _finite(self.max_abs_error),
            "rel_error": _finite(self.rel_error),
        }


def _finite(v: float) -> float | None:
    """JSON has no inf/nan: +inf SQNR (no error at all) and undefined values become null."""
    return float(v) if math.isfinite(v) else None


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """Σ a·b in float64 from float32 partial sums over chunks of `CHUNK` elements."""
    m = a.size - a.size % CHUNK
    total = 0.0
    if m:
        total = float(
            np.einsum("ij,ij->i", a[:m].reshape(-1, CHUNK), b[:m].reshape(-1, CHUNK)).sum(dtype=np.float64)
        )
    if m < a.size:
        total += float(np.dot(a[m:].astype(np.float64), b[m:].astype(np.float64)))
    return total


class ErrorAccumulator:
    """Streaming sums for `Metrics`; `update` once per batch, `result` at the end."""

    __slots__ = ("count", "max_abs", "see", "sxx", "sxy", "syy")

    def __init__(self) -> None:
        self.count = 0
        self.sxx = self.syy = self.sxy = self.see = 0.0
        self.max_abs = 0.0

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        """Add a batch: `x` the float reference, `y` the quantized values (same shape)."""
        x = np.ascontiguousarray(x, dtype=np.float32).ravel()
        y = np.ascontiguousarray(y, dtype=np.float32).ravel()
        if x.shape != y.shape:
            raise ValueError(f"shape mismatch: {x.size} float values vs {y.size} quantized values")
        if x.size == 0:
            return
        e = y - x
        sxx, sxe, see = _dot(x, x), _dot(x, e), _dot(e, e)
        self.count += int(x.size)
        self.sxx += sxx
        self.sxy += sxx + sxe  # Σxy = Σx² + Σxe
        self.syy += sxx + 2 * sxe + see  # Σy² = Σx² + 2Σxe + Σe²
        self.see += see
        self.max_abs = max(self.max_abs, float(e.max()), -float(e.min()))

    def merge(self, other: ErrorAccumulator) -> ErrorAccumulator:
        out = ErrorAccumulator()
        out.count = self.count + other.count
        out.sxx, out.syy = self.sxx + other.sxx, self.syy + other.syy
        out.sxy, out.see = self.sxy + other.sxy, self.see + other.see
        out.max_abs = max(self.max_abs, other.max_abs)
        return out

    def result(self) -> Metrics:
        n = self.count
        if n == 0:
            nan = float("nan")
            return Metrics(0, nan, nan, nan, nan, nan)
        if self.see == 0.0:
            sqnr = math.inf
        elif self.sxx == 0.0 or not self.sxx / self.see > 0.0:  # an infinite error: ratio 0 (or NaN)
            sqnr = -math.inf if not math.isnan(self.see) else math.nan
        else:
            sqnr = 10.0 * math.log10(self.sxx / self.see)
        denom = math.sqrt(self.sxx * self.syy)
        cosine = self.sxy / denom if denom > 0 else (1.0 if self.see == 0.0 else 0.0)
        rel = math.sqrt(self.see / self.sxx) if self.sxx > 0 else (0.0 if self.see == 0.0 else math.inf)
        return Metrics(
            count=n,
            sqnr_db=sqnr,
            cosine=min(1.0, max(-1.0, cosine)),
            mse=self.see / n,
            max_abs_error=self.max_abs,
            rel_error=rel,
        )


def compare(x: np.ndarray, y: np.ndarray) -> Metrics:
    """One-shot `Metrics` of `y` against the float reference `x`."""
    acc = ErrorAccumulator()
    acc.update(x, y)
    return acc.result()


class ClassAgreement:
    """Top-1 agreement of two classifiers' logits [N, C], and their accuracies when labels are given."""

    __slots__ = ("agree", "correct_float", "correct_quant", "count", "labelled")

    def __init__(self) -> None:
        self.count = self.agree = self.correct_float = self.correct_quant = self.labelled = 0

    def update(self, x: np.ndarray, y: np.ndarray, labels: np.ndarray | None = None) -> None:
        a, b = np.argmax(x, axis=-1), np.argmax(y, axis=-1)
        self.count += int(a.size)
        self.agree += int(np.count_nonzero(a == b))
        if labels is not None:
            labels = np.asarray(labels).reshape(a.shape)
            self.labelled += int(a.size)
            self.correct_float += int(np.count_nonzero(a == labels))
            self.correct_quant += int(np.count_nonzero(b == labels))

    @property
    def agreement(self) -> float | None:
        return self.agree / self.count if self.count else None

    @property
    def accuracy_float(self) -> float | None:
        return self.correct_float / self.labelled if self.labelled else None

    @property
    def accuracy_quant(self) -> float | None:
        return self.correct_quant / self.labelled if self.labelled else None


def is_classifier_output(shape: tuple) -> bool:
    """Classifier-like: rank 2, [N, C] with C ≥ 2 classes."""
    return len(shape) == 2 and isinstance(shape[1], int) and shape[1] >= 2


class CodeHistogram:
    """Histogram of integer codes (any integer dtype up to 16 bits), for entropy and clip fraction."""

    __slots__ = ("counts", "offset")

    def __init__(self, signed: bool, container_bits: int = 8) -> None:
        self.offset = (1 << (container_bits - 1)) if signed else 0
        self.counts = np.zeros(1 << container_bits, np.int64)

    def update(self, codes: np.ndarray) -> None:
        q = np.asarray(codes)
        if q.dtype == np.uint8:
            self.counts += _byte_histogram(q)[: self.counts.size]
        elif q.dtype == np.int8:
            c = _byte_histogram(q.view(np.uint8))  # 0..127 then −128..−1
            self.counts += np.concatenate([c[128:], c[:128]])
        else:
            idx = q.astype(np.int64).ravel() + self.offset
            self.counts += np.bincount(idx, minlength=self.counts.size)[: self.counts.size]

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def entropy(self) -> float:
        return code_entropy(self.counts)

    def clip_fraction(self, qmin: int, qmax: int, zero_point: int) -> float:
        """Share of values at an end of the code range [qmin, qmax] (saturated, or exactly at the range end).

        qmin does not count when it is the zero point: a range starting at 0 holds the zeros (e.g. after
        Relu) there.
        """
        n = self.total
        if n == 0:
            return 0.0
        at = int(self.counts[qmax + self.offset])
        if qmin != zero_point and qmin != qmax:
            at += int(self.counts[qmin + self.offset])
        return at / n


def _byte_histogram(q: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    """Counts of the 256 byte values of `q`: bytes are counted in pairs (as uint16, in cache-sized chunks) and
    the 256×256 pair histogram is folded, about twice as fast as bincount over single bytes."""
    flat = np.ascontiguousarray(q).reshape(-1)
    n = flat.size - flat.size % 2
    pairs = flat[:n].view(np.uint16)
    acc = np.zeros(1 << 16, np.int64)
    for start in range(0, pairs.size, chunk):
        acc += np.bincount(pairs[start : start + chunk], minlength=1 << 16)
    grid = acc.reshape(256, 256)
    out = grid.sum(axis=0) + grid.sum(axis=1)
    if n < flat.size:
        out[flat[-1]] += 1
    return out


def code_entropy(counts: np.ndarray) -> float:
    """Entropy in bits of a histogram of codes: −Σ p·log2 p over the non-empty bins."""
    c = np.asarray(counts, np.float64).ravel()
    c = c[c > 0]
    if c.size == 0:
        return 0.0
    p = c / c.sum()
    return float(max(0.0, -(p * np.log2(p)).sum()))
