"""Whole-model acceptance on the bundled real models (figures also printed by benchmarks/spine.py)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import AD01, DIGITS_CNN, RESNET8, ort_quantize_qdq, ort_run, plain_int64_arithmetic

from hilc.compiler.pipeline import compile_model
from hilc.sim.simulator import interpret, simulate


def test_resnet8_int8_agrees_with_float_at_least_as_well_as_onnxruntime_quantization(crops32, tmp_path):
    calib, held_out = crops32[:128], crops32[128:]
    ref = ort_run(RESNET8, held_out)
    y = simulate(compile_model(RESNET8, calib).graph, held_out)
    ours = float((y.argmax(1) == ref.argmax(1)).mean())
    ort_q = ort_run(ort_quantize_qdq(RESNET8, tmp_path / "r8_qdq.onnx", calib), held_out)
    theirs = float((ort_q.argmax(1) == ref.argmax(1)).mean())
    print(f"top-1 agreement: hilc {ours:.4f}, onnxruntime quantize_static {theirs:.4f}; "
          f"mean |dp| {np.abs(y - ref).mean():.5f}")
    assert ours >= 0.95
    assert ours >= theirs


def test_resnet8_qdq_import_matches_onnxruntime(crops32, tmp_path):
    qdq = ort_quantize_qdq(RESNET8, tmp_path / "r8_qdq.onnx", crops32[:128])
    held_out = crops32[128:]
    ref = ort_run(qdq, held_out, fused=True)  # what a user running the QDQ model gets
    result = compile_model(qdq)
    y = simulate(result.graph, held_out)
    q = result.graph.tensors[result.graph.outputs[0]].quant
    agree = float((y.argmax(1) == ref.argmax(1)).mean())
    lsb = float(np.abs(y - ref).mean() / q.scale)
    print(f"QDQ import: top-1 agreement with onnxruntime {agree:.4f}, mean |diff| {lsb:.3f} LSB")
    assert agree >= 0.99
    assert lsb <= 1.0


def test_digits_cnn_int8_accuracy_within_one_point_of_float(digits):
    graph = compile_model(DIGITS_CNN, digits["x_train"][:256]).graph
    assert sum(n.op == "conv2d" for n in graph.nodes) == 3  # BatchNormalization folded away
    float_acc = float((ort_run(DIGITS_CNN, digits["x_test"]).argmax(1) == digits["y_test"]).mean())
    int_acc = float((simulate(graph, digits["x_test"]).argmax(1) == digits["y_test"]).mean())
    print(f"digits: float {float_acc:.4f}, int8 {int_acc:.4f}")
    assert float_acc >= 0.97
    assert int_acc >= float_acc - 0.01


def test_ad01_reconstruction_error_within_5_percent():
    frames = np.load(AD01.parent / "ad01_toycar_normal_sample.npy").astype(np.float32)
    graph = compile_model(AD01, frames).graph
    ref = ort_run(AD01, frames)
    mse_float = float(((ref - frames) ** 2).mean())
    mse_int = float(((simulate(graph, frames) - frames) ** 2).mean())
    print(f"ad01 MSE: float {mse_float:.4f}, int8 {mse_int:.4f} ({mse_int / mse_float - 1:+.2%})")
    assert abs(mse_int / mse_float - 1) <= 0.05


@pytest.mark.parametrize("path,shape", [(RESNET8, (4, 3, 32, 32)), (AD01, (4, 640)), (DIGITS_CNN, (4, 1, 8, 8))])
def test_float_interpretation_of_real_models_matches_onnxruntime(path, shape):
    x = np.random.default_rng(0).uniform(0, 16, shape).astype(np.float32)
    from hilc.compiler.onnx_import import import_onnx

    ref = ort_run(path, x)
    got = interpret(import_onnx(path), x)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("path", [RESNET8, DIGITS_CNN])
def test_fast_exact_paths_equal_plain_int64_arithmetic(path, crops32, digits):

    x = crops32[:64] if path == RESNET8 else digits["x_test"]
    graph = compile_model(path, x[:32]).graph
    fast = simulate(graph, x, raw=True)
    with plain_int64_arithmetic():
        slow = simulate(graph, x, raw=True)
    assert np.array_equal(fast, slow)
