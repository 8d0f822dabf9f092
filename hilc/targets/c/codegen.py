"""MCU C code generation: integer graph + memory plan -> model.c / model.h (jinja2 templates beside
this file), with the runtime kernels copied next to them.

Each operator lowers itself (``Op.lower_c``) through a ``CEmitter``: the emitter owns the
declarations (const weight arrays in flash, const parameter structs) and knows where every
activation lives (the caller's input buffer, or an offset in the one static arena).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from hilc import __version__
from hilc.compiler.ir import Graph, Node
from hilc.compiler.memory import MemoryPlan, plan_memory, tensor_bytes
from hilc.compiler.ops import OPS
from hilc.errors import HilcError

RUNTIME_FILES = ("hilc_arith.h", "hilc_dsp.h", "hilc_kernels.h", "hilc_kernels.c")
C_TYPES = {np.dtype(np.int8): "int8_t", np.dtype(np.int32): "int32_t", np.dtype(np.int16): "int16_t",
           np.dtype(np.uint8): "uint8_t", np.dtype(np.int64): "int64_t"}


def runtime_dir() -> Path:
    return Path(str(resources.files("hilc") / "runtime_c"))


class CEmitter:
    """What an operator's lowering uses to name its data."""

    def __init__(self, graph: Graph, plan: MemoryPlan) -> None:
        self.graph = graph
        self.plan = plan
        self.decls: list[str] = []
        self.const_bytes = 0
        self.scratch_elems = 0  # int16 column buffer of the DSP kernels
        self.portable_col = False  # some conv/dense: the portable kernels take the column
        self._names: set[str] = set()

    def need_scratch(self, int16_elems: int) -> None:
        self.scratch_elems = max(self.scratch_elems, int(int16_elems))

    def ident(self, name: str) -> str:
        base = "".join(ch if ch.isalnum() else "_" for ch in name)
        ident, k = base, 1
        while ident in self._names:
            ident, k = f"{base}_{k}", k + 1
        self._names.add(ident)
        return ident

    def tensor(self, name: str) -> str:
        """A C expression for the buffer of activation ``name``."""
        if name in self.graph.inputs:
            return "input"
        return f"(arena + {self.plan.offsets[name]})"

    def size(self, name: str) -> int:
        return tensor_bytes(self.graph, name)

    def array(self, name: str, values: np.ndarray) -> str:
        """Declare a const array in flash; returns its identifier."""
        arr = np.ascontiguousarray(values)
        ctype = C_TYPES[arr.dtype]
        ident = self.ident(name)
        flat = arr.reshape(-1).tolist()
        rows = [", ".join(str(v) for v in flat[i:i + 24]) for i in range(0, len(flat), 24)]
        body = ",\n    ".join(rows)
        self.decls.append(f"static const {ctype} {ident}[{max(1, len(flat))}] = {{\n    {body}\n}};")
        self.const_bytes += arr.nbytes
        return ident

    def param(self, node: Node, role: str, dtype: type | None = None) -> str:
        arr = self.graph.param(node, role)
        return self.array(f"{node.name}_{role}", arr if dtype is None else arr.astype(dtype))

    def weights(self, node: Node) -> dict[str, Any]:
        """The struct fields of a conv/dense node's weights: int8 rows, or rows packed two (4-bit)
        or four (2-bit) to a byte for ``weight_bits`` 4 / 2 (``arith.pack_weights``); and the
        widths of its input and output in the arena (4: packed, tensor dtype ``int4``)."""
        from hilc.compiler import arith

        def width(t: str) -> int:
            tensor = self.graph.tensors.get(t)
            return 4 if tensor is not None and tensor.dtype == "int4" else 8

        acts = {"in_bits": width(node.inputs[0]), "out_bits": width(node.outputs[0])}
        # one flash array per node, also when a patch stage lowers the node once per patch
        cache = self.__dict__.setdefault("_weight_fields", {})
        if node.name not in cache:
            w = self.graph.param(node, "weight")
            bits = int(node.attrs.get("weight_bits", 8))
            k = int(np.prod(w.shape[1:], dtype=np.int64))
            if bits not in arith.PACKED_WEIGHT_BITS:  # 8 bits, or 5-7 in int8 containers
                cache[node.name] = {"weight": self.param(node, "weight"), "weight_bits": 8, "weight_stride": k}
            else:
                packed = arith.pack_weights(w, bits).view(np.int8)
                cache[node.name] = {"weight": self.array(f"{node.name}_weight_{bits}bit", packed),
                                    "weight_bits": bits, "weight_stride": arith.packed_row_bytes(k, bits)}
        fields = {**cache[node.name], **acts}
        self.portable_col = True  # portable int8 conv/dense take the column too (hilc_conv2d)
        return fields

    def struct(self, ctype: str, name: str, fields: dict[str, Any]) -> str:
        """Declare a const parameter struct; returns ``&ident``."""
        ident = self.ident(f"{name}_params")
        body = ", ".join(f".{k} = {_c_value(v)}" for k, v in fields.items())
        self.decls.append(f"static const {ctype} {ident} = {{{body}}};")
        return f"&{ident}"


def _c_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "{" + ", ".join(_c_value(x) for x in v) + "}"
    if isinstance(v, (bool, np.bool_)):
        return "1" if v else "0"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return str(v)


def dims4(shape: tuple[int, ...]) -> list[int]:
    """Non-batch axes padded with leading 1s to HILC_MAX_DIMS (4)."""
    d = [int(x) for x in shape[1:]]
    if len(d) > 4:
        raise HilcError(f"tensor of rank {len(shape)} exceeds what the C kernels take (batch + 4 axes)")
    return [1] * (4 - len(d)) + d


def broadcast_strides(shape: tuple[int, ...], out_shape: tuple[int, ...]) -> list[int]:
    """Element strides of a contiguous tensor read at the 4-D index space of ``out_shape``
    (0 along axes it is broadcast over)."""
    full = (1,) * (len(out_shape) - len(shape)) + tuple(shape)
    d, o = dims4(full), dims4(out_shape)
    strides, step = [0] * 4, 1
    for i in range(3, -1, -1):
        strides[i] = 0 if d[i] == 1 and o[i] != 1 else step
        step *= d[i]
    return strides


@dataclass
class CModel:
    files: dict[str, str]  # generated file name -> text
    plan: MemoryPlan
    const_bytes: int
    layers: list[str]
    scratch_bytes: int  # DSP builds only


def generate_c(graph: Graph, model_name: str = "model") -> CModel:
    """Lower a quantized graph to C sources (text only; nothing is written)."""
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise HilcError(f"the C target takes models with one input and one output "
                        f"(this one has {len(graph.inputs)} and {len(graph.outputs)})")
    if not graph.is_quantized:
        raise HilcError("the C target needs a quantized graph")
    patch = graph.meta.get("patch")
    if patch:  # patch-based schedule (hilc/compiler/patches.py, targets/c/patch_lower.py)
        from hilc.compiler.patches import plan_patch_memory

        plan = plan_patch_memory(graph)
    else:
        plan = plan_memory(graph)
    em = CEmitter(graph, plan)
    layers = []
    for i, node in enumerate(graph.nodes):
        op = OPS[node.op]
        if patch and i <= patch["split_index"]:  # the whole stage runs (and is profiled) as the split node
            from hilc.targets.c.patch_lower import lower_patch_stage

            call = lower_patch_stage(graph, em) if i == patch["split_index"] else "/* in the patch stage */"
            layers.append({"name": node.name, "op": node.op, "call": call})
            continue
        lower = getattr(op, "lower_c", None)
        if lower is None:
            raise HilcError(f"node '{node.onnx_name or node.name}' ({node.op}): no C lowering for this operator yet")
        layers.append({"name": node.name, "op": node.op, "call": lower(node, graph, em)})
    out = graph.outputs[0]
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
                             keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    ctx = {
        "version": __version__, "model": graph.name, "decls": em.decls, "layers": layers,
        "input_size": tensor_bytes(graph, graph.inputs[0]), "output_size": tensor_bytes(graph, out),
        "output_expr": em.tensor(out), "arena_size": max(plan.arena_bytes, 4),
        "input_quant": graph.tensors[graph.inputs[0]].quant, "output_quant": graph.tensors[out].quant,
        "scratch_elems": em.scratch_elems, "scratch_portable": em.portable_col, "model_hash": graph.content_hash(),
    }
    files = {"model.c": env.get_template("model.c.j2").render(ctx),
             "model.h": env.get_template("model.h.j2").render(ctx)}
    return CModel(files, plan, em.const_bytes, [layer["name"] for layer in layers], 2 * em.scratch_elems)


def write_c_project(out_dir: Path, cmodel: CModel) -> None:
    """OUT/src (generated model + the runtime it needs) and OUT/Makefile."""
    src = Path(out_dir) / "src"
    src.mkdir(parents=True, exist_ok=True)
    for name, text in cmodel.files.items():
        (src / name).write_text(text)
    rt = runtime_dir()
    for name in RUNTIME_FILES + ("host_main.c",):
        shutil.copyfile(rt / name, src / name)
    tpl = Path(__file__).parent / "templates" / "Makefile.j2"
    (Path(out_dir) / "Makefile").write_text(jinja2.Template(tpl.read_text(), keep_trailing_newline=True).render())
