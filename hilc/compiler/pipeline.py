"""The compile pipeline: import -> float passes -> calibrate -> quantize, and the artifacts."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hilc.compiler import calibrate as calib_mod
from hilc.compiler import passes
from hilc.compiler.ir import Graph
from hilc.compiler.onnx_import import import_onnx
from hilc.compiler.patches import arena_tensor_bytes
from hilc.compiler.quantize import quantize
from hilc.compiler.report import build_report
from hilc.errors import HilcError

TARGETS = ("sim", "c", "hls")
PASS_NAMES = ["import", *[p.__name__ for p in passes.FLOAT_PIPELINE], "calibrate", "quantize", "plan_patches"]


@dataclass
class CompileResult:
    graph: Graph
    report: dict[str, Any]
    dumps: dict[str, str]
    c_model: Any = None  # targets.c.codegen.CModel for --target c
    cpu: str | None = None
    board: Any = None  # hil.boards.Board
    hls_design: Any = None  # targets.hls.codegen.HlsDesign for --target hls
    files: dict[str, str] | None = None  # extra files for OUT (mixed precision: sensitivity.json)


def compile_model(model: str | Path, calib: str | Path | np.ndarray | None = None, method: str = "minmax",
                  percentile: float = 99.99, target: str = "sim", dump_after: list[str] | None = None,
                  progress: Callable[[int, int], None] | None = None, cpu: str | None = None,
                  flash_bytes: int | None = None, board: str | None = None, patch: str = "off",
                  sram_bytes: int | None = None, parallel: dict[str, tuple[int, int]] | None = None,
                  ptq: str | list[str] | None = None, ptq_budget: float = 30.0,
                  graph_hook: Callable[[Graph], Graph] | None = None,
                  input_range: tuple[float, float] | None = None, precision: str = "int8",
                  budgets: Any = None, weight_bits: dict[str, int] | None = None,
                  act_bits: dict[str, int] | None = None, sensitivity_cache: str | Path | None = None,
                  extended_bits: bool = False, cluster: str | None = None,
                  fpga_error_ratio: float = 1.0, order: str = "memory",
                  patch_precision: str = "off", engine: str = "numpy",
                  finetune_steps: int | None = None,
                  finetune_data: str | Path | np.ndarray | None = None, rerank: int | None = None,
                  ptq_data: str | Path | np.ndarray | None = None) -> CompileResult:
    """Compile an ONNX file into an integer-only graph and its report (and C sources for target c;
    ``board`` implies target c for that board's CPU and checks its flash and SRAM; ``patch``
    is auto|off|SPLIT:N, scheduled against ``sram_bytes`` (default: the board's SRAM); with target
    hls ``board`` names an FPGA board and ``parallel`` maps conv/dense layers to their PE x SIMD).

    ``ptq``: post-training quantization methods (``hilc.compiler.ptq``: "equalize",
    "bias-correct", "adaround", "all", "none"; default "auto" = all when some weights are below
    8 bits), AdaRound sharing ``ptq_budget`` seconds. ``graph_hook`` edits the float graph after
    the float passes (e.g. ``ptq.set_weight_bits``). Without ``calib`` a float model is
    calibrated on synthesised inputs (data-free; ``input_range`` for models without BatchNorm).
    ``cluster`` (``hilc[ray]``): calibration statistics computed in shards on a Ray cluster, and
    the bulk of the searches (mixed-precision sensitivities, patch schedule, patch precision)
    run as Ray tasks; the compiled model is the same as without it.
    ``order``: "memory" runs the nodes in the order that lowers peak SRAM (hilc/compiler/schedule.py),
    "import" keeps the ONNX file's order. ``engine``: what runs the integer model in the
    mixed-precision search, "numpy" (the simulator) or "tvm" (hilc[tvm], the same integers)."""
    if order not in ("memory", "import"):
        raise HilcError(f"--order: expected memory or import, got '{order}'")
    if cluster is not None:  # a missing extra fails before any work
        from hilc.distributed import require_ray

        require_ray()
    board_obj = None
    fpga_board = None
    if target == "hls":  # an FPGA board: checked here, before any work
        from hilc.targets.hls.boards import DEFAULT_FPGA_BOARD, load_fpga_board

        fpga_board = load_fpga_board(board or DEFAULT_FPGA_BOARD)
        if patch != "off":
            raise HilcError("--patch schedules MCU memory; the HLS design streams every layer (use --patch off)")
    elif board is not None:
        from hilc.hil.boards import load_board

        board_obj = load_board(board)
        if cpu is not None and cpu != board_obj.cpu:  # it would be replaced by the board's without a word
            raise HilcError(f"--cpu {cpu} contradicts --board {board_obj.name}, whose CPU is {board_obj.cpu} "
                            "(drop --cpu)")
        target, cpu = "c", None
        flash_bytes = board_obj.flash_bytes if flash_bytes is None else flash_bytes
    if target not in TARGETS:
        raise HilcError(f"unknown target '{target}' (available: {', '.join(TARGETS)})")
    if cpu is not None:
        if target != "c":
            raise HilcError("--cpu needs --target c")
        from hilc.targets.c.build import cpu as check_cpu

        check_cpu(cpu)
    if patch != "off":
        from hilc.compiler.patches import parse_mode

        parse_mode(patch)
    if patch_precision != "off":  # checked before any work
        from hilc.compiler.patch_precision import check_options

        check_options(patch_precision, patch)
    from hilc.compiler.options import check_compile_options

    check_compile_options(percentile=percentile, ptq_budget=ptq_budget, fpga_error_ratio=fpga_error_ratio,
                          flash_bytes=flash_bytes, sram_bytes=sram_bytes, finetune_steps=finetune_steps,
                          target=target, patch=patch, precision=precision)
    for name in dump_after or []:
        if name not in PASS_NAMES:
            raise HilcError(f"--dump-after: unknown pass '{name}' (passes: {', '.join(PASS_NAMES)})")
    t0 = time.perf_counter()
    dumps: dict[str, str] = {}
    # Read the calibration file first: a bad file should fail before any work.
    def loaded(data, option: str) -> tuple[np.ndarray | None, str]:
        if data is None or isinstance(data, np.ndarray):
            return data, option
        return calib_mod.load_samples(data), str(data)

    samples, _ = loaded(calib, "--calib")
    # unlabeled inputs apart from calibration: the fine-tuning's (distillation) and the extra ones
    # of the mixed allocation's PTQ (mixed.apply_precision)
    ft_samples, ft_source = loaded(finetune_data, "--finetune-data")
    ptq_samples, ptq_source = loaded(ptq_data, "--ptq-data")
    g = import_onnx(model)
    if ptq_samples is not None:
        ptq_samples = calib_mod.check_samples(g, np.asarray(ptq_samples), ptq_source)
    if ft_samples is not None:
        ft_samples = calib_mod.check_samples(g, np.asarray(ft_samples), ft_source)
    if "import" in (dump_after or []):
        dumps["import"] = g.summary()
    for p in passes.FLOAT_PIPELINE:
        g = p(g)
        if p.__name__ in (dump_after or []):
            dumps[p.__name__] = g.summary()
    if graph_hook is not None:
        g = graph_hook(g)
    has_hints = bool(g.meta.get("quant_hints"))
    fpga_ptq: list[str] = []
    if precision == "auto-fpga" and not has_hints:  # equalize now; bias-correct/adaround after the pick
        from hilc.targets.hls.cost import split_ptq

        ptq, fpga_ptq = split_ptq(ptq)
    cast_ptq: list[str] = []
    if precision != "auto-fpga" and not has_hints and any(n.attrs.get("act_format") for n in g.nodes):
        from hilc.compiler.minifloat import split_ptq_for_casts

        ptq, cast_ptq = split_ptq_for_casts(ptq, g)  # equalize now; the rest once the casts are known
    source = "calibration data" if isinstance(calib, np.ndarray) or calib is None else str(calib)
    g, samples, ptq_report = _post_training(g, samples, ptq, ptq_budget, input_range, has_hints, Path(model).name,
                                            source)
    if samples is not None:
        if calib is None:
            source = "synthesised inputs"
        g = calib_mod.calibrate(g, samples, method, percentile, progress=progress, source=source, cluster=cluster)
        if calib is None:
            # the graph (and so its content hash) keeps what was done, not how long it took: the
            # seconds stay in report.json's ptq methods
            g.meta["calibration_method"]["data_free"] = {k: v for k, v in ptq_report.pop("data_free").items()
                                                         if k != "seconds"}
    if samples is not None and any(n.attrs.get("act_format") for n in g.nodes):  # minifloat input casts
        from hilc.compiler.minifloat import PIPELINE_ACT_Q_STEPS, search_act_shifts

        g = search_act_shifts(g, samples, steps=PIPELINE_ACT_Q_STEPS)  # the casts' shifts and their error
        if cast_ptq:
            from hilc.compiler.minifloat import ptq_with_casts

            g, done = ptq_with_casts(g, samples, cast_ptq, ptq_budget)
            ptq_report["methods"].append(done)
    if "calibrate" in (dump_after or []):
        dumps["calibrate"] = g.summary()
    mixed_info, files = {}, {}
    fpga_info = None
    if precision == "auto-fpga":  # per layer integer or minifloat, by the FPGA cost model
        from hilc.targets.hls.boards import DEFAULT_FPGA_BOARD
        from hilc.targets.hls.cost import auto_fpga, pricing_parallelism

        # priced at the HLS design's PE x SIMD (the board's default, or --parallel), which the design keeps
        lanes, source = pricing_parallelism(g, fpga_board or DEFAULT_FPGA_BOARD, parallel, target == "hls")
        g, fpga_info = auto_fpga(g, samples, fpga_error_ratio, parallel=lanes, ptq_methods=fpga_ptq,
                                 parallel_source=source)
        parallel = {**lanes, **(parallel or {})}
    elif precision != "int8" or budgets is not None or weight_bits or act_bits:
        from hilc.compiler.mixed import apply_precision

        g, mixed_info, files = apply_precision(g, samples, precision, budgets, weight_bits, act_bits,
                                               sensitivity_cache, board, extended_bits, cluster=cluster,
                                               engine=engine, finetune_steps=finetune_steps,
                                               finetune_samples=ft_samples, rerank=rerank,
                                               ptq_samples=ptq_samples)
    q = quantize(g)
    if fpga_info is not None:
        q.meta["precision"] = "auto-fpga"
    if mixed_info:
        from hilc.compiler.mixed import pack_subbyte_activations

        if patch == "off":  # the patch stage's kernels read int8 windows
            q = pack_subbyte_activations(q)
        q.meta["precision"] = "mixed"
    if "quantize" in (dump_after or []):
        dumps["quantize"] = q.summary()
    if order == "memory" and target != "hls":  # operator order for peak SRAM (the HLS design streams)
        from hilc.compiler.schedule import reorder_for_memory

        q = reorder_for_memory(q)
    extra: dict[str, Any] = {}
    budget = sram_bytes if sram_bytes is not None else (board_obj.ram_bytes if board_obj is not None else None)
    if patch != "off":
        from hilc.compiler.patches import firmware_ram_reserve, plan_patches, report_fields

        patch_budget = budget
        if sram_bytes is None and board_obj is not None:  # the firmware's stack and frames share the SRAM
            patch_budget = budget - firmware_ram_reserve(q)
            extra["firmware_ram_reserve_bytes"] = budget - patch_budget
        q = plan_patches(q, patch, patch_budget, reorder=order == "memory", cluster=cluster)
        if "plan_patches" in (dump_after or []):
            dumps["plan_patches"] = q.summary() + "\n" + _patch_summary(q)
        extra.update(report_fields(q))
        if "patch" not in extra:  # auto: layer by layer already fits the budget
            from hilc.compiler.memory import plan_memory
            from hilc.compiler.patches import scratch_bytes

            peak = plan_memory(q).peak_sram_bytes + scratch_bytes(q)
            extra.update(patch=None, peak_sram_bytes_layerwise=peak, peak_sram_bytes=peak, macs_layerwise=None)
        else:
            extra["peak_sram_bytes"] = q.meta["patch"]["peak_sram_bytes"]
    if patch_precision != "off":  # QuantMCU patch-branch precision (hilc/compiler/patch_precision.py)
        from hilc.compiler.patch_precision import apply_patch_precision

        q, extra["patch_precision"] = apply_patch_precision(q, g, samples, patch_precision, cluster=cluster)
    c_model = None
    if target == "c":
        from hilc.targets.c.codegen import generate_c

        c_model = generate_c(q)
        plan = c_model.plan
        if flash_bytes is not None and c_model.const_bytes > flash_bytes:
            where = board_obj.name if board_obj is not None else "the target"
            raise HilcError(f"the model's constants need {c_model.const_bytes} bytes of flash; "
                            f"{where} has {flash_bytes}")
        if board_obj is not None or sram_bytes is not None:
            need = plan.peak_sram_bytes + c_model.scratch_bytes
            where = board_obj.name if board_obj is not None else "--sram"
            if need > budget:
                hint = " (try --patch auto)" if patch == "off" else ""
                raise HilcError(f"the model needs {need} bytes of SRAM (arena {plan.arena_bytes} + I/O + scratch); "
                                f"{where} has {budget}{hint}")
            if board_obj is not None:
                extra["board"] = board_obj.name
        extra.update(arena_bytes=plan.arena_bytes, arena_lower_bound_bytes=plan.lower_bound,
                     peak_sram_bytes=plan.peak_sram_bytes + c_model.scratch_bytes,
                     io_bytes=plan.input_bytes + plan.output_bytes, scratch_bytes=c_model.scratch_bytes,
                     constants_flash_bytes=c_model.const_bytes,
                     memory=[{"tensor": t, "offset": off, "bytes": arena_tensor_bytes(q, t)}
                             for t, off in sorted(plan.offsets.items(), key=lambda kv: kv[1])])
        if "schedule" in q.meta:  # what the operator order saved (schedule.py)
            from hilc.compiler.schedule import import_order_peak

            extra["peak_sram_bytes_import_order"] = import_order_peak(q, plan, c_model.scratch_bytes)
    if "schedule" in q.meta:
        extra["schedule"] = q.meta["schedule"]
    extra["ptq"] = ptq_report
    hls_design = None
    if target == "hls":
        from hilc.targets.hls.codegen import generate_hls

        tb = None
        if samples is not None:  # a few calibration samples become the Vitis testbench's check data
            from hilc.compiler.arith import quantize_host
            from hilc.sim.simulator import to_physical

            qi = q.tensors[q.inputs[0]].quant
            tb = quantize_host(to_physical(q, q.inputs[0], samples[:4]), qi.scale, qi.zero_point, qi.bits)
        hls_design = generate_hls(q, fpga_board, parallel, tb)
        extra.update(board=fpga_board.name, fpga=hls_design.estimate)
        if fpga_info is not None:  # the picker's price beside the backend's estimate, per layer
            from hilc.targets.hls.cost import check_estimate

            check_estimate(fpga_info, hls_design.estimate)
    extra["compile_seconds"] = round(time.perf_counter() - t0, 3)
    extra["model_hash"] = f"{q.content_hash():016x}"
    if mixed_info:
        extra["mixed_precision"] = mixed_info
    if fpga_info is not None:  # --precision auto-fpga: the per-layer integer/minifloat choice
        extra["fpga_precision"] = fpga_info
    report = build_report(q, str(model), target, extra)
    return CompileResult(q, report, dumps, c_model, cpu, board_obj, hls_design, files)


def _post_training(g: Graph, samples: np.ndarray | None, ptq: str | list[str] | None, budget: float,
                   input_range: tuple[float, float] | None, has_hints: bool, model_name: str, source: str):
    """Data-free inputs when there is no calibration data, then the chosen PTQ passes."""
    from hilc.compiler import ptq as ptq_mod

    report: dict[str, Any] = {"methods": [], "layers": []}
    if has_hints:  # a QDQ model brings its own scales, which these passes would invalidate
        if ptq_mod.parse_methods(ptq, None):
            raise HilcError(f"{model_name} is a QDQ-quantized model: --ptq applies to float models only")
        return g, samples, report
    methods = ptq_mod.parse_methods(ptq, g)
    if samples is None:
        samples, info = ptq_mod.synthesize_inputs(g, input_range=input_range or (0.0, 1.0))
        report["methods"].append({"name": "data-free", "seconds": info["seconds"]})
        report["data_free"] = info
    if methods:
        samples = calib_mod.check_samples(g, samples, source)
        g, done = ptq_mod.run_ptq(g, samples, methods, budget)
        report["methods"] += done["methods"]
        report["layers"] = done["layers"]
    return g, samples, report


def _patch_summary(g: Graph) -> str:
    p = g.meta.get("patch")
    if not p:
        return "patch: none (layer by layer)"
    lines = [f"patch: split after {p['split_node']} ({p['split']}), {p['grid'][0]}x{p['grid'][1]} patches, "
             f"MACs +{p['mac_overhead']:.1%}, peak SRAM {p['peak_sram_bytes']} B (layer by layer "
             f"{p['peak_sram_bytes_layerwise']} B)"]
    for q in p["patches"]:
        wins = " ".join(f"{w['node']}:{w['out'][1] - w['out'][0]}x{w['out'][3] - w['out'][2]}" for w in q["layers"])
        lines.append(f"  tile {q['tile']}: {wins}")
    return "\n".join(lines)


def write_artifacts(out_dir: str | Path, result: CompileResult) -> None:
    """Write graph.json, constants.npz and report.json into out_dir, all or nothing.

    Files go to a temporary folder beside out_dir first and are moved in only once all are
    written, so a failure never leaves a half-written OUT (earlier artifacts stay intact).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise HilcError(f"{out}: exists and is not a directory")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HilcError(f"{parent}: cannot create the output's parent directory ({e.strerror})") from None
    try:
        _write_artifacts(out, parent, result)
    except OSError as e:  # a full disk or a read-only folder: name the place, leave OUT as it was
        raise HilcError(f"{out}: cannot write the compiled model ({e.strerror or e})") from None


def _write_artifacts(out: Path, parent: Path, result: CompileResult) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        result.graph.save(tmp)
        names = ["graph.json", "constants.npz"]
        if result.c_model is not None:
            from hilc.targets.c.codegen import write_c_project

            write_c_project(tmp, result.c_model)
            names += ["src", "Makefile"]
            if result.cpu is not None:  # sizes come from a real cross build, made before anything moves
                from hilc.targets.c import build

                elf = build.build_firmware(tmp, result.cpu)
                result.report.update(cpu=result.cpu, **build.elf_sizes(elf), stack_bytes=build.stack_bytes(elf.parent))
                names.append("build")
            elif result.board is not None:
                from hilc.targets.c import build

                elf = build.build_board_firmware(tmp, result.board)
                result.report.update(cpu=result.board.cpu, **build.elf_sizes(elf),
                                     stack_bytes=build.stack_bytes(elf.parent))
                names.append("build")
        if result.hls_design is not None:
            from hilc.targets.hls.codegen import write_hls_project

            write_hls_project(tmp, result.hls_design)
            names.append("hls")
        for fname, text in (result.files or {}).items():
            (tmp / fname).write_text(text)
            names.append(fname)
        (tmp / "report.json").write_text(json.dumps(result.report, indent=1))
        names.append("report.json")
        out.mkdir(exist_ok=True)
        for f in names:
            if (out / f).is_dir():
                shutil.rmtree(out / f)
            os.replace(tmp / f, out / f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_artifacts(out_dir: str | Path) -> Graph:
    out = Path(out_dir)
    if not out.exists():
        raise HilcError(f"{out}: no such compiled model directory")
    if not (out / "graph.json").exists() or not (out / "constants.npz").exists():
        raise HilcError(f"{out}: not a compiled model (graph.json / constants.npz missing); run hilc compile")
    from hilc.compiler.artifacts import check_graph, check_shapes, read_constants
    from hilc.fileio import read_json

    # checked before use: a damaged or hand-edited model is one line naming what is wrong
    data, constants = read_json(out / "graph.json", "compiled graph"), read_constants(out / "constants.npz")
    check_graph(data, constants, out / "graph.json")
    try:
        return check_shapes(Graph.from_json(data, constants), out / "graph.json")
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        raise HilcError(f"{out}: compiled model is unreadable ({e})") from None
