"""Export a compiled integer graph as a QDQ ONNX model (onnxruntime runs it, Netron shows it).

Every int8 activation of the IR is an int8 tensor of the same name between DequantizeLinear and
QuantizeLinear nodes; weights stay int8 and biases int32 in the file. To give the simulator's
results bit for bit rather than a float approximation, the integer arithmetic is kept:

* DequantizeLinear with scale 1 gives ``x - zp``: exact integers in float32, so Conv, MatMul
  and window sums of them are the simulator's accumulators (exact while partial sums stay
  below 2^24, which int8 layers of this size do in practice);
* the dyadic requantization ``round(acc * b / 2^c)`` is a float64 Mul (b / 2^c is exact in
  float64) and Round (ties to even), then a QuantizeLinear of scale 1 adds the zero point and
  saturates, and a Clip on int8 applies a fused activation's bounds;
* table functions (Sigmoid, Tanh, ...) are their int8 tables (a Gather), and Softmax is hilc's
  integer algorithm (exp table, Newton-Raphson reciprocal, rounding shift) in int64 operators;
* the graph input is quantized in float64 as the host side does (``rint(x / s) + zp``).

The IR keeps feature maps channels-last; convolutions and pools are wrapped in Transposes to
ONNX's NCHW, and the graph's input and output keep the model's own layout.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hilc import __version__
from hilc.compiler.ir import Graph, Node, QParams
from hilc.errors import HilcError

OPSET = 17
NHWC_TO_NCHW = [0, 3, 1, 2]
NCHW_TO_NHWC = [0, 2, 3, 1]


class _Builder:
    def __init__(self, graph: Graph) -> None:
        self.g = graph
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.float_of: dict[str, str] = {}  # int8 tensor -> its DequantizeLinear output
        self.n = 0
        # the model's float input/output names; IR tensors of the same name get a suffix
        self.external: set[str] = set()

    def tn(self, tensor: str) -> str:
        return f"{tensor}_int8" if tensor in self.external else tensor

    def uid(self, base: str) -> str:
        self.n += 1
        return f"{base}__{self.n}"

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], out: str | None = None, name: str | None = None, **attrs) -> str:
        out = out or self.uid(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=name or out, **attrs))
        return out

    def qparams(self, tensor: str) -> QParams:
        q = self.g.tensors[tensor].quant
        if q is None:
            raise HilcError(f"export-onnx: tensor {tensor} is not quantized")
        return q

    def scale_zp(self, tensor: str) -> tuple[str, str]:
        q = self.qparams(tensor)
        s = self.const(self.uid(f"{tensor}.scale"), np.array(q.scale, np.float32))
        z = self.const(self.uid(f"{tensor}.zero_point"), np.array(q.zero_point, np.int8))
        return s, z

    def dq_units(self, tensor: str) -> str:
        """``x - zp`` as float (scale 1): exact integers, so sums of them in float32 stay exact."""
        key = f"{tensor}#units"
        if key not in self.float_of:
            q = self.qparams(tensor)
            s = self.const(self.uid(f"{tensor}.one"), np.array(1.0, np.float32))
            z = self.const(self.uid(f"{tensor}.zero_point"), np.array(q.zero_point, np.int8))
            self.float_of[key] = self.node("DequantizeLinear", [self.tn(tensor), s, z], f"{tensor}__units")
        return self.float_of[key]

    def requant(self, value: str, multiplier: np.ndarray | float | None, name: str) -> str:
        """``round(value * multiplier)`` (ties to even) in float64, as a float32 tensor of exact
        integers. ``value`` holds exact integers (accumulators); a dyadic multiplier b / 2^c is
        exact in float64 and so is the product while it stays below 2^53, which is the
        simulator's own condition for its float64 path: the rounding is the simulator's."""
        x = self.node("Cast", [value], self.uid(f"{name}_f64"), to=TensorProto.DOUBLE)
        if multiplier is not None:
            m = self.const(self.uid(f"{name}.multiplier"), np.asarray(multiplier, np.float64))
            x = self.node("Mul", [x, m], self.uid(f"{name}_scaled"))
        x = self.node("Round", [x], self.uid(f"{name}_round"))
        return self.node("Cast", [x], self.uid(f"{name}_rounded"), to=TensorProto.FLOAT)

    def q(self, value: str, tensor: str, node: Node, out: str | None = None) -> str:
        """The int8 activation ``tensor`` from ``value``, the rounded integers y - zp (see
        ``requant``): a QuantizeLinear of scale 1 adds the zero point and saturates, and a Clip
        on int8 applies the node's clamp (fused ReLU, narrower bit-widths) as the simulator does."""
        q = self.qparams(tensor)
        lo, hi = node.attrs.get("lo", q.qmin), node.attrs.get("hi", q.qmax)
        final = out or self.tn(tensor)
        s = self.const(self.uid(f"{tensor}.one"), np.array(1.0, np.float32))
        z = self.const(self.uid(f"{tensor}.zero_point"), np.array(q.zero_point, np.int8))
        clamp = lo > -128 or hi < 127
        y = self.node("QuantizeLinear", [value, s, z], self.uid(f"{tensor}_unclamped") if clamp else final,
                      name=f"{node.name}_q")
        if clamp:
            lo_q = self.const(self.uid(f"{node.name}.lo"), np.array(lo, np.int8))
            hi_q = self.const(self.uid(f"{node.name}.hi"), np.array(hi, np.int8))
            y = self.node("Clip", [y, lo_q, hi_q], final, name=f"{node.name}_clamp")
        return y

    def dq_const(self, name: str, values: np.ndarray, scale: np.ndarray | float, zp: int = 0,
                 axis: int | None = None) -> str:
        """A quantized constant and its DequantizeLinear (per-axis when ``scale`` is an array)."""
        v = self.const(name, values)
        scale = np.asarray(scale, np.float32)
        zdt = np.int32 if values.dtype == np.int32 else np.int8
        s = self.const(f"{name}.scale", scale)
        z = self.const(f"{name}.zero_point", np.full(scale.shape, zp, zdt))
        kw = {"axis": axis} if axis is not None and scale.ndim else {}
        return self.node("DequantizeLinear", [v, s, z], f"{name}__f", **kw)


def _dyadic(mult: np.ndarray | int, shift: np.ndarray | int) -> np.ndarray:
    """b / 2^c as float64 (exact: b < 2^31)."""
    return np.asarray(mult, np.float64) * np.exp2(-np.asarray(shift, np.float64))


F32_EXACT = 2**24  # float32 holds every integer below this


def _in_absmax(b: _Builder, node: Node) -> int:
    q = b.qparams(node.inputs[0])
    return max(q.qmax - q.zero_point, q.zero_point - q.qmin)


def _exact_chunks(w: np.ndarray, in_absmax: int) -> list[tuple[int, int]]:
    """Input-channel ranges (of OIHW weights) whose partial sums stay below 2^24 for any input:
    float32 then adds them exactly, in whatever order onnxruntime's kernels choose."""
    per_channel = np.abs(w.astype(np.int64)).sum(axis=(2, 3)) * in_absmax  # [O, I]
    chunks, start, acc = [], 0, np.zeros(w.shape[0], np.int64)
    for i in range(w.shape[1]):
        if i > start and (acc + per_channel[:, i]).max() >= F32_EXACT:
            chunks.append((start, i))
            start, acc = i, np.zeros_like(acc)
        acc += per_channel[:, i]
    chunks.append((start, w.shape[1]))
    return chunks


def _emit_conv(b: _Builder, node: Node) -> None:
    """Conv on integer units: (x - zp) and the int8 weights are exact in float32, and so is
    every partial sum below 2^24, so the accumulator is the simulator's; the dyadic multiply and
    its rounding then happen in float64 (``requant``). A layer whose static bound reaches 2^24
    is split over input channels into exact float32 Convs summed in float64."""
    g, a = b.g, node.attrs
    w = np.ascontiguousarray(g.param(node, "weight").transpose(0, 3, 1, 2).astype(np.int8))  # OHWI -> OIHW
    bias = g.param(node, "bias").astype(np.int32)
    x = b.node("Transpose", [b.dq_units(node.inputs[0])], b.uid(f"{node.name}_nchw"), perm=NHWC_TO_NCHW)
    conv = {"kernel_shape": a["kernel"], "strides": a["strides"], "pads": list(a["pads"]),
            "dilations": a["dilations"], "group": a["group"]}
    chunks = _exact_chunks(w, _in_absmax(b, node)) if a["group"] == 1 else [(0, w.shape[1])]
    if len(chunks) == 1 and a.get("acc_bound", 0) < F32_EXACT:
        wf = b.dq_const(f"{node.name}.weight", w, np.float32(1.0))
        bf = b.dq_const(f"{node.name}.bias", bias, np.float32(1.0))
        y = b.node("Conv", [x, wf, bf], b.uid(node.name), name=node.name, **conv)
    else:
        parts = []
        for k, (c0, c1) in enumerate(chunks):
            wf = b.dq_const(f"{node.name}.weight{k}", np.ascontiguousarray(w[:, c0:c1]), np.float32(1.0))
            xs = x
            if len(chunks) > 1:
                xs = b.node("Slice", [x, b.const(b.uid("starts"), np.array([c0], np.int64)),
                                      b.const(b.uid("ends"), np.array([c1], np.int64)),
                                      b.const(b.uid("axes"), np.array([1], np.int64))], b.uid(f"{node.name}_c{k}"))
            yk = b.node("Conv", [xs, wf], b.uid(f"{node.name}_{k}"), name=f"{node.name}_part{k}", **conv)
            parts.append(b.node("Cast", [yk], b.uid(f"{node.name}_{k}_f64"), to=TensorProto.DOUBLE))
        y = b.node("Sum", parts, b.uid(node.name), name=node.name) if len(parts) > 1 else parts[0]
        bias_f = b.const(f"{node.name}.bias_f64", bias.astype(np.float64).reshape(1, -1, 1, 1))
        y = b.node("Add", [y, bias_f], b.uid(f"{node.name}_bias"))
    m = _dyadic(g.param(node, "mult"), g.param(node, "shift")).reshape(1, -1, 1, 1)
    y = b.requant(y, m, node.name)
    yq = b.q(y, node.outputs[0], node, out=b.uid(f"{node.name}_nchw_q"))
    b.node("Transpose", [yq], b.tn(node.outputs[0]), name=f"{node.name}_nhwc", perm=NCHW_TO_NHWC)


def _emit_dense(b: _Builder, node: Node) -> str:
    """MatMul on integer units; in float64 (exact below 2^53) when the float32 bound does not hold."""
    g = b.g
    w = np.ascontiguousarray(g.param(node, "weight").astype(np.int8).T)  # [K, O]
    bias = g.param(node, "bias").astype(np.int32)
    wf = b.dq_const(f"{node.name}.weight", w, np.float32(1.0))
    x = b.dq_units(node.inputs[0])
    if node.attrs.get("acc_bound", 0) < F32_EXACT:
        bf = b.dq_const(f"{node.name}.bias", bias, np.float32(1.0))
        y = b.node("MatMul", [x, wf], b.uid(node.name), name=node.name)
    else:
        x = b.node("Cast", [x], b.uid(f"{node.name}_x_f64"), to=TensorProto.DOUBLE)
        wf = b.node("Cast", [wf], b.uid(f"{node.name}_w_f64"), to=TensorProto.DOUBLE)
        bf = b.const(f"{node.name}.bias_f64", bias.astype(np.float64))
        y = b.node("MatMul", [x, wf], b.uid(node.name), name=node.name)
    y = b.node("Add", [y, bf], b.uid(f"{node.name}_bias"))
    return b.requant(y, _dyadic(g.param(node, "mult"), g.param(node, "shift")), node.name)


def _units_operands(b: _Builder, node: Node) -> list[str]:
    """(x - zp) of both operands of a binary op (a constant operand included), as float."""
    xs = [b.dq_units(node.inputs[0])]
    if "const" in node.params:
        a = node.attrs
        c = b.g.param(node, "const").astype(np.int8)
        v = b.const(f"{node.name}.const", c)
        s = b.const(f"{node.name}.const.one", np.array(1.0, np.float32))
        z = b.const(f"{node.name}.const.zero_point", np.array(a["const_zp"], np.int8))
        xs.append(b.node("DequantizeLinear", [v, s, z], f"{node.name}.const__units"))
    else:
        xs.append(b.dq_units(node.inputs[1]))
    return xs


def _emit_add(b: _Builder, node: Node) -> str:
    """s0*m0*(x0 - zp0) + s1*m1*(x1 - zp1), then / 2^c: every term and the sum are exact float64."""
    a = node.attrs
    signs = a.get("signs", [1, 1])
    terms = []
    for i, x in enumerate(_units_operands(b, node)):
        x = b.node("Cast", [x], b.uid(f"{node.name}_in{i}_f64"), to=TensorProto.DOUBLE)
        k = b.const(b.uid(f"{node.name}.k{i}"), np.array(signs[i] * _dyadic(a["mults"][i], a["shift"]), np.float64))
        terms.append(b.node("Mul", [x, k], b.uid(f"{node.name}_term{i}")))
    y = b.node("Add", terms, b.uid(node.name), name=node.name)
    y = b.node("Round", [y], b.uid(f"{node.name}_round"))
    return b.node("Cast", [y], b.uid(f"{node.name}_rounded"), to=TensorProto.FLOAT)


def _emit_mul(b: _Builder, node: Node) -> str:
    a = node.attrs
    y = b.node("Mul", _units_operands(b, node), b.uid(node.name), name=node.name)  # |product| < 2^16: exact
    return b.requant(y, _dyadic(a["mult"], a["shift"]), node.name)


def _emit_pool(b: _Builder, node: Node) -> None:
    """A max pool of integer units is exact anyway. An average pool is the simulator's sum (a
    depthwise all-ones Conv over units: exact) times the dyadic factor of each position's count."""
    from hilc.compiler.ops.pool import _full_pads, count_map

    a, g = node.attrs, b.g
    x = b.node("Transpose", [b.dq_units(node.inputs[0])], b.uid(f"{node.name}_nchw"), perm=NHWC_TO_NCHW)
    if node.op == "maxpool":
        eb, er = a.get("extra", [0, 0])
        attrs = {"kernel_shape": a["kernel"], "strides": a["strides"], "pads": list(a["pads"])}
        if eb or er:  # the importer turned ceil_mode into extra bottom/right padding
            attrs["ceil_mode"] = 1
        if a.get("dilations", [1, 1]) != [1, 1]:
            attrs["dilations"] = a["dilations"]
        y = b.node("MaxPool", [x], b.uid(node.name), name=node.name, **attrs)
    else:
        _, h, w, c = g.tensors[node.inputs[0]].shape
        ones = b.const(f"{node.name}.window", np.ones((c, 1, *a["kernel"]), np.float32))
        y = b.node("Conv", [x, ones], b.uid(node.name), name=f"{node.name}_window_sum", kernel_shape=a["kernel"],
                   strides=a["strides"], pads=_full_pads(a), group=c)
        idx = np.searchsorted(a["counts"], count_map(a, h, w))
        m = _dyadic(g.param(node, "mult").astype(np.int64)[idx], g.param(node, "shift").astype(np.int64)[idx])
        y = b.requant(y, m[None, None], node.name)
    # a max of units goes back to int8 by its own zero point (max pool keeps the input's quantization)
    yq = b.q(y, node.outputs[0], node, out=b.uid(f"{node.name}_nchw_q"))
    b.node("Transpose", [yq], b.tn(node.outputs[0]), name=f"{node.name}_nhwc", perm=NCHW_TO_NHWC)


def _emit_concat(b: _Builder, node: Node) -> str:
    """Each input rescaled and rounded on its own (as the simulator does), then joined."""
    a = node.attrs
    parts = [b.requant(b.dq_units(t), _dyadic(m, c), f"{node.name}_in{i}")
             for i, (t, m, c) in enumerate(zip(node.inputs, a["mults"], a["shifts"], strict=True))]
    return b.node("Concat", parts, b.uid(node.name), name=node.name, axis=a["axis"])


def _int64(b: _Builder, tensor: str, name: str) -> str:
    return b.node("Cast", [b.tn(tensor)], b.uid(f"{name}_i64"), to=TensorProto.INT64)


def _emit_table(b: _Builder, node: Node) -> None:
    """A table function (sigmoid, tanh, ...) is what hilc runs: its 256-entry int8 table
    indexed by x + 128 (a Gather named after the function, so Netron says which)."""
    a = node.attrs
    idx = b.node("Add", [_int64(b, node.inputs[0], node.name),
                         b.const(b.uid(f"{node.name}.offset"), np.array(a["table_offset"], np.int64))],
                 b.uid(f"{node.name}_index"))
    table = b.const(f"{node.name}.{a['fn']}_table", b.g.param(node, "table").astype(np.int8))
    b.node("Gather", [table, idx], b.tn(node.outputs[0]), name=f"{node.name}_{a['fn']}", axis=0)


def _int64_emitters(b: _Builder, nm: str) -> tuple[Callable[..., str], Callable[..., str]]:
    """(c, op) for emitting node NM's int64 arithmetic: c(value, tag) an int64 constant, op(kind,
    inputs, tag, **attrs) a node; both named after the node and made unique."""
    def c(value, tag: str) -> str:
        return b.const(b.uid(f"{nm}.{tag}"), np.asarray(value, np.int64))

    def op(kind: str, ins: list[str], tag: str, **kw) -> str:
        return b.node(kind, ins, b.uid(f"{nm}_{tag}"), **kw)

    return c, op


def _nr_reciprocal(c: Callable[..., str], op: Callable[..., str], a: str, step_tag: str) -> str:
    """hilc's Newton-Raphson reciprocal of a (seed NR_C1 - NR_C2 * a / 2^31, then NR_STEPS steps, as in
    hilc.compiler.ops.softmax), shared by softmax and LayerNorm; ``step_tag`` names each step's term."""
    from hilc.compiler.ops.softmax import NR_C1, NR_C2, NR_STEPS

    y = op("Sub", [c(NR_C1, "c1"), op("Div", [op("Mul", [c(NR_C2, "c2"), a], "c2a"), c(1 << 31, "2p31")], "y0s")],
           "y0")
    for k in range(NR_STEPS):
        t = op("Div", [op("Mul", [a, y], f"ay{k}"), c(1 << 31, f"2p31_{k}")], f"{step_tag}{k}")
        y = op("Div", [op("Mul", [y, op("Sub", [c(1 << 31, f"2p31b_{k}"), t], f"2t{k}")], f"yt{k}"),
                       c(1 << 30, f"2p30_{k}")], f"y{k + 1}")
    return y


def _emit_softmax(b: _Builder, node: Node) -> None:
    """hilc's integer softmax (hilc.compiler.ops.softmax) in int64 ONNX operators: exp table,
    sum, Newton-Raphson reciprocal, rounding shift. Every value is non-negative, so integer Div
    by a power of two is the floor shift, and every product stays below 2^62."""

    a, g, nm = node.attrs, b.g, node.name
    axis = a["axis"]

    c, op = _int64_emitters(b, nm)
    pow2 = np.array([1 << k for k in range(63)], np.int64)
    x = _int64(b, node.inputs[0], nm)
    d = op("Sub", [op("ReduceMax", [x], "max", axes=[axis], keepdims=1), x], "d")
    e = op("Gather", [c(g.param(node, "exp_table").astype(np.int64), "exp_table"), d], "exp", axis=0)
    s = op("ReduceSum", [e, c([axis], "axes")], "sum", keepdims=1)
    # n = bit length of s: how many powers of two it reaches
    ge = op("GreaterOrEqual", [op("Unsqueeze", [s, c([-1], "last")], "s1"), c(pow2[:32], "pow2_32")], "ge")
    n = op("ReduceSum", [op("Cast", [ge], "ge_i64", to=TensorProto.INT64), c([-1], "last2")], "n", keepdims=0)
    table = c(pow2, "pow2")
    a_ = op("Mul", [s, op("Gather", [table, op("Sub", [c(31, "31"), n], "31_n")], "p31n", axis=0)], "a")
    y = _nr_reciprocal(c, op, a_, "t")
    # q = rounding_shift(e * y * k, n + 30), ties to even
    p = op("Mul", [op("Mul", [e, y], "ey"), c(a["k"], "k")], "p")
    div = op("Gather", [table, op("Add", [n, c(30, "30")], "sh")], "2sh", axis=0)
    half = op("Gather", [table, op("Add", [n, c(29, "29")], "sh1")], "2sh1", axis=0)
    q = op("Div", [p, div], "q")
    r = op("Sub", [p, op("Mul", [q, div], "qd")], "r")
    odd = op("Equal", [op("Mod", [q, c(2, "2")], "q2"), c(1, "1")], "odd")
    up = op("Or", [op("Greater", [r, half], "gt"), op("And", [op("Equal", [r, half], "tie"), odd], "tie_odd")], "up")
    q = op("Add", [q, op("Cast", [up], "up_i64", to=TensorProto.INT64)], "rounded")
    q = op("Clip", [op("Add", [q, c(a["zp_out"], "zp")], "qz"), c(-128, "lo"), c(127, "hi")], "clip")
    b.node("Cast", [q], b.tn(node.outputs[0]), name=nm, to=TensorProto.INT8)


def _emit(b: _Builder, node: Node) -> str | None:
    """The result of one IR node as rounded integers y - zp in float (the caller adds the
    QuantizeLinear), or None for nodes that write their int8 output themselves."""
    a, op = node.attrs, node.op
    if op in ("conv2d", "maxpool", "avgpool"):
        return (_emit_conv if op == "conv2d" else _emit_pool)(b, node)
    if op == "dense":
        return _emit_dense(b, node)
    if op == "add":
        return _emit_add(b, node)
    if op == "mul":
        return _emit_mul(b, node)
    if op == "concat":
        return _emit_concat(b, node)
    if op == "requant":
        return b.requant(b.dq_units(node.inputs[0]), _dyadic(a["mult"], a["shift"]), node.name)
    # Data movement keeps the quantization: it runs on units and the clamp is the QuantizeLinear's
    # (and Clip's).
    if op == "clamp":
        return b.node("Identity", [b.dq_units(node.inputs[0])], b.uid(node.name), name=node.name)
    if op == "reshape":
        shape = b.const(b.uid(f"{node.name}.shape"), np.array([-1, *a["shape"][1:]], np.int64))
        return b.node("Reshape", [b.dq_units(node.inputs[0]), shape], b.uid(node.name), name=node.name)
    if op == "transpose":
        return b.node("Transpose", [b.dq_units(node.inputs[0])], b.uid(node.name), name=node.name,
                      perm=list(a["perm"]))
    if op == "pad":
        pads = [int(p[0]) for p in a["pads"]] + [int(p[1]) for p in a["pads"]]
        ins = [b.dq_units(node.inputs[0]), b.const(b.uid(f"{node.name}.pads"), np.array(pads, np.int64))]
        if a["mode"] == "constant":
            zp = b.qparams(node.inputs[0]).zero_point
            ins.append(b.const(b.uid(f"{node.name}.value"), np.array(a["value_q"] - zp, np.float32)))
        return b.node("Pad", ins, b.uid(node.name), name=node.name, mode=a["mode"])
    if op == "lut":
        _emit_table(b, node)
        return None
    if op == "softmax":
        _emit_softmax(b, node)
        return None
    if op in TRANSFORMER_EXPORTS:
        return TRANSFORMER_EXPORTS[op](b, node)
    raise HilcError(f"export-onnx: {node.name}: operator '{op}' has no QDQ ONNX export")


# --- transformers (hilc/compiler/ops/matmul.py, reduce.py, gather.py, layernorm.py) ---------------

def _emit_matmul(b: _Builder, node: Node) -> str:
    """MatMul of two activations' units (the second stored transposed), exact in float32 below
    2^24 and in float64 otherwise, then the dyadic requantization."""
    a = node.attrs
    ua, ub = b.dq_units(node.inputs[0]), b.dq_units(node.inputs[1])
    if a["acc_bound"] >= F32_EXACT:
        ua = b.node("Cast", [ua], b.uid(f"{node.name}_a_f64"), to=TensorProto.DOUBLE)
        ub = b.node("Cast", [ub], b.uid(f"{node.name}_b_f64"), to=TensorProto.DOUBLE)
    rank = len(b.g.tensors[node.inputs[1]].shape)
    bt = b.node("Transpose", [ub], b.uid(f"{node.name}_bt"), perm=[*range(rank - 2), rank - 1, rank - 2])
    y = b.node("MatMul", [ua, bt], b.uid(node.name), name=node.name)
    return b.requant(y, _dyadic(a["mult"], a["shift"]), node.name)


def _emit_reduce_mean(b: _Builder, node: Node) -> str:
    a = node.attrs
    axes = b.const(b.uid(f"{node.name}.axes"), np.array([a["axis"]], np.int64))
    y = b.node("ReduceSum", [b.dq_units(node.inputs[0]), axes], b.uid(node.name), name=node.name,
               keepdims=int(a.get("keepdims", 1)))  # |sum| <= len * 255: exact
    return b.requant(y, _dyadic(a["mult"], a["shift"]), node.name)


def _emit_gather(b: _Builder, node: Node) -> None:
    a = node.attrs
    idx = b.const(b.uid(f"{node.name}.indices"), np.array(a["indices"], np.int64).reshape(a["index_shape"]))
    b.node("Gather", [b.tn(node.inputs[0]), idx], b.tn(node.outputs[0]), name=node.name, axis=a["axis"])


def _emit_embedding(b: _Builder, node: Node) -> None:
    """Two Gathers, as the kernel: code -> row (index table), row -> int8 table row."""
    g, nm = b.g, node.name
    code = b.node("Add", [_int64(b, node.inputs[0], nm),
                          b.const(b.uid(f"{nm}.offset"), np.array(node.attrs["index_offset"], np.int64))],
                  b.uid(f"{nm}_code"))
    rows = b.node("Gather", [b.const(b.uid(f"{nm}.index"), g.param(node, "index").astype(np.int64)), code],
                  b.uid(f"{nm}_rows"), axis=0)
    b.node("Gather", [b.const(f"{nm}.table", g.param(node, "table").astype(np.int8)), rows],
           b.tn(node.outputs[0]), name=nm, axis=0)


def _round_shift_i64(b: _Builder, p: str, div: str, half: str, tag: str) -> str:
    """round(p / div), ties to even, for int64 p of either sign and div a power of two >= 2:
    on |p| (ONNX integer Div truncates, which is the floor there), then the sign back."""
    op = lambda kind, ins, t, **kw: b.node(kind, ins, b.uid(f"{tag}_{t}"), **kw)  # noqa: E731
    ap = op("Abs", [p], "abs")
    q = op("Div", [ap, div], "q")
    r = op("Sub", [ap, op("Mul", [q, div], "qd")], "r")
    two, one = b.const(b.uid(f"{tag}.2"), np.array(2, np.int64)), b.const(b.uid(f"{tag}.1"), np.array(1, np.int64))
    odd = op("Equal", [op("Mod", [q, two], "q2"), one], "odd")
    up = op("Or", [op("Greater", [r, half], "gt"), op("And", [op("Equal", [r, half], "tie"), odd], "tie_odd")], "up")
    q = op("Add", [q, op("Cast", [up], "up_i64", to=TensorProto.INT64)], "rounded")
    return op("Mul", [q, op("Sign", [p], "sign")], "signed")


def _emit_layernorm(b: _Builder, node: Node) -> None:
    """hilc's integer LayerNorm (hilc.compiler.ops.layernorm) in int64 ONNX operators: exact
    centring, int64 variance, bit length, digit-by-digit square root, Newton-Raphson reciprocal and
    the two rounding shifts. Values that are divided are non-negative or rounded on their magnitude."""
    from hilc.compiler.ops.layernorm import Z_BITS

    a, g, nm = node.attrs, b.g, node.name
    n = g.tensors[node.inputs[0]].shape[-1]

    c, op = _int64_emitters(b, nm)
    pow2 = np.array([1 << k for k in range(63)], np.int64)
    last = c([-1], "last")
    d = op("Sub", [_int64(b, node.inputs[0], nm), c(a["zp_in"], "zp_in")], "d")
    cc = op("Sub", [op("Mul", [d, c(n, "n")], "nd"), op("ReduceSum", [d, last], "s", keepdims=1)], "c")
    v = op("Add", [op("ReduceSum", [op("Mul", [cc, cc], "c2"), last], "v0", keepdims=1), c(a["eps_int"], "eps")], "v")
    ge = op("GreaterOrEqual", [op("Unsqueeze", [v, last], "v1"), c(pow2, "pow2_ge")], "ge")
    bl = op("ReduceSum", [op("Cast", [ge], "ge_i64", to=TensorProto.INT64), last], "bl", keepdims=0)
    k = op("Div", [op("Sub", [c(62, "62"), bl], "62_bl"), c(2, "2")], "k")
    table = c(pow2, "pow2")
    rem = op("Mul", [v, op("Gather", [table, op("Mul", [k, c(2, "2b")], "2k")], "p2k", axis=0)], "vn")
    res = op("Mul", [rem, c(0, "0")], "res0")
    for i in range(31):  # digit-by-digit square root, the bit a constant per step
        bit = c(1 << (60 - 2 * i), f"bit{i}")
        t = op("Add", [res, bit], f"t{i}")
        ok = op("GreaterOrEqual", [rem, t], f"ge{i}")
        rem = op("Where", [ok, op("Sub", [rem, t], f"rt{i}"), rem], f"rem{i}")
        half = op("Div", [res, c(2, f"h{i}")], f"half{i}")
        res = op("Where", [ok, op("Add", [half, bit], f"hb{i}"), half], f"res{i}")
    y = _nr_reciprocal(c, op, res, "nt")  # "t{i}" is taken by the square root above
    sh = op("Sub", [c(61 - Z_BITS, "sh0"), k], "sh")
    z = _round_shift_i64(b, op("Mul", [cc, y], "cy"), op("Gather", [table, sh], "2sh", axis=0),
                         op("Gather", [table, op("Sub", [sh, c(1, "1")], "sh1")], "2sh1", axis=0), f"{nm}_z")
    shift = g.param(node, "shift").astype(np.int64)
    w = op("Add", [op("Mul", [z, c(g.param(node, "mult").astype(np.int64), "mult")], "zm"),
                   c(g.param(node, "bias").astype(np.int64), "bias")], "w")
    q = _round_shift_i64(b, w, c(pow2[shift], "div"), c(pow2[shift - 1], "half"), f"{nm}_q")
    q = op("Clip", [op("Add", [q, c(a["zp_out"], "zp")], "qz"), c(a["lo"], "lo"), c(a["hi"], "hi")], "clip")
    b.node("Cast", [q], b.tn(node.outputs[0]), name=nm, to=TensorProto.INT8)


TRANSFORMER_EXPORTS = {"matmul": _emit_matmul, "reduce_mean": _emit_reduce_mean, "gather": _emit_gather,
                       "embedding": _emit_embedding, "layernorm": _emit_layernorm}


def _quantize_input(b: _Builder, ext: str, name: str) -> str:
    """The host's input quantization, ``clip(rint(x / scale) + zp)`` in float64 as the simulator's
    host side does it: QuantizeLinear divides in float32, which moves values that sit on a
    rounding tie (small-integer pixels hit them often)."""
    q = b.qparams(name)
    x = b.node("Cast", [ext], b.uid(f"{name}_f64"), to=TensorProto.DOUBLE)
    x = b.node("Div", [x, b.const(b.uid(f"{name}.scale_f64"), np.array(q.scale, np.float64))], b.uid(f"{name}_div"))
    x = b.node("Round", [x], b.uid(f"{name}_round"))
    x = b.node("Add", [x, b.const(b.uid(f"{name}.zp_f64"), np.array(q.zero_point, np.float64))], b.uid(f"{name}_zp"))
    x = b.node("Clip", [x, b.const(b.uid(f"{name}.qmin"), np.array(q.qmin, np.float64)),
                        b.const(b.uid(f"{name}.qmax"), np.array(q.qmax, np.float64))], b.uid(f"{name}_clip"))
    return b.node("Cast", [x], b.uid(f"{name}_q"), name=f"{name}_quantize", to=TensorProto.INT8)


def export_qdq(graph: Graph) -> onnx.ModelProto:
    """The QDQ ONNX model of a quantized graph: float input and output in the model's own layout."""
    if not graph.is_quantized:
        raise HilcError("export-onnx: the graph is not quantized (compile it first)")
    b = _Builder(graph)
    inputs, outputs = [], []
    b.external = {graph.tensors[t].onnx_name or t for t in graph.inputs + graph.outputs}
    for name in graph.inputs:
        t = graph.tensors[name]
        lay = list(t.layout or range(len(t.shape)))
        logical = [0] * len(t.shape)
        for i, ax in enumerate(lay):
            logical[ax] = t.shape[i]
        ext = t.onnx_name or name
        inputs.append(helper.make_tensor_value_info(ext, TensorProto.FLOAT, ["N", *logical[1:]]))
        qx = _quantize_input(b, ext, name)
        # physical axis i is logical axis lay[i]
        b.node("Transpose", [qx], b.tn(name), name=f"{name}_to_physical", perm=lay)
    for node in graph.nodes:
        if len(node.outputs) != 1:
            raise HilcError(f"export-onnx: {node.name}: nodes with {len(node.outputs)} outputs are not supported")
        y = _emit(b, node)
        if y is not None:
            b.q(y, node.outputs[0], node)
    for name in graph.outputs:
        t = graph.tensors[name]
        lay = list(t.layout or range(len(t.shape)))
        inv = [lay.index(i) for i in range(len(lay))]
        logical = [t.shape[lay.index(i)] for i in range(len(lay))]
        ext = t.onnx_name or name
        if ext in {i.name for i in inputs}:
            ext = f"{ext}_out"
        yl = b.node("Transpose", [b.tn(name)], b.uid(f"{name}_logical"), perm=inv)
        s, z = b.scale_zp(name)
        b.node("DequantizeLinear", [yl, s, z], ext, name=f"{name}_dq")
        outputs.append(helper.make_tensor_value_info(ext, TensorProto.FLOAT, ["N", *logical[1:]]))
    g = helper.make_graph(b.nodes, graph.name or "hilc", inputs, outputs, b.inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="hilc",
                              producer_version=__version__)
    model.ir_version = 8
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise HilcError(f"export-onnx: the exported model does not validate: {str(e).splitlines()[0]}") from None
    return model

