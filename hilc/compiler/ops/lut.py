"""Unary nonlinearities as lookup tables: Sigmoid, Tanh, HardSigmoid, HardSwish, LeakyRelu, Gelu.

With int8 activations any unary function is exactly a 256-entry table built at compile time
(``params['table']``, indexed by ``x + 128``): the inference path is one load per element.
Sigmoid and HardSigmoid output [0, 1] at scale 1/256, Tanh [-1, 1] at 1/128 (fixed, as TFLite
does); the others are calibrated.
"""

from __future__ import annotations

import math

import numpy as np

from hilc.compiler import arith
from hilc.compiler.ir import QParams
from hilc.compiler.ops.base import Op, in_quant, onnx_importer, out_quant, register


def _hardsigmoid(x, alpha=0.2, beta=0.5):
    return np.clip(alpha * x + beta, 0.0, 1.0)


def _gelu(x, a):
    if a.get("approximate", "none") == "tanh":
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + np.vectorize(math.erf, otypes=[np.float64])(x / np.sqrt(2.0)))


FUNCTIONS = {
    "sigmoid": lambda x, a: 1.0 / (1.0 + np.exp(-x)),
    "tanh": lambda x, a: np.tanh(x),
    "hardsigmoid": lambda x, a: _hardsigmoid(x, a.get("alpha", 0.2), a.get("beta", 0.5)),
    "hardswish": lambda x, a: x * _hardsigmoid(x, 1.0 / 6.0, 0.5),
    "leakyrelu": lambda x, a: np.where(x >= 0, x, x * a.get("alpha", 0.01)),
    "gelu": _gelu,  # exact (Erf) or tanh approximation: with int8 inputs the table is exact either way
    # Pieces of decomposed blocks that a QDQ model quantizes one by one (float models fuse them first).
    "erf": lambda x, a: np.vectorize(math.erf, otypes=[np.float64])(x),
    "sqrt": lambda x, a: np.sqrt(np.maximum(x, 0.0)),
    "pow": lambda x, a: np.power(x, a["exponent"]),
}
def _pre(x: np.ndarray, attrs: dict) -> np.ndarray:
    """Scalar multiplies / adds folded in front of the function (``passes.fold_scalars``)."""
    for op, c in attrs.get("pre", []):
        x = x * c if op == "mul" else x + c
    return x


FIXED_RANGES = {"sigmoid": (1.0 / 256, -128), "hardsigmoid": (1.0 / 256, -128), "tanh": (1.0 / 128, 0)}


@register
class Lut(Op):
    name = "lut"
    inplace_ok = True

    def output_rule(self, node) -> str:
        return "fixed" if node.attrs["fn"] in FIXED_RANGES else "calibrated"

    def fixed_output_quant(self, node, graph):
        s, zp = FIXED_RANGES[node.attrs["fn"]]
        return QParams(s, zp)

    def eval_float(self, node, graph, xs):
        f = FUNCTIONS[node.attrs["fn"]]
        return [f(_pre(xs[0].astype(np.float64), node.attrs), node.attrs).astype(np.float32)]

    def quantize(self, node, graph):
        qi, qo = in_quant(graph, node), out_quant(graph, node)
        codes = np.arange(qi.qmin, qi.qmax + 1)
        real = FUNCTIONS[node.attrs["fn"]](_pre(qi.scale * (codes - qi.zero_point).astype(np.float64), node.attrs),
                                           node.attrs)
        table = arith.quantize_host(real, qo.scale, qo.zero_point, qo.bits)
        node.params["table"] = graph.add_constant(f"{node.name}.table", table)
        node.attrs["table_offset"] = -qi.qmin  # index = x + 128 for int8

    def eval_int(self, node, graph, xs):
        return [graph.param(node, "table")[xs[0].astype(np.int32) + node.attrs["table_offset"]]]

    def lower_tvm(self, node, graph, tb):
        x = tb.input(node)
        table = tb.const(node, "table", graph.param(node, "table"))
        off = node.attrs["table_offset"]
        return [tb.te.compute(x.shape, lambda *i: table[x(*i).astype("int32") + off], name=tb.name(node))]

    def lower_c(self, node, graph, em) -> str:
        x, y = node.inputs[0], node.outputs[0]
        return f"hilc_lut_s8({em.size(y)}, {em.param(node, 'table')}, {em.tensor(x)}, {em.tensor(y)});"

    def lower_hls(self, node, graph, ctx) -> dict:
        from hilc.targets.hls import lower as hl

        ob = hl.tensor_bits(graph, node.outputs[0])
        table = ctx.rom(f"{node.name}_table", graph.param(node, "table"), f"ap_int<{ob}>")
        return hl.unary_layer(ctx, node, "lut", table=table, offset=node.attrs["table_offset"],
                              table_size=int(graph.param(node, "table").size), out_bits=ob)


def _lut_importer(fn: str):
    def imp(ctx, node) -> None:
        attrs = {"fn": fn}
        if fn == "gelu":
            attrs["approximate"] = str(ctx.attr("approximate", "none"))
            if attrs["approximate"] not in ("none", "tanh"):
                raise ctx.fail(f"Gelu approximate='{attrs['approximate']}' is not supported")
        for name in ("alpha", "beta"):
            v = ctx.attr(name)
            if v is not None:
                attrs[name] = float(v)
        ctx.emit("lut", [ctx.value(node.input[0])], attrs, onnx_out=node.output[0])

    return imp


for _op, _fn in (("Sigmoid", "sigmoid"), ("Tanh", "tanh"), ("HardSigmoid", "hardsigmoid"),
                 ("HardSwish", "hardswish"), ("LeakyRelu", "leakyrelu"), ("Gelu", "gelu")):
    onnx_importer(_op)(_lut_importer(_fn))


for _op, _fn in (("Erf", "erf"), ("Sqrt", "sqrt")):
    onnx_importer(_op)(_lut_importer(_fn))


@onnx_importer("Pow")
def import_pow(ctx, node) -> None:
    e = ctx.const(node.input[1])
    if e is None or e.size != 1 or float(e.reshape(-1)[0]) != round(float(e.reshape(-1)[0])):
        raise ctx.fail("Pow is supported only with a constant integer exponent")
    ctx.emit("lut", [ctx.value(node.input[0])], {"fn": "pow", "exponent": float(e.reshape(-1)[0])},
             onnx_out=node.output[0])
