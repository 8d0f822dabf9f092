"""Resource and latency *estimates* of a generated HLS design, from its layers' shapes, bit-widths and
parallelism (PE x SIMD). Analytical rules of thumb, not synthesis results: they steer the default
parallelism and catch designs that cannot fit the board; Vitis HLS's csynth report is the real number.

Rules (7-series / UltraScale DSP48, BRAM18 blocks):
* a multiply lane (one PE x SIMD product) takes one DSP when both operands are wider than 4 bits,
  else it is built from LUTs (about weight_bits x (act_bits + 1) LUTs); a minifloat lane (and its
  wide requantizer) is priced by the FPGA cost model's rules (cost.py: significand product,
  exponent add, alignment shift, wide accumulator, input cast);
* each dyadic requantizer (a 33 x 31-bit product) takes 4 DSPs, an add's two rescales 2 each;
* every array of more than 1024 bits is BRAM18 (best aspect ratio per partition), smaller ones LUTRAM
  (64 bits per LUT); FIFOs deeper than 2 are BRAM/SRL by the same rule (SRL: 32 bits per LUT);
* loops run at II=1: a layer's cycles are its loop trip counts (reads, MAC tiles, writes).
"""

from __future__ import annotations

import math
from typing import Any

BRAM18_SHAPES = [(1, 16384), (2, 8192), (4, 4096), (9, 2048), (18, 1024), (36, 512)]
LUTRAM_BITS = 1024


def bram18(depth: int, width: int, partitions: int = 1) -> int:
    """BRAM18 blocks for ``partitions`` banks of an array of ``depth`` words of ``width`` bits in total."""
    if depth <= 0 or width <= 0:
        return 0
    per = math.ceil(depth / partitions)
    if per * width <= LUTRAM_BITS:
        return 0
    return partitions * min(math.ceil(width / w) * math.ceil(per / d) for w, d in BRAM18_SHAPES)


def lutram(depth: int, width: int, partitions: int = 1, bits_per_lut: int = 64) -> int:
    per = math.ceil(depth / max(partitions, 1))
    if per * width > LUTRAM_BITS:
        return 0
    return partitions * math.ceil(per * width / bits_per_lut)


def _mem(depth: int, width: int, partitions: int = 1) -> tuple[int, int]:
    return bram18(depth, width, partitions), lutram(depth, width, partitions)


def layer_estimate(cfg: dict[str, Any]) -> dict[str, int]:
    """DSP, BRAM18, LUT and cycles of one layer function."""
    kind = cfg["kind"]
    ab = cfg.get("act_bits", 8)
    dsp = bram = 0
    lut = 60  # control of one dataflow process
    if kind in ("conv2d", "dense"):
        pe, simd, wb = cfg["pe"], cfg["simd"], cfg["weight_bits"]
        lanes = pe * simd
        # MAC lanes and requantizer by the FPGA cost model's rules (one rule for both reports);
        # an integer layer's requantizer is the template's 33 x 31-bit product
        from hilc.targets.hls.cost import mac_cost, requant_dsp

        m = mac_cost(cfg.get("format") or wb, cfg.get("act_format") or ab, cfg["acc_bits"], ab)
        dsp += lanes * m["dsp"] + (requant_dsp(cfg["acc_bits"], cfg["mult_bits"]) if cfg.get("format")
                                   else requant_dsp(33, 31))
        lut += lanes * m["lut"] + simd * m["cast_lut"]
        lut += 150
        n_out = cfg["oc"] if kind == "conv2d" else cfg["o"]
        k = cfg["kh"] * cfg["kw"] * cfg["cg"] if kind == "conv2d" else cfg["k"]
        b, lr = _mem(n_out * k, wb, lanes)
        bram += b
        lut += lr + lutram(n_out, 32 + 31 + 6)  # bias, multiplier and shift ROMs
        if kind == "conv2d":
            b, lr = _mem(cfg["span"] * cfg["w"] * cfg["c"], ab, cfg["span"] * simd)
            bram += b
            lut += lr
            tiles = cfg["og"] // pe
            per_tile = cfg["kh"] * cfg["kw"] * (cfg["cg"] // simd) + pe  # MAC loop, then the PE writes
            cycles = cfg["h"] * cfg["w"] * cfg["c"] + cfg["oh"] * cfg["ow"] * cfg["groups"] * tiles * per_tile
        else:
            b, lr = _mem(k, ab, simd)
            bram += b
            lut += lr
            cycles = cfg["rows"] * (k + (cfg["o"] // pe) * (k // simd + pe))
    elif kind in ("maxpool", "avgpool"):
        b, lr = _mem(cfg["span"] * cfg["w"] * cfg["c"], ab, cfg["span"] * max(1, cfg["kw"]))
        bram += b
        lut += lr + cfg["kh"] * cfg["kw"] * (ab + 4)
        if kind == "avgpool":
            dsp += 4
            lut += 150
        cycles = cfg["h"] * cfg["w"] * cfg["c"] + cfg["oh"] * cfg["ow"] * cfg["c"]
    elif kind == "gather":
        b, lr = _mem(cfg["n_in"], ab)
        bram += b
        lut += lr + 40
        cycles = cfg["n_in"] + cfg["n"]
    elif kind == "softmax":
        b, lr = _mem(cfg["len"] * cfg["inner"], ab)
        bram += b + bram18(256, 17)
        lut += lr + 400
        dsp += 12
        cycles = cfg["outer"] * (3 * cfg["len"] * cfg["inner"] + 8 * cfg["inner"])
    elif kind == "reduce_mean":
        dsp += 4
        lut += 150 + lutram(cfg["inner"], 32)
        bram += bram18(cfg["inner"], 32)
        cycles = cfg["n"] + cfg["outer"] * cfg["inner"]
    elif kind == "embedding":
        b, lr = _mem(cfg["vocab"] * cfg["d"], ab)
        bram += b
        lut += lr + 40
        cycles = cfg["n"] * cfg["d"]
    elif kind == "select":
        b, lr = _mem(cfg["len"] * cfg["inner"], ab)
        bram += b
        lut += lr + 40
        cycles = cfg["outer"] * (cfg["len"] + cfg["n_idx"]) * cfg["inner"]
    elif kind == "matmul":
        for depth in (cfg["m"] * cfg["k"], cfg["nn"] * cfg["k"]):
            b, lr = _mem(depth, ab)
            bram += b
            lut += lr
        dsp += 1 + 4
        lut += 250
        cycles = cfg["batch"] * (cfg["m"] * cfg["k"] + cfg["nn"] * cfg["k"] + cfg["m"] * cfg["nn"] * cfg["k"])
    elif kind == "layernorm":
        b, lr = _mem(cfg["len"], 16)
        bram += b
        lut += lr + 900
        dsp += 16
        cycles = cfg["rows"] * (3 * cfg["len"] + 31 + 12)
    else:  # one element per cycle: copy, clamp, requant, lut, add, mul, fork, concat
        cycles = cfg["n"]
        if cfg.get("mode") == "buffered":  # a broadcast operand read whole first
            b, lr = _mem(cfg["n_small"], ab)
            bram += b
            lut += lr
            cycles += cfg["n_small"]
        if kind in ("requant", "mul", "concat"):
            dsp += 4
            lut += 120
        elif kind == "add":
            dsp += 4
            lut += 160
        elif kind == "lut":
            lut += lutram(cfg["table_size"], cfg["out_bits"])
        else:
            lut += 20
    return {"dsp": dsp, "bram18": bram, "lut": lut, "cycles": int(cycles)}


def fifo_estimate(depth: int, width: int) -> tuple[int, int]:
    """(BRAM18, LUT) of one hls::stream FIFO."""
    if depth <= 2:
        return 0, width  # registers
    if depth * width <= LUTRAM_BITS:
        return 0, math.ceil(depth * width / 32)  # shift-register LUTs
    return bram18(depth, width), 30
