"""ONNX -> IR (float graph, channels-last), with QDQ quantization kept as hints.

The walk is generic; what each ONNX op becomes is decided by the importer functions that
the operator modules register (``ops.base.ONNX_IMPORTERS``).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from hilc.compiler import onnx_patterns, qdq
from hilc.compiler.ir import Graph, Node, Tensor
from hilc.compiler.ops import ONNX_IMPORTERS, OPS
from hilc.errors import HilcError, UnsupportedModelError

MIN_OPSET, MAX_OPSET = 11, 21
NHWC = (0, 2, 3, 1)  # physical axis i holds logical (ONNX NCHW) axis NHWC[i]


def identity_layout(rank: int) -> tuple[int, ...]:
    return tuple(range(rank))


def load_onnx(path: str | Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.exists():
        raise HilcError(f"{path}: no such file")
    if path.is_dir():
        raise HilcError(f"{path}: is a directory, expected an .onnx file")
    data = path.read_bytes()
    if not data:
        raise HilcError(f"{path}: empty file, expected an ONNX model")
    try:
        model = onnx.ModelProto()
        model.ParseFromString(data)
    except Exception as e:  # protobuf raises DecodeError or RuntimeError variants
        raise HilcError(f"{path}: not a valid ONNX model (protobuf parse failed: {e})") from None
    if not model.graph.node and not model.graph.output:
        raise HilcError(f"{path}: not a valid ONNX model (no graph: truncated or not ONNX)")
    try:
        # Shape inference first: it fills in output shapes that exporters often leave out and
        # that the checker would otherwise reject, though onnxruntime runs such models.
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:
        pass  # the checker below says what is wrong
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HilcError(f"{path}: malformed ONNX model: {first}") from None
    return model


class ImportContext:
    """State of one import: ONNX names -> IR tensors, their layouts, constants and hints."""

    def __init__(self, model: onnx.ModelProto, name: str) -> None:
        self.model = model
        self.opset = opset_of(model)
        self.graph = Graph(name=name)
        self.consts: dict[str, np.ndarray] = {}
        self.values: dict[str, str] = {}  # ONNX value name -> IR tensor name
        self.layouts: dict[str, tuple[int, ...]] = {}  # IR tensor -> physical->logical perm
        self.onnx_shapes: dict[str, tuple[int, ...]] = {}
        self.quant_hints: dict[str, tuple[float, int]] = {}  # ONNX name -> (scale, zp)
        self.weight_scales: dict[str, np.ndarray] = {}  # ONNX initializer -> per-channel scales
        self._counts: dict[str, int] = {}
        self.node: Any = None  # the ONNX node being imported (for error messages)
        self.onnx_uses: Counter[str] = Counter()  # how many ONNX nodes / outputs read each value

    # --- lookups -----------------------------------------------------------------------
    def const(self, onnx_name: str) -> np.ndarray | None:
        return self.consts.get(onnx_name) if onnx_name else None

    def require_const(self, onnx_name: str, what: str) -> np.ndarray:
        v = self.const(onnx_name)
        if v is None:
            raise UnsupportedModelError(
                f"node '{self.node.name}' ({self.node.op_type}): {what} '{onnx_name}' must be a constant")
        return v

    def value(self, onnx_name: str) -> str:
        if onnx_name in self.values:
            return self.values[onnx_name]
        if onnx_name in self.consts:
            raise UnsupportedModelError(
                f"node '{self.node.name}' ({self.node.op_type}): input '{onnx_name}' is a constant "
                "where hilc expects an activation")
        raise HilcError(f"node '{self.node.name}' ({self.node.op_type}): input '{onnx_name}' is never produced")

    def layout(self, ir_name: str) -> tuple[int, ...]:
        return self.layouts[ir_name]

    def logical_shape(self, ir_name: str) -> tuple[int, ...]:
        phys = self.graph.tensors[ir_name].shape
        lay = self.layouts[ir_name]
        shape = [0] * len(phys)
        for i, ax in enumerate(lay):
            shape[ax] = phys[i]
        return tuple(shape)

    def attr(self, name: str, default: Any = None) -> Any:
        for a in self.node.attribute:
            if a.name == name:
                v = onnx.helper.get_attribute_value(a)
                return v.decode() if isinstance(v, bytes) else v
        return default

    def fail(self, why: str) -> HilcError:
        return UnsupportedModelError(f"node '{self.node.name}' ({self.node.op_type}): {why}")

    # --- building ------------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        k = self._counts.get(base, 0)
        self._counts[base] = k + 1
        return f"{base}_{k}"

    def emit(self, op: str, inputs: list[str], attrs: dict[str, Any] | None = None,
             params: dict[str, np.ndarray] | None = None, layout: tuple[int, ...] | None = None,
             onnx_out: str | None = None) -> str:
        """Append an IR node with one output; returns the output tensor's name."""
        name = self.fresh(op)
        node = Node(name, op, list(inputs), [name], dict(attrs or {}), {},
                    self.node.name if self.node is not None else "")
        for role, arr in (params or {}).items():
            node.params[role] = self.graph.add_constant(f"{name}.{role}", arr)
        in_shapes = [self.graph.tensors[i].shape for i in inputs]
        (shape,) = OPS[op].infer_shapes(node, in_shapes, self.graph)
        if any(d <= 0 for d in shape[1:]):
            raise self.fail(f"output shape {list(shape)} has an empty dimension")
        self.graph.tensors[name] = Tensor(name, tuple(int(d) for d in shape), onnx_name=onnx_out or "")
        self.layouts[name] = layout if layout is not None else (
            self.layouts[inputs[0]] if inputs else identity_layout(len(shape)))
        self.graph.nodes.append(node)
        if onnx_out is not None:
            self.bind(onnx_out, name)
        return name

    def bind(self, onnx_name: str, ir_name: str) -> None:
        self.values[onnx_name] = ir_name
        if onnx_name in self.quant_hints:
            self.graph.meta.setdefault("quant_hints", {})[ir_name] = list(self.quant_hints[onnx_name])

    def to_layout(self, ir_name: str, layout: tuple[int, ...]) -> str:
        """The tensor in the wanted physical layout, inserting a transpose if data must move."""
        cur = self.layouts[ir_name]
        if cur == layout:
            return ir_name
        # physical axis i of the result holds logical axis layout[i], found at cur.index(...)
        perm = [cur.index(ax) for ax in layout]
        shape = self.graph.tensors[ir_name].shape
        if _moves_only_unit_axes(shape, perm):
            new_shape = tuple(shape[p] for p in perm)
            return self.emit("reshape", [ir_name], {"shape": list(new_shape)}, layout=layout)
        return self.emit("transpose", [ir_name], {"perm": perm}, layout=layout)

    def to_logical(self, ir_name: str) -> str:
        return self.to_layout(ir_name, identity_layout(len(self.layouts[ir_name])))

    def phys_axis(self, ir_name: str, logical_axis: int) -> int:
        lay = self.layouts[ir_name]
        return lay.index(logical_axis % len(lay))


def _moves_only_unit_axes(shape: tuple[int, ...], perm: list[int]) -> bool:
    """True when the permutation keeps the order of all axes longer than 1 (data does not move)."""
    big = [p for p in perm if shape[p] != 1]
    return big == sorted(big)


def opset_of(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 0


def _sanitize(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_]", "_", name).strip("_") or "input"
    return s if not s[0].isdigit() else f"t_{s}"


def import_onnx(path: str | Path) -> Graph:
    """Load an ONNX file and import it into a float IR graph (QDQ scales kept as hints)."""
    model = load_onnx(path)
    return import_model(model, Path(path).stem)


def import_model(model: onnx.ModelProto, name: str = "model") -> Graph:
    opset = opset_of(model)
    if opset < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, 13)
        except Exception as e:
            raise UnsupportedModelError(
                f"opset {opset} is older than {MIN_OPSET} and could not be converted: {e}") from None
    elif opset > MAX_OPSET:
        raise UnsupportedModelError(f"opset {opset} is newer than the supported {MIN_OPSET}..{MAX_OPSET}")

    fused_nodes = onnx_patterns.fuse(model)  # decomposed GELU / LayerNorm as single nodes
    unsupported = [(n.name or f"#{i}", n.op_type) for i, n in enumerate(fused_nodes)
                   if n.op_type not in ONNX_IMPORTERS or n.domain not in ("", "ai.onnx")]
    if unsupported:
        listing = ", ".join(f"'{nm}' ({op})" for nm, op in unsupported)
        raise UnsupportedModelError(f"{len(unsupported)} unsupported node(s): {listing}")

    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0]
        raise HilcError(f"ONNX shape inference failed: {first}") from None

    ctx = ImportContext(model, name)
    for init in model.graph.initializer:
        try:
            arr = numpy_helper.to_array(init)
        except Exception as e:
            raise HilcError(f"initializer '{init.name}' is unreadable ({e})") from None
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise HilcError(f"initializer '{init.name}' holds NaN or Inf values")
        ctx.consts[init.name] = arr
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        ctx.onnx_shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)

    # nodes of the shape-inferred copy: importers may edit a node in place, never the caller's model
    nodes = qdq.preprocess(ctx, onnx_patterns.fuse(model))
    ctx.onnx_uses = Counter(i for n in nodes for i in n.input if i)
    ctx.onnx_uses.update(o.name for o in model.graph.output)

    real_inputs = [vi.name for vi in model.graph.input if vi.name not in ctx.consts]
    if len(real_inputs) > 1:  # the simulator, the C API and the board protocol all take one input tensor
        raise UnsupportedModelError(f"graph inputs {', '.join(repr(n) for n in real_inputs)}: hilc compiles models "
                                    "with one input tensor")
    for vi in model.graph.input:
        if vi.name in ctx.consts:
            continue
        _import_input(ctx, vi)

    for node in nodes:
        ctx.node = node
        if node.op_type == "Constant":
            _import_constant(ctx, node)
            continue
        if all((i == "" or i in ctx.consts) for i in node.input) and node.op_type not in ("Identity",):
            _fold_constant(ctx, node)
            continue
        try:
            ONNX_IMPORTERS[node.op_type](ctx, node)
        except HilcError:
            raise
        except (ValueError, IndexError, KeyError, TypeError) as e:
            # a malformed model (wrong-sized parameters, bad attributes) caught by numpy or a lookup
            raise HilcError(f"node '{node.name}' ({node.op_type}): invalid model: {e}") from None
    ctx.node = None

    for vo in model.graph.output:
        name = ctx.values.get(vo.name)
        if name is None:
            raise UnsupportedModelError(f"graph output '{vo.name}' is a constant or never produced")
        t = ctx.graph.tensors[name]
        if name in ctx.graph.outputs:  # the same tensor listed twice
            continue
        t.layout = ctx.layouts[name]
        t.onnx_name = vo.name
        ctx.graph.outputs.append(name)
    g = ctx.graph
    g.meta["opset"] = ctx.opset
    g.meta["producer"] = model.producer_name
    return g


def _import_input(ctx: ImportContext, vi: onnx.ValueInfoProto) -> None:
    tt = vi.type.tensor_type
    if tt.elem_type != onnx.TensorProto.FLOAT:
        raise UnsupportedModelError(
            f"graph input '{vi.name}' has element type {onnx.TensorProto.DataType.Name(tt.elem_type)}; "
            "hilc takes float32 model inputs")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
    if not dims:
        raise UnsupportedModelError(f"graph input '{vi.name}' has no shape")
    if any(d <= 0 for d in dims[1:]):
        raise UnsupportedModelError(
            f"graph input '{vi.name}' has shape {dims}: only the first (batch) axis may be dynamic")
    logical = (1, *dims[1:])
    layout = NHWC if len(logical) == 4 else identity_layout(len(logical))
    phys = tuple(logical[a] for a in layout)
    name = _sanitize(vi.name)
    ctx.graph.tensors[name] = Tensor(name, phys, layout=layout, onnx_name=vi.name)
    ctx.layouts[name] = layout
    ctx.graph.inputs.append(name)
    ctx.bind(vi.name, name)


def _import_constant(ctx: ImportContext, node: onnx.NodeProto) -> None:
    attr = node.attribute[0]
    v = onnx.helper.get_attribute_value(attr)
    if isinstance(v, onnx.TensorProto):
        arr = numpy_helper.to_array(v)
    else:
        arr = np.asarray(v)
    ctx.consts[node.output[0]] = arr


def _fold_constant(ctx: ImportContext, node: onnx.NodeProto) -> None:
    """Evaluate a node whose inputs are all constants (shape arithmetic, weight transposes)."""
    from onnx.reference import ReferenceEvaluator

    inputs = [i for i in node.input if i]
    g = onnx.helper.make_graph(
        [node], "fold",
        [onnx.helper.make_tensor_value_info(i, onnx.helper.np_dtype_to_tensor_dtype(ctx.consts[i].dtype),
                                            ctx.consts[i].shape) for i in inputs],
        [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o])
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", ctx.opset)])
    try:
        outs = ReferenceEvaluator(m).run(None, {i: ctx.consts[i] for i in inputs})
    except Exception as e:
        raise ctx.fail(f"could not evaluate constant expression: {e}") from None
    for name, arr in zip([o for o in node.output if o], outs, strict=True):
        ctx.consts[name] = np.asarray(arr)
