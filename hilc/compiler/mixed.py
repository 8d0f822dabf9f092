"""Mixed precision: bit-width choices, measured sensitivity and the HAWQ-V3 integer linear program.

The search space (``analyse``): each conv/dense layer picks a weight width from
``WEIGHT_BITS``; each activation tensor that feeds a conv/dense layer (its *root*: the tensor
after walking back through ops that only move values, such as Reshape or MaxPool) picks a width
from ``ACT_BITS``. Activations stay in int8 containers in the arena; their values are clamped to
the chosen width, so every kernel and the dyadic requantization between any pair of widths are
the int8 ones (``QParams.bits`` sets the clamp bounds and the zero point's range). A root is
eligible for 4 bits only when no consumer indexes a table by its code (lookup tables, softmax)
and it is not a graph input or output.

Sensitivity (``measure_sensitivity``): per layer and candidate width, the mean squared change
of the model's output on calibration data when only that layer (or only that activation) is
lowered, relative to the all-int8 graph. HAWQ-V3 treats these perturbations as additive; the
ILP (``allocate``) minimises their sum under budgets on BitOps, weight bytes, peak SRAM and
predicted latency, with ``scipy.optimize.milp``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hilc.compiler import ptq
from hilc.compiler.ir import Graph
from hilc.compiler.memory import align_up
from hilc.compiler.ops import OPS
from hilc.compiler.ops.base import bitops
from hilc.errors import HilcError

WEIGHT_BITS = (8, 4, 2)
ACT_BITS = (8, 4)
# Widths between 4 and 8 are stored in int8 containers (no packing, no speed-up on an MCU); they
# count in BitOps only. Offered as an option (``analyse(..., extended=True)``), not by default.
EXTENDED_WEIGHT_BITS = (8, 7, 6, 5, 4, 2)
EXTENDED_ACT_BITS = (8, 7, 6, 5, 4)
LINEAR_OPS = ptq.LINEAR_OPS  # the layers with weights: one definition (hilc.compiler.ptq)
# Ops that take a sub-byte activation like an int8 one (no table indexed by the code).
SUBBYTE_SAFE_CONSUMERS = {"conv2d", "dense", "add", "maxpool", "avgpool", "reshape", "transpose", "clamp",
                          "requant", "concat", "pad"}


@dataclass
class Layer:
    name: str
    op: str
    kind: str  # conv, depthwise, pointwise, dense: the cost model's op kinds
    macs: int
    n_weights: int
    k: int  # reduction length of one output (weights per output channel)
    out_channels: int
    outputs: int  # output elements (one requantization each)
    root: str | None  # activation choice this layer's input follows (None: fixed at its width)
    col: int = 0  # im2col elements gathered (the DSP kernels' per-input work)
    in_packable: bool = False  # the input packs two to a byte at 4 bits
    out_root: str | None = None  # the output, when it is a packable activation choice


@dataclass
class SramModel:
    """Peak SRAM as linear pieces: at each schedule step, the bytes of the live arena blocks of
    fixed size plus, for activations that pack two to a byte at 4 bits, their size at each width;
    plus I/O buffers and the DSP kernels' im2col scratch. The peak is the arena's lower bound
    (the planner reaches it or comes within 5 %) plus ``fixed``."""

    steps: list[tuple[int, dict[str, int]]]  # (fixed bytes, {root: int8 bytes of its packable block})
    fixed: int


@dataclass
class Space:
    layers: list[Layer]
    roots: list[str]  # activations eligible for sub-byte widths
    # weightless ops with MACs (pooling): (root or None, macs), counted at in_bits^2 BitOps
    other_bitops: list[tuple[str | None, int]] = field(default_factory=list)
    fixed_bitops: int = 0  # ops whose input width no choice changes
    wbits: tuple[int, ...] = WEIGHT_BITS  # candidate widths
    abits: tuple[int, ...] = ACT_BITS
    sram: SramModel | None = None  # set by sram_model (needs a quantized graph)

    def layer(self, name: str) -> Layer:
        return next(la for la in self.layers if la.name == name)


def _kind(node, graph: Graph) -> str:
    if node.op == "dense":
        return "dense"
    a = node.attrs
    cin = graph.tensors[node.inputs[0]].shape[3]
    if a["group"] > 1 and a["group"] == cin:
        return "depthwise"
    if list(a["kernel"]) == [1, 1]:
        return "pointwise"
    return "conv"


def act_root(graph: Graph, tensor: str) -> str:
    """The tensor whose quantization ``tensor`` inherits (through ops that keep their input's)."""
    while True:
        prod = graph.producer(tensor)
        if prod is None or OPS[prod.op].output_rule(prod) != "input":
            return tensor
        tensor = prod.inputs[0]


def _followers(graph: Graph, root: str) -> list[str]:
    """``root`` and every tensor that inherits its quantization."""
    out, todo = [], [root]
    while todo:
        t = todo.pop()
        out.append(t)
        for c in graph.consumers(t):
            if OPS[c.op].output_rule(c) == "input" and c.inputs[0] == t:
                todo.extend(c.outputs)
    return out


def subbyte_eligible(graph: Graph, root: str) -> bool:
    prod = graph.producer(root)
    if prod is None or root in graph.inputs or OPS[prod.op].output_rule(prod) != "calibrated":
        return False
    for t in _followers(graph, root):
        if t in graph.outputs:
            return False
        if any(c.op not in SUBBYTE_SAFE_CONSUMERS for c in graph.consumers(t)):
            return False
    return True


def analyse(graph: Graph, extended: bool = False) -> Space:
    """The bit-width search space of a (float or quantized) graph (``extended``: also the
    int8-container widths 7, 6, 5)."""
    layers, roots = [], []
    other: list[tuple[str | None, int]] = []
    fixed = 0
    for node in graph.nodes:
        op = OPS[node.op]
        macs = op.macs(node, graph)
        root = act_root(graph, node.inputs[0]) if node.inputs else None
        eligible = root is not None and (node.op in LINEAR_OPS or macs > 0) and subbyte_eligible(graph, root)
        if eligible and root not in roots:
            roots.append(root)
        if node.op in LINEAR_OPS:
            w = graph.param(node, "weight")
            out = graph.tensors[node.outputs[0]]
            groups = node.attrs.get("group", 1)
            layers.append(Layer(node.name, node.op, _kind(node, graph), macs, int(w.size),
                                int(np.prod(w.shape[1:])), int(w.shape[0]), out.size,
                                root if eligible else None, macs * groups // int(w.shape[0]),
                                eligible and packable(graph, root),
                                node.outputs[0] if packable(graph, node.outputs[0]) else None))
        elif macs:
            if eligible:
                other.append((root, macs))
            else:
                fixed += bitops(macs, 8)
    if extended:
        return Space(layers, roots, other, fixed, EXTENDED_WEIGHT_BITS, EXTENDED_ACT_BITS)
    return Space(layers, roots, other, fixed)


def _mse_clip(v: np.ndarray, lo: float, hi: float, bits: int) -> tuple[float, float]:
    """The shrinking of ``[lo, hi]`` (down to 0.1 of it) with the least quantization MSE at ``bits`` bits."""
    from hilc.compiler.calibrate import _mse_range

    lo, hi = _mse_range(v, lo, hi, bits, np.linspace(0.1, 1.0, 46))
    return float(lo), float(hi)


def prepare_subbyte(graph: Graph, samples: np.ndarray, max_samples: int = 128, keep: int = 1 << 16,
                    cluster: str | None = None) -> Graph:
    """Statistics sub-byte widths need, from one float run on calibration data, kept in ``meta``:

    * ``subbyte_ranges``: for each eligible activation, the MSE-optimal clipped range at each
      sub-byte width (with 16 levels, clipping the rare large values beats spreading the grid
      over them; the quantizer uses it when the tensor is given that width);
    * ``input_means``: the mean of each conv/dense input per channel, for the bias correction
      of sub-byte weights (``assign_bitwidths``).

    ``cluster`` (``hilc[ray]``): the clipped ranges are searched on Ray, a task per activation.
    """
    from hilc.sim.simulator import run_float, to_physical

    g = graph.copy()
    space = analyse(g, extended=True)
    followers = {t: r for r in space.roots for t in _followers(g, r)}
    lin_inputs = {n.inputs[0] for n in g.nodes if n.op in LINEAR_OPS}
    vals: dict[str, np.ndarray] = {}
    means: dict[str, list[float]] = {}
    rng = np.random.default_rng(0)

    def observe(name: str, v: np.ndarray) -> None:
        if name in space.roots:
            flat = v.reshape(-1)
            vals[name] = flat[rng.integers(0, flat.size, keep)] if flat.size > keep else flat
        if name in lin_inputs:
            means[name] = v.reshape(-1, v.shape[-1]).astype(np.float64).mean(axis=0).tolist()

    x = to_physical(g, g.inputs[0], np.asarray(samples, np.float32)[:max_samples])
    run_float(g, {g.inputs[0]: x}, observe=observe)
    ranges = g.meta.get("calibration", {})
    sub: dict[str, dict[str, list[float]]] = {}
    if cluster is not None:  # the same searches, each activation's on Ray; followers share their root's
        from hilc.distributed import clip_ranges

        roots = [r for r in space.roots if r in vals and r in ranges]
        clips = clip_ranges([(vals[r], *ranges[r]) for r in roots], [b for b in space.abits if b < 8], cluster)
        found = dict(zip(roots, clips, strict=True))
    for t, r in followers.items():
        if r in vals and r in ranges:
            sub[t] = {b: list(v) for b, v in found[r].items()} if cluster is not None else \
                {str(b): list(_mse_clip(vals[r].astype(np.float64), *ranges[r], b)) for b in space.abits if b < 8}
    g.meta["subbyte_ranges"] = sub
    g.meta["input_means"] = means
    return g


def with_prepared(graph: Graph, prepared: dict[str, Any]) -> Graph:
    g = graph.copy()
    g.meta.update(prepared)
    return g


def _bias_correction(graph: Graph, node, bits: int) -> None:
    """Shift the float bias by the mean error sub-byte rounding adds to each output,
    ``-(W_q - W) . E[x]`` (bias correction, Nagel et al. 2019), so the quantizer's integer bias
    absorbs it. ``W_q`` is what ``quantize_linear_layer`` will pick for these weights."""
    from hilc.compiler.arith import quantize_weights_subbyte

    mean = graph.meta.get("input_means", {}).get(node.inputs[0])
    if mean is None or "w_scale" in node.attrs:
        return
    w = graph.param(node, "weight").astype(np.float64)
    q, s = quantize_weights_subbyte(w, bits)
    dw = (q * s.reshape((-1,) + (1,) * (w.ndim - 1)) - w).reshape(w.shape[0], -1, w.shape[-1])  # [O, taps, cg]
    m = np.asarray(mean, np.float64)
    if node.op == "conv2d":
        groups = node.attrs["group"]
        og, cg = w.shape[0] // groups, w.shape[-1]
        m_out = m.reshape(groups, cg)[np.arange(w.shape[0]) // og]  # [O, cg]: each output's input channels
        corr = (dw.sum(axis=1) * m_out).sum(axis=1)
    else:
        corr = dw.reshape(w.shape[0], -1) @ m
    bias = graph.param(node, "bias").astype(np.float64) - corr
    node.params["bias"] = graph.add_constant(f"{node.name}.bias_corrected", bias.astype(np.float32))


def packable(graph: Graph, tensor: str) -> bool:
    """Whether ``tensor`` is stored two to a byte at 4 bits (``pack_subbyte_activations``)."""
    if tensor in graph.inputs or tensor in graph.outputs:
        return False
    prod, cons = graph.producer(tensor), graph.consumers(tensor)
    return (prod is not None and prod.op in LINEAR_OPS and bool(cons) and all(c.op in LINEAR_OPS for c in cons)
            and subbyte_eligible(graph, tensor))


def assign_bitwidths(graph: Graph, weight_bits: dict[str, int] | None = None,
                     act_bits: dict[str, int] | None = None) -> Graph:
    """A float graph with ``node.attrs['weight_bits']`` and ``meta['act_bits']`` set, read by the
    quantizer (``quantize_linear_layer`` and the activation ranges). Unnamed layers stay 8-bit."""
    g = graph.copy()
    space = analyse(g)
    names = {la.name for la in space.layers}
    for name, bits in (weight_bits or {}).items():
        if name not in names:
            raise HilcError(f"weight_bits: '{name}' is not a conv/dense layer")
        if bits not in EXTENDED_WEIGHT_BITS:
            raise HilcError(f"weight_bits: {name} at {bits} bits (supported: "
                            f"{', '.join(map(str, EXTENDED_WEIGHT_BITS))})")
    for name, bits in (act_bits or {}).items():
        if bits not in EXTENDED_ACT_BITS:
            raise HilcError(f"act_bits: {name} at {bits} bits (supported: {', '.join(map(str, EXTENDED_ACT_BITS))})")
        if bits != 8 and name not in space.roots:
            raise HilcError(f"act_bits: tensor '{name}' cannot take {bits}-bit values (graph input/output, "
                            "or a consumer indexes a table by its code)")
    for node in g.nodes:
        if node.op in LINEAR_OPS:
            node.attrs["weight_bits"] = int((weight_bits or {}).get(node.name, node.attrs.get("weight_bits", 8)))
            if node.attrs["weight_bits"] < 8:
                _bias_correction(g, node, node.attrs["weight_bits"])
    acts = {}
    for root, bits in (act_bits or {}).items():
        if bits != 8:
            for t in _followers(g, root):
                acts[t] = int(bits)
    g.meta["act_bits"] = acts
    return g


def pack_subbyte_activations(graph: Graph) -> Graph:
    """Store 4-bit activations two to a byte in the arena (tensor dtype ``int4``) where the C
    kernels on both sides take packed data: produced by a conv/dense layer, read only by
    conv/dense layers, not a graph input or output. Others stay in int8 containers."""
    g = graph.copy()
    for name, t in g.tensors.items():
        if t.quant is None or t.quant.bits != 4 or name in g.inputs or name in g.outputs:
            continue
        prod = g.producer(name)
        cons = g.consumers(name)
        if prod is not None and prod.op in LINEAR_OPS and cons and all(c.op in LINEAR_OPS for c in cons):
            t.dtype = "int4"
    return g


def block_bytes(int8_bytes: int, bits: int) -> int:
    """Arena bytes of an activation block at ``bits`` (4: packed two to a byte), aligned as
    the memory planner places blocks."""
    return align_up((int8_bytes + 1) // 2 if bits == 4 else int8_bytes, 4)


def sram_model(quantized: Graph, space: Space) -> SramModel:
    """The SRAM pieces of ``space`` from the memory plan of its all-int8 quantized graph."""
    from hilc.compiler.memory import plan_memory, tensor_bytes

    plan = plan_memory(quantized)
    packable = {r for r in space.roots if quantized.producer(r).op in LINEAR_OPS
                and all(c.op in LINEAR_OPS for c in quantized.consumers(r))}
    blocks: dict[str, list[int]] = {}  # base tensor -> [start, end]
    for t, (a, b) in plan.lifetimes.items():
        base = t
        while base in plan.inplace:
            base = plan.inplace[base]
        life = blocks.setdefault(base, [a, b])
        life[0], life[1] = min(life[0], a), max(life[1], b)
    last = max((b for _, b in blocks.values()), default=0)
    steps = []
    for s in range(last + 1):
        fixed, var = 0, {}
        for base, (a, b) in blocks.items():
            if a <= s <= b:
                if base in packable:
                    var[base] = tensor_bytes(quantized, base)
                else:
                    fixed += align_up(tensor_bytes(quantized, base), plan.align)
        steps.append((fixed, var))
    scratch = 2 * max((la.k for la in space.layers), default=0)
    return SramModel(steps, plan.input_bytes + plan.output_bytes + scratch)


# --- sensitivity -------------------------------------------------------------------------------

def _key(graph: Graph, samples: np.ndarray, extra: str = "") -> str:
    h = hashlib.sha256(f"{graph.content_hash():016x}{extra}".encode())
    h.update(np.ascontiguousarray(samples, np.float32).tobytes())
    return h.hexdigest()[:16]


def _outputs(graph: Graph, qx_float: np.ndarray, engine: str = "numpy") -> np.ndarray:
    """Dequantized first output of a quantized graph on real physical inputs; for a model that
    ends in a softmax, its logits (probabilities saturate and hide the perturbation). ``engine``
    "tvm": the same integers from one TVM module per graph structure (hilc.targets.tvm)."""
    from hilc.compiler.arith import dequantize_host, quantize_host
    from hilc.compiler.ops.softmax import final_softmax
    from hilc.sim.simulator import run_int_batched

    last = final_softmax(graph)
    if last is not None:
        graph = Graph(graph.name, graph.nodes[:graph.nodes.index(last)], graph.tensors, graph.constants,
                      graph.inputs, [last.inputs[0]], graph.meta, graph.cache)
    q = graph.tensors[graph.inputs[0]].quant
    qx = quantize_host(qx_float, q.scale, q.zero_point, q.bits)
    if engine == "tvm":  # every candidate's values as arguments of the structure's one build
        from hilc.targets.tvm.engine import run_int_parametric

        y = run_int_parametric(graph, {graph.inputs[0]: qx})[graph.outputs[0]]
    else:
        y = run_int_batched(graph, qx)
    qo = graph.tensors[graph.outputs[0]].quant
    return dequantize_host(y, qo.scale, qo.zero_point).astype(np.float64)


def _candidate_mse(graph: Graph, x: np.ndarray, ref: np.ndarray, scale: float, kind: str, name: str,
                   bits: int, engine: str = "numpy") -> float:
    """The output perturbation with one layer's weights ("w") or one activation ("a") lowered."""
    from hilc.compiler.quantize import quantize

    g = assign_bitwidths(graph, {name: bits}) if kind == "w" else assign_bitwidths(graph, None, {name: bits})
    return float(np.mean((_outputs(quantize(g), x, engine) - ref) ** 2)) / scale


def _sensitivity_shard(shared: tuple, cands: list, start: int) -> list[float]:
    from hilc.compiler.quantize import quantize

    graph, x, ref, scale, *engine = shared
    out = []
    for kind, name, bits in cands:
        if kind == "wptq":  # one layer's learned rounding alone: the same fit as in isolated_ptq's walk
            g = with_layer(graph, isolated_ptq(graph, x, bits, only={name}), name)
            out.append(float(np.mean((_outputs(quantize(g), x, *engine) - ref) ** 2)) / scale)
        else:
            out.append(_candidate_mse(graph, x, ref, scale, kind, name, bits, *engine))
    return out


def measure_sensitivity(graph: Graph, samples: np.ndarray, cache: str | Path | None = None,
                        max_samples: int = 128, extended: bool = False,
                        cluster: str | None = None, engine: str = "numpy") -> dict[str, Any]:
    """Perturbation of the output for each (layer, weight width) and (activation, width) lowered
    alone: ``{"weights": {layer: {bits: mse}}, "acts": {root: {bits: mse}}, "baseline": ...}``.

    ``graph`` is a calibrated float graph; ``samples`` real inputs in the model's layout. The
    statistics of ``prepare_subbyte`` are measured first and returned under ``prepared`` (apply
    them with ``with_prepared``). With ``cache`` (a JSON file), results are stored keyed by a hash
    of the graph and the samples and reused on the next search. ``engine`` runs the integer
    model of each candidate: "numpy" (the simulator) or "tvm" (the same integers, hilc[tvm]).
    """
    from hilc.compiler.quantize import quantize
    from hilc.sim.simulator import to_physical
    from hilc.targets.tvm import check_engine, require_tvm

    if check_engine(engine) == "tvm":  # a missing extra fails before any work
        require_tvm()

    x = to_physical(graph, graph.inputs[0], np.asarray(samples, np.float32)[:max_samples])
    key = _key(graph, x, ("extended" if extended else "") + f"ptq{SENSITIVITY_ITERATIONS}")
    if cache is not None and Path(cache).exists():
        try:
            data = json.loads(Path(cache).read_text())
            if data.get("key") == key:
                data["cached"] = True
                return data
        except (OSError, json.JSONDecodeError):
            pass  # an unreadable cache is remeasured
    t0 = time.perf_counter()
    graph = prepare_subbyte(graph, samples, max_samples, cluster=cluster)
    space = analyse(graph, extended)
    ref = _outputs(quantize(graph), x, engine)
    scale = float(np.mean(ref**2)) or 1.0

    def mse(g: Graph) -> float:
        return float(np.mean((_outputs(quantize(g), x, engine) - ref) ** 2)) / scale

    # candidates: each activation at each lower width; each layer at each sub-byte weight width,
    # after its learned rounding fitted as if it alone were lowered ("wptq"), so the ILP sees the
    # cost after the PTQ that ``ptq_lowered`` applies to the allocation
    cands = [("a", r, b) for r in space.roots for b in space.abits if b != 8]
    wcands = [("wptq", la.name, b) for b in space.wbits if b < 8 for la in space.layers]
    if cluster is not None:  # hilc[ray]: one Ray task per candidate, the graph and inputs shipped once
        from hilc.distributed import sensitivity_candidates

        measured = sensitivity_candidates((graph, x, ref, scale, engine), wcands + cands, cluster)
    else:
        measured = {c: _candidate_mse(graph, x, ref, scale, *c, engine) for c in cands}
        fitted = {b: isolated_ptq(graph, x, b) for b in space.wbits if b < 8}  # one walk fits every layer
        measured.update({c: mse(with_layer(graph, fitted[c[2]], c[1])) for c in wcands})
    weights = {la.name: {str(b): (0.0 if b == 8 else measured[("wptq", la.name, b)])
                         for b in space.wbits} for la in space.layers}
    acts = {r: {str(b): (0.0 if b == 8 else measured[("a", r, b)]) for b in space.abits} for r in space.roots}
    data = {"key": key, "samples": int(len(x)), "metric": "mean squared output change / mean squared output",
            "weights": weights, "acts": acts, "seconds": round(time.perf_counter() - t0, 3), "cached": False,
            "prepared": {k: graph.meta[k] for k in ("subbyte_ranges", "input_means")}}
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        Path(cache).write_text(json.dumps(data, indent=1))
    return data


# --- the integer linear program ----------------------------------------------------------------

@dataclass
class Budgets:
    bitops_ratio: float | None = None  # BitOps at least this many times below all-int8
    weights_bytes: int | None = None  # conv/dense weight bytes (packed)
    latency_ratio: float | None = None  # predicted latency at most this fraction of all-int8's
    sram_bytes: int | None = None  # peak SRAM: arena (lower bound) + I/O + scratch

    def any(self) -> bool:
        return any(v is not None for v in (self.bitops_ratio, self.weights_bytes, self.latency_ratio,
                                           self.sram_bytes))


@dataclass
class Allocation:
    weight_bits: dict[str, int]
    act_bits: dict[str, int]
    objective: float  # predicted perturbation (sum of sensitivities)
    bitops: int
    bitops_int8: int
    weights_bytes: int
    weights_bytes_int8: int
    latency: float  # predicted instructions
    latency_int8: float
    seconds: float = 0.0
    peak_sram: int | None = None  # predicted peak SRAM (with a memory plan)

    def summary(self) -> dict[str, Any]:
        return {"weight_bits": self.weight_bits, "act_bits": self.act_bits,
                "predicted_perturbation": self.objective, "bitops": self.bitops, "bitops_int8": self.bitops_int8,
                "bitops_reduction": self.bitops_int8 / max(1, self.bitops),
                "weights_bytes": self.weights_bytes, "weights_bytes_int8": self.weights_bytes_int8,
                "predicted_instructions": round(self.latency), "predicted_instructions_int8": round(self.latency_int8),
                "search_seconds": round(self.seconds, 3),
                **({"predicted_peak_sram_bytes": self.peak_sram} if self.peak_sram is not None else {})}


def weight_bytes(la: Layer, bits: int) -> int:
    """Flash bytes of a layer's weights: packed rows for 4 and 2 bits, int8 otherwise."""
    from hilc.compiler.arith import PACKED_WEIGHT_BITS, packed_row_bytes

    if bits in PACKED_WEIGHT_BITS:
        return la.out_channels * packed_row_bytes(la.k, bits)
    return la.n_weights


def _choices(space: Space) -> list[tuple[Layer, int, int]]:
    """Joint variables: (layer, weight bits, input activation bits)."""
    out = []
    for la in space.layers:
        for w in space.wbits:
            for a in (space.abits if la.root is not None else (8,)):
                out.append((la, w, a))
    return out


class _Problem:
    """The linear pieces shared by the ILP and brute force: per joint variable, its objective and
    resource coefficients; root variables carry the activation sensitivities."""

    def __init__(self, space: Space, sens: dict[str, Any], cost) -> None:
        self.space = space
        self.z = _choices(space)
        self.y = [(r, a) for r in space.roots for a in space.abits]
        nz = len(self.z)
        n = nz + len(self.y)
        self.n = n
        self.obj = np.zeros(n)
        self.bitops = np.zeros(n)
        self.wbytes = np.zeros(n)
        self.lat = np.zeros(n)
        for i, (la, w, a) in enumerate(self.z):
            self.obj[i] = sens["weights"][la.name][str(w)]
            self.bitops[i] = bitops(la.macs, a, w)
            self.wbytes[i] = weight_bytes(la, w)
            self.lat[i] = cost.layer(la, w, a)
        writer = {la.out_root: la for la in space.layers if la.out_root is not None}
        for j, (r, a) in enumerate(self.y):
            self.obj[nz + j] = sens["acts"][r][str(a)]
            if a == 4 and r in writer:  # the producing layer writes packed nibbles
                self.lat[nz + j] = cost.packed_output(writer[r])
            self.bitops[nz + j] = bitops(sum(m for rr, m in space.other_bitops if rr == r), a)
        self.bitops_const = space.fixed_bitops + sum(bitops(m, 8) for rr, m in space.other_bitops if rr is None)
        int8 = np.array([w == 8 and a == 8 for _, w, a in self.z] + [a == 8 for _, a in self.y])
        self.int8 = int8.astype(float)
        self.bitops_int8 = float(self.bitops @ self.int8) + self.bitops_const
        self.wbytes_int8 = float(self.wbytes @ self.int8)
        self.lat_int8 = float(self.lat @ self.int8)

    def equalities(self) -> tuple[np.ndarray, np.ndarray]:
        rows, rhs = [], []
        nz = len(self.z)
        for la in self.space.layers:  # one choice per layer
            rows.append([1.0 if zz[0] is la else 0.0 for zz in self.z] + [0.0] * len(self.y))
            rhs.append(1.0)
        for r in self.space.roots:  # one width per activation ...
            rows.append([0.0] * nz + [1.0 if yy[0] == r else 0.0 for yy in self.y])
            rhs.append(1.0)
            for a in self.space.abits:  # ... which every layer reading it follows
                for la in self.space.layers:
                    if la.root != r:
                        continue
                    row = [1.0 if (zz[0] is la and zz[2] == a) else 0.0 for zz in self.z]
                    row += [-1.0 if yy == (r, a) else 0.0 for yy in self.y]
                    rows.append(row)
                    rhs.append(0.0)
        return np.array(rows), np.array(rhs)

    def limits(self, budgets: Budgets) -> list[tuple[str, np.ndarray, float]]:
        out = []
        if budgets.bitops_ratio is not None:
            out.append(("bitops", self.bitops, self.bitops_int8 / budgets.bitops_ratio - self.bitops_const))
        if budgets.weights_bytes is not None:
            out.append(("weights_bytes", self.wbytes, float(budgets.weights_bytes)))
        if budgets.latency_ratio is not None:
            out.append(("latency", self.lat, self.lat_int8 * budgets.latency_ratio))
        if budgets.sram_bytes is not None:
            sram = self.space.sram
            if sram is None:
                raise HilcError("an SRAM budget needs the memory plan (mixed.sram_model)")
            nz = len(self.z)
            for s, (fixed, var) in enumerate(sram.steps):
                coef = np.zeros(self.n)
                for j, (r, a) in enumerate(self.y):  # a packable block's bytes at the root's width
                    if r in var:
                        coef[nz + j] = block_bytes(var[r], a)
                # roots whose only width is 8 (no y variable) stay at their int8 size
                const = fixed + sum(block_bytes(b, 8) for r, b in var.items() if r not in self.space.roots)
                out.append((f"sram@{s}", coef, float(budgets.sram_bytes - sram.fixed - const)))
        return out

    def peak_sram(self, x: np.ndarray) -> int | None:
        sram = self.space.sram
        if sram is None:
            return None
        nz = len(self.z)
        best = 0
        for fixed, var in sram.steps:
            total = fixed + sum(block_bytes(b, 8) for r, b in var.items() if r not in self.space.roots)
            for j, (r, a) in enumerate(self.y):
                if r in var and x[nz + j] > 0.5:
                    total += block_bytes(var[r], a)
            best = max(best, total)
        return best + sram.fixed

    def solve(self, objective: np.ndarray, limits: list[tuple[str, np.ndarray, float]]) -> np.ndarray | None:
        try:
            from scipy.optimize import Bounds, LinearConstraint, milp
        except ImportError:
            raise HilcError("--precision mixed needs scipy >= 1.10: pip install 'hilc[mixed]'") from None

        a_eq, b_eq = self.equalities()
        cons = [LinearConstraint(a_eq, b_eq, b_eq)]
        for _, coef, ub in limits:
            # a tiny slack so a budget equal to an achievable figure is met despite float rounding
            cons.append(LinearConstraint(coef.reshape(1, -1), -np.inf, ub + 1e-9 * max(1.0, abs(ub))))
        res = milp(objective, constraints=cons, integrality=np.ones(self.n), bounds=Bounds(0, 1),
                   options={"disp": False})
        if res.status != 0 or res.x is None:
            return None
        return np.rint(res.x)

    def allocation(self, x: np.ndarray, seconds: float) -> Allocation:
        wb, ab = {}, {}
        for i, (la, w, _) in enumerate(self.z):
            if x[i] > 0.5:
                wb[la.name] = w
        for j, (r, a) in enumerate(self.y):
            if x[len(self.z) + j] > 0.5:
                ab[r] = a
        return Allocation(wb, ab, float(self.obj @ x), int(round(self.bitops @ x + self.bitops_const)),
                          int(round(self.bitops_int8)), int(round(self.wbytes @ x)), int(round(self.wbytes_int8)),
                          float(self.lat @ x), self.lat_int8, seconds, self.peak_sram(x))


def allocate(space: Space, sens: dict[str, Any], budgets: Budgets, cost=None) -> Allocation:
    """Minimise the summed perturbation under the budgets (HAWQ-V3's ILP). Budgets no allocation
    meets raise a HilcError naming the best achievable figure."""
    return allocate_top(space, sens, budgets, 1, cost)[0]


def check_rerank(k: Any) -> int:
    """``k`` if it is a whole number >= 1 (``--rerank K``), else a one-line error."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise HilcError(f"--rerank K must be a whole number >= 1, got {k}")
    return k


def allocate_top(space: Space, sens: dict[str, Any], budgets: Budgets, k: int, cost=None) -> list[Allocation]:
    """The ``k`` best allocations of the ILP, best first (fewer when fewer are feasible): the
    first is ``allocate``'s optimum; each next one is the ILP's optimum once every allocation
    found so far is excluded by a no-good cut (HAWQ-V3's objective is additive, so its ranking
    near the optimum is where a whole-model measurement can disagree with it: ``rerank``)."""
    from hilc.compiler.costmodel import load_cost_model

    check_rerank(k)
    t0 = time.perf_counter()
    p = _Problem(space, sens, cost or load_cost_model())
    limits = p.limits(budgets)
    x = p.solve(p.obj, limits)
    if x is None:
        raise HilcError(_infeasible_message(p, limits))
    found = [x]
    while len(found) < k:
        # no-good cut: every variable is binary and one-hot per layer/activation, so another
        # allocation sets at least one of this one's chosen variables to 0
        cuts = [("nogood", f, float(f.sum()) - 1.0) for f in found]
        x = p.solve(p.obj, limits + cuts)
        if x is None:
            break
        found.append(x)
    seconds = time.perf_counter() - t0
    return [p.allocation(x, seconds) for x in found]


def _infeasible_message(p: _Problem, limits: list[tuple[str, np.ndarray, float]]) -> str:
    """Name the budget that cannot be met and the best figure achievable (under the others)."""
    sram_rows = [lim for lim in limits if lim[0].startswith("sram@")]
    if sram_rows:
        others = [lim for lim in limits if not lim[0].startswith("sram@")]
        feasible_without = p.solve(p.obj, others) is not None
        if feasible_without:  # the SRAM budget is the one in the way: find the least peak
            least = _least_peak(p, others)
            return (f"no bit allocation meets the SRAM budget: the least peak SRAM achievable"
                    f"{' under the other budgets' if others else ''} is {least} bytes")
        limits = others
    for i, (name, coef, _) in enumerate(limits):
        others = limits[:i] + limits[i + 1:]
        x = p.solve(coef, others)
        if x is None:
            continue
        best = float(coef @ x)
        if name == "bitops":
            return (f"no bit allocation meets --bitops-ratio: the most BitOps can shrink"
                    f"{' under the other budgets' if others else ''} is "
                    f"{p.bitops_int8 / (best + p.bitops_const):.3f}x below all-int8")
        if name == "weights_bytes":
            return (f"no bit allocation meets --weights-bytes: the fewest weight bytes achievable"
                    f"{' under the other budgets' if others else ''} are {int(round(best))}")
        return (f"no bit allocation meets --latency-ratio: the lowest predicted latency achievable"
                f"{' under the other budgets' if others else ''} is {best / p.lat_int8:.3f} of all-int8's")
    return "no bit allocation meets these budgets together (each alone is achievable)"


def _least_peak(p: _Problem, others: list) -> int:
    """The least achievable peak SRAM: every packable activation at 4 bits where the other budgets
    allow (a smaller width never grows a block), found by bisection on the budget."""
    sram = p.space.sram
    lo = sram.fixed
    hi = sram.fixed + max(f + sum(v.values()) for f, v in sram.steps)
    while lo < hi:
        mid = (lo + hi) // 2
        trial = [lim for lim in p.limits(Budgets(sram_bytes=mid)) if lim[0].startswith("sram@")]
        if p.solve(np.zeros(p.n), others + trial) is not None:
            hi = mid
        else:
            lo = mid + 1
    return lo


def feasible_allocations(p: _Problem, budgets: Budgets):
    """Every allocation of ``p`` within the budgets, by enumeration (small models only), as
    (objective, choice vector) pairs: the reference the ILP is tested against."""
    limits = p.limits(budgets)
    index = {(zz[0].name, zz[1], zz[2]): i for i, zz in enumerate(p.z)}
    for acts in itertools.product(p.space.abits, repeat=len(p.space.roots)):
        amap = dict(zip(p.space.roots, acts, strict=True))
        for ws in itertools.product(p.space.wbits, repeat=len(p.space.layers)):
            x = np.zeros(p.n)
            for la, w in zip(p.space.layers, ws, strict=True):
                x[index[(la.name, w, amap[la.root] if la.root is not None else 8)]] = 1
            for j, (r, a) in enumerate(p.y):
                x[len(p.z) + j] = float(amap[r] == a)
            if all(coef @ x <= ub + 1e-9 * max(1.0, abs(ub)) for _, coef, ub in limits):
                yield float(p.obj @ x), x


def brute_force(space: Space, sens: dict[str, Any], budgets: Budgets, cost=None) -> Allocation | None:
    """The best allocation by enumeration (small models only)."""
    from hilc.compiler.costmodel import load_cost_model

    p = _Problem(space, sens, cost or load_cost_model())
    best, best_x = np.inf, None
    for v, x in feasible_allocations(p, budgets):
        if v < best - 1e-15:
            best, best_x = v, x
    return None if best_x is None else p.allocation(best_x, 0.0)


# --- post-training quantization of the allocation -------------------------------------------

RERANK_K = 1  # allocations re-ranked by default (``apply_precision(rerank=...)``, ``--rerank``)
ADAROUND_ITERATIONS = 2000  # a step count, not a time budget: the same inputs give the same model
SENSITIVITY_ITERATIONS = 500  # per-layer sensitivity ranks widths; fewer steps do (search time)


def ptq_lowered(reference: Graph, assigned: Graph, samples: np.ndarray, max_samples: int = 128,
                iterations: int = ADAROUND_ITERATIONS) -> Graph:
    """After the ILP: learned rounding (AdaRound, with its per-channel scale choice) for the
    layers whose weights went below 8 bits, and bias correction for every layer, against the
    calibrated float graph ``reference`` (``hilc.compiler.ptq.correct_layers``). Constants change,
    never the arithmetic; with no lowered layer the graph is returned as it is."""
    from hilc.compiler.ptq import correct_layers
    from hilc.sim.simulator import to_physical

    lowered = {n.name for n in assigned.nodes if n.op in LINEAR_OPS and n.attrs.get("weight_bits", 8) < 8}
    if not lowered:
        return assigned
    g = assigned.copy()
    for n, rn in zip(g.nodes, reference.nodes, strict=True):
        if n.op in LINEAR_OPS and "bias" in rn.params:  # the data-driven correction replaces the mean-based one
            n.params["bias"] = rn.params["bias"]
    x = to_physical(reference, reference.inputs[0], np.asarray(samples, np.float32)[:max_samples])
    g = correct_layers(reference, g, x, bias_correct=True, adaround=True, budget_s=None, iterations=iterations,
                       adaround_only=lowered, act_quant=_fake_act_quant(g))
    g.meta["ptq"] = ["bias-correct", "adaround"]
    return g


def _fake_act_quant(graph: Graph):
    """Fake quantization of the sub-byte activations of ``graph`` (``meta['act_bits']``), on the
    grid ``quantize`` will give them, for the PTQ walk; None when every activation is 8-bit.
    (Not ``qat.act_grids``: that quantizes the whole graph and fake-quantizes the 8-bit tensors too.)"""
    from hilc.compiler.arith import choose_qparams, qrange
    from hilc.compiler.qat import fake_act

    grids = {}
    for t, bits in graph.meta.get("act_bits", {}).items():
        if bits < 8 and t in graph.meta.get("calibration", {}):
            lo, hi = graph.meta.get("subbyte_ranges", {}).get(t, {}).get(str(bits), graph.meta["calibration"][t])
            s, zp = choose_qparams(lo, hi, bits)
            grids[t] = (s, zp, *qrange(bits))
    if not grids:
        return None

    def fq(name: str, v: np.ndarray) -> np.ndarray:
        return v if name not in grids else fake_act(v, grids[name])[0].astype(np.float32, copy=False)

    return fq


def isolated_ptq(graph: Graph, x: np.ndarray, bits: int, iterations: int = SENSITIVITY_ITERATIONS,
                 only: set[str] | None = None) -> Graph:
    """Every conv/dense at ``bits``-bit weights, each rounded by AdaRound and bias-corrected on
    the float inputs it sees in ``graph`` (as if it alone were lowered): one walk for all layers
    (with ``only``: for those layers alone, each fitted the same)."""
    from threadpoolctl import threadpool_limits

    from hilc.compiler.ptq import correct_layers

    g = graph.copy()
    for n in g.nodes:
        if n.op in LINEAR_OPS:
            n.attrs["weight_bits"] = bits
            n.attrs.pop("w_scale", None)
    # one BLAS thread, as in a Ray worker: a GEMM split over threads may round differently, and the
    # sensitivities must not depend on where they were measured (no slower here: measured)
    with threadpool_limits(limits=1, user_api="blas"):
        return correct_layers(graph, g, x, bias_correct=True, adaround=True, budget_s=None, iterations=iterations,
                              isolated=True, only=only)


def with_layer(graph: Graph, fitted: Graph, name: str) -> Graph:
    """``graph`` with layer ``name``'s weights, bias, width and grid taken from ``fitted``."""
    g = graph.copy()
    node = next(n for n in g.nodes if n.name == name)
    src = next(n for n in fitted.nodes if n.name == name)
    for p in ("weight", "bias"):
        node.params[p] = g.add_constant(f"{name}.{p}_ptq", fitted.param(src, p))
    for a in ("weight_bits", "w_scale", "w_scale_bits"):
        node.attrs[a] = src.attrs[a]
    g.meta.setdefault("act_bits", {})
    return g


# --- the compile step --------------------------------------------------------------------------

def apply_precision(graph: Graph, samples: np.ndarray | None, precision: str = "int8",
                    budgets: Budgets | None = None, weight_bits: dict[str, int] | None = None,
                    act_bits: dict[str, int] | None = None, cache: str | Path | None = None,
                    board: str | None = None, extended: bool = False,
                    cluster: str | None = None, engine: str = "numpy",
                    finetune_steps: int | None = None,
                    finetune_samples: np.ndarray | None = None,
                    rerank: int | None = None,
                    ptq_samples: np.ndarray | None = None) -> tuple[Graph, dict[str, Any], dict[str, str]]:
    """The calibrated float graph with bit-widths assigned (fixed ones, or the ILP's for
    ``precision='mixed'``), the report's ``mixed_precision`` section and files to write.
    ``engine`` ("numpy" or "tvm") runs the search's integer-model evaluations.
    ``finetune_steps``: quantization-aware fine-tuning after the PTQ (``hilc.compiler.qat``;
    None: its default step count, 0: off), when some width went below 8; ``finetune_samples``: its
    inputs (model layout; None: the calibration samples). ``rerank``: the K best ILP solutions are
    scored on the calibration data by the whole integer model and the best kept
    (``hilc.compiler.rerank``; None: ``RERANK_K``, 1: the ILP's optimum as it is).
    ``ptq_samples``: extra unlabeled inputs (model layout) for the allocation's PTQ (AdaRound and
    bias correction, ``ptq_lowered``), fitted on the calibration samples plus these (None: the
    calibration samples alone); the sensitivities and the search still use the calibration samples."""
    rerank_k = check_rerank(RERANK_K if rerank is None else rerank)  # before the search's work
    budgets = budgets or Budgets()
    if precision not in ("int8", "mixed"):
        raise HilcError(f"unknown precision '{precision}' (choose int8 or mixed)")
    if precision == "int8":
        if budgets.any():
            raise HilcError("--bitops-ratio, --weights-bytes and --latency-ratio need --precision mixed")
        if not weight_bits and not act_bits:
            return graph, {}, {}
        if samples is not None:
            graph = prepare_subbyte(graph, samples)
        return assign_bitwidths(graph, weight_bits, act_bits), {"search": "fixed"}, {}
    if not budgets.any():
        raise HilcError("--precision mixed needs a budget: --bitops-ratio R, --weights-bytes N, --latency-ratio R "
                        "or --sram N")
    for name, v in (("--bitops-ratio", budgets.bitops_ratio), ("--latency-ratio", budgets.latency_ratio),
                    ("--weights-bytes", budgets.weights_bytes), ("--sram", budgets.sram_bytes)):
        if v is not None and not (v > 0 and np.isfinite(v)):
            raise HilcError(f"{name} must be a positive number, got {v}")
    if samples is None:
        raise HilcError("--precision mixed measures each layer's sensitivity on calibration data: give --calib FILE")
    from hilc.compiler.costmodel import load_cost_model

    t0 = time.perf_counter()
    sens = measure_sensitivity(graph, samples, cache, extended=extended, cluster=cluster, engine=engine)
    graph = with_prepared(graph, sens["prepared"])
    try:
        cost = load_cost_model(board)
    except HilcError:
        if budgets.latency_ratio is not None:
            raise
        cost = load_cost_model()  # latency is only reported here, not budgeted
    space = analyse(graph, extended)
    from hilc.compiler.quantize import quantize

    space.sram = sram_model(quantize(graph), space)
    rerank_info = None
    if rerank_k == 1:
        alloc = allocate(space, sens, budgets, cost)
    else:  # the K best of the ILP, scored by the whole integer model on the calibration data
        from hilc.compiler import rerank as rr

        t_rr = time.perf_counter()
        cands = allocate_top(space, sens, budgets, rerank_k, cost)
        best, rows, chosen = rr.pick(rr.Scorer(graph, samples, sens["samples"], engine), cands)
        alloc = cands[best]
        rerank_info = {"k": rerank_k, "metric": rr.METRIC, "score_adaround_iterations": rr.SCORE_ITERATIONS,
                       "chosen": best, "candidates": rows,
                       "seconds": round(time.perf_counter() - t_rr, 3)}  # includes the chosen one's PTQ
    t_ptq = time.perf_counter()
    if rerank_info is not None and ptq_samples is None:
        g = chosen  # scored after this very PTQ (same inputs, same AdaRound steps): not fitted twice
    else:
        ptq_x, n_ptq = samples, sens["samples"]
        if ptq_samples is not None:  # more inputs for AdaRound / bias correction (K x K statistics: cheap)
            ptq_x = np.concatenate([np.asarray(samples, np.float32)[:n_ptq], np.asarray(ptq_samples, np.float32)])
            n_ptq = len(ptq_x)
        g = ptq_lowered(graph, assign_bitwidths(graph, alloc.weight_bits, alloc.act_bits), ptq_x, n_ptq)
    ptq_seconds = time.perf_counter() - t_ptq
    search_seconds = time.perf_counter() - t0
    ft_info = None
    if finetune_steps != 0 and (any(b < 8 for b in alloc.weight_bits.values())
                                or any(b < 8 for b in alloc.act_bits.values())):
        from hilc.compiler import qat
        from hilc.sim.simulator import to_physical

        ft_src = samples[:sens["samples"]] if finetune_samples is None else finetune_samples
        x_ft = to_physical(graph, graph.inputs[0], np.asarray(ft_src, np.float32))
        g, ft_info = qat.finetune(graph, g, x_ft,
                                  qat.default_steps(len(x_ft)) if finetune_steps is None else finetune_steps)
    info = alloc.summary()
    info.update(search="hawq-v3 ilp (scipy.optimize.milp)", sensitivity_seconds=sens["seconds"],
                sensitivity_cached=sens["cached"], search_seconds=round(search_seconds, 3),
                latency_model=cost.board, candidates={"weights": list(space.wbits), "acts": list(space.abits)},
                budgets={k: v for k, v in vars(budgets).items() if v is not None})
    if rerank_info is not None:
        info["rerank"] = rerank_info
    if g.meta.get("ptq"):
        info["ptq"] = {"methods": g.meta["ptq"], "adaround_iterations": ADAROUND_ITERATIONS,
                       "seconds": round(ptq_seconds, 3)}
        if ptq_samples is not None:
            info["ptq"]["samples"] = sens["samples"] + len(ptq_samples)
    if ft_info is not None:  # quantization-aware fine-tuning: after the search, timed apart from it
        info["finetune"] = ft_info
    # measured effect: the same perturbation metric on the whole mixed graph
    from hilc.sim.simulator import to_physical

    x = to_physical(graph, graph.inputs[0], np.asarray(samples, np.float32)[:sens["samples"]])
    ref = _outputs(quantize(graph), x, engine)
    measured = float(np.mean((_outputs(quantize(g), x, engine) - ref) ** 2))
    info["measured_perturbation"] = measured / (float(np.mean(ref**2)) or 1.0)
    files = {"sensitivity.json": json.dumps(sens, indent=1)}
    return g, info, files
