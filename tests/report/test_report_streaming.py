"""The report's comparison runs both models in segments: the same sums whatever the segment size, and the
output SQNR that a plain ONNX Runtime run of both models gives."""

from __future__ import annotations

import numpy as np
from report_models import digits_converted, digits_data

from onnxquant.model import make_session
from onnxquant.report.compare import accumulate
from onnxquant.report.qdq import analyze


def _sums(acc) -> dict:
    groups = {"o": acc.outputs, "t": acc.tensors, "l": acc.layers}
    return {f"{g}:{k}": a.result() for g, accs in groups.items() for k, a in accs.items()}


def test_segment_size_does_not_change_the_comparison():
    r = digits_converted(4, 4)
    graph = analyze(r.model, r.float_model)
    data = list(digits_data("eval"))[:3]
    one_tensor_at_a_time = accumulate(r.float_model, r.model, graph, data, subset=70, budget=1)
    all_at_once = accumulate(r.float_model, r.model, graph, data, subset=70, budget=2**40)
    assert _sums(one_tensor_at_a_time) == _sums(all_at_once)
    for name, hist in all_at_once.codes.items():
        np.testing.assert_array_equal(one_tensor_at_a_time.codes[name].counts, hist.counts)
    assert [len(f["input"]) for f, _ in one_tensor_at_a_time.subset] == [64, 6]
    x = np.concatenate([b["input"] for b in data])
    ref = make_session(r.float_model).run(None, {"input": x})[0]
    out = make_session(r.model).run(None, {"input": x})[0]
    sqnr = 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - out).astype(np.float64) ** 2))
    assert abs(one_tensor_at_a_time.outputs["logits"].result().sqnr_db - sqnr) < 1e-3
