"""Integer-only tiny transformers: the digits transformer end to end (accuracy, simulator == host C
== QEMU Cortex-M4, no float or division helpers linked), the LayerNorm arithmetic on its own, the
recognition of decomposed GELU / LayerNorm, and the clean errors of what is not supported."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import onnx
import pytest
from conftest import DATA, hilc_cli, host_vs_sim, plain_int64_arithmetic
from onnx import TensorProto, helper, numpy_helper

from hilc.compiler import arith
from hilc.compiler.onnx_import import import_model
from hilc.compiler.ops.layernorm import inv_sqrt_q, isqrt62
from hilc.compiler.pipeline import compile_model, write_artifacts
from hilc.errors import HilcError, UnsupportedModelError
from hilc.sim.simulator import interpret, simulate
from hilc.targets.c import build

TRANSFORMER = DATA / "digits_transformer.onnx"
needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-arm") is None or shutil.which("arm-none-eabi-gcc") is None,
                                reason="needs qemu-system-arm and arm-none-eabi-gcc (installed by .ci/run)")


@pytest.fixture(scope="module")
def compiled(digits):
    return compile_model(TRANSFORMER, digits["x_train"][:256])


def test_transformer_imports_attention_layernorm_gelu_as_integer_ops(compiled):
    ops = [n.op for n in compiled.graph.nodes]
    assert ops.count("matmul") == 4 and ops.count("softmax") == 2 and ops.count("layernorm") == 5
    assert sum(1 for n in compiled.graph.nodes if n.op == "lut" and n.attrs["fn"] == "gelu") == 2
    assert ops.count("reduce_mean") == 1
    assert compiled.graph.is_quantized


def test_transformer_integer_accuracy_within_one_point_of_float(compiled, digits):
    x, y = digits["x_test"], digits["y_test"]
    float_acc = float((interpret(import_model(onnx.load(str(TRANSFORMER))), x).argmax(1) == y).mean())
    int_acc = float((simulate(compiled.graph, x).argmax(1) == y).mean())
    assert float_acc >= 0.95  # the fixture is trained: accuracy means something
    assert abs(int_acc - float_acc) <= 0.01, f"float {float_acc:.4f} vs integer {int_acc:.4f}"


def test_transformer_fast_paths_equal_plain_int64(compiled, digits):
    x = digits["x_test"][:32]
    raw = simulate(compiled.graph, x, raw=True)
    with plain_int64_arithmetic():
        assert np.array_equal(simulate(compiled.graph, x, raw=True), raw)


def test_transformer_host_c_bit_exact_under_sanitizers(tmp_path, digits):
    _, (portable, dsp), sim = host_vs_sim(TRANSFORMER, digits["x_train"][:256], digits["x_test"][:48], tmp_path / "o")
    assert np.array_equal(portable, sim)
    assert np.array_equal(dsp, sim)


def test_transformer_exports_to_a_qdq_onnx_model_bit_exact(compiled, digits):
    from conftest import ort_run

    from hilc.targets.onnx_qdq import export_qdq

    x = digits["x_test"][:32]
    q = compiled.graph.tensors[compiled.graph.outputs[0]].quant
    y = np.rint(ort_run(export_qdq(compiled.graph), x) / q.scale) + q.zero_point
    assert np.array_equal(y, simulate(compiled.graph, x, raw=True).astype(np.float64))


@pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None, reason="arm-none-eabi-gcc not installed")
def test_transformer_cortex_m4_firmware_links_no_float_or_division_helpers(tmp_path, digits):
    result = compile_model(TRANSFORMER, digits["x_train"][:64], board="qemu-mps2-an386")
    write_artifacts(tmp_path / "o", result)
    elf = tmp_path / "o" / "build" / "qemu-mps2-an386" / "firmware.elf"
    assert build.forbidden_symbols(elf) == []
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert 0 < report["peak_sram_bytes"] < 16 * 1024


@pytest.mark.slow
@needs_qemu
def test_transformer_run_check_bit_exact_on_qemu_m4(tmp_path, digits):
    out = tmp_path / "o"
    write_artifacts(out, compile_model(TRANSFORMER, digits["x_train"][:256], board="qemu-mps2-an386"))
    np.save(tmp_path / "x.npy", digits["x_test"][:16])
    r = hilc_cli("run", out, tmp_path / "x.npy", "--board", "qemu-mps2-an386", "-o", tmp_path / "y.npy", "--check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "16/16 outputs bit-exact" in r.stdout


# --- the LayerNorm arithmetic -------------------------------------------------------------------

def test_isqrt62_is_the_exact_floor_square_root():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.integers(0, 2**62, 2000, dtype=np.int64), np.arange(0, 300, dtype=np.int64),
                        np.array([2**60, 2**60 - 1, 2**62 - 1, 2**62 - 2**31], dtype=np.int64)])
    assert np.array_equal(isqrt62(v), np.array([math.isqrt(int(a)) for a in v], dtype=np.int64))


def test_inverse_square_root_is_accurate_over_the_whole_range():
    v = np.unique(np.geomspace(1, 2**61, 4000).astype(np.int64))
    y, k = inv_sqrt_q(v)
    approx = y.astype(np.float64) * np.exp2(k.astype(np.float64) - 61)
    rel = np.abs(approx * np.sqrt(v.astype(np.float64)) - 1)
    assert rel.max() < 2**-28


def _layernorm_model(n: int, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, n])
    g = helper.make_graph([helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], epsilon=eps)], "ln", [x], [y],
                          [numpy_helper.from_array(gamma.astype(np.float32), "g"),
                           numpy_helper.from_array(beta.astype(np.float32), "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_layernorm_integer_error_is_within_one_lsb_incl_constant_rows_and_negative_gamma(tmp_path):
    rng = np.random.default_rng(1)
    n = 64
    gamma = rng.uniform(-1.5, 1.5, n)
    beta = rng.standard_normal(n) * 0.2
    onnx.save(_layernorm_model(n, gamma, beta), str(tmp_path / "ln.onnx"))
    calib = rng.standard_normal((64, 4, n)).astype(np.float32) * 2
    result = compile_model(tmp_path / "ln.onnx", calib)
    x = rng.standard_normal((64, 4, n)).astype(np.float32) * 2
    x[0, 0, :] = 0.7  # a constant row: variance 0, the output is beta
    x[1, 1, :] = x[1, 1, 0]
    qi = result.graph.tensors[result.graph.inputs[0]].quant
    xq = (arith.quantize_host(x, qi.scale, qi.zero_point).astype(np.float64) - qi.zero_point) * qi.scale
    ref = interpret(import_model(_layernorm_model(n, gamma, beta)), xq.astype(np.float32))
    got = simulate(result.graph, x)
    qo = result.graph.tensors[result.graph.outputs[0]].quant
    err = np.abs(got - np.clip(ref, (-128 - qo.zero_point) * qo.scale, (127 - qo.zero_point) * qo.scale)) / qo.scale
    assert err.max() <= 1.0 + 1e-6 and err.mean() < 0.3
    assert np.allclose(got[0, 0], np.rint(beta / qo.scale) * qo.scale, atol=1e-6)


# --- recognition of decomposed blocks, and errors ------------------------------------------------

def _single(nodes, inits, shape, opset=13):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    m = helper.make_model(helper.make_graph(nodes, "m", [x], [y], inits),
                          opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def test_decomposed_layernorm_and_gelu_become_single_ops():
    from opmodels import cases

    by_name = {c.name: c for c in cases()}
    g = import_model(by_name["layernorm_decomposed"].model)
    assert [n.op for n in g.nodes] == ["layernorm"]
    for name, approx in (("gelu_erf", "none"), ("gelu_tanh", "tanh")):
        g = import_model(by_name[name].model)
        assert [(n.op, n.attrs.get("fn"), n.attrs.get("approximate")) for n in g.nodes] == [("lut", "gelu", approx)]


def test_an_erf_chain_that_is_not_gelu_is_kept_op_by_op():
    c = lambda name, v: numpy_helper.from_array(np.array(v, np.float32), name)  # noqa: E731
    m = _single([helper.make_node("Div", ["x", "s"], ["a"]), helper.make_node("Erf", ["a"], ["e"]),
                 helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["x", "e1"], ["m"]),
                 helper.make_node("Mul", ["m", "h"], ["y"])], [c("s", 1.0), c("one", 1.0), c("h", 0.5)], [6])
    fns = [n.attrs.get("fn") for n in import_model(m).nodes if n.op == "lut"]
    assert fns == ["erf"]


@pytest.mark.parametrize("nodes,inits,shape,match", [
    ([helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]), helper.make_node("Unsqueeze", ["t", "ax"], ["u"]),
      helper.make_node("Unsqueeze", ["x", "ax"], ["v"]), helper.make_node("MatMul", ["v", "u"], ["y"])],
     [numpy_helper.from_array(np.array([1], np.int64), "ax")], [3, 4], None),
    ([helper.make_node("LayerNormalization", ["x", "g"], ["y"], axis=1)],
     [numpy_helper.from_array(np.ones((3, 4), np.float32), "g")], [3, 4], "only the last axis"),
    ([helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT64), helper.make_node("Cast", ["i"], ["y"], to=1)],
     [], [4], "only for Gather indices"),
    ([helper.make_node("Pow", ["x", "e"], ["y"])], [numpy_helper.from_array(np.array(0.5, np.float32), "e")], [4],
     "constant integer exponent"),
    ([helper.make_node("Gather", ["x", "i"], ["y"], axis=1)],
     [numpy_helper.from_array(np.array([5], np.int64), "i")], [4], "out of range"),
])
def test_unsupported_transformer_forms_fail_with_one_line(nodes, inits, shape, match):
    m = _single(nodes, inits, shape, opset=17)
    if match is None:  # a valid model hilc computes (equal batch axes after Unsqueeze): must import
        import_model(m)
        return
    with pytest.raises(HilcError, match=match) as e:
        import_model(m)
    assert "\n" not in str(e.value)


def test_matmul_of_activations_with_broadcast_batch_axes_is_refused():
    m = _single([helper.make_node("Transpose", ["x"], ["t"], perm=[0, 1, 3, 2]),
                 helper.make_node("ReduceMean", ["t"], ["r"], axes=[1], keepdims=1),
                 helper.make_node("MatMul", ["x", "r"], ["y"])], [], [2, 3, 3])
    with pytest.raises(UnsupportedModelError, match="broadcast batch axes"):
        import_model(m)
