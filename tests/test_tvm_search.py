"""The mixed-precision search on the TVM engine: one parametric module per graph structure
(every constant and quantization scalar an argument), bit for bit the simulator, and the same
sensitivities and allocation as the numpy engine."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import DIGITS_CNN, RESNET8, calibrated

from hilc.compiler import mixed
from hilc.compiler.arith import quantize_host
from hilc.compiler.quantize import quantize
from hilc.errors import HilcError
from hilc.sim.simulator import run_int_batched, to_physical
from hilc.targets.tvm import engine

# TVM modules built here go to a fresh cache folder (conftest.tvm_cache), not the user's
pytestmark = pytest.mark.usefixtures("tvm_cache")


@pytest.fixture(scope="module")
def digits_graph(digits):
    return mixed.prepare_subbyte(calibrated(DIGITS_CNN, digits["x_train"][:64]), digits["x_train"][:64])


def _run_both(q, x):
    qi = q.tensors[q.inputs[0]].quant
    qx = quantize_host(to_physical(q, q.inputs[0], x), qi.scale, qi.zero_point, qi.bits)
    m = engine.build_parametric(q)
    return m, m.run({q.inputs[0]: qx})[q.outputs[0]], run_int_batched(q, qx)


def test_one_parametric_module_serves_every_bit_width_variant(digits_graph, digits, tmp_path):
    g = digits_graph
    space = mixed.analyse(g)
    assert space.layers and space.roots
    variants = [g, mixed.assign_bitwidths(g, {space.layers[0].name: 4}),
                mixed.assign_bitwidths(g, {space.layers[-1].name: 2}),
                mixed.assign_bitwidths(g, None, {space.roots[0]: 4}),
                mixed.assign_bitwidths(g, {la.name: 2 for la in space.layers}, {r: 4 for r in space.roots})]
    keys, outs = set(), []
    for i, v in enumerate(variants):
        m, got, ref = _run_both(quantize(v), digits["x_test"][:200])
        assert np.array_equal(got, ref), f"variant {i}: {int((got != ref).sum())} outputs differ"
        assert i == 0 or m.from_cache  # built once, for the first
        keys.add(m.key)
        outs.append(got)
    assert len(keys) == 1
    assert all(not np.array_equal(outs[0], o) for o in outs[1:])  # the values did reach the module
    # what the arithmetic fixes at build time is in the key: the exact-paths mode changes the code
    assert engine.parametric_key(quantize(g), fast=False) not in keys


def test_parametric_module_is_cached_on_disk(digits_graph, digits, tmp_path):
    q = quantize(mixed.assign_bitwidths(digits_graph, {mixed.analyse(digits_graph).layers[1].name: 4}))
    engine._LOADED.pop(engine.parametric_key(q), None)
    first = engine.build_parametric(q, cache_dir=tmp_path)
    assert not first.from_cache
    assert len(list(tmp_path.glob("p*.so"))) == 1
    engine._LOADED.pop(first.key)
    again = engine.build_parametric(q, cache_dir=tmp_path)
    assert again.from_cache and again.key == first.key
    _, got, ref = _run_both(q, digits["x_test"][:50])
    assert np.array_equal(got, ref)


def test_digits_sensitivities_identical_on_both_engines(digits_graph, digits):
    calib = digits["x_train"][:32]
    g = calibrated(DIGITS_CNN, calib)
    a = mixed.measure_sensitivity(g, calib, engine="numpy")
    b = mixed.measure_sensitivity(g, calib, engine="tvm")
    assert a["key"] == b["key"]  # one cache serves both engines
    assert a["weights"] == b["weights"] and a["acts"] == b["acts"]  # exactly, every float
    assert any(v > 0 for w in a["weights"].values() for k, v in w.items() if k != "8")


def test_unknown_engine_and_missing_tvm_are_one_line_errors(digits, tmp_path, monkeypatch, capsys):
    from hilc.cli import main

    calib = digits["x_train"][:16]
    g = calibrated(DIGITS_CNN, calib)
    with pytest.raises(HilcError, match="unknown engine 'gpu'"):
        mixed.measure_sensitivity(g, calib, engine="gpu")
    np.save(tmp_path / "calib.npy", calib)
    for mod in [m for m in sys.modules if m == "tvm" or m.startswith("tvm.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "tvm", None)  # `import tvm` now raises ImportError
    code = main(["compile", str(DIGITS_CNN), "--calib", str(tmp_path / "calib.npy"), "-o", str(tmp_path / "o"),
                 "-q", "--precision", "mixed", "--bitops-ratio", "2", "--engine", "tvm"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "pip install 'hilc[tvm]'" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_resnet8_cli_mixed_search_identical_on_both_engines(crops32, tmp_path):
    """The whole search (sensitivities, ILP, the measured perturbation of the result) on resnet8."""
    from hilc.cli import main

    np.save(tmp_path / "calib.npy", crops32[:64])
    reports = {}
    for eng in ("numpy", "tvm"):
        out = tmp_path / eng
        assert main(["compile", str(RESNET8), "--calib", str(tmp_path / "calib.npy"), "-o", str(out), "-q",
                     "--precision", "mixed", "--bitops-ratio", "2.5", "--engine", eng,
                     "--finetune-steps", "0"]) == 0  # fine-tuning is float work, the same on both engines
        reports[eng] = json.loads((out / "report.json").read_text())
        sens = json.loads((out / "sensitivity.json").read_text())
        reports[eng]["sens"] = (sens["weights"], sens["acts"])
        assert not reports[eng]["mixed_precision"]["sensitivity_cached"]
    a, b = reports["numpy"], reports["tvm"]
    assert a["sens"] == b["sens"]
    for k in ("weight_bits", "act_bits", "predicted_perturbation", "measured_perturbation", "bitops"):
        assert a["mixed_precision"][k] == b["mixed_precision"][k], k
    assert any(v < 8 for v in a["mixed_precision"]["weight_bits"].values())


# ops whose TVM lowering takes quantization scalars (zero points, clamp bounds, add's multipliers)
SCALAR_OPS = ["clip", "sub_and_mul", "add_two_branches", "concat_channels", "avgpool_pad_include",
              "matmul_activations", "reduce_mean_tokens", "conv_stride2_asym_pad"]


def _op_cases(names=None):
    from opmodels import cases
    from test_tvm import extra_cases

    return [c for c in cases() + extra_cases() if names is None or c.name in names]


def _two_calibrations_share_one_module(case, tmp_path):
    """The same model calibrated on two input ranges (other scales, zero points, multipliers):
    one parametric module, bit for bit the simulator on both."""
    import onnx
    from test_tvm import op_inputs

    from hilc.compiler.pipeline import compile_model

    onnx.save(case.model, str(tmp_path / "m.onnx"))
    graphs = [compile_model(tmp_path / "m.onnx", case.inputs(64, 0)).graph,
              compile_model(tmp_path / "m.onnx", 0.55 * case.inputs(64, 3) + 0.1).graph]
    x = op_inputs(case)
    models = []
    for q in graphs:
        m, got, ref = _run_both(q, x)
        assert np.array_equal(got, ref), f"{int((got != ref).sum())} of {ref.size} outputs differ"
        models.append(m)
    assert models[0].key == models[1].key and models[1].from_cache
    return models


@pytest.mark.parametrize("case", _op_cases(SCALAR_OPS + ["pad_constant"]), ids=lambda c: c.name)
def test_single_operator_models_share_one_module_across_calibrations(case, tmp_path):
    models = _two_calibrations_share_one_module(case, tmp_path)
    assert models[0].scalars != models[1].scalars  # the scalars differ, passed at run time


@pytest.mark.slow
@pytest.mark.parametrize("case", _op_cases(), ids=lambda c: c.name)
def test_every_single_operator_model_on_a_parametric_module(case, tmp_path):
    _two_calibrations_share_one_module(case, tmp_path)
