"""Fully connected layer over the last axis: y[..., o] = sum_k x[..., k] w[o, k] + b[o].

Params and quantization as conv2d (``quantize_linear_layer``): per-channel int8 weights [O, K],
int32 bias, dyadic requantization per output channel.
"""

from __future__ import annotations

import numpy as np

from hilc.compiler import arith, minifloat
from hilc.compiler.ops.base import Op, apply_float_activation, exact_matmul, onnx_importer, register
from hilc.compiler.ops.conv import _prepared, linear_offset, quantize_linear_layer, refuse_minifloat


@register
class Dense(Op):
    name = "dense"

    def infer_shapes(self, node, in_shapes, graph):
        w = graph.constants[node.params["weight"]]
        return [(*in_shapes[0][:-1], w.shape[0])]

    def eval_float(self, node, graph, xs):
        w = graph.param(node, "weight").astype(np.float32)
        y = xs[0].astype(np.float32) @ w.T + graph.param(node, "bias").astype(np.float32)
        return [apply_float_activation(node, y)]

    def float_forward(self, node, graph, xs, params):
        w = params["weight"]
        return [xs[0] @ w.T + params["bias"]], (xs[0], w)

    def float_backward(self, node, cache, dys, param_grads=True):
        x, w = cache
        dy = dys[0]
        return [dy @ w], ({"weight": dy.T @ x, "bias": dy.sum(axis=0)} if param_grads else {})

    def quantize(self, node, graph):
        quantize_linear_layer(node, graph)

    def eval_int(self, node, graph, xs):
        a = node.attrs
        x = xs[0]
        if a.get("format"):  # minifloat: exact products in fixed point (hilc.compiler.minifloat)
            xa, wf = minifloat.layer_inputs(node, graph, x)
            acc = exact_matmul(xa.reshape(-1, x.shape[-1]), wf.T, a["raw_bound"]).reshape(*x.shape[:-1], wf.shape[0])
            return [minifloat.requantize_layer(node, graph, acc)]
        w, offset = _prepared(node, graph)
        acc = exact_matmul(x.reshape(-1, x.shape[-1]), w.T, a["raw_bound"]).reshape(*x.shape[:-1], w.shape[0])
        acc = acc + offset if acc.dtype == np.int64 else acc.astype(np.float64) + offset
        return [arith.requantize(acc, graph.param(node, "mult"), graph.param(node, "shift"), a["zp_out"],
                                 a["lo"], a["hi"], acc_bound=a["acc_bound"], scratch=True)]

    def lower_tvm(self, node, graph, tb):
        refuse_minifloat(node, "TVM")
        te = tb.te
        a = node.attrs
        x = tb.input(node)
        w = graph.param(node, "weight")
        o_n, k_n = w.shape
        dtype = tb.acc_dtype(a["raw_bound"])
        wt = tb.const(node, "w", np.ascontiguousarray(w.T).astype(dtype))  # [K, O]
        k = te.reduce_axis((0, k_n), "k")
        out_shape = tb.shape(node.outputs[0])
        acc = te.compute(out_shape, lambda *i: te.sum(x[(*i[:-1], k)].astype(dtype) * wt[k, i[-1]], axis=k),
                         name=tb.name(node, "acc"))
        rq = tb.requantizer(node, graph.param(node, "mult"), graph.param(node, "shift"), a["zp_out"], a["lo"],
                            a["hi"], a["acc_bound"], offset=linear_offset(node, graph))
        y = te.compute(out_shape, lambda *i: rq(acc[i], i[-1]), name=tb.name(node))
        tb.tile_conv(acc, y)
        return [y]

    def macs(self, node, graph):
        w = graph.param(node, "weight")
        rows = int(np.prod(graph.tensors[node.inputs[0]].shape[1:-1], dtype=np.int64))
        return rows * int(w.size)

    def lower_c(self, node, graph, em) -> str:
        refuse_minifloat(node, "MCU C")
        a = node.attrs
        shape = graph.tensors[node.inputs[0]].shape
        w = graph.param(node, "weight")
        p = em.struct("hilc_dense_params", node.name, dict(
            rows=int(np.prod(shape[1:-1], dtype=np.int64)), in_features=w.shape[1], out_features=w.shape[0],
            zp_in=a["zp_in"], zp_out=a["zp_out"], lo=a["lo"], hi=a["hi"], **em.weights(node),
            bias=em.param(node, "bias"), mult=em.param(node, "mult"), shift=em.param(node, "shift")))
        em.need_scratch(w.shape[1])
        return f"hilc_dense({p}, {em.tensor(node.inputs[0])}, {em.tensor(node.outputs[0])}, HILC_SCRATCH);"

    def lower_hls(self, node, graph, ctx) -> dict:
        from hilc.targets.hls import lower as hl

        a = node.attrs
        shape = hl.tensor_shape(graph, node.inputs[0])
        wq = graph.param(node, "weight")
        o, k = wq.shape
        wb = int(a.get("weight_bits", 8))
        ab = hl.tensor_bits(graph, node.inputs[0])
        rows = int(np.prod(shape[1:-1], dtype=np.int64))
        return hl.minifloat_layer(ctx, node, dict(
            kind="dense", rows=rows, k=k, o=o,
            **hl.linear_fields(ctx, node, wq, wb, ab),
            pe_options=hl.divisors(o), simd_options=hl.divisors(k), macs=rows * o * k,
            doc=f"{node.name}: dense {k}->{o} over {rows} row(s), weights {wb}-bit, activations {ab}-bit",
        ), wq)


def _emit_dense(ctx, node, x: str, w: np.ndarray, bias: np.ndarray, w_src: str) -> None:
    attrs = {}
    ws = ctx.weight_scales.get(w_src)
    if ws is not None and ws.size in (1, w.shape[0]):
        attrs["w_scale"] = np.broadcast_to(ws, (w.shape[0],)).tolist()
    k = ctx.graph.tensors[x].shape[-1]
    if w.shape[1] != k:
        raise ctx.fail(f"weight shape {list(w.shape)} does not match the input's last axis {k}")
    ctx.emit("dense", [x], attrs, {"weight": w.astype(np.float32), "bias": bias.astype(np.float32)},
             onnx_out=node.output[0])


@onnx_importer("Gemm")
def import_gemm(ctx, node) -> None:
    if ctx.attr("transA", 0):
        raise ctx.fail("transA=1 (a transposed activation) is not supported")
    x = ctx.to_logical(ctx.value(node.input[0]))
    b = ctx.require_const(node.input[1], "B (weight)").astype(np.float64)
    w = b if ctx.attr("transB", 0) else b.T  # -> [O, K]
    alpha, beta = float(ctx.attr("alpha", 1.0)), float(ctx.attr("beta", 1.0))
    w = w * alpha
    o = w.shape[0]
    bias = np.zeros(o)
    if len(node.input) > 2 and node.input[2]:
        c = ctx.require_const(node.input[2], "C (bias)").astype(np.float64)
        if c.size not in (1, o) or (c.ndim == 2 and c.shape[0] != 1):
            raise ctx.fail(f"bias C of shape {list(c.shape)} does not broadcast per output column")
        bias = np.broadcast_to(c.reshape(-1), (o,)) * beta
    ws = ctx.weight_scales.get(node.input[1])
    if ws is not None and alpha != 1.0:
        ctx.weight_scales[node.input[1]] = ws * abs(alpha)
    _emit_dense(ctx, node, x, w, bias, node.input[1])


@onnx_importer("MatMul")
def import_matmul(ctx, node) -> None:
    b = ctx.const(node.input[1])
    if b is None:
        from hilc.compiler.ops.matmul import import_matmul_activations

        import_matmul_activations(ctx, node)  # attention: q @ k^T, p @ v
        return
    if b.ndim != 2:
        raise ctx.fail(f"MatMul with a {b.ndim}-D constant is not supported (2-D weights only)")
    x = ctx.to_logical(ctx.value(node.input[0]))
    w = b.astype(np.float64).T
    _emit_dense(ctx, node, x, w, np.zeros(w.shape[0]), node.input[1])
