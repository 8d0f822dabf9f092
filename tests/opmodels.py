"""Single-operator ONNX models with awkward shapes, for operator tests of every backend.

Each case is a small float model built with onnx.helper: odd channel counts (not multiples of
4), stride 2, asymmetric padding, dilation 2, 1x1 spatial maps, broadcasting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass
class OpCase:
    name: str
    model: onnx.ModelProto
    input_shape: tuple[int, ...]  # batch first
    low: float = -3.0
    high: float = 3.0
    integer: bool = False  # whole numbers in [low, high] (token ids)

    def inputs(self, n: int, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        if self.integer:
            return rng.integers(int(self.low), int(self.high) + 1, size=(n, *self.input_shape[1:])).astype(np.float32)
        return rng.uniform(self.low, self.high, size=(n, *self.input_shape[1:])).astype(np.float32)


def _model(nodes, x_shape, y_shape, inits=(), opset=13, name="m") -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape[1:]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None if y_shape is None else ["N", *y_shape[1:]])
    g = helper.make_graph(nodes, name, [x], [y], initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    if y_shape is None:  # let ONNX infer the output shape, then declare it
        inferred = onnx.shape_inference.infer_shapes(m)
        vi = inferred.graph.output[0]
        vi.type.tensor_type.shape.dim[0].dim_param = "N"
        m.graph.output[0].CopyFrom(vi)
    return m


def _w(name: str, shape, seed: int, scale: float = 0.3) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _conv(name, cin, cout, k, hw, group=1, strides=(1, 1), pads=(0, 0, 0, 0), dil=(1, 1), bias=True, seed=0,
          relu=False):
    h, w = hw
    nodes = [helper.make_node("Conv", ["x", "W"] + (["B"] if bias else []), ["c" if relu else "y"],
                              kernel_shape=list(k), group=group, strides=list(strides), pads=list(pads),
                              dilations=list(dil))]
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    inits = [_w("W", (cout, cin // group, *k), seed)]
    if bias:
        inits.append(_w("B", (cout,), seed + 1))
    return OpCase(name, _model(nodes, (1, cin, h, w), None, inits), (1, cin, h, w))


def _unary(op, shape=(1, 5, 6, 7), low=-4.0, high=4.0, opset=13, **attrs):
    return OpCase(op.lower(), _model([helper.make_node(op, ["x"], ["y"], **attrs)], shape, shape, opset=opset),
                  shape, low, high)


def cases() -> list[OpCase]:
    c = [
        _conv("conv3x3_c5_to_7", 5, 7, (3, 3), (9, 11), pads=(1, 1, 1, 1)),
        _conv("conv_stride2_asym_pad", 3, 6, (3, 3), (10, 9), strides=(2, 2), pads=(0, 1, 1, 0), seed=2),
        _conv("conv_dilation2", 4, 5, (3, 3), (12, 12), dil=(2, 2), pads=(2, 2, 2, 2), seed=3),
        _conv("conv_1x1_spatial", 6, 9, (1, 1), (1, 1), seed=4, relu=True),
        _conv("conv_group3", 6, 9, (3, 3), (7, 7), group=3, pads=(1, 1, 1, 1), seed=5),
        _conv("depthwise_c7", 7, 7, (3, 3), (8, 8), group=7, pads=(1, 1, 1, 1), seed=6, relu=True),
        _conv("depthwise_mult2_stride2", 5, 10, (3, 3), (9, 9), group=5, strides=(2, 2), pads=(1, 1, 1, 1), seed=7),
        _conv("conv_5x5_nobias", 3, 4, (5, 3), (7, 6), bias=False, seed=8),
    ]
    # BatchNormalization on its own (no conv before it): becomes a depthwise 1x1.
    rng = np.random.default_rng(9)
    bn = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
          (("g", rng.uniform(0.5, 2, 5)), ("b", rng.standard_normal(5)), ("mu", rng.standard_normal(5)),
           ("var", rng.uniform(0.5, 2, 5)))]
    c.append(OpCase("batchnorm", _model([helper.make_node("BatchNormalization", ["x", "g", "b", "mu", "var"], ["y"])],
                                        (1, 5, 4, 6), (1, 5, 4, 6), bn), (1, 5, 4, 6)))
    # Conv + BN + Relu6 (Clip) folding.
    c.append(OpCase("conv_bn_relu6", _model(
        [helper.make_node("Conv", ["x", "W"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "g", "b", "mu", "var"], ["n"]),
         helper.make_node("Clip", ["n", "lo", "hi"], ["y"])], (1, 3, 6, 6), None,
        [_w("W", (5, 3, 3, 3), 10), *bn, numpy_helper.from_array(np.array(0, np.float32), "lo"),
         numpy_helper.from_array(np.array(6, np.float32), "hi")]), (1, 3, 6, 6)))
    c += [
        OpCase("gemm_transB", _model([helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1, alpha=0.5)],
                                     (1, 13), (1, 7), [_w("W", (7, 13), 11), _w("B", (7,), 12)]), (1, 13)),
        OpCase("matmul_3d", _model([helper.make_node("MatMul", ["x", "W"], ["y"])], (1, 3, 10), (1, 3, 6),
                                   [_w("W", (10, 6), 13)]), (1, 3, 10)),
        _unary("Relu"),
        OpCase("clip", _model([helper.make_node("Clip", ["x", "lo", "hi"], ["y"])], (1, 11), (1, 11),
                              [numpy_helper.from_array(np.array(-1.5, np.float32), "lo"),
                               numpy_helper.from_array(np.array(2.0, np.float32), "hi")]), (1, 11)),
        _unary("LeakyRelu", alpha=0.1),
        _unary("Sigmoid", low=-8, high=8),
        _unary("HardSigmoid", alpha=0.25, beta=0.4),
        _unary("HardSwish", opset=14),
        _unary("Tanh"),
        OpCase("maxpool_3x3_s2_ceil", _model([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3],
                                                               strides=[2, 2], pads=[1, 0, 0, 1], ceil_mode=1)],
                                             (1, 5, 10, 9), None), (1, 5, 10, 9)),
        OpCase("avgpool_pad_exclude", _model([helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3],
                                                               strides=[2, 2], pads=[1, 1, 1, 1])],
                                             (1, 3, 9, 8), None), (1, 3, 9, 8)),
        OpCase("avgpool_pad_include", _model([helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 3],
                                                               pads=[0, 1, 1, 1], count_include_pad=1)],
                                             (1, 3, 5, 6), None), (1, 3, 5, 6)),
        OpCase("global_avgpool", _model([helper.make_node("GlobalAveragePool", ["x"], ["y"])], (1, 6, 5, 7),
                                        (1, 6, 1, 1)), (1, 6, 5, 7)),
        OpCase("add_broadcast_const", _model([helper.make_node("Add", ["x", "C"], ["y"])], (1, 4, 3, 5), None,
                                             [_w("C", (4, 1, 1), 14, 1.0)]), (1, 4, 3, 5)),
        OpCase("add_two_branches", _model(
            [helper.make_node("Conv", ["x", "W"], ["a"], kernel_shape=[1, 1]),
             helper.make_node("Sigmoid", ["x"], ["s"]),
             helper.make_node("Add", ["a", "s"], ["r"]), helper.make_node("Relu", ["r"], ["y"])],
            (1, 3, 4, 4), None, [_w("W", (3, 3, 1, 1), 15)]), (1, 3, 4, 4)),
        OpCase("sub_and_mul", _model(
            [helper.make_node("Tanh", ["x"], ["t"]), helper.make_node("Sub", ["x", "t"], ["d"]),
             helper.make_node("Mul", ["d", "x"], ["y"])], (1, 9), None), (1, 9)),
        OpCase("mul_const", _model([helper.make_node("Mul", ["x", "C"], ["y"])], (1, 3, 2, 2), None,
                                   [_w("C", (1, 3, 2, 2), 16, 1.0)]), (1, 3, 2, 2)),
        OpCase("concat_channels", _model(
            [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Sigmoid", ["x"], ["s"]),
             helper.make_node("Concat", ["x", "r", "s"], ["y"], axis=1)], (1, 3, 4, 5), None), (1, 3, 4, 5)),
        OpCase("flatten_gemm", _model(
            [helper.make_node("Flatten", ["x"], ["f"]),
             helper.make_node("Gemm", ["f", "W"], ["y"], transB=1)], (1, 3, 2, 4), None,
            [_w("W", (5, 24), 17)]), (1, 3, 2, 4)),
        OpCase("reshape_squeeze_unsqueeze", _model(
            [helper.make_node("Reshape", ["x", "s"], ["r"]),
             helper.make_node("Unsqueeze", ["r", "ax"], ["u"]),
             helper.make_node("Squeeze", ["u", "ax"], ["q"]),
             helper.make_node("Relu", ["q"], ["y"])], (1, 2, 3, 4), None,
            [numpy_helper.from_array(np.array([0, 6, -1], np.int64), "s"),
             numpy_helper.from_array(np.array([2], np.int64), "ax")]), (1, 2, 3, 4)),
        OpCase("transpose_nhwc", _model([helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
                                         helper.make_node("Relu", ["t"], ["y"])], (1, 3, 4, 5), None), (1, 3, 4, 5)),
        OpCase("pad_reflect_then_conv", _model(
            [helper.make_node("Pad", ["x", "p"], ["pd"], mode="reflect"),
             helper.make_node("Conv", ["pd", "W"], ["y"], kernel_shape=[3, 3])], (1, 3, 6, 6), None,
            [numpy_helper.from_array(np.array([0, 0, 1, 2, 0, 0, 1, 0], np.int64), "p"), _w("W", (4, 3, 3, 3), 18)]),
               (1, 3, 6, 6)),
        OpCase("pad_zero_folded", _model(
            [helper.make_node("Pad", ["x", "p"], ["pd"]),
             helper.make_node("Conv", ["pd", "W"], ["y"], kernel_shape=[3, 3])], (1, 3, 5, 5), None,
            [numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "p"), _w("W", (4, 3, 3, 3), 19)]),
               (1, 3, 5, 5)),
        OpCase("softmax_last", _model([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], (1, 12), (1, 12)), (1, 12)),
        OpCase("softmax_channels_4d", _model([helper.make_node("Softmax", ["x"], ["y"], axis=1)], (1, 6, 3, 2),
                                             (1, 6, 3, 2)), (1, 6, 3, 2)),
        OpCase("identity_dropout", _model([helper.make_node("Identity", ["x"], ["i"]),
                                           helper.make_node("Dropout", ["i"], ["d"]),
                                           helper.make_node("Relu", ["d"], ["y"])], (1, 7), None), (1, 7)),
        OpCase("conv1d", _model([helper.make_node("Conv", ["x", "W"], ["y"], kernel_shape=[3], pads=[1, 1])],
                                (1, 4, 10), None, [_w("W", (6, 4, 3), 20)]), (1, 4, 10)),
    ]
    return c + transformer_cases()


def _const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def transformer_cases() -> list[OpCase]:
    """The operators of tiny transformers, alone: MatMul of activations, attention, LayerNorm (one node
    and decomposed), GELU (one node, Erf and tanh forms), ReduceMean, Gather (embedding and select)."""
    n = helper.make_node
    rng = np.random.default_rng(30)
    gamma, beta = _const("g", rng.uniform(0.5, 1.5, 10)), _const("b", rng.standard_normal(10) * 0.3)
    ln_decomposed = [
        n("ReduceMean", ["x"], ["mu"], axes=[-1]), n("Sub", ["x", "mu"], ["d"]), n("Pow", ["d", "two"], ["d2"]),
        n("ReduceMean", ["d2"], ["var"], axes=[-1]), n("Add", ["var", "eps"], ["ve"]), n("Sqrt", ["ve"], ["sd"]),
        n("Div", ["d", "sd"], ["nrm"]), n("Mul", ["nrm", "g"], ["sc"]), n("Add", ["sc", "b"], ["y"])]
    gelu_erf = [n("Div", ["x", "sqrt2"], ["a"]), n("Erf", ["a"], ["e"]), n("Add", ["e", "one"], ["e1"]),
                n("Mul", ["x", "e1"], ["m"]), n("Mul", ["m", "half"], ["y"])]
    gelu_tanh = [n("Pow", ["x", "three"], ["x3"]), n("Mul", ["x3", "c"], ["cx3"]), n("Add", ["x", "cx3"], ["inner"]),
                 n("Mul", ["inner", "k"], ["ki"]), n("Tanh", ["ki"], ["t"]), n("Add", ["one", "t"], ["t1"]),
                 n("Mul", ["half", "x"], ["hx"]), n("Mul", ["hx", "t1"], ["y"])]
    return [
        OpCase("matmul_activations", _model(
            [n("Transpose", ["x"], ["xt"], perm=[0, 1, 3, 2]), n("MatMul", ["x", "xt"], ["y"])],
            (1, 3, 5, 7), (1, 3, 5, 5)), (1, 3, 5, 7)),
        OpCase("attention_head", _model(
            [n("Transpose", ["x"], ["xt"], perm=[0, 1, 3, 2]), n("MatMul", ["x", "xt"], ["s"]),
             n("Mul", ["s", "scale"], ["ss"]), n("Softmax", ["ss"], ["y"], axis=-1)],
            (1, 2, 6, 8), (1, 2, 6, 6), [_const("scale", 0.2)]), (1, 2, 6, 8), -1.5, 1.5),
        OpCase("attention_context", _model(
            [n("Softmax", ["x"], ["p"], axis=-1), n("Transpose", ["x"], ["v"], perm=[0, 1, 3, 2]),
             n("MatMul", ["p", "v"], ["y"])], (1, 2, 6, 6), (1, 2, 6, 6)), (1, 2, 6, 6)),
        OpCase("layernorm", _model([n("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-5)],
                                   (1, 6, 10), (1, 6, 10), [gamma, beta], opset=17), (1, 6, 10)),
        OpCase("layernorm_decomposed", _model(ln_decomposed, (1, 6, 10), (1, 6, 10),
                                              [gamma, beta, _const("two", 2.0), _const("eps", 1e-5)]), (1, 6, 10)),
        OpCase("gelu", _model([n("Gelu", ["x"], ["y"])], (1, 5, 12), (1, 5, 12), opset=20), (1, 5, 12), -5, 5),
        OpCase("gelu_erf", _model(gelu_erf, (1, 5, 12), (1, 5, 12), [_const("sqrt2", 2**0.5), _const("one", 1.0),
                                                                     _const("half", 0.5)]), (1, 5, 12), -5, 5),
        OpCase("gelu_tanh", _model(gelu_tanh, (1, 5, 12), (1, 5, 12),
                                   [_const("three", 3.0), _const("c", 0.044715), _const("k", (2 / np.pi) ** 0.5),
                                    _const("one", 1.0), _const("half", 0.5)]), (1, 5, 12), -5, 5),
        OpCase("reduce_mean_tokens", _model([n("ReduceMean", ["x"], ["y"], axes=[1], keepdims=0)], (1, 9, 6),
                                            (1, 6)), (1, 9, 6)),
        OpCase("gather_embedding", _model(
            [n("Cast", ["x"], ["ids"], to=TensorProto.INT64), n("Gather", ["table", "ids"], ["y"])],
            (1, 7), (1, 7, 5), [_w("table", (20, 5), 31, 1.0)]), (1, 7), 0, 19, integer=True),
        OpCase("gather_first_token", _model(
            [n("Gather", ["x", "i0"], ["y"], axis=1)], (1, 6, 5), (1, 5),
            [numpy_helper.from_array(np.array(0, np.int64), "i0")]), (1, 6, 5)),
    ]
