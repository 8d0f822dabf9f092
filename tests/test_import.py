"""ONNX import: opsets, quantized forms, and the errors a person gets for models hilc cannot take."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import RESNET8, ort_run
from onnx import TensorProto, helper, numpy_helper

from hilc.compiler.onnx_import import import_model, import_onnx
from hilc.compiler.pipeline import compile_model
from hilc.errors import HilcError, UnsupportedModelError
from hilc.sim.simulator import interpret, simulate


@pytest.mark.parametrize("opset", [13, 17, 21])
def test_resnet8_converted_to_newer_opsets_imports_identically(opset, crops32):
    model = onnx.version_converter.convert_version(onnx.load(str(RESNET8)), opset)
    x = crops32[:4]
    assert np.abs(interpret(import_model(model), x) - ort_run(model, x)).max() < 1e-5


def _single(nodes, inits, x_shape, opset=13, y_type=TensorProto.FLOAT):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", y_type, None)], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def test_every_unsupported_node_is_listed_in_one_message():
    m = _single([helper.make_node("Sin", ["x"], ["e"], name="sin_1"),
                 helper.make_node("Relu", ["e"], ["r"], name="relu_1"),
                 helper.make_node("TopK", ["r", "k"], ["y", "i"], name="topk_1")],
                [numpy_helper.from_array(np.array([2], np.int64), "k")], [1, 4])
    with pytest.raises(UnsupportedModelError) as e:
        import_model(m)
    msg = str(e.value)
    assert "2 unsupported node(s)" in msg and "'sin_1' (Sin)" in msg and "'topk_1' (TopK)" in msg
    assert "relu_1" not in msg and "\n" not in msg


def test_opset_outside_range_is_refused():
    m = _single([helper.make_node("Relu", ["x"], ["y"])], [], [1, 4], opset=22)
    with pytest.raises(UnsupportedModelError, match="opset 22"):
        import_model(m)


def test_softmax_before_opset13_flattens_trailing_axes():
    m = _single([helper.make_node("Softmax", ["x"], ["y"], axis=1)], [], [1, 3, 4], opset=11)
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    assert np.allclose(interpret(import_model(m), x), ort_run(m, x, batched=False), atol=1e-6)


@pytest.mark.parametrize("content,msg", [(b"", "empty file"), (b"hello, not a model", "not a valid ONNX model")])
def test_garbage_files_are_refused(tmp_path, content, msg):
    p = tmp_path / "m.onnx"
    p.write_bytes(content)
    with pytest.raises(HilcError, match=msg):
        import_onnx(p)


def test_truncated_model_is_refused(tmp_path):
    data = RESNET8.read_bytes()
    p = tmp_path / "cut.onnx"
    p.write_bytes(data[: len(data) // 3])
    with pytest.raises(HilcError, match="cut.onnx"):
        import_onnx(p)


def test_missing_file():
    with pytest.raises(HilcError, match="no such file"):
        import_onnx("does/not/exist.onnx")


def _qparams(name, scale, zp, dtype=np.int8):
    return [numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"),
            numpy_helper.from_array(np.array(zp, dtype), f"{name}_zp")]


def test_qlinearconv_model_matches_onnxruntime():
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    ws = (rng.uniform(0.001, 0.01, 4)).astype(np.float32)
    bias = rng.integers(-500, 500, 4).astype(np.int32)
    inits = [*_qparams("x", 0.05, 3), *_qparams("y", 0.1, -5), numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(ws, "w_s"), numpy_helper.from_array(np.zeros(4, np.int8), "w_zp"),
             numpy_helper.from_array(bias, "b")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_zp"], ["xq"]),
             helper.make_node("QLinearConv", ["xq", "x_s", "x_zp", "w", "w_s", "w_zp", "y_s", "y_zp", "b"], ["yq"],
                              kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="qconv"),
             helper.make_node("DequantizeLinear", ["yq", "y_s", "y_zp"], ["y"])]
    m = _single(nodes, inits, [1, 3, 6, 6])
    x = rng.uniform(-3, 3, (8, 3, 6, 6)).astype(np.float32)
    ref = ort_run(m, x, batched=False)
    g = compile_model_from_proto(m)
    assert np.abs(simulate(g, x) - ref).max() <= 0.1 + 1e-6  # within one output LSB


def test_qlinearmatmul_and_uint8_activations():
    rng = np.random.default_rng(1)
    w = rng.integers(-127, 128, (6, 5)).astype(np.int8)
    inits = [*_qparams("x", 0.02, 128, np.uint8), *_qparams("y", 0.05, 120, np.uint8), numpy_helper.from_array(w, "w"),
             *_qparams("w", 0.01, 0)]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_zp"], ["xq"]),
             helper.make_node("QLinearMatMul", ["xq", "x_s", "x_zp", "w", "w_s", "w_zp", "y_s", "y_zp"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "y_s", "y_zp"], ["y"])]
    m = _single(nodes, inits, [1, 6])
    x = rng.uniform(-2, 2, (16, 6)).astype(np.float32)
    # The ONNX definition computed exactly: onnxruntime's u8 x s8 kernels saturate int16 pair
    # sums on AVX2 CPUs without VNNI, so its answer depends on the machine.
    xq = np.clip(np.rint(x / np.float32(0.02)) + 128, 0, 255).astype(np.int64)
    acc = (xq - 128) @ w.astype(np.int64)
    yq = np.clip(np.rint(acc * (np.float32(0.02) * np.float32(0.01) / np.float32(0.05))) + 120, 0, 255)
    ref = ((yq - 120) * np.float32(0.05)).astype(np.float32)
    assert np.abs(simulate(compile_model_from_proto(m), x) - ref).max() <= 0.05 + 1e-6


def test_matmulinteger_with_float_rescale():
    rng = np.random.default_rng(2)
    w = rng.integers(-127, 128, (6, 4)).astype(np.int8)
    inits = [*_qparams("x", 0.02, 0), numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(np.array(0.02 * 0.01, np.float32), "scale")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_zp"], ["xq"]),
             helper.make_node("MatMulInteger", ["xq", "w"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["accf", "scale"], ["y"])]
    m = _single(nodes, inits, [1, 6])
    x = rng.uniform(-2, 2, (64, 6)).astype(np.float32)
    ref = ort_run(m, x, batched=False)
    q = compile_model_from_proto(m, calib=x)
    assert np.abs(simulate(q, x) - ref).max() <= 2 * q.tensors[q.outputs[0]].quant.scale


def compile_model_from_proto(m, calib=None):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.onnx"
        onnx.save(m, str(p))
        return compile_model(p, calib).graph
