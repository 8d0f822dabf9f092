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
(a DSP48 takes 18 x 27 signed; integer layers: the template's 33 x 31-bit product, 4 DSPs), plus
150 LUTs of rounding and clamping. A layer with PE x SIMD lanes (the HLS design's parallelism)
costs lanes x one MAC, SIMD input casts, one requantizer. The HLS estimate (estimate.py) prices
minifloat lanes by these rules too; it adds the layer's ROMs, line buffers and control.
These are estimates for comparing formats, not synthesis results.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from hilc.compiler import minifloat as mf
from hilc.compiler.ir import Graph, Node
from hilc.targets.hls.lower import acc_bits_for

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


def requant_dsp(acc_bits: int, mult_bits: int) -> int:
    """DSPs of the dyadic requantizer acc x b: a DSP48 multiplies 18 x 27 signed."""
    return math.ceil(acc_bits / 17) * math.ceil(mult_bits / 26)


def layer_cost(graph: Graph, node: Node, pe: int = 1, simd: int = 1) -> dict[str, Any]:
    """Cost of a quantized conv2d/dense with PE x SIMD lanes (the HLS layer's parallelism)."""
    a = node.attrs
    acc = acc_bits_for(node.attrs["acc_bound"])
    ab = graph.tensors[node.inputs[0]].quant.bits
    weight = a.get("format") or int(a.get("weight_bits", 8))
    m = mac_cost(weight, a.get("act_format") or ab, acc, ab)
    # the integer requantizer is the template's fixed ap_int<33> x ap_uint<31> product; the
    # minifloat one multiplies the wide accumulator by a multiplier narrowed to mult_bits
    rq_dsp = requant_dsp(acc, int(a.get("mult_bits", 31))) if a.get("format") else requant_dsp(33, 31)
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


def choice_label(key: str) -> str:
    """A candidate key as people read it: ``int:6`` -> ``int6``, ``mf:E2M1`` -> ``E2M1``."""
    kind, _, val = key.partition(":")
    return f"int{val}" if kind == "int" else val


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


def pick(graph: Graph | None, errors: dict[str, dict], costs: dict[str, dict], budget: float) -> dict[str, str]:
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
ADAROUND_ITERATIONS = 1000  # after the pick: a step count, not a time budget (same inputs, same model)
PTQ_SAMPLES = 128  # calibration samples the post-pick PTQ and its measurement use


def design_parallelism(graph: Graph, board: Any = None,
                       parallel: dict[str, tuple[int, int]] | None = None) -> dict[str, tuple[int, int]]:
    """PE x SIMD per conv/dense as the HLS backend chooses them (``codegen.choose_parallelism``: the
    user's ``parallel`` where given, the board's resource budget elsewhere) for the int8 design of a
    calibrated float graph: the parallelism the picker prices and the final design instantiates."""
    from hilc.compiler.quantize import quantize
    from hilc.targets.hls.codegen import generate_hls

    design = generate_hls(quantize(graph), board, parallel)
    return {r["name"]: (int(r["pe"]), int(r["simd"])) for r in design.estimate["layers"] if "pe" in r}


def pricing_parallelism(graph: Graph, board: Any, parallel: dict[str, tuple[int, int]] | None,
                        for_hls: bool) -> tuple[dict[str, tuple[int, int]], str]:
    """The PE x SIMD the picker prices with, and where it came from. For ``--target hls`` the design's
    (its errors stand: the design would fail the same way); for other targets the default FPGA
    board's design when the model lowers to it, else one lane per layer."""
    from hilc.errors import HilcError

    name = getattr(board, "name", board)
    if for_hls:
        return design_parallelism(graph, board, parallel), f"the HLS design for {name}"
    try:
        return design_parallelism(graph, board, parallel), f"the HLS design for {name}"
    except HilcError as e:
        return {}, f"one lane per layer ({name}: {e})"


def split_ptq(spec: str | list[str] | None) -> tuple[str, list[str]]:
    """``--ptq`` for ``--precision auto-fpga``: equalization (format-independent, it keeps the float
    function) runs before calibration and the pick; bias correction and learned rounding run after
    the pick, on the chosen grids (the split of ``minifloat.split_ptq_for_casts``). ``auto`` means
    all three (the pick may go below 8 bits)."""
    return mf.split_ptq_for_casts("all" if spec in (None, "auto") else spec, None)


def _cost_of(costs: dict[str, dict], choice: dict[str, str]) -> dict[str, int]:
    return {k: int(sum(costs[n][choice[n]][k] for n in choice)) for k in ("lut", "dsp", "ff")}


def pareto_points(errors: dict[str, dict], costs: dict[str, dict], bits: list[int],
                  chosen: dict[str, str]) -> dict[str, Any]:
    """Error proxy vs cost, from the measured per-layer errors and costs only (no extra compile):
    all-integer and all-minifloat at each width, the ILP's mixed picks at the budgets those uniform
    points set, and the chosen point. Error: the summed relative output error proxy (lower is
    better). ``pareto``: the labels no other point beats in both."""
    pts: list[dict[str, Any]] = []

    def add(label: str, kind: str, choice: dict[str, str]) -> None:
        c = _cost_of(costs, choice)
        pts.append({"label": label, "kind": kind, "error": float(sum(errors[n][choice[n]] for n in choice)),
                    **c, "choice": choice})

    for b in bits:
        add(f"int{b}", "int", {n: f"int:{b}" for n in errors})
        name = mf.for_bits(b).name
        add(name, "mf", {n: f"mf:{name}" for n in errors})
    seen = set()
    for budget in sorted({p["error"] for p in pts}):
        ch = pick(None, errors, costs, budget * (1 + 1e-9))
        key = tuple(sorted(ch.items()))
        if key not in seen and ch not in [p["choice"] for p in pts]:
            seen.add(key)
            add(f"mixed@{budget:.2g}", "mixed", ch)
    add("chosen", "mixed", chosen)

    def dominated(p: dict) -> bool:
        cp = p["lut"] + 100 * p["dsp"]
        return any(q["error"] <= p["error"] and q["lut"] + 100 * q["dsp"] <= cp
                   and (q["error"] < p["error"] or q["lut"] + 100 * q["dsp"] < cp) for q in pts)

    return {"metric": "summed layer output error proxy (lower is better)", "y": "error", "points": pts,
            "pareto": [p["label"] for p in pts if not dominated(p)], "chosen": "chosen"}


def _agreement(reference: Graph, graph: Graph, x: np.ndarray) -> dict[str, float]:
    """The quantized ``graph`` against the float ``reference`` on physical inputs x: top-1 agreement
    and the output's mean squared error relative to the float output's energy."""
    from hilc.compiler.arith import dequantize_host, quantize_host
    from hilc.compiler.quantize import quantize
    from hilc.sim.simulator import run_float, run_int_batched

    q = quantize(graph)
    qi, qo = q.tensors[q.inputs[0]].quant, q.tensors[q.outputs[0]].quant
    y = dequantize_host(run_int_batched(q, quantize_host(x, qi.scale, qi.zero_point, qi.bits)), qo.scale,
                        qo.zero_point).reshape(len(x), -1).astype(np.float64)
    ref = run_float(reference, {reference.inputs[0]: x})[reference.outputs[0]].reshape(len(x), -1).astype(np.float64)
    return {"top1_agreement": float((y.argmax(1) == ref.argmax(1)).mean()),
            "relative_mse": float(((y - ref) ** 2).mean() / (float((ref ** 2).mean()) or 1.0))}


def ptq_after_pick(reference: Graph, picked: Graph, samples: np.ndarray, methods: list[str],
                   iterations: int = ADAROUND_ITERATIONS) -> tuple[Graph, dict[str, Any]]:
    """Bias correction and learned rounding (``ptq.correct_layers``) on the chosen grids, with a
    fixed AdaRound step count (deterministic), against the calibrated float graph; AdaRound only
    where the pick left int8 (int8 layers are bias-corrected). Measures the quantized model
    against float on the calibration samples before and after."""
    import time

    from hilc.compiler.ptq import correct_layers
    from hilc.sim.simulator import to_physical

    methods = [m for m in methods if m in ("bias-correct", "adaround")]
    if not methods:
        return picked, {}
    x = to_physical(reference, reference.inputs[0], np.asarray(samples, np.float32)[:PTQ_SAMPLES])
    before = _agreement(reference, picked, x)
    lowered = {n.name for n in picked.nodes if n.op in ("conv2d", "dense") and "weight" in n.params
               and (n.attrs.get("format") or int(n.attrs.get("weight_bits", 8)) < 8)}
    t = time.perf_counter()
    g = correct_layers(reference, picked, x, bias_correct="bias-correct" in methods,
                       adaround="adaround" in methods and bool(lowered), budget_s=None, iterations=iterations,
                       adaround_only=lowered)
    seconds = time.perf_counter() - t
    after = _agreement(reference, g, x)
    g.meta["ptq"] = methods
    return g, {"methods": methods, "adaround_iterations": iterations if "adaround" in methods else 0,
               "adaround_layers": sorted(lowered) if "adaround" in methods else [], "samples": len(x),
               "seconds": round(seconds, 3), "before": before, "after": after,
               "note": "measured on the calibration samples against the float model"}


def auto_fpga(graph: Graph, samples: np.ndarray, error_ratio: float = 1.0, bits: list[int] | None = None,
              parallel: dict[str, tuple[int, int]] | None = None,
              ptq_methods: list[str] | None = None,
              parallel_source: str | None = None) -> tuple[Graph, dict[str, Any]]:
    """``--precision auto-fpga``: per conv/dense, integer or minifloat weights of 3..8 bits, the
    cheapest (LUT + 100 DSP, each layer priced with its ``parallel`` PE x SIMD lanes: the HLS
    design's) whose summed output-error proxy is at most ``error_ratio`` times that of int8
    everywhere; then ``ptq_methods`` (bias-correct, adaround) on the chosen grids. Returns the float
    graph with the choice applied and the report entry (choice, budget, per-layer errors and costs,
    the Pareto front of the measured points, the PTQ's measured effect)."""
    bits = bits or AUTO_BITS
    parallel = parallel or {}
    cands = candidates(bits)
    errs = layer_errors(graph, np.asarray(samples)[:64], cands)
    costs = candidate_costs(graph, cands, parallel)
    budget = error_ratio * sum(e["int:8"] for e in errs.values())
    choice = pick(graph, errs, costs, budget)
    info = {"error_budget": budget, "error_ratio": error_ratio, "choice": choice,
            "error": float(sum(errs[n][k] for n, k in choice.items())),
            "cost": _cost_of(costs, choice), "int8_cost": _cost_of(costs, {n: "int:8" for n in choice}),
            "parallel": {n: list(parallel.get(n, (1, 1))) for n in choice},
            "parallel_source": parallel_source or ("given" if parallel else "one lane per layer"),
            "layers": [{"name": n, "choice": k, "pe": costs[n][k]["pe"], "simd": costs[n][k]["simd"],
                        "lanes": costs[n][k]["pe"] * costs[n][k]["simd"], "acc_bits": costs[n][k]["acc_bits"],
                        "lut": costs[n][k]["lut"], "dsp": costs[n][k]["dsp"], "ff": costs[n][k]["ff"],
                        "error": errs[n][k]} for n, k in choice.items()],
            "pareto": pareto_points(errs, costs, bits, choice)}
    g = apply_choice(graph, choice)
    if ptq_methods:
        g, info["ptq"] = ptq_after_pick(graph, g, samples, ptq_methods)
    return g, info


def check_estimate(info: dict[str, Any], estimate: dict[str, Any]) -> None:
    """Put the HLS backend's estimate of each picked layer beside the cost model's price in
    ``info['layers']`` (``hls_lut``, ``hls_dsp``) and the totals in ``info['hls_estimate']``.
    The estimate also counts the layer's ROMs, line buffers and control, which the cost model
    leaves out; the multiply-accumulate lanes and requantizers are priced by the same rules."""
    rows = {r["name"]: r for r in estimate.get("layers", [])}
    for la in info["layers"]:
        r = rows.get(la["name"])
        if r is not None:
            la.update(hls_lut=int(r["lut"]), hls_dsp=int(r["dsp"]), hls_pe=int(r["pe"]), hls_simd=int(r["simd"]))
    done = [la for la in info["layers"] if "hls_lut" in la]
    tot = {"lut": sum(la["hls_lut"] for la in done), "dsp": sum(la["hls_dsp"] for la in done)}
    info["hls_estimate"] = {"conv_dense": tot, "design_total": {k: estimate["total"][k] for k in ("lut", "dsp")},
                            "cost_model": {k: sum(la[k] for la in done) for k in ("lut", "dsp")},
                            "same_parallelism": all((la["pe"], la["simd"]) == (la["hls_pe"], la["hls_simd"])
                                                    for la in done)}
