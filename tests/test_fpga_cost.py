"""The FPGA MAC cost model (known answers from its stated rules) and the per-layer picker."""

from __future__ import annotations

import numpy as np
from conftest import DIGITS_CNN
from conftest import calibrated as float_graph

from hilc.compiler.quantize import quantize
from hilc.targets.hls import cost


def test_mac_cost_known_answers():
    # int8 x (8+1)-bit: one DSP, the 24-bit accumulator in LUTs
    assert cost.mac_cost(8, 8, acc_bits=24)["lut"] == 24 and cost.mac_cost(8, 8, acc_bits=24)["dsp"] == 1
    # int4 weights: a 4x9 LUT multiplier
    assert cost.mac_cost(4, 8, acc_bits=20) == {**cost.mac_cost(4, 8, acc_bits=20), "lut": 36 + 20, "dsp": 0}
    # E2M1 x E2M1: 2x2 significands, exponent adder 3, two hidden-bit LUTs, shift range 2+2=4
    # (3 mux stages -> 2 LUT levels) over a 4+4 = 8-bit word: 16 LUTs, plus the accumulator
    e2m1 = cost.mac_cost("E2M1", "E2M1", acc_bits=14)
    assert (e2m1["lut"], e2m1["dsp"], e2m1["parts"]["shifter"]) == (4 + 3 + 2 + 16 + 14, 0, 16)
    # E4M3 x E4M3: 4x4 significands, shift range 14+14=28 (5 stages -> 3 levels) over 8+28 bits
    e4m3 = cost.mac_cost("E4M3", "E4M3", acc_bits=44)
    assert e4m3["parts"]["shifter"] == 36 * 3 and e4m3["lut"] == 16 + 5 + 2 + 108 + 44
    # a wider format never costs less at the same accumulator width
    assert cost.mac_cost("E3M2", "E3M2", acc_bits=30)["lut"] > cost.mac_cost("E2M1", "E2M1", acc_bits=30)["lut"]


def test_picker_respects_the_error_budget_and_minimises_cost(digits):
    g = float_graph(DIGITS_CNN, digits["x_train"][:64])
    cands = cost.candidates([4, 8])
    errs = cost.layer_errors(g, digits["x_train"][:32], cands)
    costs = cost.candidate_costs(g, cands)
    assert set(errs) == set(costs) and all(set(errs[n]) == {"int:4", "mf:E2M1", "int:8", "mf:E4M3"} for n in errs)
    # int8 is more accurate than int4 on every layer
    assert all(errs[n]["int:8"] < errs[n]["int:4"] for n in errs)
    loose = cost.pick(g, errs, costs, budget=1e9)
    tight = cost.pick(g, errs, costs, budget=sum(min(e.values()) for e in errs.values()) * 1.0001)
    lut = {n: {k: c["lut"] + 100 * c["dsp"] for k, c in v.items()} for n, v in costs.items()}
    assert all(loose[n] == min(lut[n], key=lut[n].get) for n in loose)  # no budget: the cheapest each
    assert all(tight[n] == min(errs[n], key=errs[n].get) for n in tight)  # tight: the most accurate each
    gq = quantize(cost.apply_choice(g, tight))
    total = cost.graph_cost(gq)["total"]
    assert total["lut"] > 0 and np.isfinite(total["dsp"])


def test_report_plots_the_minifloat_comparison_when_report_json_carries_it(tmp_path, digits):
    import json

    from hilc.compiler.pipeline import compile_model, write_artifacts
    from hilc.report_html.render import build_context

    out = tmp_path / "o"
    write_artifacts(out, compile_model(DIGITS_CNN, digits["x_train"][:64]))
    assert "pareto" not in [p[0] for p in build_context(out)["plots"]]
    report = json.loads((out / "report.json").read_text())
    report["minifloat"] = {"metric": "accuracy", "pareto": ["int8", "E2M1"], "points": [
        {"label": "int8", "kind": "int", "accuracy": 0.99, "lut": 3600, "dsp": 150},
        {"label": "E2M1", "kind": "mf", "accuracy": 0.98, "lut": 7000, "dsp": 10},
        {"label": "E4M3xE4M3", "kind": "mfxmf", "accuracy": 0.97, "lut": 25000, "dsp": 12}]}
    (out / "report.json").write_text(json.dumps(report))
    plots = {p[0]: p[2] for p in build_context(out)["plots"]}
    assert plots["pareto"].startswith("data:image/png;base64,") and len(plots["pareto"]) > 5000


def test_precision_auto_fpga_picks_per_layer_and_reports_it(tmp_path, digits):
    import json

    from test_hls_backend import hilc

    calib = tmp_path / "calib.npy"
    np.save(calib, digits["x_train"][:64])
    r = hilc("compile", DIGITS_CNN, "--calib", calib, "-o", tmp_path / "o", "--target", "hls", "--precision",
             "auto-fpga", "--fpga-error-ratio", "30", "-q")
    assert r.returncode == 0, r.stderr
    full = json.loads((tmp_path / "o" / "report.json").read_text())
    rep = full["fpga_precision"]
    assert set(rep["choice"]) == {"conv2d_0", "conv2d_1", "conv2d_2", "dense_0"}
    assert rep["error"] <= rep["error_budget"] and rep["error_ratio"] == 30
    # a looser budget than int8's never costs more than int8 everywhere
    assert rep["cost"]["lut"] + 100 * rep["cost"]["dsp"] <= rep["int8_cost"]["lut"] + 100 * rep["int8_cost"]["dsp"]
    assert any(k.startswith("mf:") for k in rep["choice"].values())
    assert "hilc_mf" in (tmp_path / "o" / "hls" / "model.cpp").read_text()
    # priced with the design's parallelism: the instantiated PE x SIMD, and per layer the same DSPs as the
    # HLS estimate (the same rules for lanes and requantizers); the estimate's LUTs add ROMs and buffers
    est = {la["name"]: la for la in full["fpga"]["layers"]}
    assert rep["hls_estimate"]["same_parallelism"] and max(la["lanes"] for la in rep["layers"]) > 1
    for la in rep["layers"]:
        assert (la["pe"], la["simd"]) == (est[la["name"]]["pe"], est[la["name"]]["simd"])
        assert la["dsp"] == la["hls_dsp"] == est[la["name"]]["dsp"] and la["lut"] < la["hls_lut"]
    assert sum(la["lut"] for la in rep["layers"]) == rep["cost"]["lut"]
    # PTQ after the pick (bias correction, AdaRound with a fixed step count) lowers the output error
    assert rep["ptq"]["methods"] == ["bias-correct", "adaround"] and rep["ptq"]["adaround_iterations"] > 0
    assert rep["ptq"]["after"]["relative_mse"] < rep["ptq"]["before"]["relative_mse"]
    # the Pareto front of all-int, all-minifloat and mixed points, with the pick on it
    par = rep["pareto"]
    assert {p["kind"] for p in par["points"]} == {"int", "mf", "mixed"} and "chosen" in par["pareto"]
    assert {p["label"] for p in par["points"]} >= {f"int{b}" for b in cost.AUTO_BITS} | {"E2M1", "E4M3"}
    r = hilc("report", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "o" / "report.html").read_text()
    assert "Error proxy vs FPGA cost" in page and "auto-fpga pick:" in page


def test_auto_fpga_is_deterministic_and_ptq_runs_on_the_chosen_grids(digits):
    """The same inputs give the same choice and the same weights (fixed AdaRound step counts);
    the minifloat layers keep their chosen grid through the PTQ."""
    g = float_graph(DIGITS_CNN, digits["x_train"][:64])
    x = digits["x_train"][:64]
    lanes = {"conv2d_1": (2, 4)}
    a, ia = cost.auto_fpga(g, x, 30.0, [4, 8], parallel=lanes, ptq_methods=["bias-correct", "adaround"])
    b, ib = cost.auto_fpga(g, x, 30.0, [4, 8], parallel=lanes, ptq_methods=["bias-correct", "adaround"])
    assert ia["choice"] == ib["choice"] and ia["ptq"]["after"] == ib["ptq"]["after"]
    assert all(np.array_equal(a.constants[k], b.constants[k]) for k in a.constants)
    row = next(la for la in ia["layers"] if la["name"] == "conv2d_1")
    assert row["lanes"] == 8 and row["lut"] == cost.layer_cost(quantize(a), next(
        n for n in quantize(a).nodes if n.name == "conv2d_1"), 2, 4)["lut"]
    assert any(n.attrs.get("format") for n in a.nodes)
    for n in a.nodes:
        if n.attrs.get("format"):
            assert n.attrs["w_scale_bits"] == n.attrs["format"]


def test_pricing_parallelism_is_the_designs_and_falls_back_off_the_hls_target(digits):
    import pytest

    from hilc.errors import HilcError
    from hilc.targets.hls.codegen import generate_hls

    g = float_graph(DIGITS_CNN, digits["x_train"][:32])
    lanes, source = cost.pricing_parallelism(g, "pynq-z2", None, for_hls=True)
    design = generate_hls(quantize(g), "pynq-z2")
    assert lanes == {r["name"]: (r["pe"], r["simd"]) for r in design.estimate["layers"] if "pe" in r}
    assert "HLS design for pynq-z2" in source
    bad = {"no_such_layer": (1, 1)}  # a design the backend refuses
    with pytest.raises(HilcError, match="no_such_layer"):
        cost.pricing_parallelism(g, "pynq-z2", bad, for_hls=True)
    lanes, source = cost.pricing_parallelism(g, "pynq-z2", bad, for_hls=False)
    assert lanes == {} and source.startswith("one lane per layer") and "no_such_layer" in source
