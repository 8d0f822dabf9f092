"""MCU backend benchmark: code size, memory plan, and instructions per inference on QEMU boards.

Instructions are counted under QEMU -icount shift=0 (one instruction per ns, SysTick at 25 MHz:
40 instructions per tick), so the figures are exact and repeatable. Prints a table and writes
benchmarks/results/mcu.json. Run from the repository root:  python benchmarks/mcu.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from arch_models import mobilenet_v2  # noqa: E402
from common import print_table, write_results  # noqa: E402
from conftest import AD01, DATA, RESNET8  # noqa: E402

from hilc.compiler.pipeline import compile_model, write_artifacts  # noqa: E402
from hilc.hil.boards import load_board  # noqa: E402
from hilc.hil.runner import profile_command  # noqa: E402


def main() -> None:
    crops = np.load(DATA / "natural_crops.npz")["crops32"].astype(np.float32)
    frames = np.load(DATA / "ad01_toycar_normal_sample.npy").astype(np.float32)
    res: dict = {}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        # code size without weights, Cortex-M4 at -Os
        r = compile_model(RESNET8, crops[:64], target="c", cpu="cortex-m4")
        write_artifacts(d / "size", r)
        rep = json.loads((d / "size" / "report.json").read_text())
        res["resnet8_m4_Os"] = {k: rep[k] for k in ("code_bytes", "function_bytes", "flash_bytes",
                                                    "constants_flash_bytes", "stack_bytes")}
        rows.append(("resnet8 code without weights, Cortex-M4 -Os", f"{rep['code_bytes']:,} B", "<= 16 KB"))
        rows.append(("  flash incl. weights / stack", f"{rep['flash_bytes']:,} B / {rep['stack_bytes']} B", ""))

        # memory plan vs lower bound
        onnx.save(mobilenet_v2(0.35, 144, num_classes=10), str(d / "mbv2.onnx"))
        mb_calib = np.random.default_rng(0).uniform(0, 1, (4, 3, 144, 144)).astype(np.float32)
        for name, model, calib in (("resnet8", RESNET8, crops[:64]), ("ad01", AD01, frames),
                                   ("mobilenetv2-0.35-144", d / "mbv2.onnx", mb_calib)):
            t = time.perf_counter()
            rep = compile_model(model, calib, target="c").report
            res[f"{name}_memory"] = {"arena_bytes": rep["arena_bytes"],
                                     "lower_bound": rep["arena_lower_bound_bytes"],
                                     "ratio": rep["arena_bytes"] / rep["arena_lower_bound_bytes"],
                                     "peak_sram_bytes": rep["peak_sram_bytes"],
                                     "compile_seconds": round(time.perf_counter() - t, 2)}
            arena, bound = rep["arena_bytes"], rep["arena_lower_bound_bytes"]
            rows.append((f"{name} arena / lower bound", f"{arena:,} / {bound:,} B ({arena / bound:.3f}x)", "<= 1.05x"))

        # instructions per inference: DSP kernels (M4) vs portable kernels (M3)
        for board_name in ("qemu-mps2-an386", "qemu-mps2-an385"):
            board = load_board(board_name)
            r = compile_model(RESNET8, crops[:64], board=board_name)
            write_artifacts(d / board_name, r)
            prof = profile_command(d / board_name, board, r.graph, crops[128:129])
            macs = r.report["macs"]
            res[f"resnet8_{board_name}"] = {"instructions": prof["total_instructions"], "macs": macs,
                                            "macs_per_instruction": macs / prof["total_instructions"],
                                            "per_layer_ticks": {x["name"]: x["ticks"] for x in prof["layers"]}}
            rows.append((f"resnet8 on {board_name} ({board.cpu})", f"{prof['total_instructions']:,} instr",
                         f"{macs / prof['total_instructions']:.3f} MAC/instr"))
        m4, m3 = res["resnet8_qemu-mps2-an386"], res["resnet8_qemu-mps2-an385"]
        res["dsp_speedup_instructions"] = m3["instructions"] / m4["instructions"]
        rows.append(("DSP (SMLAD) kernels vs portable: instruction ratio", f"{res['dsp_speedup_instructions']:.2f}x",
                     "> 1"))

    print_table(rows, 34)
    write_results("mcu.json", res)


if __name__ == "__main__":
    main()
