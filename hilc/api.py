"""The Python API: the command line's verbs as functions returning objects that carry the report.

    import hilc
    m = hilc.compile("resnet8.onnx", "out/resnet8", calib="calib.npy", board="qemu-mps2-an386")
    y = m.simulate(x)                      # or hilc.simulate(m, x)
    r = hilc.run(m, x, board="qemu-mps2-an386", check=True)
    hilc.profile(m, board="qemu-mps2-an386"); hilc.report(m)

Every keyword ``compile`` does not name itself goes to ``compile_model`` unchanged, so options
added there (board, cpu, flash_bytes, ...) work here without touching this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hilc.compiler.ir import Graph
from hilc.errors import HilcError
from hilc.fileio import read_json

if TYPE_CHECKING:
    from hilc.inspect_onnx import Inspection


@dataclass
class Compiled:
    """A compiled model: its integer graph, its report and (once written) its directory."""

    graph: Graph
    report: dict[str, Any]
    path: Path | None = None
    result: Any = field(default=None, repr=False)  # pipeline.CompileResult of a fresh compile

    def simulate(self, x: np.ndarray, raw: bool = False, engine: str = "numpy") -> np.ndarray:
        return simulate(self, x, raw=raw, engine=engine)

    def reload_report(self) -> dict[str, Any]:
        """Re-read OUT/report.json (profile results are added to it on disk)."""
        if self.path is not None and (self.path / "report.json").exists():
            self.report = read_json(self.path / "report.json", "report")
        return self.report


@dataclass
class RunResult:
    outputs: np.ndarray
    board: str
    mismatches: int | None = None  # with check=True: samples differing from the simulator
    farm: Any = None  # regress: the hilc.hil.farm.FarmResult (answers per board, bad boards)


def _progress(quiet: bool, label: str):
    from hilc.progress import progress_bar

    return progress_bar(label, quiet)


def compile(model: str | Path, output: str | Path | None = None, calib: str | Path | np.ndarray | None = None, *,
            calib_method: str = "minmax", percentile: float = 99.99, target: str = "sim",
            quiet: bool = True, **options: Any) -> Compiled:
    """Compile an ONNX model (``hilc compile``). With ``output`` the artifacts are written there
    (needed by run/profile/report/export_onnx). ``options`` go to ``compile_model`` as they are."""
    from hilc.compiler.pipeline import compile_model, write_artifacts

    with _progress(quiet, "calibrating") as update:
        result = compile_model(model, calib, calib_method, percentile, target, progress=update, **options)
    path = None
    if output is not None:
        path = Path(output)
        write_artifacts(path, result)
    return Compiled(result.graph, result.report, path, result)


def load(path: str | Path) -> Compiled:
    """A model compiled earlier (``hilc compile -o PATH``)."""
    from hilc.compiler.pipeline import load_artifacts

    p = Path(path)
    graph = load_artifacts(p)
    report = read_json(p / "report.json", "report") if (p / "report.json").exists() else {}
    return Compiled(graph, report, p)


def _compiled(m: Compiled | str | Path) -> Compiled:
    return m if isinstance(m, Compiled) else load(m)


def _written(m: Compiled | str | Path, what: str) -> Compiled:
    c = _compiled(m)
    if c.path is None:
        raise HilcError(f"{what} needs the compiled model on disk: pass output= to hilc.compile")
    return c


def simulate(m: Compiled | str | Path, x: np.ndarray, raw: bool = False, engine: str = "numpy") -> np.ndarray:
    """Bit-accurate simulation (``hilc simulate``): float32 outputs, or the raw integers.
    ``engine="tvm"``: the same integers from a TVM-built module (``hilc[tvm]``);
    ``engine="hls-csim"``: the C-simulated HLS design of a ``target="hls"`` compile."""
    from hilc.sim.simulator import simulate as sim

    if engine == "hls-csim":
        from hilc.targets.hls.build import csim

        return csim(_written(m, "simulate with engine hls-csim").path, _compiled(m).graph, np.asarray(x), raw=raw)
    return sim(_compiled(m).graph, np.asarray(x), raw=raw, engine=engine)


def run(m: Compiled | str | Path, x: np.ndarray, board: str, check: bool = False, port: str | None = None,
        raw: bool = False, quiet: bool = True) -> RunResult:
    """Run inputs on a board over the serial link (``hilc run``); QEMU boards are started here."""
    from hilc.hil.boards import load_board
    from hilc.hil.runner import run_command
    from hilc.sim.simulator import check_inputs

    c = _written(m, "run")
    b = load_board(board)
    x = check_inputs(c.graph, x)
    with _progress(quiet, f"running on {b.name}") as update:
        y, bad = run_command(c.path, b, c.graph, x, check, port, raw, update)
    return RunResult(y, b.name, bad if check else None)


@dataclass
class Evaluation:
    outputs: np.ndarray
    metrics: dict[str, Any]  # samples, seconds, samples_per_s, top1 / top1_agreement, shards with a cluster


def evaluate(m: Compiled | str | Path, x: np.ndarray, labels: np.ndarray | None = None,
             reference: np.ndarray | None = None, cluster: str | None = None, shard: int | None = None,
             raw: bool = False, quiet: bool = True, engine: str = "numpy") -> Evaluation:
    """Accuracy of the compiled model on a dataset (``hilc evaluate``): the simulator's outputs
    and top-1 against ``labels`` and/or agreement with ``reference`` outputs. ``cluster``
    (``hilc[ray]``: "local", "auto" or an address) runs shards of ``shard`` samples as Ray tasks;
    the outputs are bit-identical to a single-process run. ``engine="tvm"`` computes the same
    integers with the TVM-built module (``hilc[tvm]``)."""
    import time

    from hilc.distributed import SHARD_SAMPLES, accuracy, shard_bounds, simulate_sharded
    from hilc.sim.simulator import check_inputs

    c = _compiled(m)
    x = check_inputs(c.graph, x)
    shard = shard or SHARD_SAMPLES
    t0 = time.perf_counter()
    from hilc.progress import parts_progress

    with parts_progress("evaluating" + (f" on Ray ({cluster})" if cluster else ""), quiet) as update:
        y = simulate_sharded(c.graph, x, raw=raw, cluster=cluster, shard=shard, progress=update, engine=engine)
    dt = time.perf_counter() - t0
    metrics = {**accuracy(y, labels, reference), "seconds": dt, "samples_per_s": len(x) / dt}
    if cluster is not None:
        metrics["shards"] = len(shard_bounds(len(x), shard))
    return Evaluation(y, metrics)


def regress(m: Compiled | str | Path | list, x: np.ndarray | list, farm: str | Path, kind: str | None = None,
            cluster: str = "local", chunk: int = 4, quiet: bool = True, check: bool = True,
            raw: bool = False) -> RunResult | list[RunResult]:
    """Inputs spread over every board of a kind in a farm inventory (``hilc regress``, ``hilc run
    --farm``), one Ray actor per board; failed boards are dropped and their work reassigned.
    ``mismatches`` counts outputs differing from the simulator (None with ``check=False``: the
    simulator is not run); ``farm`` holds the per-board FarmResult; ``raw``: the integer outputs.

    ``m`` a list of compiled models (``x`` one array for all, or a list with one per model):
    they are spread over the boards together (a QEMU board switches firmware as needed) and a
    list of RunResults comes back, each checked against its own model's simulator."""
    from hilc.compiler.arith import dequantize_host
    from hilc.distributed import require_ray
    from hilc.hil.farm import farm_models, simulator_raw
    from hilc.progress import parts_progress
    from hilc.sim.simulator import check_inputs

    if not isinstance(chunk, int) or chunk < 1:  # range(0, n, chunk) would raise, or silently run nothing
        raise HilcError(f"--chunk {chunk}: expected at least 1 input per work unit")
    require_ray()
    several = isinstance(m, list | tuple)
    ms = [_written(c, "regress") for c in (m if several else [m])]
    xs = list(x) if isinstance(x, list | tuple) else [x] * len(ms)
    if len(xs) != len(ms):
        raise HilcError(f"regress: {len(ms)} models and {len(xs)} input arrays")
    xs = [check_inputs(c.graph, xi).astype(np.float32) for c, xi in zip(ms, xs, strict=True)]
    with parts_progress("running on the board farm", quiet) as update:
        results = farm_models([(c.path, c.graph, xi) for c, xi in zip(ms, xs, strict=True)], farm, kind, cluster,
                              chunk, update)
    out = []
    for c, xi, (y, res) in zip(ms, xs, results, strict=True):
        bad = None
        if check:
            sim = simulator_raw(c.graph, xi)
            bad = int(np.sum(np.any(sim.reshape(len(xi), -1) != y.reshape(len(xi), -1), axis=1)))
        if not raw:
            qo = c.graph.tensors[c.graph.outputs[0]].quant
            y = dequantize_host(y, qo.scale, qo.zero_point)
        out.append(RunResult(y, ",".join(res.per_board), bad, res))
    return out if several else out[0]


def flash(m: Compiled | str | Path, board: str) -> str:
    """Build the board firmware and flash it (``hilc flash``); returns what was done."""
    from hilc.hil.boards import load_board
    from hilc.hil.runner import flash as do_flash

    c = _written(m, "flash")
    return do_flash(c.path, load_board(board), c.graph)


def profile(m: Compiled | str | Path, board: str, x: np.ndarray | None = None,
            port: str | None = None) -> dict[str, Any]:
    """Per-layer ticks of one inference (``hilc profile``); also stored in report.json."""
    from hilc.hil.boards import load_board
    from hilc.hil.runner import profile_command

    c = _written(m, "profile")
    prof = profile_command(c.path, load_board(board), c.graph,
                           None if x is None else np.asarray(x, np.float32), port)
    c.reload_report()
    return prof


def report(m: Compiled | str | Path, output: str | Path | None = None,
           accuracy: dict[str, Any] | None = None) -> Path:
    """Write the self-contained HTML report (``hilc report``); returns its path."""
    from hilc.report_html import write_report

    # only report.json is required (graph.json adds the memory timeline), so a path is not loaded
    path = m.path if isinstance(m, Compiled) else Path(m)
    if path is None:
        raise HilcError("report needs the compiled model on disk: pass output= to hilc.compile")
    if not path.is_dir():
        raise HilcError(f"{path}: no such compiled model directory")
    return write_report(path, output, accuracy)


def export_onnx(m: Compiled | str | Path, output: str | Path) -> Path:
    """Write the integer model as a QDQ ONNX graph (``hilc export-onnx``)."""
    import onnx

    from hilc.targets.onnx_qdq import export_qdq

    model = export_qdq(_compiled(m).graph)
    from hilc.fileio import atomic_write

    return atomic_write(output, lambda tmp: onnx.save(model, str(tmp)), "an .onnx file")


def inspect(model: str | Path) -> Inspection:
    """Operators (supported or not), parameters, MACs, activation memory and fitting boards
    of an ONNX file (``hilc inspect``); returns an ``Inspection``."""
    from hilc.inspect_onnx import inspect_model

    return inspect_model(model)
