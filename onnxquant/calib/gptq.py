"""GPTQ weight rounding (Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers"; the Optimal Brain Quantization lineage).

A layer computes y = W x with W of shape (outputs, K). Rounding W to Ŵ on a fixed grid (the table's scales
and zero points) adds the output error E‖(W − Ŵ) x‖² = tr((W − Ŵ) H (W − Ŵ)ᵀ) / 2 with H = 2·E[x xᵀ], the
Hessian of that squared error, estimated from the layer's calibration inputs X (rows = samples × output
positions, columns = the K inputs of one output; a Conv's rows are its im2col patches, Cin·kh·kw columns in
the weight's (c, i, j) order). Every output row has the same H, so all rows are rounded together, column by
column: rounding column j leaves the error e = (w_j − ŵ_j) / U_jj, and the columns not yet rounded absorb
it, w_{j+1:} −= e · U_{j, j+1:}, where U is the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU). That is OBQ's
optimal update of the remaining weights after fixing one, with the inverse Hessian of the remaining columns
read off U's rows instead of being downdated. Updates are applied lazily: within a block of B columns
column by column, and to the columns after the block as one matrix product (the same result, fewer memory
passes). H is damped by `damp`·mean(diag H) on its diagonal; inputs that are always zero (diag 0) get
diagonal 1 and their weights 0. With `act_order`, columns are rounded in the order of decreasing diag(H) (the
inputs with the most energy first, while the most columns remain to absorb their error) and permuted back.

H is taken on the float model's inputs (`calib.hessian`: one streaming pass for all layers), not on the
already quantized layers before it, and activation quantization is not simulated. A layer with fewer
calibration rows than inputs (a Dense layer seeing one row per sample) keeps round-to-nearest: its H is
singular, and GPTQ would move the rounding error into directions the calibration set never excites but
other inputs do (measured on a real byte classifier, 512 inputs and 32 samples: 27.8 dB held-out output
SQNR with round-to-nearest, 24.6 dB with GPTQ there).

A grouped Conv (group = G, depthwise included) is G independent layers: the Cout/G output rows of group g
read only their group's K_g = Cin/G·kh·kw inputs, so tr((W − Ŵ) H (W − Ŵ)ᵀ) is the sum over groups of
tr((W_g − Ŵ_g) H_g (W_g − Ŵ_g)ᵀ), and each group's rows are rounded against its own H_g (a (G, K_g, K_g)
stack). The groups run side by side: one batched Cholesky and triangular inverse for all G, then the same
column loop over K_g columns on (G, Cout/G) slices, so a depthwise 5x5 Conv costs 25 small vector steps
whatever its channel count.

A depthwise Conv whose input is equalized (`QuantPlan.equalized`: `depthwise_inputs: per_channel`, which
the default preset plans for its depthwise Convs) needs nothing more: Q/DQ insertion stores the codes of the
weight *as given* on the table's grid and only divides the DequantizeLinear scale of output channel c by
k_c, while the Conv reads x_c·k_c, so the layer computes Σ (q − z)·s/k_c · k_c·x̂_c = Σ (q − z)·s·x̂_c, the
same codes and products as without equalization. (Rounding the equalized weights W·k against the Hessian
of x·k instead would give the same codes too: a depthwise group's H_g is one channel's, scaled by k_c², and
GPTQ does not change when H is scaled, its damping being relative to the mean diagonal.)

`apply_gptq` writes each processed weight as its dequantized codes, (q − z)·s in the weight's own layout and
dtype, so that `insert_qdq`'s round-to-nearest on the same table entry reproduces the GPTQ codes exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxquant.calib.hessian import HESSIAN_BUDGET, Layer, collect_hessians, describe_layer
from onnxquant.errors import InternalError
from onnxquant.ir import name_nodes
from onnxquant.passes.plan import QuantPlan
from onnxquant.tables import CalibrationTable, TensorRange

log = logging.getLogger(__name__)

CHOLESKY_TRIES = 4  # each retry damps H ten times more
TRIANGLE_LEAF = 256  # triangular inverses below this size go to LAPACK in one piece


@dataclass(frozen=True)
class GptqResult:
    """One layer's tr((W − Ŵ) H (W − Ŵ)ᵀ) for round-to-nearest and for GPTQ on the same grid, or why it was
    skipped."""

    node: str
    weight: str | None
    rtn_error: float | None = None
    gptq_error: float | None = None
    skipped: str | None = None

    @property
    def gain(self) -> float | None:
        """How many times smaller GPTQ's error proxy is than round-to-nearest's."""
        if self.rtn_error is None or not self.gptq_error:
            return None
        return self.rtn_error / self.gptq_error


def _per_row(value, rows: int, dtype) -> np.ndarray:
    value = np.asarray(value).astype(dtype).ravel()
    if value.size not in (1, rows):
        raise InternalError(f"{value.size} quantization parameters for {rows} output rows")
    return np.broadcast_to(value, (rows,)).copy()


def _lower_inverse(lower: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular matrix (or a stack of them, (..., n, n)) by halves,
    [[A, 0], [C, D]]⁻¹ = [[A⁻¹, 0], [−D⁻¹CA⁻¹, D⁻¹]]: matrix products instead of a general LU inverse (3-4×
    faster at K in the thousands)."""
    n = lower.shape[-1]
    if n <= TRIANGLE_LEAF:
        return np.linalg.inv(lower)
    half = n // 2
    a_inv = _lower_inverse(lower[..., :half, :half])
    d_inv = _lower_inverse(lower[..., half:, half:])
    out = np.zeros_like(lower)
    out[..., :half, :half], out[..., half:, half:] = a_inv, d_inv
    out[..., half:, :half] = -d_inv @ (lower[..., half:, :half] @ a_inv)
    return out


def _damped_inverse_factor(stack: np.ndarray, factor: float) -> np.ndarray:
    """U of every H in `stack` (n, K, K), each damped by `factor`·its own mean diagonal; raises
    LinAlgError when any damped H is not positive definite."""
    k = stack.shape[-1]
    damped = stack[:, ::-1, ::-1].copy()  # reversed (J H J): its diagonal is H's, reversed
    damped[:, np.arange(k), np.arange(k)] += (
        factor * np.mean(np.diagonal(stack, axis1=1, axis2=2), axis=1)[:, None]
    )
    lower = np.linalg.cholesky(damped)
    del damped
    return np.ascontiguousarray(_lower_inverse(lower)[:, ::-1, ::-1])


def _retried_inverse_factor(h: np.ndarray, damp: float) -> np.ndarray:
    """U of one H (1, K, K), damping ten times more while H + λI is not positive definite."""
    for attempt in range(CHOLESKY_TRIES):
        try:
            return _damped_inverse_factor(h, damp * 10.0**attempt)
        except np.linalg.LinAlgError:
            log.info("GPTQ: H + %g·mean(diag)·I is not positive definite; damping more", damp * 10.0**attempt)
    raise InternalError(
        f"GPTQ: the Hessian stays singular with damping {damp * 10.0 ** (CHOLESKY_TRIES - 1)}"
    )


def inverse_cholesky_upper(h: np.ndarray, damp: float) -> np.ndarray:
    """U, upper triangular with UᵀU = (H + λI)⁻¹ and λ = damp·mean(diag H) (grown tenfold while H + λI is not
    positive definite). With J the reversal, J(H + λI)J = LLᵀ gives H + λI = RRᵀ for the upper R = JLJ, so
    (H + λI)⁻¹ = R⁻ᵀR⁻¹ and U = R⁻¹ = J L⁻¹ J: one Cholesky and one triangular inverse. `h` is (K, K) or a
    stack (G, K, K), each factored on its own (all at once; one by one only when some need more damping)."""
    stack = np.asarray(h, np.float64).reshape(-1, *np.shape(h)[-2:])
    try:
        u = _damped_inverse_factor(stack, damp)
    except np.linalg.LinAlgError:
        u = np.concatenate([_retried_inverse_factor(one[None], damp) for one in stack])
    return u.reshape(np.shape(h))


def gptq_codes(
    w: np.ndarray,
    h: np.ndarray,
    scale,
    zero_point,
    qmin,
    qmax,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = True,
) -> np.ndarray:
    """Integer codes (int64, shape of `w`) of `w` (outputs, K) rounded by GPTQ against the Hessian `h`:
    (K, K), or (G, K, K) for a grouped layer whose output rows split into G equal consecutive parts, part g
    rounded against h[g] (a grouped Conv, K = K_g).

    `scale`, `zero_point`, `qmin`, `qmax`: scalars (per tensor) or one per output row (per channel); the
    dequantized weights are (q − z)·s. See the module docstring for the algorithm."""
    w = np.asarray(w, np.float64)
    h = _hessian_stack(h, w.shape)
    groups, k = len(h), w.shape[1]
    per = w.shape[0] // groups
    grid = tuple(v.reshape(groups, per) for v in _grid(w.shape[0], scale, zero_point, qmin, qmax))
    diagonal = np.diagonal(h, axis1=1, axis2=2)
    dead = diagonal == 0  # (G, K): inputs that are always zero
    if act_order:
        perm = np.argsort(-np.where(dead, 1.0, diagonal), axis=1, kind="stable")
    else:
        perm = np.broadcast_to(np.arange(k), (groups, k))
    # (G, K, rows per group): one weight column of each group per contiguous row, in rounding order
    columns = np.take_along_axis(w.reshape(groups, per, k).transpose(0, 2, 1), perm[:, :, None], axis=1)
    dead = np.take_along_axis(dead, perm, axis=1)
    columns[dead] = 0.0
    h = h[np.arange(groups)[:, None, None], perm[:, :, None], perm[:, None, :]]  # permuted: a new array
    at_group, at_column = np.nonzero(dead)
    h[at_group, at_column, at_column] = 1.0
    u = inverse_cholesky_upper(h, damp)
    del h
    codes = np.empty((groups, k, per), np.int64)
    step = max(1, block)
    for start in range(0, k, step):
        end = min(start + step, k)
        err = _round_block(columns, u, codes, start, end, grid)
        columns[:, end:] -= u[:, start:end, end:].transpose(0, 2, 1) @ err
    out = np.empty_like(codes)
    np.put_along_axis(out, perm[:, :, None], codes, axis=1)
    return out.transpose(0, 2, 1).reshape(w.shape)


def _hessian_stack(h, w_shape: tuple[int, ...]) -> np.ndarray:
    """`h` as a float64 (G, K, K) stack (not copied; `gptq_codes` only reads it), checked against a weight of
    `w_shape` (rows, K)."""
    h = np.asarray(h, np.float64)
    h = h[None] if h.ndim == 2 else h
    rows, k = w_shape
    if h.ndim != 3 or h.shape[1:] != (k, k) or rows % len(h):
        raise InternalError(f"GPTQ: Hessian of shape {h.shape} for a weight of shape {w_shape}")
    return h


def _grid(rows: int, scale, zero_point, qmin, qmax) -> tuple[np.ndarray, ...]:
    """Scale (float64) and zero point, qmin, qmax (int64), one of each per output row."""
    return (_per_row(scale, rows, np.float64),) + tuple(
        _per_row(v, rows, np.int64) for v in (zero_point, qmin, qmax)
    )


def _round_block(columns: np.ndarray, u: np.ndarray, codes: np.ndarray, start: int, end: int, grid):
    """Round weight columns start..end-1 (axis 1 of `columns`, every group at once) one by one into `codes`,
    spreading each one's scaled error over the block's later columns; returns the scaled errors
    (G, end − start, rows per group)."""
    s, z, lo, hi = grid
    err = np.empty((columns.shape[0], end - start, columns.shape[2]))
    for j in range(start, end):
        q = np.clip(np.rint(columns[:, j] / s) + z, lo, hi).astype(np.int64)
        codes[:, j] = q
        e = (columns[:, j] - (q - z) * s) / u[:, j, j, None]
        columns[:, j + 1 : end] -= u[:, j, j + 1 : end, None] * e[:, None, :]
        err[:, j - start] = e
    return err


def error_proxy(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ): with H = 2·XᵀX/rows, twice the mean over rows of ‖(W − Ŵ) x‖². With a stack
    `h` (G, K, K), the sum over the G consecutive parts of the rows of each part's proxy on h[g]."""
    diff = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    h = np.asarray(h, np.float64)
    h = h[None] if h.ndim == 2 else h
    diff = diff.reshape(len(h), -1, diff.shape[1])
    return float(np.sum((diff @ h) * diff))


def _weight_matrix(w: np.ndarray, layer: Layer) -> np.ndarray:
    """The (outputs, K) view of a weight in its stored layout."""
    return w.T if layer.k_first else w.reshape(w.shape[0], -1)


def _stored_layout(w2d: np.ndarray, layer: Layer, shape: tuple[int, ...]) -> np.ndarray:
    return np.ascontiguousarray(w2d.T if layer.k_first else w2d.reshape(shape))


def round_layer(
    w: np.ndarray, layer: Layer, entry: TensorRange, h: np.ndarray, **options
) -> tuple[np.ndarray, GptqResult]:
    """`w` replaced by its GPTQ codes dequantized on `entry`'s grid (same layout and dtype), and the error
    proxies of round-to-nearest and GPTQ. `options`: damp, block, act_order of `gptq_codes`."""
    params = entry.qparams()
    w2d = _weight_matrix(np.asarray(w), layer).astype(np.float64)
    rows = w2d.shape[0]
    s32 = _per_row(params.scale, rows, np.float32)
    z, lo, hi = (_per_row(v, rows, np.int64) for v in (params.zero_point, params.qmin, params.qmax))
    codes = gptq_codes(w2d, h, s32, z, lo, hi, **options)
    nearest = np.clip(
        np.rint(w2d.astype(np.float32) / s32[:, None]).astype(np.int64) + z[:, None], lo[:, None], hi[:, None]
    )
    scale = s32.astype(np.float64)[:, None]
    dequantized = (codes - z[:, None]) * scale  # exact in float64; one rounding to the stored dtype
    result = GptqResult(
        layer.node,
        layer.weight,
        rtn_error=error_proxy(w2d, (nearest - z[:, None]) * scale, h),
        gptq_error=error_proxy(w2d, dequantized, h),
    )
    return _stored_layout(dequantized.astype(np.asarray(w).dtype), layer, np.shape(w)), result


@dataclass
class _Candidates:
    layers: list[Layer] = field(default_factory=list)
    skipped: list[GptqResult] = field(default_factory=list)


def _named_nodes(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Copies of the graph's nodes under the names the plan knows them by (`ir.name_nodes`, as
    `ir.import_graph` names an unnamed or duplicate-named node)."""
    nodes = onnx.GraphProto(node=graph.node)
    name_nodes(nodes)
    return {n.name: n for n in nodes.node}


def _candidates(
    model: onnx.ModelProto, plan: QuantPlan, table: CalibrationTable, nodes: Collection[str] | None
) -> _Candidates:
    """The quantized layers GPTQ can round, and a reason for each requested one it cannot."""
    by_name = _named_nodes(model.graph)
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    found = _Candidates()
    for d in plan.nodes:
        if not d.quantize or d.weight is None or (nodes is not None and d.name not in nodes):
            continue
        entry = table.tensors.get(d.weight)
        layer = describe_layer(by_name[d.name], shapes[d.weight]) if d.weight in shapes else None
        reason = _refusal(d.weight, entry, layer, readers)
        if reason is None and isinstance(layer, Layer):
            found.layers.append(layer)
        else:
            found.skipped.append(GptqResult(d.name, d.weight, skipped=reason or str(layer)))
    return found


def _refusal(weight, entry, layer, readers) -> str | None:
    if layer is None:
        return f"weight {weight!r} is not an initializer"
    if isinstance(layer, str):
        return layer
    if entry is None or entry.kind != "weight":
        return f"weight {weight!r} has no weight entry in the calibration table"
    if entry.bias_shift is not None or entry.spread_ratio is not None:
        return "bias-corrected weight entry (its bias shift assumes round-to-nearest codes)"
    if readers.get(weight, 0) != 1:
        return f"weight {weight!r} is shared by {readers[weight]} inputs (one Hessian per weight)"
    if entry.axis is not None and entry.axis != (1 if layer.k_first else 0):
        return f"weight entry on axis {entry.axis}, not the output-channel axis"
    return None


def apply_gptq(
    model: onnx.ModelProto,
    plan: QuantPlan,
    table: CalibrationTable,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    nodes: Collection[str] | None = None,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = True,
    budget: int = HESSIAN_BUDGET,
    progress: bool = False,
) -> tuple[onnx.ModelProto, list[GptqResult]]:
    """A copy of `model` (the folded float model `plan` and `table` were made for) whose quantized Conv/Gemm/
    MatMul weights are GPTQ-rounded on the table's grid and stored dequantized, and one result per layer
    (plan order): the error proxies, or why it was skipped. `nodes`: the node names to round (None: all).
    `batches` must be re-iterable when the Hessians need more than one pass (`budget`)."""
    found = _candidates(model, plan, table, nodes)
    hessians = (
        collect_hessians(model, found.layers, batches, budget=budget, progress=progress)
        if found.layers
        else {}
    )
    out = onnx.ModelProto()
    out.CopyFrom(model)
    index = {t.name: i for i, t in enumerate(out.graph.initializer)}
    results = list(found.skipped)
    for layer in found.layers:
        stats = hessians.pop(layer.node, None)  # each layer's sums are freed once it is rounded
        if stats is None or stats.rows == 0:
            results.append(GptqResult(layer.node, layer.weight, skipped="no usable calibration rows"))
            continue
        if stats.rows < layer.view.k:
            reason = (
                f"{stats.rows} calibration rows for {layer.view.k} inputs: a Hessian of lower rank than its "
                "size fits the calibration set, not the data (more samples help)"
            )
            results.append(GptqResult(layer.node, layer.weight, skipped=reason))
            continue
        slot = out.graph.initializer[index[layer.weight]]
        w = numpy_helper.to_array(slot)
        rounded, result = round_layer(
            w,
            layer,
            table.tensors[layer.weight],
            stats.hessian(),
            damp=damp,
            block=block,
            act_order=act_order,
        )
        slot.CopyFrom(numpy_helper.from_array(rounded, layer.weight))
        results.append(result)
        log.info(
            "GPTQ %s: error proxy %.4g -> %.4g (round-to-nearest -> GPTQ)",
            layer.node,
            result.rtn_error,
            result.gptq_error,
        )
    order = {d.name: i for i, d in enumerate(plan.nodes)}
    return out, sorted(results, key=lambda r: order[r.node])
