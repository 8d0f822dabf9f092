"""Minifloats vs integers on the FPGA path: accuracy and the cost model's LUT/DSP per width.

Prints a table and writes benchmarks/results/minifloat.json. Run from the repository root:

    python benchmarks/minifloat.py

For resnet8 (top-1 agreement with the float model on the 384 held-out natural crops, calibration
on the first 128, as benchmarks/spine.py) and the digits CNN (accuracy on its 359 test digits,
calibration on 256 training digits), at 4, 6 and 8 bits, every conv/dense layer takes:
* ``int``: integer weights of that width, int8 activations;
* ``mf``: minifloat weights of that width (E2M1, E3M2, E4M3), int8 activations;
* ``mf x mf``: minifloat weights and the layer input cast to the same format on entry.
All with the same PTQ passes (equalize, bias-correct, AdaRound with a fixed step count, so a
rerun gives the same figures; on a minifloat grid AdaRound
rounds each weight to one of its two neighbouring grid values). Then ``mixed``: the per-layer
picker (hilc/targets/hls/cost.py) among int/minifloat of 4, 6 and 8 bits at two error
budgets, and ``hilc compile --target hls --precision auto-fpga`` at two error ratios with and
without the PTQ after the pick (bias correction + AdaRound, fixed step count; ``equalize``: the
same pick without it; ``none``: no PTQ at all, which may pick differently). The ``x`` rows'
input casts take the full-range shift (compile_model's default); ``cast_search`` compares the
least-MSE shift searched on calibration data with it. Cost: the analytical model of
hilc/targets/hls/cost.py for the conv/dense MACs, with the PE x SIMD the HLS backend picks for the
int8 design on pynq-z2 (the same parallelism for every variant).
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from common import write_results  # noqa: E402
from conftest import DATA, DIGITS_CNN, RESNET8, load_digits, ort_run  # noqa: E402

from hilc.compiler import calibrate as calib_mod  # noqa: E402
from hilc.compiler import minifloat as mf  # noqa: E402
from hilc.compiler import passes, ptq  # noqa: E402
from hilc.compiler.onnx_import import import_onnx  # noqa: E402
from hilc.compiler.pipeline import compile_model, write_artifacts  # noqa: E402
from hilc.report_html.render import write_report  # noqa: E402
from hilc.sim.simulator import simulate  # noqa: E402
from hilc.targets.hls import cost  # noqa: E402
from hilc.targets.hls.codegen import generate_hls  # noqa: E402

BUDGET = None  # AdaRound by a fixed step count (ptq.correct_layers' 2000), not seconds: repeatable
BITS = (4, 6, 8)
BOARD = "pynq-z2"
AUTO_RATIOS = (1.0, 10.0)  # --fpga-error-ratio: int8's summed error proxy, and ten times it


def variants(bits: int) -> dict:
    f = mf.for_bits(bits).name
    return {
        f"int{bits}": lambda g: ptq.set_weight_bits(g, bits),
        f"{f}": lambda g: mf.set_formats(g, f),
        f"{f}x{f}": lambda g: mf.set_formats(g, f, f),
    }


def run_model(name: str, model: Path, calib: np.ndarray, x: np.ndarray, labels: np.ndarray) -> dict:
    def compile_eval(hook) -> tuple[float, object]:
        r = compile_model(model, calib, ptq="all", ptq_budget=BUDGET, graph_hook=hook)
        return float((simulate(r.graph, x).argmax(1) == labels).mean()), r.graph

    base_acc, base = compile_eval(None)
    design = generate_hls(base, BOARD)
    parallel = {r["name"]: (r["pe"], r["simd"]) for r in design.estimate["layers"] if "pe" in r}
    points = []

    def point(label: str, kind: str, bits: int | None, hook) -> None:
        t = time.perf_counter()
        acc, g = compile_eval(hook)
        c = cost.graph_cost(g, parallel)
        points.append({"label": label, "kind": kind, "bits": bits, "accuracy": acc, **c["total"],
                       "layers": [{k: r[k] for k in ("name", "format", "act_format", "acc_bits", "lut", "dsp")}
                                  for r in c["layers"]], "seconds": round(time.perf_counter() - t, 1)})
        print(f"  {name:8s} {label:12s} acc {acc:.2%}  LUT {c['total']['lut']:7d}  DSP {c['total']['dsp']:4d}",
              flush=True)

    for b in BITS:
        for label, hook in variants(b).items():
            kind = "int" if label.startswith("int") else ("mfxmf" if "x" in label else "mf")
            point(label, kind, b, hook)
    # the input casts' searched shifts (search_act_shifts) against the full-range shift alone
    cast_search = {}
    for b in BITS:
        f = mf.for_bits(b).name
        steps, mf.PIPELINE_ACT_Q_STEPS = mf.PIPELINE_ACT_Q_STEPS, mf.ACT_Q_STEPS
        try:
            r = compile_model(model, calib, ptq="all", ptq_budget=BUDGET,
                              graph_hook=lambda g, f=f: mf.set_formats(g, f, f))
        finally:
            mf.PIPELINE_ACT_Q_STEPS = steps
        searched = r.graph.meta.get("act_cast_search", {})
        acc_s = float((simulate(r.graph, x).argmax(1) == labels).mean())
        acc_0 = next(p["accuracy"] for p in points if p["label"] == f"{f}x{f}")  # the full-range row above
        cast_search[f"{f}x{f}"] = {"searched_accuracy": acc_s, "full_range_accuracy": acc_0,
                                   "layers_finer": sum(v["act_q"] < v["full_range_q"] for v in searched.values()),
                                   "layers": len(searched),
                                   "mean_cast_mse_ratio": float(np.mean([v["mse_ratio"] for v in searched.values()]))}
        print(f"  {name:8s} {f}x{f} cast shift searched {acc_s:.2%} / full range {acc_0:.2%} "
              f"({cast_search[f'{f}x{f}']['layers_finer']} of {len(searched)} layers finer, cast MSE x"
              f"{cast_search[f'{f}x{f}']['mean_cast_mse_ratio']:.2f})", flush=True)

    # the per-layer picker on the calibrated float graph
    g = import_onnx(model)
    for p in passes.FLOAT_PIPELINE:
        g = p(g)
    g = calib_mod.calibrate(g, calib)
    cands = cost.candidates(list(BITS))
    errs = cost.layer_errors(g, calib[:64], cands)
    costs = cost.candidate_costs(g, cands, parallel)
    for tag, key in (("mixed@int8-error", "int:8"), ("mixed@int6-error", "int:6")):
        budget = sum(e[key] for e in errs.values())
        choice = cost.pick(g, errs, costs, budget)
        point(tag, "mixed", None, lambda gg, choice=choice: cost.apply_choice(gg, choice))
        points[-1]["choice"] = choice
    # hilc compile --target hls --precision auto-fpga: with and without the PTQ after the pick
    auto = {}
    for ratio in AUTO_RATIOS:
        row = {}
        # "equalize": the same pick (equalization runs before it) without the PTQ after it
        for tag, spec in (("ptq", None), ("equalize", "equalize"), ("none", "none")):
            t = time.perf_counter()
            r = compile_model(model, calib, target="hls", board=BOARD, precision="auto-fpga",
                              fpga_error_ratio=ratio, ptq=spec)
            fp = r.report["fpga_precision"]
            row[tag] = {"accuracy": float((simulate(r.graph, x).argmax(1) == labels).mean()),
                        "choice": fp["choice"], "cost": fp["cost"], "hls_estimate": fp.get("hls_estimate"),
                        "ptq": fp.get("ptq"), "seconds": round(time.perf_counter() - t, 1)}
        auto[str(ratio)] = row
        assert row["ptq"]["choice"] == row["equalize"]["choice"]
        print(f"  {name:8s} auto-fpga x{ratio}: {row['equalize']['accuracy']:.2%} -> {row['ptq']['accuracy']:.2%} "
              f"with PTQ after the pick (no PTQ at all: {row['none']['accuracy']:.2%});"
              f" cost {row['ptq']['cost']['lut']} LUT / {row['ptq']['cost']['dsp']} DSP, "
              f"HLS estimate {row['ptq']['hls_estimate']['conv_dense']}", flush=True)
    return {"base_int8_accuracy": base_acc, "parallel": {k: list(v) for k, v in parallel.items()},
            "layer_errors": errs, "points": points, "cast_search": cast_search, "auto_fpga": auto}


def pareto(points: list[dict]) -> list[str]:
    """Labels not dominated in (accuracy up, LUT + 100 DSP down)."""
    def c(p):
        return p["lut"] + 100 * p["dsp"]
    def dominates(q, p):
        return q["accuracy"] >= p["accuracy"] and c(q) <= c(p) and (q["accuracy"] > p["accuracy"] or c(q) < c(p))
    return [p["label"] for p in points if not any(dominates(q, p) for q in points)]


def main() -> None:
    res: dict = {"machine": {"python": platform.python_version(), "numpy": np.__version__},
                 "adaround": "2000 steps per layer (fixed)", "board": BOARD, "bits": list(BITS),
                 "cost_note": "analytical model of hilc/targets/hls/cost.py (conv/dense MACs and requantizers), "
                              "not synthesis results"}
    crops = np.load(DATA / "natural_crops.npz")["crops32"].astype(np.float32)
    calib, held = crops[:128], crops[128:]
    res["resnet8"] = run_model("resnet8", RESNET8, calib, held, ort_run(RESNET8, held).argmax(1))
    res["resnet8"]["metric"] = "top-1 agreement with float (384 held-out crops)"

    dg = load_digits()
    xtr, xte, yte = dg["x_train"], dg["x_test"], dg["y_test"]
    res["digits"] = run_model("digits", DIGITS_CNN, xtr[:256], xte, yte)
    res["digits"]["metric"] = f"accuracy ({len(xte)} test digits)"
    res["digits"]["float_accuracy"] = float((ort_run(DIGITS_CNN, xte).argmax(1) == yte).mean())

    print(f"\n{'model':8s} {'variant':18s} {'bits':>4s} {'accuracy':>9s} {'LUT':>8s} {'DSP':>5s}  pareto")
    for m in ("resnet8", "digits"):
        front = pareto(res[m]["points"])
        res[m]["pareto"] = front
        for p in res[m]["points"]:
            print(f"{m:8s} {p['label']:18s} {p['bits'] or '-':>4} {p['accuracy']:9.2%} {p['lut']:8d} {p['dsp']:5d}"
                  f"  {'*' if p['label'] in front else ''}")
    print()
    write_results("minifloat.json", res)
    # the HTML report of the int8 digits CNN, carrying the comparison: the Pareto plot
    with tempfile.TemporaryDirectory() as tmp:
        write_artifacts(tmp, compile_model(DIGITS_CNN, xtr[:256]))
        rep = json.loads((Path(tmp) / "report.json").read_text())
        rep["minifloat"] = {k: res["digits"][k] for k in ("points", "pareto", "metric")}
        (Path(tmp) / "report.json").write_text(json.dumps(rep))
        page = write_report(tmp, ROOT / "benchmarks" / "results" / "minifloat_digits_report.html")
    print(f"wrote {page.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
