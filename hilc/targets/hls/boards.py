"""FPGA boards: TOML files with ``kind = "fpga"`` beside the MCU boards in hilc/boards/ (part, clock,
DSP/BRAM/LUT/FF counts)."""

from __future__ import annotations

from dataclasses import dataclass

import tomllib

from hilc.errors import HilcError
from hilc.hil.boards import boards_dir

DEFAULT_FPGA_BOARD = "pynq-z2"


@dataclass(frozen=True)
class FpgaBoard:
    name: str
    description: str
    part: str
    clock_mhz: float
    dsp: int
    bram18: int
    lut: int
    ff: int

    @property
    def period_ns(self) -> float:
        return round(1000.0 / self.clock_mhz, 3)


def list_fpga_boards() -> list[FpgaBoard]:
    out = []
    for p in sorted(boards_dir().glob("*.toml")):
        data = tomllib.loads(p.read_text())
        if data.get("kind") == "fpga":
            out.append(_board(data))
    return out


def load_fpga_board(name: str) -> FpgaBoard:
    path = boards_dir() / f"{name}.toml"
    names = ", ".join(b.name for b in list_fpga_boards())
    if not path.exists():
        raise HilcError(f"unknown FPGA board '{name}' (FPGA boards: {names})")
    data = tomllib.loads(path.read_text())
    if data.get("kind") != "fpga":
        raise HilcError(f"'{name}' is an MCU board; --target hls needs an FPGA board ({names})")
    return _board(data)


def _board(data: dict) -> FpgaBoard:
    keys = set(FpgaBoard.__dataclass_fields__)
    missing = keys - set(data)
    if missing:
        raise HilcError(f"FPGA board file '{data.get('name')}' lacks {', '.join(sorted(missing))}")
    return FpgaBoard(**{k: data[k] for k in keys})
