"""Post-training quantization passes: equalization keeps the float function, bias correction
removes the mean shift, AdaRound beats nearest rounding and its choices reach the integer
graph, data-free calibration works from BatchNorm statistics, and the C build stays bit-exact."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from conftest import DIGITS_CNN, RESNET8
from conftest import hilc_cli as hilc

from hilc.compiler import passes, ptq
from hilc.compiler.arith import quantize_host
from hilc.compiler.onnx_import import import_onnx
from hilc.compiler.pipeline import compile_model, write_artifacts
from hilc.errors import HilcError
from hilc.sim.simulator import run_float, run_int_batched, simulate, to_physical
from hilc.targets.c import build


def float_graph(path):
    g = import_onnx(path)
    for p in passes.FLOAT_PIPELINE:
        g = p(g)
    return g


def test_parse_methods():
    g4 = ptq.set_weight_bits(float_graph(DIGITS_CNN), 4)
    g8 = float_graph(DIGITS_CNN)
    assert ptq.parse_methods(None, g8) == [] and ptq.parse_methods("auto", g8) == []
    assert ptq.parse_methods(None, g4) == list(ptq.METHODS)
    assert ptq.parse_methods("adaround,equalize", g8) == ["equalize", "adaround"]
    assert ptq.parse_methods("all", g8) == list(ptq.METHODS) and ptq.parse_methods("none", g4) == []
    with pytest.raises(HilcError, match="unknown method 'round'"):
        ptq.parse_methods("equalize,round", g8)
    with pytest.raises(HilcError, match="weight bits must be 2..8"):
        ptq.set_weight_bits(g8, 1)


def test_bn_statistics_are_kept_from_the_onnx_model():
    m = onnx.load(str(DIGITS_CNN))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    bn = next(n for n in m.graph.node if n.op_type == "BatchNormalization")
    gamma, beta, _, var = (inits[i].astype(np.float64) for i in bn.input[1:5])
    stats = float_graph(DIGITS_CNN).meta["bn_stats"]
    assert sorted(stats) == ["conv2d_0", "conv2d_1", "conv2d_2"]
    np.testing.assert_allclose(stats["conv2d_0"]["mean"], beta, rtol=1e-6)
    np.testing.assert_allclose(stats["conv2d_0"]["std"], np.abs(gamma) * np.sqrt(var / (var + 1e-5)), rtol=1e-5)


def test_equalize_keeps_the_float_function_and_matches_ranges(digits):
    g = float_graph(DIGITS_CNN)
    e = ptq.equalize(g)
    pairs = ptq.equalize_pairs(e)
    assert [(a.name, b.name) for a, b in pairs] == [("conv2d_0", "conv2d_1"), ("conv2d_1", "conv2d_2")]
    x = to_physical(g, g.inputs[0], digits["x_test"][:64])
    y0, y1 = (run_float(h, {h.inputs[0]: x})[h.outputs[0]] for h in (g, e))
    np.testing.assert_allclose(y1, y0, rtol=1e-4, atol=1e-4 * np.abs(y0).max())
    for a, b in pairs:  # after equalization each channel's range is the same on both sides
        wa = np.abs(e.param(a, "weight")).reshape(e.param(a, "weight").shape[0], -1).max(axis=1)
        np.testing.assert_allclose(wa, ptq._in_channel_ranges(e, b), rtol=1e-3)


def test_bias_correction_removes_the_mean_shift_and_adaround_beats_nearest(digits):
    g = ptq.set_weight_bits(float_graph(DIGITS_CNN), 3)
    x = to_physical(g, g.inputs[0], digits["x_train"][:128])
    bc = ptq.correct_layers(g, g, x, bias_correct=True)
    first = bc.nodes[0]
    # the first layer sees the same inputs in both graphs: its mean shift must be gone exactly
    xin = x.astype(np.float32)
    shift = (ptq._linear(bc, first, xin) - ptq._linear(g, g.nodes[0], xin)).mean(axis=0)
    assert np.abs(shift).max() < 1e-4 * np.abs(ptq._linear(g, g.nodes[0], xin)).max()
    near = ptq.layer_errors(g, g, x)
    err_bc = ptq.layer_errors(g, bc, x)
    # a fixed number of steps (a budget this long never cuts in): the same answer on any machine
    ada = ptq.correct_layers(g, g, x, bias_correct=True, adaround=True, budget_s=600.0, iterations=300)
    err_ada = ptq.layer_errors(g, ada, x)
    for name in near:
        assert err_bc[name] < near[name]
        assert err_ada[name] < err_bc[name]
    # the chosen integers are on the pinned grid, within one step of the weights over their scale
    n = ada.nodes[0]
    s = np.asarray(n.attrs["w_scale"])
    q = ada.param(n, "weight") / s[:, None, None, None]
    assert np.abs(q - np.rint(q)).max() < 1e-4 and np.abs(np.rint(q)).max() <= 3


def test_compiled_integers_follow_the_passes_and_c_is_bit_exact(tmp_path, digits):
    result = compile_model(DIGITS_CNN, digits["x_train"][:128], target="c", ptq="all", ptq_budget=2.0,
                           graph_hook=lambda g: ptq.set_weight_bits(g, 4))
    rep = result.report["ptq"]
    assert [m["name"] for m in rep["methods"]] == ["equalize", "bias-correct+adaround"]
    assert all(m["seconds"] >= 0 for m in rep["methods"])
    assert len(rep["layers"]) == 4 and all(la["error_after"] < la["error_before"] for la in rep["layers"])
    g = result.graph
    for n in ptq.linear_nodes(g):
        assert n.attrs["weight_bits"] == 4 and np.abs(g.param(n, "weight")).max() <= 7
    write_artifacts(tmp_path / "out", result)
    x = digits["x_test"][:48]
    q = g.tensors[g.inputs[0]].quant
    qx = quantize_host(to_physical(g, g.inputs[0], x), q.scale, q.zero_point)
    sim = run_int_batched(g, qx).reshape(len(x), -1)
    for dsp in (False, True):
        host = build.run_host(build.build_host(tmp_path / "out", sanitize=False, dsp=dsp), qx.reshape(len(x), -1),
                              sim.shape[1])
        assert np.array_equal(host, sim)


def test_data_free_calibration_from_batchnorm_statistics(digits):
    acc = {}
    for calib in (digits["x_train"][:256], None):
        r = compile_model(DIGITS_CNN, calib)
        acc[calib is None] = float((simulate(r.graph, digits["x_test"]).argmax(1) == digits["y_test"]).mean())
    assert acc[True] >= acc[False] - 0.02, acc
    info = r.report["calibration"]["data_free"]
    assert info["bn_layers"] == ["conv2d_0", "conv2d_1", "conv2d_2"] and info["loss_last"] < info["loss_first"] / 20
    # the same model compiled again is the same model: no timing in the graph, so its hash (which
    # the firmware reports and the host checks) repeats
    assert compile_model(DIGITS_CNN, None).graph.content_hash() == r.graph.content_hash()


def test_data_free_fallback_without_batchnorm_and_the_cli_says_so(tmp_path):
    g = float_graph(RESNET8)
    x, info = ptq.synthesize_inputs(g, n=8, input_range=(0.0, 255.0))
    assert x.shape == (8, 3, 32, 32) and 0 <= x.min() and x.max() <= 255 and x.std() > 10
    assert "no BatchNorm" in info["source"]
    r = hilc("compile", RESNET8, "-o", tmp_path / "o", "--input-range", "0,255")
    assert r.returncode == 0, r.stderr
    assert "no --calib: calibrated data-free on 64 smooth random images" in r.stderr
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["calibration"]["data_free"]["input_range"] == [0.0, 255.0]
    assert [m["name"] for m in report["ptq"]["methods"]] == ["data-free"]


def test_cli_errors(tmp_path, crops32):
    np.save(tmp_path / "c.npy", crops32[:8])
    for args, frag in ((["--ptq", "equalise"], "unknown method 'equalise'"),
                       (["--input-range", "5"], "--input-range: expected LO,HI"),
                       (["--input-range", "3,1"], "LO must be below HI")):
        r = hilc("compile", RESNET8, "--calib", tmp_path / "c.npy", "-o", tmp_path / "o", *args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and frag in r.stderr, r.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-system-arm") is None or shutil.which("arm-none-eabi-gcc") is None,
                    reason="needs qemu-system-arm and arm-none-eabi-gcc (installed by .ci/run)")
def test_board_bit_exact_after_the_passes_and_data_free_calibration(tmp_path, digits):
    result = compile_model(DIGITS_CNN, None, board="qemu-mps2-an386", ptq="all", ptq_budget=2.0,
                           graph_hook=lambda g: ptq.set_weight_bits(g, 4))
    write_artifacts(tmp_path / "o", result)
    np.save(tmp_path / "x.npy", digits["x_test"][:16])
    r = hilc("run", tmp_path / "o", tmp_path / "x.npy", "--board", "qemu-mps2-an386", "-o", tmp_path / "y.npy",
             "--check")
    assert r.returncode == 0 and "16/16 outputs bit-exact" in r.stdout, r.stdout + r.stderr


def _mlp_with_batchnorm() -> onnx.ModelProto:
    """Gemm -> BN -> Relu -> Gemm -> BN -> Relu -> Gemm: 1-D BatchNorms folded into dense layers,
    their statistics those of real data (uniform 0..4), as training would have left them."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    data = rng.uniform(0, 4, (512, 12))
    inits, nodes, x = [], [], "x"
    for i, (k, o) in enumerate([(12, 16), (16, 8), (8, 4)]):
        w, b = rng.normal(0, 0.5, (k, o)), rng.normal(0, 0.1, o)
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(b.astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"g{i}"]))
        x = f"g{i}"
        z = data @ w + b
        if i < 2:
            gamma, beta = rng.uniform(0.5, 2, o), rng.normal(0, 1, o)
            for nm, v in (("s", gamma), ("t", beta), ("m", z.mean(0)), ("v", z.var(0))):
                inits.append(numpy_helper.from_array(v.astype(np.float32), f"{nm}{i}"))
            nodes += [helper.make_node("BatchNormalization", [x, f"s{i}", f"t{i}", f"m{i}", f"v{i}"], [f"n{i}"]),
                      helper.make_node("Relu", [f"n{i}"], [f"r{i}"])]
            x = f"r{i}"
            data = np.maximum(gamma * (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5) + beta, 0)
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_dense_layers_equalize_and_synthesise_from_1d_batchnorm(tmp_path):
    onnx.save(_mlp_with_batchnorm(), str(tmp_path / "mlp.onnx"))
    g = float_graph(tmp_path / "mlp.onnx")
    assert sorted(g.meta["bn_stats"]) == ["dense_0", "dense_1"]
    e = ptq.equalize(g)
    assert [(a.name, b.name) for a, b in ptq.equalize_pairs(e)] == [("dense_0", "dense_1"), ("dense_1", "dense_2")]
    x = np.random.default_rng(0).normal(0, 1, (32, 12)).astype(np.float32)
    np.testing.assert_allclose(run_float(e, {"x": x})[e.outputs[0]], run_float(g, {"x": x})[g.outputs[0]],
                               rtol=1e-4, atol=1e-4)
    xs, info = ptq.synthesize_inputs(g, n=256, iterations=300)
    assert info["bn_layers"] == ["dense_0", "dense_1"] and info["loss_last"] < info["loss_first"] / 20
    z = xs @ g.param(g.nodes[0], "weight").T + g.param(g.nodes[0], "bias")  # dense_0's pre-activation
    np.testing.assert_allclose(z.mean(axis=0), g.meta["bn_stats"]["dense_0"]["mean"], atol=0.1)
    np.testing.assert_allclose(z.std(axis=0), g.meta["bn_stats"]["dense_0"]["std"], rtol=0.1)


def test_cli_ptq_option_reports_methods_and_layer_errors(tmp_path, digits):
    np.save(tmp_path / "c.npy", digits["x_train"][:128])
    r = hilc("compile", DIGITS_CNN, "--calib", tmp_path / "c.npy", "-o", tmp_path / "o",
             "--ptq", "equalize,bias-correct")
    assert r.returncode == 0, r.stderr
    assert "ptq: equalize (" in r.stdout and "bias-correct (" in r.stdout
    rep = json.loads((tmp_path / "o" / "report.json").read_text())["ptq"]
    assert [m["name"] for m in rep["methods"]] == ["equalize", "bias-correct"]
    assert [la["name"] for la in rep["layers"]] == ["conv2d_0", "conv2d_1", "conv2d_2", "dense_0"]
    assert all(la["weight_bits"] == 8 and la["error_after"] < la["error_before"] for la in rep["layers"])


def test_a_grid_pinned_for_other_bits_is_not_used(digits):
    """A later bit-width change (mixed precision) must not quantize on a grid chosen for 4 bits."""
    from hilc.compiler import calibrate
    from hilc.compiler.quantize import quantize

    g = ptq.set_weight_bits(float_graph(DIGITS_CNN), 4)
    x = digits["x_train"][:64]
    pinned, _ = ptq.run_ptq(g, x, ["bias-correct"])
    assert pinned.nodes[0].attrs["w_scale_bits"] == 4
    q4 = quantize(calibrate.calibrate(pinned, x))
    q8 = quantize(calibrate.calibrate(ptq.set_weight_bits(pinned, 8), x))
    assert np.abs(q4.param(q4.nodes[0], "weight")).max() <= 7
    assert np.abs(q8.param(q8.nodes[0], "weight")).max() == 127  # max-abs 8-bit grid, not the 4-bit one


def test_adaround_budget_is_a_step_count_not_a_clock(digits):
    """--ptq-budget converts to steps at a nominal speed: the same inputs give the same integers
    however loaded the machine."""
    g = ptq.set_weight_bits(float_graph(DIGITS_CNN), 4)
    x = digits["x_train"][:64]
    a, ra = ptq.run_ptq(g, x, ["adaround"], budget_s=0.5)
    b, _ = ptq.run_ptq(g, x, ["adaround"], budget_s=0.5)
    for na, nb in zip(ptq.linear_nodes(a), ptq.linear_nodes(b), strict=True):
        assert np.array_equal(a.param(na, "weight"), b.param(nb, "weight"))
        assert na.attrs["w_scale"] == nb.attrs["w_scale"]
