"""Integer-only tiny transformers: each operator's integer error against float, the digits
transformer's accuracy (float vs integer), and its cost on Cortex-M under QEMU (instructions per
inference with -icount shift=0, peak SRAM, flash).

Per-operator error: the single-operator models of tests/opmodels.py (Softmax, LayerNorm, GELU,
MatMul of activations, the attention scores) compiled on 256 random inputs and run on 256 others.
The float reference runs on the *dequantized* integer input, so the figure is the operator's own
error, in output LSB; "ideal" is the error of rounding the exact float result once (the floor any
int8 output has: mean 0.25 LSB).

Prints a table and writes benchmarks/results/transformer.json. Run from the repository root:
    python benchmarks/transformer.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from common import print_table, write_results  # noqa: E402
from conftest import DATA, load_digits, ort_run  # noqa: E402
from opmodels import cases  # noqa: E402

from hilc.compiler.arith import quantize_host  # noqa: E402
from hilc.compiler.pipeline import compile_model, write_artifacts  # noqa: E402
from hilc.hil.boards import load_board  # noqa: E402
from hilc.hil.runner import profile_command  # noqa: E402
from hilc.sim.simulator import simulate  # noqa: E402

OPS = {"softmax_last": "Softmax (last axis)", "layernorm": "LayerNormalization", "gelu": "Gelu (Erf)",
       "gelu_tanh": "Gelu (tanh form)", "matmul_activations": "MatMul of activations",
       "attention_head": "q k^T * scale -> Softmax", "reduce_mean_tokens": "ReduceMean"}
MODEL = DATA / "digits_transformer.onnx"


def op_error(case, d: Path) -> dict:
    path = d / f"{case.name}.onnx"
    onnx.save(case.model, str(path))
    g = compile_model(path, case.inputs(256, 0)).graph
    x = case.inputs(256, 1)
    qi = g.tensors[g.inputs[0]].quant
    xq = ((quantize_host(x, qi.scale, qi.zero_point).astype(np.float64) - qi.zero_point) * qi.scale)
    ref = ort_run(case.model, xq.astype(np.float32)).astype(np.float64)
    qo = g.tensors[g.outputs[0]].quant
    raw = simulate(g, x, raw=True).astype(np.float64)
    exact = np.clip(ref / qo.scale + qo.zero_point, -128, 127)  # float result in output LSB, saturated
    err = np.abs(raw - exact)
    ideal = np.abs(np.rint(exact) - exact)
    return {"mean_lsb": float(err.mean()), "max_lsb": float(err.max()), "ideal_mean_lsb": float(ideal.mean()),
            "equal_to_rounded_float": float((raw == np.rint(exact)).mean()), "output_scale": qo.scale,
            "mean_abs_error": float(err.mean() * qo.scale)}


def main() -> None:
    res: dict = {"operators": {}}
    rows = []
    by_name = {c.name: c for c in cases()}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for name, label in OPS.items():
            e = op_error(by_name[name], d)
            res["operators"][name] = e
            rows.append((f"{label}: integer error vs float", f"{e['mean_lsb']:.3f} mean / {e['max_lsb']:.2f} max LSB",
                         f"ideal {e['ideal_mean_lsb']:.3f}; {100 * e['equal_to_rounded_float']:.1f}% = rounded float"))

        data = load_digits()
        x_train, x_test, y_test = data["x_train"], data["x_test"], data["y_test"]
        calib = x_train[:256]
        float_pred = ort_run(MODEL, x_test).argmax(1)
        r = compile_model(MODEL, calib)
        int_pred = simulate(r.graph, x_test).argmax(1)
        acc_f, acc_i = float((float_pred == y_test).mean()), float((int_pred == y_test).mean())
        res["transformer"] = {"float_accuracy": acc_f, "integer_accuracy": acc_i,
                              "agreement": float((float_pred == int_pred).mean()), "test_samples": len(y_test),
                              "calibration_samples": len(calib), "macs": r.report["macs"],
                              "compile_seconds": r.report["compile_seconds"]}
        rows.append(("digits transformer accuracy, float / integer (359 test digits)",
                     f"{100 * acc_f:.2f}% / {100 * acc_i:.2f}%", "within 1 point"))
        rows.append(("  top-1 agreement integer vs float", f"{100 * res['transformer']['agreement']:.2f}%", ""))

        for board_name in ("qemu-mps2-an386", "qemu-mps2-an385"):
            board = load_board(board_name)
            rb = compile_model(MODEL, calib, board=board_name)
            write_artifacts(d / board_name, rb)
            rep = json.loads((d / board_name / "report.json").read_text())
            prof = profile_command(d / board_name, board, rb.graph, x_test[:1])
            by_op: dict[str, int] = defaultdict(int)
            for layer in prof["layers"]:
                by_op[layer["op"]] += layer["ticks"] * prof["instructions_per_tick"]
            res[board_name] = {"cpu": board.cpu, "instructions": prof["total_instructions"],
                               "instructions_by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
                               "macs_per_instruction": r.report["macs"] / prof["total_instructions"],
                               **{k: rep[k] for k in ("peak_sram_bytes", "arena_bytes", "arena_lower_bound_bytes",
                                                      "io_bytes", "scratch_bytes", "flash_bytes", "code_bytes",
                                                      "constants_flash_bytes", "stack_bytes")}}
            b = res[board_name]
            rows.append((f"instructions per inference, {board_name} ({board.cpu})", f"{b['instructions']:,}",
                         f"{b['macs_per_instruction']:.3f} MAC/instr"))
            top = ", ".join(f"{op} {100 * v / b['instructions']:.0f}%" for op, v in
                            list(b["instructions_by_op"].items())[:4])
            rows.append(("  by operator", top, ""))
            rows.append((f"  peak SRAM / arena (lower bound) / flash, {board_name}",
                         f"{b['peak_sram_bytes']:,} / {b['arena_bytes']:,} ({b['arena_lower_bound_bytes']:,}) "
                         f"/ {b['flash_bytes']:,} B", f"stack {b['stack_bytes']} B"))
        m4, m3 = res["qemu-mps2-an386"], res["qemu-mps2-an385"]
        res["dsp_speedup_instructions"] = m3["instructions"] / m4["instructions"]
        rows.append(("DSP kernels (M4) vs portable (M3): instruction ratio", f"{res['dsp_speedup_instructions']:.2f}x",
                     ""))

    print_table(rows, 40)
    write_results("transformer.json", res)


if __name__ == "__main__":
    main()
