"""Elementwise binary ops (add/sub, mul) and the standalone clamp (ReLU, ReLU6, Clip).

add: each input is rescaled with its own dyadic multiplier to the output scale, sharing one
shift so there is a single rounding:
    acc = sign0 * b0 * (x0 - zp0) + sign1 * b1 * (x1 - zp1);  y = clamp((acc + 2^(c-1)) >> c + zp)
mul: acc = (x0 - zp0) * (x1 - zp1);  y = clamp(((acc * b) + 2^(c-1)) >> c + zp)
A constant operand (``params['const']``) is quantized per tensor and plays the second input.
clamp keeps its input's quantization and clamps the integers; after ``fuse_activation`` it
only remains where no producer can absorb it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hilc.compiler import arith
from hilc.compiler.ir import QParams
from hilc.compiler.ops.base import (
    Op,
    apply_float_activation,
    clamp_bounds,
    in_quant,
    onnx_importer,
    out_quant,
    register,
)


class _Binary(Op):
    def infer_shapes(self, node, in_shapes, graph):
        shapes = list(in_shapes)
        if "const" in node.params:
            shapes.append(graph.constants[node.params["const"]].shape)
        return [tuple(np.broadcast_shapes(*shapes))]

    def _operands_float(self, node, graph, xs):
        xs = [x.astype(np.float32) for x in xs]
        if "const" in node.params:
            xs.append(graph.param(node, "const").astype(np.float32))
        return xs

    def _quantize_const(self, node, graph) -> None:
        if "const" not in node.params:
            return
        c = graph.param(node, "const").astype(np.float64)
        scale, zp = arith.choose_qparams(c.min(), c.max())
        q = arith.quantize_host(c, scale, zp)
        node.params["const"] = graph.add_constant(f"{node.name}.const", q)
        node.attrs.update(const_scale=scale, const_zp=zp)

    def _operand_quants(self, node, graph) -> list[QParams]:
        qs = [in_quant(graph, node, i) for i in range(len(node.inputs))]
        if "const" in node.params:
            qs.append(QParams(node.attrs["const_scale"], node.attrs["const_zp"]))
        return qs

    def _operands_int(self, node, graph, xs):
        xs = list(xs)
        if "const" in node.params:
            xs.append(graph.param(node, "const"))
        return [x.astype(np.int64) - zp for x, zp in zip(xs, node.attrs["zp_in"], strict=True)]

    def _tvm_operands(self, node, graph, tb) -> list:
        """Each operand as a function of the output index, broadcast as numpy does (constants have
        a batch axis of 1; activations always carry the batch)."""
        out_rank = len(graph.tensors[node.outputs[0]].shape)
        ops = [(tb.input(node, i), graph.tensors[t].shape, True) for i, t in enumerate(node.inputs)]
        if "const" in node.params:
            c = graph.param(node, "const")
            ops.append((tb.const(node, "const", c), c.shape, False))
        out_shape = graph.tensors[node.outputs[0]].shape

        def at(t, shape, batched):
            lead = out_rank - len(shape)

            # the graph's batch is 1: axis 0 follows the output's only for an activation
            follow = [batched if lead + k == 0 else shape[k] == out_shape[lead + k] for k in range(len(shape))]

            def f(idx):
                return t[tuple(idx[lead + k] if follow[k] else 0 for k in range(len(shape)))]
            return f

        return [at(*o) for o in ops]

    def _c_binary(self, node, graph, em, extra: dict) -> tuple[str, str, str]:
        from hilc.targets.c.codegen import broadcast_strides, dims4

        out_shape = graph.tensors[node.outputs[0]].shape
        a_shape = graph.tensors[node.inputs[0]].shape
        if "const" in node.params:
            b_shape, b = graph.param(node, "const").shape, em.param(node, "const")
        else:
            b_shape, b = graph.tensors[node.inputs[1]].shape, em.tensor(node.inputs[1])
        zps = node.attrs["zp_in"]
        p = em.struct("hilc_binary_params", node.name, dict(
            dims=dims4(out_shape), a_strides=broadcast_strides(a_shape, out_shape),
            b_strides=broadcast_strides(b_shape, out_shape), zp_a=zps[0], zp_b=zps[1],
            zp_out=node.attrs["zp_out"], lo=node.attrs["lo"], hi=node.attrs["hi"], **extra))
        return p, em.tensor(node.inputs[0]), b

    def lower_hls(self, node, graph, ctx) -> dict:
        """x: the operand streamed at the output's shape; y: a constant ROM, the other stream, or the other
        input buffered whole when it broadcasts (x * sigmoid(mean(x)): its fork is deep enough)."""
        from hilc.targets.c.codegen import broadcast_strides
        from hilc.targets.hls import lower as hl

        a = node.attrs
        out_shape = hl.tensor_shape(graph, node.outputs[0])
        shapes = [hl.tensor_shape(graph, t) for t in node.inputs]
        bits = [hl.tensor_bits(graph, t) for t in node.inputs]
        zps = a["zp_in"]
        if node.op == "add":
            s0, s1 = a.get("signs", [1, 1])
            mults = [s0 * a["mults"][0], s1 * a["mults"][1]]
        cfg: dict[str, Any] = dict(kind=node.op, n=hl.elems(out_shape), zp_out=a["zp_out"], lo=a["lo"], hi=a["hi"],
                                   dims=hl.dims4(node, out_shape), const=None, x=0)
        if "const" in node.params:
            if shapes[0] != out_shape:
                raise hl.cannot(node, f"its input {node.inputs[0]} {list(shapes[0])} is broadcast to {list(out_shape)}")
            cst = graph.param(node, "const")
            cfg.update(mode="const", const=ctx.rom(f"{node.name}_const", cst.reshape(-1), "ap_int<8>"),
                       y_strides=broadcast_strides(tuple(cst.shape), out_shape))
            bits.append(8)
        elif shapes[0] == out_shape and shapes[1] == out_shape:
            cfg.update(mode="streams")
        elif out_shape in shapes:
            x = shapes.index(out_shape)
            y = 1 - x
            cfg.update(mode="buffered", x=x, n_small=hl.elems(shapes[y]), small_t=ctx.act_t(node.inputs[y]),
                       y_strides=broadcast_strides(shapes[y], out_shape))
        else:
            raise hl.cannot(node, f"both inputs {list(shapes[0])} and {list(shapes[1])} are broadcast to "
                                  f"{list(out_shape)}")
        x = cfg["x"]
        cfg.update(zp_x=zps[x], zp_y=zps[1 - x], act_bits=max(bits), diff_t=f"ap_int<{max(bits) + 1}>")
        if node.op == "add":
            cfg.update(mult_x=mults[x], mult_y=mults[1 - x], shift=a["shift"])
        else:
            cfg.update(mult=a["mult"], shift=a["shift"])
        cfg["doc"] = f"{node.name}: {node.op} of {cfg['n']} elements ({cfg['mode']})"
        return cfg


@register
class Add(_Binary):
    name = "add"
    inplace_ok = True  # over the first input

    def eval_float(self, node, graph, xs):
        a, b = self._operands_float(node, graph, xs)
        s0, s1 = node.attrs.get("signs", [1, 1])
        return [apply_float_activation(node, s0 * a + s1 * b)]

    def float_forward(self, node, graph, xs, params):
        s0, s1 = node.attrs.get("signs", [1, 1])
        return [s0 * xs[0] + s1 * xs[1]], None

    def float_backward(self, node, cache, dys, param_grads=True):
        s0, s1 = node.attrs.get("signs", [1, 1])
        return [s0 * dys[0], s1 * dys[0]], {}

    def differentiable(self, node):
        return "const" not in node.params  # two activations; a constant operand has no backward here

    def quantize(self, node, graph):
        self._quantize_const(node, graph)
        qs = self._operand_quants(node, graph)
        qo = out_quant(graph, node)
        ratios = np.array([q.scale / qo.scale for q in qs])
        _, c = arith.dyadic(ratios.max())
        c = int(c[0])
        mults = [int(round(r * 2.0**c)) for r in ratios]
        lo, hi = clamp_bounds(node, qo)
        node.attrs.pop("act_lo", None)
        node.attrs.pop("act_hi", None)
        node.attrs.update(zp_in=[q.zero_point for q in qs], zp_out=qo.zero_point, mults=mults, shift=c,
                          lo=lo, hi=hi)

    def eval_int(self, node, graph, xs):
        a = node.attrs
        d0, d1 = self._operands_int(node, graph, xs)
        s0, s1 = a.get("signs", [1, 1])
        acc = s0 * a["mults"][0] * d0 + s1 * a["mults"][1] * d1
        # |acc| <= 2 * 255 * 2**31 < 2**53: float64 requantization is exact.
        return [arith.requantize(acc, 1, a["shift"], a["zp_out"], a["lo"], a["hi"], acc_bound=2**41)]

    def lower_tvm(self, node, graph, tb):
        a = node.attrs
        f0, f1 = self._tvm_operands(node, graph, tb)
        s0, s1 = a.get("signs", [1, 1])
        dt = "float64" if tb.fast else "int64"  # |acc| < 2**41: exact in float64
        k0, k1 = (tb.scalar(node, f"k{i}", s * a["mults"][i], dt) for i, s in enumerate((s0, s1)))
        z0, z1 = (tb.scalar(node, f"zp{i}", z, "int32") for i, z in enumerate(a["zp_in"]))
        rq = tb.requantizer(node, 1, a["shift"], a["zp_out"], a["lo"], a["hi"], bound=2**41)

        def f(*i):
            d0 = (f0(i).astype("int32") - z0).astype(dt)
            d1 = (f1(i).astype("int32") - z1).astype(dt)
            return rq(d0 * k0 + d1 * k1)

        return [tb.te.compute(tb.shape(node.outputs[0]), f, name=tb.name(node))]

    def lower_c(self, node, graph, em) -> str:
        a = node.attrs
        s0, s1 = a.get("signs", [1, 1])
        p, x, y = self._c_binary(node, graph, em, dict(mult_a=a["mults"][0], mult_b=a["mults"][1], sign_a=s0,
                                                       sign_b=s1, mult=0, shift=a["shift"]))
        return f"hilc_add_s8({p}, {x}, {y}, {em.tensor(node.outputs[0])});"


@register
class Mul(_Binary):
    name = "mul"
    inplace_ok = True  # over the first input

    def eval_float(self, node, graph, xs):
        a, b = self._operands_float(node, graph, xs)
        return [apply_float_activation(node, a * b)]

    def quantize(self, node, graph):
        self._quantize_const(node, graph)
        q0, q1 = self._operand_quants(node, graph)
        qo = out_quant(graph, node)
        mult, shift = arith.dyadic(q0.scale * q1.scale / qo.scale)
        lo, hi = clamp_bounds(node, qo)
        node.attrs.pop("act_lo", None)
        node.attrs.pop("act_hi", None)
        node.attrs.update(zp_in=[q0.zero_point, q1.zero_point], zp_out=qo.zero_point, mult=int(mult[0]),
                          shift=int(shift[0]), lo=lo, hi=hi)

    def eval_int(self, node, graph, xs):
        a = node.attrs
        d0, d1 = self._operands_int(node, graph, xs)
        return [arith.requantize(d0 * d1, a["mult"], a["shift"], a["zp_out"], a["lo"], a["hi"])]

    def lower_tvm(self, node, graph, tb):
        a = node.attrs
        f0, f1 = self._tvm_operands(node, graph, tb)
        z0, z1 = (tb.scalar(node, f"zp{i}", z, "int32") for i, z in enumerate(a["zp_in"]))
        rq = tb.requantizer(node, a["mult"], a["shift"], a["zp_out"], a["lo"], a["hi"], bound=256 * 256)
        return [tb.te.compute(tb.shape(node.outputs[0]),
                              lambda *i: rq((f0(i).astype("int32") - z0) * (f1(i).astype("int32") - z1)),
                              name=tb.name(node))]

    def lower_c(self, node, graph, em) -> str:
        a = node.attrs
        p, x, y = self._c_binary(node, graph, em, dict(mult_a=0, mult_b=0, sign_a=1, sign_b=1, mult=a["mult"],
                                                       shift=a["shift"]))
        return f"hilc_mul_s8({p}, {x}, {y}, {em.tensor(node.outputs[0])});"

    def macs(self, node, graph):
        return int(np.prod(graph.tensors[node.outputs[0]].shape[1:]))


@register
class Clamp(Op):
    name = "clamp"
    inplace_ok = True
    output_quant_rule = "input"

    def eval_float(self, node, graph, xs):
        return [apply_float_activation(node, xs[0].astype(np.float32))]

    def float_forward(self, node, graph, xs, params):
        return [xs[0]], None  # the bounds are the fused activation (act_lo / act_hi)

    def float_backward(self, node, cache, dys, param_grads=True):
        return [dys[0]], {}

    def quantize(self, node, graph):
        lo, hi = clamp_bounds(node, out_quant(graph, node))
        node.attrs.update(lo=lo, hi=hi)

    def eval_int(self, node, graph, xs):
        return [np.clip(xs[0], node.attrs["lo"], node.attrs["hi"]).astype(np.int8)]

    def lower_tvm(self, node, graph, tb):
        x, tx = tb.input(node), tb.tirx
        lo, hi = tb.scalar(node, "lo", node.attrs["lo"], "int8"), tb.scalar(node, "hi", node.attrs["hi"], "int8")
        return [tb.te.compute(x.shape, lambda *i: tx.max(tx.min(x(*i), hi), lo), name=tb.name(node))]

    def lower_c(self, node, graph, em) -> str:
        x, y = node.inputs[0], node.outputs[0]
        return f"hilc_clamp_s8({em.size(y)}, {node.attrs['lo']}, {node.attrs['hi']}, {em.tensor(x)}, {em.tensor(y)});"

    def lower_hls(self, node, graph, ctx) -> dict:
        from hilc.targets.hls import lower as hl

        return hl.unary_layer(ctx, node, "clamp", lo=node.attrs["lo"], hi=node.attrs["hi"])


@register
class Requant(Op):
    """Rescale to another quantization (a QDQ model's own scale after a data-movement op):
    y = clamp(round((x - zp_in) * b / 2^c) + zp_out). Inserted by the quantizer, never imported."""

    name = "requant"
    inplace_ok = True

    def eval_float(self, node, graph, xs):
        return [xs[0]]

    def quantize(self, node, graph):
        qi, qo = in_quant(graph, node), out_quant(graph, node)
        b, c = arith.dyadic(qi.scale / qo.scale)
        node.attrs.update(zp_in=qi.zero_point, zp_out=qo.zero_point, mult=int(b[0]), shift=int(c[0]),
                          lo=qo.qmin, hi=qo.qmax)

    def eval_int(self, node, graph, xs):
        a = node.attrs
        return [arith.requantize(xs[0].astype(np.int64) - a["zp_in"], a["mult"], a["shift"], a["zp_out"],
                                 a["lo"], a["hi"], acc_bound=256)]

    def lower_tvm(self, node, graph, tb):
        a = node.attrs
        x = tb.input(node)
        rq = tb.requantizer(node, a["mult"], a["shift"], a["zp_out"], a["lo"], a["hi"], bound=256)
        zp = tb.scalar(node, "zp_in", a["zp_in"], "int32")
        return [tb.te.compute(x.shape, lambda *i: rq(x(*i).astype("int32") - zp), name=tb.name(node))]

    def lower_c(self, node, graph, em) -> str:
        a = node.attrs
        x, y = node.inputs[0], node.outputs[0]
        return (f"hilc_requant_s8({em.size(y)}, {a['zp_in']}, {a['mult']}, {a['shift']}, {a['zp_out']}, {a['lo']}, "
                f"{a['hi']}, {em.tensor(x)}, {em.tensor(y)});")

    def lower_hls(self, node, graph, ctx) -> dict:
        from hilc.targets.hls import lower as hl

        a = node.attrs
        return hl.unary_layer(ctx, node, "requant", zp_in=a["zp_in"], zp_out=a["zp_out"], mult=a["mult"],
                              shift=a["shift"], lo=a["lo"], hi=a["hi"],
                              diff_t=f"ap_int<{hl.tensor_bits(graph, node.inputs[0]) + 1}>")


# --- ONNX importers ------------------------------------------------------------------------

def _const_in_layout(ctx, c: np.ndarray, like: str) -> np.ndarray:
    """A constant operand broadcast against tensor ``like``, moved into its physical layout."""
    rank = len(ctx.layouts[like])
    if c.ndim > rank:
        raise ctx.fail(f"constant of shape {list(c.shape)} has more axes than the activation")
    c = c.reshape((1,) * (rank - c.ndim) + c.shape)
    return np.ascontiguousarray(c.transpose(ctx.layouts[like]))


def _channel_vector(ctx, c: np.ndarray, x: str) -> np.ndarray | None:
    """The constant as a per-output-channel vector if it only varies along the channel axis."""
    phys = _const_in_layout(ctx, c, x)
    nch = ctx.graph.tensors[x].shape[-1]
    if any(d != 1 for d in phys.shape[:-1]) or phys.shape[-1] not in (1, nch):
        return None
    return np.broadcast_to(phys.reshape(-1), (nch,)).astype(np.float64)


def _foldable_producer(ctx, onnx_in: str, x: str):
    prod = ctx.graph.producer(x)
    if (prod is not None and prod.op in ("conv2d", "dense") and "act_lo" not in prod.attrs
            and "act_hi" not in prod.attrs and ctx.onnx_uses.get(onnx_in, 0) == 1 and prod.outputs[0] == x):
        return prod
    return None


def _binary(ctx, node, op: str, signs: list[int] | None = None) -> None:
    a_c, b_c = ctx.const(node.input[0]), ctx.const(node.input[1])
    attrs = {"signs": signs} if signs else {}
    if a_c is None and b_c is None:
        a = ctx.value(node.input[0])
        b = ctx.to_layout(ctx.value(node.input[1]), ctx.layouts[a])
        ctx.emit(op, [a, b], attrs, onnx_out=node.output[0])
        return
    if a_c is not None and b_c is not None:
        raise ctx.fail("both operands are constants")
    x_onnx = node.input[1] if a_c is not None else node.input[0]
    c = (a_c if a_c is not None else b_c).astype(np.float64)
    if op == "add" and signs and a_c is not None:  # c - x
        attrs["signs"] = [-1, 1]
    elif op == "add" and signs:  # x - c
        c = -c
        attrs.pop("signs")
    x = ctx.value(x_onnx)
    if np.all(c == (0.0 if op == "add" else 1.0)) and not attrs.get("signs"):
        ctx.bind(node.output[0], x)  # x + 0, x * 1
        return
    prod = _foldable_producer(ctx, x_onnx, x)
    vec = _channel_vector(ctx, c, x) if prod is not None else None
    if prod is not None and vec is not None and not attrs.get("signs"):
        wname, bname = prod.params["weight"], prod.params["bias"]
        b = ctx.graph.constants[bname].astype(np.float64)
        if op == "add":
            ctx.graph.constants[bname] = (b + vec).astype(np.float32)
        else:
            w = ctx.graph.constants[wname].astype(np.float64)
            ctx.graph.constants[wname] = (w * vec.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
            ctx.graph.constants[bname] = (b * vec).astype(np.float32)
            prod.attrs.pop("w_scale", None)
        prod.attrs.setdefault("folded", []).append(node.name)
        ctx.bind(node.output[0], x)
        return
    ctx.emit(op, [x], attrs, {"const": _const_in_layout(ctx, c, x).astype(np.float32)}, onnx_out=node.output[0])


@onnx_importer("Add")
def import_add(ctx, node) -> None:
    _binary(ctx, node, "add")


@onnx_importer("Sub")
def import_sub(ctx, node) -> None:
    _binary(ctx, node, "add", signs=[1, -1])


@onnx_importer("Mul")
def import_mul(ctx, node) -> None:
    _binary(ctx, node, "mul")


@onnx_importer("Div")
def import_div(ctx, node) -> None:
    d = ctx.const(node.input[1])
    if d is None or np.any(d == 0):
        raise ctx.fail("Div is supported only by a non-zero constant")
    ctx.consts[f"{node.name}/reciprocal"] = (1.0 / d.astype(np.float64)).astype(np.float32)
    node.input[1] = f"{node.name}/reciprocal"
    _binary(ctx, node, "mul")


@onnx_importer("Relu")
def import_relu(ctx, node) -> None:
    ctx.emit("clamp", [ctx.value(node.input[0])], {"act_lo": 0.0}, onnx_out=node.output[0])


@onnx_importer("Clip")
def import_clip(ctx, node) -> None:
    if ctx.opset < 11:
        lo, hi = ctx.attr("min"), ctx.attr("max")
    else:
        lo = ctx.require_const(node.input[1], "min") if len(node.input) > 1 and node.input[1] else None
        hi = ctx.require_const(node.input[2], "max") if len(node.input) > 2 and node.input[2] else None
    attrs = {}
    if lo is not None:
        attrs["act_lo"] = float(lo)
    if hi is not None:
        attrs["act_hi"] = float(hi)
    ctx.emit("clamp", [ctx.value(node.input[0])], attrs, onnx_out=node.output[0])
