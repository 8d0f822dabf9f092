"""``hilc inspect``: what an ONNX model holds and where it could run, before compiling it.

Everything comes from the ONNX file and ONNX shape inference, so models hilc cannot import
(unsupported operators) are inspected too. Memory figures assume hilc's deployment: int8
activations, one byte per element, batch 1, and a layer-by-layer schedule where a tensor
lives from its producer to its last consumer (no in-place reuse: an upper bound of the
arena hilc would plan). Flash is int8 weights plus int32 biases, without code.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from hilc.errors import HilcError

# Rough size of hilc's runtime and generated code without weights (benchmarks/mcu.py measured
# 3,080 B for resnet8 on Cortex-M4): what a board's flash must hold besides the constants.
CODE_BYTES_ESTIMATE = 16 * 1024


@dataclass
class LayerInfo:
    name: str
    op: str
    supported: bool
    out_shape: list[int]
    macs: int
    params: int
    live_bytes: int  # int8 activation bytes alive while this node runs


@dataclass
class Inspection:
    model: str
    opset: int
    ops: dict[str, int]
    unsupported: list[str]
    params: int
    macs: int
    layers: list[LayerInfo]
    peak_activation_bytes: int
    flash_estimate_bytes: int
    boards: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def supported(self) -> bool:
        return not self.unsupported

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self) | {"supported": self.supported}


def _shape(shapes: dict[str, tuple[int, ...]], name: str) -> tuple[int, ...]:
    return tuple(d if d > 0 else 1 for d in shapes.get(name, ()))


def _elements(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


def _is_param(c: np.ndarray) -> bool:
    """A learned parameter, not a shape, axis list or scalar attribute (int64 constants are those)."""
    return c.ndim >= 1 and c.size > 1 and (c.dtype.kind == "f" or c.dtype in (np.int8, np.uint8, np.int32))


def _macs(node: onnx.NodeProto, shapes: dict, consts: dict) -> int:
    out = _shape(shapes, node.output[0]) if node.output else ()
    if node.op_type in ("Conv", "ConvInteger", "QLinearConv", "ConvTranspose"):
        w_name = node.input[3] if node.op_type == "QLinearConv" else node.input[1]
        w = consts.get(w_name)
        wshape = w.shape if w is not None else _shape(shapes, w_name)
        if not wshape or not out:
            return 0
        if node.op_type == "ConvTranspose":
            return _elements(_shape(shapes, node.input[0])) * int(np.prod(wshape[1:]))
        return _elements(out) * int(np.prod(wshape[1:]))
    if node.op_type in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul"):
        a_name = node.input[0]
        a = _shape(shapes, a_name)
        if not a or not out:
            return 0
        k = a[-1]
        if node.op_type == "Gemm":
            for at in node.attribute:
                if at.name == "transA" and at.i:
                    k = a[0]
        return _elements(out) * int(k)
    return 0


def inspect_model(path: str | Path) -> Inspection:
    """Inspect an ONNX file: operators, parameters, MACs, layer-by-layer activation memory, fitting boards."""
    from hilc.compiler.onnx_import import load_onnx
    from hilc.compiler.ops import ONNX_IMPORTERS
    from hilc.hil.boards import list_boards

    model = load_onnx(path)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as e:
        raise HilcError(f"{path}: ONNX shape inference failed: {str(e).strip().splitlines()[0]}") from None
    g = inferred.graph
    consts: dict[str, np.ndarray] = {}
    for init in g.initializer:
        try:
            consts[init.name] = numpy_helper.to_array(init)
        except Exception as e:
            raise HilcError(f"{path}: initializer '{init.name}' is unreadable ({e})") from None
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)

    for vi in g.input:  # MACs and memory need every size: -1 would silently count as 1
        dims = shapes.get(vi.name, ())
        if vi.name not in consts and (not dims or any(d <= 0 for d in dims[1:])):
            raise HilcError(f"{path}: graph input '{vi.name}' has shape {list(dims)}: only the first (batch) axis "
                            "may be dynamic (export the model with fixed sizes)")
    nodes = [n for n in g.node if n.op_type != "Constant"]
    supported = {n.op_type for n in nodes if n.op_type in ONNX_IMPORTERS and n.domain in ("", "ai.onnx")}
    unsupported = [f"{n.name or f'#{i}'} ({n.op_type})" for i, n in enumerate(nodes) if n.op_type not in supported]

    # Lifetimes of activations (not constants): from the producer (or the graph input) to the last use.
    acts = {vi.name for vi in g.input if vi.name not in consts}
    last: dict[str, int] = {}
    first: dict[str, int] = {a: -1 for a in acts}
    for i, n in enumerate(nodes):
        for t in n.input:
            if t and t not in consts:
                last[t] = i
        for t in n.output:
            first.setdefault(t, i)
    for o in g.output:
        last[o.name] = len(nodes)
    size = {t: _elements(_shape(shapes, t)) for t in first}

    layers = []
    # Parameters: float weights of a float model, integer ones of a quantized model; scales and
    # zero points (scalars or per-channel vectors next to a weight) count too but are few.
    params_used = Counter()
    for i, n in enumerate(nodes):
        p = sum(int(consts[t].size) for t in n.input if t in consts and _is_param(consts[t]))
        for t in n.input:
            if t in consts:
                params_used[t] += 1
        live = sum(size[t] for t in first if first[t] <= i <= last.get(t, first[t]))
        layers.append(LayerInfo(n.name or f"#{i}", n.op_type, n.op_type in supported,
                                list(_shape(shapes, n.output[0])) if n.output else [], _macs(n, shapes, consts),
                                p, live))
    weight_like = [c for t, c in consts.items() if t in params_used and _is_param(c)]
    n_params = int(sum(c.size for c in weight_like))
    # int8 weights; bias-like vectors (1-D) become int32
    flash = int(sum(c.size * (4 if c.ndim == 1 else 1) for c in weight_like))
    peak = max([lay.live_bytes for lay in layers], default=0)
    result = Inspection(str(path), max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                                       default=0),
                        dict(Counter(n.op_type for n in nodes)), unsupported, n_params,
                        int(sum(lay.macs for lay in layers)), layers, peak, flash)
    for b in list_boards():
        need_flash = flash + CODE_BYTES_ESTIMATE
        fits = result.supported and need_flash <= b.flash_bytes and peak <= b.ram_bytes
        why = []
        if not result.supported:
            why.append("unsupported operators")
        if need_flash > b.flash_bytes:
            why.append(f"flash {need_flash:,} > {b.flash_bytes:,} B")
        if peak > b.ram_bytes:
            why.append(f"SRAM {peak:,} > {b.ram_bytes:,} B")
        result.boards[b.name] = {"fits": fits, "flash_bytes": b.flash_bytes, "ram_bytes": b.ram_bytes,
                                 "why_not": "; ".join(why)}
    return result


def print_inspection(ins: Inspection, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=max(130, Console().width))
    t = Table(title=f"{Path(ins.model).name}: {len(ins.layers)} nodes, opset {ins.opset}")
    for col in ("layer", "op", "", "out shape", "MACs", "params", "live int8 bytes"):
        t.add_column(col, justify="right" if col in ("MACs", "params", "live int8 bytes") else "left")
    for lay in ins.layers:
        t.add_row(lay.name, lay.op, "[green]✓[/]" if lay.supported else "[red]✗ unsupported[/]",
                  "x".join(map(str, lay.out_shape)), f"{lay.macs:,}", f"{lay.params:,}", f"{lay.live_bytes:,}")
    console.print(t)
    ops = ", ".join(f"{op}×{n}" + ("" if op not in {lay.op for lay in ins.layers if not lay.supported} else " ✗")
                    for op, n in sorted(ins.ops.items()))
    console.print(f"operators: {ops}", markup=False)
    if ins.unsupported:
        console.print(f"[red]unsupported: {', '.join(ins.unsupported)}[/]")
    console.print(f"parameters {ins.params:,}, MACs {ins.macs:,}, "
                  f"peak int8 activations {ins.peak_activation_bytes:,} B (layer by layer), "
                  f"flash for int8 weights ~{ins.flash_estimate_bytes:,} B + code")
    fit = [n for n, b in ins.boards.items() if b["fits"]]
    console.print(f"fits as is: {', '.join(fit) if fit else 'no board'}")
    for n, b in ins.boards.items():
        if not b["fits"]:
            console.print(f"  {n}: no ({b['why_not']})")
