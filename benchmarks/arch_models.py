"""Standard tiny-ML architectures built as ONNX graphs with random, fixed-seed weights (only onnx + numpy).

Peak memory and MAC figures depend on the architecture, not on weight values, so these models let the
compiler's memory planner and cost model be measured on the real network shapes without any download.

Reproduced:

* ``mobilenet_v2`` -- MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear
  Bottlenecks", CVPR 2018), layer for layer as torchvision builds it (``_make_divisible`` channel rounding,
  width multiplier, last conv 1280 * max(1, width)). BatchNorm is left out: every conv has a bias instead
  (the folded form a deployment compiler sees). 1.0/224: 3.49M parameters, 300.8M MACs.
  0.35/144 is the "mbv2-320kB" baseline of MCUNet (23.5M MACs).
* ``mcunet_like`` -- the MCUNet ImageNet model that fits 320 KB SRAM / 1 MB Flash (Lin et al., "MCUNet:
  Tiny Deep Learning on IoT Devices", NeurIPS 2020; model zoo id ``mcunet-in3``, "mcunet-320kB",
  net config ``mcunet-320kb-1mb_imagenet``): a TinyNAS-searched MobileNetV2-family backbone with per-block
  kernel sizes 3/5/7 and expansion ratios 3-6, no final 1x1 feature-mix conv. The block list below is a
  transcription of that net config, not the downloaded JSON; at its native 176x176 input it gives the
  published 0.74M parameters and 81.8M MACs. BatchNorm is folded as above.

Weights are He-normal (std = sqrt(2 / fan_in)), biases small, so activations stay in a sane range.

Run ``python benchmarks/arch_models.py OUT_DIR`` to write the .onnx files and print a summary table.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13
IR_VERSION = 8


def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's channel rounding: nearest multiple of divisor, never more than 10% below v."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class GraphBuilder:
    """Appends nodes to a straight-line NCHW graph; tracks the current tensor and its channel count."""

    def __init__(self, in_channels: int, resolution: int, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = [
            numpy_helper.from_array(np.array(0.0, np.float32), "relu6_min"),
            numpy_helper.from_array(np.array(6.0, np.float32), "relu6_max"),
        ]
        self.input = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, in_channels, resolution, resolution])
        self.x, self.c = "input", in_channels

    def _param(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def conv(self, name: str, out_c: int, k: int = 1, stride: int = 1, group: int = 1, relu6: bool = False) -> str:
        fan_in = self.c // group * k * k
        w = self.rng.normal(0.0, np.sqrt(2.0 / fan_in), (out_c, self.c // group, k, k))
        b = self.rng.normal(0.0, 0.01, out_c)
        inputs = [self.x, self._param(f"{name}.weight", w), self._param(f"{name}.bias", b)]
        out = name if not relu6 else f"{name}_conv"
        self.nodes.append(helper.make_node(
            "Conv", inputs, [out], name=name, kernel_shape=[k, k], strides=[stride, stride],
            pads=[k // 2] * 4, group=group, dilations=[1, 1]))
        if relu6:
            self.nodes.append(helper.make_node("Clip", [out, "relu6_min", "relu6_max"], [name], name=f"{name}_relu6"))
        self.x, self.c = name, out_c
        return name

    def add(self, name: str, other: str) -> str:
        self.nodes.append(helper.make_node("Add", [self.x, other], [name], name=name))
        self.x = name
        return name

    def inverted_residual(self, name: str, out_c: int, k: int, stride: int, expand: float) -> None:
        """Expansion 1x1 + ReLU6 (skipped for expand 1), depthwise kxk + ReLU6, linear 1x1, residual Add."""
        block_in, in_c = self.x, self.c
        hidden = int(round(in_c * expand))
        if expand != 1:
            self.conv(f"{name}_expand", hidden, relu6=True)
        self.conv(f"{name}_dw", hidden, k=k, stride=stride, group=hidden, relu6=True)
        self.conv(f"{name}_project", out_c)
        if stride == 1 and in_c == out_c:
            self.add(f"{name}_add", block_in)

    def model(self, graph_name: str, num_classes: int) -> onnx.ModelProto:
        """GlobalAveragePool, Flatten, Gemm to logits; returns the checked model."""
        self.nodes.append(helper.make_node("GlobalAveragePool", [self.x], ["pool"], name="pool"))
        self.nodes.append(helper.make_node("Flatten", ["pool"], ["flatten"], name="flatten", axis=1))
        w = self.rng.normal(0.0, np.sqrt(1.0 / self.c), (num_classes, self.c))
        inputs = ["flatten", self._param("fc.weight", w), self._param("fc.bias", np.zeros(num_classes))]
        self.nodes.append(helper.make_node("Gemm", inputs, ["logits"], name="fc", transB=1))
        output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, num_classes])
        graph = helper.make_graph(self.nodes, graph_name, [self.input], [output], initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="hilc-arch")
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model)
        return model


def mobilenet_v2(width: float = 1.0, resolution: int = 224, num_classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2 (torchvision layout, BatchNorm folded into conv biases) at a width multiplier and resolution."""
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]  # t, c, n, s
    g = GraphBuilder(3, resolution, seed)
    g.conv("stem", _make_divisible(32 * width), k=3, stride=2, relu6=True)
    block = 0
    for t, c, n, s in settings:
        for i in range(n):
            g.inverted_residual(f"b{block}", _make_divisible(c * width), 3, s if i == 0 else 1, t)
            block += 1
    g.conv("last", _make_divisible(1280 * max(1.0, width)), relu6=True)
    return g.model(f"mobilenet_v2_w{width}_r{resolution}", num_classes)


# mcunet-320kb-1mb_imagenet ("mcunet-in3"): (expand ratio, out channels, stride, kernel) per block.
MCUNET_320KB_BLOCKS = [
    (1, 8, 1, 3),
    (3, 16, 2, 7), (5, 16, 1, 3), (5, 16, 1, 7), (4, 16, 1, 5),
    (5, 24, 2, 5), (5, 24, 1, 5), (5, 24, 1, 5),
    (5, 40, 2, 3), (6, 40, 1, 7), (4, 40, 1, 5),
    (5, 48, 1, 5), (5, 48, 1, 7), (5, 48, 1, 3),
    (6, 96, 2, 3), (5, 96, 1, 7), (4, 96, 1, 3),
    (5, 160, 1, 7),
]


def mcunet_like(resolution: int = 160, num_classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    """MCUNet 320KB ImageNet backbone (published at resolution 176): stem 3x3 s2 to 16 channels, a
    depthwise-separable first block, 17 inverted residual blocks with kernels 3/5/7 and expansions 3-6,
    residual Add where stride 1 and channels match, global pool and Gemm straight from 160 channels."""
    g = GraphBuilder(3, resolution, seed)
    g.conv("stem", 16, k=3, stride=2, relu6=True)
    for i, (t, c, s, k) in enumerate(MCUNET_320KB_BLOCKS):
        g.inverted_residual(f"b{i}", c, k, s, t)
    return g.model(f"mcunet_320kb_r{resolution}", num_classes)


def model_stats(model: onnx.ModelProto) -> dict:
    """Parameters, Conv+Gemm MACs, node count and largest activation, all read back from the graph itself."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    params = macs = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        params += sum(inits[name].size for name in node.input[1:])
        w = inits[node.input[1]].shape
        out = shapes[node.output[0]]
        macs += int(np.prod(out)) * int(np.prod(w[1:])) if node.op_type == "Conv" else w[0] * w[1]
    largest = max((n for n in shapes if n not in inits), key=lambda n: np.prod(shapes[n]))
    return {"params": params, "macs": macs, "nodes": len(model.graph.node),
            "largest": (largest, shapes[largest], int(np.prod(shapes[largest])))}


def all_models() -> dict[str, onnx.ModelProto]:
    return {
        "mobilenet_v2_w1.0_r224": mobilenet_v2(1.0, 224),
        "mobilenet_v2_w0.35_r144": mobilenet_v2(0.35, 144),
        "mcunet_320kb_r160": mcunet_like(160),
        "mcunet_320kb_r176": mcunet_like(176),
    }


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit("usage: python benchmarks/arch_models.py OUT_DIR")
    out_dir = Path(argv[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    header = f"{'model':26} {'input':16} {'params':>10} {'MACs':>12} {'nodes':>6} {'bytes':>10}"
    print(f"{header}  largest activation (int8)")
    for name, model in all_models().items():
        path = out_dir / f"{name}.onnx"
        onnx.save(model, path)
        s = model_stats(model)
        shape = "x".join(str(d.dim_value) for d in model.graph.input[0].type.tensor_type.shape.dim)
        act, act_shape, act_bytes = s["largest"]
        print(f"{name:26} {shape:16} {s['params']:>10,} {s['macs']:>12,} {s['nodes']:>6} {path.stat().st_size:>10,}"
              f"  {act} {act_shape} {act_bytes:,} B")


if __name__ == "__main__":
    main(sys.argv[1:])
