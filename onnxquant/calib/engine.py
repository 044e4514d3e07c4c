"""Calibration engine: run the float model in ONNX Runtime batch by batch and stream statistics.

The tensors to calibrate are exposed as extra graph outputs (graph inputs are read from the feed) and one
ONNX Runtime session runs over the data once (pass 1: min, max, mean, σ and, for the histogram methods and the
Laplace b, the power-of-two-grid histograms) and a second time only where a per-channel Laplace b is asked for
or the histogram does not give b within `stats.MAD_TOLERANCE` (pass 2: Σ|x − mean| around the pass-1 mean; see
`onnxquant.calib.stats`). Memory is the model, two batches of activations (inference runs one batch ahead)
and the statistics, whatever the number of samples.

Sharding (same table as one run):
`merged = merge_stats(*[collect_stats(..., shard_i, first_pass_only=True)])`. When that leaves a pass 2 to do
(`channel_mad`, or `TensorStats.mad_needs_pass2` on the merged statistics), run it on each shard against the
merged pass 1, `s_i = collect_stats(..., shard_i, pass1=merged)`, and take `stats = merge_stats(*s_i)`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import reduce
from itertools import chain

import numpy as np
import onnx

from onnxquant.calib.histogram import Histogram
from onnxquant.calib.methods import METHODS, check_options
from onnxquant.calib.mse import range_error
from onnxquant.calib.segments import DEFAULT_BUDGET, SegmentedModel, model_inputs
from onnxquant.calib.stats import DEFAULT_BINS, HUGE, NonFiniteError, TensorStats, merge_all, update_pass2
from onnxquant.errors import BadDataError, BadModelError, BadRulesError, InternalError, OnnxQuantError
from onnxquant.model import graph_inputs
from onnxquant.progress import progress_iter
from onnxquant.tables import CalibrationTable, TensorRange

log = logging.getLogger(__name__)

Batch = Mapping[str, np.ndarray]


def collect_stats(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    data: Iterable[Batch],
    *,
    histograms: bool = True,
    moments: bool = False,
    per_channel: Sequence[str] = (),
    channel_mad: Sequence[str] = (),
    bins: int = DEFAULT_BINS,
    progress: bool = False,
    first_pass_only: bool = False,
    pass1: Mapping[str, TensorStats] | None = None,
    budget: int = DEFAULT_BUDGET,
) -> dict[str, TensorStats]:
    """Statistics of `tensors` over `data` ({input_name: array} batches; re-iterable when pass 2 runs).

    `histograms`: pass 1 also builds histograms of `bins` bins. `moments`: they keep per-bin sums as well, for
    the Laplace b, and a second pass adds Σ|x − mean| for any tensor whose b they do not give within
    MAD_TOLERANCE; `methods.collect_options(methods)` sets both. `per_channel`: tensors that also get
    per-channel (axis 1) min, max, mean and σ; `channel_mad`: tensors that also get the per-channel b, in a
    second pass. Sharding protocol: `first_pass_only` stops after pass 1 (step 1); `pass1`, the merged pass-1
    statistics of all shards, runs only the second pass, referenced to them (step 3; the shard's own pass-1
    values are recomputed on the way). `budget`: bytes of calibrated activations per model segment
    (`onnxquant.calib.segments`); two segments' worth are alive at a time.
    """
    tensors = list(dict.fromkeys(tensors))
    unusable: set[str] = set()
    if bins < 8:
        raise BadRulesError(f"bins={bins}: too few histogram bins; accepted: 8 or more (default 2048)")
    channels = set(per_channel) | set(channel_mad)
    unknown_pc = sorted(channels - set(tensors))
    if unknown_pc:
        raise InternalError(f"per-channel tensors not among the calibrated tensors: {', '.join(unknown_pc)}")
    inputs = [i.name for i in graph_inputs(model)]
    _check_tensor_names(model, tensors, inputs)
    runner = _SegmentRunner(model, [t for t in tensors if t not in inputs], budget)

    def fresh() -> dict[str, TensorStats]:
        return {
            t: TensorStats(histogram=Histogram.empty(bins, sums=moments) if histograms or moments else None)
            for t in tensors
        }

    def second_pass(reference: Mapping[str, TensorStats]) -> set[str]:
        return {t for t in tensors if t in channel_mad or (moments and reference[t].mad_needs_pass2)}

    if pass1 is None:
        stats = fresh()

        def pass1_update(name: str, x: np.ndarray) -> None:
            stats[name].update_pass1(x, name in channels)

        n1 = _run(runner, inputs, tensors, data, pass1_update, progress, "calibration pass 1", unusable)
        if n1 == 0:
            raise BadDataError("calibration data is empty; accepted: at least one sample")
        log.info("pass 1: %d samples, %d tensors", n1, len(tensors))
        tensors = _usable(tensors, unusable, stats)
        second = second_pass(stats)
        if not second or first_pass_only:
            return stats
        reference = stats
    else:
        missing = sorted(set(tensors) - set(pass1))
        if missing:
            raise BadDataError(f"pass-1 statistics lack tensors: {', '.join(missing[:10])}")
        reference = pass1
        second = second_pass(reference)

    if isinstance(data, Iterator):
        raise InternalError(
            "the second calibration pass needs re-iterable data (a list or a DataSource), "
            "got a one-shot iterator"
        )
    accs = {}
    for t in second:
        ref = reference[t]
        if t in channel_mad and not ref.per_channel:
            raise BadDataError(f"tensor {t}: pass-1 statistics have no per-channel values")
        accs[t] = ref.start_pass2()
        if t not in channel_mad:
            accs[t].ch_ref_mean = accs[t].ch_abs_dev = None
    # a shard recomputes its own pass-1 part (merged later); one run already has it from pass 1
    local = fresh() if pass1 is not None else None

    def pass2_update(name: str, x: np.ndarray) -> None:
        if local is not None:
            local[name].update_pass1(x, name in channels)
        if name in accs:
            update_pass2(accs[name], x)

    only = None if local is not None else set(accs)
    n2 = _run(
        runner, inputs, tensors, data, pass2_update, progress, "calibration pass 2", unusable, only=only
    )
    log.info("pass 2: %d samples, %d tensors", n2, len(second))
    for t in tensors:
        ref = reference[t]
        if local is None:
            if t in accs and accs[t].count != ref.count:
                raise BadDataError(
                    f"calibration data changed between passes ({ref.count} then "
                    f"{accs[t].count} values of tensor {t}); accepted: data that yields the "
                    "same batches every time"
                )
            ref.pass2 = accs.get(t)
            continue
        st = local[t]
        if st.count and (st.min < ref.min or st.max > ref.max):
            raise BadDataError(
                f"tensor {t}: values [{st.min:g}, {st.max:g}] exceed the pass-1 range "
                f"[{ref.min:g}, {ref.max:g}]; pass 1 must cover every shard"
            )
        st.pass2 = accs.get(t)
    return local if local is not None else reference


def _usable(tensors: list[str], unusable: set[str], stats: dict[str, TensorStats]) -> list[str]:
    """Drop tensors no range can represent (NaN/Inf, or |x| ≥ HUGE: masks of −inf or −3.4e38): they stay in
    float, with a warning naming them."""
    for t in sorted(unusable & set(tensors)):
        log.warning("tensor %s: holds NaN, Inf or magnitudes of 1e30 or more (a mask?): left in float", t)
        stats.pop(t, None)
    return [t for t in tensors if t not in unusable]


def merge_stats(*parts: Mapping[str, TensorStats]) -> dict[str, TensorStats]:
    """Statistics of the union of the parts' data sets (sharding; see the module docstring)."""
    if not parts:
        raise InternalError("merge_stats needs at least one statistics set")
    return reduce(merge_all, [dict(p) for p in parts])


def compute_table(
    stats: Mapping[str, TensorStats],
    specs: Mapping[str, tuple],
    method: str,
    *,
    per_channel: Sequence[str] = (),
    **options,
) -> CalibrationTable:
    """A table for `specs` (tensor -> (bits, symmetric)) by `method` with its options (e.g. percentile=99.99).

    Symmetric entries get signed codes and zero point 0, others unsigned codes with a zero point. Tensors in
    `per_channel` get per-channel (axis 1) ranges; their bits may be an int or one int per channel.
    """
    opts = check_options(method, options)  # refuses an unknown method or option before any work
    fn = METHODS[method].fn
    missing = sorted(set(specs) - set(stats))
    if missing:
        raise BadDataError(f"no statistics for {len(missing)} tensors: {', '.join(missing[:10])}")
    channels = set(per_channel)

    def entry(name: str) -> TensorRange:
        bits, symmetric = specs[name]
        pc = name in channels
        bits = np.asarray(bits, np.int64) if pc else int(bits)
        try:
            lo, hi = fn(stats[name], bits, bool(symmetric), per_channel=pc, **opts)
        except OnnxQuantError as exc:
            raise type(exc)(f"tensor {name}: {exc}") from exc
        clip_note = None
        if not pc and method != "minmax" and stats[name].has_hist and stats[name].count:
            lo, hi, clip_note = _no_worse_than_full_range(stats[name], float(lo), float(hi), bits, symmetric)
        lo, hi, note = nonzero_range(np.asarray(lo, np.float64), np.asarray(hi, np.float64), symmetric)
        out = TensorRange.from_range(lo, hi, bits, bool(symmetric), method, axis=1 if pc else None)
        if note:
            log.warning("tensor %s: %s", name, note)
        if clip_note:
            log.info("tensor %s: %s", name, clip_note)
        note = "; ".join(n for n in (clip_note, note) if n)
        return out.with_note(note) if note else out

    names = sorted(specs)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # the searches release the GIL
        entries = dict(zip(names, pool.map(entry, names)))
    table_bits = max((int(np.max(specs[n][0])) for n in names), default=0)
    return CalibrationTable(method=method, bits=table_bits or 8, tensors=entries)


def _no_worse_than_full_range(
    st: TensorStats, lo: float, hi: float, bits: int, symmetric: bool
) -> tuple[float, float, str | None]:
    """The clipping range, or the full [min, max] when clipping would add quantization error on the tensor's
    own histogram (`range_error`): a clip is meant to trade outlier error for finer steps, and one that loses
    that trade (a softmax- or sigmoid-like tensor whose few large values carry the signal) is a defect."""
    if (lo, hi) == (st.min, st.max):
        return lo, hi, None
    clipped, full = range_error(st, lo, hi, bits, symmetric), range_error(st, st.min, st.max, bits, symmetric)
    if clipped <= full:
        return lo, hi, None
    ratio = clipped / full
    return (
        st.min,
        st.max,
        f"{ratio:.3g}x the full range's error when clipped to [{lo:.4g}, {hi:.4g}]: not clipped",
    )


def nonzero_range(
    lo: np.ndarray, hi: np.ndarray, symmetric: bool
) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Give all-zero (constant 0) ranges the range [-1, 1] (or [0, 1] unsigned) so the scale is valid."""
    zero = (np.minimum(lo, 0) == 0) & (np.maximum(hi, 0) == 0)
    if not zero.any():
        return lo, hi, None
    hi = np.where(zero, 1.0, hi)
    lo = np.where(zero, -1.0 if symmetric else 0.0, lo)
    what = "the tensor" if zero.ndim == 0 else f"{int(zero.sum())} channel(s)"
    return (
        lo,
        hi,
        (f"{what} is constant 0 (zero range): range set to [{float(lo.min()):g}, 1] for a valid scale"),
    )


def _check_tensor_names(model: onnx.ModelProto, tensors: Sequence[str], inputs: Sequence[str]) -> None:
    produced = set(inputs)
    for node in model.graph.node:
        produced.update(o for o in node.output if o)
    unknown = [t for t in tensors if t not in produced]
    if unknown:
        raise BadModelError(
            f"tensors not produced by the model: {', '.join(unknown[:10])}"
            + (f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else "")
        )


class _SegmentRunner:
    """The model's segments, built at the first batch (their sizes are estimated at its shape)."""

    def __init__(self, model: onnx.ModelProto, fetch: Sequence[str], budget: int) -> None:
        self.model, self.fetch, self.budget = model, list(fetch), budget
        self.segments: SegmentedModel | None = None

    def __call__(self, feed: Batch, only: set[str] | None) -> Iterator[dict[str, np.ndarray]]:
        if not self.fetch:
            return iter(())
        if self.segments is None:
            self.segments = SegmentedModel(self.model, self.fetch, feed, self.budget)
        return self.segments.run(feed, only)


def _run(
    runner: _SegmentRunner,
    inputs: Sequence[str],
    tensors: Sequence[str],
    data: Iterable[Batch],
    update,
    progress: bool,
    label: str,
    unusable: set[str],
    only: set[str] | None = None,
) -> int:
    """Run the model's segments on each batch and call update(name, array) per tensor; returns the samples
    seen. `only`: the tensors wanted (None: all); segments past the last one computing them do not run.

    One worker thread reads the next batch while another runs the next segment, both releasing the GIL,
    while this thread computes the statistics of the current segment's tensors.
    """
    wanted = set(tensors)
    samples = 0
    batches = iter(progress_iter(data, progress, label))
    with ThreadPoolExecutor(max_workers=1) as reader, ThreadPoolExecutor(max_workers=1) as worker:
        ahead = reader.submit(next, batches, None)
        while (batch := ahead.result()) is not None:
            ahead = reader.submit(next, batches, None)
            feed = model_inputs(batch, inputs, "calibration batch")
            own = {i: np.asarray(v) for i, v in feed.items() if i in wanted}
            for outs in chain([own], _prefetched(worker, runner(feed, only))):
                _update(feed, outs, wanted, update, samples, unusable)
            samples += _samples(feed)
    return samples


def stream_tensors(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    data: Iterable[Batch],
    update,
    *,
    label: str,
    progress: bool = False,
    budget: int = DEFAULT_BUDGET,
    unusable: set[str] | None = None,
) -> int:
    """One streaming pass of `model`'s segments over `data`, calling update(name, array) for each of
    `tensors` (graph inputs included) per batch; returns the samples seen. A tensor whose `update` raises
    NonFiniteError joins `unusable` and is not fed again. For the stages that need one pass of their own
    statistics (GPTQ's Hessians, SmoothQuant's channel maxima, the bias probe)."""
    inputs = [i.name for i in graph_inputs(model)]
    runner = _SegmentRunner(model, [t for t in tensors if t not in inputs], budget)
    return _run(
        runner, inputs, tensors, data, update, progress, label, set() if unusable is None else unusable
    )


def _prefetched(worker: ThreadPoolExecutor, items: Iterator) -> Iterator:
    """`items`, each computed by `worker` while the caller works on the previous one."""
    ahead = worker.submit(next, items, None)
    while (item := ahead.result()) is not None:
        ahead = worker.submit(next, items, None)
        yield item


def _samples(feed: Batch) -> int:
    x0 = np.asarray(next(iter(feed.values()))) if feed else None
    return int(x0.shape[0]) if x0 is not None and x0.ndim else 1


def _update(
    feed: Batch, outs: Mapping[str, np.ndarray], wanted: set[str], update, first: int, unusable: set[str]
) -> None:
    """Feed one batch's tensors to `update`. NaN or Inf in the data is the data's fault (one line); in an
    intermediate tensor (an attention mask's −inf) the tensor joins `unusable` and is not fed again."""
    for name, x in outs.items():
        if name not in wanted or name in unusable:
            continue
        x = np.asarray(x)
        if x.dtype.kind != "f":
            raise BadModelError(f"tensor {name} has dtype {x.dtype}; accepted: float tensors only")
        try:
            update(name, x)
        except NonFiniteError:
            if name in feed:
                _reject_nonfinite(name, x, first)
            unusable.add(name)


def _reject_nonfinite(name: str, x: np.ndarray, first_sample: int) -> None:
    bad = np.argwhere(~(np.abs(x) < HUGE))[0]
    sample = first_sample + (int(bad[0]) if x.ndim else 0)
    raise BadDataError(
        f"tensor {name}: NaN or Inf at sample {sample}; accepted: finite data of magnitude below 1e30"
    )
