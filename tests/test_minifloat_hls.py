"""Minifloat layers: simulator vs HLS C-simulation bit for bit, the MCU backend's refusal, PTQ."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from conftest import DIGITS_CNN, RESNET8
from conftest import calibrated as float_graph
from test_hls_backend import int_inputs

from hilc.compiler import calibrate as calib_mod
from hilc.compiler import minifloat as mf
from hilc.compiler.quantize import quantize
from hilc.errors import HilcError
from hilc.sim.simulator import run_int_batched
from hilc.targets.hls import build
from hilc.targets.hls.codegen import generate_hls, write_hls_project

# per-layer (weight format, input cast format), cycled over the conv/dense layers
MIX = [("E4M3", "E4M3"), ("E3M2", "E3M2"), ("E2M1", "E2M1"), ("E4M3", None), ("E2M1", "E4M3")]



def mixed(g):
    names = [n.name for n in g.nodes if n.op in ("conv2d", "dense")]
    return mf.set_formats(g, {k: MIX[i % len(MIX)][0] for i, k in enumerate(names)},
                          {k: MIX[i % len(MIX)][1] for i, k in enumerate(names)})


@pytest.fixture(scope="module")
def digits_float(digits):
    return float_graph(DIGITS_CNN, digits["x_train"][:128])


def csim_vs_sim(g, x, out):
    qx = int_inputs(g, x)
    design = generate_hls(g, "pynq-z2", tb_input=qx[:2])
    write_hls_project(out, design)
    sim = run_int_batched(g, qx).reshape(len(x), -1)
    return build.run_csim(out / "hls", qx.reshape(len(x), -1), sim.shape[1]), sim, design


def test_digits_cnn_minifloat_layers_csim_bit_exact(digits_float, digits, tmp_path):
    """E4M3 x E4M3, E3M2 x E3M2, E2M1 x E2M1 and integer x E4M3 layers in one design, the input
    casts' shifts searched on calibration data (E2M1's finer than its full-range one)."""
    searched = mf.search_act_shifts(mixed(digits_float), digits["x_train"][:64])
    g = quantize(searched)
    assert searched.meta["act_cast_search"]["conv2d_2"]["act_q"] < searched.meta["act_cast_search"]["conv2d_2"][
        "full_range_q"]
    assert all(n.attrs["act_q"] == searched.meta["act_cast_search"][n.name]["act_q"] for n in g.nodes
               if n.attrs.get("act_format"))
    fmts = [(n.attrs["format"], n.attrs.get("act_format")) for n in g.nodes if n.op in ("conv2d", "dense")]
    assert fmts == MIX[:4]
    got, sim, design = csim_vs_sim(g, digits["x_test"][:24], tmp_path)
    assert np.array_equal(got, sim)
    assert "hilc_mf_mul<2, 1, 2, 1>" in design.files["model.cpp"]
    # the classifier still works on minifloats
    assert (sim.argmax(1) == digits["y_test"][:24]).mean() >= 0.9
    r = subprocess.run([str(tmp_path / "hls" / "build" / "csim")], cwd=tmp_path / "hls", capture_output=True,
                       text=True)
    assert r.returncode == 0 and "0 output bytes differ" in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
def test_resnet8_minifloat_layers_csim_bit_exact(crops32, tmp_path):
    g = quantize(mf.search_act_shifts(mixed(float_graph(RESNET8, crops32[:64])), crops32[:64]))
    assert any(n.attrs["act_q"] < mf.act_shift(mf.parse(n.attrs["act_format"]), 255) for n in g.nodes
               if n.attrs.get("act_format") == "E2M1")
    got, sim, _ = csim_vs_sim(g, crops32[128:144], tmp_path)
    assert {n.attrs.get("format") for n in g.nodes if n.op == "conv2d"} >= {"E4M3", "E3M2", "E2M1"}
    assert np.array_equal(got, sim)


def test_mcu_c_backend_refuses_minifloat_layers(digits_float, tmp_path):
    from hilc.targets.c.codegen import generate_c

    g = quantize(mf.set_formats(digits_float, "E3M2"))
    with pytest.raises(HilcError, match=r"conv2d_0 .*E3M2 minifloat layer: the MCU C backend has no minifloat"):
        generate_c(g)


def test_minifloat_accumulator_is_exact_against_float64(digits_float, digits):
    """The simulator's wide accumulator is the exact sum of decoded products: a float64 dot
    product of the decoded values (exact here: < 2**53) gives the same layer output."""
    g = quantize(mf.set_formats(digits_float, "E3M2", "E2M1"))
    n = g.nodes[0]
    fmt, afmt = mf.layer_formats(n)
    qx = int_inputs(g, digits["x_test"][:4])
    xa, wf = mf.layer_inputs(n, g, qx)
    vals = mf.decode(afmt, mf.cast_int(afmt, qx.astype(np.int64) - n.attrs["zp_in"], n.attrs["act_q"]))
    assert np.array_equal(np.ldexp(xa.astype(np.float64), afmt.emin), vals)
    assert np.array_equal(np.ldexp(wf.astype(np.float64), fmt.emin), mf.decode(fmt, g.param(n, "weight")))


def test_ptq_passes_run_on_minifloat_layers_and_quantize_keeps_their_grid(digits_float, digits):
    from hilc.compiler import ptq

    g = mf.set_formats(digits_float, "E2M1")
    x = digits["x_train"][:64]
    g2, rep = ptq.run_ptq(g, x, ["equalize", "bias-correct", "adaround"], budget_s=2.0)
    assert all(n.attrs["w_scale_bits"] == "E2M1" for n in ptq.linear_nodes(g2))
    # quantize reproduces the pinned grid exactly: decoded codes x scale == the pinned float weights
    gq = quantize(calib_mod.calibrate(g2, x))
    for fn, qn in zip(ptq.linear_nodes(g2), ptq.linear_nodes(gq), strict=True):
        s = np.asarray(fn.attrs["w_scale"])
        w = g2.param(fn, "weight").astype(np.float64).reshape(len(s), -1)
        wq = mf.decode(mf.parse("E2M1"), gq.param(qn, "weight")).reshape(len(s), -1) * s[:, None]
        assert np.allclose(wq, w, rtol=1e-6, atol=0)
    assert sum(r["error_after"] for r in rep["layers"]) < sum(r["error_before"] for r in rep["layers"])


def test_cli_minifloat_option_compiles_for_hls_and_the_c_target_refuses(tmp_path):
    from test_hls_backend import hilc

    calib = tmp_path / "calib.npy"
    d = np.load(DIGITS_CNN.parent / "digits.npz")["images"].astype(np.float32)[:64, None]
    np.save(calib, d)
    r = hilc("compile", DIGITS_CNN, "--calib", calib, "-o", tmp_path / "o", "--target", "hls",
             "--minifloat", "conv2d_0=E4M3xE4M3,dense_0=E2M1", "-q")
    assert r.returncode == 0, r.stderr
    cpp = (tmp_path / "o" / "hls" / "model.cpp").read_text()
    assert "hilc_mf_mul<4, 3, 4, 3>" in cpp and "hilc_mfw_mul<2, 1>" in cpp
    r = hilc("compile", DIGITS_CNN, "--calib", calib, "-o", tmp_path / "c", "--target", "c", "--minifloat", "E3M2")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no minifloat kernels" in r.stderr, r.stderr
    r = hilc("compile", DIGITS_CNN, "--calib", calib, "-o", tmp_path / "x", "--minifloat", "nope=E3M2")
    assert r.returncode == 2 and "no conv/dense layer named nope" in r.stderr


def test_minifloat_input_casts_get_bias_correction_and_adaround_after_calibration(digits):
    """With input casts, equalization runs before calibration and bias correction + AdaRound after
    the cast shifts are searched, with the casts simulated: closer to float than without them."""
    from hilc.compiler.pipeline import compile_model
    from hilc.sim.simulator import run_float, simulate, to_physical

    x, xt = digits["x_train"][:64], digits["x_test"][:96]
    hook = lambda g: mf.set_formats(g, "E2M1", "E2M1")  # noqa: E731
    fg = float_graph(DIGITS_CNN, x)
    ref = run_float(fg, {fg.inputs[0]: to_physical(fg, fg.inputs[0], xt)})[fg.outputs[0]].reshape(len(xt), -1)
    errs = {}
    for spec in ("equalize", "all"):
        r = compile_model(DIGITS_CNN, x, ptq=spec, ptq_budget=None, graph_hook=hook)
        names = [m["name"] for m in r.report["ptq"]["methods"]]
        assert names[0] == "equalize" and len(names) == (2 if spec == "all" else 1)
        y = simulate(r.graph, xt).reshape(len(xt), -1)
        errs[spec] = float(((y - ref) ** 2).mean())
    assert "minifloat input casts simulated" in names[1]
    assert errs["all"] < errs["equalize"]
