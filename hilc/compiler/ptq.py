"""Post-training quantization passes on the float graph: they change constants, never arithmetic.

* ``equalize`` (cross-layer equalization, Nagel et al. 2019): for a conv/dense whose output
  feeds, through a ReLU (or nothing), exactly one other conv/dense, output channel ``i`` of the
  first is divided by ``s_i`` and input channel ``i`` of the second multiplied by it, with
  ``s_i = sqrt(r1_i / r2_i)`` so both per-channel weight ranges become ``sqrt(r1_i * r2_i)``.
  ReLU is positively homogeneous, so the float function is unchanged.
* ``bias-correct``: each layer's bias absorbs the mean output shift its weight quantization
  causes, measured on the calibration inputs as the quantized model so far sees them (layers
  are processed in order, so a layer also corrects the shift its inputs already carry).
* ``adaround`` (Nagel et al. 2020): each weight is rounded up or down, chosen to minimise the
  layer's output error on the calibration inputs. The error is quadratic in the weights, so
  it is written once as a Gram matrix ``X^T X`` and each Adam step costs ``O * K^2``
  (independent of the number of samples); a rectified-sigmoid relaxation is pushed to 0/1 by
  an annealed regulariser, then rounded. Before that, each output channel's scale is chosen
  among shrinkings of max|w| by the same output error (clipping a few large weights buys
  finer steps: AdaQuant's point, and what matters most at 4 bits and below). A budget in
  seconds becomes a step count at a nominal speed (``NOMINAL_RATE`` multiply-adds per second, a
  constant, not the clock): every layer runs the same number of steps, so the whole run takes
  about the budget on an unloaded core and the same inputs give the same integers on any machine.
* ``synthesize_inputs`` (data-free calibration, ZeroQ, Cai et al. 2020): inputs optimised so
  that every BatchNorm-folded layer's pre-activation output has the per-channel mean and
  standard deviation its BatchNorm recorded (``graph.meta['bn_stats']``, kept by the importer).
  Without BatchNorm statistics, the fallback is smooth random images (low-resolution uniform
  noise, upsampled) spanning an input range the caller gives (default ``[0, 1]``).

The results go to the float graph: adjusted float weights and biases, and for rounded layers
the grid itself (``attrs['w_scale']``, ``attrs['w_scale_bits']``), so ``quantize`` reproduces
the chosen integers exactly. The passes read ``attrs['weight_bits']`` (default 8) as it stands
when they run.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hilc.compiler import arith
from hilc.compiler.ir import Graph, Node
from hilc.compiler.ops.conv import windows
from hilc.errors import HilcError
from hilc.sim.simulator import to_physical

METHODS = ("equalize", "bias-correct", "adaround")
LINEAR_OPS = ("conv2d", "dense")
STEP_OVERHEAD = 300_000  # numpy's fixed cost of one AdaRound step, in multiply-adds (roughly)
NOMINAL_RATE = 1.0e9  # multiply-adds per second a time budget converts at (steps, not a clock)
MIN_STEPS = 200  # the annealing needs at least this many
CHUNK = 16  # samples per step when walking the graphs: bounds the im2col copies


def _single_blas(fn: Callable) -> Callable:
    """Run with single-threaded BLAS: these matrices are small, and threads fighting over a
    busy machine's cores made them several times slower (measured)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapper


# --- selection --------------------------------------------------------------------------------

def parse_methods(spec: str | Sequence[str] | None, graph: Graph | None = None) -> list[str]:
    """``"equalize,bias-correct,adaround"``, ``"all"``, ``"none"`` or ``"auto"`` (the default:
    all three when some layer has weights below 8 bits, none otherwise)."""
    if spec is None:
        spec = "auto"
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    items = [s for s in items if s]
    if items in (["none"], []):
        return []
    if items == ["all"]:
        return list(METHODS)
    if items == ["auto"]:
        low = graph is not None and any(n.attrs.get("weight_bits", 8) < 8 for n in linear_nodes(graph))
        return list(METHODS) if low else []
    bad = [s for s in items if s not in METHODS]
    if bad:
        raise HilcError(f"--ptq: unknown method '{bad[0]}' (choose from {', '.join(METHODS)}, all, none, auto)")
    return [m for m in METHODS if m in items]  # fixed order: equalize, then per-layer passes


def linear_nodes(graph: Graph) -> list[Node]:
    return [n for n in graph.nodes if n.op in LINEAR_OPS and "weight" in n.params]


def set_weight_bits(graph: Graph, bits: int | dict[str, int]) -> Graph:
    """A copy with ``attrs['weight_bits']`` set on every conv/dense (an int) or on the named
    nodes (a dict node name -> bits). ``quantize`` honours it (symmetric, ``2**(bits-1)-1``)."""
    g = graph.copy()
    for n in linear_nodes(g):
        b = bits.get(n.name) if isinstance(bits, dict) else bits
        if b is not None:
            if not 2 <= int(b) <= 8:
                raise HilcError(f"{n.name}: weight bits must be 2..8, got {b}")
            n.attrs["weight_bits"] = int(b)
    return g


# --- cross-layer equalization -----------------------------------------------------------------

def _relu_like(node: Node) -> bool:
    """Positively homogeneous activation: none or ReLU (ReLU6 / Clip bounds would move)."""
    lo, hi = node.attrs.get("act_lo"), node.attrs.get("act_hi")
    return hi is None and (lo is None or lo == 0.0)


def _in_channel_ranges(graph: Graph, node: Node) -> np.ndarray:
    """max |w| over everything that reads each input channel of a conv/dense."""
    w = np.abs(graph.param(node, "weight"))
    if node.op == "dense":
        return w.max(axis=0)
    g = node.attrs["group"]
    o, _, _, cg = w.shape
    og = o // g
    return np.concatenate([w[i * og:(i + 1) * og].max(axis=(0, 1, 2)) for i in range(g)])


def _scale_in_channels(graph: Graph, node: Node, s: np.ndarray) -> np.ndarray:
    w = graph.param(node, "weight").astype(np.float64)
    if node.op == "dense":
        return w * s[None, :]
    g = node.attrs["group"]
    o, _, _, cg = w.shape
    og = o // g
    w = w.copy()
    for i in range(g):
        w[i * og:(i + 1) * og] *= s[i * cg:(i + 1) * cg].reshape(1, 1, 1, cg)
    return w


def equalize_pairs(graph: Graph) -> list[tuple[Node, Node]]:
    pairs = []
    for a in linear_nodes(graph):
        out = a.outputs[0]
        readers = graph.consumers(out)
        if out in graph.outputs or len(readers) != 1 or not _relu_like(a):
            continue
        b = readers[0]
        # the last axis of a's output is its channel axis (NHWC, or dense features), and b
        # reduces over that same axis, so channel i of a meets input channel i of b
        if b.op in LINEAR_OPS and b.inputs[0] == out:
            pairs.append((a, b))
    return pairs


def equalize(graph: Graph, iterations: int = 20) -> Graph:
    """Cross-layer equalization of every eligible pair (a few sweeps, so chains settle)."""
    g = graph.copy()
    pairs = [(a.name, b.name) for a, b in equalize_pairs(g)]
    by_name = {n.name: n for n in g.nodes}
    for _ in range(iterations if pairs else 0):
        for an, bn in pairs:
            a, b = by_name[an], by_name[bn]
            wa = g.param(a, "weight").astype(np.float64)
            r1 = np.abs(wa.reshape(wa.shape[0], -1)).max(axis=1)
            r2 = _in_channel_ranges(g, b).astype(np.float64)
            ok = (r1 > 0) & (r2 > 0)
            s = np.ones_like(r1)
            s[ok] = np.sqrt(r1[ok] / r2[ok])
            shape = (-1,) + (1,) * (wa.ndim - 1)
            g.constants[a.params["weight"]] = (wa / s.reshape(shape)).astype(np.float32)
            g.constants[a.params["bias"]] = (g.param(a, "bias").astype(np.float64) / s).astype(np.float32)
            g.constants[b.params["weight"]] = _scale_in_channels(g, b, s).astype(np.float32)
            for n in (a, b):
                n.attrs.pop("w_scale", None)  # a QDQ model's weight grid no longer fits
            stats = g.meta.get("bn_stats", {}).get(a.name)
            if stats is not None:  # the folded BatchNorm's output is rescaled with the channel
                g.meta["bn_stats"][a.name] = {"mean": (np.asarray(stats["mean"]) / s).tolist(),
                                              "std": (np.asarray(stats["std"]) / s).tolist()}
    return g


# --- per-layer data: inputs, pre-activation outputs -------------------------------------------

def _rows(graph: Graph, node: Node, x: np.ndarray) -> list[np.ndarray]:
    """The layer's input as one matrix per group: [M, K_g] with K_g in the weight's order."""
    if node.op == "dense":
        return [x.reshape(-1, x.shape[-1]).astype(np.float32)]
    a = node.attrs
    oh, ow = graph.tensors[node.outputs[0]].shape[1:3]
    v = windows(x.astype(np.float32), a["kernel"], a["strides"], a["dilations"], a["pads"], 0.0, (oh, ow))
    g = a["group"]
    cg = x.shape[3] // g
    kk = a["kernel"][0] * a["kernel"][1]
    return [np.ascontiguousarray(v[..., i * cg:(i + 1) * cg]).reshape(-1, kk * cg) for i in range(g)]


def _weights_by_group(graph: Graph, node: Node, w: np.ndarray) -> list[np.ndarray]:
    """[O_g, K_g] per group (dense: one group)."""
    if node.op == "dense":
        return [w.reshape(w.shape[0], -1)]
    g = node.attrs["group"]
    og = w.shape[0] // g
    return [w[i * og:(i + 1) * og].reshape(og, -1) for i in range(g)]


def _grid(node: Node, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The weight grid ``quantize`` will use: (per-channel scale, integer weights nearest, qmax).
    A minifloat layer (``attrs['format']``): the decoded grid values instead of integers."""
    if node.attrs.get("format"):
        from hilc.compiler import minifloat as mf

        fmt = mf.parse(node.attrs["format"])
        preset = node.attrs.get("w_scale")
        if preset is not None and node.attrs.get("w_scale_bits") == fmt.name:
            s = np.asarray(preset, np.float64)
        else:
            _, s = mf.quantize_weights(fmt, w)
        return s, mf.grid_values(fmt, w, s), fmt.max_value
    bits = node.attrs.get("weight_bits", 8)
    qmax = 2 ** (bits - 1) - 1
    preset = node.attrs.get("w_scale")
    if preset is not None and node.attrs.get("w_scale_bits", bits) == bits:
        s = np.asarray(preset, np.float64)
    else:
        _, s = arith.quantize_weights_per_channel(w.astype(np.float64), bits)
    q = np.clip(np.rint(w / s.reshape((-1,) + (1,) * (w.ndim - 1))), -qmax, qmax)
    return s, q, qmax


def fake_quantized(graph: Graph) -> Graph:
    """The float graph with every conv/dense weight replaced by its dequantized integer grid
    value: the weight-quantization error alone, in float."""
    g = graph.copy()
    for n in linear_nodes(g):
        w = g.param(n, "weight").astype(np.float64)
        s, q, _ = _grid(n, w)
        g.constants[n.params["weight"]] = (q * s.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
    return g


def _pin(graph: Graph, node: Node, q: np.ndarray, s: np.ndarray, bias: np.ndarray) -> None:
    """Write the chosen integers as float weights on their grid, and the grid itself."""
    shape = (-1,) + (1,) * (q.ndim - 1)
    graph.constants[node.params["weight"]] = (q * s.reshape(shape)).astype(np.float32)
    graph.constants[node.params["bias"]] = bias.astype(np.float32)
    node.attrs["w_scale"] = [float(v) for v in s]
    node.attrs["w_scale_bits"] = node.attrs.get("format") or node.attrs.get("weight_bits", 8)


def _walk(reference: Graph, current: Graph, x: np.ndarray,
          at_linear: Callable[[Node, Node, np.ndarray, np.ndarray], None],
          act_quant: Callable[[str, np.ndarray], np.ndarray] | None = None) -> None:
    """Run two graphs of the same structure node by node on physical inputs x (in chunks of
    samples); before each conv/dense, ``at_linear(ref_node, cur_node, ref_input, cur_input)``
    may change ``current``'s constants of that node, which the walk then uses. ``act_quant(name,
    value)``, if given, replaces each of ``current``'s tensors (fake activation quantization)."""
    from hilc.compiler.ops import OPS

    last_use = {t: i for i, n in enumerate(current.nodes) for t in n.inputs}
    envs: list[dict[str, np.ndarray]] = [{reference.inputs[0]: x}, {current.inputs[0]: x}]
    for i, (rn, cn) in enumerate(zip(reference.nodes, current.nodes, strict=True)):
        if cn.op in LINEAR_OPS and "weight" in cn.params:
            at_linear(rn, cn, envs[0][rn.inputs[0]], envs[1][cn.inputs[0]])
        for g, n, env in ((reference, rn, envs[0]), (current, cn, envs[1])):
            xs = [env[t] for t in n.inputs]
            parts = [OPS[n.op].eval_float(n, g, [v[s:s + CHUNK] for v in xs]) for s in range(0, len(x), CHUNK)]
            for k, name in enumerate(n.outputs):
                env[name] = np.concatenate([p[k] for p in parts]).astype(np.float32, copy=False)
                if act_quant is not None and env is envs[1]:
                    env[name] = act_quant(name, env[name])
            for t in n.inputs:
                if last_use.get(t) == i and t not in current.outputs:
                    env.pop(t, None)


def _chunks(n: int) -> range:
    return range(0, n, CHUNK)


@_single_blas
def layer_errors(reference: Graph, quantized: Graph, x: np.ndarray) -> dict[str, float]:
    """Per conv/dense: mean squared error of its pre-activation output in ``quantized`` (after
    weight fake-quantization, fed by the quantized layers before it) against ``reference``
    (float), over the output's variance."""
    out: dict[str, float] = {}

    def visit(rn: Node, cn: Node, x_ref: np.ndarray, x_q: np.ndarray) -> None:
        sq = s1 = s2 = 0.0
        m = 0
        for s in _chunks(len(x_ref)):
            y_ref = _linear(reference, rn, x_ref[s:s + CHUNK]).astype(np.float64)
            y_q = _linear(fq, cn, x_q[s:s + CHUNK]).astype(np.float64)
            sq += ((y_q - y_ref) ** 2).sum(axis=0)
            s1 += y_ref.sum(axis=0)
            s2 += (y_ref ** 2).sum(axis=0)
            m += len(y_ref)
        var = float((s2 / m - (s1 / m) ** 2).sum()) or 1.0
        out[rn.name] = float(sq.sum() / m / var)

    fq = fake_quantized(quantized)
    _walk(reference, fq, x, visit)
    return out


def _linear(graph: Graph, node: Node, x: np.ndarray) -> np.ndarray:
    """Pre-activation output as [M, O] (M = samples x output positions)."""
    w = graph.param(node, "weight").astype(np.float32)
    ys = [r @ wg.T for r, wg in zip(_rows(graph, node, x), _weights_by_group(graph, node, w), strict=True)]
    return np.concatenate(ys, axis=1) + graph.param(node, "bias").astype(np.float32)


# --- bias correction and learned rounding ---------------------------------------------------

_ZETA, _GAMMA = 1.1, -0.1


def _h(v: np.ndarray) -> np.ndarray:
    return np.clip(1.0 / (1.0 + np.exp(-v)) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)


def _adaround_group(gram: np.ndarray, cross: np.ndarray, y_energy: float, t: np.ndarray, s: np.ndarray,
                    qmax: int, seconds: float | None, iters: int = 2000, lam: float = 0.01,
                    min_iters: int = 200, grid: np.ndarray | None = None) -> np.ndarray:
    """Integer weights [O, K] near ``t`` (weights over their scale, within +-qmax), each rounded
    up or down to minimise sum_o (w_o G w_o - 2 w_o c_o) with w = s * q.

    ``gram`` = X^T X / M [K, K], ``cross`` = X^T Y / M [K, O]; ``y_energy`` normalises the loss.
    The step count is fitted to ``seconds`` after timing the first steps (at least
    ``min_iters``), so the regulariser's annealing always runs to its end; ``seconds=None``
    runs exactly ``iters`` steps (the same inputs give the same integers, however busy the
    machine)."""
    if grid is None:  # integers: the grid step is 1
        floor = np.floor(t)
        can_up = floor + 1 <= qmax
        step = 1.0
    else:  # a minifloat grid (sorted values): round between the neighbouring grid points
        lo = np.clip(np.searchsorted(grid, t, side="right") - 1, 0, len(grid) - 2)
        floor, step = grid[lo], grid[lo + 1] - grid[lo]
        can_up = np.ones(t.shape, bool)
    rest = np.clip((t - floor) / step, 1e-4, 1 - 1e-4)
    v = -np.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1.0)  # h(v) = rest
    m1, m2 = np.zeros_like(v), np.zeros_like(v)
    lr, b1, b2 = 0.05, 0.9, 0.999
    warm = iters // 5
    norm = 1.0 / max(y_energy, 1e-30)
    t0 = time.perf_counter()
    probe = 20
    it = 0
    while it < iters:
        if it == probe and seconds is not None:  # now we know the cost of a step: fit the schedule to the time given
            per_step = (time.perf_counter() - t0) / probe
            iters = int(min(iters, max(min_iters, seconds / max(per_step, 1e-9))))
            warm = iters // 5
        sig = 1.0 / (1.0 + np.exp(-v))
        hv = np.clip(sig * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0) * can_up
        wt = s[:, None] * (floor + hv * step)
        g_h = 2.0 * norm * (wt @ gram - cross.T) * s[:, None] * step  # d rec / d h
        if it >= warm:
            beta = 20.0 + (2.0 - 20.0) * (it - warm) / max(1, iters - warm)
            d = 2.0 * hv - 1.0
            g_h = g_h - lam * beta * np.abs(d) ** (beta - 1.0) * np.sign(d) * 2.0 / hv.size
        inside = (hv > 0) & (hv < 1)
        g_v = g_h * sig * (1.0 - sig) * (_ZETA - _GAMMA) * inside * can_up
        m1 = b1 * m1 + (1 - b1) * g_v
        m2 = b2 * m2 + (1 - b2) * g_v * g_v
        v -= lr * (m1 / (1 - b1 ** (it + 1))) / (np.sqrt(m2 / (1 - b2 ** (it + 1))) + 1e-8)
        it += 1
    return np.clip(floor + (_h(v) >= 0.5) * can_up * step, -qmax, qmax)


def _best_scales(gram: np.ndarray, w: np.ndarray, s_max: np.ndarray, qmax: int, fmt=None) -> np.ndarray:
    """Per output channel, the scale among shrinkings of max|w|/qmax whose nearest rounding
    gives the least output error d^T G d (clipping a few large weights buys finer steps).
    ``fmt``: a minifloat format (nearest rounding onto its grid instead of integers)."""
    from hilc.compiler import minifloat as mf

    best, best_err = s_max.copy(), np.full(len(s_max), np.inf)
    for alpha in np.linspace(0.4, 1.0, 31):
        s = s_max * alpha
        if fmt is None:
            d = w - s[:, None] * np.clip(np.rint(w / s[:, None]), -qmax, qmax)
        else:
            d = w - s[:, None] * mf.quantize_values(fmt, w / s[:, None])
        err = ((d @ gram) * d).sum(axis=1)
        better = err < best_err
        best[better], best_err[better] = s[better], err[better]
    return best


@_single_blas
def correct_layers(reference: Graph, graph: Graph, x: np.ndarray, bias_correct: bool = True,
                   adaround: bool = False, budget_s: float | None = 30.0, iterations: int = 2000,
                   adaround_only: set[str] | None = None, isolated: bool = False,
                   act_quant: Callable[[str, np.ndarray], np.ndarray] | None = None,
                   only: set[str] | None = None) -> Graph:
    """Layer by layer in order: round (nearest, or learned with ``adaround``, which also picks
    each channel's scale) and, with ``bias_correct``, set the bias that removes the mean output
    shift. Targets are the ``reference`` float graph's pre-activation outputs; inputs are what
    the layer sees in the graph as processed so far (earlier layers already on their grid), so
    one walk through both graphs does it all. Per layer only K x K statistics are kept.

    ``budget_s=None``: every AdaRound runs ``iterations`` steps; a budget in seconds is turned
    into one step count for all layers at ``NOMINAL_RATE`` (between ``MIN_STEPS`` and
    ``iterations``): deterministic either way. ``adaround_only``: learned rounding for these
    layers only (the others round to nearest, and are bias-corrected). ``isolated``: each layer
    is fitted on the reference's inputs, as if it alone were quantized (what a per-layer
    sensitivity measurement needs). ``act_quant``: fake activation quantization applied to the
    processed graph's tensors during the walk (see ``_walk``), so rounding and bias absorb the
    activation error too. ``only`` (with ``isolated``): fit these layers alone, the others keep
    their constants; each fitted layer is the same as in a walk over all of them (one Ray task per
    layer of a sensitivity measurement, hilc.distributed)."""
    g = graph.copy()
    layers = linear_nodes(g)
    # the budget is shared in proportion to each layer's cost per Adam step: O * K^2 for the
    # products plus numpy's fixed overhead per step and group
    costs = {n.name: g.param(n, "weight").shape[0] * g.param(n, "weight")[0].size ** 2
             + STEP_OVERHEAD * n.attrs.get("group", 1) for n in layers}
    if budget_s is not None:  # every layer the same steps: the budget's share is in proportion to its cost
        iterations = int(min(iterations, max(MIN_STEPS, budget_s * NOMINAL_RATE / (sum(costs.values()) or 1.0))))

    pending = set(only) if only is not None else set()

    def visit(rn: Node, node: Node, x_ref: np.ndarray, x_cur: np.ndarray) -> None:
        if only is not None and node.name not in only:
            if not pending:  # every layer asked for is fitted: the rest of the walk is not needed
                raise _WalkDone
            return
        pending.discard(node.name)
        w = g.param(node, "weight").astype(np.float64)
        bias = g.param(node, "bias").astype(np.float64)
        s, q, qmax = _grid(node, w)
        w_groups = _weights_by_group(g, node, w)
        og = w_groups[0].shape[0]
        # sufficient statistics of the least-squares problem, per group
        gram = [np.zeros((wg.shape[1], wg.shape[1])) for wg in w_groups]
        cross = [np.zeros((wg.shape[1], og)) for wg in w_groups]
        sum_r = [np.zeros(wg.shape[1]) for wg in w_groups]
        sum_y, energy, m = np.zeros(w.shape[0]), np.zeros(w.shape[0]), 0
        for c in _chunks(len(x_ref)):
            # the target, less the bias as it stands (bias correction below takes what is left)
            y = _linear(reference, rn, x_ref[c:c + CHUNK]).astype(np.float64) - bias
            for gi, r in enumerate(_rows(g, node, (x_ref if isolated else x_cur)[c:c + CHUNK])):
                r = r.astype(np.float64)
                gram[gi] += r.T @ r
                cross[gi] += r.T @ y[:, gi * og:(gi + 1) * og]
                sum_r[gi] += r.sum(axis=0)
            sum_y += y.sum(axis=0)
            energy += (y ** 2).sum(axis=0)
            m += len(y)
        if adaround and (adaround_only is None or node.name in adaround_only):
            fmt, grid, s_top = None, None, s
            if node.attrs.get("format"):  # a minifloat grid: round between its neighbouring values
                from hilc.compiler import minifloat as mf

                fmt = mf.parse(node.attrs["format"])
                grid = np.sort(mf.decode(fmt, fmt.valid_codes()))
                s_top = np.maximum(np.abs(w.reshape(len(w), -1)).max(axis=1), 1e-30) / qmax
            q_groups, s_groups = [], []
            for gi, wg in enumerate(w_groups):
                sl = slice(gi * og, (gi + 1) * og)
                sg = _best_scales(gram[gi] / m, wg, s_top[sl], qmax, fmt)
                tg = np.clip(wg / sg[:, None], -qmax, qmax)
                q_groups.append(_adaround_group(gram[gi] / m, cross[gi] / m, float(energy[sl].sum() / m), tg, sg,
                                                qmax, None,
                                                iters=iterations, grid=grid))
                s_groups.append(sg)
            q = np.concatenate(q_groups, axis=0).reshape(w.shape)
            s = np.concatenate(s_groups)
        if bias_correct:
            # mean(y_float) = mean(rows) @ w_q + b_new: the bias takes the whole mean shift
            wq = _weights_by_group(g, node, q * s.reshape((-1,) + (1,) * (w.ndim - 1)))
            mean_q = np.concatenate([sum_r[gi] / m @ wq[gi].T for gi in range(len(wq))])
            bias = bias + sum_y / m - mean_q
        _pin(g, node, q, s, bias)

    try:
        _walk(reference, g, x.astype(np.float32), visit, act_quant)
    except _WalkDone:
        pass
    return g


class _WalkDone(Exception):
    """Ends ``correct_layers``' walk early once the ``only`` layers are fitted."""


# --- data-free calibration -----------------------------------------------------------------

def _bn_targets(graph: Graph) -> tuple[list[Node], list[Node]]:
    """BatchNorm-carrying layers reachable by differentiable ops only (``Op.differentiable``),
    and the nodes to run."""
    from hilc.compiler.ops import OPS

    stats = graph.meta.get("bn_stats", {})
    diff_ok: set[str] = set(graph.inputs)
    for n in graph.nodes:
        if OPS[n.op].differentiable(n) and all(i in diff_ok for i in n.inputs):
            diff_ok.update(n.outputs)
    targets = [n for n in graph.nodes if n.name in stats and n.op in LINEAR_OPS and n.outputs[0] in diff_ok]
    if not targets:
        return [], []
    last = max(graph.nodes.index(t) for t in targets)
    return targets, [n for n in graph.nodes[:last + 1] if n.outputs[0] in diff_ok]


def _forward_backward(graph: Graph, nodes: list[Node], targets: dict[str, tuple[np.ndarray, np.ndarray]],
                      x: np.ndarray) -> tuple[float, np.ndarray]:
    """BN-statistics loss of physical inputs x and its gradient (each operator's own float
    forward and backward, ``Op.float_forward`` / ``Op.float_backward``)."""
    from hilc.compiler.ops import OPS
    from hilc.compiler.ops.base import float_activation, float_params

    env: dict[str, np.ndarray] = {graph.inputs[0]: x}
    pre: dict[str, np.ndarray] = {}
    caches: dict[str, Any] = {}
    masks: dict[str, np.ndarray | None] = {}
    for n in nodes:
        (z,), caches[n.name] = OPS[n.op].float_forward(n, graph, [env[i] for i in n.inputs], float_params(n, graph))
        pre[n.name] = z
        env[n.outputs[0]], masks[n.name] = float_activation(n, z)
    loss = 0.0
    grads: dict[str, np.ndarray] = {}
    dpre: dict[str, np.ndarray] = {}
    for name, (mu_t, sd_t) in targets.items():
        z = pre[name]
        c = z.shape[-1]
        zz = z.reshape(-1, c)
        m = len(zz)
        mu = zz.mean(axis=0)
        sd = np.sqrt(zz.var(axis=0) + 1e-6)
        w = 1.0 / (c * float(np.mean(sd_t ** 2)) + 1e-12)
        loss += w * float(((mu - mu_t) ** 2).sum() + ((sd - sd_t) ** 2).sum())
        dz = w * (2 * (mu - mu_t) / m + 2 * (sd - sd_t) / sd * (zz - mu) / m)
        dpre[name] = dz.reshape(z.shape).astype(np.float32)
    for n in reversed(nodes):
        dy = grads.pop(n.outputs[0], None)
        dz = dpre.get(n.name)
        if dy is not None:
            if masks[n.name] is not None:
                dy = dy * masks[n.name]
            dz = dy if dz is None else dz + dy
        if dz is None:
            continue
        dxs, _ = OPS[n.op].float_backward(n, caches.pop(n.name), [dz], param_grads=False)
        for i, d in zip(n.inputs, dxs, strict=True):
            grads[i] = d if i not in grads else grads[i] + d
    return loss, grads.get(graph.inputs[0], np.zeros_like(x))


@_single_blas
def synthesize_inputs(graph: Graph, n: int = 64, iterations: int = 300, seed: int = 0,
                      input_range: tuple[float, float] = (0.0, 1.0)) -> tuple[np.ndarray, dict[str, Any]]:
    """Calibration inputs without data, in the model's own layout (see the module docstring).
    Returns the inputs and a description (method, layers matched, final loss)."""
    rng = np.random.default_rng(seed)
    name = graph.inputs[0]
    t = graph.tensors[name]
    phys = (n, *t.shape[1:])
    targets, nodes = _bn_targets(graph)
    t0 = time.perf_counter()
    if not targets:
        x = _smooth_noise(rng, phys, input_range)
        info = {"method": "data-free", "source": f"smooth random images in {input_range[0]:g}..{input_range[1]:g} "
                                                  "(no BatchNorm statistics; the range is --input-range)",
                "input_range": list(input_range), "samples": n}
    else:
        stats = graph.meta["bn_stats"]
        tg = {m.name: (np.asarray(stats[m.name]["mean"], np.float32), np.asarray(stats[m.name]["std"], np.float32))
              for m in targets}
        x = rng.standard_normal(phys).astype(np.float32)
        m1, m2 = np.zeros_like(x), np.zeros_like(x)
        lr, b1, b2 = 0.1, 0.9, 0.999
        first = loss = None
        for it in range(iterations):
            loss, gx = _forward_backward(graph, nodes, tg, x)
            first = loss if first is None else first
            m1 = b1 * m1 + (1 - b1) * gx
            m2 = b2 * m2 + (1 - b2) * gx * gx
            x -= lr * (m1 / (1 - b1 ** (it + 1))) / (np.sqrt(m2 / (1 - b2 ** (it + 1))) + 1e-8)
        if not np.all(np.isfinite(x)):
            raise HilcError("data-free calibration diverged (non-finite synthesised inputs): give --calib FILE")
        info = {"method": "data-free", "source": f"inputs matched to the BatchNorm statistics of {len(targets)} layers",
                "bn_layers": [m.name for m in targets], "samples": n, "iterations": iterations,
                "loss_first": round(float(first), 6), "loss_last": round(float(loss), 6)}
    info["seconds"] = round(time.perf_counter() - t0, 3)
    inv = np.argsort(t.layout) if t.layout is not None else np.arange(len(phys))
    return np.ascontiguousarray(x.transpose(inv)).astype(np.float32), info


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], rng_range: tuple[float, float]) -> np.ndarray:
    """Uniform noise on a coarse grid, upsampled (images are spatially correlated), plus a
    little fine noise, spanning [lo, hi]; non-image inputs get plain uniform noise."""
    lo, hi = rng_range
    if len(shape) != 4 or min(shape[1:3]) < 4:
        return rng.uniform(lo, hi, shape).astype(np.float32)
    n, h, w, c = shape
    out = np.empty(shape, np.float32)
    for i in range(n):
        k = int(rng.integers(2, max(3, min(h, w) // 2)))
        coarse = rng.uniform(0, 1, (k, k, c))
        yi = np.linspace(0, k - 1, h)
        xi = np.linspace(0, k - 1, w)
        y0, x0 = np.floor(yi).astype(int), np.floor(xi).astype(int)
        y1, x1 = np.minimum(y0 + 1, k - 1), np.minimum(x0 + 1, k - 1)
        fy, fx = (yi - y0)[:, None, None], (xi - x0)[None, :, None]
        img = (coarse[y0][:, x0] * (1 - fy) * (1 - fx) + coarse[y1][:, x0] * fy * (1 - fx)
               + coarse[y0][:, x1] * (1 - fy) * fx + coarse[y1][:, x1] * fy * fx)
        img = np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1)
        out[i] = lo + (hi - lo) * img
    return out


# --- the driver --------------------------------------------------------------------------------

@_single_blas
def run_ptq(graph: Graph, samples: np.ndarray, methods: Sequence[str], budget_s: float = 30.0,
            max_samples: int = 256) -> tuple[Graph, dict[str, Any]]:
    """Apply the chosen methods (in the order equalize, bias-correct/adaround) to a float graph
    and say what ran: {"methods": [{"name", "seconds"}], "layers": [{name, bits, error_before,
    error_after}]}. ``samples`` are in the model's own layout (at most ``max_samples`` are used)."""
    methods = [m for m in METHODS if m in methods]
    report: dict[str, Any] = {"methods": [], "layers": []}
    if not methods:
        return graph, report
    x = to_physical(graph, graph.inputs[0], np.asarray(samples[:max_samples], np.float32))
    before = layer_errors(graph, graph, x)
    g = graph
    if "equalize" in methods:
        t = time.perf_counter()
        g = equalize(g)
        report["methods"].append({"name": "equalize", "pairs": len(equalize_pairs(graph)),
                                  "seconds": round(time.perf_counter() - t, 3)})
    reference = g
    if "bias-correct" in methods or "adaround" in methods:
        t = time.perf_counter()
        g = correct_layers(reference, g, x, bias_correct="bias-correct" in methods, adaround="adaround" in methods,
                           budget_s=budget_s)
        name = "+".join(m for m in ("bias-correct", "adaround") if m in methods)
        report["methods"].append({"name": name, "seconds": round(time.perf_counter() - t, 3),
                                  **({"budget_seconds": budget_s} if "adaround" in methods else {})})
    after = layer_errors(reference, g, x)
    for n in linear_nodes(g):
        report["layers"].append({"name": n.name, "weight_bits": n.attrs.get("weight_bits", 8),
                                 "error_before": round(before[n.name], 6), "error_after": round(after[n.name], 6)})
    g.meta["ptq"] = [m["name"] for m in report["methods"]]
    return g, report
