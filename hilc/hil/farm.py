"""A board farm on Ray: inputs spread over every free board of a kind, one Ray actor per board.

The inventory is a TOML file::

    [[board]]
    name = "qemu-1"               # unique in the file
    kind = "qemu-mps2-an386"      # a board definition (hilc boards)
    count = 3                     # QEMU boards only: qemu-1-0, qemu-1-1, qemu-1-2

    [[board]]
    name = "bench-nucleo"
    kind = "nucleo-f446re"
    port = "/dev/ttyACM0"         # a real board on a serial port (flashed with hilc flash first)

Work goes out in chunks of a few inputs, one chunk in flight per board. A board that fails (its
link stops answering, its emulator dies, its actor is lost) is marked bad, its chunk goes back
to the queue for the healthy boards, and the run ends with every input answered exactly once:
a chunk's answer is accepted only from the board it was last given to, and only once.
"""

from __future__ import annotations

import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

from hilc.compiler.ir import Graph
from hilc.errors import HilcError
from hilc.hil.boards import load_board


@dataclass(frozen=True)
class FarmBoard:
    name: str
    kind: str
    port: str | None = None


def load_inventory(path: str | Path) -> list[FarmBoard]:
    path = Path(path)
    if not path.exists():
        raise HilcError(f"{path}: no such board inventory file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise HilcError(f"{path}: not valid TOML ({e})") from None
    boards: list[FarmBoard] = []
    for i, entry in enumerate(data.get("board", [])):
        name, kind = entry.get("name"), entry.get("kind")
        if not name or not kind:
            raise HilcError(f"{path}: board entry {i + 1} needs a name and a kind")
        b = load_board(kind)  # an unknown kind is named here
        count = int(entry.get("count", 1))
        if count > 1 and not b.is_qemu:
            raise HilcError(f"{path}: board '{name}': count is for QEMU boards; list real boards one by one")
        if not b.is_qemu and not entry.get("port") and not b.uart.get("port"):
            raise HilcError(f"{path}: board '{name}' ({kind}) needs a serial port")
        names = [name] if count == 1 else [f"{name}-{k}" for k in range(count)]
        boards += [FarmBoard(n, kind, entry.get("port")) for n in names]
    if not boards:
        raise HilcError(f"{path}: lists no boards ([[board]] entries)")
    seen: set[str] = set()
    for b in boards:
        if b.name in seen:
            raise HilcError(f"{path}: board name '{b.name}' appears twice")
        seen.add(b.name)
    return boards


class BoardWorker:
    """Owns one board: starts it (QEMU) or opens its port, checks the model, runs chunks."""

    def __init__(self, board: FarmBoard, graph: Graph, elf: bytes | None, timeout: float = 2.0) -> None:
        self.board, self.graph, self.elf, self.timeout = board, graph, elf, timeout
        self.qemu = None
        self.link = None
        self.out_size = int(np.prod(graph.tensors[graph.outputs[0]].shape[1:]))
        self.tmp = tempfile.TemporaryDirectory(prefix=f"hilc-farm-{board.name}-")

    def start(self) -> int | None:
        """Boot/open the board and verify it runs this model; returns the QEMU pid (None: real board)."""
        import serial

        from hilc.hil.protocol import Link
        from hilc.hil.qemu import QemuBoard

        b = load_board(self.board.kind)
        if b.is_qemu:
            elf = Path(self.tmp.name) / "firmware.elf"  # the actor may run on another machine
            elf.write_bytes(self.elf)
            self.qemu = QemuBoard(b.run["machine"], elf)
            ser = self.qemu.start()
        else:
            port = self.board.port or b.uart.get("port")
            try:
                ser = serial.serial_for_url(port, baudrate=b.uart.get("baud", 115200), timeout=self.timeout)
            except (serial.SerialException, OSError) as e:
                raise HilcError(f"board {self.board.name}: serial port {port}: {e}") from None
        self.link = Link(ser, timeout=self.timeout, retries=2)
        info = self.link.info()
        if info.model_hash != self.graph.content_hash():
            raise HilcError(f"board {self.board.name} runs firmware for another model: run hilc flash first")
        return None if self.qemu is None else self.qemu.proc.pid

    def host(self) -> str:
        import socket

        return socket.gethostname()

    def run(self, qx: np.ndarray) -> np.ndarray:
        outs = []
        for sample in qx:
            self.link.write_input(sample.tobytes())
            self.link.run()
            outs.append(np.frombuffer(self.link.read_output(self.out_size), np.int8))
        return np.stack(outs)

    def stop(self) -> None:
        if self.qemu is not None:
            self.qemu.stop()
        self.tmp.cleanup()


@dataclass
class FarmResult:
    outputs: np.ndarray                       # raw int8, physical layout, in input order
    answered_by: list[str]                    # the board that answered each input
    bad_boards: dict[str, str] = field(default_factory=dict)  # board -> why it was dropped
    reassigned: int = 0                       # chunks given to another board after a failure
    per_board: dict[str, int] = field(default_factory=dict)   # inputs answered per board


def run_on_farm(out_dir: Path, graph: Graph, qx: np.ndarray, boards: list[FarmBoard], cluster: str = "local",
                chunk: int = 4, progress: Callable[[int, int], None] | None = None, chunk_timeout: float | None = None,
                on_start: Callable[[dict[str, int | None]], None] | None = None,
                on_chunk: Callable[[int], None] | None = None) -> FarmResult:
    """Raw outputs for quantized inputs ``qx`` (n, features) from every board in ``boards``.

    ``on_start`` gets {board: QEMU pid}; ``on_chunk(answered_inputs)`` runs after each accepted
    chunk (tests use both to kill a board mid-run). A board whose link stops answering fails
    within the link's timeouts; one that takes longer than ``chunk_timeout`` seconds over a chunk
    is dropped too (its actor and emulator killed, a late answer ignored). The default deadline
    adapts: 5 x the slowest chunk answered so far, at least 10 s (300 s before any answer, so a
    slow model on a real board is not mistaken for a dead one)."""
    from hilc.distributed import connect
    from hilc.hil.runner import ensure_firmware

    ray = connect(cluster)
    elves: dict[str, bytes | None] = {}
    for kind in {b.kind for b in boards}:
        bd = load_board(kind)
        elves[kind] = ensure_firmware(out_dir, bd).read_bytes() if bd.is_qemu else None
    graph_ref = ray.put(graph)
    # num_cpus=0: a board actor mostly waits on its serial link (QEMU's own CPU use is its process)
    Actor = ray.remote(num_cpus=0, max_restarts=0)(BoardWorker)
    actors = {b.name: Actor.remote(b, graph_ref, elves[b.kind]) for b in boards}
    bad: dict[str, str] = {}
    healthy: list[str] = []
    started = {name: a.start.remote() for name, a in actors.items()}
    pids: dict[str, int | None] = {}
    for name, ref in started.items():
        try:
            pids[name] = ray.get(ref)
            healthy.append(name)
        except Exception as e:
            bad[name] = _why(e)
    if not healthy:
        _stop(ray, actors)
        raise HilcError("no board of the farm answered: " + "; ".join(f"{k}: {v}" for k, v in bad.items()),
                        exit_code=1)
    if on_start is not None:
        on_start(pids)
    n = len(qx)
    chunks = deque((a, min(n, a + chunk)) for a in range(0, n, chunk))
    results: dict[int, tuple[np.ndarray, str]] = {}
    in_flight: dict[Any, tuple[str, tuple[int, int]]] = {}
    idle = deque(healthy)
    hosts = dict(zip(healthy, ray.get([actors[n].host.remote() for n in healthy]), strict=True))
    sent_at: dict[str, float] = {}
    slowest = 0.0
    reassigned, done = 0, 0
    answered = dict.fromkeys(actors, 0)
    part = getattr(progress, "part", None)  # hilc.progress.PartsProgress: one line per board
    if part is not None:
        for name in actors:
            part(name, 0, None, f"BAD: {bad[name]}" if name in bad else "")
    try:
        while chunks or in_flight:
            while chunks and idle:
                name = idle.popleft()
                span = chunks.popleft()
                in_flight[actors[name].run.remote(qx[span[0]:span[1]])] = (name, span)
                sent_at[name] = time.monotonic()
            if not in_flight:
                raise HilcError(f"every board failed with {len(chunks)} chunks left: "
                                + "; ".join(f"{k}: {v}" for k, v in bad.items()), exit_code=1)
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            if not ready:
                now = time.monotonic()
                deadline = chunk_timeout or (max(10.0, 5 * slowest) if slowest else 300.0)
                for ref, (name, span) in list(in_flight.items()):
                    if now - sent_at[name] > deadline:  # the board or its actor hangs: drop it
                        in_flight.pop(ref)
                        bad[name] = f"no answer to {span[1] - span[0]} inputs within {deadline:.3g} s"
                        chunks.appendleft(span)
                        reassigned += 1
                        _kill_emulator(pids.get(name), hosts.get(name))
                        ray.kill(actors[name])
                        if part is not None:
                            part(name, answered[name], None, f"BAD: {bad[name]} (chunk reassigned)")
                continue
            name, span = in_flight.pop(ready[0])
            try:
                y = ray.get(ready[0])
            except Exception as e:  # the board (or its actor) failed: drop it, give the chunk to another
                bad[name] = _why(e)
                chunks.appendleft(span)
                reassigned += 1
                if part is not None:
                    part(name, answered[name], None, f"BAD: {bad[name]} (chunk reassigned)")
                _stop(ray, {name: actors[name]}, timeout=5)  # a hung emulator must not outlive its actor
                continue
            if span[0] in results:  # cannot happen with one owner per chunk; never count twice
                raise AssertionError(f"chunk {span} answered twice")
            results[span[0]] = (y, name)
            slowest = max(slowest, time.monotonic() - sent_at[name])
            done += span[1] - span[0]
            answered[name] += span[1] - span[0]
            idle.append(name)
            if part is not None:
                part(name, answered[name])
            if progress is not None:
                progress(done, n)
            if on_chunk is not None:
                on_chunk(done)
    finally:
        _stop(ray, {k: v for k, v in actors.items() if k not in bad})
    outs, by = [], []
    for a in sorted(results):
        y, name = results[a]
        outs.append(y)
        by += [name] * len(y)
    per_board = {b.name: by.count(b.name) for b in boards}
    return FarmResult(np.concatenate(outs), by, bad, reassigned, per_board)


def _kill_emulator(pid: int | None, host: str | None) -> None:
    """A hung actor cannot stop its QEMU: kill the emulator from here when it runs on this machine."""
    import os
    import signal
    import socket

    if pid is not None and host == socket.gethostname():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _why(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[-1][:200] if text else type(e).__name__


def _stop(ray, actors: dict, timeout: float = 15) -> None:
    refs = [a.stop.remote() for a in actors.values()]
    try:
        ray.get(refs, timeout=timeout)
    except Exception:
        pass
    for a in actors.values():
        ray.kill(a)


def farm_command(out_dir: Path, graph: Graph, x: np.ndarray, inventory: str | Path, kind: str | None = None,
                 cluster: str = "local", chunk: int = 4, progress=None, **hooks) -> tuple[np.ndarray, FarmResult]:
    """What ``hilc run --farm`` / ``hilc regress`` do: outputs (model layout, raw int8) from the farm."""
    from hilc.compiler.arith import quantize_host
    from hilc.sim.simulator import to_logical, to_physical

    boards = load_inventory(inventory)
    kinds = sorted({b.kind for b in boards})
    if kind is None:
        if len(kinds) > 1:
            raise HilcError(f"{inventory}: boards of several kinds ({', '.join(kinds)}): choose one with --kind")
        kind = kinds[0]
    boards = [b for b in boards if b.kind == kind]
    if not boards:
        raise HilcError(f"{inventory}: no board of kind '{kind}' (kinds: {', '.join(kinds)})")
    name = graph.inputs[0]
    q = graph.tensors[name].quant
    qx = quantize_host(to_physical(graph, name, x), q.scale, q.zero_point).reshape(len(x), -1)
    res = run_on_farm(Path(out_dir), graph, qx, boards, cluster, chunk, progress, **hooks)
    out_shape = graph.tensors[graph.outputs[0]].shape
    y = to_logical(graph, graph.outputs[0], res.outputs.reshape(len(x), *out_shape[1:]))
    return y, res


def simulator_raw(graph: Graph, x: np.ndarray) -> np.ndarray:
    """The simulator's raw outputs in the model's layout (what a board must give bit for bit)."""
    from hilc.sim.simulator import simulate

    return simulate(graph, x, raw=True)

