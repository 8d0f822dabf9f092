"""Per-board latency model for the bit allocation: instructions per MAC for each op kind and weight
width, plus a cost per output element, fitted to ``hilc profile`` counts (``fit_cost_model``).

Activation widths do not change the kernels' cost (sub-byte activations live in int8
containers), weight widths do: packed rows are unpacked into SIMD lanes word by word.
The fitted models live in ``hilc/boards/costs/<board>.json`` (written by benchmarks/mixed.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from hilc.errors import HilcError

KINDS = ("conv", "depthwise", "pointwise", "dense")
DEFAULT_BOARD = "qemu-mps2-an386"


def costs_dir() -> Path:
    return Path(str(resources.files("hilc") / "boards" / "costs"))


@dataclass
class CostModel:
    board: str
    per_mac: dict[str, dict[str, float]]  # kind -> weight bits -> instructions per MAC
    per_output: dict[str, float]  # kind -> instructions per output element (requantization, im2col)
    fitted_on: list[str]
    per_packed_input: float = 0.0  # per im2col element read from a packed 4-bit input
    per_packed_output: float = 0.0  # per output element written as a packed nibble

    def layer(self, layer: Any, weight_bits: int, act_bits: int = 8) -> float:
        kind = layer.kind if layer.kind in self.per_mac else "conv"
        per = self.per_mac[kind]
        # widths kept in int8 containers run the int8 kernel
        bits = str(weight_bits) if str(weight_bits) in per else "8"
        cost = layer.macs * per[bits] + layer.outputs * self.per_output[kind]
        if act_bits == 4 and getattr(layer, "in_packable", False):
            cost += layer.col * self.per_packed_input
        return cost

    def packed_output(self, layer: Any) -> float:
        return layer.outputs * self.per_packed_output

    def to_json(self) -> dict[str, Any]:
        return {"board": self.board, "per_mac": self.per_mac, "per_output": self.per_output,
                "per_packed_input": self.per_packed_input, "per_packed_output": self.per_packed_output,
                "fitted_on": self.fitted_on}


def load_cost_model(board: str | None = None) -> CostModel:
    """The fitted model of ``board`` (default: qemu-mps2-an386, whose profiles are exact
    instruction counts); a board without one uses the model of a board with the same CPU."""
    name = board or DEFAULT_BOARD
    path = costs_dir() / f"{name}.json"
    if not path.exists():
        from hilc.hil.boards import load_board

        cpu = load_board(name).cpu
        for other in sorted(costs_dir().glob("*.json")):
            data = json.loads(other.read_text())
            if data.get("cpu") == cpu:
                path = other
                break
        else:
            raise HilcError(f"no latency model for board '{name}' ({cpu}): fit one with benchmarks/mixed.py "
                            "or drop --latency-ratio")
    data = json.loads(path.read_text())
    return CostModel(data["board"], data["per_mac"], data["per_output"], data.get("fitted_on", []),
                     data.get("per_packed_input", 0.0), data.get("per_packed_output", 0.0))


def fit_cost_model(board: str, samples: list[tuple[Any, int, bool, bool, float]], fitted_on: list[str]) -> CostModel:
    """Least squares (non-negative) fit of ``instructions = a[kind, bits] * MACs + b[kind] * outputs
    + c * im2col elements read packed + d * outputs written packed`` to measured
    ``(layer, weight_bits, input packed, output packed, instructions)``."""
    from scipy.optimize import nnls

    cols: list[tuple[str, str]] = [("col4", ""), ("out4", "")]
    for la, bits, *_ in samples:
        for c in (("mac", f"{la.kind}:{bits}"), ("out", la.kind)):
            if c not in cols:
                cols.append(c)
    a = np.zeros((len(samples), len(cols)))
    y = np.zeros(len(samples))
    for i, (la, bits, in4, out4, instr) in enumerate(samples):
        # rows weighted by 1/instructions: relative errors count, small layers are not drowned
        wgt = 1.0 / max(1.0, instr)
        a[i, cols.index(("mac", f"{la.kind}:{bits}"))] = la.macs * wgt
        a[i, cols.index(("out", la.kind))] = la.outputs * wgt
        a[i, 0] = la.col * wgt * in4
        a[i, 1] = la.outputs * wgt * out4
        y[i] = instr * wgt
    coef, _ = nnls(a, y)
    per_mac: dict[str, dict[str, float]] = {}
    per_out: dict[str, float] = {}
    for (what, key), v in zip(cols[2:], coef[2:], strict=True):
        if what == "mac":
            kind, bits = key.split(":")
            per_mac.setdefault(kind, {})[bits] = float(v)
        else:
            per_out[key] = float(v)
    # kinds the profiles did not cover borrow the generic conv figures
    for kind in KINDS:
        if kind not in per_mac and "conv" in per_mac:
            per_mac[kind] = dict(per_mac["conv"])
            per_out[kind] = per_out["conv"]
    return CostModel(board, per_mac, per_out, fitted_on, float(coef[0]), float(coef[1]))
