"""ONNX Gather: embedding lookups (constant table, token ids from the input) and selecting
positions of an activation with constant indices (e.g. a transformer's first token).

embedding: hilc takes float32 model inputs, so token ids arrive as float values that the model
casts to int64 (``Cast`` then ``Gather``). The ids tensor is quantized like any activation; at
compile time each of its 256 codes is mapped to a table row (the real value rounded to the
nearest id, negative ids counted from the end as in ONNX, out-of-range ids clamped) and the table
is quantized per tensor at the output's scale, so the kernel is two loads per token and a copy:
    row = index_table[x + 128];  y[t, :] = table_q[row, :]
The input's calibrated scale must resolve every id (ids 0..V-1 with V <= 256 always do).

gather: the output keeps the input's quantization; the kernel copies the selected slices.
"""

from __future__ import annotations

import numpy as np

from hilc.compiler import arith
from hilc.compiler.ops.base import Op, axis_split, axis_walk, in_quant, onnx_importer, out_quant, register


def _rows(ids: np.ndarray, vocab: int) -> np.ndarray:
    r = np.rint(ids.astype(np.float64)).astype(np.int64)
    r = np.where(r < 0, r + vocab, r)
    return np.clip(r, 0, vocab - 1)


@register
class Embedding(Op):
    name = "embedding"

    def infer_shapes(self, node, in_shapes, graph):
        table = graph.constants[node.params["table"]]
        return [(*in_shapes[0], table.shape[1])]

    def eval_float(self, node, graph, xs):
        table = graph.param(node, "table").astype(np.float32)
        return [table[_rows(xs[0], table.shape[0])]]

    def quantize(self, node, graph):
        qi, qo = in_quant(graph, node), out_quant(graph, node)
        table = graph.param(node, "table")
        codes = np.arange(qi.qmin, qi.qmax + 1)
        rows = _rows(qi.scale * (codes - qi.zero_point), table.shape[0])
        node.params["index"] = graph.add_constant(f"{node.name}.index", rows.astype(np.int32))
        node.params["table"] = graph.add_constant(f"{node.name}.table",
                                                  arith.quantize_host(table, qo.scale, qo.zero_point, qo.bits))
        node.attrs["index_offset"] = -qi.qmin

    def eval_int(self, node, graph, xs):
        rows = graph.param(node, "index")[xs[0].astype(np.int32) + node.attrs["index_offset"]]
        return [graph.param(node, "table")[rows]]

    def lower_tvm(self, node, graph, tb):
        x = tb.input(node)
        index = tb.const(node, "index", graph.param(node, "index").astype(np.int32))
        table = tb.const(node, "table", graph.param(node, "table"))
        off = node.attrs["index_offset"]
        return [tb.te.compute(tb.shape(node.outputs[0]),
                              lambda *i: table[index[x[i[:-1]].astype("int32") + off], i[-1]], name=tb.name(node))]

    def weight_count(self, node, graph):
        return int(graph.param(node, "table").size)

    def lower_c(self, node, graph, em) -> str:
        table = graph.param(node, "table")
        x = node.inputs[0]
        return (f"hilc_embedding_s8({em.size(x)}, {table.shape[1]}, {em.param(node, 'index')}, "
                f"{em.param(node, 'table')}, {em.tensor(x)}, {em.tensor(node.outputs[0])});")

    def lower_hls(self, node, graph, ctx) -> dict:
        from hilc.targets.hls import lower as hl

        table = graph.param(node, "table")
        ob = hl.tensor_bits(graph, node.outputs[0])
        return dict(kind="embedding", n=hl.elems(hl.tensor_shape(graph, node.inputs[0])), d=int(table.shape[1]),
                    vocab=int(table.shape[0]),
                    index=ctx.rom(f"{node.name}_index", graph.param(node, "index"), "ap_uint<16>"),
                    table=ctx.rom(f"{node.name}_table", table, f"ap_int<{ob}>"), offset=node.attrs["index_offset"],
                    act_bits=ob, doc=f"{node.name}: embedding of {table.shape[0]} rows x {table.shape[1]}")


@register
class Gather(Op):
    name = "gather"
    output_quant_rule = "input"

    def infer_shapes(self, node, in_shapes, graph):
        s, ax = in_shapes[0], node.attrs["axis"]
        return [(*s[:ax], *node.attrs["index_shape"], *s[ax + 1:])]

    def eval_float(self, node, graph, xs):
        ax = node.attrs["axis"]
        y = np.take(xs[0], node.attrs["indices"], axis=ax)
        return [y.reshape(*xs[0].shape[:ax], *node.attrs["index_shape"], *xs[0].shape[ax + 1:])]

    eval_int = eval_float

    def lower_tvm(self, node, graph, tb):
        x = tb.input(node)
        ax, ishape = node.attrs["axis"], [int(d) for d in node.attrs["index_shape"]]
        indices = tb.const(node, "indices", np.asarray(node.attrs["indices"], np.int32).reshape(-1))

        def f(*i):
            k = 0
            for j, d in zip(i[ax:ax + len(ishape)], ishape, strict=True):
                k = k * d + j
            return x[(*i[:ax], indices[k], *i[ax + len(ishape):])]

        return [tb.te.compute(tb.shape(node.outputs[0]), f, name=tb.name(node))]

    def lower_c(self, node, graph, em) -> str:
        shape = graph.tensors[node.inputs[0]].shape
        ax = node.attrs["axis"]
        idx = em.array(f"{node.name}_indices", np.asarray(node.attrs["indices"], np.int32))
        outer, inner = axis_split(shape, ax)
        return (f"hilc_gather_s8({outer}, {shape[ax]}, {inner}, {len(node.attrs['indices'])}, {idx}, "
                f"{em.tensor(node.inputs[0])}, {em.tensor(node.outputs[0])});")

    def lower_hls(self, node, graph, ctx) -> dict:
        from hilc.targets.hls import lower as hl

        a = node.attrs
        shape = hl.tensor_shape(graph, node.inputs[0])
        ax = a["axis"]
        idx = [int(i) % shape[ax] for i in a["indices"]]
        return dict(kind="select", **axis_walk(shape, ax), n_idx=len(idx),
                    indices=ctx.rom(f"{node.name}_indices", idx, "ap_uint<16>"),
                    n=hl.elems(hl.tensor_shape(graph, node.outputs[0])), act_bits=hl.tensor_bits(graph, node.inputs[0]),
                    doc=f"{node.name}: select {len(idx)} of {shape[ax]} along axis {ax}")


@onnx_importer("Gather")
def import_gather(ctx, node) -> None:
    from hilc.compiler.onnx_import import identity_layout

    data, idx = ctx.const(node.input[0]), ctx.const(node.input[1])
    axis = int(ctx.attr("axis", 0))
    if data is not None and idx is not None:
        raise ctx.fail("both inputs are constants")
    if data is not None:
        if data.ndim != 2 or axis != 0:
            raise ctx.fail(f"an embedding table must be 2-D and gathered along axis 0 (got shape "
                           f"{list(data.shape)}, axis {axis})")
        ids = ctx.to_logical(ctx.value(node.input[1]))
        if ids in ctx.graph.inputs and data.shape[0] <= 256:
            # ids 0..V-1 as the codes -128..V-129: every id exact, whatever the calibration saw
            ctx.graph.meta.setdefault("quant_hints", {}).setdefault(ids, [1.0, -128])
        rank = len(ctx.graph.tensors[ids].shape)
        ctx.emit("embedding", [ids], {}, {"table": data.astype(np.float32)}, layout=identity_layout(rank + 1),
                 onnx_out=node.output[0])
        return
    if idx is None:
        raise ctx.fail("Gather with both data and indices computed at run time is not supported")
    x = ctx.value(node.input[0])
    rank = len(ctx.layouts[x])
    axis %= rank
    if axis == 0:
        raise ctx.fail("Gather along the batch axis is not supported")
    xl = ctx.to_logical(x)
    n = ctx.graph.tensors[xl].shape[axis]
    flat = np.asarray(idx, np.int64).reshape(-1)
    if np.any(flat < -n) or np.any(flat >= n):
        raise ctx.fail(f"indices {flat.tolist()} out of range for an axis of length {n}")
    flat = np.where(flat < 0, flat + n, flat)
    out_rank = rank - 1 + np.asarray(idx).ndim
    ctx.emit("gather", [xl], {"axis": axis, "indices": flat.tolist(), "index_shape": list(np.asarray(idx).shape)},
             layout=identity_layout(out_rank), onnx_out=node.output[0])


def cast_to_indices(ctx, node) -> None:
    """Cast of an activation to an integer type: allowed only where it feeds Gather's indices
    (token ids), which the embedding rounds to the nearest id itself."""
    out = node.output[0]
    readers = [n for n in ctx.model.graph.node if out in n.input]
    if not readers or any(n.op_type != "Gather" or list(n.input).index(out) != 1 for n in readers) or \
            out in {o.name for o in ctx.model.graph.output}:
        raise ctx.fail("Cast of an activation to an integer type is supported only for Gather indices (token ids)")
    ctx.bind(out, ctx.value(node.input[0]))
