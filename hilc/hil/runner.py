"""Flash, run and profile a compiled model on a board (QEMU or real) through the serial protocol."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import serial

from hilc.compiler.arith import dequantize_host, quantize_host
from hilc.compiler.ir import Graph
from hilc.errors import HilcError
from hilc.hil.boards import Board
from hilc.hil.protocol import BoardResetError, Link, LinkError
from hilc.hil.qemu import QemuBoard
from hilc.progress import status
from hilc.sim.simulator import run_int_batched, to_logical, to_physical


def firmware_path(out_dir: Path, board: Board) -> Path:
    return Path(out_dir) / "build" / board.name / "firmware.elf"


def ensure_firmware(out_dir: Path, board: Board) -> Path:
    """Build the board's firmware from OUT/src unless an up-to-date one exists."""
    from hilc.targets.c.build import build_board_firmware

    out_dir = Path(out_dir)
    src = out_dir / "src" / "model.c"
    if not src.exists():
        raise HilcError(f"{out_dir}: no C sources (compile with --target c or --board)")
    elf = firmware_path(out_dir, board)
    if elf.exists() and elf.stat().st_mtime >= src.stat().st_mtime:
        return elf
    with status(f"building firmware for {board.name}"):
        return build_board_firmware(out_dir, board)


@contextmanager
def connect(out_dir: Path, board: Board, graph: Graph, port: str | None = None,
            timeout: float = 5.0) -> Iterator[Link]:
    """A verified link to a board running this model's firmware (QEMU boards are started here)."""
    if board.is_qemu and port is not None:  # it would be ignored: the emulator's link is hilc's own
        raise HilcError(f"--port {port}: {board.name} is emulated; hilc starts QEMU and connects to it itself "
                        "(--port is for real boards)")
    elf = ensure_firmware(out_dir, board)
    qemu = None
    try:
        if board.is_qemu:
            qemu = QemuBoard(board.run["machine"], elf)
            with status(f"starting QEMU ({board.run['machine']})"):
                ser = qemu.start()
        else:
            name = port or board.uart.get("port")
            try:
                ser = serial.serial_for_url(name, baudrate=board.uart.get("baud", 115200), timeout=timeout)
            except (serial.SerialException, OSError) as e:
                raise HilcError(f"serial port {name}: {e}") from None
        link = Link(ser, timeout=timeout)
        try:
            info = link.info()
        except LinkError as e:
            raise HilcError(f"board {board.name} does not answer: {e}", exit_code=1) from None
        if info.model_hash != graph.content_hash():
            raise HilcError(f"board {board.name} runs firmware for another model (hash {info.model_hash:016x}, "
                            f"expected {graph.content_hash():016x}): run hilc flash first", exit_code=1)
        yield link if qemu is None else _RestartableLink(link, qemu)
    finally:
        if qemu is not None:
            qemu.stop()


def flash(out_dir: Path, board: Board, graph: Graph) -> str:
    elf = ensure_firmware(out_dir, board)
    if board.is_qemu:
        with connect(out_dir, board, graph) as link:
            info = link.info()
        return f"{elf} boots on {board.name} (QEMU): model hash {info.model_hash:016x}"
    method = board.run.get("method")
    if method == "pyocd":
        cmd = ["pyocd", "flash", "--target", board.run["target"], str(elf)]
    elif method == "openocd":
        cmd = ["openocd", "-f", board.run["config"], "-c", f"program {elf} verify reset exit"]
    else:
        raise HilcError(f"board {board.name}: unknown flashing method '{method}'")
    try:
        with status(f"flashing {board.name} with {cmd[0]}"):
            r = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise HilcError(f"{cmd[0]} is not installed (needed to flash {board.name})") from None
    if r.returncode != 0:
        raise HilcError(f"{cmd[0]} failed: {(r.stderr or r.stdout).strip().splitlines()[-1]}", exit_code=1)
    return f"flashed {elf} to {board.name} with {cmd[0]}"


def run_on_board(out_dir: Path, board: Board, graph: Graph, x: np.ndarray, port: str | None = None,
                 progress=None) -> np.ndarray:
    """Raw int8 outputs (physical layout) for real inputs x in the model's layout."""
    name = graph.inputs[0]
    q = graph.tensors[name].quant
    qx = quantize_host(to_physical(graph, name, x), q.scale, q.zero_point).reshape(len(x), -1)
    out_shape = graph.tensors[graph.outputs[0]].shape
    outs = []
    with connect(out_dir, board, graph, port) as link:
        for i, sample in enumerate(qx):
            outs.append(_run_one(link, sample, int(np.prod(out_shape[1:]))))
            if progress is not None:
                progress(i + 1, len(qx))
        if link.stats["resets"]:
            print(f"warning: {board.name} was reset {link.stats['resets']} time(s) during the run; "
                  "the samples it lost were sent again", file=sys.stderr)
    return np.stack(outs).reshape(len(x), *out_shape[1:])


class _RestartableLink:
    """A link to a QEMU board that can restart the emulator when it hangs."""

    def __init__(self, link: Link, qemu: QemuBoard) -> None:
        self.link, self.qemu = link, qemu

    def __getattr__(self, name: str):
        return getattr(self.link, name)

    def restart(self) -> None:
        self.link.reconnect(self.qemu.restart())


def _run_one(link, sample: np.ndarray, out_size: int, resets: int = 3) -> np.ndarray:
    """One inference; a QEMU board that stops answering is restarted and the sample sent once more.
    A board that was reset midway (detected by the firmware, see BoardResetError) gets the whole
    sample again, up to ``resets`` times."""
    restarted = False
    while True:
        try:
            link.write_input(sample.tobytes())
            link.run()
            return np.frombuffer(link.read_output(out_size), np.int8)
        except BoardResetError:
            if resets <= 0:
                raise
            resets -= 1
        except LinkError:
            if restarted or not isinstance(link, _RestartableLink):
                raise
            link.restart()
            restarted = True


def layerwise_build(out_dir: Path, graph: Graph) -> tuple[Path, Graph]:
    """OUT/layerwise: the same integer graph without its patch schedule, as C sources."""
    from hilc.targets.c.codegen import generate_c, write_c_project

    lw = graph.copy()
    lw.meta.pop("patch", None)
    lw_dir = Path(out_dir) / "layerwise"
    src = lw_dir / "src" / "model.c"
    if not src.exists() or src.stat().st_mtime < (Path(out_dir) / "src" / "model.c").stat().st_mtime:
        write_c_project(lw_dir, generate_c(lw))
    return lw_dir, lw


def _patch_overhead(out_dir: Path, board: Board, graph: Graph, x: np.ndarray | None, port: str | None,
                    prof: dict) -> dict:
    lw_dir, lw = layerwise_build(out_dir, graph)
    base = profile_command(lw_dir, board, lw, x, port, layerwise=True)
    p = graph.meta["patch"]
    key = "total_instructions" if "total_instructions" in prof else "total_ticks"
    # the stage alone (timed as its split node when patched): the halo cost without the rest
    from hilc.compiler.ops import OPS

    stage = set(p["stage"])
    stage_lw = sum(x["ticks"] for x in base["layers"] if x["name"] in stage)
    stage_p = sum(x["ticks"] for x in prof["layers"] if x["name"] in stage)
    macs_stage_lw = sum(OPS[n.op].macs(n, graph) for n in graph.nodes if n.name in stage)
    macs_stage_p = p["macs"] - (p["macs_layerwise"] - macs_stage_lw)
    return {"unit": key.removeprefix("total_"), "patched": prof[key], "layerwise": base[key],
            "measured_overhead": prof[key] / base[key] - 1, "predicted_mac_overhead": p["mac_overhead"],
            "macs": p["macs"], "macs_layerwise": p["macs_layerwise"],
            "stage_ticks_patched": stage_p, "stage_ticks_layerwise": stage_lw,
            "stage_measured_overhead": stage_p / max(stage_lw, 1) - 1,
            "stage_predicted_mac_overhead": macs_stage_p / max(macs_stage_lw, 1) - 1}


def run_command(out_dir: Path, board: Board, graph: Graph, x: np.ndarray, check: bool, port: str | None = None,
                raw: bool = False, progress=None) -> tuple[np.ndarray, int]:
    """What `hilc run` does: outputs in the model's layout, and the number of mismatches with the
    simulator (0 without --check)."""
    y = run_on_board(out_dir, board, graph, x, port, progress)
    mismatches = 0
    if check:
        name = graph.inputs[0]
        q = graph.tensors[name].quant
        sim = run_int_batched(graph, quantize_host(to_physical(graph, name, x), q.scale, q.zero_point))
        mismatches = int(np.sum(np.any(sim.reshape(len(x), -1) != y.reshape(len(x), -1), axis=1)))
    out = graph.outputs[0]
    y = to_logical(graph, out, y)
    if not raw:
        qo = graph.tensors[out].quant
        y = dequantize_host(y, qo.scale, qo.zero_point)
    return y, mismatches


def profile_command(out_dir: Path, board: Board, graph: Graph, x: np.ndarray | None = None,
                    port: str | None = None, layerwise: bool = False) -> dict:
    """Per-layer ticks of one inference; also written into OUT/report.json under 'profile'.
    A patched model is also profiled as its own layer-by-layer build (OUT/layerwise) so the
    measured cost of patching sits next to the MAC overhead the scheduler predicted
    (``profile["patch"]``; the whole patch stage is timed as its split node)."""
    name = graph.inputs[0]
    size = int(np.prod(graph.tensors[name].shape[1:]))
    if x is None:
        sample = np.zeros(size, np.int8)
    else:
        q = graph.tensors[name].quant
        sample = quantize_host(to_physical(graph, name, x[:1]), q.scale, q.zero_point).reshape(-1)
    with connect(out_dir, board, graph, port) as link, status(f"profiling on {board.name}"):
        info = link.info()
        link.write_input(sample.tobytes())
        total, ticks = link.profile()
    layers = [{"name": n.name, "op": n.op, "ticks": t} for n, t in zip(graph.nodes, ticks, strict=False)]
    prof = {"board": board.name, "timer": info.timer, "tick_hz": info.tick_hz, "total_ticks": total,
            "layers": layers, "sum_of_layers": sum(ticks)}
    if info.timer == "systick" and board.is_qemu:
        per_tick = 1_000_000_000 // info.tick_hz  # -icount shift=0: one instruction per ns
        prof["instructions_per_tick"] = per_tick
        prof["total_instructions"] = total * per_tick
    if graph.meta.get("patch") and not layerwise:
        prof["patch"] = _patch_overhead(out_dir, board, graph, x, port, prof)
    report_path = Path(out_dir) / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report["profile"] = prof
    tmp = report_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(report_path)
    return prof
