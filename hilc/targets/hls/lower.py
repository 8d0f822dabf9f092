"""Helpers of the HLS lowerings.

Each operator lowers itself for the HLS backend: ``Op.lower_hls(node, graph, ctx)`` in its module
of hilc/compiler/ops returns the config of its layer function (rendered by the macros of
templates/layers.j2), beside its ``eval_int`` kernel and its ``lower_c``/``lower_tvm``. What several
operators share lives here (shapes and bit-widths, the line-buffer schedule of windowed layers,
conv2d/dense's ROMs and minifloat MAC, the elementwise and index-table layers), imported lazily by
the ``lower_hls`` methods so the ops package does not import the backends. An operator without
``lower_hls`` inherits ``Op.lower_hls``, which names the node and the operators that have one.
"""

from __future__ import annotations

import numpy as np

from hilc.compiler.ir import Graph, Node
from hilc.errors import HilcError


def cannot(node: Node, why: str) -> HilcError:
    return HilcError(f"node '{node.onnx_name or node.name}' ({node.op}): the HLS backend cannot lower it: {why}")


def lowered_ops() -> list[str]:
    """The IR operators that have an HLS lowering (override ``Op.lower_hls``)."""
    from hilc.compiler.ops import OPS, Op

    return sorted(name for name, op in OPS.items() if type(op).lower_hls is not Op.lower_hls)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tensor_shape(graph: Graph, name: str) -> tuple[int, ...]:
    return tuple(int(d) for d in graph.tensors[name].shape)


def tensor_bits(graph: Graph, name: str) -> int:
    q = graph.tensors[name].quant
    return q.bits if q is not None else 8


def elems(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[1:], dtype=np.int64))


def acc_bits_for(bound: int) -> int:
    return max(2, int(bound).bit_length() + 1)


def dims4(node: Node, shape: tuple[int, ...]) -> list[int]:
    d = [int(x) for x in shape[1:]]
    if len(d) > 4:
        raise cannot(node, f"tensor of rank {len(shape)} (batch + at most 4 axes are supported)")
    return [1] * (4 - len(d)) + d


def window_fields(ctx, graph, node, dilations) -> dict:
    """The sliding-window geometry a conv or pool design takes: shapes, kernel, strides, dilations,
    top/left padding and the line-buffer schedule (its ROMs declared in ``ctx``)."""
    a = node.attrs
    _, h, w, c = tensor_shape(graph, node.inputs[0])
    _, oh, ow, _ = tensor_shape(graph, node.outputs[0])
    kh, kw = a["kernel"]
    sh, sw = a["strides"]
    dh, dw = dilations
    span, slots, emit = window_schedule(h, oh, kh, sh, dh, a["pads"][0])
    return dict(h=h, w=w, c=c, oh=oh, ow=ow, kh=kh, kw=kw, sh=sh, sw=sw, dh=dh, dw=dw,
                pt=a["pads"][0], pl=a["pads"][1], span=span,
                row_slot=ctx.rom(f"{node.name}_row_slot", slots, "ap_uint<16>"),
                emit=ctx.rom(f"{node.name}_emit", emit, "ap_uint<16>"), max_emit=max(emit))


def window_schedule(h: int, oh: int, k: int, s: int, d: int, p0: int) -> tuple[int, list[int], list[int]]:
    """Line-buffer rows kept, the ring slot of every input row, and how many output rows can be
    emitted once input row r has arrived (the last row its window needs, clipped to the input)."""
    span = min(h, d * (k - 1) + 1)
    last = [min(h - 1, max(0, oy * s - p0 + (k - 1) * d)) for oy in range(oh)]
    emit = np.bincount(np.asarray(last, np.int64), minlength=h).tolist()
    return span, [r % span for r in range(h)], emit


def linear_fields(ctx, node: Node, wq: np.ndarray, wb: int, ab: int) -> dict:
    """What conv2d and dense share: the weight/bias/requantization ROMs, zero points, clamp and
    the accumulator and operand types."""
    g, a = ctx.graph, node.attrs
    acc_bits = acc_bits_for(a["acc_bound"])
    return dict(
        weight=ctx.rom(f"{node.name}_weight", wq, f"ap_int<{wb}>"),
        bias=ctx.rom(f"{node.name}_bias", g.param(node, "bias"), "ap_int<32>"),
        mult=ctx.rom(f"{node.name}_mult", g.param(node, "mult"), "ap_uint<31>"),
        shift=ctx.rom(f"{node.name}_shift", g.param(node, "shift"), "ap_uint<6>"),
        zp_in=a["zp_in"], zp_out=a["zp_out"], lo=a["lo"], hi=a["hi"],
        acc_bits=acc_bits, acc_t=f"ap_int<{acc_bits}>",
        diff_t=f"ap_int<{ab + 1}>", w_t=f"ap_int<{wb}>", weight_bits=wb, act_bits=ab,
    )


def minifloat_layer(ctx, node: Node, cfg: dict, wq: np.ndarray) -> dict:
    """A conv2d/dense with a minifloat ``format``: weight codes in ap_uint ROMs, the MAC of
    hilc_hls.h (exponent add + significand product + shift; the input cast first when the layer
    has an ``act_format``), a wide accumulator and its narrowed requantization."""
    a = node.attrs
    if not a.get("format"):
        return cfg
    from hilc.compiler import minifloat as mf

    fmt, afmt = mf.layer_formats(node)
    acc_bits = acc_bits_for(a["acc_bound"])
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


def unary_layer(ctx, node: Node, kind: str, **extra) -> dict:
    g = ctx.graph
    n = elems(tensor_shape(g, node.outputs[0]))
    return dict(kind=kind, n=n, act_bits=tensor_bits(g, node.inputs[0]),
                doc=f"{node.name}: {node.op} of {n} elements", **extra)


def gather_layer(ctx, node: Node, tabs: list[list[int]], value: int, what: str) -> dict:
    g = ctx.graph
    in_shape, out_shape = tensor_shape(g, node.inputs[0]), tensor_shape(g, node.outputs[0])
    names = [ctx.rom(f"{node.name}_t{d}", np.asarray(t, np.int64), "ap_int<32>") for d, t in enumerate(tabs)]
    return dict(kind="gather", n_in=elems(in_shape), n=elems(out_shape), dims=[len(t) for t in tabs], tabs=names,
                value=value, act_bits=tensor_bits(g, node.inputs[0]),
                doc=f"{node.name}: {what} {list(in_shape[1:])} -> {list(out_shape[1:])}")


def strides4(d4: list[int]) -> list[int]:
    st = [1, 1, 1, 1]
    for i in range(2, -1, -1):
        st[i] = st[i + 1] * d4[i + 1]
    return st
