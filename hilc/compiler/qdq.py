"""Pre-quantized ONNX models -> float ONNX nodes + quantization hints.

Works on ONNX nodes before the import walk:

* QLinearConv / QLinearMatMul / ConvInteger / MatMulInteger are expanded into
  DequantizeLinear -> float op -> QuantizeLinear, so every quantized form reduces to QDQ;
* a DequantizeLinear of a constant becomes a float constant; its per-channel scale is kept
  (``ctx.weight_scales``) so the integer weights are recovered exactly;
* a QuantizeLinear -> DequantizeLinear pair on an activation disappears and leaves its
  (scale, zero point) as a hint on the tensor (``ctx.quant_hints``), which the quantizer uses
  instead of calibration. uint8 activations become int8 with the zero point moved by 128.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper

from hilc.errors import UnsupportedModelError

if TYPE_CHECKING:
    from hilc.compiler.onnx_import import ImportContext

QUANT_OPS = ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
             "MatMulInteger")


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def preprocess(ctx: ImportContext, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    if not any(n.op_type in QUANT_OPS for n in nodes):
        return nodes
    nodes = _expand_quantized_ops(ctx, nodes)
    nodes = _fold_constant_dequantize(ctx, nodes)
    return _remove_qdq_pairs(ctx, nodes)


def _const(ctx: ImportContext, name: str, node: onnx.NodeProto, what: str) -> np.ndarray:
    v = ctx.consts.get(name)
    if v is None:
        raise UnsupportedModelError(f"node '{node.name}' ({node.op_type}): {what} '{name}' must be a constant")
    return v


def _expand_quantized_ops(ctx: ImportContext, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    out: list[onnx.NodeProto] = []
    for n in nodes:
        p = n.name or n.output[0]
        if n.op_type in ("QLinearConv", "QLinearMatMul"):
            x, xs, xzp, w, ws, wzp, ys, yzp = n.input[:8]
            float_op = "Conv" if n.op_type == "QLinearConv" else "MatMul"
            axis = 0 if float_op == "Conv" else 1
            ins = [f"{p}/x_f", f"{p}/w_f"]
            out.append(helper.make_node("DequantizeLinear", [x, xs, xzp], [ins[0]], name=f"{p}/dq_x"))
            out.append(helper.make_node("DequantizeLinear", [w, ws, wzp], [ins[1]], name=f"{p}/dq_w",
                                        axis=axis))
            if float_op == "Conv" and len(n.input) > 8 and n.input[8]:
                bias = _const(ctx, n.input[8], n, "bias").astype(np.float64)
                scale = np.asarray(_const(ctx, xs, n, "scale"), np.float64) * np.asarray(
                    _const(ctx, ws, n, "scale"), np.float64)
                ctx.consts[f"{p}/b_f"] = (bias * scale).astype(np.float32)
                ins.append(f"{p}/b_f")
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            out.append(helper.make_node(float_op, ins, [f"{p}/y_f"], name=p, **attrs))
            out.append(helper.make_node("QuantizeLinear", [f"{p}/y_f", ys, yzp], [n.output[0]], name=f"{p}/q_y"))
        elif n.op_type in ("ConvInteger", "MatMulInteger"):
            # Integer in, exact int32 out: (x - x_zp) (*) (w - w_zp) with unit scales.
            x, w = n.input[0], n.input[1]
            xzp = n.input[2] if len(n.input) > 2 and n.input[2] else ""
            wzp = n.input[3] if len(n.input) > 3 and n.input[3] else ""
            one = f"{p}/one"
            ctx.consts[one] = np.array(1.0, np.float32)
            if xzp and ctx.consts[xzp].size != 1:
                raise UnsupportedModelError(f"node '{p}' ({n.op_type}): per-row input zero point")
            float_op = "Conv" if n.op_type == "ConvInteger" else "MatMul"
            out.append(helper.make_node("DequantizeLinear", [x, one] + ([xzp] if xzp else []), [f"{p}/x_f"],
                                        name=f"{p}/dq_x"))
            wq = _const(ctx, w, n, "weight").astype(np.int32)
            if wzp:
                z = np.asarray(ctx.consts[wzp]).astype(np.int32)
                z = z.reshape((-1,) + (1,) * (wq.ndim - 1)) if float_op == "Conv" else z.reshape(1, -1)
                wq = wq - z
            ctx.consts[f"{p}/w_f"] = wq.astype(np.float32)
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            out.append(helper.make_node(float_op, [f"{p}/x_f", f"{p}/w_f"], [n.output[0]], name=p, **attrs))
        else:
            out.append(n)
    return out


def _to_int8(scale: np.ndarray, zp: np.ndarray) -> tuple[float, int]:
    if scale.size != 1:
        raise ValueError("per-axis activation quantization")
    z = int(np.asarray(zp).reshape(-1)[0]) if zp is not None else 0
    if zp is not None and np.asarray(zp).dtype == np.uint8:
        z -= 128
    return float(np.asarray(scale).reshape(-1)[0]), z


def _fold_constant_dequantize(ctx: ImportContext, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    out = []
    for n in nodes:
        if n.op_type == "DequantizeLinear" and n.input[0] in ctx.consts:
            q = ctx.consts[n.input[0]].astype(np.float64)
            s = np.asarray(_const(ctx, n.input[1], n, "scale"), np.float64)
            z = np.asarray(ctx.consts[n.input[2]], np.float64) if len(n.input) > 2 and n.input[2] else 0.0
            axis = _attr(n, "axis", 1)
            if s.size > 1:
                shape = [1] * q.ndim
                shape[axis] = -1
                s_b = s.reshape(shape)
                z_b = np.asarray(z).reshape(shape) if np.size(z) > 1 else z
                ctx.weight_scales[n.output[0]] = s
                if np.any(np.asarray(z) != 0):
                    ctx.weight_scales.pop(n.output[0])  # asymmetric weights: requantized by hilc
            else:
                s_b, z_b = s, z
                if np.all(np.asarray(z) == 0):
                    ctx.weight_scales[n.output[0]] = s.reshape(1)
            ctx.consts[n.output[0]] = ((q - z_b) * s_b).astype(np.float32)
        else:
            out.append(n)
    return out


def _remove_qdq_pairs(ctx: ImportContext, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in ctx.model.graph.output}
    rename: dict[str, str] = {}
    drop: set[int] = set()
    inserted: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []  # (dropped DQ, the Mul that replaces it)
    for n in nodes:
        if n.op_type != "QuantizeLinear":
            continue
        x, xq = n.input[0], n.output[0]
        s = np.asarray(_const(ctx, n.input[1], n, "scale"))
        z = ctx.consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        try:
            scale, zp = _to_int8(s, z)
        except ValueError:
            raise UnsupportedModelError(
                f"node '{n.name}' (QuantizeLinear): per-axis activation quantization is not supported") from None
        if z is not None and z.dtype not in (np.int8, np.uint8):
            raise UnsupportedModelError(
                f"node '{n.name}' (QuantizeLinear): {z.dtype} activations are not supported (int8/uint8 only)")
        ctx.quant_hints[x] = (scale, zp)
        drop.add(id(n))
        for c in consumers.get(xq, []):
            if c.op_type != "DequantizeLinear":
                raise UnsupportedModelError(
                    f"node '{c.name}' ({c.op_type}) consumes the quantized tensor '{xq}' directly; "
                    "only DequantizeLinear may follow QuantizeLinear")
            cs = np.asarray(_const(ctx, c.input[1], c, "scale"))
            cz = ctx.consts.get(c.input[2]) if len(c.input) > 2 and c.input[2] else None
            c_scale, c_zp = _to_int8(cs, cz)
            drop.add(id(c))
            if c_zp != zp:
                raise UnsupportedModelError(
                    f"node '{c.name}' (DequantizeLinear): zero point {c_zp} differs from its QuantizeLinear's {zp}")
            if abs(c_scale - scale) <= 1e-12 * max(scale, 1e-30):
                rename[c.output[0]] = x
            else:
                # Dequantizing with another scale is a constant multiply (ConvInteger's unit scale).
                ratio = f"{c.output[0]}/ratio"
                ctx.consts[ratio] = np.array(c_scale / scale, np.float32)
                inserted.append((c, helper.make_node("Mul", [x, ratio], [c.output[0]], name=f"{c.name}/rescale")))
        if xq in graph_outputs:
            rename[xq] = x
    for dq, mul in inserted:  # after the walk: never grow the list being iterated
        nodes.insert(nodes.index(dq), mul)
    for n in nodes:
        if n.op_type == "DequantizeLinear" and id(n) not in drop:
            raise UnsupportedModelError(
                f"node '{n.name}' (DequantizeLinear): its input '{n.input[0]}' is neither a constant nor "
                "the output of a QuantizeLinear")
    kept = []
    for n in nodes:
        if id(n) in drop:
            continue
        for k, i in enumerate(n.input):
            if i in rename:
                n.input[k] = rename[i]
        kept.append(n)
    for o in ctx.model.graph.output:
        if o.name in rename and rename[o.name] != o.name:
            o.name = rename[o.name]
    return kept
