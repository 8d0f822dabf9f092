"""The ``hilc`` command line: a thin layer over ``hilc.compiler`` and ``hilc.sim``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from hilc import __version__
from hilc.errors import HilcError


def _progress_factory(quiet: bool):
    """A rich progress bar on a terminal, nothing otherwise."""
    if quiet or not sys.stderr.isatty():
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True)
    task = prog.add_task("calibrating", total=None)

    def update(done: int, total: int) -> None:
        prog.update(task, completed=done, total=total)

    return prog, update


def cmd_compile(args: argparse.Namespace) -> int:
    from hilc.compiler.pipeline import compile_model, write_artifacts

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise HilcError(f"{out}: exists and is not a directory")
    parallel = _parse_parallel(args.parallel) if getattr(args, "parallel", None) else None
    if parallel and args.target != "hls":
        raise HilcError("--parallel needs --target hls")
    _check_option_pairs(args)
    prog, update = _progress_factory(args.quiet)
    mixed_kw = _mixed_options(args, out)
    ptq_args = dict(ptq=args.ptq, ptq_budget=args.ptq_budget, input_range=_input_range(args.input_range))
    if getattr(args, "minifloat", None):  # minifloat conv/dense layers (FPGA path: --target hls)
        from hilc.compiler.minifloat import hook_from_spec

        ptq_args["graph_hook"] = hook_from_spec(args.minifloat)
    if getattr(args, "precision", None) == "auto-fpga" and args.fpga_error_ratio is not None:
        ptq_args["fpga_error_ratio"] = args.fpga_error_ratio
    if args.cluster is not None:
        ptq_args["cluster"] = args.cluster
    if args.engine != "numpy":  # the mixed-precision search's integer-model runs
        _require_engine(args.engine)
        ptq_args["engine"] = args.engine
    if args.percentile is None:
        args.percentile = 99.99
    if prog is not None:
        with prog:
            result = compile_model(args.model, args.calib, args.calib_method, args.percentile, args.target,
                                   args.dump_after, progress=update, cpu=args.cpu, flash_bytes=args.flash,
                                   board=args.board, patch=args.patch, sram_bytes=args.sram, parallel=parallel,
                                   order=args.order, **ptq_args, **mixed_kw)
    else:
        result = compile_model(args.model, args.calib, args.calib_method, args.percentile, args.target,
                               args.dump_after, cpu=args.cpu, flash_bytes=args.flash, board=args.board,
                               patch=args.patch, sram_bytes=args.sram, parallel=parallel, order=args.order,
                               **ptq_args, **mixed_kw)
    data_free = result.report.get("calibration", {}).get("data_free")
    if data_free is not None and not args.quiet:
        print(f"no --calib: calibrated data-free on {data_free['samples']} {data_free['source']}", file=sys.stderr)
    ptq_layers = result.report.get("ptq", {}).get("layers")
    if ptq_layers and not args.quiet:
        ran = ", ".join(f"{m['name']} ({m['seconds']:.1f} s)" for m in result.report["ptq"]["methods"])
        before = float(np.mean([la["error_before"] for la in ptq_layers]))
        after = float(np.mean([la["error_after"] for la in ptq_layers]))
        print(f"ptq: {ran}; mean layer output error {before:.4f} -> {after:.4f}")
    for name, text in result.dumps.items():
        print(f"--- after {name} ---\n{text}")
    from hilc.progress import status

    building = result.cpu or (result.board.name if result.board is not None else None)
    with status(f"building firmware for {building}", quiet=args.quiet or building is None):
        write_artifacts(out, result)
    if not args.quiet:
        _print_summary(result.report, out)
        from hilc.report_html.render import short_summary

        print(short_summary(result.report, out))
    return 0


def _check_option_pairs(args: argparse.Namespace) -> None:
    """Options that only mean something with another one: alone they would be silently ignored."""
    if args.percentile is not None and args.calib_method != "percentile":
        raise HilcError(f"--percentile {args.percentile:g} needs --calib-method percentile")
    if args.fpga_error_ratio is not None and args.precision != "auto-fpga":
        raise HilcError("--fpga-error-ratio needs --precision auto-fpga")
    if args.precision != "mixed":  # options of the mixed-precision search and what follows it
        for option, given, what in (
                ("--finetune-steps", args.finetune_steps is not None, "int8 layers are not fine-tuned"),
                (f"--engine {args.engine}", args.engine != "numpy", "it runs the search's integer models"),
                (f"--widths {args.widths}", args.widths != "subbyte", "it sets the search's candidates"),
                ("--rerank", args.rerank is not None, "it re-ranks the search's allocations"),
                ("--finetune-data", args.finetune_data is not None, "it feeds the fine-tuning"),
                ("--ptq-data", args.ptq_data is not None, "it feeds the PTQ of the allocation")):
            if given:
                raise HilcError(f"{option} needs --precision mixed ({what}): add --precision mixed")
    if _input_range(args.input_range) is not None and args.calib is not None:
        raise HilcError("--input-range sets the synthesised inputs of data-free calibration: drop it or --calib")


def _mixed_options(args: argparse.Namespace, out: Path) -> dict:
    """--precision and its budgets; the sensitivity cache is OUT/sensitivity.json."""
    from hilc.compiler.mixed import Budgets

    if args.rerank is not None and args.rerank < 1:
        raise HilcError(f"--rerank K must be a whole number >= 1, got {args.rerank}")

    # --sram is also the ILP's SRAM budget when the layers run one by one (patches plan their own)
    sram = args.sram if args.precision == "mixed" and args.patch == "off" else None
    budgets = Budgets(bitops_ratio=args.bitops_ratio, weights_bytes=args.weights_bytes,
                      latency_ratio=args.latency_ratio, sram_bytes=sram)
    pp = {"patch_precision": args.patch_precision} if args.patch_precision != "off" else {}
    if args.precision == "int8" and not budgets.any():
        return pp
    ft = {k: v for k, v in (("finetune_steps", args.finetune_steps), ("finetune_data", args.finetune_data),
                            ("ptq_data", args.ptq_data), ("rerank", args.rerank)) if v is not None}
    if args.widths == "extended":
        ft["extended_bits"] = True
    return {"precision": args.precision, "budgets": budgets, "sensitivity_cache": out / "sensitivity.json", **pp, **ft}


def _input_range(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise HilcError(f"--input-range: expected LO,HI (two numbers), got '{text}'") from None
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise HilcError(f"--input-range: LO and HI must be finite numbers, got '{text}'")
    if not lo < hi:
        raise HilcError(f"--input-range: LO must be below HI, got '{text}'")
    return lo, hi


def _load_inputs(path: str, graph) -> np.ndarray:
    """Float inputs from a .npy, checked against the model's input; errors name the file."""
    from hilc.compiler.calibrate import load_samples
    from hilc.sim.simulator import check_inputs

    x = load_samples(path)  # its errors name the file already
    try:
        return check_inputs(graph, x)
    except HilcError as e:
        raise HilcError(f"{path}: {e}") from None


def _save_npy(out: Path, y: np.ndarray) -> None:
    """Write ``out`` whole or not at all (a temp file renamed over it): no truncated .npy is left."""
    from hilc.fileio import atomic_write

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save adds no .npy suffix to it
            np.save(f, y)

    atomic_write(out, write, "an .npy file")


def _require_engine(engine: str) -> None:
    """Before any work: a missing hilc[tvm] extra is one line, not a wrapped input error."""
    if engine == "tvm":
        from hilc.targets.tvm import require_tvm

        require_tvm()


def _farm_options(p: argparse.ArgumentParser, farm_help: str, required: bool = False) -> None:
    """--farm and its options, the same for ``run --farm`` and ``regress`` (run: "with --farm")."""
    w = "" if required else "with --farm: "
    p.add_argument("--farm", required=required, metavar="INVENTORY.toml", help=farm_help)
    p.add_argument("--kind", help=f"{w}the kind of board to use (default: the only kind listed)")
    p.add_argument("--cluster", metavar="auto|local|ADDRESS", help=f"{w}the Ray cluster (default: local)")
    p.add_argument("--chunk", type=int, default=4, help=f"{w}inputs per work unit (default 4)")


def _parse_parallel(items: list[str]) -> dict[str, tuple[int, int]]:
    """--parallel LAYER=PExSIMD (repeatable) -> {layer: (pe, simd)}."""
    out = {}
    for item in items:
        name, _, val = item.partition("=")
        pe, _, simd = val.lower().partition("x")
        if not name or not pe.isdigit() or not simd.isdigit() or int(pe) < 1 or int(simd) < 1:
            raise HilcError(f"--parallel {item}: expected LAYER=PExSIMD, e.g. conv2d_1=4x8")
        out[name] = (int(pe), int(simd))
    return out


def _print_summary(report: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{Path(report['model']).name} -> {out} ({report['target']}, {report['precision']})")
    for col in ("layer", "op", "MACs", "w bits", "a bits", "out shape"):
        table.add_column(col, justify="right" if col in ("MACs", "w bits", "a bits") else "left")
    for layer in report["layers"]:
        table.add_row(layer["name"], layer["op"], f"{layer['macs']:,}", str(layer["weight_bits"] or "-"),
                      str(layer["act_bits"]), "x".join(map(str, layer["out_shape"])))
    console = Console(stderr=False, width=max(100, Console().width))
    console.print(table)
    console.print(f"total: {report['macs']:,} MACs, {report['bitops']:,} BitOps, "
                  f"{report['weights_bytes']:,} weight bytes, compiled in {report['compile_seconds']} s")
    if "arena_bytes" in report:
        console.print(f"SRAM: arena {report['arena_bytes']:,} B (lower bound {report['arena_lower_bound_bytes']:,}), "
                      f"peak with I/O {report['peak_sram_bytes']:,} B")
    if "mixed_precision" in report:
        m = report["mixed_precision"]
        console.print(f"mixed precision: {report['bitops_int8'] / max(1, report['bitops']):.2f}x fewer BitOps than "
                      f"int8, predicted perturbation {m['predicted_perturbation']:.3g} "
                      f"(measured {m['measured_perturbation']:.3g}), search {m['search_seconds']} s")
    if "fpga" in report:
        f = report["fpga"]
        t = f["total"]
        console.print(f"{f['board']} ({f['part']}, {f['clock_mhz']} MHz), estimate: {t['dsp']} DSP, "
                      f"{t['bram18']} BRAM18, {t['lut']:,} LUT; interval {f['interval_cycles']:,} cycles, "
                      f"latency <= {f['latency_cycles_upper_bound']:,} cycles ({f['latency_us_upper_bound']} us)")
    if report.get("fpga_precision", {}).get("layers"):  # --precision auto-fpga
        from hilc.targets.hls.cost import choice_label

        fp = report["fpga_precision"]
        pt = fp.get("ptq") or {}
        console.print("auto-fpga: " + ", ".join(f"{la['name']} {choice_label(la['choice'])}" for la in fp["layers"])
                      + f"; cost model {fp['cost']['lut']:,} LUT / {fp['cost']['dsp']} DSP at the design's PE x SIMD"
                      + (f"; PTQ after the pick: relative output MSE {pt['before']['relative_mse']:.3g} -> "
                         f"{pt['after']['relative_mse']:.3g}" if pt else ""))
    if report.get("patch"):
        p = report["patch"]
        budget = f" of a {p['budget_bytes']:,} B budget" if p.get("budget_bytes") else ""
        console.print(f"patches: split after {p['split_node']}, {p['grid'][0]}x{p['grid'][1]} grid: peak SRAM "
                      f"{p['peak_sram_bytes']:,} B{budget} (layer by layer {p['peak_sram_bytes_layerwise']:,} B), "
                      f"MACs {p['macs']:,} (+{p['mac_overhead']:.1%})")
    if report.get("patch_precision"):
        pp = report["patch_precision"]
        console.print(f"patch precision: outlier test max|x - zp| > {pp['threshold']} "
                      f"({pp['calibration_hot_fraction']:.0%} of calibration patches keep layer-wise widths); "
                      f"BitOps {pp['bitops_layerwise']:,} -> {pp['bitops_expected']:,} expected "
                      f"({pp['reduction_over_layerwise']:.3f}x)")
    if "flash_bytes" in report:
        console.print(f"{report['cpu']}: flash {report['flash_bytes']:,} B, code {report['code_bytes']:,} B, "
                      f"stack {report['stack_bytes']:,} B")


def cmd_simulate(args: argparse.Namespace) -> int:
    from hilc.compiler.calibrate import load_samples
    from hilc.compiler.pipeline import load_artifacts
    from hilc.sim.simulator import simulate

    _require_engine(args.engine)
    graph = load_artifacts(args.compiled)
    x = load_samples(args.input)
    if not np.issubdtype(x.dtype, np.floating):
        raise HilcError(f"{args.input}: dtype {x.dtype}, expected float32 in the model's input range")
    try:
        if args.engine == "hls-csim":
            from hilc.targets.hls.build import csim

            y = csim(args.compiled, graph, x, raw=args.raw)
        else:
            y = simulate(graph, x, raw=args.raw, engine=args.engine)
    except HilcError as e:
        raise HilcError(f"{args.input}: {e}") from None
    out = Path(args.output)
    _save_npy(out, y)
    if not args.quiet:
        print(f"wrote {out}: {y.dtype} {list(y.shape)}")
    return 0


def _board_and_graph(args):
    from hilc.compiler.pipeline import load_artifacts
    from hilc.hil.boards import load_board

    board = load_board(args.board)
    return board, load_artifacts(args.compiled)


def cmd_flash(args: argparse.Namespace) -> int:
    from hilc.hil.runner import flash

    board, graph = _board_and_graph(args)
    print(flash(Path(args.compiled), board, graph))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from hilc.fileio import check_output_path
    from hilc.hil.runner import run_command

    check_output_path(args.output, "an .npy file")  # before the board run, not after it
    farm_only = [f"--{k}" for k in ("kind", "cluster") if getattr(args, k, None) is not None]
    if getattr(args, "farm", None) and (args.board or args.port):  # the farm's inventory names the boards
        raise HilcError(f"--farm and {'--board' if args.board else '--port'}: the inventory lists the boards and "
                        "their ports (use one or the other)")
    if farm_only and not getattr(args, "farm", None):
        raise HilcError(f"{' and '.join(farm_only)} only apply with --farm INVENTORY.toml")
    if getattr(args, "farm", None):
        return _farm_run(args, args.check)
    if not args.board:
        raise HilcError("run needs --board NAME (or --farm INVENTORY.toml)")
    board, graph = _board_and_graph(args)
    x = _load_inputs(args.input, graph)
    prog, update = _progress_factory(args.quiet)
    if prog is not None:
        with prog:
            y, bad = run_command(Path(args.compiled), board, graph, x, args.check, args.port, args.raw, update)
    else:
        y, bad = run_command(Path(args.compiled), board, graph, x, args.check, args.port, args.raw)
    out = Path(args.output)
    _save_npy(out, y)
    if args.check:
        msg = f"{len(x) - bad}/{len(x)} outputs bit-exact with the simulator on {board.name}"
        print(msg if bad == 0 else f"MISMATCH: {msg}")
        return 0 if bad == 0 else 1
    if not args.quiet:
        print(f"wrote {out}: {y.dtype} {list(y.shape)} from {board.name}")
    return 0


def cmd_regress(args: argparse.Namespace) -> int:
    return _farm_run(args, check=True)


def _farm_run(args: argparse.Namespace, check: bool) -> int:
    """``run --farm`` / ``regress``: ``hilc.api.regress`` (inputs spread over the inventory's boards,
    Ray actors); ``regress`` takes several compiled models, spread over the boards together."""
    from hilc.api import load, regress
    from hilc.distributed import require_ray

    require_ray()
    dirs = [Path(d) for d in (args.compiled if isinstance(args.compiled, list) else [args.compiled])]
    if len({d.resolve() for d in dirs}) < len(dirs):
        raise HilcError("regress: a compiled model is listed twice")
    models, xs = [], []
    for d in dirs:
        models.append(load(d))
        xs.append(_load_inputs(args.input, models[-1].graph).astype(np.float32))
    several = len(models) > 1
    if several and args.output:
        names = [d.name for d in dirs]
        if len(set(names)) < len(names):
            raise HilcError("-o with several models writes DIR/<model folder name>.npy: the folder names must differ")
    results = regress(models, xs, args.farm, args.kind, args.cluster or "local", args.chunk, quiet=args.quiet,
                      check=check, raw=args.raw)
    failed, messages = 0, []
    per_board: dict[str, int] = {}
    bad_boards: dict[str, str] = {}  # over every model: a board may fail on any model's chunk
    for d, r in zip(dirs, results, strict=True):
        if args.output:
            out = Path(args.output) / f"{d.name}.npy" if several else Path(args.output)
            out.parent.mkdir(parents=True, exist_ok=True)
            _save_npy(out, r.outputs)
        for name, count in r.farm.per_board.items():
            per_board[name] = per_board.get(name, 0) + count
        bad_boards.update(r.farm.bad_boards)
        if check:
            n = len(r.outputs)
            msg = f"{n - r.mismatches}/{n} outputs bit-exact with the simulator on {len(r.farm.per_board)} boards"
            if several:
                msg = f"{d}: {msg}"
            failed += r.mismatches > 0
            messages.append(msg if r.mismatches == 0 else f"MISMATCH: {msg}")
    if not args.quiet:
        for name, count in per_board.items():
            why = f"  BAD: {bad_boards[name]}" if name in bad_boards else ""
            print(f"{name:20s} {count:6d} inputs{why}")
        farm = results[-1].farm  # reassigned and switches count over the whole run (every model's alike)
        if farm.reassigned:
            print(f"{farm.reassigned} chunk(s) reassigned after board failures")
        if several and farm.switches:
            print(f"{farm.switches} firmware switch(es) between models")
    if check:
        print("\n".join(messages))
        return 0 if failed == 0 else 1
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from hilc.hil.runner import profile_command

    board, graph = _board_and_graph(args)
    x = _load_inputs(args.input, graph).astype(np.float32) if args.input else None  # errors name the file
    prof = profile_command(Path(args.compiled), board, graph, x, args.port)
    from hilc.fileio import read_json

    report_path = Path(args.compiled) / "report.json"
    report = read_json(report_path, "report") if report_path.exists() else {}
    macs = {layer["name"]: layer["macs"] for layer in report.get("layers", [])}
    table = Table(title=f"{board.name}: {prof['total_ticks']:,} ticks ({prof['timer']}, {prof['tick_hz']:,} Hz)")
    for col in ("layer", "op", "ticks", "share", "MACs", "MACs/tick"):
        table.add_column(col, justify="left" if col in ("layer", "op") else "right")
    for layer in prof["layers"]:
        t, m = layer["ticks"], macs.get(layer["name"], 0)
        table.add_row(layer["name"], layer["op"], f"{t:,}", f"{t / max(prof['total_ticks'], 1):.1%}", f"{m:,}",
                      f"{m / t:.2f}" if t and m else "-")
    Console().print(table)
    if "total_instructions" in prof:
        print(f"{prof['total_instructions']:,} instructions per inference (QEMU -icount)")
    if "patch" in prof:
        pp = prof["patch"]
        print(f"patching: {pp['patched']:,} vs {pp['layerwise']:,} {pp['unit']} layer by layer: "
              f"{pp['measured_overhead']:+.1%} measured, {pp['predicted_mac_overhead']:+.1%} MACs predicted; "
              f"patch stage alone {pp['stage_measured_overhead']:+.1%} measured, "
              f"{pp['stage_predicted_mac_overhead']:+.1%} MACs predicted")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from hilc.api import report

    accuracy = {}
    for item in args.accuracy or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise HilcError(f"--accuracy {item!r}: expected NAME=VALUE, e.g. 'int8 top-1=96.1%'")
        accuracy[name.strip()] = value.strip()
    path = report(args.compiled, args.output, accuracy)
    if not args.quiet:
        print(f"wrote {path}")
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from hilc.api import export_onnx

    path = export_onnx(args.compiled, args.output)
    if not args.quiet:
        print(f"wrote {path} (QDQ ONNX, opset 17)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from hilc.api import evaluate, load
    from hilc.compiler.calibrate import load_samples

    if args.cluster is not None:
        from hilc.distributed import require_ray

        require_ray()
    if args.shard is not None and (args.cluster is None or args.shard < 1):
        raise HilcError(f"--shard {args.shard}: " + ("needs --cluster (shards are Ray tasks)" if args.cluster is None
                                                      else "expected at least 1 sample per shard"))
    compiled = load(args.compiled)
    x = _load_inputs(args.input, compiled.graph)  # its errors name the file
    labels = load_samples(args.labels) if args.labels else None
    reference = load_samples(args.reference) if args.reference else None
    _require_engine(args.engine)
    try:
        res = evaluate(compiled, x, labels=labels, reference=reference, cluster=args.cluster, shard=args.shard,
                       quiet=args.quiet, engine=args.engine)
    except HilcError as e:  # accuracy() names the option: name the user's file instead
        for what, path in (("labels: ", args.labels), ("reference: ", args.reference)):
            if path and str(e).startswith(what):
                raise HilcError(f"{path}: {str(e).removeprefix(what)}") from None
        raise
    if args.output:
        _save_npy(Path(args.output), res.outputs)
    if args.json:
        print(json.dumps(res.metrics, indent=1))
    else:
        m = res.metrics
        parts = [f"{m['samples']} samples in {m['seconds']:.2f} s ({m['samples_per_s']:.1f}/s"
                 + (f", {m['shards']} shards on Ray)" if "shards" in m else ")")]
        if "top1" in m:
            parts.append(f"top-1 {m['top1']:.2%}")
        if "top1_agreement" in m:
            parts.append(f"top-1 agreement with the reference {m['top1_agreement']:.2%}, "
                         f"max |diff| {m['max_abs_diff']:.4g}")
        print("; ".join(parts))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from hilc.api import inspect
    from hilc.inspect_onnx import print_inspection

    ins = inspect(args.model)
    if args.json:
        print(json.dumps(ins.to_dict(), indent=1))
    else:
        print_inspection(ins)
    return 0


def cmd_boards(args: argparse.Namespace) -> int:
    from hilc.hil.boards import list_boards

    for b in list_boards():
        kind = "QEMU" if b.is_qemu else b.run.get("method", "?")
        print(f"{b.name:20s} {b.cpu:10s} flash {b.flash_bytes // 1024:5d} KiB  SRAM {b.ram_bytes // 1024:5d} KiB  "
              f"{kind:8s} {b.description}")
    from hilc.targets.hls.boards import list_fpga_boards

    for f in list_fpga_boards():
        print(f"{f.name:20s} {f.part:20s} {f.clock_mhz:g} MHz  DSP {f.dsp}  BRAM18 {f.bram18}  LUT {f.lut}  FF {f.ff}  "
              f"FPGA     {f.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hilc", description="Deploy tiny neural networks integer-only to MCUs and FPGAs.")
    p.add_argument("--version", action="version", version=f"hilc {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile an ONNX model to an integer-only graph")
    c.add_argument("model", help="ONNX model (float, or QDQ-quantized)")
    c.add_argument("-o", "--output", required=True, help="output directory")
    c.add_argument("--calib", help="calibration inputs: .npy (first axis = samples) or single-array .npz")
    c.add_argument("--calib-method", default="minmax", choices=["minmax", "percentile", "mse"])
    c.add_argument("--percentile", type=float, default=None,
                   help="with --calib-method percentile: keep values between the (100-P)-th and P-th percentiles "
                        "(default 99.99)")
    c.add_argument("--target", default="sim", choices=["sim", "c", "hls"],
                   help="sim: integer graph only; c: also MCU C sources (OUT/src) and a host Makefile; "
                        "hls: also a Vitis HLS design (OUT/hls) for an FPGA board (--board, default pynq-z2)")
    c.add_argument("--cpu", help="with --target c: cross-compile for cortex-m3|cortex-m4|cortex-m7 and report sizes")
    c.add_argument("--board", help="compile for a board (implies --target c; see hilc boards)")
    c.add_argument("--flash", type=int, metavar="BYTES",
                   help="with --target c: refuse models whose constants exceed it")
    c.add_argument("--parallel", action="append", metavar="LAYER=PExSIMD",
                   help="with --target hls: a conv/dense layer's parallelism (output channels x inputs per cycle); "
                        "default: from the board's resource budget")
    c.add_argument("--dump-after", action="append", metavar="PASS",
                   help="print the IR after a pass (import, cleanup, fold_pad, fuse_activation, fold_scalars, "
                        "calibrate, quantize, plan_patches)")
    c.add_argument("--patch", default="off", metavar="auto|off|SPLIT:N",
                   help="patch-based inference of the first layers: auto (fit --sram with the fewest extra MACs), "
                        "off, or SPLIT:N (split after node/tensor SPLIT, N x N patches)")
    c.add_argument("--sram", type=int, metavar="BYTES", help="SRAM budget (default: the board's SRAM)")
    c.add_argument("--order", default="memory", choices=["memory", "import"],
                   help="node order: memory (the order with the lowest peak SRAM) or import (the ONNX file's)")
    c.add_argument("--precision", default="int8", choices=["int8", "mixed", "auto-fpga"],
                   help="mixed: per-layer weight (8/4/2) and activation (8/4) bits by HAWQ-V3's ILP under the budgets")
    c.add_argument("--bitops-ratio", type=float, metavar="R",
                   help="with --precision mixed: R times fewer BitOps than int8")
    c.add_argument("--weights-bytes", type=int, metavar="N", help="with --precision mixed: at most N weight bytes")
    c.add_argument("--latency-ratio", type=float, metavar="R",
                   help="with --precision mixed: predicted latency at most R times int8's (board cost model)")
    c.add_argument("--widths", default="subbyte", choices=["subbyte", "extended"],
                   help="with --precision mixed: the candidate widths: subbyte (weights 8/4/2, activations 8/4, "
                        "packed) or extended (also 5-7 bits, held in int8 containers: fewer BitOps, no MCU speed-up)")
    c.add_argument("--finetune-steps", type=int, metavar="N",
                   help="with --precision mixed: N steps of quantization-aware fine-tuning by distillation from the "
                        "float model on the calibration inputs when some width is below 8 (default: 75 passes over "
                        "them, 300 steps of 32 for 128 inputs; 0: off)")
    c.add_argument("--rerank", type=int, metavar="K",
                   help="with --precision mixed: score the K best allocations of the ILP by the whole integer model "
                        "on the calibration data and keep the best (report.json lists them; default 1: the ILP's)")
    c.add_argument("--finetune-data", metavar="FILE",
                   help="with --precision mixed: the fine-tuning inputs (unlabeled; .npy/.npz laid out as --calib), "
                        "e.g. many in-distribution crops; default: the calibration inputs")
    c.add_argument("--ptq-data", metavar="FILE",
                   help="with --precision mixed: extra unlabeled inputs (.npy/.npz laid out as --calib) for the "
                        "allocation's AdaRound and bias correction, fitted on the calibration inputs plus these")
    c.add_argument("--patch-precision", default="off", choices=["off", "value"],
                   help="value: QuantMCU patch-branch precision; patches without input outliers run the patch stage "
                        "at lower activation widths (value-driven search; needs a patch schedule and --calib)")
    c.add_argument("--ptq", metavar="METHODS",
                   help="post-training quantization: comma list of equalize, bias-correct, adaround, or all / none "
                        "(default auto: all three when some weights are below 8 bits, none otherwise)")
    c.add_argument("--ptq-budget", type=float, default=30.0, metavar="SECONDS",
                   help="AdaRound's effort over all layers, in seconds at a nominal speed: converted to a step "
                        "count, so the same inputs give the same model on any machine (default 30)")
    c.add_argument("--fpga-error-ratio", type=float, default=None, metavar="R",
                   help="with --precision auto-fpga (integer or minifloat of 3-8 bits per layer, least FPGA cost): "
                        "summed layer output error at most R times int8's (default 1)")
    c.add_argument("--minifloat", metavar="FORMAT[xACT]|LAYER=FORMAT[xACT],...",
                   help="minifloat conv/dense layers (E4M3, E3M2, E2M1, any ExMy of 3-8 bits): weights in FORMAT, the "
                        "layer input cast to ACT; simulator and --target hls only (no MCU kernels)")
    c.add_argument("--input-range", metavar="LO,HI",
                   help="without --calib, for a model without BatchNorm statistics: the input value range "
                        "of the synthesised calibration inputs (default 0,1)")
    c.add_argument("--cluster", metavar="auto|local|ADDRESS",
                   help="run the compile's bulk work on a Ray cluster (hilc[ray]): calibration statistics in "
                        "shards, and the candidates of --precision mixed, --patch auto and --patch-precision "
                        "value as tasks; the same compiled model")
    c.add_argument("--engine", default="numpy", choices=["numpy", "tvm"],
                   help="what runs the integer model in the --precision mixed search: numpy (the simulator) or tvm "
                        "(the same integers from one TVM module per graph structure; hilc[tvm])")
    c.add_argument("-q", "--quiet", action="store_true")
    c.set_defaults(func=cmd_compile)

    s = sub.add_parser("simulate", help="run a compiled model in the bit-accurate simulator")
    s.add_argument("compiled", help="directory written by hilc compile")
    s.add_argument("input", help=".npy input (float32, first axis = batch, the model's own layout)")
    s.add_argument("-o", "--output", required=True, help="output .npy")
    s.add_argument("--raw", action="store_true", help="write the integer output tensor instead of float")
    s.add_argument("--engine", default="numpy", choices=["numpy", "tvm", "hls-csim"],
                   help="numpy: the golden simulator; tvm: the same integers from a TVM-built module (hilc[tvm]); "
                        "hls-csim: the C-simulated HLS design (--target hls)")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_simulate)

    f = sub.add_parser("flash", help="build the board firmware and flash it (QEMU boards: boot check)")
    f.add_argument("compiled")
    f.add_argument("--board", required=True)
    f.add_argument("-q", "--quiet", action="store_true")
    f.set_defaults(func=cmd_flash)

    r = sub.add_parser("run", help="run inputs on a board over the serial link")
    r.add_argument("compiled")
    r.add_argument("input", help=".npy input (float32, first axis = batch, the model's own layout)")
    r.add_argument("--board", help="a board (see hilc boards); or --farm")
    r.add_argument("-o", "--output", required=True)
    _farm_options(r, "spread the inputs over the boards of an inventory (Ray actors, hilc[ray]; see hilc regress)")
    r.add_argument("--check", action="store_true", help="compare with the simulator bit for bit; exit 1 on mismatch")
    r.add_argument("--port", help="serial port or pyserial URL (default: the board file's)")
    r.add_argument("--raw", action="store_true")
    r.add_argument("-q", "--quiet", action="store_true")
    r.set_defaults(func=cmd_run)

    rg = sub.add_parser("regress", help="run inputs across every board of a farm and check them bit for bit")
    rg.add_argument("compiled", nargs="+", help="one or more compiled models (output folders): several are "
                    "spread over the boards together, each checked against its own simulator")
    rg.add_argument("input", help=".npy input (float32, first axis = batch, the model's own layout; "
                    "every model runs it)")
    _farm_options(rg, "board inventory (TOML)", required=True)
    rg.add_argument("-o", "--output", help="also write the outputs (.npy; with several models a folder of "
                    "<model folder name>.npy)")
    rg.add_argument("--raw", action="store_true")
    rg.add_argument("-q", "--quiet", action="store_true")
    rg.set_defaults(func=cmd_regress)

    pr = sub.add_parser("profile", help="per-layer tick counts of one inference on a board")
    pr.add_argument("compiled")
    pr.add_argument("--board", required=True)
    pr.add_argument("--input", help=".npy input to profile with (default: zeros)")
    pr.add_argument("--port")
    pr.add_argument("-q", "--quiet", action="store_true")
    pr.set_defaults(func=cmd_profile)

    b = sub.add_parser("boards", help="list the boards")
    b.set_defaults(func=cmd_boards)

    rp = sub.add_parser("report", help="write a self-contained HTML report (OUT/report.html)")
    rp.add_argument("compiled", help="directory written by hilc compile")
    rp.add_argument("-o", "--output", help="HTML file (default: COMPILED/report.html)")
    rp.add_argument("--accuracy", action="append", metavar="NAME=VALUE",
                    help="an accuracy figure measured elsewhere, shown in the summary (repeatable)")
    rp.add_argument("-q", "--quiet", action="store_true")
    rp.set_defaults(func=cmd_report)

    ex = sub.add_parser("export-onnx", help="write the integer model as a QDQ ONNX graph")
    ex.add_argument("compiled", help="directory written by hilc compile")
    ex.add_argument("-o", "--output", required=True, help="output .onnx")
    ex.add_argument("-q", "--quiet", action="store_true")
    ex.set_defaults(func=cmd_export_onnx)

    ev = sub.add_parser("evaluate", help="accuracy of a compiled model on a dataset (bit-accurate simulator)")
    ev.add_argument("compiled", help="directory written by hilc compile")
    ev.add_argument("input", help=".npy inputs (float32, first axis = samples, the model's own layout)")
    ev.add_argument("--labels", help=".npy integer class labels: top-1 accuracy")
    ev.add_argument("--reference", help=".npy reference outputs (e.g. the float model's): top-1 agreement")
    ev.add_argument("-o", "--output", help="also write the simulator's outputs here (.npy)")
    ev.add_argument("--cluster", metavar="auto|local|ADDRESS", help="run shards as Ray tasks (hilc[ray])")
    ev.add_argument("--shard", type=int, default=None, metavar="N", help="samples per shard (default 64)")
    ev.add_argument("--engine", default="numpy", choices=["numpy", "tvm"],
                    help="numpy: the golden simulator; tvm: the same integers from a TVM-built module (hilc[tvm])")
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
    ev.add_argument("-q", "--quiet", action="store_true")
    ev.set_defaults(func=cmd_evaluate)

    ins = sub.add_parser("inspect", help="operators, parameters, MACs, activation memory and fitting boards")
    ins.add_argument("model", help="ONNX model")
    ins.add_argument("--json", action="store_true", help="print the inspection as JSON")
    ins.set_defaults(func=cmd_inspect)
    return p


def _check_empty_paths(args: argparse.Namespace) -> None:
    """An empty path is an unset shell variable, not a wish: Path("") is the current folder, where
    compile would write its files and report would read them."""
    for key in ("model", "compiled", "input", "output", "calib", "labels", "reference", "farm", "port"):
        values = getattr(args, key, None)
        for v in values if isinstance(values, list) else [values]:
            if v is not None and not str(v).strip():
                flag = {"output": "-o/--output"}.get(key, f"--{key}" if key in ("calib", "labels", "reference", "farm",
                                                                               "port") else key.upper())
                raise HilcError(f"{flag}: empty path")


def main(argv: list[str] | None = None) -> int:
    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    from hilc.progress import set_quiet

    set_quiet(getattr(args, "quiet", False))
    try:
        # numpy's RuntimeWarnings on a malformed model would break the one-line error contract;
        # every failure they hint at is caught and reported by hilc itself.
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            _check_empty_paths(args)
            return args.func(args)
    except HilcError as e:
        print(f"hilc: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("hilc: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug in hilc, not the user's fault: say so in one line
        if os.environ.get("HILC_DEBUG"):
            raise
        print(f"hilc: internal error: {type(e).__name__}: {e} (set HILC_DEBUG=1 for a traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
