"""Boards: one TOML file each in hilc/boards/ (CPU, memory map, UART, timer, how to run or flash)."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from hilc.errors import HilcError


@dataclass(frozen=True)
class Board:
    name: str
    description: str
    cpu: str
    fpu: bool
    dsp: bool
    clock_hz: int
    flash_origin: int
    flash_bytes: int
    ram_origin: int
    ram_bytes: int
    uart: dict[str, Any] = field(default_factory=dict)
    timer: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)

    @property
    def is_qemu(self) -> bool:
        return self.run.get("method") == "qemu"

    @property
    def memory_map(self) -> dict[str, int]:
        return {"flash_origin": self.flash_origin, "flash_bytes": self.flash_bytes,
                "ram_origin": self.ram_origin, "ram_bytes": self.ram_bytes}

    @property
    def tick_hz(self) -> int:
        return self.clock_hz


def boards_dir() -> Path:
    return Path(str(resources.files("hilc") / "boards"))


def _is_fpga(path: Path) -> bool:
    return tomllib.loads(path.read_text()).get("kind") == "fpga"


def list_boards() -> list[Board]:
    """The MCU boards (FPGA boards: hilc.targets.hls.boards)."""
    return [load_board(p.stem) for p in sorted(boards_dir().glob("*.toml")) if not _is_fpga(p)]


def load_board(name: str) -> Board:
    path = boards_dir() / f"{name}.toml"
    if not path.exists():
        names = ", ".join(p.stem for p in sorted(boards_dir().glob("*.toml")))
        raise HilcError(f"unknown board '{name}' (boards: {names})")
    data = tomllib.loads(path.read_text())
    if data.get("kind") == "fpga":
        raise HilcError(f"'{name}' is an FPGA board ({data.get('part')}): use hilc compile --target hls --board {name}")
    keys = set(Board.__dataclass_fields__)
    return Board(**{k: v for k, v in data.items() if k in keys})
