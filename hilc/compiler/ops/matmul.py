"""MatMul of two activations (attention scores q @ k^T and context p @ v), integer-only.

Inputs ``a`` [1, *batch, M, K] and ``bt`` [1, *batch, N, K]: the second operand is kept
transposed (its rows are the output columns) so both operands are read along contiguous K,
which is also what the DSP dot product wants. The importer asks for that layout; an ONNX
Transpose in front of it then costs nothing.

    acc = sum_k (a[m, k] - zp_a) * (bt[n, k] - zp_b)          (int32, bound checked at compile time)
    y   = clamp(round(acc * b / 2^c) + zp_out)                 b / 2^c ~ alpha * s_a * s_b / s_out

(alpha: a positive scalar multiply folded in by ``passes.fold_scalars``, e.g. 1/sqrt(d)).

The DSP kernel computes the same integer as sum_k (a - zp_a) * bt - zp_b * sum_k (a - zp_a).
"""

from __future__ import annotations

import numpy as np

from hilc.compiler import arith
from hilc.compiler.ops.base import (
    Op,
    apply_float_activation,
    clamp_bounds,
    exact_dtype,
    in_quant,
    out_quant,
    register,
)
from hilc.errors import UnsupportedModelError


def _absmax(q) -> int:
    return max(q.zero_point - q.qmin, q.qmax - q.zero_point)


@register
class MatMul(Op):
    name = "matmul"

    def infer_shapes(self, node, in_shapes, graph):
        a, bt = in_shapes
        return [(*a[:-1], bt[-2])]

    def eval_float(self, node, graph, xs):
        a, bt = (x.astype(np.float32) for x in xs)
        return [apply_float_activation(node, (a @ np.swapaxes(bt, -1, -2)) * node.attrs.get("alpha", 1.0))]

    def quantize(self, node, graph):
        qa, qb, qo = in_quant(graph, node, 0), in_quant(graph, node, 1), out_quant(graph, node)
        k = graph.tensors[node.inputs[0]].shape[-1]
        bound = k * _absmax(qa) * _absmax(qb)
        if bound > arith.INT32_MAX:
            raise UnsupportedModelError(f"{node.onnx_name or node.name}: MatMul over K={k} could overflow the "
                                        f"int32 accumulator (bound {bound})")
        mult, shift = arith.dyadic(node.attrs.get("alpha", 1.0) * qa.scale * qb.scale / qo.scale)
        lo, hi = clamp_bounds(node, qo)
        node.attrs.pop("act_lo", None)
        node.attrs.pop("act_hi", None)
        node.attrs.update(zp_a=qa.zero_point, zp_b=qb.zero_point, zp_out=qo.zero_point, mult=int(mult[0]),
                          shift=int(shift[0]), lo=lo, hi=hi, acc_bound=int(bound))

    def eval_int(self, node, graph, xs):
        a = node.attrs
        dtype = exact_dtype(a["acc_bound"])
        da = xs[0].astype(dtype) - a["zp_a"]
        db = xs[1].astype(dtype) - a["zp_b"]
        acc = np.matmul(da, np.swapaxes(db, -1, -2))
        return [arith.requantize(acc, a["mult"], a["shift"], a["zp_out"], a["lo"], a["hi"],
                                 acc_bound=a["acc_bound"], scratch=acc.dtype == np.float64)]

    def lower_tvm(self, node, graph, tb):
        te = tb.te
        a = node.attrs
        x, bt = tb.input(node, 0), tb.input(node, 1)
        k_n = int(graph.tensors[node.inputs[0]].shape[-1])
        dtype = tb.acc_dtype(a["acc_bound"])  # float32 only where every partial sum is an exact integer
        k = te.reduce_axis((0, k_n), "k")
        zp_a, zp_b = tb.scalar(node, "zp_a", a["zp_a"], "int32"), tb.scalar(node, "zp_b", a["zp_b"], "int32")

        def f(*i):
            da = x[(*i[:-1], k)].astype("int32") - zp_a
            db = bt[(*i[:-2], i[-1], k)].astype("int32") - zp_b
            return te.sum(da.astype(dtype) * db.astype(dtype), axis=k)

        acc = te.compute(tb.shape(node.outputs[0]), f, name=tb.name(node, "acc"))
        rq = tb.requantizer(node, a["mult"], a["shift"], a["zp_out"], a["lo"], a["hi"], bound=a["acc_bound"])
        return [te.compute(tb.shape(node.outputs[0]), lambda *i: rq(acc[i]), name=tb.name(node))]

    def macs(self, node, graph):
        out = graph.tensors[node.outputs[0]].shape
        return int(np.prod(out[1:], dtype=np.int64)) * graph.tensors[node.inputs[0]].shape[-1]

    def lower_c(self, node, graph, em) -> str:
        a = node.attrs
        sa, sb = graph.tensors[node.inputs[0]].shape, graph.tensors[node.inputs[1]].shape
        p = em.struct("hilc_matmul_params", node.name, dict(
            batch=int(np.prod(sa[1:-2], dtype=np.int64)), m=sa[-2], k=sa[-1], n=sb[-2], zp_a=a["zp_a"],
            zp_b=a["zp_b"], zp_out=a["zp_out"], mult=a["mult"], shift=a["shift"], lo=a["lo"], hi=a["hi"]))
        em.need_scratch(sa[-1])
        return (f"hilc_matmul({p}, {em.tensor(node.inputs[0])}, {em.tensor(node.inputs[1])}, "
                f"{em.tensor(node.outputs[0])}, HILC_SCRATCH);")

    def lower_hls(self, node, graph, ctx) -> dict:
        from hilc.targets.hls import lower as hl

        a = node.attrs
        sa, sb = hl.tensor_shape(graph, node.inputs[0]), hl.tensor_shape(graph, node.inputs[1])
        if sa[:-2] != sb[:-2] or sa[-1] != sb[-1]:
            raise hl.cannot(node, f"operands {list(sa)} and {list(sb)} (transposed) differ in batch axes")
        ab = max(hl.tensor_bits(graph, node.inputs[0]), hl.tensor_bits(graph, node.inputs[1]))
        m, k, n = sa[-2], sa[-1], sb[-2]
        return dict(kind="matmul", batch=int(np.prod(sa[1:-2], dtype=np.int64)), m=m, k=k, nn=n,
                    zp_a=a["zp_a"], zp_b=a["zp_b"], zp_out=a["zp_out"], mult=a["mult"], shift=a["shift"], lo=a["lo"],
                    hi=a["hi"], acc_t=f"ap_int<{hl.acc_bits_for(a['acc_bound'])}>", diff_t=f"ap_int<{ab + 1}>",
                    n=hl.elems(hl.tensor_shape(graph, node.outputs[0])), act_bits=ab,
                    macs=int(np.prod(sa[1:-2], dtype=np.int64)) * m * n * k,
                    doc=f"{node.name}: matmul of activations [{m}x{k}] x [{k}x{n}], {int(np.prod(sa[1:-2]))} batch(es)")


def import_matmul_activations(ctx, node) -> None:
    """ONNX MatMul whose both inputs are activations of the same rank (>= 3, equal batch axes)."""
    from hilc.compiler.onnx_import import identity_layout

    a, b = ctx.value(node.input[0]), ctx.value(node.input[1])
    la, lb = ctx.logical_shape(a), ctx.logical_shape(b)
    if len(la) != len(lb) or len(la) < 3:
        raise ctx.fail(f"MatMul of activations needs operands of equal rank >= 3, got {list(la)} and {list(lb)}")
    if la[:-2] != lb[:-2]:
        raise ctx.fail(f"MatMul of activations with broadcast batch axes ({list(la)} x {list(lb)}) is not supported")
    if la[-1] != lb[-2]:
        raise ctx.fail(f"MatMul shapes {list(la)} and {list(lb)} do not match")
    rank = len(la)
    a2 = ctx.to_logical(a)
    bt = ctx.to_layout(b, (*range(rank - 2), rank - 1, rank - 2))  # [.., N, K]: rows are output columns
    ctx.emit("matmul", [a2, bt], layout=identity_layout(rank), onnx_out=node.output[0])
