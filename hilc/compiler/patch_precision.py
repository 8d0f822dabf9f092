"""Patch-branch precision (QuantMCU, Wang et al. 2023): value-driven patch classification and the
value-driven bit-width search, on top of a patch schedule (hilc/compiler/patches.py).

A patch whose input window holds outliers keeps the layer-wise widths (8-bit for most stage
feature maps) on the branch that follows; every other patch runs a *low-bit branch* of the patch
stage whose feature-map widths the search lowers. Both branches are precomputed at compile time:
the low branch is the same stage quantized with the lower activation widths (its weights are
the same integers; biases, multipliers, zero points and clamps differ: separate constants).
Both end in the split tensor's own quantization, so the layers after the stage are unchanged.

Classification is an integer comparison, identical in the simulator and the generated C: a
patch is *hot* when ``max |x - zp_in| > threshold`` over the graph-input window it reads. The
threshold comes from calibration: the quantile ``1 - outlier_rate`` of the per-patch window
maxima over the calibration inputs (so about ``outlier_rate`` of the calibration patches keep the
high branch).

Value-driven search: the candidates are the stage's feature maps (activation roots inside the
stage; not the graph input, not the split tensor) at each width below their current one. A
candidate's score is the BitOps it saves on the low branch (all patches' windows) divided by an
entropy-based accuracy proxy: the relative drop of the Shannon entropy of the feature map's codes
(float activations on the calibration inputs quantized at the candidate width against at its
current width). Each iteration fixes the best-scoring feature map's width; the search stops when
no candidate keeps the summed entropy drop within ``entropy_budget``.

``graph.meta["patch_precision"]``: ``threshold``, ``input_zero_point``, ``windows`` (per patch
``[y0, y1, x0, x1]`` of the graph input), ``low_nodes`` (the low branch's stage nodes as JSON,
named ``<node>_lowbr``; their constants sit in ``graph.constants``) and the report fields.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from hilc.compiler.ir import Graph, Node
from hilc.compiler.ops import OPS
from hilc.compiler.ops.base import bitops, node_bitops
from hilc.errors import HilcError

LOW_SUFFIX = "_lowbr"
MODES = ("off", "value")


# --- runtime: classification and the low branch ----------------------------------------------

def input_windows(graph: Graph) -> list[list[int]]:
    """Per patch, the bounding box ``[y0, y1, x0, x1]`` of the graph input the patch reads."""
    plan = graph.meta["patch"]
    x = graph.inputs[0]
    out = []
    for p in plan["patches"]:
        boxes = [r for node, layer in zip(graph.nodes, p["layers"], strict=False)
                 for t, r in zip(node.inputs, layer["in"], strict=True) if t == x]
        out.append([min(b[0] for b in boxes), max(b[1] for b in boxes), min(b[2] for b in boxes),
                    max(b[3] for b in boxes)])
    return out


def window_peaks(x: np.ndarray, windows: list[list[int]], zp: int) -> np.ndarray:
    """``[batch, patches]``: max |x - zp| over each patch's input window (int32, exact)."""
    d = np.abs(x.astype(np.int32) - zp)
    return np.stack([d[:, w[0]:w[1], w[2]:w[3]].reshape(len(x), -1).max(axis=1) for w in windows], axis=1)


def choose_threshold(peaks: np.ndarray, outlier_rate: float) -> int:
    """The integer threshold whose hot fraction on the calibration patches comes closest to
    ``outlier_rate`` (on ties the higher one: fewer hot patches): peaks repeat (a saturated window), so a plain
    quantile can land on the maximum and classify nothing."""
    cands = np.concatenate([[int(peaks.min()) - 1], np.unique(peaks)])
    rates = np.array([(peaks > t).mean() for t in cands])
    i = int(np.argmin(np.abs(rates - outlier_rate) - 1e-9 * np.arange(len(cands))))
    # the largest integer with that calibration fraction: only values beyond what cold patches held are hot
    return int(cands[i + 1]) - 1 if i + 1 < len(cands) else int(cands[i])


def hot_flags(graph: Graph, x: np.ndarray) -> np.ndarray:
    """``[batch, patches]`` bools: which patches take the high (layer-wise) branch."""
    pp = graph.meta["patch_precision"]
    return window_peaks(x, pp["windows"], pp["input_zero_point"]) > pp["threshold"]


def low_graph(graph: Graph) -> Graph:
    """The graph with the patch stage replaced by its low-bit branch (the stage is all the patch
    code looks at; the nodes after the stage are the shared ones)."""
    key = "patch_precision:low-graph"
    if key not in graph.cache:
        pp = graph.meta["patch_precision"]
        k = graph.meta["patch"]["split_index"]
        low = [Node(n["name"], n["op"], list(n["inputs"]), list(n["outputs"]), n["attrs"], dict(n["params"]),
                    n.get("onnx_name", "")) for n in pp["low_nodes"]]
        g = Graph(graph.name, low + graph.nodes[k + 1:], graph.tensors, graph.constants, list(graph.inputs),
                  list(graph.outputs), {"patch": graph.meta["patch"]})
        g.cache = graph.cache  # low nodes have their own names, so their prepared weights do not clash
        graph.cache[key] = g
    return graph.cache[key]


# --- BitOps ------------------------------------------------------------------------------------

def _stage_macs(graph: Graph) -> list[list[int]]:
    """Per patch, per stage node: the MACs of that patch's window."""
    from hilc.compiler.patches import _window_macs

    plan = graph.meta["patch"]
    k = plan["split_index"]
    full = [OPS[n.op].macs(n, graph) for n in graph.nodes[: k + 1]]
    return [[_window_macs(graph, n, layer, f) for n, layer, f in zip(graph.nodes[: k + 1], p["layers"], full,
                                                                     strict=True)] for p in plan["patches"]]


def branch_bitops(graph: Graph, bits: dict[str, int]) -> int:
    """BitOps of one patch stage run over all patches with stage activations at ``bits``."""
    k = graph.meta["patch"]["split_index"]
    total = 0
    for per_patch in _stage_macs(graph):
        for node, m in zip(graph.nodes[: k + 1], per_patch, strict=True):
            total += node_bitops(node, graph, m, bits.get(node.inputs[0], graph.tensors[node.inputs[0]].quant.bits))
    return total


def rest_bitops(graph: Graph) -> int:
    k = graph.meta["patch"]["split_index"]
    return sum(node_bitops(n, graph) for n in graph.nodes[k + 1:])


# --- the search --------------------------------------------------------------------------------

def _entropy(codes: np.ndarray) -> float:
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _codes(v: np.ndarray, lo: float, hi: float, bits: int) -> np.ndarray:
    from hilc.compiler.arith import choose_qparams, qrange

    s, zp = choose_qparams(min(lo, 0.0), max(hi, 0.0), bits)
    qmin, qmax = qrange(bits)
    return np.clip(np.rint(v / s) + zp, qmin, qmax)


def check_options(mode: str, patch: str) -> None:
    if mode not in MODES:
        raise HilcError(f"--patch-precision: expected off or value, got '{mode}'")
    if mode != "off" and patch == "off":
        raise HilcError("--patch-precision value needs a patch schedule (--patch auto or SPLIT:N) with a patch stage")


def apply_patch_precision(q: Graph, g: Graph, samples: np.ndarray | None, mode: str = "value",
                          outlier_rate: float = 0.2, entropy_budget: float = 1.0,
                          max_samples: int = 64, cluster: str | None = None) -> tuple[Graph, dict[str, Any]]:
    """The pass: ``q`` the quantized, patch-scheduled graph, ``g`` the float graph it was
    quantized from (bit-widths assigned). Returns ``q`` with ``meta['patch_precision']`` and the
    report's ``patch_precision`` section. ``cluster`` (``hilc[ray]``): the candidates' clipped
    ranges and code entropies are computed on Ray (a task per feature map; the same numbers)."""
    if mode not in MODES:
        raise HilcError(f"--patch-precision: expected off or value, got '{mode}'")
    if mode == "off":
        return q, {}
    if not q.meta.get("patch"):
        raise HilcError("--patch-precision value needs a patch schedule (--patch auto or SPLIT:N) with a patch stage")
    if samples is None:
        raise HilcError("--patch-precision value classifies patches with a threshold from calibration: give --calib")
    if not 0.0 <= outlier_rate < 1.0:
        raise HilcError(f"patch precision: outlier rate must be in [0, 1), got {outlier_rate}")
    from hilc.compiler.arith import quantize_host
    from hilc.compiler.mixed import _followers, analyse, prepare_subbyte
    from hilc.compiler.quantize import quantize
    from hilc.sim.simulator import run_float, to_physical

    t0 = time.perf_counter()
    plan = q.meta["patch"]
    k = plan["split_index"]
    stage = q.nodes[: k + 1]
    split, x_name = plan["split"], q.inputs[0]
    if "subbyte_ranges" not in g.meta:
        g = prepare_subbyte(g, samples, cluster=cluster)
    xs = np.asarray(samples, np.float32)[:max_samples]
    xf = to_physical(g, x_name, xs)
    qi = q.tensors[x_name].quant
    xq = quantize_host(xf, qi.scale, qi.zero_point, qi.bits)
    windows = input_windows(q)
    peaks = window_peaks(xq, windows, qi.zero_point)
    threshold = choose_threshold(peaks, outlier_rate)
    hot = peaks > threshold

    # candidates: stage feature maps (roots) whose every follower stays inside the stage
    stage_out = {n.outputs[0] for n in stage}
    space = analyse(g, extended=True)
    cur = {t: q.tensors[t].quant.bits for t in stage_out}
    cands = [r for r in space.roots if r in stage_out and r != split
             and all(t in stage_out and t != split for t in _followers(g, r))]
    vals: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(0)

    def observe(name: str, v: np.ndarray) -> None:
        if name in cands:
            flat = v.reshape(-1)
            vals[name] = flat[rng.integers(0, flat.size, 1 << 16)] if flat.size > 1 << 16 else flat

    run_float(g, {x_name: xf}, observe=observe)
    ranges = g.meta.get("calibration", {})
    sub = g.meta.get("subbyte_ranges", {})

    def rng_at(t: str, b: int) -> tuple[float, float]:
        return tuple(sub[t][str(b)]) if b < 8 and str(b) in sub.get(t, {}) else tuple(ranges[t])

    ent: dict[tuple[str, int], float] = {}
    widths = {t: [b for b in space.abits if b <= cur[t] and (b == 8 or str(b) in sub.get(t, {}))] for t in cands}
    if cluster is not None:
        from hilc.distributed import code_entropies

        got = code_entropies([(vals[t], [(b, *rng_at(t, b)) for b in widths[t]]) for t in cands], cluster)
        ent = {(t, b): e[b] for t, e in zip(cands, got, strict=True) for b in widths[t]}
    else:
        for t in cands:
            for b in widths[t]:
                ent[(t, b)] = _entropy(_codes(vals[t].astype(np.float64), *rng_at(t, b), b))
    low_bits: dict[str, int] = {}
    spent = 0.0
    history = []
    while True:
        bits_now = {f: low_bits.get(r, cur[r]) for r in cands for f in _followers(g, r)}
        base = branch_bitops(q, bits_now)
        best = None
        for t in cands:
            if t in low_bits:
                continue
            h0 = ent.get((t, cur[t]))
            for b in space.abits:
                if b >= cur[t] or (t, b) not in ent or not h0:
                    continue
                loss = max(0.0, (h0 - ent[(t, b)]) / h0)
                if spent + loss > entropy_budget:
                    continue
                trial = dict(bits_now)
                trial.update({f: b for f in _followers(g, t)})
                saved = base - branch_bitops(q, trial)
                if saved <= 0:
                    continue
                score = saved / (loss + 1e-3)
                if best is None or score > best[0]:
                    best = (score, t, b, saved, loss)
        if best is None:
            break
        _, t, b, saved, loss = best
        low_bits[t] = b
        spent += loss
        history.append({"feature_map": t, "bits": b, "bitops_saved": int(saved), "entropy_drop": round(loss, 5)})

    # the low branch: the float graph quantized with the searched widths, stage nodes only
    q2 = q.copy()
    low_nodes: list[dict[str, Any]] = []
    if low_bits:
        g_low = g.copy()
        acts = dict(g_low.meta.get("act_bits", {}))
        for r, b in low_bits.items():
            for f in _followers(g, r):
                acts[f] = b
        g_low.meta["act_bits"] = acts
        ql = quantize(g_low)
        by_name = {n.name: n for n in ql.nodes}  # ql keeps the import order; q may be reordered
        if any(n.name not in by_name for n in stage) or ql.tensors[split].quant != q.tensors[split].quant:
            raise HilcError(f"patch precision: the low-bit branch does not end in split tensor '{split}''s "
                            "quantization")
        for hi in stage:
            lo = by_name[hi.name]
            params = {}
            for role, cname in lo.params.items():
                arr = ql.constants[cname]
                hname = hi.params.get(role)
                if hname is not None and np.array_equal(q.constants[hname], arr) and \
                        q.constants[hname].dtype == arr.dtype:
                    params[role] = hname  # same integers (the weights): one array
                else:
                    params[role] = q2.add_constant(f"{cname}{LOW_SUFFIX}", arr)
            low_nodes.append({"name": hi.name + LOW_SUFFIX, "op": lo.op, "inputs": list(lo.inputs),
                              "outputs": list(lo.outputs), "attrs": lo.attrs, "params": params,
                              "onnx_name": lo.onnx_name})
    else:  # nothing lowered: both branches are the layer-wise stage
        low_nodes = [{"name": n.name + LOW_SUFFIX, "op": n.op, "inputs": list(n.inputs), "outputs": list(n.outputs),
                      "attrs": n.attrs, "params": dict(n.params), "onnx_name": n.onnx_name} for n in stage]

    hi_bits = {f: cur[f] for f in stage_out}
    lo_map = dict(hi_bits)
    for r, b in low_bits.items():
        for f in _followers(g, r):
            lo_map[f] = b
    per_patch_macs = _stage_macs(q)
    rest = rest_bitops(q)
    # per patch: high and low branch BitOps
    hi_p = [sum(node_bitops(n, q, m, hi_bits.get(n.inputs[0])) for n, m in zip(stage, pm, strict=True))
            for pm in per_patch_macs]
    lo_p = [sum(node_bitops(n, q, m, lo_map.get(n.inputs[0])) for n, m in zip(stage, pm, strict=True))
            for pm in per_patch_macs]
    frac = hot.mean(axis=0)
    expected = rest + sum(f * h + (1 - f) * lo for f, h, lo in zip(frac, hi_p, lo_p, strict=True))
    layerwise = rest + sum(hi_p)
    int8 = sum(bitops(m, 8) for pm in per_patch_macs for m in pm) + \
        sum(bitops(OPS[n.op].macs(n, q), 8) for n in q.nodes[k + 1:])

    def widths(bits: dict[str, int]) -> dict[str, dict[str, int]]:
        return {n.name: {"weight_bits": int(n.attrs.get("weight_bits", 8)) if n.op in ("conv2d", "dense") else None,
                         "in_bits": int(bits.get(n.inputs[0], q.tensors[n.inputs[0]].quant.bits))} for n in stage}

    info = {
        "mode": mode, "threshold": threshold, "input_zero_point": int(qi.zero_point), "outlier_rate": outlier_rate,
        "entropy_budget": entropy_budget, "entropy_drop": round(spent, 5), "search": history,
        "calibration_hot_fraction": round(float(hot.mean()), 4), "calibration_samples": int(len(xq)),
        "branches": {"high": widths(hi_bits), "low": widths(lo_map)},
        "patches": [{"tile": p["tile"], "input_window": w, "calibration_hot_fraction": round(float(f), 4),
                     "bitops_high": int(h), "bitops_low": int(lo)}
                    for p, w, f, h, lo in zip(plan["patches"], windows, frac, hi_p, lo_p, strict=True)],
        "bitops_int8": int(int8), "bitops_layerwise": int(layerwise), "bitops_all_low": int(rest + sum(lo_p)),
        "bitops_expected": int(round(expected)),
        "reduction_over_layerwise": round(layerwise / max(1.0, expected), 4),
        "reduction_over_int8": round(int8 / max(1.0, expected), 4),
        "search_seconds": round(time.perf_counter() - t0, 3),
    }
    q2.meta["patch_precision"] = {"threshold": threshold, "input_zero_point": int(qi.zero_point),
                                  "windows": windows, "low_nodes": low_nodes}
    q2.cache = {}
    return q2, info


def expected_bitops(graph: Graph, info: dict[str, Any], qx: np.ndarray) -> dict[str, Any]:
    """BitOps per inference on ``qx`` (int8 physical inputs) with the run-time dispatch, against
    the layer-wise figure: what patch precision measures on held-out data."""
    hot = hot_flags(graph, qx)
    hi = np.array([p["bitops_high"] for p in info["patches"]])
    lo = np.array([p["bitops_low"] for p in info["patches"]])
    rest = info["bitops_layerwise"] - int(hi.sum())
    per = rest + (hot * hi + (~hot) * lo).sum(axis=1)
    return {"hot_fraction": round(float(hot.mean()), 4), "bitops_mean": float(per.mean()),
            "reduction_over_layerwise": round(info["bitops_layerwise"] / float(per.mean()), 4)}
