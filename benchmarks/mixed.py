"""Mixed-precision benchmark: latency model fit, Pareto curves, QEMU instructions and flash.

1. Profiles resnet8 and the digits CNN on qemu-mps2-an386 (-icount: exact instructions) with all
   weights at 8, 4 and 2 bits and fits the per-board cost model (instructions per MAC per op
   kind and weight width + per output element), written to hilc/boards/costs/<board>.json.
2. resnet8: BitOps reduction (1x to 3x below all-int8) vs top-1 agreement with float on the 384
   held-out crops (calibrated on the first 128, as benchmarks/spine.py), for the sub-byte
   candidate set {8,4,2} weights x {8,4} activations and for the extended set with 5-7 bits
   (int8 containers); the digits CNN against its labels.
3. resnet8 mixed (2x fewer BitOps) vs int8 on qemu-mps2-an386: run --check, instructions per
   inference, flash bytes.

4. resnet8 search time at 2x with the sensitivity cache cold (alone: ``--search-time``).

``--quick [--rerank K] [--finetune-steps N] [--label L] [--only-2x]``: only step 2, for the sub-byte
set at 1, 1.5, 2, 2.2 and 3x, the extended set at 2 and
2.2x and the digits CNN at 2 and 3x, merged into the last full results (other keys kept as they were).
``--ratios R ...`` (with ``--quick``): only these resnet8 ratios; ``--sets subbyte|extended``: only
these width sets.
``--finetune-tiles``: resnet8's fine-tuning runs on 32x32 tiles of ``crops96[:96]``
(benchmarks/qat_validation.py ``train_tiles``: unlabeled in-distribution inputs, none of them
held out) instead of the 128 calibration crops; written as ``resnet8_pareto_<set>_finetune_tiles``
(each point's ``finetune_data`` says which inputs); with ``--with-calib`` the calibration crops
and the tiles together (``..._finetune_calib_tiles``).

Prints a table and writes benchmarks/results/mixed.json. Run from the repository root:
    python benchmarks/mixed.py [--no-fit] [--search-time] [--quick]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import DATA, DIGITS_CNN, RESNET8, load_digits, ort_run  # noqa: E402

from hilc.compiler import calibrate, mixed, passes  # noqa: E402
from hilc.compiler.costmodel import costs_dir, fit_cost_model, load_cost_model  # noqa: E402
from hilc.compiler.mixed import Budgets  # noqa: E402
from hilc.compiler.onnx_import import import_onnx  # noqa: E402
from hilc.compiler.pipeline import compile_model, write_artifacts  # noqa: E402
from hilc.errors import HilcError  # noqa: E402
from hilc.hil.boards import load_board  # noqa: E402
from hilc.hil.runner import profile_command, run_command  # noqa: E402
from hilc.sim.simulator import simulate  # noqa: E402

BOARD = "qemu-mps2-an386"


def float_graph(model, calib):
    g = import_onnx(model)
    for p in passes.FLOAT_PIPELINE:
        g = p(g)
    return calibrate.calibrate(g, calib)


def fit_latency(d: Path, res: dict, rows: list, crops, digits_x) -> None:
    board = load_board(BOARD)
    samples, fitted_on = [], []
    for name, model, calib in (("resnet8", RESNET8, crops[:64]), ("digits", DIGITS_CNN, digits_x[:64])):
        space = mixed.analyse(float_graph(model, calib))
        for bits, acts in ((8, 8), (4, 8), (2, 8), (8, 4), (4, 4)):
            r = compile_model(model, calib, board=BOARD, weight_bits={la.name: bits for la in space.layers},
                              act_bits={t: acts for t in space.roots})
            out = d / f"{name}_w{bits}a{acts}"
            write_artifacts(out, r)
            prof = profile_command(out, board, r.graph, calib[:1])
            ticks = {x["name"]: x["ticks"] for x in prof["layers"]}
            per_instr = prof["total_instructions"] / max(1, prof["total_ticks"])
            packed = {t for t, v in r.graph.tensors.items() if v.dtype == "int4"}
            for la in space.layers:
                node = next(n for n in r.graph.nodes if n.name == la.name)
                samples.append((la, bits, node.inputs[0] in packed, node.outputs[0] in packed,
                                ticks[la.name] * per_instr))
            fitted_on.append(f"{name} all-{bits}-bit weights, {acts}-bit activations")
            res.setdefault("profiles", {})[f"{name}_w{bits}a{acts}"] = {
                "instructions": prof["total_instructions"], "flash_bytes": r.report.get("flash_bytes"),
                "layers": {la.name: int(ticks[la.name] * per_instr) for la in space.layers}}
    model = fit_cost_model(BOARD, samples, fitted_on)
    data = model.to_json() | {"cpu": board.cpu}
    (costs_dir() / f"{BOARD}.json").write_text(json.dumps(data, indent=1) + "\n")
    pred = np.array([model.layer(la, b, 4 if i4 else 8) + (model.packed_output(la) if o4 else 0.0)
                     for la, b, i4, o4, _ in samples])
    meas = np.array([m for *_, m in samples])
    err = float(np.median(np.abs(pred / meas - 1)))
    res["cost_model"] = data | {"median_abs_rel_error_per_layer": err}
    rows.append(("latency model: per-layer median |error| (fit data)", f"{err:.1%}", ""))
    rows.append(("  per im2col element read packed / per output written packed",
                 f"{model.per_packed_input:.2f} / {model.per_packed_output:.2f}", "instructions"))
    for kind, per in model.per_mac.items():
        rows.append((f"  {kind} instructions/MAC at 8/4/2-bit weights",
                     " / ".join(f"{per.get(b, float('nan')):.2f}" for b in ("8", "4", "2")), ""))


def _opt(name: str, default=None, cast=int):
    """``--name VALUE`` from the command line (this script's few options)."""
    return cast(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


# --quick options: --rerank K and --finetune-steps N go to compile_model; --label L stores the
# curves under resnet8_pareto_<set>_<L> (other runs' keys kept); --only-2x: the 2.0 and 2.2x points
# of both sets (no digits), e.g. the fine-tuning-off comparison
def _compile_kw() -> dict:
    kw = {}
    if "--rerank" in sys.argv:
        kw["rerank"] = _opt("--rerank")
    if "--finetune-steps" in sys.argv:
        kw["finetune_steps"] = _opt("--finetune-steps")
    return kw


def _flag_values(name: str) -> list[str]:
    """The values after ``name`` on the command line, up to the next option."""
    if name not in sys.argv:
        return []
    rest = sys.argv[sys.argv.index(name) + 1:]
    return rest[:next((i for i, a in enumerate(rest) if a.startswith("--")), len(rest))]


def finetune_kw(res: dict, calib: np.ndarray) -> dict:
    if "--finetune-tiles" not in sys.argv:
        res["finetune_data"] = "the 128 calibration crops"
        return {}
    from qat_validation import train_tiles

    tiles = train_tiles(np.load(DATA / "natural_crops.npz")["crops96"].astype(np.float32)[:96])
    res["finetune_data"] = f"{len(tiles)} tiles of crops96[:96] (qat_validation.train_tiles)"
    if "--with-calib" in sys.argv:  # the calibration crops and the tiles together
        res["finetune_data"] = "the 128 calibration crops + " + res["finetune_data"]
        tiles = np.concatenate([calib, tiles])
    return {"finetune_data": tiles}


def pareto(res: dict, rows: list, crops, digits, quick: bool = False) -> None:
    calib, held = crops[:128], crops[128:]
    ft = finetune_kw(res, calib)
    ft_data = res.pop("finetune_data")  # per curve point: a --ratios run keeps the other points as they were
    only = [float(r) for r in _flag_values("--ratios")]
    ref = ort_run(RESNET8, held).argmax(1)
    agree8 = float((simulate(compile_model(RESNET8, calib).graph, held).argmax(1) == ref).mean())
    res["resnet8_int8_agreement"] = agree8
    rows.append(("resnet8 int8 top-1 agreement with float (384)", f"{agree8:.2%}", ""))
    with tempfile.TemporaryDirectory() as d:
        sets = (("subbyte", False), ("extended", True))
        if _flag_values("--sets"):
            sets = tuple(s for s in sets if s[0] in _flag_values("--sets"))
        for label, ext in sets:
            cache = Path(d) / f"sens_{label}.json"
            curve = []
            quick_ratios = (1.0, 1.5, 2.0, 2.2, 3.0) if label == "subbyte" else (2.0, 2.2)
            if "--only-2x" in sys.argv:
                quick_ratios = (2.0, 2.2)
            for ratio in (only or quick_ratios) if quick else (1.0, 1.25, 1.5, 1.75, 2.0, 2.2, 2.5, 3.0):
                t = time.perf_counter()
                try:
                    r = compile_model(RESNET8, calib, precision="mixed", budgets=Budgets(bitops_ratio=ratio),
                                      sensitivity_cache=cache, extended_bits=ext, **ft, **_compile_kw())
                except HilcError as e:
                    curve.append({"bitops_ratio": ratio, "error": str(e)})
                    continue
                seconds = time.perf_counter() - t
                m = r.report["mixed_precision"]
                agree = float((simulate(r.graph, held).argmax(1) == ref).mean())
                curve.append({"bitops_ratio": ratio, "bitops_reduction": r.report["bitops_int8"] / r.report["bitops"],
                              "agreement": agree, "points_below_int8": 100 * (agree8 - agree),
                              "compile_seconds": round(seconds, 2), "search_seconds": m["search_seconds"],
                              "sensitivity_cached": m["sensitivity_cached"],
                              "predicted_perturbation": m["predicted_perturbation"],
                              "measured_perturbation": m["measured_perturbation"],
                              "weight_bits": m["weight_bits"], "act_bits": m["act_bits"],
                              "ptq": m.get("ptq"), "finetune": m.get("finetune"), "finetune_data": ft_data,
                              "rerank": m.get("rerank")})
                rows.append((f"resnet8 {label} {ratio:.2f}x BitOps: agreement", f"{agree:.2%}",
                             f"{100 * (agree8 - agree):+.1f} pts vs int8, search {m['search_seconds']:.1f} s"))
            # fine-tuned on other inputs: its own curve, the default's stays as it was
            suffix = ("_finetune_calib_tiles" if "--with-calib" in sys.argv else "_finetune_tiles") if ft else ""
            suffix += f"_{_opt('--label', cast=str)}" if "--label" in sys.argv else ""
            res[f"resnet8_pareto_{label}{suffix}"] = curve
        # a partial resnet8 run: the digits rows stay as they were
        if only or _flag_values("--sets") or "--only-2x" in sys.argv:
            return
        # digits CNN
        xtr, xte, yte = digits
        f_acc = float((ort_run(DIGITS_CNN, xte).argmax(1) == yte).mean())
        res["digits_float_accuracy"] = f_acc
        dig = []
        for label, ext in sets[:1] if quick else sets:
            for ratio in (2.0, 3.0) if quick else (2.0, 2.5, 3.0):
                r = compile_model(DIGITS_CNN, xtr[:256], precision="mixed", budgets=Budgets(bitops_ratio=ratio),
                                  sensitivity_cache=Path(d) / f"dsens_{label}.json", extended_bits=ext,
                                  **_compile_kw())
                acc = float((simulate(r.graph, xte).argmax(1) == yte).mean())
                dig.append({"set": label, "bitops_ratio": ratio,
                            "bitops_reduction": r.report["bitops_int8"] / r.report["bitops"], "accuracy": acc,
                            "weight_bits": r.report["mixed_precision"]["weight_bits"],
                            "act_bits": r.report["mixed_precision"]["act_bits"],
                            "finetune": r.report["mixed_precision"].get("finetune")})
                rows.append((f"digits {label} {ratio:.1f}x BitOps: accuracy", f"{acc:.2%}",
                             f"float {f_acc:.2%}"))
        res["digits_pareto"] = dig


def on_board(d: Path, res: dict, rows: list, crops) -> None:
    board = load_board(BOARD)
    calib, held = crops[:128], crops[128:144]
    out = {}
    for label, kw in (("int8", {}), ("mixed_2x", {"precision": "mixed", "budgets": Budgets(bitops_ratio=2.0)}),
                      ("mixed_3x", {"precision": "mixed", "budgets": Budgets(bitops_ratio=3.0)})):
        r = compile_model(RESNET8, calib, board=BOARD, sensitivity_cache=d / "sens_board.json", **kw)
        o = d / f"board_{label}"
        write_artifacts(o, r)
        _, bad = run_command(o, board, r.graph, held, check=True)
        prof = profile_command(o, board, r.graph, held[:1])
        per_instr = prof["total_instructions"] / max(1, prof["total_ticks"])
        linear = sum(x["ticks"] * per_instr for x in prof["layers"] if x["op"] in ("conv2d", "dense"))
        entry = {"conv_dense_instructions": int(linear), "instructions": prof["total_instructions"],
                 "flash_bytes": r.report["flash_bytes"],
                 "constants_flash_bytes": r.report["constants_flash_bytes"], "bitops": r.report["bitops"],
                 "arena_bytes": r.report["arena_bytes"], "peak_sram_bytes": r.report["peak_sram_bytes"],
                 "bitops_int8": r.report["bitops_int8"], "run_check_mismatches": bad, "samples_checked": len(held)}
        if "mixed_precision" in r.report:
            m = r.report["mixed_precision"]
            entry.update(predicted_instructions=m["predicted_instructions"],
                         predicted_latency_ratio=m["predicted_instructions"] / m["predicted_instructions_int8"],
                         measured_latency_ratio=linear / out["int8"]["conv_dense_instructions"],
                         weight_bits=m["weight_bits"],
                         act_bits=m["act_bits"], predicted_peak_sram_bytes=m.get("predicted_peak_sram_bytes"),
                         bitops_reduction=r.report["bitops_int8"] / r.report["bitops"])
        out[label] = entry
        rows.append((f"resnet8 {label} on {BOARD}: instructions / flash / peak SRAM",
                     f"{entry['instructions']:,} / {entry['flash_bytes']:,} / {entry['peak_sram_bytes']:,} B",
                     f"run --check: {len(held) - bad}/{len(held)} bit-exact"
                     + (f"; conv/dense {entry['measured_latency_ratio']:.3f}x int8's, predicted "
                        f"{entry['predicted_latency_ratio']:.3f}x" if "predicted_instructions" in entry else "")))
    res["resnet8_board"] = out


def search_time(res: dict, rows: list, crops) -> None:
    """The acceptance measure alone: resnet8 at 2x fewer BitOps, sensitivity cache cold."""
    with tempfile.TemporaryDirectory() as d:
        r = compile_model(RESNET8, crops[:128], precision="mixed", budgets=Budgets(bitops_ratio=2.0),
                          sensitivity_cache=Path(d) / "sens.json", **_compile_kw())
    m = r.report["mixed_precision"]
    key = "resnet8_search_2x_cold" + (f"_{_opt('--label', cast=str)}" if "--label" in sys.argv else "")
    res[key] = {"search_seconds": m["search_seconds"], "sensitivity_seconds": m["sensitivity_seconds"],
                "ptq_seconds": (m.get("ptq") or {}).get("seconds"),
                "finetune_seconds": (m.get("finetune") or {}).get("seconds"),
                **({"rerank_seconds": m["rerank"]["seconds"]} if "rerank" in m else {})}
    rows.append(("resnet8 2x search, sensitivity cold (of it: sensitivity, PTQ)", f"{m['search_seconds']:.1f} s",
                 f"{m['sensitivity_seconds']:.1f} s, {(m.get('ptq') or {}).get('seconds', 0):.1f} s; then fine-tuning "
                 f"{(m.get('finetune') or {}).get('seconds', 0):.1f} s"))


def main() -> None:
    crops = np.load(DATA / "natural_crops.npz")["crops32"].astype(np.float32)
    dg = load_digits()
    digits = (dg["x_train"], dg["x_test"], dg["y_test"])
    res: dict = {}
    rows: list[tuple[str, str, str]] = []
    out = ROOT / "benchmarks" / "results" / "mixed.json"
    if "--search-time" in sys.argv:  # only this figure, merged into the last full results
        search_time(res, rows, crops)
        print(*rows[0])
        out.write_text(json.dumps(json.loads(out.read_text()) | res, indent=1))
        return
    if "--quick" in sys.argv:  # the Pareto curves only, merged into the last full results
        pareto(res, rows, crops, digits, quick=True)
        width = max(len(r[0]) for r in rows)
        for name, value, note in rows:
            print(f"{name:<{width}}  {value:>30}  {note}")
        old = json.loads(out.read_text())
        for k in [k for k in res if k.startswith("resnet8_pareto_") and k in old]:  # merged point by point
            new = {p["bitops_ratio"] for p in res[k]}
            res[k] = sorted([p for p in old[k] if p["bitops_ratio"] not in new] + res[k],
                            key=lambda p: p["bitops_ratio"])
        out.write_text(json.dumps(old | res, indent=1))
        return
    with tempfile.TemporaryDirectory() as d:
        if "--no-fit" not in sys.argv:
            fit_latency(Path(d), res, rows, crops, digits[0])
        else:  # keep the profiles and the fit of the last full run
            res["cost_model"] = load_cost_model(BOARD).to_json()
            last = ROOT / "benchmarks" / "results" / "mixed.json"
            if last.exists():
                old = json.loads(last.read_text())
                res.update({k: old[k] for k in ("profiles", "cost_model") if k in old})
        on_board(Path(d), res, rows, crops)
    pareto(res, rows, crops, digits)
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>30}  {note}")
    search_time(res, rows, crops)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
