"""C lowering of the patch stage (hilc/compiler/patches.py): one loop over the patches that calls
the ordinary kernels on window buffers.

Every stage node keeps its own lowering (``Op.lower_c``), called once per patch on that patch's
view of the graph (window shapes, pads relative to the input buffer: they are negative where a
buffer holds more rows or columns than the window reads, and only image borders pad with zeros).
The per-patch parameter structs become one const array per node, indexed by the patch. Buffers
sit at fixed arena offsets (sized for the largest patch) and are reused by every patch; the
graph input is read in place from the caller's buffer. The split node's window is then copied
row by row into its tile of the whole split tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hilc.compiler.ir import Graph, Node
from hilc.compiler.memory import tensor_bytes
from hilc.compiler.ops import OPS
from hilc.compiler.patches import patch_view, window_name
from hilc.errors import HilcError

_STRUCT = "@@PATCH_STRUCT@@"
_SIZE = "@@PATCH_SIZE@@"


class _PatchEmitter:
    """Stands in for the CEmitter while a stage node is lowered for one patch."""

    def __init__(self, em: Any, graph: Graph) -> None:
        self.em, self.graph = em, graph
        self.view: Graph | None = None
        self.struct_fields: tuple[str, dict[str, Any]] | None = None
        self.sizes: list[int] = []
        self._params: dict[tuple[str, str], str] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.em, name)

    def tensor(self, name: str) -> str:
        if name in self.graph.inputs:
            return "input"
        return f"(arena + {self.em.plan.offsets[window_name(name)]})"

    def size(self, name: str) -> str:
        self.sizes.append(tensor_bytes(self.view, name))
        return _SIZE

    def param(self, node: Node, role: str, dtype: type | None = None) -> str:
        key = (node.params.get(role, node.name), role, dtype)  # one array per constant
        if key not in self._params:
            self._params[key] = self.em.param(node, role, dtype)
        return self._params[key]

    def struct(self, ctype: str, name: str, fields: dict[str, Any]) -> str:
        self.struct_fields = (ctype, fields)
        return _STRUCT


def lower_patch_stage(graph: Graph, em: Any) -> str:
    """The C statements that run the whole patch stage and assemble the split tensor."""

    plan = graph.meta["patch"]
    patches = plan["patches"]
    n_p = len(patches)
    k = plan["split_index"]
    pem = _PatchEmitter(em, graph)
    body = _stage_calls(graph, em, pem, patches, k)
    pp = graph.meta.get("patch_precision")
    if pp:  # QuantMCU patch-branch precision (hilc/compiler/patch_precision.py)
        body = _branches(graph, em, pem, patches, k, pp, body)
    # the split node's window -> its tile of the split tensor
    split = plan["split"]
    _, _, w, c = graph.tensors[split].shape
    tiles = [p["tile"] for p in patches]
    off = em.array("patch_store_offset", np.asarray([(t[0] * w + t[2]) * c for t in tiles], np.int32))
    rows = em.array("patch_store_rows", np.asarray([t[1] - t[0] for t in tiles], np.int32))
    length = em.array("patch_store_len", np.asarray([(t[3] - t[2]) * c for t in tiles], np.int32))
    src = pem.tensor(split)
    body.append(f"for (int32_t r = 0; r < {rows}[p]; r++) "
                f"hilc_copy_s8({length}[p], {src} + r * {length}[p], {em.tensor(split)} + {off}[p] + r * {w * c});")
    inner = "\n        ".join(body)
    return f"for (int32_t p = 0; p < {n_p}; p++) {{  /* patch stage: {plan['grid'][0]}x{plan['grid'][1]} patches */\n" \
           f"        {inner}\n    }}"


def _branches(graph: Graph, em: Any, pem: _PatchEmitter, patches: list[dict], k: int, pp: dict[str, Any],
              high: list[str]) -> list[str]:
    """Both branches of the stage behind the outlier test: ``max |x - zp| > threshold`` over the
    patch's input window, integer compares only (the simulator's ``hot_flags``)."""
    from hilc.compiler.patch_precision import low_graph

    low = low_graph(graph)
    # the low branch shares weight arrays with the high one where its integers are the same
    fields = em.__dict__.setdefault("_weight_fields", {})
    for hi, lo in zip(graph.nodes[: k + 1], low.nodes[: k + 1], strict=True):
        if hi.name in fields and hi.params.get("weight") == lo.params.get("weight"):
            fields[lo.name] = fields[hi.name]
    body_low = _stage_calls(low, em, pem, patches, k)
    _, _, w, c = graph.tensors[graph.inputs[0]].shape
    win = np.asarray(pp["windows"], np.int32)
    y0 = em.array("patch_win_y0", win[:, 0])
    y1 = em.array("patch_win_y1", win[:, 1])
    x0 = em.array("patch_win_x0", win[:, 2])
    n = em.array("patch_win_len", (win[:, 3] - win[:, 2]) * c)
    zp, thr = int(pp["input_zero_point"]), int(pp["threshold"])
    nl = "\n        "
    test = nl.join([
        "int32_t hot = 0;  /* does this patch's input window hold an outlier? */",
        f"for (int32_t y = {y0}[p]; y < {y1}[p] && !hot; y++) {{",
        f"    const int8_t *row = input + (y * {w} + {x0}[p]) * {c};",
        f"    for (int32_t i = 0; i < {n}[p]; i++) {{",
        f"        int32_t d = (int32_t)row[i] - ({zp});",
        f"        if (d > {thr} || -d > {thr}) {{ hot = 1; break; }}",
        "    }",
        "}"])
    hi_s = (nl + "    ").join(high)
    lo_s = (nl + "    ").join(body_low)
    return [test, f"if (hot) {{  /* layer-wise widths */{nl}    {hi_s}{nl}}} else {{  /* low-bit branch */"
                  f"{nl}    {lo_s}{nl}}}"]


def _stage_calls(graph: Graph, em: Any, pem: _PatchEmitter, patches: list[dict], k: int) -> list[str]:
    """One call per stage node of ``graph``, with per-patch parameters indexed by ``p``."""
    from hilc.targets.c.codegen import _c_value

    n_p = len(patches)
    views = [patch_view(graph, p, c_pads=True) for p in patches]
    body: list[str] = []
    for i, node in enumerate(graph.nodes[: k + 1]):
        if node.op == "add":
            body.append(_lower_add(graph, em, pem, node, i, patches))
            continue
        lower = getattr(OPS[node.op], "lower_c", None)
        if lower is None:
            raise HilcError(f"node '{node.onnx_name or node.name}' ({node.op}): no C lowering for this operator yet")
        calls, structs, sizes = set(), [], []
        for view in views:
            pem.view, pem.struct_fields, pem.sizes = view, None, []
            calls.add(lower(view.nodes[i], view, pem))
            structs.append(pem.struct_fields)
            sizes.append(pem.sizes)
        if len(calls) != 1:
            raise AssertionError(f"patch stage: node {node.name} lowers differently per patch")
        call = calls.pop()
        if _STRUCT in call:
            ctype = structs[0][0]
            ident = em.ident(f"{node.name}_patch_params")
            rows = ",\n    ".join("{" + ", ".join(f".{f} = {_c_value(v)}" for f, v in s[1].items()) + "}"
                                   for s in structs)
            em.decls.append(f"static const {ctype} {ident}[{n_p}] = {{\n    {rows}\n}};")
            call = call.replace(_STRUCT, f"&{ident}[p]")
        if _SIZE in call:
            ident = em.array(f"{node.name}_patch_size", np.asarray([s[0] for s in sizes], np.int32))
            call = call.replace(_SIZE, f"{ident}[p]")
        body.append(call)
    return body


def _lower_add(graph: Graph, em: Any, pem: _PatchEmitter, node: Node, i: int, patches: list[dict]) -> str:
    """Residual add: each input is read from its own (possibly larger) buffer through strides."""
    from hilc.targets.c.codegen import _c_value

    a = node.attrs
    s0, s1 = a.get("signs", [1, 1])
    c = graph.tensors[node.outputs[0]].shape[3]
    structs, offsets = [], []
    for p in patches:
        o = p["layers"][i]["out"]
        fields: dict[str, Any] = {"dims": [1, o[1] - o[0], o[3] - o[2], c]}
        for t, key in zip(node.inputs, ("a", "b"), strict=True):
            b = p["buffers"][t]
            bw = b[3] - b[2]
            fields[f"{key}_strides"] = [0, bw * c, c, 1]
            offsets.append(((o[0] - b[0]) * bw + (o[2] - b[2])) * c)
        fields.update(zp_a=a["zp_in"][0], zp_b=a["zp_in"][1], zp_out=a["zp_out"], lo=a["lo"], hi=a["hi"],
                      mult_a=a["mults"][0], mult_b=a["mults"][1], sign_a=s0, sign_b=s1, mult=0, shift=a["shift"])
        structs.append(fields)
    ident = em.ident(f"{node.name}_patch_params")
    rows = ",\n    ".join("{" + ", ".join(f".{f} = {_c_value(v)}" for f, v in s.items()) + "}" for s in structs)
    em.decls.append(f"static const hilc_binary_params {ident}[{len(patches)}] = {{\n    {rows}\n}};")
    off = em.array(f"{node.name}_patch_offsets", np.asarray(offsets, np.int32))
    x, y = pem.tensor(node.inputs[0]), pem.tensor(node.inputs[1])
    return f"hilc_add_s8(&{ident}[p], {x} + {off}[2 * p], {y} + {off}[2 * p + 1], {pem.tensor(node.outputs[0])});"
