"""Patch-based inference scheduling (MCUNetV2, Lin et al. 2021): the pass ``plan_patches``.

The first layers of a CNN hold by far the largest activations. Running them once per spatial
patch of an n x n grid keeps only one patch's intermediate tensors in SRAM at a time; the
patches' outputs assemble one whole tensor (the *split tensor*) and the rest of the network
runs layer by layer. Overlapping receptive fields (halos) make the patches recompute some
pixels: that is the MAC overhead the scheduler trades against SRAM.

The graph stays a plain layer-by-layer graph: the schedule is data in ``graph.meta["patch"]``,
which the simulator (``run_patch_stage``), the memory planner (``plan_patch_memory``) and the C
code generator (``hilc.targets.c.patch_lower``) all follow. Patching changes no arithmetic, so
patched outputs are bit-identical to layer-by-layer ones (the tests check it).

``graph.meta["patch"]`` (also copied into report.json under ``patch``)
------------------------------------------------------------------------
* ``split``: the split tensor; ``split_node``: its producer; ``split_index``: that node's index.
  The *patch stage* is ``graph.nodes[0 .. split_index]`` (named in ``stage``).
* ``grid``: ``[n, n]``; patches run row-major.
* ``patches``: one entry per patch with
  - ``tile``: ``[y0, y1, x0, x1]`` of the split tensor this patch produces (half-open rows, cols);
  - ``buffers``: tensor -> ``[y0, y1, x0, x1]``, the region of every stage tensor the patch
    computes (the union of what its consumers need; the graph input is read in place, so its
    buffer is the whole image);
  - ``layers``: per stage node ``{"node", "out": region, "in": [region per input], "pads":
    [top, left, bottom, right]}``: the output window, the input window each input must supply
    (clipped to the image) and the zero padding that applies at image borders for this patch.
* ``window_bytes``: tensor -> bytes of the buffer one patch needs (the largest over patches;
  these buffers are reused by every patch).
* ``macs`` / ``macs_layerwise`` / ``mac_overhead``: MACs of the patched and the layer-by-layer
  schedule and their ratio minus one.
* ``peak_sram_bytes`` / ``peak_sram_bytes_layerwise``: the full static plan (arena + input +
  output + the DSP kernels' scratch column), patched and layer by layer.
* ``peak_sram_bytes_layerwise_inplace_dw``: layer by layer with in-place depthwise (the patched
  plan uses it after the stage), to separate the two savings.
* ``mcunet_peak_bytes`` / ``mcunet_peak_bytes_layerwise``: peak activation memory counted as
  MCUNetV2 counts it: the largest (inputs + output) of one layer, a depthwise conv in place
  (the larger of its input and output); in the patch stage a layer's windows plus the whole
  split tensor, which stays allocated while the patches run. This is an analytical count (no
  scratch, no residual skip tensors held across a block); ``peak_sram_bytes`` is the real plan.
* ``budget_bytes``: the SRAM budget the scheduler had (None: it minimised the peak); with a
  budget, ``layerwise_over_budget_bytes`` (how far layer by layer misses it; negative: it fits)
  and ``headroom_bytes`` (budget minus the patched peak).
* ``planner_seconds``: time the scheduler took.

Supported in the patch stage: ``conv2d`` (any kernel, stride, dilation, padding, groups: so
depthwise/pointwise chains), ``maxpool``, ``add`` of two equal-shaped activations (residual
blocks), and the pixelwise ``clamp``, ``requant`` and ``lut``. The stage must be a prefix of
the node order that only the split tensor leaves.

In-place depthwise: after the stage, a depthwise conv whose output has its input's shape writes
over its input channel by channel through a one-channel plane (``hilc_dwconv_inplace_s8``,
portable C), which MCUNetV2 also uses. Operator order: the pipeline runs the whole graph in its
memory order first (``hilc.compiler.schedule``), and each packed candidate tries the memory order
of its layer-by-layer rest as well (``reorder``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from hilc.compiler.ir import Graph, Node, Tensor
from hilc.compiler.memory import _DTYPE_BYTES, MemoryPlan, plan_memory, tensor_bytes
from hilc.compiler.ops import OPS
from hilc.compiler.schedule import apply_order, search_order
from hilc.errors import HilcError

WINDOWED = {"conv2d", "maxpool"}
PIXELWISE = {"clamp", "requant", "lut"}
PATCHABLE = WINDOWED | PIXELWISE | {"add"}
MAX_GRID = 8

Region = tuple[int, int, int, int]  # y0, y1, x0, x1 (half-open)


# --- receptive fields ----------------------------------------------------------------------

def window_need(node: Node, out: Region, h: int, w: int) -> tuple[Region, list[int]]:
    """Input region (clipped to the h x w image) that output region ``out`` of a windowed node
    reads, and the padding [top, left, bottom, right] that falls outside the image."""
    (y0, y1), (pt, pb) = _need_1d(node, (out[0], out[1]), h, 0)
    (x0, x1), (pl, pr) = _need_1d(node, (out[2], out[3]), w, 1)
    return (y0, y1, x0, x1), [pt, pl, pb, pr]


def _patchable(node: Node, graph: Graph) -> bool:
    if node.op not in PATCHABLE or len(node.outputs) != 1:
        return False
    shapes = [graph.tensors[t].shape for t in node.inputs + node.outputs]
    if any(len(s) != 4 for s in shapes):
        return False
    if node.op == "add":
        return "const" not in node.params and len(node.inputs) == 2 and shapes[0] == shapes[1] == shapes[2]
    if node.op == "maxpool":
        return node.attrs["kernel"] != [shapes[0][1], shapes[0][2]] or shapes[0][1:3] == (1, 1)
    return len(node.inputs) == 1


def split_points(graph: Graph) -> list[int]:
    """Indices k such that nodes[0..k] can form a patch stage: every node patchable, and the only
    tensor that leaves the stage is the (4-D) output of node k."""
    if len(graph.inputs) != 1 or len(graph.tensors[graph.inputs[0]].shape) != 4:
        return []
    last: dict[str, float] = {}
    for i, n in enumerate(graph.nodes):
        for t in n.inputs:
            last[t] = i
    for t in graph.outputs:
        last[t] = float("inf")
    live = {graph.inputs[0]} if last.get(graph.inputs[0], -1) >= 0 else set()
    out: list[int] = []
    for k, node in enumerate(graph.nodes):
        if not _patchable(node, graph) or any(t not in live and t not in graph.inputs for t in node.inputs):
            break
        live |= {t for t in node.outputs if last.get(t, -1) > k}
        live = {t for t in live if last.get(t, -1) > k}
        if live == {node.outputs[0]} and node.op not in PIXELWISE and node.outputs[0] not in graph.outputs:
            out.append(k)
    return out


def _tiles(n: int, size: int) -> list[tuple[int, int]]:
    return [(i * size // n, (i + 1) * size // n) for i in range(n)]


def _need_1d(node: Node, out: tuple[int, int], size: int, axis: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Along one axis (0 rows, 1 cols): the input interval a windowed node's output interval
    reads, clipped to [0, size), and the padding before and after that falls outside."""
    a = node.attrs
    k, s, d = a["kernel"][axis], a["strides"][axis], a.get("dilations", [1, 1])[axis]
    p0 = a["pads"][axis]
    lo, hi = out[0] * s - p0, (out[1] - 1) * s - p0 + d * (k - 1) + 1
    return (max(0, lo), min(size, hi)), (max(0, -lo), max(0, hi - size))


def _axis_pass(graph: Graph, k: int, span: tuple[int, int], axis: int) -> tuple[list, dict[str, tuple[int, int]]]:
    """Receptive fields along one axis: windows are rectangles and their unions bounding boxes,
    so rows and columns are analysed apart (n + n passes for an n x n grid, not n * n)."""
    stage = graph.nodes[: k + 1]
    need: dict[str, tuple[int, int]] = {stage[-1].outputs[0]: span}
    layers: dict[str, tuple] = {}
    for node in reversed(stage):
        out = need.get(node.outputs[0])
        if out is None:
            raise HilcError(f"patch stage: output '{node.outputs[0]}' of node {node.name} is not used")
        if node.op in WINDOWED:
            region, pads = _need_1d(node, out, graph.tensors[node.inputs[0]].shape[1 + axis], axis)
            ins = [region]
        else:
            ins, pads = [out] * len(node.inputs), (0, 0)
        for t, r in zip(node.inputs, ins, strict=True):
            old = need.get(t)
            need[t] = r if old is None else (min(old[0], r[0]), max(old[1], r[1]))
        layers[node.name] = (out, ins, pads)
    # Pixelwise ops compute their whole input buffer: one flat call, and the buffer is there anyway.
    need[graph.inputs[0]] = (0, graph.tensors[graph.inputs[0]].shape[1 + axis])
    for node in stage:
        if node.op in PIXELWISE:
            r = need[node.inputs[0]]
            need[node.outputs[0]] = r
            layers[node.name] = (r, [r], (0, 0))
    return [layers[n.name] for n in stage], need


def analyse_patch(graph: Graph, k: int, tile: Region,
                  passes: dict[tuple[tuple[int, int], int], tuple[list, dict]] | None = None) -> dict[str, Any]:
    """Receptive-field analysis of one patch: the windows of every stage node (see the module doc).
    ``passes`` caches the per-axis passes across the patches of a grid."""
    passes = {} if passes is None else passes
    rk, ck = ((tile[0], tile[1]), 0), ((tile[2], tile[3]), 1)
    for key in (rk, ck):
        if key not in passes:
            passes[key] = _axis_pass(graph, k, *key)
    (rows, rbuf), (cols, cbuf) = passes[rk], passes[ck]
    layers = []
    for node, (ro, ri, rp), (co, ci, cp) in zip(graph.nodes[: k + 1], rows, cols, strict=True):
        layers.append({"node": node.name, "out": [ro[0], ro[1], co[0], co[1]],
                       "in": [[r[0], r[1], c[0], c[1]] for r, c in zip(ri, ci, strict=True)],
                       "pads": [rp[0], cp[0], rp[1], cp[1]]})
    return {"tile": list(tile), "buffers": {t: [*rbuf[t], *cbuf[t]] for t in rbuf}, "layers": layers}


def _region_bytes(graph: Graph, t: str, r: list[int] | Region) -> int:
    tensor = graph.tensors[t]
    item = _DTYPE_BYTES.get(tensor.dtype, 1)
    return (r[1] - r[0]) * (r[3] - r[2]) * tensor.shape[3] * item


# --- per-patch views of the stage ----------------------------------------------------------

def patch_view(graph: Graph, patch: dict[str, Any], c_pads: bool) -> Graph:
    """A graph of the stage nodes for one patch: tensors shaped as their windows and nodes with
    the patch's pads. With ``c_pads`` the pads are relative to each input's *buffer* (what the C
    kernels take: they may be negative where the buffer holds more than the window reads) and
    input tensors have their buffer shapes; otherwise (the simulator, which crops every input to
    its window first) they are the image-border pads and inputs have their window shapes."""
    stage = graph.nodes[: len(patch["layers"])]
    tensors = dict(graph.tensors)
    buffers = patch["buffers"]

    def shaped(t: str, r: list[int]) -> Tensor:
        old = graph.tensors[t]
        return Tensor(old.name, (old.shape[0], r[1] - r[0], r[3] - r[2], old.shape[3]), old.dtype, old.quant,
                      None, old.onnx_name)

    nodes = []
    for node, layer in zip(stage, patch["layers"], strict=True):
        attrs = dict(node.attrs)
        if node.op in WINDOWED:
            if c_pads:
                buf = buffers[node.inputs[0]]
                a = node.attrs
                out = layer["out"]
                pt = a["pads"][0] - out[0] * a["strides"][0] + buf[0]
                pl = a["pads"][1] - out[2] * a["strides"][1] + buf[2]
                attrs["pads"] = [pt, pl, layer["pads"][2], layer["pads"][3]]
            else:
                attrs["pads"] = list(layer["pads"])
            if "extra" in attrs:
                attrs["extra"] = [0, 0]
        nodes.append(Node(node.name, node.op, list(node.inputs), list(node.outputs), attrs, node.params,
                          node.onnx_name))
        tensors[node.outputs[0]] = shaped(node.outputs[0], layer["out"])
    view = Graph(graph.name, nodes, tensors, graph.constants, list(graph.inputs), list(graph.outputs), {})
    view.cache = graph.cache  # prepared weights are per node, shared by every patch
    return view


def run_patch_stage(graph: Graph, env: dict[str, np.ndarray]) -> int:
    """Run the patch stage in the simulator: fills ``env`` with the assembled split tensor and
    returns the index of the first node that runs layer by layer."""
    plan = graph.meta["patch"]
    k = plan["split_index"]
    split = plan["split"]
    x_name = graph.inputs[0]
    batch = env[x_name].shape[0]
    st = graph.tensors[split]
    out = np.empty((batch, *st.shape[1:]), np.int8)
    key = "patch:sim-views"
    if key not in graph.cache:
        graph.cache[key] = [patch_view(graph, p, c_pads=False) for p in plan["patches"]]
    hot = low_views = None
    if graph.meta.get("patch_precision"):  # per patch and sample: high or low-bit branch (patch_precision.py)
        from hilc.compiler.patch_precision import hot_flags, low_graph

        hot = hot_flags(graph, env[x_name])
        if "patch:sim-low-views" not in graph.cache:
            graph.cache["patch:sim-low-views"] = [patch_view(low_graph(graph), p, c_pads=False)
                                                  for p in plan["patches"]]
        low_views = graph.cache["patch:sim-low-views"]
    for i, (patch, view) in enumerate(zip(plan["patches"], graph.cache[key], strict=True)):
        t = patch["tile"]
        if hot is None:
            out[:, t[0]:t[1], t[2]:t[3]] = _run_patch(view, patch, env[x_name], x_name, split)
            continue
        for v, rows in ((view, hot[:, i]), (low_views[i], ~hot[:, i])):
            if rows.any():
                out[rows, t[0]:t[1], t[2]:t[3]] = _run_patch(v, patch, env[x_name][rows], x_name, split)
    env[split] = out
    if not any(x_name in n.inputs for n in graph.nodes[k + 1:]) and x_name not in graph.outputs:
        env.pop(x_name, None)
    return k + 1


def _run_patch(view: Graph, patch: dict[str, Any], x: np.ndarray, x_name: str, split: str) -> np.ndarray:
    bufs: dict[str, tuple[np.ndarray, list[int]]] = {x_name: (x, patch["buffers"][x_name])}
    for node, layer in zip(view.nodes, patch["layers"], strict=True):
        xs = []
        for t, r in zip(node.inputs, layer["in"], strict=True):
            arr, b = bufs[t]
            xs.append(arr[:, r[0] - b[0]:r[1] - b[0], r[2] - b[2]:r[3] - b[2]])
        (y,) = OPS[node.op].eval_int(node, view, xs)
        bufs[node.outputs[0]] = (y, layer["out"])
    return bufs[split][0]


# --- memory ----------------------------------------------------------------------------------

def window_name(t: str) -> str:
    return f"{t}@patch"


def plan_patch_memory(graph: Graph, plan: dict[str, Any] | None = None) -> MemoryPlan:
    """The static arena of the patched schedule: one patch's stage buffers (reused by every
    patch; offsets under ``window_name(t)``), the whole split tensor from the first step, then
    the layer-by-layer rest, where same-shape depthwise convs run in place. Stage buffers are
    never written in place (a window's output is smaller than its input)."""
    plan = plan or graph.meta["patch"]
    k = plan["split_index"]
    split = plan["split"]
    tensors = dict(graph.tensors)
    nodes = [Node("patch_alloc", "patch:alloc", [], [split])]
    x_name = graph.inputs[0]
    for node in graph.nodes[: k + 1]:
        ins = [t if t == x_name else window_name(t) for t in node.inputs]
        out = window_name(node.outputs[0])
        tensors[out] = Tensor(out, (1, plan["window_bytes"][node.outputs[0]]), "int8")
        nodes.append(Node(node.name, f"patch:{node.op}", ins, [out]))
    nodes.append(Node("patch_store", "patch:store", [window_name(split), split], []))
    nodes += graph.nodes[k + 1:]
    synth = Graph(graph.name, nodes, tensors, graph.constants, list(graph.inputs), list(graph.outputs), {})
    return plan_memory(synth, inplace_depthwise=True)


def firmware_ram_reserve(graph: Graph) -> int:
    """SRAM the board firmware needs besides the model's plan: the stack the linker reserves
    (targets/c/build.py: 4096), the protocol's rx/tx frames (2 x (HILC_MAX_PAYLOAD 1024 + 64)),
    one 64-bit tick counter per layer and 256 bytes of other statics."""
    return 4096 + 2 * (1024 + 64) + 8 * len(graph.nodes) + 256


def arena_tensor_bytes(graph: Graph, name: str) -> int:
    """Bytes of an arena entry, including a patch window (``T@patch``) or a plane (``T@plane``)."""
    if name.endswith("@patch"):
        return graph.meta["patch"]["window_bytes"][name[: -len("@patch")]]
    if name.endswith("@plane"):
        _, h, w, _ = graph.tensors[name[: -len("@plane")]].shape
        return h * w
    return tensor_bytes(graph, name)


def scratch_bytes(graph: Graph) -> int:
    """Bytes of the int16 im2col column the DSP kernels use (what the C emitter reserves)."""
    elems = 0
    for n in graph.nodes:
        if n.op == "conv2d":
            c = graph.tensors[n.inputs[0]].shape[3]
            elems = max(elems, n.attrs["kernel"][0] * n.attrs["kernel"][1] * (c // n.attrs["group"]))
        elif n.op == "dense":
            elems = max(elems, graph.param(n, "weight").shape[1])
    return 2 * elems


def _is_depthwise(node: Node, graph: Graph) -> bool:
    if node.op != "conv2d":
        return False
    c_in, c_out = graph.tensors[node.inputs[0]].shape[3], graph.tensors[node.outputs[0]].shape[3]
    return node.attrs["group"] == c_in == c_out


def _layer_bytes(node: Node, graph: Graph, ins: list[int], out: int) -> int:
    # MCUNetV2 runs depthwise convs in place: the layer holds the larger of input and output
    return max(ins[0], out) if _is_depthwise(node, graph) else sum(ins) + out


def mcunet_peak(graph: Graph, plan: dict[str, Any] | None = None) -> int:
    """Peak activation bytes as MCUNetV2 counts them: max over layers of inputs + output, with
    depthwise convs in place (max of input and output); in the patch stage the layer's windows
    (largest over patches) plus the whole split tensor, which stays allocated meanwhile."""
    peak = 0
    k = -1
    if plan is not None:
        k = plan["split_index"]
        split_bytes = tensor_bytes(graph, plan["split"])
        for i in range(k + 1):
            node_peak = 0
            for p in plan["patches"]:
                layer = p["layers"][i]
                node = graph.nodes[i]
                ins = [_region_bytes(graph, t, r) for t, r in zip(node.inputs, layer["in"], strict=True)]
                b = _layer_bytes(node, graph, ins, _region_bytes(graph, node.outputs[0], layer["out"]))
                node_peak = max(node_peak, b)
            peak = max(peak, node_peak + split_bytes)
    for node in graph.nodes[k + 1:]:
        ins = [tensor_bytes(graph, t) for t in node.inputs]
        peak = max(peak, _layer_bytes(node, graph, ins, sum(tensor_bytes(graph, t) for t in node.outputs)))
    return peak


# --- the scheduler -----------------------------------------------------------------------------

@dataclass
class Candidate:
    k: int
    n: int
    plan: dict[str, Any] | None  # None: built on Ray, not yet rebuilt here (_with_plan)
    macs: int
    lower_bound: int  # arena lower bound + I/O + scratch: no packing can go below it
    peak: int | None = None  # full plan (arena + I/O + scratch) once packed
    order: list[int] | None = None  # node order whose plan has ``peak`` (None: the graph's own)
    peak_given_order: int | None = None  # ``peak`` with the graph's own order of the layer-by-layer rest


def _layer_macs(graph: Graph) -> list[int]:
    return [OPS[n.op].macs(n, graph) for n in graph.nodes]


def build_candidate(graph: Graph, k: int, n: int, layer_macs: list[int] | None = None) -> Candidate:
    layer_macs = layer_macs or _layer_macs(graph)
    split = graph.nodes[k].outputs[0]
    _, h, w, _ = graph.tensors[split].shape
    passes: dict = {}
    patches = [analyse_patch(graph, k, (y0, y1, x0, x1), passes) for y0, y1 in _tiles(n, h) for x0, x1 in _tiles(n, w)]
    window: dict[str, int] = {}
    stage_macs = 0
    for p in patches:
        for i, (node, layer) in enumerate(zip(graph.nodes[: k + 1], p["layers"], strict=True)):
            t = node.outputs[0]
            window[t] = max(window.get(t, 0), _region_bytes(graph, t, layer["out"]))
            stage_macs += _window_macs(graph, node, layer, layer_macs[i])
    macs = stage_macs + sum(layer_macs[k + 1:])
    plan = {"split": split, "split_node": graph.nodes[k].name, "split_index": k, "grid": [n, n],
            "stage": [nd.name for nd in graph.nodes[: k + 1]], "patches": patches, "window_bytes": window}
    mem = _quick_bound(graph, plan)
    return Candidate(k, n, plan, macs, mem)


def _window_macs(graph: Graph, node: Node, layer: dict[str, Any], full: int) -> int:
    out = layer["out"]
    o = graph.tensors[node.outputs[0]].shape
    # every op's MACs scale with its output pixels (conv, pool, elementwise)
    return full * (out[1] - out[0]) * (out[3] - out[2]) // (o[1] * o[2])


def _quick_bound(graph: Graph, plan: dict[str, Any]) -> int:
    """Lower bound of the patched plan's peak without packing (live bytes at the worst step)."""
    k = plan["split_index"]
    split = plan["split"]
    x_name = graph.inputs[0]
    io = tensor_bytes(graph, x_name) + sum(tensor_bytes(graph, t) for t in graph.outputs)
    prod = {graph.nodes[i].outputs[0]: i for i in range(k + 1)}
    last = dict(prod)
    for i, node in enumerate(graph.nodes[: k + 1]):
        for t in node.inputs:
            if t != x_name:
                last[t] = i
    last[split] = k + 1
    live = np.zeros(k + 3, np.int64)
    for t, b in plan["window_bytes"].items():
        live[prod[t]] += b
        live[last[t] + 1] -= b
    peak = int(np.cumsum(live).max()) + tensor_bytes(graph, split)
    rest_peak = graph.cache.get("patch:rest-peaks")
    if rest_peak is None:
        rest_peak = graph.cache["patch:rest-peaks"] = _rest_peaks(graph)
    return max(peak, rest_peak[k]) + io + scratch_bytes(graph)


def _rest_peaks(graph: Graph) -> list[int]:
    """For each split index k, the live-bytes peak of the layer-by-layer part after k (with the
    memory planner's own in-place merges)."""
    from hilc.compiler.memory import _lifetimes, _merge_inplace

    lt = _lifetimes(graph)
    blocks, _ = _merge_inplace(graph, lt, {t: tensor_bytes(graph, t) for t in lt}, depthwise=True)
    n = len(graph.nodes)
    live = np.zeros(n + 2, np.int64)
    for bl in blocks:
        live[bl.start] += bl.size
        live[bl.end + 1] -= bl.size
    per_step = np.cumsum(live)[: n + 1]
    out = [0] * n
    run = int(per_step[n])
    for k in range(n - 1, -1, -1):
        out[k] = run  # max over the steps after k
        run = max(run, int(per_step[k]))
    return out


def parse_mode(mode: str) -> tuple[str, str | None, int | None]:
    """'auto' | 'off' | 'SPLIT:N' -> (kind, split, n)."""
    if mode in ("auto", "off"):
        return mode, None, None
    split, sep, n = mode.rpartition(":")
    if not sep or not split or not n.isdigit() or int(n) < 1:
        raise HilcError(f"--patch: expected auto, off or SPLIT:N (a node or tensor name and the grid size), "
                        f"got '{mode}'")
    return "manual", split, int(n)


def _resolve_split(graph: Graph, split: str, valid: list[int]) -> int:
    for i, node in enumerate(graph.nodes):
        names = {node.name, node.onnx_name, *node.outputs, *(graph.tensors[t].onnx_name for t in node.outputs)}
        if split in names or split == str(i):
            if i not in valid:
                ok = ", ".join(graph.nodes[j].name for j in valid[:12]) or "none"
                raise HilcError(f"--patch: cannot split after node {node.name} ({node.op}): the patch stage must be a "
                                f"prefix of conv/maxpool/add/pixelwise nodes that only this node's output leaves "
                                f"(valid split nodes: {ok})")
            return i
    raise HilcError(f"--patch: no node or tensor named '{split}'")


def plan_patches(graph: Graph, mode: str = "auto", budget: int | None = None, reorder: bool = True,
                 cluster: str | None = None) -> Graph:
    """The scheduling pass: returns a copy of the graph with ``meta["patch"]`` set (or unchanged
    for ``off``, and for ``auto`` when layer by layer already fits ``budget``).

    ``auto`` picks, among every valid split point and grid (2..8), the schedule whose full static
    plan fits ``budget`` with the fewest MACs (ties: the lower peak); without a budget it takes the
    lowest peak. If nothing fits, the error names the smallest peak hilc can reach.

    With ``reorder`` every packed candidate also tries the memory order of the layer-by-layer rest
    (``hilc.compiler.schedule``: which tensors wait beside the whole split tensor) and keeps the
    better; the returned graph runs in the chosen order (the stage stays the prefix).

    ``cluster`` (``hilc[ray]``): the candidates are built (one Ray task per split point) and
    packed (a task each, a batch of as many as the cluster has CPUs ahead of the scan) on Ray;
    the scan takes them in the same order, so the plan is the same.
    """
    kind, split, n = parse_mode(mode)
    if kind == "off":
        return graph
    t0 = time.perf_counter()
    layer_macs = _layer_macs(graph)
    macs_lw = sum(layer_macs)
    scratch = scratch_bytes(graph)
    lw_peak = plan_memory(graph).peak_sram_bytes + scratch
    valid = split_points(graph)
    if kind == "manual":
        k = _resolve_split(graph, split, valid)
        _, h, w, _ = graph.tensors[graph.nodes[k].outputs[0]].shape
        if n > min(h, w):
            raise HilcError(f"--patch: a {n}x{n} grid does not fit the {h}x{w} split tensor "
                            f"'{graph.nodes[k].outputs[0]}'")
        best = build_candidate(graph, k, n, layer_macs)
        best.peak = _full_peak(graph, best, scratch, reorder)
    else:
        if budget is not None and lw_peak <= budget:
            return graph
        if not valid:
            raise HilcError("--patch auto: the model has no layer prefix that can run patch by patch "
                            "(it must start with conv/maxpool/add/pixelwise layers on a 4-D input)")
        if cluster is None:
            cands = [build_candidate(graph, k, n, layer_macs) for k in valid for n in _grids(graph, k)]
        else:
            from hilc.distributed import patch_candidates

            cands = patch_candidates(graph, valid, layer_macs, cluster)
        best = None
        if budget is not None:
            fits = [c for c in sorted(cands, key=lambda c: (c.macs, c.lower_bound)) if c.lower_bound <= budget]
            for c in _packed(graph, fits, scratch, reorder, cluster, lambda c: False):
                if c.peak <= budget:
                    best = c
                    break
        if best is None:
            # the lowest reachable peak: pack the candidates in order of their bound until no
            # later bound can beat the best packed peak
            lowest: list[Candidate] = []  # the best packed so far (a list: the stop test reads it)
            for c in _packed(graph, sorted(cands, key=lambda c: (c.lower_bound, c.macs)), scratch, reorder, cluster,
                             lambda c: bool(lowest) and c.lower_bound >= lowest[0].peak):
                if not lowest or (c.peak, c.macs) < (lowest[0].peak, lowest[0].macs):
                    lowest[:] = [c]
            low = _with_plan(graph, lowest[0], layer_macs) if lowest else None
            assert low is not None
            if budget is not None:
                smallest = min(low.peak, lw_peak)
                raise HilcError(f"--patch auto: no schedule fits {budget} bytes of SRAM; the smallest peak hilc "
                                f"can reach is {smallest} bytes (layer by layer: {lw_peak}; "
                                f"split after {low.plan['split_node']} with {low.n}x{low.n} patches)")
            best = low
    best = _with_plan(graph, best, layer_macs)
    g = graph.copy() if best.order is None else apply_order(graph, best.order)
    p = best.plan
    p["stage"] = [nd.name for nd in g.nodes[: best.k + 1]]
    if reorder:
        p["peak_sram_bytes_import_order"] = _import_order_peak(graph, best, scratch)
        p["peak_sram_bytes_given_order"] = best.peak_given_order
    p.update(macs=best.macs, macs_layerwise=macs_lw, mac_overhead=round(best.macs / macs_lw - 1, 6),
             peak_sram_bytes=best.peak, peak_sram_bytes_layerwise=lw_peak,
             peak_sram_bytes_layerwise_inplace_dw=plan_memory(graph, inplace_depthwise=True).peak_sram_bytes + scratch,
             mcunet_peak_bytes=mcunet_peak(graph, p), mcunet_peak_bytes_layerwise=mcunet_peak(graph),
             budget_bytes=budget, planner_seconds=round(time.perf_counter() - t0, 3))
    if budget is not None:  # by how much layer by layer misses the budget and patches meet it
        p.update(layerwise_over_budget_bytes=lw_peak - budget, headroom_bytes=budget - best.peak)
    g.meta["patch"] = p
    return g


def _with_plan(graph: Graph, c: Candidate, layer_macs: list[int]) -> Candidate:
    """``c`` with its plan (candidates built on Ray come back without theirs: rebuilt here)."""
    if c.plan is None:
        c.plan = build_candidate(graph, c.k, c.n, layer_macs).plan
    return c


def _grids(graph: Graph, k: int) -> range:
    """The grid sizes the automatic search tries for a split after node ``k``."""
    _, h, w, _ = graph.tensors[graph.nodes[k].outputs[0]].shape
    return range(2, min(MAX_GRID, h, w) + 1)


def _packed(graph: Graph, cands: list[Candidate], scratch: int, reorder: bool, cluster: str | None,
            stop: Callable[[Candidate], bool]) -> Iterator[Candidate]:
    """The candidates in order, each with its full plan's peak set, until ``stop(c)`` (asked
    before ``c`` is packed). With a cluster a batch is packed ahead on Ray (more than the scan
    may need: the answer is the same, the spare packings are wasted work)."""
    if cluster is None:
        for c in cands:
            if stop(c):
                return
            c.peak = _full_peak(graph, c, scratch, reorder)
            yield c
        return
    from hilc.distributed import cluster_cpus, full_peaks, put

    batch = cluster_cpus(cluster)
    ref = None
    for i in range(0, len(cands), batch):
        chunk = cands[i:i + batch]
        if stop(chunk[0]):
            return
        ref = ref or put(graph, cluster)  # the graph to the object store once for every batch
        # sets each one's peak, order and peak_given_order
        full_peaks(ref, chunk, scratch, reorder, cluster, _layer_macs(graph))
        for c in chunk:
            if stop(c):
                return
            yield c


def _full_peak(graph: Graph, c: Candidate, scratch: int, reorder: bool = False) -> int:
    """The candidate's full plan; with ``reorder`` also with the memory order of the nodes after
    the split (``c.order`` keeps that order when it packs strictly better)."""
    base = plan_patch_memory(graph, c.plan)
    c.peak_given_order = base.peak_sram_bytes + scratch
    if not reorder or c.k + 1 >= len(graph.nodes):
        return c.peak_given_order
    found = search_order(graph, start=c.k + 1)
    if found.order == list(range(len(graph.nodes))):
        return c.peak_given_order
    plan = plan_patch_memory(apply_order(graph, found.order), c.plan)
    if (plan.lower_bound, plan.arena_bytes) < (base.lower_bound, base.arena_bytes):
        c.order = found.order
        return plan.peak_sram_bytes + scratch
    return c.peak_given_order


def _import_order_peak(graph: Graph, c: Candidate, scratch: int) -> int:
    """The chosen schedule's peak had the nodes after the split run in the ONNX file's order."""
    names = graph.meta.get("schedule", {}).get("import_order")
    if not names:
        return c.peak_given_order if c.peak_given_order is not None else c.peak
    rank = {n: i for i, n in enumerate(names)}
    k = c.k
    rest = sorted(range(k + 1, len(graph.nodes)), key=lambda i: rank.get(graph.nodes[i].name, i))
    order = list(range(k + 1)) + rest
    g = graph if order == list(range(len(graph.nodes))) else apply_order(graph, order)
    return plan_patch_memory(g, c.plan).peak_sram_bytes + scratch


def report_fields(graph: Graph) -> dict[str, Any]:
    """What report.json gains for a patched graph (a summary; the windows are in ``patch``)."""
    p = graph.meta.get("patch")
    if not p:
        return {}
    patches = [{"tile": q["tile"], "windows": {layer["node"]: {"out": layer["out"], "in": layer["in"],
                                                               "pads": layer["pads"]} for layer in q["layers"]}}
               for q in p["patches"]]
    summary = {k: v for k, v in p.items() if k != "patches"}
    summary["patches"] = patches
    return {"macs": p["macs"], "macs_layerwise": p["macs_layerwise"],
            "peak_sram_bytes_layerwise": p["peak_sram_bytes_layerwise"], "patch": summary}
