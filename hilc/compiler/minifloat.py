"""Minifloat (ExMy) formats beside integers, for the FPGA path.

A format has a sign bit, ``e`` exponent bits, ``m`` mantissa bits, an exponent ``bias``, whether
subnormals exist and which codes are special (``special``):

* ``"none"``: every code is finite (OCP FP6/FP4 style: E3M2, E2M1);
* ``"fn"``: only the all-ones code of each sign is NaN, no infinities (OCP E4M3);
* ``"ieee"``: the top exponent holds infinities and NaNs (E5M2).

Rounding is to nearest, ties to even (the code whose mantissa is even), and **saturating**: any
finite input beyond the largest finite value becomes that value, so a finite input never gives
an infinity or a NaN.

Fixed-point view (what the arithmetic uses). With subnormals, every value is an integer multiple
of the smallest subnormal ``2**emin`` (``emin = 1 - bias - m``): a code ``s|E|M`` is
``(-1)**s * sig << sh`` units, ``sig = E ? 2**m + M : M`` (an (m+1)-bit significand) and
``sh = E ? E - 1 : 0``. The magnitude bits ``E << m | M`` equal ``sh * 2**m + sig``, so codes are
ordered like their values and saturation is a comparison of magnitudes. A product of two codes is
``sig_a * sig_w << (sh_a + sh_w)``: an (m+1)x(m+1)-bit multiplier, an exponent adder and a shifter,
exact in a wide integer accumulator (``accumulator_bits``). The simulator (numpy, below) and the
HLS header (targets/hls/templates/hilc_hls.h.j2) implement exactly these integer steps.

Layers: a conv2d/dense with ``attrs['format']`` (e.g. ``"E4M3"``) stores its weights as codes
(uint8 containers) with a per-output-channel scale chosen by search; ``attrs['act_format']``
(optional) casts the layer's integer input ``x - zp_in`` to a minifloat on entry, ``d * 2**-q``
rounded by ``cast_int`` (the same rounding), so the MAC is minifloat x minifloat. Tensors between
layers stay integer (int8 affine): the layer's output is requantized by the dyadic multiplier
(ties to even), and the next layer casts it to its own format. MCU C kernels are not provided.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import numpy as np

from hilc.compiler.arith import rounding_shift
from hilc.errors import HilcError

SPECIALS = ("none", "fn", "ieee")


@dataclass(frozen=True)
class MiniFloat:
    e: int
    m: int
    bias: int | None = None
    subnormals: bool = True
    special: str = "none"

    def __post_init__(self) -> None:
        if not (1 <= self.e <= 5 and 0 <= self.m <= 6 and 3 <= self.bits <= 8):
            raise HilcError(f"minifloat E{self.e}M{self.m}: need 1..5 exponent bits and 3..8 bits in all")
        if self.special not in SPECIALS:
            raise HilcError(f"minifloat special values must be one of {SPECIALS}, got '{self.special}'")
        if self.special == "ieee" and self.e < 2:
            raise HilcError(f"{self.name}: IEEE-style infinities need at least 2 exponent bits")

    @property
    def name(self) -> str:
        return f"E{self.e}M{self.m}"

    @property
    def bits(self) -> int:
        return 1 + self.e + self.m

    @property
    def b(self) -> int:
        return (2 ** (self.e - 1) - 1) if self.bias is None else self.bias

    @property
    def emin(self) -> int:
        """Exponent of the fixed-point unit: the smallest subnormal (or, without subnormals, the
        spacing of the lowest binade)."""
        return 1 - self.b - self.m

    @property
    def max_mag(self) -> int:
        """Magnitude bits (E << m | M) of the largest finite value."""
        top = 2 ** self.e - 1
        if self.special == "ieee":
            return ((top - 1) << self.m) | (2 ** self.m - 1)
        if self.special == "fn":
            return (top << self.m) | (2 ** self.m - 2) if self.m > 0 else ((top - 1) << self.m)
        return (top << self.m) | (2 ** self.m - 1)

    @property
    def max_fix(self) -> int:
        return int(mag_to_fix(np.int64(self.max_mag), self.m))

    @property
    def max_value(self) -> float:
        return math.ldexp(self.max_fix, self.emin)

    def valid_codes(self) -> np.ndarray:
        """Every canonical code of a finite value (-0 and, without subnormals, the e=0 codes
        other than zero are left out)."""
        mags = np.arange(self.max_mag + 1, dtype=np.int64)
        if not self.subnormals:
            mags = mags[(mags == 0) | (mags >= 2 ** self.m)]
        neg = mags[mags > 0] | (1 << (self.bits - 1))
        return np.concatenate([mags, neg])


def mag_to_fix(mag: np.ndarray, m: int) -> np.ndarray:
    sig, sh = _sig_sh(np.asarray(mag, np.int64), m)
    return sig << sh


def _sig_sh(mag: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    ex = mag >> m
    man = mag & ((1 << m) - 1)
    sig = np.where(ex > 0, man | (1 << m), man)
    sh = np.maximum(ex - 1, 0)
    return sig, sh


PRESETS = {
    "E4M3": MiniFloat(4, 3, special="fn"),
    "E5M2": MiniFloat(5, 2, special="ieee"),
}


@functools.cache
def parse(name: str) -> MiniFloat:
    """``"E4M3"`` (OCP FP8, no infinities), ``"E5M2"`` (IEEE-style), any other ``"ExMy"`` of 3..8
    bits (all codes finite, bias 2**(x-1)-1, subnormals)."""
    if name in PRESETS:
        return PRESETS[name]
    mt = re.fullmatch(r"E(\d)M(\d)", str(name).upper())
    if mt is None:
        raise HilcError(f"minifloat format '{name}': expected ExMy, e.g. E4M3, E3M2, E2M1")
    return MiniFloat(int(mt.group(1)), int(mt.group(2)))


def for_bits(bits: int) -> MiniFloat:
    """The format the comparisons use at a given width: E2M1, E2M2, E3M2, E3M3, E4M3."""
    table = {3: "E1M1", 4: "E2M1", 5: "E2M2", 6: "E3M2", 7: "E3M3", 8: "E4M3"}
    if bits not in table:
        raise HilcError(f"no minifloat format of {bits} bits (3..8)")
    return parse(table[bits])


# --- codes <-> values ---------------------------------------------------------------------------

def decode(fmt: MiniFloat, code: np.ndarray) -> np.ndarray:
    """Codes -> float64 values (NaN/inf for the special codes of the format)."""
    code = np.asarray(code, np.int64)
    mag = code & ((1 << (fmt.bits - 1)) - 1)
    neg = (code >> (fmt.bits - 1)) & 1
    fix = mag_to_fix(mag, fmt.m).astype(np.float64)
    if not fmt.subnormals:
        fix = np.where(mag < (1 << fmt.m), 0.0, fix)
    v = np.ldexp(fix, fmt.emin)
    v = np.where(neg == 1, -v, v)
    top = 2 ** fmt.e - 1
    if fmt.special == "ieee":
        ex = mag >> fmt.m
        man = mag & ((1 << fmt.m) - 1)
        v = np.where((ex == top) & (man == 0), np.where(neg == 1, -np.inf, np.inf), v)
        v = np.where((ex == top) & (man != 0), np.nan, v)
    elif fmt.special == "fn":
        v = np.where(mag == (1 << (fmt.bits - 1)) - 1, np.nan, v)
    return v


@functools.cache
def _table(fmt: MiniFloat) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative finite values ascending and their magnitude codes."""
    mags = fmt.valid_codes()
    mags = mags[mags < (1 << (fmt.bits - 1))]
    return decode(fmt, mags), mags


def encode(fmt: MiniFloat, x: np.ndarray) -> np.ndarray:
    """Float values -> codes (uint8): nearest, ties to the even code, saturating. NaN -> the
    format's NaN code when it has one, else an error (a finite input never gives NaN)."""
    x = np.asarray(x, np.float64)
    vals, mags = _table(fmt)
    a = np.abs(x)
    if np.any(np.isnan(x)):
        if fmt.special == "none":
            raise HilcError(f"{fmt.name} has no NaN: cannot encode NaN")
    a_c = np.minimum(np.nan_to_num(a, nan=0.0, posinf=vals[-1]), vals[-1])  # saturate (and inf)
    hi = np.clip(np.searchsorted(vals, a_c, side="left"), 0, len(vals) - 1)
    lo = np.maximum(hi - 1, 0)
    d_lo, d_hi = a_c - vals[lo], vals[hi] - a_c
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & ((mags[hi] & 1) == 0) & (hi != lo))
    mag = np.where(pick_hi, mags[hi], mags[lo])
    neg = (np.signbit(x) & (mag != 0)).astype(np.int64)
    code = mag | (neg << (fmt.bits - 1))
    if np.any(np.isnan(x)):
        nan_code = (1 << fmt.bits) - 1 if fmt.special == "fn" else ((2 ** fmt.e - 1) << fmt.m) | 1
        code = np.where(np.isnan(x), nan_code, code)
    return code.astype(np.uint8)


def quantize_values(fmt: MiniFloat, x: np.ndarray) -> np.ndarray:
    return decode(fmt, encode(fmt, x))


# --- the integer arithmetic (mirrored in hilc_hls.h.j2) ------------------------------------------

def code_sig_sh(fmt: MiniFloat, code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed significand and shift of codes: value = sig << sh units of 2**emin."""
    code = np.asarray(code, np.int64)
    mag = code & ((1 << (fmt.bits - 1)) - 1)
    sig, sh = _sig_sh(mag, fmt.m)
    if not fmt.subnormals:
        sig = np.where(mag < (1 << fmt.m), 0, sig)
    sig = np.where((code >> (fmt.bits - 1)) & 1, -sig, sig)
    return sig, sh


def code_to_fix(fmt: MiniFloat, code: np.ndarray) -> np.ndarray:
    sig, sh = code_sig_sh(fmt, code)
    return sig << sh


def _bit_length(v: np.ndarray) -> np.ndarray:
    """Bit length of non-negative int64 values below 2**53 (frexp of an exact float64)."""
    if np.any(v >= 2**53):
        raise HilcError("minifloat cast: integer input beyond 2**53")
    return np.frexp(v.astype(np.float64))[1].astype(np.int64)


def cast_int(fmt: MiniFloat, d: np.ndarray, q: int) -> np.ndarray:
    """Codes of the integers ``d * 2**-q`` (in units of 2**emin): nearest, ties to even,
    saturating; integer steps only (``hilc_mf_cast`` in the HLS header does the same).

    The binade comes from the bit length of ``floor(|d| / 2**q)``; the significand is |d|
    shifted right by ``q + sh`` with rounding; a carry out of the significand moves it up one
    binade; the magnitude bits ``sh * 2**m + sig`` saturate at the largest finite code.
    """
    if not fmt.subnormals:
        raise HilcError(f"{fmt.name} without subnormals: the integer cast needs subnormals")
    d = np.asarray(d, np.int64)
    t = np.abs(d)
    fl = t >> q if q >= 0 else t << -q
    sh = np.maximum(_bit_length(fl) - (fmt.m + 1), 0)
    total = q + sh
    sig = np.where(total > 0, rounding_shift(t, np.maximum(total, 1)), t << np.maximum(-total, 0))
    carry = sig == (1 << (fmt.m + 1))
    sig = np.where(carry, sig >> 1, sig)
    sh = np.where(carry, sh + 1, sh)
    mag = np.minimum(sh * (1 << fmt.m) + sig, fmt.max_mag)
    neg = ((d < 0) & (mag != 0)).astype(np.int64)
    return (mag | (neg << (fmt.bits - 1))).astype(np.uint8)


def act_shift(fmt: MiniFloat, in_absmax: int) -> int:
    """q with in_absmax * 2**-q <= the largest finite value (in units), as small as that allows:
    the integer input range is mapped onto the top of the format's range."""
    return max(math.ceil(math.log2(in_absmax / fmt.max_fix)), -(62 - int(in_absmax).bit_length()))


# --- activation cast: per-tensor scale search ---------------------------------------------------

ACT_Q_STEPS = 8  # power-of-two scales tried below the full-range one (each halves the cast's unit)
# What compile_model searches: measured (benchmarks/minifloat.py, "cast_search"), the least-MSE finer
# shift lost accuracy once bias correction and AdaRound see the casts (E2M1 x E2M1: resnet8 38.0 %
# vs 42.7 %, digits 98.6 % vs 98.9 %; E3M2 and E4M3 never move), so the pipeline keeps the
# full-range shift and records the cast error; search_act_shifts(..., steps=ACT_Q_STEPS) searches.
PIPELINE_ACT_Q_STEPS = 0


def cast_error(fmt: MiniFloat, values: np.ndarray, counts: np.ndarray, q: int) -> float:
    """Summed squared error (in integer input units) of casting ``values`` (with ``counts``
    occurrences each) to ``fmt`` at shift ``q``: ``d`` against ``fix(cast(d)) * 2**q``."""
    back = np.ldexp(code_to_fix(fmt, cast_int(fmt, values, q)).astype(np.float64), q)
    return float((counts * (back - values) ** 2).sum())


def best_act_shift(fmt: MiniFloat, d: np.ndarray, in_absmax: int,
                   steps: int = ACT_Q_STEPS) -> tuple[int, int, float, float]:
    """The shift q (a power-of-two scale, so the cast stays the exact integer ``cast_int``) with
    the least squared cast error over the observed integer inputs ``d``, among the full-range
    ``act_shift`` and ``steps`` finer ones (which saturate the rare large inputs to buy
    resolution where the values are). Returns (q, full-range q, its error, q's error)."""
    values, counts = np.unique(np.asarray(d, np.int64), return_counts=True)
    q0 = act_shift(fmt, in_absmax)
    errs = {q: cast_error(fmt, values, counts, q) for q in range(q0 - steps, q0 + 1)}
    q = min(errs, key=lambda k: (errs[k], -k))  # ties: the wider range
    return q, q0, errs[q0], errs[q]


def search_act_shifts(graph, samples: np.ndarray, max_samples: int = 64, steps: int = ACT_Q_STEPS):
    """For every conv/dense with an ``act_format`` in a calibrated float graph: the input cast's
    shift by least squared error on calibration data (``best_act_shift``), kept in
    ``attrs['act_q']`` (with ``attrs['act_q_format']``) for ``quantize_layer``, and the search in
    ``meta['act_cast_search']``. One integer run of the graph as quantized so far gives each
    layer's integer inputs ``x - zp_in``."""
    from hilc.compiler.arith import quantize_host
    from hilc.compiler.quantize import quantize
    from hilc.sim.simulator import _execute, to_physical

    todo = [n for n in graph.nodes if n.op in ("conv2d", "dense") and n.attrs.get("act_format")]
    if not todo:
        return graph
    g = graph.copy()
    for n in g.nodes:  # the full-range shift for the observing run
        n.attrs.pop("act_q", None)
        n.attrs.pop("act_q_format", None)
    q = quantize(g)
    layer_in = {}
    for n in q.nodes:
        if n.op in ("conv2d", "dense") and n.attrs.get("act_format"):
            layer_in.setdefault(n.inputs[0], []).append(n)
    seen: dict[str, list[np.ndarray]] = {}

    def observe(name: str, v: np.ndarray) -> None:
        if name in layer_in:
            seen.setdefault(name, []).append(np.asarray(v, np.int64).reshape(-1))

    qi = q.tensors[q.inputs[0]].quant
    x = to_physical(q, q.inputs[0], np.asarray(samples, np.float32)[:max_samples])
    _execute(q, {q.inputs[0]: quantize_host(x, qi.scale, qi.zero_point, qi.bits)}, True, observe)
    report = {}
    by_name = {n.name: n for n in g.nodes}
    for t, nodes in layer_in.items():
        for qn in nodes:
            fmt = parse(qn.attrs["act_format"])
            qin = q.tensors[t].quant
            in_absmax = max(qin.qmax - qin.zero_point, qin.zero_point - qin.qmin)
            best, q0, e0, e = best_act_shift(fmt, np.concatenate(seen[t]) - qin.zero_point, in_absmax, steps)
            by_name[qn.name].attrs.update(act_q=int(best), act_q_format=fmt.name)
            report[qn.name] = {"format": fmt.name, "act_q": int(best), "full_range_q": int(q0),
                               "mse_ratio": round(e / e0, 4) if e0 > 0 else 1.0}
    g.meta["act_cast_search"] = report
    return g


def cast_fake_quant(graph):
    """Fake quantization of the minifloat input casts of a calibrated float graph (shifts as
    ``search_act_shifts`` left them): the tensor feeding a layer with an ``act_format`` becomes
    ``s_in * fix(cast_int(q - zp)) * 2**act_q``, on the int8 grid ``quantize`` gives it first. For
    ``ptq._walk``'s ``act_quant``: it replaces the tensor for all its consumers (a residual add
    beside the cast sees the cast too; the first layer's format wins where two casts share one; the
    walk feeds the graph input as it is, so a cast of the graph input is not simulated)."""
    from hilc.compiler.quantize import quantize

    q = quantize(graph)
    casts = {}
    for n in graph.nodes:
        t = n.inputs[0] if n.inputs else None
        if n.op in ("conv2d", "dense") and n.attrs.get("act_format") and t in q.tensors and t not in casts:
            fmt = parse(n.attrs["act_format"])
            qi = q.tensors[t].quant
            sh = int(n.attrs["act_q"]) if n.attrs.get("act_q_format") == fmt.name else act_shift(
                fmt, max(qi.qmax - qi.zero_point, qi.zero_point - qi.qmin))
            casts[t] = (qi, fmt, sh)

    def act_quant(name: str, v: np.ndarray) -> np.ndarray:
        if name not in casts:
            return v
        qi, fmt, sh = casts[name]
        d = np.clip(np.rint(v.astype(np.float64) / qi.scale) + qi.zero_point, qi.qmin, qi.qmax).astype(np.int64)
        fix = code_to_fix(fmt, cast_int(fmt, d - qi.zero_point, sh)).astype(np.float64)
        return (np.ldexp(fix, sh) * qi.scale).astype(np.float32)

    return act_quant


def split_ptq_for_casts(spec, graph) -> tuple[str, list[str]]:
    """``--ptq`` for a graph with minifloat input casts: equalization before calibration (it keeps
    the float function), bias correction and AdaRound after it and after the cast shifts are
    searched, so they fit the weights to the inputs as the casts leave them (``ptq_with_casts``).
    ``--precision auto-fpga`` splits the same way (``hilc.targets.hls.cost.split_ptq``)."""
    from hilc.compiler.ptq import parse_methods

    methods = parse_methods(spec, graph)
    return ("equalize" if "equalize" in methods else "none"), [m for m in methods if m != "equalize"]


def ptq_with_casts(graph, samples: np.ndarray, methods: list[str], budget_s: float | None,
                   max_samples: int = 256):
    """Bias correction / AdaRound (``ptq.correct_layers``) on a calibrated float graph whose input
    casts are simulated during the walk (``cast_fake_quant``). Returns the graph and what ran."""
    import time

    from hilc.compiler.ptq import correct_layers
    from hilc.sim.simulator import to_physical

    t = time.perf_counter()
    x = to_physical(graph, graph.inputs[0], np.asarray(samples, np.float32)[:max_samples])
    g = correct_layers(graph, graph, x, bias_correct="bias-correct" in methods, adaround="adaround" in methods,
                       budget_s=budget_s, act_quant=cast_fake_quant(graph))
    g.meta["ptq"] = [*graph.meta.get("ptq", []), *methods]
    name = "+".join(m for m in ("bias-correct", "adaround") if m in methods)
    return g, {"name": f"{name} (after calibration, minifloat input casts simulated)",
               "seconds": round(time.perf_counter() - t, 3),
               **({"budget_seconds": budget_s} if "adaround" in methods else {})}


# --- weight quantizer: per-channel scale search -------------------------------------------------

SHRINKS = np.linspace(0.5, 1.0, 26)


def quantize_weights(fmt: MiniFloat, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes (uint8, w's shape) and per-output-channel scales s (real = s * decode(code)).

    Each channel's scale maps max|w| onto ``shrink * max_value``; the shrink among SHRINKS with
    the least squared weight error wins (clipping a few large weights buys finer steps)."""
    w = np.asarray(w, np.float64)
    flat = w.reshape(w.shape[0], -1)
    amax = np.abs(flat).max(axis=1)
    amax = np.where(amax > 0, amax, 1.0)
    best_s = amax / fmt.max_value
    best_err = np.full(len(flat), np.inf)
    for k in SHRINKS:
        s = amax * k / fmt.max_value
        err = ((quantize_values(fmt, flat / s[:, None]) * s[:, None] - flat) ** 2).sum(axis=1)
        better = err < best_err
        best_s, best_err = np.where(better, s, best_s), np.where(better, err, best_err)
    codes = encode(fmt, flat / best_s[:, None]).reshape(w.shape)
    return codes, best_s


def grid_values(fmt: MiniFloat, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Decoded grid values (float64, w's shape) of w on per-channel scales s (no scale applied)."""
    flat = np.asarray(w, np.float64).reshape(w.shape[0], -1)
    return quantize_values(fmt, flat / s[:, None]).reshape(w.shape)


def accumulator_bits(wfmt: MiniFloat, afmt: MiniFloat | None, k: int, in_absmax: int = 256) -> int:
    """Width of the exact accumulator of k products: (|a| max) * (|w| max) * k, plus a sign."""
    amax = afmt.max_fix if afmt is not None else in_absmax
    return int(amax * wfmt.max_fix * k).bit_length() + 1


# --- conv2d / dense with a minifloat format -------------------------------------------------------

def layer_formats(node) -> tuple[MiniFloat, MiniFloat | None]:
    a = node.attrs
    return parse(a["format"]), (parse(a["act_format"]) if a.get("act_format") else None)


def quantize_layer(node, graph) -> None:
    """quantize_linear_layer for a conv2d/dense with ``attrs['format']``: weight codes (uint8) on
    per-channel scales, int64 bias at the accumulator's scale, dyadic requantization whose
    multiplier is narrowed so that ``acc_bound * b < 2**62``."""
    from hilc.compiler import arith
    from hilc.compiler.ops.base import clamp_bounds, in_quant, out_quant
    from hilc.errors import UnsupportedModelError

    fmt, afmt = layer_formats(node)
    qi, qo = in_quant(graph, node), out_quant(graph, node)
    w = graph.param(node, "weight").astype(np.float64)
    b = graph.param(node, "bias").astype(np.float64)
    preset = node.attrs.pop("w_scale", None)
    if node.attrs.pop("w_scale_bits", None) != fmt.name:  # a grid chosen for another format (ptq)
        preset = None
    if preset is not None:
        s_w = np.asarray(preset, np.float64)
        codes = encode(fmt, w.reshape(len(w), -1) / s_w[:, None]).reshape(w.shape)
    else:
        codes, s_w = quantize_weights(fmt, w)
    in_absmax = max(qi.qmax - qi.zero_point, qi.zero_point - qi.qmin)
    q = act_shift(afmt, in_absmax) if afmt is not None else 0
    preset_q = node.attrs.pop("act_q", None)
    if node.attrs.pop("act_q_format", None) == (afmt.name if afmt is not None else None) and preset_q is not None:
        q = int(preset_q)  # searched on calibration data (search_act_shifts)
    a_unit = math.ldexp(1.0, q)  # cast_int: fix_a ~ d * 2**-q units, so real = s_in * 2**q * fix_a
    s_acc = qi.scale * a_unit * s_w * math.ldexp(1.0, fmt.emin)
    b_int = np.rint(b / s_acc)
    wfix = code_to_fix(fmt, codes).reshape(len(w), -1)
    amax = afmt.max_fix if afmt is not None else in_absmax
    if np.any(np.abs(b_int) > 2.0**60):
        raise UnsupportedModelError(f"{node.name} ({node.onnx_name}): bias does not fit the {fmt.name} accumulator")
    b_int = b_int.astype(np.int64)
    bound = int((np.abs(wfix).sum(axis=1) * amax + np.abs(b_int)).max())
    mult_bits = min(arith.MULT_BITS, 62 - bound.bit_length())
    if mult_bits < 8:
        raise UnsupportedModelError(
            f"{node.name} ({node.onnx_name}): the {fmt.name} accumulator needs {bound.bit_length()} bits, "
            "too wide for a 63-bit requantization product")
    mult, shift = arith.dyadic(s_acc / qo.scale, mult_bits)
    lo, hi = clamp_bounds(node, qo)
    node.params["weight"] = graph.add_constant(f"{node.name}.weight", codes.astype(np.uint8))
    node.params["bias"] = graph.add_constant(f"{node.name}.bias", b_int)
    node.params["mult"] = graph.add_constant(f"{node.name}.mult", mult.astype(np.int32))
    node.params["shift"] = graph.add_constant(f"{node.name}.shift", shift.astype(np.int8))
    node.attrs.pop("act_lo", None)
    node.attrs.pop("act_hi", None)
    node.attrs.update(zp_in=qi.zero_point, zp_out=qo.zero_point, lo=lo, hi=hi, acc_bound=bound, raw_bound=bound,
                      weight_bits=fmt.bits, act_q=q, mult_bits=mult_bits)


def layer_inputs(node, graph, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(activation in fixed units, weights in fixed units): what the accumulator multiplies."""
    fmt, afmt = layer_formats(node)
    key = f"{node.name}:minifloat"
    if key not in graph.cache:
        graph.cache[key] = code_to_fix(fmt, graph.param(node, "weight"))
    d = x.astype(np.int64) - node.attrs["zp_in"]
    a = code_to_fix(afmt, cast_int(afmt, d, node.attrs["act_q"])) if afmt is not None else d
    return a, graph.cache[key]


def requantize_layer(node, graph, acc: np.ndarray) -> np.ndarray:
    from hilc.compiler import arith

    a = node.attrs
    bias = graph.param(node, "bias")
    acc = acc + bias if acc.dtype == np.int64 else acc.astype(np.float64) + bias.astype(np.float64)
    return arith.requantize(acc, graph.param(node, "mult"), graph.param(node, "shift"), a["zp_out"], a["lo"],
                            a["hi"], acc_bound=a["acc_bound"], scratch=True)


def set_formats(graph, formats: str | dict | None, act_formats: str | dict | None = None):
    """A copy with ``attrs['format']`` / ``attrs['act_format']`` on every conv/dense (a name) or on
    the named nodes (a dict node name -> format name, None for integer), before ``quantize``.
    ``weight_bits`` follows the format's width (the PTQ passes read it)."""
    g = graph.copy()
    for n in g.nodes:
        if n.op not in ("conv2d", "dense") or "weight" not in n.params:
            continue
        f = formats.get(n.name) if isinstance(formats, dict) else formats
        af = act_formats.get(n.name) if isinstance(act_formats, dict) else act_formats
        for key, val in (("format", f), ("act_format", af)):
            if val:
                n.attrs[key] = parse(val).name
            else:
                n.attrs.pop(key, None)
        if f:
            n.attrs["weight_bits"] = parse(f).bits
    return g


def hook_from_spec(spec: str):
    """``--minifloat``: ``FORMAT[xACT]`` for every conv/dense (``E4M3``, ``E2M1xE2M1``), or a comma
    list of ``LAYER=FORMAT[xACT]`` (layers not named stay integer). A graph hook for compile_model."""
    def split(s: str) -> tuple[str, str | None]:
        w, _, a = s.strip().upper().partition("X")
        parse(w)
        if a:
            parse(a)
        return w, a or None

    if "=" not in spec:
        w, a = split(spec)
        return lambda g: set_formats(g, w, a)
    table = {}
    for item in spec.split(","):
        name, eq, val = item.partition("=")
        if not eq or not name.strip():
            raise HilcError(f"--minifloat '{item}': expected LAYER=FORMAT[xACT]")
        table[name.strip()] = split(val)

    def hook(g):
        known = {n.name for n in g.nodes if n.op in ("conv2d", "dense")}
        missing = sorted(set(table) - known)
        if missing:
            raise HilcError(f"--minifloat: no conv/dense layer named {', '.join(missing)}")
        return set_formats(g, {k: v[0] for k, v in table.items()}, {k: v[1] for k, v in table.items()})
    return hook
