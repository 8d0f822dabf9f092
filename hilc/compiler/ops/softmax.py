"""Softmax over one axis, integer-only.

    d   = max(x) - x                      (0..255 for int8)
    e   = exp_table[d]                    (round(2^16 * exp(-s_in * d)), built at compile time)
    S   = sum(e)                          (>= 2^16: the maximum contributes 2^16)
    1/S : normalise S to a in [2^30, 2^31) with n = bit length of S, then three Newton-Raphson
          steps for y ~ 2^61 / a in Q30, starting from y0 = 48/17 - 32/17 * a (all int64, floor
          shifts):  t = (a * y) >> 31;  y = (y * (2^31 - t)) >> 30
    q   = clamp(rounding_shift(e * y * K, n + 30) + zp)      (ties to even, as everywhere)
          (output scale 1/K: K = 256 and zp = -128 by default; a QDQ model's 1/255 is kept)

No division and no float on the inference path.
"""

from __future__ import annotations

import numpy as np

from hilc.compiler.arith import rounding_shift
from hilc.compiler.ir import Graph, Node, QParams
from hilc.compiler.ops.base import Op, axis_walk, in_quant, onnx_importer, register
from hilc.errors import UnsupportedModelError

EXP_BITS = 16
NR_C1 = round(48 / 17 * 2**30)
NR_C2 = round(32 / 17 * 2**30)
NR_STEPS = 3


def bit_length(s: np.ndarray) -> np.ndarray:
    """Bit length of positive int64 values, exactly (a count-leading-zeros in C)."""
    n = np.zeros(s.shape, np.int64)
    v = s.copy()
    for step in (32, 16, 8, 4, 2, 1):
        big = v >= (np.int64(1) << step)
        n += np.where(big, step, 0)
        v = np.where(big, v >> step, v)
    return n + (v > 0)


def reciprocal_q30(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(y, n) with y / 2^30 ~ 2^n / s for 1 <= s < 2^31."""
    n = bit_length(s)
    a = s << (31 - n)
    y = NR_C1 - ((NR_C2 * a) >> 31)
    for _ in range(NR_STEPS):
        t = (a * y) >> 31
        y = (y * ((np.int64(1) << 31) - t)) >> 30
    return y, n



def final_softmax(graph: Graph) -> Node | None:
    """The softmax that produces the graph's first output, if any: its input is the model's logits,
    which the mixed-precision search, its re-ranking and the fine-tuning compare (probabilities
    saturate and hide a perturbation)."""
    last = graph.producer(graph.outputs[0])
    return last if last is not None and last.op == "softmax" else None

@register
class Softmax(Op):
    name = "softmax"
    output_quant_rule = "fixed"
    output_hint_ok = False  # the quantize step below adopts a QDQ scale only when it is 1/K

    def fixed_output_quant(self, node, graph):
        hint = graph.meta.get("quant_hints", {}).get(node.outputs[0])
        if hint is not None:
            k = round(1.0 / hint[0])
            if 1 <= k <= 256 and abs(1.0 / hint[0] - k) < 1e-3 and -128 <= hint[1] <= 127 - k + 1:
                return QParams(1.0 / k, int(hint[1]))
        return QParams(1.0 / 256, -128)

    def eval_float(self, node, graph, xs):
        x = xs[0].astype(np.float64)
        e = np.exp(x - x.max(axis=node.attrs["axis"], keepdims=True))
        return [(e / e.sum(axis=node.attrs["axis"], keepdims=True)).astype(np.float32)]

    def quantize(self, node, graph):
        qi = in_quant(graph, node)
        length = graph.tensors[node.inputs[0]].shape[node.attrs["axis"]]
        if length >= 2 ** (31 - EXP_BITS):
            raise UnsupportedModelError(f"{node.name}: softmax over {length} elements overflows the int32 sum")
        d = np.arange(qi.qmax - qi.qmin + 1, dtype=np.float64)
        table = np.rint(2.0**EXP_BITS * np.exp(-qi.scale * d)).astype(np.int32)
        node.params["exp_table"] = graph.add_constant(f"{node.name}.exp_table", table)
        qo = graph.tensors[node.outputs[0]].quant
        node.attrs.update(k=round(1.0 / qo.scale), zp_out=qo.zero_point)

    def eval_int(self, node, graph, xs):
        axis = node.attrs["axis"]
        x = xs[0].astype(np.int64)
        e = graph.param(node, "exp_table").astype(np.int64)[x.max(axis=axis, keepdims=True) - x]
        y, n = reciprocal_q30(e.sum(axis=axis, keepdims=True))
        sh = n + 30
        q = rounding_shift(e * y * node.attrs["k"], sh) + node.attrs["zp_out"]
        return [np.clip(q, -128, 127).astype(np.int8)]

    def lower_tvm(self, node, graph, tb):
        """eval_int in TE: row max, exp table, int64 sum, the same Newton-Raphson reciprocal
        (bit length by count-leading-zeros), rounding shift, clamp."""
        te, tx = tb.te, tb.tirx
        ax = node.attrs["axis"]
        x = tb.input(node)
        shape = tb.shape(node.inputs[0])
        length = int(shape[ax])
        row_shape = shape[:ax] + shape[ax + 1:]
        table = tb.const(node, "exp", graph.param(node, "exp_table").astype(np.int32))
        i64 = "int64"

        def at(row, r):
            return (*row[:ax], r, *row[ax:])

        r = te.reduce_axis((0, length), "r")
        mx = te.compute(row_shape, lambda *row: te.max(x[at(row, r)], axis=r), name=tb.name(node, "max"))

        def e(idx):
            row = idx[:ax] + idx[ax + 1:]
            return table[mx[row].astype("int32") - x[idx].astype("int32")]

        r2 = te.reduce_axis((0, length), "r2")
        ssum = te.compute(row_shape, lambda *row: te.sum(e(at(row, r2)).astype(i64), axis=r2),
                          name=tb.name(node, "sum"))

        def bits(s):
            return tx.const(64, i64) - tx.clz(s).astype(i64)

        def recip(*row):
            s = ssum[row]
            a = s << (tx.const(31, i64) - bits(s))
            y = tx.const(NR_C1, i64) - ((tx.const(NR_C2, i64) * a) >> tx.const(31, i64))
            for _ in range(NR_STEPS):
                t = (a * y) >> tx.const(31, i64)
                y = (y * (tx.const(1 << 31, i64) - t)) >> tx.const(30, i64)
            return y

        y = te.compute(row_shape, recip, name=tb.name(node, "recip"))
        k, zp = node.attrs["k"], node.attrs["zp_out"]

        def out(*idx):
            from hilc.targets.tvm.engine import rounding_shift

            row = idx[:ax] + idx[ax + 1:]
            q = rounding_shift(tx, e(idx).astype(i64) * y[row] * tx.const(k, i64), bits(ssum[row]) + 30)
            q = q + tx.const(zp, i64)
            return tx.max(tx.min(q, tx.const(127, i64)), tx.const(-128, i64)).astype("int8")

        return [te.compute(shape, out, name=tb.name(node))]

    def lower_c(self, node, graph, em) -> str:
        p = em.struct("hilc_softmax_params", node.name, dict(
            **axis_walk(graph.tensors[node.inputs[0]].shape, node.attrs["axis"]), k=node.attrs["k"],
            zp_out=node.attrs["zp_out"], exp_table=em.param(node, "exp_table")))
        return f"hilc_softmax_s8({p}, {em.tensor(node.inputs[0])}, {em.tensor(node.outputs[0])});"

    def lower_hls(self, node, graph, ctx) -> dict:
        from hilc.targets.hls import lower as hl

        a = node.attrs
        shape = hl.tensor_shape(graph, node.inputs[0])
        ax = a["axis"]
        return dict(kind="softmax", **axis_walk(shape, ax), k=a["k"], zp_out=a["zp_out"],
                    exp_table=ctx.rom(f"{node.name}_exp", graph.param(node, "exp_table"), f"ap_uint<{EXP_BITS + 1}>"),
                    c1=NR_C1, c2=NR_C2, steps=NR_STEPS, n=hl.elems(shape),
                    act_bits=hl.tensor_bits(graph, node.inputs[0]),
                    doc=f"{node.name}: softmax over {shape[ax]} elements (axis {ax})")


@onnx_importer("Softmax")
def import_softmax(ctx, node) -> None:
    x = ctx.value(node.input[0])
    rank = len(ctx.layouts[x])
    axis = int(ctx.attr("axis", -1 if ctx.opset >= 13 else 1)) % rank
    if ctx.opset < 13 and axis != rank - 1:
        # Before opset 13 Softmax flattens the axes from `axis` on into one.
        xl = ctx.to_logical(x)
        shape = ctx.graph.tensors[xl].shape
        flat = ctx.emit("reshape", [xl], {"shape": [*shape[:axis], int(np.prod(shape[axis:]))]},
                        layout=tuple(range(axis + 1)))
        y = ctx.emit("softmax", [flat], {"axis": axis})
        ctx.emit("reshape", [y], {"shape": list(shape)}, layout=tuple(range(rank)), onnx_out=node.output[0])
        return
    ctx.emit("softmax", [x], {"axis": ctx.phys_axis(x, axis)}, onnx_out=node.output[0])
