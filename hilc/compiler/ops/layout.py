"""Ops that move or join data without arithmetic: reshape, transpose, concat, pad.

reshape/transpose/pad keep their input's quantization (pad fills with the quantized pad
value, the zero point for 0). concat rescales each input to the output scale with its own
dyadic pair (a copy where the scales already match).

ONNX Flatten/Reshape/Squeeze/Unsqueeze become ``reshape`` on the data in ONNX order; ONNX
Transpose only relabels axes (the importer tracks each tensor's physical layout), so it costs
nothing unless a later reshape needs the data in ONNX order.
"""

from __future__ import annotations

import numpy as np

from hilc.compiler import arith
from hilc.compiler.ops.base import Op, axis_split, in_quant, onnx_importer, out_quant, register


@register
class Reshape(Op):
    name = "reshape"
    inplace_ok = True
    output_quant_rule = "input"

    def infer_shapes(self, node, in_shapes, graph):
        return [tuple(node.attrs["shape"])]

    def eval_float(self, node, graph, xs):
        return [xs[0].reshape(xs[0].shape[0], *node.attrs["shape"][1:])]

    eval_int = eval_float

    def float_forward(self, node, graph, xs, params):
        return [xs[0].reshape(xs[0].shape[0], *node.attrs["shape"][1:])], xs[0].shape

    def float_backward(self, node, cache, dys, param_grads=True):
        return [dys[0].reshape(cache)], {}

    def lower_tvm(self, node, graph, tb):
        x = tb.input(node)
        in_dims = [int(d) for d in graph.tensors[node.inputs[0]].shape[1:]]
        out_dims = [int(d) for d in node.attrs["shape"][1:]]

        def f(b, *i):
            flat = 0
            for k, d in zip(i, out_dims, strict=True):
                flat = flat * d + k
            src = []
            for d in reversed(in_dims):
                src.append(flat % d)
                flat = flat // d
            return x[(b, *reversed(src))]

        return [tb.te.compute(tb.shape(node.outputs[0]), f, name=tb.name(node))]

    def lower_c(self, node, graph, em) -> str:
        x, y = node.inputs[0], node.outputs[0]
        return f"hilc_copy_s8({em.size(y)}, {em.tensor(x)}, {em.tensor(y)});"

    def lower_hls(self, node, graph, ctx) -> dict:
        from hilc.targets.hls import lower as hl

        # Row-major order is unchanged by a reshape: the stream passes through.
        return hl.unary_layer(ctx, node, "copy")


@register
class Transpose(Op):
    name = "transpose"
    output_quant_rule = "input"

    def infer_shapes(self, node, in_shapes, graph):
        return [tuple(in_shapes[0][p] for p in node.attrs["perm"])]

    def eval_float(self, node, graph, xs):
        return [np.ascontiguousarray(xs[0].transpose(node.attrs["perm"]))]

    eval_int = eval_float

    def float_forward(self, node, graph, xs, params):
        return [xs[0].transpose(node.attrs["perm"])], None

    def float_backward(self, node, cache, dys, param_grads=True):
        return [dys[0].transpose(np.argsort(node.attrs["perm"]))], {}

    def lower_tvm(self, node, graph, tb):
        x = tb.input(node)
        perm = node.attrs["perm"]

        def f(*i):
            src = [None] * len(perm)
            for k, p in enumerate(perm):
                src[p] = i[k]
            return x[tuple(src)]

        return [tb.te.compute(tb.shape(node.outputs[0]), f, name=tb.name(node))]

    def lower_c(self, node, graph, em) -> str:
        from hilc.targets.c.codegen import dims4

        shape = graph.tensors[node.inputs[0]].shape
        lead = 4 - (len(shape) - 1)
        perm = list(range(lead)) + [p - 1 + lead for p in node.attrs["perm"][1:]]
        p = em.struct("hilc_transpose_params", node.name, dict(in_dims=dims4(shape), perm=perm))
        return f"hilc_transpose_s8({p}, {em.tensor(node.inputs[0])}, {em.tensor(node.outputs[0])});"

    def lower_hls(self, node, graph, ctx) -> dict:
        from hilc.targets.hls import lower as hl

        shape = hl.tensor_shape(graph, node.inputs[0])
        d4 = hl.dims4(node, shape)
        lead = 4 - (len(shape) - 1)
        perm = list(range(lead)) + [p - 1 + lead for p in node.attrs["perm"][1:]]
        st = hl.strides4(d4)
        tabs = [[i * st[perm[d]] for i in range(d4[perm[d]])] for d in range(4)]
        return hl.gather_layer(ctx, node, tabs, 0, "transpose")


@register
class Concat(Op):
    name = "concat"

    def infer_shapes(self, node, in_shapes, graph):
        ax = node.attrs["axis"]
        out = list(in_shapes[0])
        out[ax] = sum(s[ax] for s in in_shapes)
        return [tuple(out)]

    def eval_float(self, node, graph, xs):
        return [np.concatenate(xs, axis=node.attrs["axis"])]

    def quantize(self, node, graph):
        qo = out_quant(graph, node)
        mults, shifts, zps = [], [], []
        for i in range(len(node.inputs)):
            qi = in_quant(graph, node, i)
            b, c = arith.dyadic(qi.scale / qo.scale)
            mults.append(int(b[0]))
            shifts.append(int(c[0]))
            zps.append(qi.zero_point)
        node.attrs.update(zp_in=zps, zp_out=qo.zero_point, mults=mults, shifts=shifts, lo=qo.qmin, hi=qo.qmax)

    def eval_int(self, node, graph, xs):
        a = node.attrs
        parts = []
        for x, zp, b, c in zip(xs, a["zp_in"], a["mults"], a["shifts"], strict=True):
            y = arith.rounding_shift((x.astype(np.int64) - zp) * b, c) + a["zp_out"]
            parts.append(np.clip(y, a["lo"], a["hi"]).astype(np.int8))
        return [np.concatenate(parts, axis=a["axis"])]

    def lower_tvm(self, node, graph, tb):
        tx = tb.tirx
        a = node.attrs
        ax = a["axis"]
        parts, start = [], 0
        for i, t in enumerate(node.inputs):
            rq = tb.requantizer(node, a["mults"][i], a["shifts"][i], a["zp_out"], a["lo"], a["hi"], bound=256,
                                label=f"rq{i}")
            ext = graph.tensors[t].shape[ax]
            parts.append((tb.input(node, i), start, ext, tb.scalar(node, f"zp{i}", a["zp_in"][i], "int32"), rq))
            start += ext

        def f(*idx):
            val = None
            for x, s0, ext, zp, rq in reversed(parts):
                src = (*idx[:ax], idx[ax] - s0, *idx[ax + 1:])
                v = rq(x[src].astype("int32") - zp)
                val = v if val is None else tx.if_then_else(idx[ax] < s0 + ext, v, val)
            return val

        return [tb.te.compute(tb.shape(node.outputs[0]), f, name=tb.name(node))]

    def lower_c(self, node, graph, em) -> str:
        # Built on the stack: an input may be the caller's buffer, not a link-time constant.
        a = node.attrs
        shape = graph.tensors[node.outputs[0]].shape
        ax = a["axis"]
        entries = ", ".join(
            f"{{{graph.tensors[t].shape[ax]}, {zp}, {b}, {c}, {em.tensor(t)}}}"
            for t, zp, b, c in zip(node.inputs, a["zp_in"], a["mults"], a["shifts"], strict=True))
        outer, inner = axis_split(shape, ax)
        return (f"{{ const hilc_concat_input in[] = {{{entries}}}; const hilc_concat_params p = {{{outer}, {inner}, "
                f"{len(node.inputs)}, {a['zp_out']}, {a['lo']}, {a['hi']}, in}}; "
                f"hilc_concat_s8(&p, {em.tensor(node.outputs[0])}); }}")

    def lower_hls(self, node, graph, ctx) -> dict:
        from hilc.targets.hls import lower as hl

        a = node.attrs
        shape = hl.tensor_shape(graph, node.outputs[0])
        ax = a["axis"]
        outer, inner = axis_split(shape, ax)
        parts = []
        for t, zp, b, c in zip(node.inputs, a["zp_in"], a["mults"], a["shifts"], strict=True):
            parts.append(dict(block=hl.tensor_shape(graph, t)[ax] * inner, zp=zp, mult=b, shift=c, t=ctx.act_t(t),
                              diff_t=f"ap_int<{hl.tensor_bits(graph, t) + 1}>"))
        return dict(kind="concat", outer=outer, parts=parts, zp_out=a["zp_out"], lo=a["lo"], hi=a["hi"],
                    n=hl.elems(shape), act_bits=hl.tensor_bits(graph, node.outputs[0]),
                    doc=f"{node.name}: concat of {len(parts)} inputs along axis {ax}")


@register
class Pad(Op):
    name = "pad"
    output_quant_rule = "input"

    def infer_shapes(self, node, in_shapes, graph):
        return [tuple(d + b + e for d, (b, e) in zip(in_shapes[0], node.attrs["pads"], strict=True))]

    def _pad(self, x, node, value):
        mode = node.attrs["mode"]
        if mode == "constant":
            return np.pad(x, node.attrs["pads"], constant_values=value)
        return np.pad(x, node.attrs["pads"], mode={"edge": "edge", "reflect": "reflect"}[mode])

    def eval_float(self, node, graph, xs):
        return [self._pad(xs[0], node, node.attrs["value"])]

    def quantize(self, node, graph):
        q = in_quant(graph, node)
        v = int(np.clip(np.rint(node.attrs["value"] / q.scale) + q.zero_point, q.qmin, q.qmax))
        node.attrs["value_q"] = v

    def eval_int(self, node, graph, xs):
        return [self._pad(xs[0], node, node.attrs["value_q"])]

    def lower_tvm(self, node, graph, tb):
        tx = tb.tirx
        x = tb.input(node)
        dims = graph.tensors[node.inputs[0]].shape
        pads, mode = node.attrs["pads"], node.attrs["mode"]
        fill = tb.scalar(node, "value", node.attrs["value_q"], "int8") if mode == "constant" else None

        def f(*i):
            src, inside = [i[0]], []
            for k in range(1, len(dims)):
                j, d = i[k] - pads[k][0], int(dims[k])
                if mode == "constant":
                    inside += [j >= 0, j < d]
                elif mode == "edge":
                    j = tx.max(tx.min(j, d - 1), 0)
                else:  # reflect (numpy's, pads below the axis length)
                    j = tx.if_then_else(j < 0, -j, j)
                    j = tx.if_then_else(j >= d, 2 * (d - 1) - j, j)
                src.append(j)
            v = x[tuple(src)]
            if inside:
                v = tx.if_then_else(tx.all(*inside), v, fill)
            return v

        return [tb.te.compute(tb.shape(node.outputs[0]), f, name=tb.name(node))]

    def lower_c(self, node, graph, em) -> str:
        from hilc.targets.c.codegen import dims4

        shape = graph.tensors[node.inputs[0]].shape
        lead = [0] * (4 - (len(shape) - 1))
        pads = node.attrs["pads"][1:]
        p = em.struct("hilc_pad_params", node.name, dict(
            in_dims=dims4(shape), before=lead + [b for b, _ in pads], after=lead + [e for _, e in pads],
            mode={"constant": 0, "edge": 1, "reflect": 2}[node.attrs["mode"]], value=node.attrs["value_q"]))
        return f"hilc_pad_s8({p}, {em.tensor(node.inputs[0])}, {em.tensor(node.outputs[0])});"

    def lower_hls(self, node, graph, ctx) -> dict:
        from hilc.targets.hls import lower as hl

        a = node.attrs
        shape = hl.tensor_shape(graph, node.inputs[0])
        d4 = hl.dims4(node, shape)
        lead = 4 - (len(shape) - 1)
        pads = [(0, 0)] * lead + [tuple(p) for p in a["pads"][1:]]
        st = hl.strides4(d4)
        tabs = []
        for d in range(4):
            idx = np.arange(d4[d])
            if a["mode"] == "constant":
                src = np.pad(idx, pads[d], constant_values=-1)
            else:
                src = np.pad(idx, pads[d], mode={"edge": "edge", "reflect": "reflect"}[a["mode"]])
            tabs.append([int(s) * st[d] if s >= 0 else -1 for s in src])
        return hl.gather_layer(ctx, node, tabs, a["value_q"], f"pad ({a['mode']})")


# --- ONNX importers ------------------------------------------------------------------------

def _reshape_logical(ctx, node, x: str, new_shape: list[int]) -> None:
    """Emit a reshape of x (in ONNX order) to a logical shape that keeps the batch axis first."""
    from hilc.compiler.onnx_import import identity_layout

    in_shape = ctx.logical_shape(x)
    if not new_shape or new_shape[0] != in_shape[0] or int(np.prod(new_shape)) != int(np.prod(in_shape)):
        raise ctx.fail(f"reshape from {list(in_shape)} to {new_shape} must keep the batch axis first")
    if list(new_shape) == list(in_shape):
        ctx.bind(node.output[0], x)
        return
    xl = ctx.to_logical(x)
    ctx.emit("reshape", [xl], {"shape": list(new_shape)}, layout=identity_layout(len(new_shape)),
             onnx_out=node.output[0])


@onnx_importer("Flatten")
def import_flatten(ctx, node) -> None:
    x = ctx.value(node.input[0])
    shape = ctx.logical_shape(x)
    axis = int(ctx.attr("axis", 1)) % max(len(shape), 1)
    if axis == 0:
        raise ctx.fail("Flatten with axis 0 merges the batch axis")
    _reshape_logical(ctx, node, x, [int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))])


@onnx_importer("Reshape")
def import_reshape(ctx, node) -> None:
    x = ctx.value(node.input[0])
    target = [int(v) for v in ctx.require_const(node.input[1], "shape")]
    in_shape = ctx.logical_shape(x)
    allowzero = int(ctx.attr("allowzero", 0))
    out = [in_shape[i] if (d == 0 and not allowzero and i < len(in_shape)) else d for i, d in enumerate(target)]
    if out.count(-1) > 1:
        raise ctx.fail(f"shape {target} has more than one -1")
    if -1 in out:
        known = int(np.prod([d for d in out if d != -1]))
        if known == 0 or int(np.prod(in_shape)) % known:
            raise ctx.fail(f"cannot reshape {list(in_shape)} to {target}")
        out[out.index(-1)] = int(np.prod(in_shape)) // known
    _reshape_logical(ctx, node, x, out)


def _axes(ctx, node, rank: int) -> list[int] | None:
    if ctx.opset >= 13:
        a = ctx.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    else:
        a = ctx.attr("axes")
    return None if a is None else sorted(int(v) % rank for v in np.asarray(a).reshape(-1))


@onnx_importer("Squeeze")
def import_squeeze(ctx, node) -> None:
    x = ctx.value(node.input[0])
    shape = ctx.logical_shape(x)
    axes = _axes(ctx, node, len(shape))
    if axes is None:
        axes = [i for i, d in enumerate(shape) if d == 1 and i > 0]
    if 0 in axes:
        raise ctx.fail("squeezing the batch axis is not supported")
    if any(shape[a] != 1 for a in axes):
        raise ctx.fail(f"cannot squeeze axes {axes} of shape {list(shape)}")
    _reshape_logical(ctx, node, x, [d for i, d in enumerate(shape) if i not in axes])


@onnx_importer("Unsqueeze")
def import_unsqueeze(ctx, node) -> None:
    x = ctx.value(node.input[0])
    shape = list(ctx.logical_shape(x))
    rank = len(shape) + len(_axes(ctx, node, 1 << 30) or [])
    axes = _axes(ctx, node, rank)
    if axes is None:
        raise ctx.fail("Unsqueeze needs constant axes")
    if 0 in axes:
        raise ctx.fail("unsqueezing before the batch axis is not supported")
    for a in axes:
        shape.insert(a, 1)
    _reshape_logical(ctx, node, x, shape)


@onnx_importer("Transpose")
def import_transpose(ctx, node) -> None:
    x = ctx.value(node.input[0])
    rank = len(ctx.layouts[x])
    perm = list(ctx.attr("perm", list(reversed(range(rank)))))
    if perm[0] != 0:
        raise ctx.fail(f"Transpose perm {perm} moves the batch axis")
    inv = [perm.index(i) for i in range(rank)]
    new_layout = tuple(inv[a] for a in ctx.layouts[x])
    # Same bytes, new axis labels: a reshape that does not change the physical shape.
    ctx.emit("reshape", [x], {"shape": list(ctx.graph.tensors[x].shape)}, layout=new_layout,
             onnx_out=node.output[0])


@onnx_importer("Identity", "Dropout")
def import_identity(ctx, node) -> None:
    if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]:
        if ctx.onnx_uses.get(node.output[1], 0):
            raise ctx.fail("Dropout's mask output is used")
    ctx.bind(node.output[0], ctx.value(node.input[0]))


@onnx_importer("Cast")
def import_cast(ctx, node) -> None:
    import onnx

    if int(ctx.attr("to")) in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
        from hilc.compiler.ops.gather import cast_to_indices

        cast_to_indices(ctx, node)  # token ids for an embedding
        return
    if int(ctx.attr("to")) not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
        raise ctx.fail("Cast of an activation to a non-float type is not supported")
    ctx.bind(node.output[0], ctx.value(node.input[0]))


@onnx_importer("Shape")
def import_shape(ctx, node) -> None:
    shape = np.array(ctx.logical_shape(ctx.value(node.input[0])), np.int64)
    start, end = ctx.attr("start", 0), ctx.attr("end", None)
    ctx.consts[node.output[0]] = shape[start:end]


@onnx_importer("Concat")
def import_concat(ctx, node) -> None:
    if any(ctx.const(i) is not None for i in node.input):
        raise ctx.fail("Concat with a constant input is not supported")
    first = ctx.value(node.input[0])
    rank = len(ctx.layouts[first])
    axis = int(ctx.attr("axis")) % rank
    if axis == 0:
        raise ctx.fail("Concat along the batch axis is not supported")
    xs = [first] + [ctx.to_layout(ctx.value(i), ctx.layouts[first]) for i in node.input[1:]]
    ctx.emit("concat", xs, {"axis": ctx.phys_axis(first, axis)}, onnx_out=node.output[0])


@onnx_importer("Pad")
def import_pad(ctx, node) -> None:
    x = ctx.value(node.input[0])
    rank = len(ctx.layouts[x])
    if ctx.opset >= 11:
        pads = [int(v) for v in ctx.require_const(node.input[1], "pads")]
        value = ctx.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        value = 0.0 if value is None else float(np.asarray(value).reshape(-1)[0])
        if len(node.input) > 3 and node.input[3]:
            raise ctx.fail("Pad with an axes input is not supported")
    else:
        pads, value = list(ctx.attr("pads")), float(ctx.attr("value", 0.0))
    mode = ctx.attr("mode", "constant")
    if mode not in ("constant", "edge", "reflect"):
        raise ctx.fail(f"Pad mode '{mode}' is not supported")
    if any(p < 0 for p in pads):
        raise ctx.fail("negative pads (cropping) are not supported")
    logical = [(pads[i], pads[i + rank]) for i in range(rank)]
    if logical[0] != (0, 0):
        raise ctx.fail("padding the batch axis is not supported")
    phys = [list(logical[a]) for a in ctx.layouts[x]]
    ctx.emit("pad", [x], {"pads": phys, "mode": mode, "value": value}, onnx_out=node.output[0])


def _quantized_form_reached(ctx, node) -> None:
    raise ctx.fail("this quantized form is not supported here (a QuantizeLinear/DequantizeLinear pair "
                   "is expected around each float op)")


for _op in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"):
    onnx_importer(_op)(_quantized_form_reached)
onnx_importer("Constant")(lambda ctx, node: None)  # handled by the import walk itself
