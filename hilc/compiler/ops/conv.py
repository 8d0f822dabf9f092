"""2-D convolution (any group count, so depthwise too), NHWC activations, OHWI weights.

Float params: ``weight`` [O, KH, KW, I/group], ``bias`` [O].
Integer params: ``weight`` int8, ``bias`` int32 at s_in*s_w[o], ``mult``/``shift`` (dyadic, per
channel). Attributes: ``kernel``, ``strides``, ``pads`` [top, left, bottom, right],
``dilations``, ``group``; after quantization ``zp_in``, ``zp_out``, ``lo``, ``hi`` (clamp) and
``acc_bound`` (static bound on |accumulator|).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from hilc.compiler import arith, minifloat
from hilc.compiler.ir import Graph, Node
from hilc.compiler.ops.base import (
    Op,
    apply_float_activation,
    clamp_bounds,
    exact_dtype,
    exact_matmul,
    in_quant,
    onnx_importer,
    out_quant,
    register,
)
from hilc.errors import UnsupportedModelError


def conv_out_size(n: int, k: int, s: int, d: int, p0: int, p1: int, ceil: bool = False) -> int:
    span = n + p0 + p1 - d * (k - 1) - 1
    return (-(-span // s) if ceil else span // s) + 1


def pad_nhwc(x: np.ndarray, pads: list[int], value: float | int) -> np.ndarray:
    t, l, b, r = pads
    if not any(pads):
        return x
    return np.pad(x, ((0, 0), (t, b), (l, r), (0, 0)), constant_values=value)


def windows(x: np.ndarray, kernel: list[int], strides: list[int], dilations: list[int],
            pads: list[int], pad_value: float | int, out_hw: tuple[int, int]) -> np.ndarray:
    """[N, OH, OW, KH, KW, C] view of the sliding windows of a padded NHWC tensor."""
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    xp = pad_nhwc(x, pads, pad_value)
    oh, ow = out_hw
    # Window extent with dilation, then take every d-th element inside each window.
    v = sliding_window_view(xp, (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(1, 2))
    v = v[:, : (oh - 1) * sh + 1 : sh, : (ow - 1) * sw + 1 : sw, :, ::dh, ::dw]  # N,OH,OW,C,KH,KW
    return v.transpose(0, 1, 2, 4, 5, 3)


def _conv(x: np.ndarray, w: np.ndarray, node: Node, out_shape: tuple[int, ...], pad_value,
          matmul, dtype: type = np.float32) -> np.ndarray:
    """Shared by the float and the integer kernel: only the padding value and product differ.
    The im2col copy is written straight in ``dtype`` (the BLAS type), converting on the way."""
    a = node.attrs
    g = a["group"]
    n = x.shape[0]
    oh, ow, oc = out_shape[1], out_shape[2], out_shape[3]
    view = windows(x, a["kernel"], a["strides"], a["dilations"], a["pads"], pad_value, (oh, ow))
    cols = np.empty(view.shape, dtype)
    cols[...] = view
    kh, kw = a["kernel"]
    cin = x.shape[3]
    cg, og = cin // g, oc // g
    if g == 1:
        y = matmul(cols.reshape(n * oh * ow, kh * kw * cin), w.reshape(oc, -1).T)
        return y.reshape(n, oh, ow, oc)
    if cg == 1:  # depthwise (channel multiplier og): one multiply-add per kernel tap
        xs = np.repeat(cols, og, axis=5) if og > 1 else cols  # [N,OH,OW,KH,KW,OC]
        wt = w[:, :, :, 0].transpose(1, 2, 0)  # [KH,KW,OC]
        return matmul.depthwise(xs, wt)
    out = []
    for gi in range(g):
        c = cols[..., gi * cg:(gi + 1) * cg].reshape(n * oh * ow, kh * kw * cg)
        out.append(matmul(c, w[gi * og:(gi + 1) * og].reshape(og, -1).T).reshape(n, oh, ow, og))
    return np.concatenate(out, axis=3)


def conv_input_grad(node: Node, w: np.ndarray, dz: np.ndarray, in_shape: tuple[int, ...]) -> np.ndarray:
    """The gradient of a conv's input from its pre-activation output's ``dz`` (NHWC): the
    columns' gradient scattered back over the kernel taps."""
    a = node.attrs
    g = a["group"]
    o, kh, kw, cg = w.shape
    cin = in_shape[3]
    og = o // g
    full = np.zeros((o, kh, kw, cin), dz.dtype)  # grouped weights as one dense kernel
    for i in range(g):
        full[i * og:(i + 1) * og, :, :, i * cg:(i + 1) * cg] = w[i * og:(i + 1) * og]
    n, oh, ow, _ = dz.shape
    dcols = (dz.reshape(-1, o) @ full.reshape(o, -1)).reshape(n, oh, ow, kh, kw, cin)
    t, l, b, r = a["pads"]
    sh, sw = a["strides"]
    dh, dw = a["dilations"]
    dx = np.zeros((n, in_shape[1] + t + b, in_shape[2] + l + r, cin), dz.dtype)
    for i in range(kh):
        for j in range(kw):
            dx[:, i * dh:i * dh + (oh - 1) * sh + 1:sh, j * dw:j * dw + (ow - 1) * sw + 1:sw, :] += dcols[:, :, :, i, j]
    return dx[:, t:t + in_shape[1], l:l + in_shape[2], :]


class _FloatProduct:
    def __call__(self, a, b):
        return a.astype(np.float32, copy=False) @ b.astype(np.float32, copy=False)

    def depthwise(self, xs, wt):
        return np.einsum("nhwijc,ijc->nhwc", xs.astype(np.float32), wt.astype(np.float32), optimize=True)


class _ExactProduct:
    def __init__(self, bound: int) -> None:
        self.bound = bound

    def __call__(self, a, b):
        return exact_matmul(a, b, self.bound)

    def depthwise(self, xs, wt):
        dtype = exact_dtype(self.bound)
        return np.einsum("nhwijc,ijc->nhwc", xs.astype(dtype, copy=False), wt.astype(dtype), optimize=True)


@register
class Conv2D(Op):
    name = "conv2d"

    def infer_shapes(self, node, in_shapes, graph):
        a = node.attrs
        n, h, w, _ = in_shapes[0]
        o = graph.constants[node.params["weight"]].shape[0]
        oh = conv_out_size(h, a["kernel"][0], a["strides"][0], a["dilations"][0], a["pads"][0], a["pads"][2])
        ow = conv_out_size(w, a["kernel"][1], a["strides"][1], a["dilations"][1], a["pads"][1], a["pads"][3])
        return [(n, oh, ow, o)]

    def eval_float(self, node, graph, xs):
        out_shape = graph.tensors[node.outputs[0]].shape
        y = _conv(xs[0].astype(np.float32), graph.param(node, "weight"), node, out_shape, 0.0, _FloatProduct())
        y = y + graph.param(node, "bias").astype(np.float32)
        return [apply_float_activation(node, y)]

    def float_forward(self, node, graph, xs, params):
        # im2col in the input's dtype, one product per group; the columns stay for the weight gradient
        a = node.attrs
        out_hw = graph.tensors[node.outputs[0]].shape[1:3]
        w = params["weight"]
        cols = np.ascontiguousarray(windows(xs[0], a["kernel"], a["strides"], a["dilations"], a["pads"], 0.0, out_hw))
        g = a["group"]
        n, oh, ow = cols.shape[:3]
        o, cg = w.shape[0], w.shape[3]
        og = o // g
        ys = [cols[..., i * cg:(i + 1) * cg].reshape(n * oh * ow, -1) @ w[i * og:(i + 1) * og].reshape(og, -1).T
              for i in range(g)]
        y = np.concatenate(ys, axis=1).reshape(n, oh, ow, o) + params["bias"]
        return [y], (cols, xs[0].shape, w)

    def float_backward(self, node, cache, dys, param_grads=True):
        cols, x_shape, w = cache
        dz = dys[0]
        dx = conv_input_grad(node, w, dz, x_shape)
        if not param_grads:
            return [dx], {}
        g = node.attrs["group"]
        o, cg = w.shape[0], w.shape[3]
        og = o // g
        d2 = dz.reshape(-1, o)
        dw = np.concatenate([(d2[:, i * og:(i + 1) * og].T @ cols[..., i * cg:(i + 1) * cg].reshape(len(d2), -1))
                             .reshape(og, *w.shape[1:]) for i in range(g)])
        return [dx], {"weight": dw, "bias": d2.sum(axis=0)}

    def quantize(self, node, graph):
        quantize_linear_layer(node, graph)

    def eval_int(self, node, graph, xs):
        a = node.attrs
        out_shape = graph.tensors[node.outputs[0]].shape
        if a.get("format"):  # minifloat: exact products in fixed point (hilc.compiler.minifloat)
            xa, wf = minifloat.layer_inputs(node, graph, xs[0])
            acc = _conv(xa, wf, node, out_shape, 0, _ExactProduct(a["raw_bound"]), exact_dtype(a["raw_bound"]))
            return [minifloat.requantize_layer(node, graph, acc)]
        w, offset = _prepared(node, graph)
        acc = _conv(xs[0], w, node, out_shape, a["zp_in"], _ExactProduct(a["raw_bound"]),
                    exact_dtype(a["raw_bound"]))
        acc = acc + offset if acc.dtype == np.int64 else acc.astype(np.float64) + offset
        return [arith.requantize(acc, graph.param(node, "mult"), graph.param(node, "shift"), a["zp_out"],
                                 a["lo"], a["hi"], acc_bound=a["acc_bound"], scratch=True)]

    def lower_tvm(self, node, graph, tb):
        """eval_int in TE: sum over raw x (borders hold zp_in) plus the per-channel constant
        ``bias - zp_in * sum(w)``, then the dyadic requantization."""
        refuse_minifloat(node, "TVM")
        te = tb.te
        a = node.attrs
        _, _, _, c = graph.tensors[node.inputs[0]].shape
        _, oh, ow, oc = graph.tensors[node.outputs[0]].shape
        (kh, kw), (sh, sw), (dh, dw), g = a["kernel"], a["strides"], a["dilations"], a["group"]
        cg, og = c // g, oc // g
        w = graph.param(node, "weight")
        offset = linear_offset(node, graph)
        dtype = tb.acc_dtype(a["raw_bound"])
        wt = tb.const(node, "w", w.transpose(1, 2, 3, 0).astype(dtype))  # [KH, KW, C/g, O]: O innermost
        xp = tb.pad_cast(node, tb.input(node), a["pads"], a["zp_in"], dtype)
        rh, rw, rc = (te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw"), te.reduce_axis((0, cg), "rc"))

        def channel(o):
            return rc if g == 1 else (o // og) * cg + rc

        acc = te.compute((tb.n, oh, ow, oc), lambda b, i, j, o: te.sum(
            xp[b, i * sh + rh * dh, j * sw + rw * dw, channel(o)] * wt[rh, rw, rc, o], axis=[rh, rw, rc]),
            name=tb.name(node, "acc"))
        rq = tb.requantizer(node, graph.param(node, "mult"), graph.param(node, "shift"), a["zp_out"], a["lo"],
                            a["hi"], a["acc_bound"], offset=offset)
        y = te.compute((tb.n, oh, ow, oc), lambda b, i, j, o: rq(acc[b, i, j, o], o), name=tb.name(node))
        tb.tile_conv(acc, y)
        return [y]

    def macs(self, node, graph):
        w = graph.param(node, "weight")
        o = graph.tensors[node.outputs[0]].shape
        return int(np.prod(o[1:3])) * int(w.size)

    def inplace_plane_bytes(self, node, graph) -> int:
        """Bytes of the one-channel plane an in-place depthwise conv needs (0: cannot run in place).
        Only a depthwise conv whose output has its input's shape qualifies: channel c of the
        output then overwrites exactly channel c of the input, saved in the plane first."""
        x, y = graph.tensors[node.inputs[0]].shape, graph.tensors[node.outputs[0]].shape
        if len(x) != 4 or x != y or node.attrs["group"] != x[3]:
            return 0
        # the in-place kernel takes int8 weights and activations (not packed sub-byte ones)
        if node.attrs.get("weight_bits", 8) in arith.PACKED_WEIGHT_BITS or any(
                graph.tensors[t].dtype == "int4" for t in (node.inputs[0], node.outputs[0])):
            return 0
        return x[1] * x[2]

    def lower_c(self, node, graph, em) -> str:
        refuse_minifloat(node, "MCU C")
        a = node.attrs
        _, h, w, c = graph.tensors[node.inputs[0]].shape
        _, oh, ow, oc = graph.tensors[node.outputs[0]].shape
        p = em.struct("hilc_conv_params", node.name, dict(
            in_h=h, in_w=w, in_c=c, out_h=oh, out_w=ow, out_c=oc, k_h=a["kernel"][0], k_w=a["kernel"][1],
            stride_h=a["strides"][0], stride_w=a["strides"][1], dil_h=a["dilations"][0], dil_w=a["dilations"][1],
            pad_t=a["pads"][0], pad_l=a["pads"][1], groups=a["group"], group_in=c // a["group"],
            group_out=oc // a["group"], zp_in=a["zp_in"], zp_out=a["zp_out"],
            lo=a["lo"], hi=a["hi"], **em.weights(node), bias=em.param(node, "bias"),
            mult=em.param(node, "mult"), shift=em.param(node, "shift")))
        plane = f"{node.outputs[0]}@plane"
        if plane in em.plan.offsets and em.plan.inplace.get(node.outputs[0]) == node.inputs[0]:
            return f"hilc_dwconv_inplace_s8({p}, {em.tensor(node.outputs[0])}, (arena + {em.plan.offsets[plane]}));"
        em.need_scratch(a["kernel"][0] * a["kernel"][1] * (c // a["group"]))
        return f"hilc_conv2d({p}, {em.tensor(node.inputs[0])}, {em.tensor(node.outputs[0])}, HILC_SCRATCH);"

    def lower_hls(self, node, graph, ctx) -> dict:
        from hilc.targets.hls import lower as hl

        a = node.attrs
        win = hl.window_fields(ctx, graph, node, a["dilations"])
        h, w, c, oh, ow, kh, kw = (win[k] for k in ("h", "w", "c", "oh", "ow", "kh", "kw"))
        oc = hl.tensor_shape(graph, node.outputs[0])[3]
        groups = a["group"]
        cg, og = c // groups, oc // groups
        wb = int(a.get("weight_bits", 8))
        ab = hl.tensor_bits(graph, node.inputs[0])
        wq = graph.param(node, "weight").reshape(oc, kh * kw * cg)
        return hl.minifloat_layer(ctx, node, dict(
            kind="conv2d", **win, oc=oc, groups=groups, cg=cg, og=og,
            **hl.linear_fields(ctx, node, wq, wb, ab),
            pe_options=hl.divisors(og), simd_options=hl.divisors(cg), macs=oh * ow * oc * kh * kw * cg,
            doc=f"{node.name}: conv {kh}x{kw}/{win['sh']}x{win['sw']}, {c}->{oc} channels, {groups} group(s), "
                f"{h}x{w} -> {oh}x{ow}, weights {wb}-bit, activations {ab}-bit",
        ), wq)


def _prepared(node: Node, graph: Graph) -> tuple[np.ndarray, np.ndarray]:
    """The weights and the per-channel constant ``bias - zp_in * sum(w)``, computed once.

    Padding holds the input zero point (real 0), so (x - zp) vanishes there: the sum can be
    taken over raw x and corrected by zp * sum(w) per channel.
    """
    key = f"{node.name}:linear"
    if key not in graph.cache:
        w, offset = graph.param(node, "weight"), linear_offset(node, graph)
        graph.cache[key] = (w, offset if not arith.FAST_EXACT_PATHS else offset.astype(np.float64))
    w, offset = graph.cache[key]
    if arith.FAST_EXACT_PATHS != (offset.dtype == np.float64):  # the mode changed since caching
        graph.cache.pop(key)
        return _prepared(node, graph)
    return w, offset


def linear_offset(node: Node, graph: Graph) -> np.ndarray:
    """``bias - zp_in * sum(w)`` per output channel, int64 (what ``_prepared`` caches)."""
    w = graph.param(node, "weight")
    wsum = w.reshape(w.shape[0], -1).astype(np.int64).sum(axis=1)
    return graph.param(node, "bias").astype(np.int64) - node.attrs["zp_in"] * wsum


def refuse_minifloat(node: Node, backend: str) -> None:
    if node.attrs.get("format"):
        raise UnsupportedModelError(
            f"{node.name} ({node.onnx_name}): {node.attrs['format']} minifloat layer: the {backend} backend has no "
            "minifloat kernels (use --target hls or the simulator)")


def quantize_linear_layer(node: Node, graph: Graph) -> None:
    """Shared by conv2d and dense: per-channel int8 weights, int32 bias, dyadic requantization."""
    if node.attrs.get("format"):
        minifloat.quantize_layer(node, graph)
        return
    qi, qo = in_quant(graph, node), out_quant(graph, node)
    w = graph.param(node, "weight").astype(np.float64)
    b = graph.param(node, "bias").astype(np.float64)
    bits = node.attrs.get("weight_bits", 8)
    if bits not in range(2, 9):
        raise UnsupportedModelError(f"{node.name} ({node.onnx_name}): weight_bits={bits} (supported: 2 to 8)")
    preset = node.attrs.pop("w_scale", None)
    if node.attrs.pop("w_scale_bits", bits) != bits:  # a grid chosen for another bit-width (ptq)
        preset = None
    if preset is not None:
        s_w = np.asarray(preset, np.float64)
        qmax = 2 ** (bits - 1) - 1
        w_int = np.clip(np.rint(w / s_w.reshape((-1,) + (1,) * (w.ndim - 1))), -qmax, qmax).astype(np.int8)
    elif bits < 8:
        w_int, s_w = arith.quantize_weights_subbyte(w, bits)
    else:
        w_int, s_w = arith.quantize_weights_per_channel(w, bits)
    s_acc = qi.scale * s_w
    b_int = np.rint(b / s_acc)
    if np.any(np.abs(b_int) > arith.INT32_MAX):
        raise UnsupportedModelError(f"{node.name} ({node.onnx_name}): bias does not fit int32 at scale s_in*s_w")
    b_int = b_int.astype(np.int32)
    mult, shift = arith.dyadic(s_acc / qo.scale)
    lo, hi = clamp_bounds(node, qo)
    in_absmax = max(qi.qmax - qi.zero_point, qi.zero_point - qi.qmin)
    bound = arith.accumulator_bound(w_int, in_absmax, b_int)
    if bound > arith.INT32_MAX:
        raise UnsupportedModelError(
            f"{node.name} ({node.onnx_name}): int32 accumulator could overflow (static bound {bound} > 2^31-1); "
            "the reduction must be split")
    if bits in arith.PACKED_WEIGHT_BITS and arith.packed_scaled_bound(w_int, in_absmax, bits) > arith.INT32_MAX:
        raise UnsupportedModelError(
            f"{node.name} ({node.onnx_name}): the {bits}-bit SIMD kernel's scaled int32 sum could overflow "
            f"(bound {arith.packed_scaled_bound(w_int, in_absmax, bits)} > 2^31-1); use 8-bit weights here")
    node.params["weight"] = graph.add_constant(f"{node.name}.weight", w_int)
    node.params["bias"] = graph.add_constant(f"{node.name}.bias", b_int)
    node.params["mult"] = graph.add_constant(f"{node.name}.mult", mult.astype(np.int32))
    node.params["shift"] = graph.add_constant(f"{node.name}.shift", shift.astype(np.int8))
    node.attrs.pop("act_lo", None)
    node.attrs.pop("act_hi", None)
    node.attrs.update(zp_in=qi.zero_point, zp_out=qo.zero_point, lo=lo, hi=hi, acc_bound=bound,
                      # bound on sum(x * w) over raw int8 x: what the simulator's BLAS path must hold
                      raw_bound=arith.accumulator_bound(w_int, 2 ** (qi.bits - 1), None),
                      weight_bits=bits)


# --- ONNX importers ------------------------------------------------------------------------

def _conv_attrs(ctx, spatial: tuple[int, int], kernel: tuple[int, int]) -> dict:
    strides = list(ctx.attr("strides", [1] * len(kernel)))
    dil = list(ctx.attr("dilations", [1] * len(kernel)))
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", "VALID"):
        p = list(ctx.attr("pads", [0] * 2 * len(kernel))) if auto_pad == "NOTSET" else [0] * 4
        pads = [p[0], p[1], p[2], p[3]]  # ONNX: [top, left, bottom, right]
    else:  # SAME_UPPER / SAME_LOWER
        pads = [0, 0, 0, 0]
        for ax in range(2):
            out = -(-spatial[ax] // strides[ax])
            total = max(0, (out - 1) * strides[ax] + dil[ax] * (kernel[ax] - 1) + 1 - spatial[ax])
            small, big = total // 2, total - total // 2
            first, second = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
            pads[ax], pads[ax + 2] = first, second
    return {"kernel": list(kernel), "strides": strides, "pads": pads, "dilations": dil}


@onnx_importer("Conv")
def import_conv(ctx, node) -> None:
    from hilc.compiler.onnx_import import NHWC

    x = ctx.value(node.input[0])
    w = ctx.require_const(node.input[1], "weight").astype(np.float32)
    if w.ndim == 3:  # Conv1d: a 2-D conv over a height of 1
        x = _as_2d(ctx, x)
        w = w[:, :, None, :]
        for a in node.attribute:
            if a.name in ("kernel_shape", "strides", "dilations"):
                a.ints[:] = [1, *a.ints]
            if a.name == "pads":
                a.ints[:] = [0, a.ints[0], 0, a.ints[1]]
    elif w.ndim != 4:
        raise ctx.fail(f"{w.ndim - 2}-D convolution is not supported (1-D and 2-D are)")
    x = ctx.to_layout(x, NHWC)
    group = int(ctx.attr("group", 1))
    o, cg, kh, kw = w.shape
    cin = ctx.graph.tensors[x].shape[3]
    if cg * group != cin or o % group:
        raise ctx.fail(f"weight shape {list(w.shape)} and group {group} do not match {cin} input channels")
    b = ctx.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if b is not None and b.size != o:
        raise ctx.fail(f"bias has {b.size} entries for {o} output channels")
    bias = np.zeros(o, np.float32) if b is None else b.astype(np.float32).reshape(o)
    h, wd = ctx.graph.tensors[x].shape[1:3]
    attrs = _conv_attrs(ctx, (h, wd), (kh, kw))
    attrs["group"] = group
    ws = ctx.weight_scales.get(node.input[1])
    if ws is not None and ws.size in (1, o):
        attrs["w_scale"] = np.broadcast_to(ws, (o,)).tolist()
    y = ctx.emit("conv2d", [x], attrs, {"weight": w.transpose(0, 2, 3, 1).copy(), "bias": bias}, layout=NHWC)
    if len(ctx.logical_shape(ctx.values[node.input[0]])) == 3:
        y = _back_to_1d(ctx, y)
    ctx.bind(node.output[0], y)


def _as_2d(ctx, x: str) -> str:
    """[N, C, L] -> physical [N, 1, L, C] (NHWC with H = 1)."""
    from hilc.compiler.onnx_import import NHWC

    xl = ctx.to_logical(x)
    n, c, length = ctx.graph.tensors[xl].shape
    y = ctx.emit("reshape", [xl], {"shape": [n, c, 1, length]}, layout=(0, 1, 2, 3))
    return ctx.to_layout(y, NHWC)


def _back_to_1d(ctx, y: str) -> str:
    yl = ctx.to_logical(y)
    n, c, _, length = ctx.graph.tensors[yl].shape
    return ctx.emit("reshape", [yl], {"shape": [n, c, length]}, layout=(0, 1, 2))


@onnx_importer("BatchNormalization")
def import_batchnorm(ctx, node) -> None:
    """Folded into the producing conv/dense when it is the only consumer, else a depthwise 1x1."""
    from hilc.compiler.onnx_import import NHWC

    if len(node.output) > 1 and any(node.output[1:]):
        raise ctx.fail("training-mode BatchNormalization (extra outputs) is not supported")
    x = ctx.value(node.input[0])
    gamma, beta, mean, var = (ctx.require_const(i, "BatchNormalization parameter").astype(np.float64)
                              for i in node.input[1:5])
    eps = float(ctx.attr("epsilon", 1e-5))
    c_axis = ctx.logical_shape(x)[1]
    if any(p.size != c_axis for p in (gamma, beta, mean, var)):
        raise ctx.fail(f"parameters must have {c_axis} entries (one per channel)")
    if not np.all(var + eps > 0):
        raise ctx.fail("variance + epsilon must be positive")
    scale = gamma / np.sqrt(var + eps)
    shift = beta - mean * scale
    # The statistics the BN output was trained to have (mean beta, std |scale|*sqrt(var)), kept
    # for data-free calibration (hilc.compiler.ptq) under the node that will produce it.
    out_stats = {"mean": beta.tolist(), "std": (np.abs(scale) * np.sqrt(var)).tolist()}
    prod = ctx.graph.producer(x)
    channel_axis = ctx.phys_axis(x, 1)
    if (prod is not None and prod.op in ("conv2d", "dense") and "act_lo" not in prod.attrs
            and ctx.onnx_uses.get(node.input[0], 0) == 1 and prod.outputs[0] == x
            and channel_axis == len(ctx.graph.tensors[x].shape) - 1):
        w = ctx.graph.constants[prod.params["weight"]].astype(np.float64)
        b = ctx.graph.constants[prod.params["bias"]].astype(np.float64)
        ctx.graph.constants[prod.params["weight"]] = (w * scale.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
        ctx.graph.constants[prod.params["bias"]] = (b * scale + shift).astype(np.float32)
        prod.attrs.pop("w_scale", None)
        prod.attrs.setdefault("folded", []).append(node.name)
        ctx.graph.meta.setdefault("bn_stats", {})[prod.name] = out_stats
        ctx.bind(node.output[0], x)
        return
    if len(ctx.logical_shape(x)) != 4:
        raise ctx.fail("a BatchNormalization that follows no conv/dense is supported on 4-D tensors only")
    x = ctx.to_layout(x, NHWC)
    c = ctx.graph.tensors[x].shape[3]
    attrs = {"kernel": [1, 1], "strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1], "group": c}
    w = scale.reshape(c, 1, 1, 1).astype(np.float32)
    y = ctx.emit("conv2d", [x], attrs, {"weight": w, "bias": shift.astype(np.float32)}, layout=NHWC,
                 onnx_out=node.output[0])
    ctx.graph.meta.setdefault("bn_stats", {})[y] = out_stats
