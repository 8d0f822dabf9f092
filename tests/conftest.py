"""Shared fixtures: the bundled models and data (tests/data, copied from ../shared; see its README)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

DATA = Path(__file__).parent / "data"
RESNET8 = DATA / "resnet8_cifar10_fp32.onnx"
AD01 = DATA / "ad01_toycar_autoencoder_fp32.onnx"
DIGITS_CNN = DATA / "digits_cnn.onnx"

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("ORT_LOGGING_LEVEL", "3")
ort.set_default_logger_severity(3)


@pytest.fixture(scope="session")
def crops32() -> np.ndarray:
    return np.load(DATA / "natural_crops.npz")["crops32"].astype(np.float32)


def load_digits() -> dict[str, np.ndarray]:
    """The digits set as NCHW float32 images and int64 labels, cut by the stored train/test split
    (plain function: the benchmark scripts use it too)."""
    d = np.load(DATA / "digits.npz")
    split = np.load(DATA / "digits_split.npz")
    x = d["images"].astype(np.float32)[:, None, :, :]
    y = d["labels"].astype(np.int64)
    return {"x_train": x[split["train_idx"]], "y_train": y[split["train_idx"]],
            "x_test": x[split["test_idx"]], "y_test": y[split["test_idx"]]}


@pytest.fixture(scope="session")
def digits() -> dict[str, np.ndarray]:
    return load_digits()


def ort_run(model: str | Path | onnx.ModelProto, x: np.ndarray, batched: bool = True,
            fused: bool = False) -> np.ndarray:
    """onnxruntime output for a batch (one sample at a time when the model's batch is fixed);
    ``fused`` runs it with its default graph optimizations, as a user's session would."""
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    opts = ort.SessionOptions()
    # Unfused: QDQ models then run as DequantizeLinear -> float op -> QuantizeLinear, the
    # definition. Fused, onnxruntime's u8s8 kernels saturate int16 pair sums on x86 CPUs
    # without VNNI, so its integer answers would depend on the machine.
    if not fused:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    dim0 = sess.get_inputs()[0].shape[0]
    if batched and not isinstance(dim0, int):
        return sess.run(None, {name: x})[0]
    return np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def ort_quantize_qdq(model_path: str | Path, out_path: str | Path, calib: np.ndarray, opset13: bool = True) -> Path:
    """onnxruntime's quantize_static: QDQ, per-channel QInt8 weights, QInt8 activations, MinMax."""
    import logging

    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    logging.getLogger().setLevel(logging.ERROR)
    model = onnx.load(str(model_path))
    name = model.graph.input[0].name
    if opset13 and model.opset_import[0].version < 13:
        model = onnx.version_converter.convert_version(model, 13)
    src = Path(out_path).with_suffix(".float.onnx")
    onnx.save(model, str(src))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{name: calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(src), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return Path(out_path)


@pytest.fixture(scope="module")
def tvm_cache(tmp_path_factory):
    """A fresh TVM module cache folder (HILC_TVM_CACHE) for a test module, not the user's."""
    old = os.environ.get("HILC_TVM_CACHE")
    path = tmp_path_factory.mktemp("tvm_cache")
    os.environ["HILC_TVM_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("HILC_TVM_CACHE", None)
    else:
        os.environ["HILC_TVM_CACHE"] = old


@pytest.fixture(scope="module")
def float_graph():
    """resnet8 imported and through the float pipeline (BatchNorm folded), not yet calibrated."""
    from hilc.compiler import passes
    from hilc.compiler.onnx_import import import_onnx

    g = import_onnx(RESNET8)
    for p in passes.FLOAT_PIPELINE:
        g = p(g)
    return g


def calibrated(model, calib):
    """A model imported, through the float pipeline, and calibrated on ``calib``."""
    from hilc.compiler import calibrate, passes
    from hilc.compiler.onnx_import import import_onnx

    g = import_onnx(model)
    for p in passes.FLOAT_PIPELINE:
        g = p(g)
    return calibrate.calibrate(g, calib)


def hilc_cli(*args, **kw) -> subprocess.CompletedProcess:
    """``python -m hilc.cli ARGS`` in a subprocess (stdin closed, output captured as text);
    ``kw`` goes to subprocess.run (cwd, env, timeout)."""
    return subprocess.run([sys.executable, "-m", "hilc.cli", *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, **kw)


@contextlib.contextmanager
def plain_int64_arithmetic():
    """Inside the block the exact float shortcuts (``arith.FAST_EXACT_PATHS``) are off: int32
    accumulators and int64 requantization everywhere, as the C kernels compute."""
    from hilc.compiler import arith

    old = arith.FAST_EXACT_PATHS
    arith.FAST_EXACT_PATHS = False
    try:
        yield
    finally:
        arith.FAST_EXACT_PATHS = old


@pytest.fixture
def plain_int64():
    """A test run with the exact float shortcuts off (``plain_int64_arithmetic``)."""
    with plain_int64_arithmetic():
        yield


def host_vs_sim(model, calib, x, out_dir, **kw):
    """Compile ``model`` to C (``kw``: compile_model options), build the host harness under
    ASan/UBSan with the portable and with the DSP kernels and run both on ``x``; returns
    (the compile result, [portable_out, dsp_out], the simulator's output) as int8 rows."""
    from hilc.compiler.arith import quantize_host
    from hilc.compiler.pipeline import compile_model, write_artifacts
    from hilc.sim.simulator import run_int_batched, to_physical
    from hilc.targets.c import build

    result = compile_model(model, calib, target="c", **kw)
    write_artifacts(out_dir, result)
    g = result.graph
    q = g.tensors[g.inputs[0]].quant
    qx = quantize_host(to_physical(g, g.inputs[0], x), q.scale, q.zero_point)
    sim = run_int_batched(g, qx).reshape(len(x), -1)
    outs = [build.run_host(build.build_host(out_dir, sanitize=True, dsp=dsp), qx.reshape(len(x), -1), sim.shape[1])
            for dsp in (False, True)]
    return result, outs, sim


def float_onnx_model(nodes: list, inits: list, name: str, x_shape: list, y_shape: list) -> onnx.ModelProto:
    """A float32 model from NODES and INITS with input "x" and output "y" of the given shapes
    ("N" for a free batch), opset 13, IR version 8: the small hand-built test models."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)
    m = helper.make_model(helper.make_graph(nodes, name, [x], [y], initializer=inits),
                          opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m
