"""Export a compiled integer graph as a QDQ ONNX model (onnxruntime runs it, Netron shows it).

Every int8 activation of the IR becomes an int8 tensor of the same name; every IR node becomes
``DequantizeLinear -> float op -> (Clip) -> QuantizeLinear``, the QDQ form onnxruntime's own
quantizer writes. Weights stay int8 (per-channel ``DequantizeLinear`` on axis 0) and biases
int32 at ``s_in * s_w``, where ``s_w`` is the weight scale the dyadic multiplier encodes
(``b / 2^c * s_out / s_in``). The float op in between computes in float32 what the IR computes
in integers, so a value can land one LSB away from the simulator's only where the exact result
sits within float32 error of a rounding tie.

The IR keeps feature maps channels-last; convolutions and pools are wrapped in Transposes to
ONNX's NCHW (Netron shows them), and the graph's input and output keep the model's own layout.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hilc import __version__
from hilc.compiler.ir import Graph, Node, QParams
from hilc.errors import HilcError

OPSET = 17
_LUT_OPS = {"sigmoid": "Sigmoid", "tanh": "Tanh", "hardsigmoid": "HardSigmoid", "hardswish": "HardSwish",
            "leakyrelu": "LeakyRelu"}
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

    def dq(self, tensor: str) -> str:
        """The float view of an int8 activation (one DequantizeLinear per tensor)."""
        if tensor not in self.float_of:
            s, z = self.scale_zp(tensor)
            self.float_of[tensor] = self.node("DequantizeLinear", [self.tn(tensor), s, z], f"{tensor}__f")
        return self.float_of[tensor]

    def dq_units(self, tensor: str) -> str:
        """``x - zp`` as float (scale 1): exact integers, so sums of them in float32 stay exact."""
        key = f"{tensor}#units"
        if key not in self.float_of:
            q = self.qparams(tensor)
            s = self.const(self.uid(f"{tensor}.one"), np.array(1.0, np.float32))
            z = self.const(self.uid(f"{tensor}.zero_point"), np.array(q.zero_point, np.int8))
            self.float_of[key] = self.node("DequantizeLinear", [self.tn(tensor), s, z], f"{tensor}__units")
        return self.float_of[key]

    def q(self, value: str, tensor: str, node: Node, scale: np.ndarray | None = None, axis: int | None = None,
          out: str | None = None) -> str:
        """Quantize a float result into the int8 activation ``tensor``, then the node's clamp in
        integers (fused ReLU, narrower bit-widths) exactly as the simulator's. ``scale`` replaces
        the tensor's own scale when ``value`` is in other units (per ``axis`` for arrays)."""
        q = self.qparams(tensor)
        lo, hi = node.attrs.get("lo", q.qmin), node.attrs.get("hi", q.qmax)
        final = out or self.tn(tensor)
        if scale is None:
            s, z = self.scale_zp(tensor)
            kw = {}
        else:
            scale = np.asarray(scale, np.float32)
            s = self.const(self.uid(f"{tensor}.scale"), scale)
            z = self.const(self.uid(f"{tensor}.zero_point"), np.full(scale.shape, q.zero_point, np.int8))
            kw = {"axis": axis} if scale.ndim else {}
        clamp = lo > -128 or hi < 127
        y = self.node("QuantizeLinear", [value, s, z], self.uid(f"{tensor}_unclamped") if clamp else final,
                      name=f"{node.name}_q", **kw)
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


def _multipliers(g: Graph, node: Node) -> np.ndarray:
    """The requantization factors M = b / 2^c of a node's output channels."""
    m = g.param(node, "mult").astype(np.float64) * np.exp2(-g.param(node, "shift").astype(np.float64))
    return np.where(m > 0, m, 1e-30)  # a dead channel (M = 0) still needs a finite ONNX scale


def _emit_conv(b: _Builder, node: Node) -> None:
    """Conv on integer units: (x - zp) and int8 weights are exact in float32 and so is every
    partial sum below 2^24, so the accumulator is the simulator's; QuantizeLinear by 1/M per
    channel then rounds it as the dyadic multiply does (ties to even)."""
    g, a = b.g, node.attrs
    w = np.ascontiguousarray(g.param(node, "weight").transpose(0, 3, 1, 2).astype(np.int8))  # OHWI -> OIHW
    wf = b.dq_const(f"{node.name}.weight", w, np.float32(1.0))
    bf = b.dq_const(f"{node.name}.bias", g.param(node, "bias").astype(np.int32), np.float32(1.0))
    x = b.node("Transpose", [b.dq_units(node.inputs[0])], b.uid(f"{node.name}_nchw"), perm=NHWC_TO_NCHW)
    y = b.node("Conv", [x, wf, bf], b.uid(node.name), name=node.name, kernel_shape=a["kernel"],
               strides=a["strides"], pads=list(a["pads"]), dilations=a["dilations"], group=a["group"])
    yq = b.q(y, node.outputs[0], node, 1.0 / _multipliers(g, node), axis=1, out=b.uid(f"{node.name}_nchw_q"))
    b.node("Transpose", [yq], b.tn(node.outputs[0]), name=f"{node.name}_nhwc", perm=NCHW_TO_NHWC)


def _emit_dense(b: _Builder, node: Node) -> None:
    g = b.g
    w = np.ascontiguousarray(g.param(node, "weight").astype(np.int8).T)  # [K, O]
    wf = b.dq_const(f"{node.name}.weight", w, np.float32(1.0))
    bf = b.dq_const(f"{node.name}.bias", g.param(node, "bias").astype(np.int32), np.float32(1.0))
    y = b.node("MatMul", [b.dq_units(node.inputs[0]), wf], b.uid(node.name), name=node.name)
    y = b.node("Add", [y, bf], b.uid(f"{node.name}_bias"))
    rank = len(g.tensors[node.outputs[0]].shape)
    b.q(y, node.outputs[0], node, 1.0 / _multipliers(g, node), axis=rank - 1)


def _second_operand(b: _Builder, node: Node) -> str:
    if "const" in node.params:
        a = node.attrs
        c = b.g.param(node, "const").astype(np.int8)
        return b.dq_const(f"{node.name}.const", c, np.float32(a["const_scale"]), a["const_zp"])
    return b.dq(node.inputs[1])


def _emit_add(b: _Builder, node: Node) -> str:
    x, y = b.dq(node.inputs[0]), _second_operand(b, node)
    s0, s1 = node.attrs.get("signs", [1, 1])
    if s0 < 0:
        x = b.node("Neg", [x], b.uid(f"{node.name}_neg"))
    return b.node("Sub" if s1 < 0 else "Add", [x, y], b.uid(node.name), name=node.name)


def _emit_pool(b: _Builder, node: Node) -> None:
    """Pools on integer units: a max is exact anyway, and an average of integers divided by its
    count then quantized by s_out/s_in meets the simulator's ties (x.5 happens often) exactly."""
    a = node.attrs
    x = b.node("Transpose", [b.dq_units(node.inputs[0])], b.uid(f"{node.name}_nchw"), perm=NHWC_TO_NCHW)
    eb, er = a.get("extra", [0, 0])
    attrs = {"kernel_shape": a["kernel"], "strides": a["strides"], "pads": list(a["pads"])}
    if eb or er:  # the importer turned ceil_mode into extra bottom/right padding
        attrs["ceil_mode"] = 1
    if node.op == "maxpool":
        if a.get("dilations", [1, 1]) != [1, 1]:
            attrs["dilations"] = a["dilations"]
        y = b.node("MaxPool", [x], b.uid(node.name), name=node.name, **attrs)
        scale = np.float32(1.0)
    else:
        y = b.node("AveragePool", [x], b.uid(node.name), name=node.name,
                   count_include_pad=int(a.get("count_include_pad", 0)), **attrs)
        scale = np.float32(b.qparams(node.outputs[0]).scale / b.qparams(node.inputs[0]).scale)
    yq = b.q(y, node.outputs[0], node, scale, out=b.uid(f"{node.name}_nchw_q"))
    b.node("Transpose", [yq], b.tn(node.outputs[0]), name=f"{node.name}_nhwc", perm=NCHW_TO_NHWC)


def _emit(b: _Builder, node: Node) -> str | None:
    """The float result of one IR node (its QuantizeLinear is added by the caller), or None for
    nodes that write their int8 output themselves."""
    a, op = node.attrs, node.op
    if op == "conv2d":
        return _emit_conv(b, node)
    if op == "dense":
        return _emit_dense(b, node)
    if op in ("maxpool", "avgpool"):
        return _emit_pool(b, node)
    if op == "add":
        return _emit_add(b, node)
    if op == "mul":
        return b.node("Mul", [b.dq(node.inputs[0]), _second_operand(b, node)], b.uid(node.name), name=node.name)
    if op in ("clamp", "requant"):  # the clamp and the new scale are the QuantizeLinear's (and Clip's)
        return b.node("Identity", [b.dq(node.inputs[0])], b.uid(node.name), name=node.name)
    if op == "lut":
        fn = a["fn"]
        attrs = {k: float(a[k]) for k in ("alpha", "beta") if k in a and fn in ("hardsigmoid", "leakyrelu")}
        if fn not in _LUT_OPS:
            raise HilcError(f"export-onnx: {node.name}: no ONNX operator for table function '{fn}'")
        return b.node(_LUT_OPS[fn], [b.dq(node.inputs[0])], b.uid(node.name), name=node.name, **attrs)
    if op == "softmax":
        return b.node("Softmax", [b.dq(node.inputs[0])], b.uid(node.name), name=node.name, axis=a["axis"])
    if op == "reshape":
        shape = b.const(b.uid(f"{node.name}.shape"), np.array([-1, *a["shape"][1:]], np.int64))
        return b.node("Reshape", [b.dq(node.inputs[0]), shape], b.uid(node.name), name=node.name)
    if op == "transpose":
        return b.node("Transpose", [b.dq(node.inputs[0])], b.uid(node.name), name=node.name, perm=list(a["perm"]))
    if op == "concat":
        return b.node("Concat", [b.dq(t) for t in node.inputs], b.uid(node.name), name=node.name, axis=a["axis"])
    if op == "pad":
        pads = [int(p[0]) for p in a["pads"]] + [int(p[1]) for p in a["pads"]]
        ins = [b.dq(node.inputs[0]), b.const(b.uid(f"{node.name}.pads"), np.array(pads, np.int64))]
        if a["mode"] == "constant":
            ins.append(b.const(b.uid(f"{node.name}.value"), np.array(a["value"], np.float32)))
        return b.node("Pad", ins, b.uid(node.name), name=node.name, mode=a["mode"])
    raise HilcError(f"export-onnx: {node.name}: operator '{op}' has no QDQ ONNX export")


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

