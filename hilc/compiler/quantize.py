"""Float graph -> integer-only graph (HAWQ-V3 dyadic arithmetic, see ``arith``).

Every activation gets a per-tensor ``QParams`` (from a QDQ hint, the op's fixed range, its
input's, or calibration), then each operator's own ``quantize`` swaps its float params for
integers: per-channel int8 weights, int32 biases, dyadic multipliers, lookup tables.
"""

from __future__ import annotations

import numpy as np

from hilc.compiler import arith
from hilc.compiler.ir import Graph, QParams
from hilc.compiler.ops import OPS
from hilc.errors import HilcError


def _from_range(g: Graph, name: str) -> QParams:
    ranges = g.meta.get("calibration", {})
    if name not in ranges:
        raise HilcError(f"tensor '{name}' has no calibration range: compile a float model with --calib FILE "
                        "(or give a QDQ-quantized model)")
    lo, hi = ranges[name]
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise HilcError(f"tensor '{name}' has a non-finite calibration range [{lo}, {hi}]: the float model "
                        "overflows on the calibration data")
    bits = int(g.meta.get("act_bits", {}).get(name, 8))  # mixed precision: assign_bitwidths sets it
    # sub-byte widths take a clipped range (mixed.prepare_subbyte) where one was measured
    lo, hi = g.meta.get("subbyte_ranges", {}).get(name, {}).get(str(bits), (lo, hi))
    scale, zp = arith.choose_qparams(lo, hi, bits)
    return QParams(scale, zp, bits)


def _hints_through_data_movement(g: Graph) -> dict:
    """QDQ models often quantize after a Reshape/Flatten/Transpose, not before: the tensor that
    feeds such an op takes the hint of its output (the values are the same)."""
    hints = dict(g.meta.get("quant_hints", {}))
    for node in reversed(g.nodes):
        if OPS[node.op].output_rule(node) == "input" and node.outputs[0] in hints and node.inputs[0] not in hints:
            hints[node.inputs[0]] = hints[node.outputs[0]]
    return hints


def _requantize_after(g: Graph, node, out: str, target: QParams) -> None:
    """The op keeps its input's scale, but the model asks for another at its output: the op
    writes a new tensor and a requant node produces ``out`` at the requested scale."""
    from hilc.compiler.ir import Node, Tensor

    pre = f"{out}.pre"
    t = g.tensors[out]
    g.tensors[pre] = Tensor(pre, t.shape, "int8", t.quant)
    node.outputs = [pre if o == out else o for o in node.outputs]
    req = Node(f"{node.name}.requant", "requant", [pre], [out], {}, {}, node.onnx_name)
    g.nodes.insert(g.nodes.index(node) + 1, req)
    g.tensors[out].quant = target
    OPS["requant"].quantize(req, g)


def quantize(graph: Graph) -> Graph:
    g = graph.copy()
    hints = _hints_through_data_movement(g)
    for name in g.inputs:
        t = g.tensors[name]
        t.quant = QParams(*hints[name]) if name in hints else _from_range(g, name)
        t.dtype = "int8"
    for node in list(g.nodes):
        op = OPS[node.op]
        rule = op.output_rule(node)
        for out in node.outputs:
            t = g.tensors[out]
            if rule == "input":
                src = g.tensors[node.inputs[0]].quant
                t.quant = QParams(src.scale, src.zero_point, src.bits)
                if out in hints and (hints[out][0], hints[out][1]) != (src.scale, src.zero_point):
                    _requantize_after(g, node, out, QParams(*hints[out]))
            elif out in hints and op.output_hint_ok:
                t.quant = QParams(*hints[out])
            elif rule == "fixed":
                t.quant = op.fixed_output_quant(node, g)
            else:
                t.quant = _from_range(g, out)
            t.dtype = "int8"
        try:
            op.quantize(node, g)
        except ValueError as e:
            raise HilcError(f"node '{node.onnx_name or node.name}' ({node.op}): cannot be quantized: {e}") from None
    g.remove_unused_constants()
    g.meta["precision"] = "int8"
    return g
