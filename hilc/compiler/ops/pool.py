"""Max and average pooling (global ones are pooling with the whole plane as the window), NHWC.

Attributes: ``kernel``, ``strides``, ``pads`` [top, left, bottom, right], ``dilations``,
``extra`` [bottom, right] (ceil-mode overhang: never counted), ``count_include_pad``.
maxpool keeps its input's quantization and takes a max of integers. avgpool sums ``x - zp``
over the window and rescales with a dyadic pair chosen per window size (``counts``: the
distinct numbers of counted elements, ``mult``/``shift`` aligned with them), so border windows
divide by their own count without a division.
"""

from __future__ import annotations

import numpy as np

from hilc.compiler import arith
from hilc.compiler.ops.base import (
    Op,
    apply_float_activation,
    clamp_bounds,
    in_quant,
    onnx_importer,
    out_quant,
    register,
)
from hilc.compiler.ops.conv import conv_out_size, windows
from hilc.errors import UnsupportedModelError


def _full_pads(a) -> list[int]:
    t, l, b, r = a["pads"]
    eb, er = a.get("extra", [0, 0])
    return [t, l, b + eb, r + er]


def _out_hw(a, h: int, w: int) -> tuple[int, int]:
    p = _full_pads(a)
    d = a.get("dilations", [1, 1])
    return (conv_out_size(h, a["kernel"][0], a["strides"][0], d[0], p[0], p[2]),
            conv_out_size(w, a["kernel"][1], a["strides"][1], d[1], p[1], p[3]))


def count_map(a, h: int, w: int) -> np.ndarray:
    """[OH, OW] number of elements each average-pool window divides by."""
    ones = np.ones((1, h, w, 1), np.int64)
    if a.get("count_include_pad"):
        t, l, b, r = a["pads"]
        ones = np.pad(ones, ((0, 0), (t, b), (l, r), (0, 0)), constant_values=1)
        eb, er = a.get("extra", [0, 0])
        pads = [0, 0, eb, er]
    else:
        pads = _full_pads(a)
    oh, ow = _out_hw(a, h, w)
    win = windows(ones, a["kernel"], a["strides"], [1, 1], pads, 0, (oh, ow))
    return win.sum(axis=(3, 4, 5))[0]


class _Pool(Op):
    def infer_shapes(self, node, in_shapes, graph):
        n, h, w, c = in_shapes[0]
        return [(n, *_out_hw(node.attrs, h, w), c)]

    def macs(self, node, graph):
        o = graph.tensors[node.outputs[0]].shape
        return int(np.prod(o[1:])) * int(np.prod(node.attrs["kernel"]))

    def _c_fields(self, node, graph) -> dict:
        a = node.attrs
        _, h, w, c = graph.tensors[node.inputs[0]].shape
        _, oh, ow, _ = graph.tensors[node.outputs[0]].shape
        d = a.get("dilations", [1, 1])
        return dict(in_h=h, in_w=w, c=c, out_h=oh, out_w=ow, k_h=a["kernel"][0], k_w=a["kernel"][1],
                    stride_h=a["strides"][0], stride_w=a["strides"][1], dil_h=d[0], dil_w=d[1],
                    pad_t=a["pads"][0], pad_l=a["pads"][1], pad_b=a["pads"][2], pad_r=a["pads"][3])

    def lower_hls(self, node, graph, ctx) -> dict:
        from hilc.targets.hls import lower as hl

        a = node.attrs
        win = hl.window_fields(ctx, graph, node, a.get("dilations", [1, 1]) if node.op == "maxpool" else (1, 1))
        h, w = win["h"], win["w"]
        cfg = dict(kind=node.op, **win, act_bits=hl.tensor_bits(graph, node.inputs[0]),
                   doc=f"{node.name}: {node.op} {win['kh']}x{win['kw']}/{win['sh']}x{win['sw']} over {win['c']} "
                       f"channels, {h}x{w} -> {win['oh']}x{win['ow']}")
        if node.op == "avgpool":
            idx = np.searchsorted(a["counts"], count_map(a, h, w))
            cfg.update(count_idx=ctx.rom(f"{node.name}_count_idx", idx, "ap_uint<8>"),
                       mult=ctx.rom(f"{node.name}_mult", graph.param(node, "mult"), "ap_uint<31>"),
                       shift=ctx.rom(f"{node.name}_shift", graph.param(node, "shift"), "ap_uint<6>"),
                       zp_in=a["zp_in"], zp_out=a["zp_out"], lo=a["lo"], hi=a["hi"])
        return cfg


@register
class MaxPool(_Pool):
    name = "maxpool"
    output_quant_rule = "input"

    def _run(self, node, x, pad_value):
        a = node.attrs
        oh, ow = _out_hw(a, x.shape[1], x.shape[2])
        win = windows(x, a["kernel"], a["strides"], a.get("dilations", [1, 1]), _full_pads(a), pad_value, (oh, ow))
        return win.max(axis=(3, 4))

    def eval_float(self, node, graph, xs):
        return [self._run(node, xs[0].astype(np.float32), -np.inf)]

    def eval_int(self, node, graph, xs):
        return [self._run(node, xs[0], np.iinfo(xs[0].dtype).min)]

    def lower_tvm(self, node, graph, tb):
        te, tx = tb.te, tb.tirx
        a = node.attrs
        x = tb.input(node)
        _, h, w, _ = graph.tensors[node.inputs[0]].shape
        (kh, kw), (sh, sw) = a["kernel"], a["strides"]
        dh, dw = a.get("dilations", [1, 1])
        t, left = a["pads"][0], a["pads"][1]
        rh, rw = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw")

        def f(b, i, j, c):
            y, xx = i * sh + rh * dh - t, j * sw + rw * dw - left
            inside = tx.all(y >= 0, y < h, xx >= 0, xx < w)
            # the simulator pads with the int8 minimum, which never wins a max
            return te.max(tx.if_then_else(inside, x[b, y, xx, c], tx.const(-128, "int8")), axis=[rh, rw])

        return [te.compute(tb.shape(node.outputs[0]), f, name=tb.name(node))]

    def lower_c(self, node, graph, em) -> str:
        p = em.struct("hilc_pool_params", node.name, self._c_fields(node, graph))
        return f"hilc_maxpool_s8({p}, {em.tensor(node.inputs[0])}, {em.tensor(node.outputs[0])});"

    def macs(self, node, graph):
        return 0


@register
class AvgPool(_Pool):
    name = "avgpool"

    def eval_float(self, node, graph, xs):
        (y,), _ = self.float_forward(node, graph, [xs[0].astype(np.float32)], {})
        return [apply_float_activation(node, y)]

    def float_forward(self, node, graph, xs, params):
        a = node.attrs
        x = xs[0]
        oh, ow = _out_hw(a, x.shape[1], x.shape[2])
        cnt = count_map(a, x.shape[1], x.shape[2]).astype(np.float32)[None, :, :, None]
        s = windows(x, a["kernel"], a["strides"], [1, 1], _full_pads(a), 0.0, (oh, ow)).sum(axis=(3, 4))
        return [s / cnt], (cnt, x.shape)

    def float_backward(self, node, cache, dys, param_grads=True):
        cnt, x_shape = cache
        a = node.attrs
        kh, kw = a["kernel"]
        sh, sw = a["strides"]
        t, left, bot, r = _full_pads(a)
        dy = dys[0]
        n, oh, ow, c = dy.shape
        d = dy / cnt
        dx = np.zeros((n, x_shape[1] + t + bot, x_shape[2] + left + r, c), dy.dtype)
        for i in range(kh):
            for j in range(kw):
                dx[:, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw, :] += d
        return [dx[:, t:t + x_shape[1], left:left + x_shape[2], :]], {}

    def differentiable(self, node):
        return list(node.attrs.get("extra", [0, 0])) == [0, 0]  # ceil mode: the backward has no extra rows

    def quantize(self, node, graph):
        qi, qo = in_quant(graph, node), out_quant(graph, node)
        _, h, w, _ = graph.tensors[node.inputs[0]].shape
        counts = sorted({int(c) for c in np.unique(count_map(node.attrs, h, w))})
        # The C kernel sums x - zp over a window in int32: prove it cannot overflow.
        in_absmax = max(qi.qmax - qi.zero_point, qi.zero_point - qi.qmin)
        bound = int(np.prod(node.attrs["kernel"], dtype=np.int64)) * in_absmax
        if bound > arith.INT32_MAX:
            raise UnsupportedModelError(
                f"{node.name} ({node.onnx_name}): int32 accumulator could overflow (a {node.attrs['kernel'][0]}x"
                f"{node.attrs['kernel'][1]} window of int8 values: static bound {bound} > 2^31-1); "
                "pool in two steps")
        mult, shift = arith.dyadic(qi.scale / (qo.scale * np.asarray(counts, np.float64)))
        node.params["mult"] = graph.add_constant(f"{node.name}.mult", mult.astype(np.int32))
        node.params["shift"] = graph.add_constant(f"{node.name}.shift", shift.astype(np.int8))
        lo, hi = clamp_bounds(node, qo)
        node.attrs.pop("act_lo", None)
        node.attrs.pop("act_hi", None)
        node.attrs.update(counts=counts, zp_in=qi.zero_point, zp_out=qo.zero_point, lo=lo, hi=hi, acc_bound=bound)

    def eval_int(self, node, graph, xs):
        a = node.attrs
        x = xs[0].astype(np.int32) - a["zp_in"]
        oh, ow = _out_hw(a, x.shape[1], x.shape[2])
        acc = windows(x, a["kernel"], a["strides"], [1, 1], _full_pads(a), 0, (oh, ow)).sum(
            axis=(3, 4), dtype=np.int64)
        idx = np.searchsorted(a["counts"], count_map(a, x.shape[1], x.shape[2]))
        b = graph.param(node, "mult").astype(np.int64)[idx][None, :, :, None]
        c = graph.param(node, "shift").astype(np.int64)[idx][None, :, :, None]
        y = arith.rounding_shift(acc * b, c) + a["zp_out"]
        return [np.clip(y, a["lo"], a["hi"]).astype(np.int8)]

    def lower_tvm(self, node, graph, tb):
        """Window sums of x - zp_in (padding counts as 0), then the dyadic pair of each output
        position's element count, looked up at compile time."""
        te, tx = tb.te, tb.tirx
        a = node.attrs
        x = tb.input(node)
        _, h, w, _ = graph.tensors[node.inputs[0]].shape
        _, oh, ow, _ = graph.tensors[node.outputs[0]].shape
        (kh, kw), (sh, sw) = a["kernel"], a["strides"]
        t, left = a["pads"][0], a["pads"][1]
        idx = np.searchsorted(a["counts"], count_map(a, h, w)).reshape(-1)
        mult = graph.param(node, "mult").astype(np.int64)[idx]
        shift = graph.param(node, "shift").astype(np.int64)[idx]
        rh, rw = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw")
        zp = tb.scalar(node, "zp_in", a["zp_in"], "int32")

        def sums(b, i, j, c):
            y, xx = i * sh + rh - t, j * sw + rw - left
            inside = tx.all(y >= 0, y < h, xx >= 0, xx < w)
            return te.sum(tx.if_then_else(inside, x[b, y, xx, c].astype("int32") - zp, 0), axis=[rh, rw])

        acc = te.compute(tb.shape(node.outputs[0]), sums, name=tb.name(node, "sum"))
        rq = tb.requantizer(node, mult, shift, a["zp_out"], a["lo"], a["hi"], bound=256 * kh * kw)
        return [te.compute(tb.shape(node.outputs[0]), lambda b, i, j, c: rq(acc[b, i, j, c], i * ow + j),
                           name=tb.name(node))]

    def lower_c(self, node, graph, em) -> str:
        a = node.attrs
        fields = self._c_fields(node, graph)
        fields.update(count_include_pad=a.get("count_include_pad", 0), zp_in=a["zp_in"], zp_out=a["zp_out"],
                      lo=a["lo"], hi=a["hi"], n_counts=len(a["counts"]),
                      counts=em.array(f"{node.name}_counts", np.asarray(a["counts"], np.int32)),
                      mult=em.param(node, "mult"), shift=em.param(node, "shift"))
        p = em.struct("hilc_pool_params", node.name, fields)
        return f"hilc_avgpool_s8({p}, {em.tensor(node.inputs[0])}, {em.tensor(node.outputs[0])});"


# --- ONNX importers ------------------------------------------------------------------------

def _pool_attrs(ctx, h: int, w: int) -> dict:
    from hilc.compiler.ops.conv import _conv_attrs

    kernel = list(ctx.attr("kernel_shape"))
    if len(kernel) != 2:
        raise ctx.fail(f"{len(kernel)}-D pooling is not supported (2-D only)")
    a = _conv_attrs(ctx, (h, w), tuple(kernel))
    a["extra"] = [0, 0]
    if ctx.attr("ceil_mode", 0):
        for ax, n in enumerate((h, w)):
            p0, p1 = a["pads"][ax], a["pads"][ax + 2]
            k, s, d = kernel[ax], a["strides"][ax], a["dilations"][ax]
            out = conv_out_size(n, k, s, d, p0, p1, ceil=True)
            if (out - 1) * s >= n + p0:  # the last window would start in the end padding
                out -= 1
            a["extra"][ax] = max(0, (out - 1) * s + d * (k - 1) + 1 - (n + p0 + p1))
    return a


@onnx_importer("MaxPool")
def import_maxpool(ctx, node) -> None:
    from hilc.compiler.onnx_import import NHWC

    if len(node.output) > 1 and node.output[1]:
        raise ctx.fail("MaxPool's Indices output is not supported")
    if ctx.attr("storage_order", 0):
        raise ctx.fail("MaxPool storage_order=1 is not supported")
    x = ctx.to_layout(ctx.value(node.input[0]), NHWC)
    _, h, w, _ = ctx.graph.tensors[x].shape
    ctx.emit("maxpool", [x], _pool_attrs(ctx, h, w), layout=NHWC, onnx_out=node.output[0])


@onnx_importer("AveragePool")
def import_avgpool(ctx, node) -> None:
    from hilc.compiler.onnx_import import NHWC

    x = ctx.to_layout(ctx.value(node.input[0]), NHWC)
    _, h, w, _ = ctx.graph.tensors[x].shape
    a = _pool_attrs(ctx, h, w)
    if a["dilations"] != [1, 1]:
        raise ctx.fail("dilated AveragePool is not supported")
    a["count_include_pad"] = int(ctx.attr("count_include_pad", 0))
    ctx.emit("avgpool", [x], a, layout=NHWC, onnx_out=node.output[0])


@onnx_importer("GlobalAveragePool", "GlobalMaxPool")
def import_global_pool(ctx, node) -> None:
    from hilc.compiler.onnx_import import NHWC

    x = ctx.value(node.input[0])
    if len(ctx.logical_shape(x)) != 4:
        raise ctx.fail("global pooling is supported on 4-D (NCHW) tensors only")
    x = ctx.to_layout(x, NHWC)
    _, h, w, _ = ctx.graph.tensors[x].shape
    a = {"kernel": [h, w], "strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1], "extra": [0, 0]}
    op = "avgpool" if node.op_type == "GlobalAveragePool" else "maxpool"
    if op == "avgpool":
        a["count_include_pad"] = 0
    ctx.emit(op, [x], a, layout=NHWC, onnx_out=node.output[0])
