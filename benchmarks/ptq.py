"""Post-training quantization benchmark: 4-bit weights with and without the PTQ passes, and
data-free calibration.

Prints a table and writes benchmarks/results/ptq.json. Run from the repository root:

    python benchmarks/ptq.py

resnet8: top-1 agreement with the float model on the 384 held-out natural crops (calibration
on the first 128, as in benchmarks/spine.py). Digits CNN: accuracy on its 359 test digits
(calibration on 256 training digits). 4-bit weights everywhere (first and last layer too),
8-bit activations, set with ``ptq.set_weight_bits``.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import DATA, DIGITS_CNN, RESNET8, load_digits, ort_run  # noqa: E402

from hilc.compiler import ptq  # noqa: E402
from hilc.compiler.pipeline import compile_model  # noqa: E402
from hilc.sim.simulator import simulate  # noqa: E402

BUDGET = 30.0  # seconds of AdaRound per model (the CLI default)


def w4(g):
    return ptq.set_weight_bits(g, 4)


def main() -> None:
    res: dict = {"machine": {"python": platform.python_version(), "numpy": np.__version__},
                 "adaround_budget_seconds": BUDGET}
    rows: list[tuple[str, str, str]] = []

    crops = np.load(DATA / "natural_crops.npz")["crops32"].astype(np.float32)
    calib, held = crops[:128], crops[128:]
    ref = ort_run(RESNET8, held).argmax(1)

    def r8(**kw) -> tuple[float, dict]:
        t = time.perf_counter()
        r = compile_model(RESNET8, kw.pop("calib", calib), ptq_budget=BUDGET, **kw)
        secs = time.perf_counter() - t
        return float((simulate(r.graph, held).argmax(1) == ref).mean()), {**r.report["ptq"], "compile_seconds":
                                                                           round(secs, 2)}

    int8, _ = r8(ptq="none")
    res["resnet8_int8"] = int8
    rows.append(("resnet8 int8 (min/max), agreement with float", f"{int8:.2%}", ""))
    int8_all, rep = r8(ptq="all")
    res["resnet8_int8_all_passes"] = int8_all
    rows.append(("resnet8 int8 with all passes", f"{int8_all:.2%}", ""))
    r8_runs = {}
    for methods in ("none", "equalize", "bias-correct", "equalize,bias-correct", "adaround", "all"):
        acc, rep = r8(ptq=methods, graph_hook=w4)
        r8_runs[methods] = {"agreement": acc, "compile_seconds": rep["compile_seconds"], "methods": rep["methods"]}
        if methods == "all":
            res["resnet8_w4_all_layers"] = rep["layers"]
        label = "min/max alone" if methods == "none" else methods
        rows.append((f"resnet8 w4a8 {label}", f"{acc:.2%}", f"{rep['compile_seconds']:.1f} s compile"))
    gap = int8 - r8_runs["none"]["agreement"]
    closed = (r8_runs["all"]["agreement"] - r8_runs["none"]["agreement"]) / gap if gap > 0 else 1.0
    res["resnet8_w4"] = r8_runs
    res["resnet8_w4_gap_closed"] = closed
    rows.append(("  share of the gap to int8 closed by all passes", f"{closed:.0%}", ">= 50%"))

    digits = load_digits()
    xtr, xte, yte = digits["x_train"], digits["x_test"], digits["y_test"]
    f_acc = float((ort_run(DIGITS_CNN, xte).argmax(1) == yte).mean())

    def dg(calib_x, **kw) -> float:
        r = compile_model(DIGITS_CNN, calib_x, ptq_budget=BUDGET, **kw)
        return float((simulate(r.graph, xte).argmax(1) == yte).mean()), r.report

    d_int8, _ = dg(xtr[:256], ptq="none")
    d_w4, _ = dg(xtr[:256], ptq="none", graph_hook=w4)
    d_w4p, _ = dg(xtr[:256], ptq="all", graph_hook=w4)
    res.update(digits_float=f_acc, digits_int8=d_int8, digits_w4_minmax=d_w4, digits_w4_all=d_w4p)
    rows.append(("digits float / int8", f"{f_acc:.2%} / {d_int8:.2%}", ""))
    rows.append(("digits w4a8 min/max alone / all passes", f"{d_w4:.2%} / {d_w4p:.2%}", "within 2 points of float"))

    # data-free calibration
    d_df, rep = dg(None)
    d_df_w4, _ = dg(None, ptq="all", graph_hook=w4)
    res.update(digits_int8_data_free=d_df, digits_int8_data_free_info=rep["calibration"]["data_free"],
               digits_w4_all_data_free=d_df_w4)
    rows.append(("digits int8 calibrated / data-free (BN statistics)", f"{d_int8:.2%} / {d_df:.2%}",
                 "within 2 points"))
    rows.append(("digits w4a8 all passes on synthesised inputs", f"{d_df_w4:.2%}", ""))
    for rng in ((0.0, 1.0), (0.0, 255.0)):
        acc, _ = r8(calib=None, ptq="none", input_range=rng)
        res[f"resnet8_int8_data_free_range_{int(rng[1])}"] = acc
        rows.append((f"resnet8 int8 data-free fallback, input range {rng[0]:g}..{rng[1]:g}", f"{acc:.2%}",
                     "no BN statistics"))

    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>18}  note")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>18}  {note}")
    print("\nresnet8 w4a8, per-layer output error (MSE / output variance) before -> after all passes:")
    for la in res["resnet8_w4_all_layers"]:
        print(f"  {la['name']:<10} {la['error_before']:.4f} -> {la['error_after']:.4f}")
    out = ROOT / "benchmarks" / "results" / "ptq.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
