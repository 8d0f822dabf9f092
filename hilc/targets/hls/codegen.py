"""HLS code generation: integer graph -> a streaming dataflow design for Vitis HLS (OUT/hls/).

* one C++ function per layer (templates/layers.j2), all connected by ``hls::stream`` FIFOs in a
  ``DATAFLOW`` top function whose ports are AXI-Streams of int8 beats; each node's layer config comes
  from its operator's ``Op.lower_hls`` (hilc/compiler/ops, helpers in lower.py);
* activations are ``ap_int<bits>`` from each tensor's ``QParams.bits``, weights ``ap_int<weight_bits>``,
  accumulators as wide as the layer's static accumulator bound needs;
* constants are ROMs; a tensor read by several layers is duplicated by a fork layer;
* conv2d and dense have a parallelism knob (PE output channels x SIMD inputs per cycle); the default
  grows the slowest layer's parallelism while the estimated design fits 80 % of the board's DSPs,
  BRAM and LUTs (estimate.py); a design that cannot fit the board is refused before anything is written.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from hilc import __version__
from hilc.compiler.ir import Graph
from hilc.compiler.ops import OPS
from hilc.compiler.ops.softmax import NR_C1, NR_C2, NR_STEPS
from hilc.errors import HilcError
from hilc.sim.simulator import run_int
from hilc.targets.hls import estimate as est
from hilc.targets.hls.boards import DEFAULT_FPGA_BOARD, FpgaBoard, load_fpga_board

TEMPLATES = Path(__file__).parent / "templates"
TOP = "hilc_top"
BUDGET = 0.8  # share of the board's DSP/BRAM/LUT the default parallelism may take
_NATIVE = [(-128, 127, "signed char"), (-32768, 32767, "short"), (-(2**31), 2**31 - 1, "int"),
           (-(2**63), 2**63 - 1, "long long")]


@dataclass
class HlsDesign:
    files: dict[str, str]  # file name in OUT/hls -> text
    board: FpgaBoard
    estimate: dict[str, Any]  # report.json "fpga"
    layers: list[dict[str, Any]] = field(default_factory=list)
    tb_input: bytes = b""  # int8 samples for the Vitis testbench (tb_input.bin)
    tb_expected: bytes = b""  # the simulator's outputs for them (tb_expected.bin)


class HlsContext:
    """What ``Op.lower_hls`` uses: the graph, ROM declarations and C identifiers."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.roms: list[dict[str, Any]] = []  # of the layer being lowered: declared inside its function
        self._names: set[str] = set()

    def ident(self, name: str) -> str:
        base = "".join(ch if ch.isalnum() else "_" for ch in name)
        if not base or base[0].isdigit():
            base = "_" + base
        ident, k = base, 1
        while ident in self._names:
            ident, k = f"{base}_{k}", k + 1
        self._names.add(ident)
        return ident

    def rom(self, name: str, values: Any, ap: str) -> str:
        """Declare a constant table; returns its identifier."""
        arr = np.asarray(values)
        if arr.ndim == 0:
            arr = arr.reshape(1)
        arr = arr.astype(np.int64)
        lo, hi = int(arr.min(initial=0)), int(arr.max(initial=0))
        native = next(t for a, b, t in _NATIVE if a <= lo and hi <= b)
        ident = self.ident(name)
        self.roms.append({"name": ident, "native": native, "ap": ap, "dims": list(arr.shape),
                          "body": _c_init(arr, "LL" if native == "long long" else "")})
        return ident

    def act_t(self, tensor: str) -> str:
        q = self.graph.tensors[tensor].quant
        return f"act{q.bits if q is not None else 8}_t"


def _c_init(arr: np.ndarray, suffix: str = "") -> str:
    if arr.ndim == 1:
        flat = arr.tolist()
        rows = [", ".join(f"{v}{suffix}" for v in flat[i:i + 32]) for i in range(0, len(flat), 32)]
        return "{" + ",\n    ".join(rows) + "}"
    return "{" + ",\n".join(_c_init(a, suffix) for a in arr) + "}"


def _check_graph(graph: Graph) -> None:
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise HilcError(f"the HLS target takes models with one input and one output "
                        f"(this one has {len(graph.inputs)} and {len(graph.outputs)})")
    if not graph.is_quantized:
        raise HilcError("the HLS target needs a quantized graph")


def _parse_parallel(layers: list[dict], parallel: dict[str, tuple[int, int]] | None) -> dict[str, tuple[int, int]]:
    fixed: dict[str, tuple[int, int]] = {}
    by_name = {L["node"]: L for L in layers if "pe_options" in L}
    for name, (pe, simd) in (parallel or {}).items():
        L = by_name.get(name)
        if L is None:
            known = ", ".join(by_name) or "none"
            raise HilcError(f"--parallel {name}: no conv2d/dense layer of that name (layers: {known})")
        if pe not in L["pe_options"] or simd not in L["simd_options"]:
            raise HilcError(f"--parallel {name}={pe}x{simd}: PE must divide the output channels per group "
                            f"({L['pe_options'][-1]}: {L['pe_options']}) and SIMD the input channels per group "
                            f"({L['simd_options'][-1]}: {L['simd_options']})")
        fixed[name] = (int(pe), int(simd))
    return fixed


def _next_option(L: dict) -> tuple[int, int] | None:
    """One step more parallel: the next SIMD divisor first (wider dot products), then the next PE."""
    simds, pes = L["simd_options"], L["pe_options"]
    if L["simd"] != simds[-1]:
        return L["pe"], simds[simds.index(L["simd"]) + 1]
    if L["pe"] != pes[-1]:
        return pes[pes.index(L["pe"]) + 1], L["simd"]
    return None


def _totals(layers: list[dict], streams: list[dict]) -> dict[str, int]:
    tot = {"dsp": 0, "bram18": 0, "lut": 0}
    for L in layers:
        e = est.layer_estimate(L)
        L["est"] = e
        for k in tot:
            tot[k] += e[k]
    for s in streams:
        b, lut = est.fifo_estimate(s["depth"], s["bits"])
        tot["bram18"] += b
        tot["lut"] += lut
    return tot


def _fits(tot: dict[str, int], board: FpgaBoard, share: float) -> bool:
    return (tot["dsp"] <= share * board.dsp and tot["bram18"] <= share * board.bram18
            and tot["lut"] <= share * board.lut)


def choose_parallelism(layers: list[dict], streams: list[dict], board: FpgaBoard,
                       fixed: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Set every conv2d/dense layer's PE and SIMD: the user's choice where given, else grow the
    slowest layer (the dataflow pipeline's interval) one step at a time while the estimate stays
    within BUDGET of the board; stop when the slowest layer can grow no further."""
    tunable = [L for L in layers if "pe_options" in L]
    for L in tunable:
        L["pe"], L["simd"] = fixed.get(L["node"], (1, 1))
    tot = _totals(layers, streams)
    while True:
        slowest = max(layers, key=lambda L: L["est"]["cycles"])
        if slowest not in tunable or slowest["node"] in fixed:
            break
        step = _next_option(slowest)
        if step is None:
            break
        before = (slowest["pe"], slowest["simd"], slowest["est"]["cycles"])
        slowest["pe"], slowest["simd"] = step
        trial = _totals(layers, streams)
        if not _fits(trial, board, BUDGET) or slowest["est"]["cycles"] >= before[2]:
            slowest["pe"], slowest["simd"] = before[:2]
            tot = _totals(layers, streams)
            break
        tot = trial
    return tot


def generate_hls(graph: Graph, board: str | FpgaBoard | None = None,
                 parallel: dict[str, tuple[int, int]] | None = None,
                 tb_input: np.ndarray | None = None) -> HlsDesign:
    """Lower a quantized graph to an HLS design (text only; nothing is written).

    ``parallel`` maps conv2d/dense node names to (PE, SIMD); the others get the default from the
    board's resource budget. ``tb_input``: int8 samples (physical layout, first axis = batch) the
    Vitis testbench runs and checks against the simulator.
    """
    _check_graph(graph)
    b = board if isinstance(board, FpgaBoard) else load_fpga_board(board or DEFAULT_FPGA_BOARD)
    ctx = HlsContext(graph)
    layers: list[dict] = []
    streams: list[dict] = []
    calls: list[str] = []

    def new_stream(tensor: str, suffix: str = "", depth: int = 2) -> str:
        name = ctx.ident(f"s_{tensor}{suffix}")
        bits = graph.tensors[tensor].quant.bits
        streams.append({"name": name, "t": ctx.act_t(tensor), "depth": depth, "bits": bits, "tensor": tensor})
        return name

    # Every use of a tensor (a consumer's input slot, or the graph output) gets its own stream.
    uses: dict[str, list[tuple[int, int]]] = {}
    for i, node in enumerate(graph.nodes):
        for j, t in enumerate(node.inputs):
            uses.setdefault(t, []).append((i, j))
    out_name = graph.outputs[0]
    uses.setdefault(out_name, []).append((-1, 0))
    # Inputs of joins (concat reads its inputs one after another) may wait for a whole tensor.
    deep = {(i, j) for i, n in enumerate(graph.nodes) if n.op == "concat" for j in range(len(n.inputs))}
    slot_stream: dict[tuple[int, int], str] = {}

    def produced(tensor: str, stream: str) -> None:
        us = uses.get(tensor, [])
        size = int(np.prod(graph.tensors[tensor].shape[1:], dtype=np.int64))
        if not us:
            raise HilcError(f"tensor '{tensor}' is computed but never used; "
                            "the HLS design cannot leave a stream unread")
        if len(us) == 1:
            slot_stream[us[0]] = stream
            if us[0] in deep:
                next(s for s in streams if s["name"] == stream)["depth"] = size + 1
            return
        # A fork: its outputs are deep enough to hold the tensor, so a branch that is read later
        # (a residual connection, a concat) never stalls the other one (no dataflow deadlock).
        outs = [new_stream(tensor, f"_f{k}", size + 1) for k in range(len(us))]
        for u, s in zip(us, outs, strict=True):
            slot_stream[u] = s
        cfg = {"kind": "fork", "fn": ctx.ident(f"fork_{tensor}"), "roms": [], "n": size, "n_out": len(outs),
               "in_t": ctx.act_t(tensor), "act_bits": graph.tensors[tensor].quant.bits, "node": f"fork_{tensor}",
               "op": "fork", "doc": f"fork: {tensor} to {len(outs)} consumers"}
        layers.append(cfg)
        calls.append(f"{cfg['fn']}({stream}, {', '.join(outs)})")

    in_name = graph.inputs[0]
    in_stream = new_stream(in_name)
    produced(in_name, in_stream)
    for i, node in enumerate(graph.nodes):
        ctx.roms = []
        cfg = OPS[node.op].lower_hls(node, graph, ctx)  # Op.lower_hls refuses an op it cannot lower
        cfg.update(roms=ctx.roms, node=node.name, op=node.op, fn=ctx.ident(f"layer{i}_{node.name}"),
                   in_t=ctx.act_t(node.inputs[0]), out_t=ctx.act_t(node.outputs[0]))
        if len(node.inputs) > 1:
            cfg["in_b_t"] = ctx.act_t(node.inputs[1])
        ins = [slot_stream[(i, j)] for j in range(len(node.inputs))]
        out_stream = new_stream(node.outputs[0])
        layers.append(cfg)
        calls.append(f"{cfg['fn']}({', '.join([*ins, out_stream])})")
        produced(node.outputs[0], out_stream)
    final_stream = slot_stream[(-1, 0)]

    fixed = _parse_parallel(layers, parallel)
    tot = choose_parallelism(layers, streams, b, fixed)
    report = _report(layers, tot, b)
    if tot["dsp"] > b.dsp or tot["bram18"] > b.bram18:
        raise HilcError(f"the design does not fit {b.name} ({b.part}): estimated {tot['dsp']} DSP and "
                        f"{tot['bram18']} BRAM18 ({tot['lut']} LUT); the board has {b.dsp} DSP and {b.bram18} BRAM18 "
                        f"(lower --parallel, or use a larger board)")

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=False)
    in_q, out_q = graph.tensors[in_name].quant, graph.tensors[out_name].quant
    bits = sorted({t.quant.bits for t in graph.tensors.values() if t.quant is not None})
    c = {
        "version": __version__, "model": graph.name, "top": TOP, "layers_": layers,
        "streams": streams, "calls": calls, "input_stream": in_stream, "output_stream": final_stream,
        "in_t": ctx.act_t(in_name), "out_t": ctx.act_t(out_name),
        "input_size": int(np.prod(graph.tensors[in_name].shape[1:])),
        "output_size": int(np.prod(graph.tensors[out_name].shape[1:])),
        "input_quant": in_q, "output_quant": out_q, "model_hash": graph.content_hash(),
        "types": [{"name": f"act{k}_t", "bits": k} for k in bits], "board": b,
        "period_ns": b.period_ns, "nr_c1": NR_C1, "nr_c2": NR_C2, "nr_steps": NR_STEPS,
        "project": "hilc_" + "".join(ch if ch.isalnum() else "_" for ch in graph.name),
    }
    files = {name[:-3]: env.get_template(name).render(c)
             for name in ("hilc_hls.h.j2", "model.h.j2", "model.cpp.j2", "testbench.cpp.j2", "build.tcl.j2",
                          "Makefile.j2")}
    design = HlsDesign(files, b, report, layers)
    if tb_input is None or not len(tb_input):  # one all-zero-point sample: the scripts still run
        tb_input = np.full((1, *graph.tensors[in_name].shape[1:]), in_q.zero_point, np.int8)
    x = np.ascontiguousarray(tb_input, dtype=np.int8).reshape(-1, *graph.tensors[in_name].shape[1:])
    design.tb_input = x.tobytes()
    design.tb_expected = np.ascontiguousarray(run_int(graph, {in_name: x})[out_name]).tobytes()
    return design


def _report(layers: list[dict], tot: dict[str, int], b: FpgaBoard) -> dict[str, Any]:
    per_layer = []
    for L in layers:
        e = L["est"]
        row = {"name": L["node"], "op": L["op"], **e}
        if "pe" in L:
            row.update(pe=L["pe"], simd=L["simd"], macs=L["macs"],
                       macs_per_cycle=round(L["macs"] / max(e["cycles"], 1), 2))
        per_layer.append(row)
    interval = max((L["est"]["cycles"] for L in layers), default=0)
    latency = sum(L["est"]["cycles"] for L in layers)
    return {
        "estimate": True,
        "note": "analytical estimate from the layers' shapes, bit-widths and PE x SIMD choices (rules in "
                "hilc/targets/hls/estimate.py), not a synthesis result; run build.tcl for Vitis HLS's report",
        "board": b.name, "part": b.part, "clock_mhz": b.clock_mhz,
        "available": {"dsp": b.dsp, "bram18": b.bram18, "lut": b.lut, "ff": b.ff},
        "total": tot,
        "utilisation": {k: round(tot[k] / getattr(b, k), 4) for k in ("dsp", "bram18", "lut")},
        "interval_cycles": interval,
        "latency_cycles_upper_bound": latency,
        "latency_us_upper_bound": round(latency / b.clock_mhz, 2),
        "throughput_per_s": round(b.clock_mhz * 1e6 / max(interval, 1), 1),
        "layers": per_layer,
    }


def write_hls_project(out_dir: Path, design: HlsDesign) -> Path:
    """OUT/hls: the design, its testbench and data, the Vitis HLS Tcl script, the arithmetic header."""
    d = Path(out_dir) / "hls"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    for name, text in design.files.items():
        (d / name).write_text(text)
    (d / "tb_input.bin").write_bytes(design.tb_input)
    (d / "tb_expected.bin").write_bytes(design.tb_expected)
    return d
