"""report.json: what a compile produced, per layer and in total."""

from __future__ import annotations

from typing import Any

import numpy as np

from hilc import __version__
from hilc.compiler.ir import Graph
from hilc.compiler.ops import OPS
from hilc.compiler.ops import base as ops_base


def _logical_shape(graph: Graph, name: str) -> list[int]:
    t = graph.tensors[name]
    if t.layout is None:
        return list(t.shape)
    out = [0] * len(t.shape)
    for i, ax in enumerate(t.layout):
        out[ax] = t.shape[i]
    return out


def build_report(graph: Graph, model: str, target: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    layers = []
    total_macs = total_bitops = weights_bytes = total_bitops_int8 = 0
    for node in graph.nodes:
        op = OPS[node.op]
        macs = op.macs(node, graph)
        out = graph.tensors[node.outputs[0]]
        act_bits = out.quant.bits if out.quant else 32
        in_bits = graph.tensors[node.inputs[0]].quant.bits if graph.tensors[node.inputs[0]].quant else 32
        w_bits = ops_base.node_weight_bits(node)
        bitops = ops_base.node_bitops(node, graph, macs, in_bits)
        n_w = op.weight_count(node, graph)
        wbytes = (n_w * (w_bits or 8) + 7) // 8
        total_macs += macs
        total_bitops += bitops
        total_bitops_int8 += ops_base.bitops(macs, 8)  # every weight and activation at 8 bits
        weights_bytes += wbytes
        layer = {"name": node.name, "op": node.op, "onnx_name": node.onnx_name, "macs": macs,
                 "bitops": bitops, "weight_bits": w_bits, "act_bits": act_bits, "in_act_bits": in_bits,
                 "out_shape": list(out.shape),
                 "weights_bytes": wbytes}
        if "acc_bound" in node.attrs:
            bound = node.attrs["acc_bound"]
            layer["acc_bound"] = bound
            layer["acc_bits_needed"] = int(np.ceil(np.log2(bound + 1))) + 1 if bound else 1
        layers.append(layer)
    const_bytes = int(sum(v.nbytes for v in graph.constants.values()))
    io = {}
    for name in graph.inputs + graph.outputs:
        t = graph.tensors[name]
        io[name] = {"onnx_name": t.onnx_name, "shape": _logical_shape(graph, name),
                    "scale": t.quant.scale if t.quant else None,
                    "zero_point": t.quant.zero_point if t.quant else None}
    report: dict[str, Any] = {
        "hilc_version": __version__,
        "model": model,
        "target": target,
        "precision": graph.meta.get("precision", "float32"),
        "macs": total_macs,
        "bitops": total_bitops,
        "bitops_int8": total_bitops_int8,  # the same graph with every weight and activation at 8 bits
        "weights_bytes": weights_bytes,
        "constants_bytes": const_bytes,
        "inputs": {k: io[k] for k in graph.inputs},
        "outputs": {k: io[k] for k in graph.outputs},
        "calibration": graph.meta.get("calibration_method",
                                      {"method": "qdq" if graph.meta.get("quant_hints") else None}),
        "layers": layers,
    }
    if extra:
        report.update(extra)
    return report
