"""HLS lowerings: one function per IR operator turning a node into the config of its layer function
(rendered by the macros of templates/layers.j2).

They sit here rather than in the operator modules so the FPGA backend stays one package; an operator
without an entry here is named in a compile-time error (``lower_node``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from hilc.compiler.ir import Graph, Node
from hilc.errors import HilcError

LOWERINGS: dict[str, Callable[[Any, Node], dict]] = {}


def lowering(*ops: str) -> Callable:
    def deco(fn: Callable) -> Callable:
        for op in ops:
            LOWERINGS[op] = fn
        return fn

    return deco


def cannot(node: Node, why: str) -> HilcError:
    return HilcError(f"node '{node.onnx_name or node.name}' ({node.op}): the HLS backend cannot lower it: {why}")


def lower_node(ctx, node: Node) -> dict:
    fn = LOWERINGS.get(node.op)
    if fn is None:
        return_ops = ", ".join(sorted(LOWERINGS))
        raise cannot(node, f"no HLS lowering for operator '{node.op}' (lowered: {return_ops})")
    return fn(ctx, node)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _shape(graph: Graph, name: str) -> tuple[int, ...]:
    return tuple(int(d) for d in graph.tensors[name].shape)


def _bits(graph: Graph, name: str) -> int:
    q = graph.tensors[name].quant
    return q.bits if q is not None else 8


def _n(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[1:], dtype=np.int64))


def _acc_bits(bound: int) -> int:
    return max(2, int(bound).bit_length() + 1)


def _dims4(node: Node, shape: tuple[int, ...]) -> list[int]:
    d = [int(x) for x in shape[1:]]
    if len(d) > 4:
        raise cannot(node, f"tensor of rank {len(shape)} (batch + at most 4 axes are supported)")
    return [1] * (4 - len(d)) + d


def _window_schedule(h: int, oh: int, k: int, s: int, d: int, p0: int) -> tuple[int, list[int], list[int]]:
    """Line-buffer rows kept, the ring slot of every input row, and how many output rows can be
    emitted once input row r has arrived (the last row its window needs, clipped to the input)."""
    span = min(h, d * (k - 1) + 1)
    last = [min(h - 1, max(0, oy * s - p0 + (k - 1) * d)) for oy in range(oh)]
    emit = np.bincount(np.asarray(last, np.int64), minlength=h).tolist()
    return span, [r % span for r in range(h)], emit


@lowering("conv2d")
def lower_conv2d(ctx, node: Node) -> dict:
    g, a = ctx.graph, node.attrs
    _, h, w, c = _shape(g, node.inputs[0])
    _, oh, ow, oc = _shape(g, node.outputs[0])
    kh, kw = a["kernel"]
    sh, sw = a["strides"]
    dh, dw = a["dilations"]
    groups = a["group"]
    cg, og = c // groups, oc // groups
    span, slots, emit = _window_schedule(h, oh, kh, sh, dh, a["pads"][0])
    wb = int(a.get("weight_bits", 8))
    ab = _bits(g, node.inputs[0])
    wq = g.param(node, "weight").reshape(oc, kh * kw * cg)
    return _minifloat(ctx, node, dict(
        kind="conv2d", h=h, w=w, c=c, oh=oh, ow=ow, oc=oc, kh=kh, kw=kw, sh=sh, sw=sw, dh=dh, dw=dw,
        pt=a["pads"][0], pl=a["pads"][1], groups=groups, cg=cg, og=og, span=span,
        row_slot=ctx.rom(f"{node.name}_row_slot", slots, "ap_uint<16>"),
        emit=ctx.rom(f"{node.name}_emit", emit, "ap_uint<16>"), max_emit=max(emit),
        **_linear_fields(ctx, node, wq, wb, ab),
        pe_options=divisors(og), simd_options=divisors(cg), macs=oh * ow * oc * kh * kw * cg,
        doc=f"{node.name}: conv {kh}x{kw}/{sh}x{sw}, {c}->{oc} channels, {groups} group(s), "
            f"{h}x{w} -> {oh}x{ow}, weights {wb}-bit, activations {ab}-bit",
    ), wq)


@lowering("dense")
def lower_dense(ctx, node: Node) -> dict:
    g, a = ctx.graph, node.attrs
    shape = _shape(g, node.inputs[0])
    wq = g.param(node, "weight")
    o, k = wq.shape
    wb = int(a.get("weight_bits", 8))
    ab = _bits(g, node.inputs[0])
    rows = int(np.prod(shape[1:-1], dtype=np.int64))
    return _minifloat(ctx, node, dict(
        kind="dense", rows=rows, k=k, o=o,
        **_linear_fields(ctx, node, wq, wb, ab),
        pe_options=divisors(o), simd_options=divisors(k), macs=rows * o * k,
        doc=f"{node.name}: dense {k}->{o} over {rows} row(s), weights {wb}-bit, activations {ab}-bit",
    ), wq)


def _linear_fields(ctx, node: Node, wq: np.ndarray, wb: int, ab: int) -> dict:
    """What conv2d and dense share: the weight/bias/requantization ROMs, zero points, clamp and
    the accumulator and operand types."""
    g, a = ctx.graph, node.attrs
    acc_bits = _acc_bits(a["acc_bound"])
    return dict(
        weight=ctx.rom(f"{node.name}_weight", wq, f"ap_int<{wb}>"),
        bias=ctx.rom(f"{node.name}_bias", g.param(node, "bias"), "ap_int<32>"),
        mult=ctx.rom(f"{node.name}_mult", g.param(node, "mult"), "ap_uint<31>"),
        shift=ctx.rom(f"{node.name}_shift", g.param(node, "shift"), "ap_uint<6>"),
        zp_in=a["zp_in"], zp_out=a["zp_out"], lo=a["lo"], hi=a["hi"],
        acc_bits=acc_bits, acc_t=f"ap_int<{acc_bits}>",
        diff_t=f"ap_int<{ab + 1}>", w_t=f"ap_int<{wb}>", weight_bits=wb, act_bits=ab,
    )


def _minifloat(ctx, node: Node, cfg: dict, wq: np.ndarray) -> dict:
    """A conv2d/dense with a minifloat ``format``: weight codes in ap_uint ROMs, the MAC of
    hilc_hls.h (exponent add + significand product + shift; the input cast first when the layer
    has an ``act_format``), a wide accumulator and its narrowed requantization."""
    a = node.attrs
    if not a.get("format"):
        return cfg
    from hilc.compiler import minifloat as mf

    fmt, afmt = mf.layer_formats(node)
    acc_bits = _acc_bits(a["acc_bound"])
    if acc_bits > 63:
        raise cannot(node, f"{fmt.name} accumulator of {acc_bits} bits (at most 63)")
    wt = f"ap_uint<{fmt.bits}>"
    ctx.roms = [r for r in ctx.roms if r["name"] not in (cfg["weight"], cfg["bias"])]  # the integer ones
    if afmt is None:
        mac = f"hilc_mfw_mul<{fmt.e}, {fmt.m}>(d, wv)"
    else:
        cast = f"hilc_mf_cast<{afmt.e}, {afmt.m}, {a['act_q']}, {afmt.max_mag}>(d)"
        mac = f"hilc_mf_mul<{afmt.e}, {afmt.m}, {fmt.e}, {fmt.m}>({cast}, wv)"
    cfg.update(weight=ctx.rom(f"{node.name}_weight", wq, wt), w_t=wt, mac=mac, requant="hilc_requant_wide",
               bias=ctx.rom(f"{node.name}_bias", ctx.graph.param(node, "bias"), "ap_int<64>"),
               acc_bits=acc_bits, acc_t=f"ap_int<{acc_bits}>", format=fmt.name, mult_bits=int(a["mult_bits"]),
               act_format=afmt.name if afmt is not None else None,
               doc=cfg["doc"] + f"; minifloat {fmt.name} weights"
               + (f", {afmt.name} input cast (q={a['act_q']})" if afmt is not None else ""))
    return cfg


@lowering("maxpool", "avgpool")
def lower_pool(ctx, node: Node) -> dict:
    from hilc.compiler.ops.pool import count_map

    g, a = ctx.graph, node.attrs
    _, h, w, c = _shape(g, node.inputs[0])
    _, oh, ow, _ = _shape(g, node.outputs[0])
    kh, kw = a["kernel"]
    sh, sw = a["strides"]
    dh, dw = a.get("dilations", [1, 1]) if node.op == "maxpool" else (1, 1)
    span, slots, emit = _window_schedule(h, oh, kh, sh, dh, a["pads"][0])
    cfg = dict(
        kind=node.op, h=h, w=w, c=c, oh=oh, ow=ow, kh=kh, kw=kw, sh=sh, sw=sw, dh=dh, dw=dw,
        pt=a["pads"][0], pl=a["pads"][1], span=span, act_bits=_bits(g, node.inputs[0]),
        row_slot=ctx.rom(f"{node.name}_row_slot", slots, "ap_uint<16>"),
        emit=ctx.rom(f"{node.name}_emit", emit, "ap_uint<16>"), max_emit=max(emit),
        doc=f"{node.name}: {node.op} {kh}x{kw}/{sh}x{sw} over {c} channels, {h}x{w} -> {oh}x{ow}",
    )
    if node.op == "avgpool":
        idx = np.searchsorted(a["counts"], count_map(a, h, w))
        cfg.update(count_idx=ctx.rom(f"{node.name}_count_idx", idx, "ap_uint<8>"),
                   mult=ctx.rom(f"{node.name}_mult", g.param(node, "mult"), "ap_uint<31>"),
                   shift=ctx.rom(f"{node.name}_shift", g.param(node, "shift"), "ap_uint<6>"),
                   zp_in=a["zp_in"], zp_out=a["zp_out"], lo=a["lo"], hi=a["hi"])
    return cfg


def _unary(ctx, node: Node, kind: str, **extra) -> dict:
    g = ctx.graph
    n = _n(_shape(g, node.outputs[0]))
    return dict(kind=kind, n=n, act_bits=_bits(g, node.inputs[0]),
                doc=f"{node.name}: {node.op} of {n} elements", **extra)


@lowering("reshape")
def lower_reshape(ctx, node: Node) -> dict:
    # Row-major order is unchanged by a reshape: the stream passes through.
    return _unary(ctx, node, "copy")


@lowering("clamp")
def lower_clamp(ctx, node: Node) -> dict:
    return _unary(ctx, node, "clamp", lo=node.attrs["lo"], hi=node.attrs["hi"])


@lowering("requant")
def lower_requant(ctx, node: Node) -> dict:
    a = node.attrs
    return _unary(ctx, node, "requant", zp_in=a["zp_in"], zp_out=a["zp_out"], mult=a["mult"], shift=a["shift"],
                  lo=a["lo"], hi=a["hi"], diff_t=f"ap_int<{_bits(ctx.graph, node.inputs[0]) + 1}>")


@lowering("lut")
def lower_lut(ctx, node: Node) -> dict:
    ob = _bits(ctx.graph, node.outputs[0])
    table = ctx.rom(f"{node.name}_table", ctx.graph.param(node, "table"), f"ap_int<{ob}>")
    return _unary(ctx, node, "lut", table=table, offset=node.attrs["table_offset"],
                  table_size=int(ctx.graph.param(node, "table").size), out_bits=ob)


@lowering("add", "mul")
def lower_binary(ctx, node: Node) -> dict:
    """x: the operand streamed at the output's shape; y: a constant ROM, the other stream, or the other
    input buffered whole when it broadcasts (x * sigmoid(mean(x)): its fork is deep enough)."""
    from hilc.targets.c.codegen import broadcast_strides

    g, a = ctx.graph, node.attrs
    out_shape = _shape(g, node.outputs[0])
    shapes = [_shape(g, t) for t in node.inputs]
    bits = [_bits(g, t) for t in node.inputs]
    zps = a["zp_in"]
    if node.op == "add":
        s0, s1 = a.get("signs", [1, 1])
        mults = [s0 * a["mults"][0], s1 * a["mults"][1]]
    cfg: dict[str, Any] = dict(kind=node.op, n=_n(out_shape), zp_out=a["zp_out"], lo=a["lo"], hi=a["hi"],
                               dims=_dims4(node, out_shape), const=None, x=0)
    if "const" in node.params:
        if shapes[0] != out_shape:
            raise cannot(node, f"its input {node.inputs[0]} {list(shapes[0])} is broadcast to {list(out_shape)}")
        cst = g.param(node, "const")
        cfg.update(mode="const", const=ctx.rom(f"{node.name}_const", cst.reshape(-1), "ap_int<8>"),
                   y_strides=broadcast_strides(tuple(cst.shape), out_shape))
        bits.append(8)
    elif shapes[0] == out_shape and shapes[1] == out_shape:
        cfg.update(mode="streams")
    elif out_shape in shapes:
        x = shapes.index(out_shape)
        y = 1 - x
        cfg.update(mode="buffered", x=x, n_small=_n(shapes[y]), small_t=ctx.act_t(node.inputs[y]),
                   y_strides=broadcast_strides(shapes[y], out_shape))
    else:
        raise cannot(node, f"both inputs {list(shapes[0])} and {list(shapes[1])} are broadcast to {list(out_shape)}")
    x = cfg["x"]
    cfg.update(zp_x=zps[x], zp_y=zps[1 - x], act_bits=max(bits), diff_t=f"ap_int<{max(bits) + 1}>")
    if node.op == "add":
        cfg.update(mult_x=mults[x], mult_y=mults[1 - x], shift=a["shift"])
    else:
        cfg.update(mult=a["mult"], shift=a["shift"])
    cfg["doc"] = f"{node.name}: {node.op} of {cfg['n']} elements ({cfg['mode']})"
    return cfg


@lowering("concat")
def lower_concat(ctx, node: Node) -> dict:
    g, a = ctx.graph, node.attrs
    shape = _shape(g, node.outputs[0])
    ax = a["axis"]
    outer = int(np.prod(shape[1:ax], dtype=np.int64))
    inner = int(np.prod(shape[ax + 1:], dtype=np.int64))
    parts = []
    for t, zp, b, c in zip(node.inputs, a["zp_in"], a["mults"], a["shifts"], strict=True):
        parts.append(dict(block=_shape(g, t)[ax] * inner, zp=zp, mult=b, shift=c, t=ctx.act_t(t),
                          diff_t=f"ap_int<{_bits(g, t) + 1}>"))
    return dict(kind="concat", outer=outer, parts=parts, zp_out=a["zp_out"], lo=a["lo"], hi=a["hi"],
                n=_n(shape), act_bits=_bits(g, node.outputs[0]),
                doc=f"{node.name}: concat of {len(parts)} inputs along axis {ax}")


def _gather(ctx, node: Node, tabs: list[list[int]], value: int, what: str) -> dict:
    g = ctx.graph
    in_shape, out_shape = _shape(g, node.inputs[0]), _shape(g, node.outputs[0])
    names = [ctx.rom(f"{node.name}_t{d}", np.asarray(t, np.int64), "ap_int<32>") for d, t in enumerate(tabs)]
    return dict(kind="gather", n_in=_n(in_shape), n=_n(out_shape), dims=[len(t) for t in tabs], tabs=names,
                value=value, act_bits=_bits(g, node.inputs[0]),
                doc=f"{node.name}: {what} {list(in_shape[1:])} -> {list(out_shape[1:])}")


def _strides(d4: list[int]) -> list[int]:
    st = [1, 1, 1, 1]
    for i in range(2, -1, -1):
        st[i] = st[i + 1] * d4[i + 1]
    return st


@lowering("transpose")
def lower_transpose(ctx, node: Node) -> dict:
    shape = _shape(ctx.graph, node.inputs[0])
    d4 = _dims4(node, shape)
    lead = 4 - (len(shape) - 1)
    perm = list(range(lead)) + [p - 1 + lead for p in node.attrs["perm"][1:]]
    st = _strides(d4)
    tabs = [[i * st[perm[d]] for i in range(d4[perm[d]])] for d in range(4)]
    return _gather(ctx, node, tabs, 0, "transpose")


@lowering("pad")
def lower_pad(ctx, node: Node) -> dict:
    a = node.attrs
    shape = _shape(ctx.graph, node.inputs[0])
    d4 = _dims4(node, shape)
    lead = 4 - (len(shape) - 1)
    pads = [(0, 0)] * lead + [tuple(p) for p in a["pads"][1:]]
    st = _strides(d4)
    tabs = []
    for d in range(4):
        idx = np.arange(d4[d])
        if a["mode"] == "constant":
            src = np.pad(idx, pads[d], constant_values=-1)
        else:
            src = np.pad(idx, pads[d], mode={"edge": "edge", "reflect": "reflect"}[a["mode"]])
        tabs.append([int(s) * st[d] if s >= 0 else -1 for s in src])
    return _gather(ctx, node, tabs, a["value_q"], f"pad ({a['mode']})")


@lowering("softmax")
def lower_softmax(ctx, node: Node) -> dict:
    from hilc.compiler.ops import softmax as sm

    g, a = ctx.graph, node.attrs
    shape = _shape(g, node.inputs[0])
    ax = a["axis"]
    return dict(kind="softmax", outer=int(np.prod(shape[1:ax], dtype=np.int64)), len=shape[ax],
                inner=int(np.prod(shape[ax + 1:], dtype=np.int64)), k=a["k"], zp_out=a["zp_out"],
                exp_table=ctx.rom(f"{node.name}_exp", g.param(node, "exp_table"), f"ap_uint<{sm.EXP_BITS + 1}>"),
                c1=sm.NR_C1, c2=sm.NR_C2, steps=sm.NR_STEPS, n=_n(shape), act_bits=_bits(g, node.inputs[0]),
                doc=f"{node.name}: softmax over {shape[ax]} elements (axis {ax})")


@lowering("reduce_mean")
def lower_reduce_mean(ctx, node: Node) -> dict:
    a = node.attrs
    shape = _shape(ctx.graph, node.inputs[0])
    ax = a["axis"]
    return dict(kind="reduce_mean", outer=int(np.prod(shape[1:ax], dtype=np.int64)), len=shape[ax],
                inner=int(np.prod(shape[ax + 1:], dtype=np.int64)), zp_in=a["zp_in"], zp_out=a["zp_out"],
                mult=a["mult"], shift=a["shift"], lo=a["lo"], hi=a["hi"], n=_n(shape),
                act_bits=_bits(ctx.graph, node.inputs[0]),
                doc=f"{node.name}: mean over {shape[ax]} elements (axis {ax})")


@lowering("embedding")
def lower_embedding(ctx, node: Node) -> dict:
    g = ctx.graph
    table = g.param(node, "table")
    ob = _bits(g, node.outputs[0])
    return dict(kind="embedding", n=_n(_shape(g, node.inputs[0])), d=int(table.shape[1]), vocab=int(table.shape[0]),
                index=ctx.rom(f"{node.name}_index", g.param(node, "index"), "ap_uint<16>"),
                table=ctx.rom(f"{node.name}_table", table, f"ap_int<{ob}>"), offset=node.attrs["index_offset"],
                act_bits=ob, doc=f"{node.name}: embedding of {table.shape[0]} rows x {table.shape[1]}")


@lowering("gather")
def lower_gather(ctx, node: Node) -> dict:
    g, a = ctx.graph, node.attrs
    shape = _shape(g, node.inputs[0])
    ax = a["axis"]
    idx = [int(i) % shape[ax] for i in a["indices"]]
    return dict(kind="select", outer=int(np.prod(shape[1:ax], dtype=np.int64)), len=shape[ax],
                inner=int(np.prod(shape[ax + 1:], dtype=np.int64)), n_idx=len(idx),
                indices=ctx.rom(f"{node.name}_indices", idx, "ap_uint<16>"), n=_n(_shape(g, node.outputs[0])),
                act_bits=_bits(g, node.inputs[0]), doc=f"{node.name}: select {len(idx)} of {shape[ax]} along axis {ax}")


@lowering("matmul")
def lower_matmul(ctx, node: Node) -> dict:
    g, a = ctx.graph, node.attrs
    sa, sb = _shape(g, node.inputs[0]), _shape(g, node.inputs[1])
    if sa[:-2] != sb[:-2] or sa[-1] != sb[-1]:
        raise cannot(node, f"operands {list(sa)} and {list(sb)} (transposed) differ in batch axes")
    ab = max(_bits(g, node.inputs[0]), _bits(g, node.inputs[1]))
    m, k, n = sa[-2], sa[-1], sb[-2]
    return dict(kind="matmul", batch=int(np.prod(sa[1:-2], dtype=np.int64)), m=m, k=k, nn=n,
                zp_a=a["zp_a"], zp_b=a["zp_b"], zp_out=a["zp_out"], mult=a["mult"], shift=a["shift"], lo=a["lo"],
                hi=a["hi"], acc_t=f"ap_int<{_acc_bits(a['acc_bound'])}>", diff_t=f"ap_int<{ab + 1}>",
                n=_n(_shape(g, node.outputs[0])), act_bits=ab, macs=int(np.prod(sa[1:-2], dtype=np.int64)) * m * n * k,
                doc=f"{node.name}: matmul of activations [{m}x{k}] x [{k}x{n}], {int(np.prod(sa[1:-2]))} batch(es)")


@lowering("layernorm")
def lower_layernorm(ctx, node: Node) -> dict:
    from hilc.compiler.ops import layernorm as ln
    from hilc.compiler.ops import softmax as sm

    g, a = ctx.graph, node.attrs
    shape = _shape(g, node.inputs[0])
    n = shape[-1]
    return dict(kind="layernorm", rows=int(np.prod(shape[1:-1], dtype=np.int64)), len=n, zp_in=a["zp_in"],
                zp_out=a["zp_out"], eps=a["eps_int"], lo=a["lo"], hi=a["hi"], z_shift=61 - ln.Z_BITS,
                mult=ctx.rom(f"{node.name}_mult", g.param(node, "mult"), "ap_int<32>"),
                shift=ctx.rom(f"{node.name}_shift", g.param(node, "shift"), "ap_uint<6>"),
                bias=ctx.rom(f"{node.name}_bias", g.param(node, "bias"), "ap_int<64>"),
                c1=sm.NR_C1, c2=sm.NR_C2, steps=sm.NR_STEPS, n=_n(shape), act_bits=_bits(g, node.inputs[0]),
                doc=f"{node.name}: layer normalisation over {n} elements (integer, I-BERT style)")
