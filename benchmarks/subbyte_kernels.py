"""Sub-byte kernels on both QEMU Cortex-M boards: resnet8 int8 vs sub-byte builds, instructions per
inference (-icount: exact), flash and peak SRAM, each build checked bit-exact with the simulator.

Builds (calibrated on crops32[:128]): int8; "mixed 2x": the widths `--precision mixed --bitops-ratio 2`
picks (searched once, on qemu-mps2-an386, then compiled with those widths for every board so both
boards run the same allocation); "w2": 2-bit weights on conv2d_3/4/6/7 with the mixed build's 4-bit
activations; "w4": 4-bit weights on every conv/dense with int8 activations. The widths are what
matter for the kernels, so the fixed-width builds skip PTQ and fine-tuning.
qemu-mps2-an385 (Cortex-M3) runs the portable kernels, qemu-mps2-an386 (Cortex-M4) the SMLAD ones.

Prints a table and writes benchmarks/results/subbyte_kernels.json. Run from the repository root:
    python benchmarks/subbyte_kernels.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import print_table, write_results  # noqa: E402
from conftest import DATA, RESNET8  # noqa: E402

from hilc.compiler.mixed import Budgets  # noqa: E402
from hilc.compiler.pipeline import compile_model, write_artifacts  # noqa: E402
from hilc.hil.boards import load_board  # noqa: E402
from hilc.hil.runner import profile_command, run_command  # noqa: E402

BOARDS = ("qemu-mps2-an385", "qemu-mps2-an386")
W2_LAYERS = ("conv2d_3", "conv2d_4", "conv2d_6", "conv2d_7")


def main() -> None:
    crops = np.load(DATA / "natural_crops.npz")["crops32"].astype(np.float32)
    calib, held = crops[:128], crops[128:136]
    res: dict = {"builds": {}}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        searched = compile_model(RESNET8, calib, board=BOARDS[1], precision="mixed",
                                 budgets=Budgets(bitops_ratio=2.0), sensitivity_cache=d / "sens.json")
        mp = searched.report["mixed_precision"]
        wb = {k: int(v) for k, v in mp["weight_bits"].items() if int(v) != 8}
        ab = {k: int(v) for k, v in mp["act_bits"].items() if int(v) != 8}
        linear = [n.name for n in searched.graph.nodes if n.op in ("conv2d", "dense")]
        builds = {"int8": {}, "mixed_2x": {"weight_bits": wb, "act_bits": ab},
                  "w2": {"weight_bits": dict.fromkeys(W2_LAYERS, 2), "act_bits": ab},
                  "w4": {"weight_bits": dict.fromkeys(linear, 4)}}
        for label, widths in builds.items():
            entry = {"widths": widths}
            for board_name in BOARDS:
                board = load_board(board_name)
                kw = {"ptq": "none", "finetune_steps": 0} if widths else {}
                r = compile_model(RESNET8, calib, board=board_name, **widths, **kw)
                o = d / f"{label}_{board_name}"
                write_artifacts(o, r)
                _, bad = run_command(o, board, r.graph, held, check=True)
                prof = profile_command(o, board, r.graph, held[:1])
                entry[board_name] = {"instructions": prof["total_instructions"],
                                     "flash_bytes": r.report["flash_bytes"],
                                     "peak_sram_bytes": r.report["peak_sram_bytes"],
                                     "arena_bytes": r.report["arena_bytes"],
                                     "scratch_bytes": r.report.get("scratch_bytes"),
                                     "bitops": r.report["bitops"], "bitops_int8": r.report["bitops_int8"],
                                     "run_check_mismatches": bad, "samples_checked": len(held)}
            res["builds"][label] = entry
    base = res["builds"]["int8"]
    for label, entry in res["builds"].items():
        for board_name in BOARDS:
            e = entry[board_name]
            ratio = e["instructions"] / base[board_name]["instructions"]
            rows.append((f"resnet8 {label} on {board_name}: instructions / flash / peak SRAM",
                         f"{e['instructions'] / 1e6:.2f} M / {e['flash_bytes']:,} / {e['peak_sram_bytes']:,} B",
                         f"{ratio:.3f}x int8's instructions; run --check "
                         f"{e['samples_checked'] - e['run_check_mismatches']}/{e['samples_checked']} bit-exact"))
    print_table(rows, 34)
    write_results("subbyte_kernels.json", res)


if __name__ == "__main__":
    main()
