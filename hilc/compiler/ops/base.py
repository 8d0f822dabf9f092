"""The operator registry.

Each operator family lives in one module of this package and registers:

* an ``Op`` subclass (under its IR name) holding everything about the operator: its shape
  rule, float kernel (for calibration and importer checks), quantization rule, integer
  simulator kernel and cost (MACs), its lowerings (``lower_c``, ``lower_tvm``, ``lower_hls``)
  and, where it is differentiable, a float forward/backward pair (``float_forward``,
  ``float_backward``: fine-tuning in ``qat`` and data-free calibration in ``ptq`` run on them);
* ONNX importer functions (under ONNX op types) that turn an ONNX node into IR nodes.

Adding an operator means adding one module and its test, never a chain of ``if op == ...``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from hilc.compiler import arith
from hilc.compiler.ir import Graph, Node, QParams

if TYPE_CHECKING:
    from hilc.compiler.onnx_import import ImportContext
    from hilc.targets.hls.codegen import HlsContext

OPS: dict[str, Op] = {}
ONNX_IMPORTERS: dict[str, Callable[[ImportContext, object], None]] = {}


class Op:
    """Base class: an IR operator. Subclasses override what differs."""

    name: ClassVar[str] = ""
    # How the output's quantization is chosen: "calibrated" (from calibration ranges),
    # "input" (same as the first input: the op only moves or selects values) or "fixed"
    # (``fixed_output_quant`` gives it, e.g. sigmoid's [0, 1]).
    output_quant_rule: ClassVar[str] = "calibrated"
    # Whether a QDQ model's scale for the output may replace the rule (softmax's kernel
    # produces only its own fixed scale, so it says no).
    output_hint_ok: ClassVar[bool] = True
    # Whether the output may be written over the first input's buffer (the memory planner's
    # in-place rule: element i of the output depends only on element i of that input).
    inplace_ok: ClassVar[bool] = False

    def output_rule(self, node: Node) -> str:
        return self.output_quant_rule

    def infer_shapes(self, node: Node, in_shapes: list[tuple[int, ...]], graph: Graph) -> list[tuple[int, ...]]:
        return [in_shapes[0]]

    def eval_float(self, node: Node, graph: Graph, xs: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError(self.name)

    def fixed_output_quant(self, node: Node, graph: Graph) -> QParams:
        raise NotImplementedError(self.name)

    def quantize(self, node: Node, graph: Graph) -> None:
        """Replace float params by integer ones. Input and output ``QParams`` are already set."""

    def eval_int(self, node: Node, graph: Graph, xs: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError(self.name)

    def macs(self, node: Node, graph: Graph) -> int:
        return 0

    def weight_count(self, node: Node, graph: Graph) -> int:
        return int(graph.param(node, "weight").size) if "weight" in node.params else 0

    # --- differentiation (hilc.compiler.qat's fine-tuning, ptq's data-free calibration) ---------

    def float_forward(self, node: Node, graph: Graph, xs: list[np.ndarray],
                      params: dict[str, np.ndarray]) -> tuple[list[np.ndarray], Any]:
        """The float outputs *before* the fused activation (``float_activation`` applies it; the
        caller keeps the pre-activation), computed in the inputs' dtype (float64 for gradient
        checks), and what ``float_backward`` needs. ``params``: the node's parameters by name as
        the caller wants them used (e.g. fake-quantized weights), ``float_params`` for the graph's."""
        raise NotImplementedError(self.name)

    def float_backward(self, node: Node, cache: Any, dys: list[np.ndarray],
                       param_grads: bool = True) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        """Gradients of the inputs (one per input, in order) and, with ``param_grads``, of the
        parameters by name, from the gradients ``dys`` of the pre-activation outputs."""
        raise NotImplementedError(self.name)

    def differentiable(self, node: Node) -> bool:
        """Whether ``float_forward``/``float_backward`` cover this node (operators that define
        a backward; a subclass narrows it for attributes its backward does not handle)."""
        return type(self).float_backward is not Op.float_backward

    def lower_hls(self, node: Node, graph: Graph, ctx: HlsContext) -> dict:
        """The config of this node's HLS layer function (templates/layers.j2 of hilc/targets/hls);
        ``ctx`` declares its ROMs. Operators the HLS backend lowers override it (helpers in
        hilc/targets/hls/lower.py); the others refuse with one line naming the node."""
        from hilc.targets.hls.lower import cannot, lowered_ops

        raise cannot(node, f"no HLS lowering for operator '{node.op}' (lowered: {', '.join(lowered_ops())})")


def register(cls: type[Op]) -> type[Op]:
    OPS[cls.name] = cls()
    return cls


def onnx_importer(*op_types: str) -> Callable:
    def deco(fn: Callable) -> Callable:
        for t in op_types:
            ONNX_IMPORTERS[t] = fn
        return fn

    return deco


def bitops(macs: int, in_bits: int, weight_bits: int | None = None) -> int:
    """BitOps (HAWQ-V3) of ``macs`` MACs: weight bits x input activation bits; a weightless op
    (``weight_bits`` None) counts its input width twice (an activation x activation product or a
    compare). The one rule behind report.json, the bit allocation (hilc.compiler.mixed) and the
    patch-branch search (hilc.compiler.patch_precision); ``bitops(macs, 8)`` is the all-int8 figure."""
    return int(macs) * int(weight_bits or in_bits) * int(in_bits)


def node_weight_bits(node: Node) -> int | None:
    """The width of a node's weights (None: no weights, or not yet given one)."""
    return node.attrs.get("weight_bits") if "weight" in node.params else None


def node_bitops(node: Node, graph: Graph, macs: int | None = None, in_bits: int | None = None) -> int:
    """BitOps of ``node`` (of ``macs`` of its MACs, default all of them, e.g. one patch's window)
    with its input at ``in_bits`` (default: the input's quantized width, 32 when unquantized)."""
    if macs is None:
        macs = OPS[node.op].macs(node, graph)
    if in_bits is None:
        q = graph.tensors[node.inputs[0]].quant
        in_bits = q.bits if q else 32
    return bitops(macs, in_bits, node_weight_bits(node))


def axis_split(shape: tuple[int, ...] | list[int], axis: int) -> tuple[int, int]:
    """(outer, inner) element counts around ``axis`` of a batched NHWC-order shape (batch left out),
    as the C and HLS kernels that walk one axis (softmax, mean, concat, gather) take them."""
    return int(np.prod(shape[1:axis], dtype=np.int64)), int(np.prod(shape[axis + 1:], dtype=np.int64))


def axis_walk(shape: tuple[int, ...] | list[int], axis: int) -> dict[str, int]:
    """``axis_split`` plus the axis length: the outer/len/inner fields of the kernels that reduce
    along one axis (softmax, mean, gather's select)."""
    outer, inner = axis_split(shape, axis)
    return {"outer": outer, "len": int(shape[axis]), "inner": inner}


def in_quant(graph: Graph, node: Node, i: int = 0) -> QParams:
    q = graph.tensors[node.inputs[i]].quant
    assert q is not None, f"{node.name}: input {node.inputs[i]} is not quantized"
    return q


def out_quant(graph: Graph, node: Node, i: int = 0) -> QParams:
    q = graph.tensors[node.outputs[i]].quant
    assert q is not None, f"{node.name}: output {node.outputs[i]} is not quantized"
    return q


def clamp_bounds(node: Node, q: QParams) -> tuple[int, int]:
    """Integer clamp bounds of an output: its bit range narrowed by a fused activation."""
    lo, hi = q.qmin, q.qmax
    act_lo, act_hi = node.attrs.get("act_lo"), node.attrs.get("act_hi")
    if act_lo is not None:
        lo = max(lo, min(hi, int(np.rint(act_lo / q.scale)) + q.zero_point))
    if act_hi is not None:
        hi = min(hi, max(lo, int(np.rint(act_hi / q.scale)) + q.zero_point))
    return lo, hi


def apply_float_activation(node: Node, y: np.ndarray) -> np.ndarray:
    lo, hi = node.attrs.get("act_lo"), node.attrs.get("act_hi")
    if lo is not None or hi is not None:
        y = np.clip(y, -np.inf if lo is None else lo, np.inf if hi is None else hi)
    return y


def float_params(node: Node, graph: Graph) -> dict[str, np.ndarray]:
    """A node's parameters as ``float_forward`` takes them: the graph's constants."""
    return {k: graph.param(node, k) for k in node.params}


def float_activation(node: Node, z: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The fused activation (``act_lo``/``act_hi``) of pre-activation ``z``, and where its
    gradient passes (None: everywhere, no activation)."""
    lo, hi = node.attrs.get("act_lo"), node.attrs.get("act_hi")
    if lo is None and hi is None:
        return z, None
    mask = (z > (-np.inf if lo is None else lo)) & (z < (np.inf if hi is None else hi))
    return apply_float_activation(node, z), mask


def exact_dtype(bound: int) -> type:
    """The float type whose BLAS sums integers exactly when every partial sum is below ``bound``."""
    if not arith.FAST_EXACT_PATHS:
        return np.int64
    return np.float32 if bound < 2**24 else np.float64


def exact_matmul(a: np.ndarray, b: np.ndarray, bound: int) -> np.ndarray:
    """Integer matrix product through float BLAS, exact because every partial sum is below the
    float's integer range (2**24 for float32, 2**53 for float64); ``bound`` is the static bound
    on any partial sum's magnitude. Returns floats holding exact integers (int64 when the fast
    paths are off)."""
    if bound >= 2**53 or not arith.FAST_EXACT_PATHS:
        return a.astype(np.int64) @ b.astype(np.int64)
    dtype = exact_dtype(bound)
    return a.astype(dtype, copy=False) @ b.astype(dtype, copy=False)
