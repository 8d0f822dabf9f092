"""Every operator on awkward shapes: float interpretation vs onnxruntime, integer simulation vs
float within the quantization error, and QDQ import vs onnxruntime's own integer execution."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import ort_quantize_qdq, ort_run, plain_int64_arithmetic
from opmodels import cases

from hilc.compiler.arith import dequantize_host
from hilc.compiler.onnx_import import import_model
from hilc.compiler.pipeline import compile_model
from hilc.errors import HilcError
from hilc.sim.simulator import interpret, simulate

CASES = cases()
# Where onnxruntime computes differently from one exact integer pass: a Clip kept between two
# QuantizeLinear (double rounding), Sub / Mul / Softmax evaluated in float between Q/DQ.
NOT_BIT_EXACT_WITH_ORT = {"conv_bn_relu6": 3, "sub_and_mul": 2, "softmax_last": 1, "softmax_channels_4d": 1}
# Transformer ops: LayerNorm and the attention chain computed once in integers vs float between Q/DQ.
NOT_BIT_EXACT_WITH_ORT.update(layernorm=1, attention_head=1, attention_context=1, gelu_tanh=1, gelu_erf=1)
# A LayerNorm that onnxruntime quantizes piece by piece divides two int8 tensors: refused clearly.
QDQ_REFUSED = {"layernorm_decomposed": "Div is supported only by a non-zero constant"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("ops")
    paths = {}
    for c in CASES:
        p = d / f"{c.name}.onnx"
        onnx.save(c.model, str(p))
        paths[c.name] = p
    return paths


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_float_interpretation_matches_onnxruntime(case):
    x = case.inputs(16, 1)
    ref = ort_run(case.model, x)
    got = interpret(import_model(case.model, case.name), x)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_integer_simulation_within_quantization_error(case, saved):
    result = compile_model(saved[case.name], case.inputs(128, 0))
    assert result.graph.is_quantized
    x = case.inputs(64, 1)
    ref = ort_run(case.model, x)
    y = simulate(result.graph, x)
    q = result.graph.tensors[result.graph.outputs[0]].quant
    # outside the calibrated range the integer model saturates, as it must
    ref = np.clip(ref, (q.qmin - q.zero_point) * q.scale, (q.qmax - q.zero_point) * q.scale)
    err = np.abs(y - ref) / q.scale
    assert err.mean() <= 0.7, f"mean error {err.mean():.2f} LSB"
    assert err.max() <= 4.0, f"max error {err.max():.2f} LSB"
    raw = simulate(result.graph, x, raw=True)
    assert raw.dtype == np.int8 and np.array_equal(dequantize_host(raw, q.scale, q.zero_point), y)
    with plain_int64_arithmetic():  # the BLAS / float64 shortcuts must equal plain int64 arithmetic
        assert np.array_equal(simulate(result.graph, x, raw=True), raw)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_qdq_import_agrees_with_onnxruntime_integer_execution(case, saved, tmp_path):
    calib = case.inputs(64, 0)
    qdq = ort_quantize_qdq(saved[case.name], tmp_path / "qdq.onnx", calib)
    if not any(n.op_type == "QuantizeLinear" for n in onnx.load(str(qdq)).graph.node):
        # quantize_static leaves this op in float: wrap it in Q/DQ pairs ourselves, so that
        # onnxruntime computes DQ -> float op -> Q, which the integer kernel must reproduce.
        qdq = tmp_path / "wrapped.onnx"
        onnx.save(wrap_in_qdq(case.model, calib), str(qdq))
    x = case.inputs(32, 1)
    ref = ort_run(qdq, x)
    if case.name in QDQ_REFUSED:
        with pytest.raises(HilcError, match=QDQ_REFUSED[case.name]):
            compile_model(qdq)
        return
    result = compile_model(qdq)
    y = simulate(result.graph, x)
    q = result.graph.tensors[result.graph.outputs[0]].quant
    lsb = np.abs(y - ref) / q.scale
    assert lsb.max() <= NOT_BIT_EXACT_WITH_ORT.get(case.name, 0) + 1e-3, f"max {lsb.max():.2f} LSB"


def wrap_in_qdq(model: onnx.ModelProto, calib: np.ndarray) -> onnx.ModelProto:
    from onnx import helper, numpy_helper

    from hilc.compiler.arith import choose_qparams

    y = ort_run(model, calib)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    nodes = list(g.node)
    inits = []
    for tensor, values in (("x", calib), ("y", y)):
        s, zp = choose_qparams(values.min(), values.max())
        inits += [numpy_helper.from_array(np.array(s, np.float32), f"{tensor}_s"),
                  numpy_helper.from_array(np.array(zp, np.int8), f"{tensor}_zp")]
    for n in nodes:
        n.input[:] = ["x_dq" if i == "x" else i for i in n.input]
        n.output[:] = ["y_f" if o == "y" else o for o in n.output]
    q_in = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_zp"], ["x_q"]),
            helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_zp"], ["x_dq"])]
    q_out = [helper.make_node("QuantizeLinear", ["y_f", "y_s", "y_zp"], ["y_q"]),
             helper.make_node("DequantizeLinear", ["y_q", "y_s", "y_zp"], ["y"])]
    del g.node[:]
    g.node.extend(q_in + nodes + q_out)
    g.initializer.extend(inits)
    return m


def test_every_importer_is_covered_by_a_case():
    from hilc.compiler.ops import ONNX_IMPORTERS

    covered = {n.op_type for c in CASES for n in c.model.graph.node}
    quantized_forms = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                       "MatMulInteger", "Constant", "Shape", "Cast", "Div", "GlobalMaxPool"}
    missing = set(ONNX_IMPORTERS) - covered - quantized_forms
    assert not missing, f"operators without a single-op test model: {sorted(missing)}"
