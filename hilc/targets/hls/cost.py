"""Hardware cost of integer and minifloat multiply-accumulates on the FPGA boards, and a per-layer
precision picker (integer or minifloat) under an accuracy proxy.

An analytical model for 7-series / UltraScale+ fabric (LUT6 + carry chains, DSP48E1/E2 with a
25x18 / 27x18 multiplier), in the units the HLS estimate (estimate.py) uses. One MAC lane:

Integer, b_w-bit weights times (b_a + 1)-bit ``x - zp``:
* multiplier: one DSP when both operands are wider than 4 bits (the DSP's 25x18 holds any
  8x9 product; narrower products are cheaper in fabric), else an array multiplier of about
  one LUT per partial-product bit: ``b_w * (b_a + 1)`` LUTs;
* accumulator: an A-bit adder on the carry chain (A LUTs) and its A-bit register (A FFs), with A
  the proven accumulator width; a pipeline register on the product.

Minifloat ExMy weights times EaMa activations (or times the integer ``x - zp``):
* significand multiplier of (m_w + 1) x (m_a + 1) bits (hidden bit included; the sign is an XOR
  and the accumulator adds or subtracts): DSP/LUT by the same rule as integers;
* exponent adder: ``max(e_w, e_a) + 1`` LUTs; hidden-bit detection (e != 0): one LUT per operand;
* alignment shifter: the product (m_w + m_a + 2 bits) shifted left by up to
  ``S = (2**e_w - 2) + (2**e_a - 2)`` places into an (P + S)-bit word: ceil(log2(S + 1)) mux stages,
  two 2:1 stages per LUT6 (a 4:1 mux), so ``(P + S) * ceil(stages / 2)`` LUTs;
* accumulator as for integers, but A is much wider: the exact sum of products spans the whole
  dynamic range of both formats (``minifloat.accumulator_bits``);
* the input cast (integer -> minifloat, once per input element, shared by the PE lanes): a
  leading-one detector and the rounding incrementer: about ``2 * (b_a + 1) + m_a + 1`` LUTs per
  SIMD lane.
Requantizer per layer: the dyadic product acc x b in DSPs, ``ceil(A / 17) * ceil(mult_bits / 26)``
(a DSP48 takes 18 x 27 signed), plus 150 LUTs of rounding and clamping.
These are estimates for comparing formats, not synthesis results.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from hilc.compiler import minifloat as mf
from hilc.compiler.ir import Graph, Node

DSP_MIN_BITS = 5  # both operands at least this wide: the product goes to a DSP


def mac_cost(weight: str | int, act: str | int | None = 8, acc_bits: int = 32, act_bits: int = 8) -> dict[str, Any]:
    """LUT / DSP / FF of one MAC lane. ``weight``: integer bits or a minifloat name; ``act``: a
    minifloat name for the input cast, else the integer activation (``act_bits`` wide)."""
    wf = mf.parse(weight) if isinstance(weight, str) else None
    af = mf.parse(act) if isinstance(act, str) else None
    if wf is None and af is None:
        bw, ba = int(weight), act_bits + 1
        dsp_mult = bw >= DSP_MIN_BITS and ba >= DSP_MIN_BITS
        lut = (0 if dsp_mult else bw * ba) + acc_bits
        ff = acc_bits + bw + ba
        return {"lut": lut, "dsp": int(dsp_mult), "ff": ff, "cast_lut": 0,
                "parts": {"multiplier": f"{bw}x{ba}", "accumulator": acc_bits}}
    if wf is None:  # minifloat activation, integer weights: not generated; priced as the mirror case
        wf, af = af, None
    sw = 2 ** wf.e - 2
    mult_a = (af.m + 1) if af is not None else act_bits + 1
    sa = (2 ** af.e - 2) if af is not None else 0
    mult_w = wf.m + 1
    dsp_mult = mult_a >= DSP_MIN_BITS and mult_w >= DSP_MIN_BITS
    p = mult_a + mult_w
    s = sw + sa
    stages = math.ceil(math.log2(s + 1)) if s > 0 else 0
    shifter = (p + s) * math.ceil(stages / 2)
    exp_add = (max(wf.e, af.e if af is not None else 0) + 1) if af is not None else 0
    hidden = 1 + (1 if af is not None else 0)
    lut = (0 if dsp_mult else mult_a * mult_w) + exp_add + hidden + shifter + acc_bits
    ff = acc_bits + p + wf.e + (af.e if af is not None else 0)
    cast = (2 * (act_bits + 1) + af.m + 1) if af is not None else 0
    return {"lut": lut, "dsp": int(dsp_mult), "ff": ff, "cast_lut": cast,
            "parts": {"multiplier": f"{mult_w}x{mult_a}", "exponent_adder": exp_add, "shifter": shifter,
                      "accumulator": acc_bits}}


def _acc_bits(node: Node) -> int:
    return max(2, int(node.attrs["acc_bound"]).bit_length() + 1)


def _k(graph: Graph, node: Node) -> int:
    w = graph.param(node, "weight")
    return int(w[0].size)


def layer_cost(graph: Graph, node: Node, pe: int = 1, simd: int = 1) -> dict[str, Any]:
    """Cost of a quantized conv2d/dense with PE x SIMD lanes (the HLS layer's parallelism)."""
    a = node.attrs
    acc = _acc_bits(node)
    ab = graph.tensors[node.inputs[0]].quant.bits
    weight = a.get("format") or int(a.get("weight_bits", 8))
    m = mac_cost(weight, a.get("act_format") or ab, acc, ab)
    mult_bits = int(a.get("mult_bits", 31))
    rq_dsp = math.ceil(acc / 17) * math.ceil(mult_bits / 26)
    lanes = pe * simd
    return {"name": node.name, "format": a.get("format") or f"int{weight}", "act_format": a.get("act_format"),
            "pe": pe, "simd": simd, "acc_bits": acc,
            "lut": lanes * m["lut"] + simd * m["cast_lut"] + 150, "dsp": lanes * m["dsp"] + rq_dsp,
            "ff": lanes * m["ff"] + acc}


def graph_cost(graph: Graph, parallel: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """Per-layer and total LUT / DSP / FF of the conv/dense MACs of a quantized graph."""
    parallel = parallel or {}
    layers = [layer_cost(graph, n, *parallel.get(n.name, (1, 1))) for n in graph.nodes
              if n.op in ("conv2d", "dense") and "weight" in n.params]
    total = {k: int(sum(r[k] for r in layers)) for k in ("lut", "dsp", "ff")}
    return {"layers": layers, "total": total}


# --- the per-layer picker -------------------------------------------------------------------------

def candidates(bits: list[int]) -> list[tuple[str, str | int]]:
    """("int", b) and ("mf", name) for each width."""
    out: list[tuple[str, str | int]] = []
    for b in bits:
        out.append(("int", b))
        out.append(("mf", mf.for_bits(b).name))
    return out


def _fake_weights(w: np.ndarray, cand: tuple[str, str | int]) -> np.ndarray:
    from hilc.compiler import arith

    kind, val = cand
    shape = (-1,) + (1,) * (w.ndim - 1)
    if kind == "int":
        q, s = arith.quantize_weights_per_channel(w, int(val))
        return q.astype(np.float64) * s.reshape(shape)
    fmt = mf.parse(str(val))
    codes, s = mf.quantize_weights(fmt, w)
    return mf.decode(fmt, codes) * s.reshape(shape)


def layer_errors(graph: Graph, samples: np.ndarray, cands: list[tuple[str, str | int]]) -> dict[str, dict]:
    """Accuracy proxy: for every conv/dense of a calibrated float graph and every candidate, the
    relative squared error of the layer's output on the calibration samples when only that
    layer's weights take the candidate's grid (inputs as the float model computes them)."""
    from hilc.compiler import ptq
    from hilc.sim.simulator import to_physical

    x = to_physical(graph, graph.inputs[0], np.asarray(samples, np.float32))
    out: dict[str, dict] = {}

    def visit(rn: Node, cn: Node, x_ref: np.ndarray, _x_cur: np.ndarray) -> None:
        y = ptq._linear(graph, rn, x_ref).astype(np.float64)
        energy = float((y ** 2).sum()) or 1.0
        w = graph.param(rn, "weight").astype(np.float64)
        errs = {}
        g2 = graph.copy()
        for c in cands:
            g2.constants[rn.params["weight"]] = _fake_weights(w, c).astype(np.float32)
            yq = ptq._linear(g2, rn, x_ref).astype(np.float64)
            errs[f"{c[0]}:{c[1]}"] = float(((yq - y) ** 2).sum() / energy)
        out[rn.name] = errs

    ptq._walk(graph, graph, x, visit)
    return out


def pick(graph: Graph, errors: dict[str, dict], costs: dict[str, dict], budget: float) -> dict[str, str]:
    """The choice per layer (candidate key) minimising the summed LUT-equivalent cost (a DSP
    counted as 100 LUTs) with the summed error proxy at most ``budget``: a small ILP
    (``scipy.optimize.milp``; one binary per layer and candidate, one choice per layer)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    names = list(errors)
    keys = [(n, k) for n in names for k in errors[n]]
    c = np.array([costs[n][k]["lut"] + 100 * costs[n][k]["dsp"] for n, k in keys], np.float64)
    e = np.array([errors[n][k] for n, k in keys], np.float64)
    one = np.array([[1.0 if kn == n else 0.0 for kn, _ in keys] for n in names])
    res = milp(c, integrality=np.ones(len(keys)), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(one, 1, 1), LinearConstraint(e[None, :], -np.inf, budget)])
    if not res.success:  # the budget is below every choice: take the most accurate per layer
        return {n: min(errors[n], key=errors[n].get) for n in names}
    chosen = np.round(res.x).astype(bool)
    return {n: k for (n, k), on in zip(keys, chosen, strict=True) if on}


def apply_choice(graph: Graph, choice: dict[str, str]) -> Graph:
    """A float graph with each layer's pick: ``int:B`` sets weight_bits, ``mf:ExMy`` the format."""
    from hilc.compiler import ptq

    g = ptq.set_weight_bits(graph, {n: int(k.split(":")[1]) for n, k in choice.items() if k.startswith("int:")})
    return mf.set_formats(g, {n: k.split(":")[1] for n, k in choice.items() if k.startswith("mf:")} or None)


def candidate_costs(graph: Graph, cands: list[tuple[str, str | int]],
                    parallel: dict[str, tuple[int, int]] | None = None) -> dict[str, dict]:
    """layer -> candidate key -> layer_cost, each candidate quantized on the whole calibrated
    float graph (the accumulator width depends on the quantized weights)."""
    from hilc.compiler import ptq
    from hilc.compiler.quantize import quantize

    out: dict[str, dict] = {}
    for kind, val in cands:
        g = ptq.set_weight_bits(graph, int(val)) if kind == "int" else mf.set_formats(graph, str(val))
        for r in graph_cost(quantize(g), parallel)["layers"]:
            out.setdefault(r["name"], {})[f"{kind}:{val}"] = r
    return out


AUTO_BITS = [3, 4, 5, 6, 7, 8]


def auto_fpga(graph: Graph, samples: np.ndarray, error_ratio: float = 1.0,
              bits: list[int] | None = None) -> tuple[Graph, dict[str, Any]]:
    """``--precision auto-fpga``: per conv/dense, integer or minifloat weights of 3..8 bits, the
    cheapest (LUT + 100 DSP per MAC lane, one lane per layer) whose summed output-error proxy is
    at most ``error_ratio`` times that of int8 everywhere. Returns the float graph with the choice
    applied and the report entry (choice, budget, per-layer errors and costs)."""
    cands = candidates(bits or AUTO_BITS)
    errs = layer_errors(graph, np.asarray(samples)[:64], cands)
    costs = candidate_costs(graph, cands)
    budget = error_ratio * sum(e["int:8"] for e in errs.values())
    choice = pick(graph, errs, costs, budget)
    info = {"error_budget": budget, "error_ratio": error_ratio, "choice": choice,
            "error": float(sum(errs[n][k] for n, k in choice.items())),
            "cost": {k: int(sum(costs[n][choice[n]][k] for n in choice)) for k in ("lut", "dsp", "ff")},
            "int8_cost": {k: int(sum(costs[n]["int:8"][k] for n in choice)) for k in ("lut", "dsp", "ff")}}
    return apply_choice(graph, choice), info
