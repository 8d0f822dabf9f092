"""ReduceMean over one axis (a transformer's mean over its tokens), integer-only.

    acc = sum_k (x[k] - zp_in)                 (int32: at most len * 255)
    y   = clamp(round(acc * b / 2^c) + zp_out)  b / 2^c ~ s_in / (len * s_out)

The division by the length is folded into the dyadic multiplier at compile time.
"""

from __future__ import annotations

import numpy as np

from hilc.compiler import arith
from hilc.compiler.ops.base import Op, axis_walk, in_quant, onnx_importer, out_quant, register
from hilc.errors import UnsupportedModelError


@register
class ReduceMean(Op):
    name = "reduce_mean"

    def infer_shapes(self, node, in_shapes, graph):
        s = list(in_shapes[0])
        s[node.attrs["axis"]] = 1
        if not node.attrs.get("keepdims", 1):
            del s[node.attrs["axis"]]
        return [tuple(s)]

    def _out_shape(self, x, node):
        return (x.shape[0], *self.infer_shapes(node, [x.shape], None)[0][1:])

    def eval_float(self, node, graph, xs):
        return [xs[0].astype(np.float64).mean(axis=node.attrs["axis"]).reshape(self._out_shape(xs[0], node))
                .astype(np.float32)]

    def quantize(self, node, graph):
        qi, qo = in_quant(graph, node), out_quant(graph, node)
        length = graph.tensors[node.inputs[0]].shape[node.attrs["axis"]]
        if length * 256 > arith.INT32_MAX:
            raise UnsupportedModelError(f"{node.onnx_name or node.name}: ReduceMean over {length} elements")
        b, c = arith.dyadic(qi.scale / (length * qo.scale))
        node.attrs.update(zp_in=qi.zero_point, zp_out=qo.zero_point, mult=int(b[0]), shift=int(c[0]),
                          lo=qo.qmin, hi=qo.qmax)

    def eval_int(self, node, graph, xs):
        a = node.attrs
        acc = (xs[0].astype(np.int64) - a["zp_in"]).sum(axis=a["axis"])
        y = arith.requantize(acc, a["mult"], a["shift"], a["zp_out"], a["lo"], a["hi"])
        return [y.reshape(self._out_shape(xs[0], node))]

    def lower_tvm(self, node, graph, tb):
        te = tb.te
        a = node.attrs
        x = tb.input(node)
        ax, keep = a["axis"], a.get("keepdims", 1)
        length = int(graph.tensors[node.inputs[0]].shape[ax])
        r = te.reduce_axis((0, length), "r")

        def src(i):
            return (*i[:ax], r, *i[ax + 1:]) if keep else (*i[:ax], r, *i[ax:])

        zp = tb.scalar(node, "zp_in", a["zp_in"], "int32")
        acc = te.compute(tb.shape(node.outputs[0]), lambda *i: te.sum(x[src(i)].astype("int32") - zp, axis=r),
                         name=tb.name(node, "sum"))
        rq = tb.requantizer(node, a["mult"], a["shift"], a["zp_out"], a["lo"], a["hi"], bound=256 * length)
        return [te.compute(tb.shape(node.outputs[0]), lambda *i: rq(acc[i]), name=tb.name(node))]

    def lower_c(self, node, graph, em) -> str:
        a = node.attrs
        p = em.struct("hilc_reduce_params", node.name, dict(
            **axis_walk(graph.tensors[node.inputs[0]].shape, a["axis"]), zp_in=a["zp_in"], zp_out=a["zp_out"],
            mult=a["mult"], shift=a["shift"], lo=a["lo"], hi=a["hi"]))
        return f"hilc_reduce_mean_s8({p}, {em.tensor(node.inputs[0])}, {em.tensor(node.outputs[0])});"

    def lower_hls(self, node, graph, ctx) -> dict:
        from hilc.targets.hls import lower as hl

        a = node.attrs
        shape = hl.tensor_shape(graph, node.inputs[0])
        ax = a["axis"]
        return dict(kind="reduce_mean", **axis_walk(shape, ax), zp_in=a["zp_in"], zp_out=a["zp_out"],
                    mult=a["mult"], shift=a["shift"], lo=a["lo"], hi=a["hi"], n=hl.elems(shape),
                    act_bits=hl.tensor_bits(graph, node.inputs[0]),
                    doc=f"{node.name}: mean over {shape[ax]} elements (axis {ax})")


@onnx_importer("ReduceMean")
def import_reduce_mean(ctx, node) -> None:
    from hilc.compiler.onnx_import import identity_layout

    x = ctx.value(node.input[0])
    rank = len(ctx.layouts[x])
    if ctx.opset >= 18:
        axes = ctx.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    else:
        axes = ctx.attr("axes")
    if axes is None:
        raise ctx.fail("ReduceMean over all axes is not supported (give axes)")
    axes = sorted({int(a) % rank for a in np.asarray(axes).reshape(-1)})
    keepdims = int(ctx.attr("keepdims", 1))
    if 0 in axes:
        raise ctx.fail("ReduceMean over the batch axis is not supported")
    xl = ctx.to_logical(x)
    shape = list(ctx.graph.tensors[xl].shape)
    if len(axes) > 1:  # adjacent axes reduce as one
        if axes != list(range(axes[0], axes[-1] + 1)):
            raise ctx.fail(f"ReduceMean over non-adjacent axes {axes} is not supported")
        merged = [*shape[:axes[0]], int(np.prod([shape[a] for a in axes])), *shape[axes[-1] + 1:]]
        xl = ctx.emit("reshape", [xl], {"shape": merged}, layout=identity_layout(len(merged)))
        out_rank = len(merged) - (0 if keepdims else 1)
        y = ctx.emit("reduce_mean", [xl], {"axis": axes[0], "keepdims": keepdims},
                     layout=identity_layout(out_rank))
        final = [1 if i in axes else d for i, d in enumerate(shape)] if keepdims else \
            [d for i, d in enumerate(shape) if i not in axes]
        ctx.emit("reshape", [y], {"shape": final}, layout=identity_layout(len(final)), onnx_out=node.output[0])
        return
    out_rank = rank - (0 if keepdims else 1)
    ctx.emit("reduce_mean", [xl], {"axis": axes[0], "keepdims": keepdims}, layout=identity_layout(out_rank),
             onnx_out=node.output[0])
