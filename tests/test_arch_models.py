"""benchmarks/arch_models.py: the generated architectures check, run, and match the published sizes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from arch_models import mcunet_like, mobilenet_v2, model_stats  # noqa: E402


def count(model: onnx.ModelProto) -> tuple[int, int]:
    """(parameters, MACs) of the Conv and Gemm nodes, counted independently of arch_models.model_stats."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.output]}
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    params = macs = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            (_, out_c, out_h, out_w), (_, in_c_per_group, kh, kw) = shapes[node.output[0]], inits[node.input[1]]
            macs += out_h * out_w * out_c * in_c_per_group * kh * kw
        elif node.op_type == "Gemm":
            macs += int(np.prod(inits[node.input[1]]))
        else:
            continue
        params += sum(int(np.prod(inits[name])) for name in node.input[1:])
    return params, macs


def run(model: onnx.ModelProto) -> np.ndarray:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    return sess.run(["logits"], {"input": x})[0]


def check_interface(model: onnx.ModelProto, resolution: int) -> None:
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 13)]
    (inp,) = model.graph.input
    assert inp.name == "input" and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim] == [1, 3, resolution, resolution]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert all(len(n.input) == 3 for n in model.graph.node if n.op_type == "Clip")  # opset-13 Clip(x, min, max)


@pytest.fixture(scope="module")
def mbv2() -> onnx.ModelProto:
    return mobilenet_v2(1.0, 224)


def test_mobilenet_v2_matches_published_size(mbv2: onnx.ModelProto) -> None:
    check_interface(mbv2, 224)
    params, macs = count(mbv2)
    assert abs(params - 3.5e6) < 0.1e6
    assert abs(macs - 300e6) < 10e6
    stats = model_stats(mbv2)
    assert (stats["params"], stats["macs"]) == (params, macs)
    assert stats["largest"][1:] == ([1, 96, 112, 112], 96 * 112 * 112)
    ops = [n.op_type for n in mbv2.graph.node]
    assert ops.count("Conv") == 52 and ops.count("Add") == 10 and ops.count("Gemm") == 1
    out = run(mbv2)
    assert out.shape == (1, 1000) and np.isfinite(out).all()


def test_mobilenet_v2_depthwise_convs(mbv2: onnx.ModelProto) -> None:
    inits = {t.name: list(t.dims) for t in mbv2.graph.initializer}
    dw = [n for n in mbv2.graph.node if n.op_type == "Conv" and n.name.endswith("_dw")]
    assert len(dw) == 17
    for node in dw:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert inits[node.input[1]][:2] == [attrs["group"], 1] and attrs["pads"] == [1, 1, 1, 1]


def test_mobilenet_v2_035_144() -> None:
    model = mobilenet_v2(0.35, 144)
    check_interface(model, 144)
    _, macs = count(model)
    print(f"mobilenet_v2(0.35, 144): {macs / 1e6:.1f}M MACs")
    assert 18e6 < macs < 30e6
    out = run(model)
    assert out.shape == (1, 1000) and np.isfinite(out).all()


def test_mcunet_like() -> None:
    model = mcunet_like()
    check_interface(model, 160)
    params, macs = count(model)
    print(f"mcunet_like(160): {params / 1e6:.3f}M params, {macs / 1e6:.1f}M MACs")
    kernels = {onnx.helper.get_attribute_value(a)[0] for n in model.graph.node for a in n.attribute
               if n.op_type == "Conv" and a.name == "kernel_shape"}
    assert kernels == {1, 3, 5, 7}
    out = run(model)
    assert out.shape == (1, 1000) and np.isfinite(out).all()
    # at its published 176x176 input: 0.74M parameters and 81.8M MACs (BatchNorm counted there, biases here)
    params, macs = count(mcunet_like(176))
    assert abs(params - 0.74e6) < 0.02e6 and abs(macs - 81.8e6) < 0.5e6
