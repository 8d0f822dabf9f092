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
    """Owns one board: starts it (QEMU) or opens its port, checks the model, runs chunks.

    It may hold several models (``add_model``): a QEMU board reboots its emulator with another
    model's firmware when a chunk of that model comes (a real board runs the model it was
    flashed with, checked by its hash)."""

    def __init__(self, board: FarmBoard, graph: Graph | None = None, elf: bytes | None = None,
                 timeout: float = 2.0) -> None:
        self.board, self.timeout = board, timeout
        self.models: dict[int, tuple[Graph, bytes | None]] = {} if graph is None else {0: (graph, elf)}
        self.current: int | None = None
        self.qemu = None
        self.link = None
        self.tmp = tempfile.TemporaryDirectory(prefix=f"hilc-farm-{board.name}-")

    def add_model(self, key: int, graph: Graph, elf: bytes | None) -> None:
        self.models[key] = (graph, elf)

    def start(self, key: int = 0) -> int | None:
        """Boot/open the board and verify it runs model ``key``; returns the QEMU pid (None: real board)."""
        import serial

        from hilc.hil.protocol import Link
        from hilc.hil.qemu import QemuBoard

        graph, elf_bytes = self.models[key]
        b = load_board(self.board.kind)
        if b.is_qemu:
            if self.qemu is not None:  # another model's firmware: a fresh emulator
                self.qemu.stop()
                self.qemu = None
            elf = Path(self.tmp.name) / f"firmware-{key}.elf"  # the actor may run on another machine
            elf.write_bytes(elf_bytes)
            self.qemu = QemuBoard(b.run["machine"], elf)
            ser = self.qemu.start()
            self.link = Link(ser, timeout=self.timeout, retries=2)
        elif self.link is None:
            port = self.board.port or b.uart.get("port")
            try:
                ser = serial.serial_for_url(port, baudrate=b.uart.get("baud", 115200), timeout=self.timeout)
            except (serial.SerialException, OSError) as e:
                raise HilcError(f"board {self.board.name}: serial port {port}: {e}") from None
            self.link = Link(ser, timeout=self.timeout, retries=2)
        info = self.link.info()
        if info.model_hash != graph.content_hash():
            raise HilcError(f"board {self.board.name} runs firmware for another model: run hilc flash first")
        self.current = key
        return None if self.qemu is None else self.qemu.proc.pid

    def host(self) -> str:
        import socket

        return socket.gethostname()

    def run(self, qx: np.ndarray, key: int = 0) -> tuple[np.ndarray, int | None]:
        """Raw outputs of model ``key`` for the chunk ``qx``, and the QEMU pid that gave them."""
        if key != self.current:
            self.start(key)
        graph = self.models[key][0]
        out_size = int(np.prod(graph.tensors[graph.outputs[0]].shape[1:]))
        outs = []
        for sample in qx:
            self.link.write_input(sample.tobytes())
            self.link.run()
            outs.append(np.frombuffer(self.link.read_output(out_size), np.int8))
        return np.stack(outs), None if self.qemu is None else self.qemu.proc.pid

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
    switches: int = 0                         # firmware changes (several models on one board)


@dataclass
class FarmJob:
    """One compiled model of a farm run and its quantized inputs (n, features)."""
    out_dir: Path
    graph: Graph
    qx: np.ndarray


def run_jobs_on_farm(jobs: list[FarmJob], boards: list[FarmBoard], cluster: str = "local", chunk: int = 4,
                     progress: Callable[[int, int], None] | None = None, chunk_timeout: float | None = None,
                     on_start: Callable[[dict[str, int | None]], None] | None = None,
                     on_chunk: Callable[[int], None] | None = None) -> list[FarmResult]:
    """Raw outputs of every job's quantized inputs (n, features) from the boards in ``boards``.

    The work items are (model, chunk of inputs); a free board takes a chunk of the model it runs,
    else of the next model it can run (a QEMU board reboots with that model's firmware; a real
    board only runs the model it was flashed with). Every input of every model is answered
    exactly once. ``on_start`` gets {board: QEMU pid}; ``on_chunk(answered_inputs)`` runs after
    each accepted chunk (tests use both to kill a board mid-run). A board whose link stops
    answering fails within the link's timeouts; one that takes longer than ``chunk_timeout``
    seconds over a chunk is dropped too (its actor and emulator killed, a late answer ignored)
    and its chunk reassigned. The default deadline adapts: 5 x the slowest chunk answered so far,
    at least 10 s (300 s before any answer, so a slow model on a real board is not mistaken for a
    dead one). One FarmResult per job, in job order."""
    from hilc.distributed import connect
    from hilc.hil.runner import ensure_firmware

    ray = connect(cluster)
    kinds = {b.kind: load_board(b.kind) for b in boards}
    # num_cpus=0: a board actor mostly waits on its serial link (QEMU's own CPU use is its process)
    Actor = ray.remote(num_cpus=0, max_restarts=0)(BoardWorker)
    actors = {b.name: Actor.remote(b) for b in boards}
    for key, job in enumerate(jobs):
        graph_ref = ray.put(job.graph)
        for kind, bd in kinds.items():
            elf = ray.put(ensure_firmware(job.out_dir, bd).read_bytes()) if bd.is_qemu else None
            for b in boards:
                if b.kind == kind:
                    actors[b.name].add_model.remote(key, graph_ref, elf)
    real = {b.name for b in boards if not kinds[b.kind].is_qemu}
    # what each board can run: every model for QEMU; for a real board the one it carries
    can_run: dict[str, set[int]] = {b.name: set(range(len(jobs))) for b in boards}
    bad: dict[str, str] = {}
    healthy: list[str] = []
    current: dict[str, int] = {}
    pids: dict[str, int | None] = {}
    # QEMU boards boot round-robin over the models, so every model starts at once
    qemu_names = [b.name for b in boards if b.name not in real]
    first = {name: i % len(jobs) for i, name in enumerate(qemu_names)}
    started = {name: actors[name].start.remote(first[name]) for name in qemu_names}
    for name in real:  # a real board: the first model whose hash it reports
        for key in range(len(jobs)):
            try:
                ray.get(actors[name].start.remote(key))
                first[name] = key
                can_run[name] = {key}
                pids[name] = None
                healthy.append(name)
                current[name] = key
                break
            except Exception as e:
                why = _why(e)
        else:
            bad[name] = why if len(jobs) == 1 else "runs none of the models (run hilc flash first)"
    for name, ref in started.items():
        try:
            pids[name] = ray.get(ref)
            healthy.append(name)
            current[name] = first[name]
        except Exception as e:
            bad[name] = _why(e)
    healthy.sort(key=[b.name for b in boards].index)
    if not healthy:
        _stop(ray, actors)
        raise HilcError("no board of the farm answered: " + "; ".join(f"{k}: {v}" for k, v in bad.items()),
                        exit_code=1)
    if on_start is not None:
        on_start(dict(pids))
    total = sum(len(j.qx) for j in jobs)
    # work items (model, (start, end)), model by model
    chunks = _Queues([deque((a, min(len(j.qx), a + chunk)) for a in range(0, len(j.qx), chunk)) for j in jobs])
    results: dict[tuple[int, int], tuple[np.ndarray, str]] = {}
    in_flight: dict[Any, tuple[str, tuple[int, tuple[int, int]]]] = {}
    idle = deque(healthy)
    hosts = dict(zip(healthy, ray.get([actors[n].host.remote() for n in healthy]), strict=True))
    sent_at: dict[str, float] = {}
    slowest = 0.0
    reassigned, done, switches = 0, 0, 0
    answered = dict.fromkeys(actors, 0)
    part = getattr(progress, "part", None)  # hilc.progress.PartsProgress: one line per board (and model)
    label = (lambda key: f"model {key + 1}: {jobs[key].out_dir.name}") if len(jobs) > 1 else None
    per_model_done = [0] * len(jobs)
    if part is not None:
        for name in actors:
            part(name, 0, None, f"BAD: {bad[name]}" if name in bad else "")
        if label is not None:
            for key, j in enumerate(jobs):
                part(label(key), 0, len(j.qx))

    def take(name: str) -> tuple[int, tuple[int, int]] | None:
        """The board's next item: one of the model it runs, else of the first model it can run."""
        for key in (current.get(name), *sorted(can_run[name])):
            if key is not None and key in can_run[name] and chunks.per_model[key]:
                return key, chunks.per_model[key].popleft()
        return None

    try:
        while chunks or in_flight:
            waiting = deque()
            while chunks and idle:
                name = idle.popleft()
                item = take(name)
                if item is None:  # nothing this board can run: it waits
                    waiting.append(name)
                    continue
                key, span = item
                if current.get(name) != key:
                    switches += 1
                current[name] = key
                in_flight[actors[name].run.remote(jobs[key].qx[span[0]:span[1]], key)] = (name, item)
                sent_at[name] = time.monotonic()
            idle.extend(waiting)
            if not in_flight:
                left = [jobs[k].out_dir.name for k, q in enumerate(chunks.per_model) if q]
                raise HilcError(f"every board that can run {', '.join(left)} failed with {len(chunks)} chunks left: "
                                + "; ".join(f"{k}: {v}" for k, v in bad.items()), exit_code=1)
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            if not ready:
                now = time.monotonic()
                deadline = chunk_timeout or (max(10.0, 5 * slowest) if slowest else 300.0)
                for ref, (name, item) in list(in_flight.items()):
                    if now - sent_at[name] > deadline:  # the board or its actor hangs: drop it
                        in_flight.pop(ref)
                        span = item[1]
                        bad[name] = f"no answer to {span[1] - span[0]} inputs within {deadline:.3g} s"
                        chunks.put_back(item)
                        reassigned += 1
                        _kill_emulator(pids.get(name), hosts.get(name))
                        ray.kill(actors[name])
                        if part is not None:
                            part(name, answered[name], None, f"BAD: {bad[name]} (chunk reassigned)")
                continue
            name, item = in_flight.pop(ready[0])
            key, span = item
            try:
                y, pids[name] = ray.get(ready[0])
            except Exception as e:  # the board (or its actor) failed: drop it, give the chunk to another
                bad[name] = _why(e)
                chunks.put_back(item)
                reassigned += 1
                if part is not None:
                    part(name, answered[name], None, f"BAD: {bad[name]} (chunk reassigned)")
                _stop(ray, {name: actors[name]}, timeout=5)  # a hung emulator must not outlive its actor
                continue
            if (key, span[0]) in results:  # cannot happen with one owner per chunk; never count twice
                raise AssertionError(f"chunk {span} of model {key} answered twice")
            results[(key, span[0])] = (y, name)
            slowest = max(slowest, time.monotonic() - sent_at[name])
            done += span[1] - span[0]
            per_model_done[key] += span[1] - span[0]
            answered[name] += span[1] - span[0]
            idle.append(name)
            if part is not None:
                part(name, answered[name])
                if label is not None:
                    part(label(key), per_model_done[key], len(jobs[key].qx))
            if progress is not None:
                progress(done, total)
            if on_chunk is not None:
                on_chunk(done)
    finally:
        _stop(ray, {k: v for k, v in actors.items() if k not in bad})
    out: list[FarmResult] = []
    for key in range(len(jobs)):
        outs, by = [], []
        for a in sorted(a for k, a in results if k == key):
            y, name = results[(key, a)]
            outs.append(y)
            by += [name] * len(y)
        per_board = {b.name: by.count(b.name) for b in boards}
        out.append(FarmResult(np.concatenate(outs), by, bad, reassigned, per_board, switches))
    return out


class _Queues:
    """The work items left, a queue per model (a chunk given back goes first in its model's)."""

    def __init__(self, per_model: list[deque]) -> None:
        self.per_model = per_model

    def __bool__(self) -> bool:
        return any(self.per_model)

    def __len__(self) -> int:
        return sum(len(q) for q in self.per_model)

    def put_back(self, item: tuple[int, tuple[int, int]]) -> None:
        self.per_model[item[0]].appendleft(item[1])


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
    return farm_models([(Path(out_dir), graph, x)], inventory, kind, cluster, chunk, progress, **hooks)[0]


def farm_models(models: list[tuple[Path, Graph, np.ndarray]], inventory: str | Path, kind: str | None = None,
                cluster: str = "local", chunk: int = 4, progress=None,
                **hooks) -> list[tuple[np.ndarray, FarmResult]]:
    """Several compiled models ``(out_dir, graph, inputs)`` spread together over the farm's
    boards of one kind (``hilc regress OUT OUT ... INPUT``): per model, its outputs (model
    layout, raw int8) and FarmResult."""
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
    jobs = []
    for out_dir, graph, x in models:
        name = graph.inputs[0]
        q = graph.tensors[name].quant
        qx = quantize_host(to_physical(graph, name, x), q.scale, q.zero_point).reshape(len(x), -1)
        jobs.append(FarmJob(Path(out_dir), graph, qx))
    results = run_jobs_on_farm(jobs, boards, cluster, chunk, progress, **hooks)
    out = []
    for (_, graph, x), res in zip(models, results, strict=True):
        out_shape = graph.tensors[graph.outputs[0]].shape
        out.append((to_logical(graph, graph.outputs[0], res.outputs.reshape(len(x), *out_shape[1:])), res))
    return out


def simulator_raw(graph: Graph, x: np.ndarray) -> np.ndarray:
    """The simulator's raw outputs in the model's layout (what a board must give bit for bit)."""
    from hilc.sim.simulator import simulate

    return simulate(graph, x, raw=True)

