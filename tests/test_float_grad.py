"""Each operator's float forward/backward (``Op.float_forward`` / ``Op.float_backward``, used by
fine-tuning and data-free calibration): the forward equals the operator's float kernel, and the
input and parameter gradients equal central differences (float64)."""

from __future__ import annotations

import numpy as np
import pytest

from hilc.compiler.ir import Graph, Node, Tensor
from hilc.compiler.ops import OPS
from hilc.compiler.ops.base import apply_float_activation, float_params

CONV = {"kernel": [3, 3], "strides": [2, 1], "dilations": [1, 2], "pads": [1, 0, 2, 1], "group": 2}
POOL = {"kernel": [3, 2], "strides": [2, 2], "pads": [1, 0, 0, 1], "count_include_pad": 0}
CASES = {
    # op, input shapes, attrs, params (shapes), output shape
    "conv2d": ("conv2d", [(2, 7, 6, 4)], CONV, {"weight": (6, 3, 3, 2), "bias": (6,)}, (2, 4, 3, 6)),
    "dense": ("dense", [(3, 5)], {"act_lo": 0.0}, {"weight": (4, 5), "bias": (4,)}, (3, 4)),
    "add": ("add", [(2, 3, 4), (2, 3, 4)], {"signs": [1, -1]}, {}, (2, 3, 4)),
    "avgpool": ("avgpool", [(2, 6, 5, 3)], POOL, {}, (2, 3, 3, 3)),
    "reshape": ("reshape", [(2, 3, 4)], {"shape": [2, 12]}, {}, (2, 12)),
    "transpose": ("transpose", [(2, 3, 4)], {"perm": [0, 2, 1]}, {}, (2, 4, 3)),
    "clamp": ("clamp", [(2, 5)], {"act_lo": -0.5, "act_hi": 0.5}, {}, (2, 5)),
}


def _node(case: str) -> tuple[Graph, Node, list[np.ndarray]]:
    op, in_shapes, attrs, pshapes, out_shape = CASES[case]
    rng = np.random.default_rng(0)
    g = Graph(case)
    ins = [f"x{i}" for i in range(len(in_shapes))]
    for name, s in zip(ins, in_shapes, strict=True):
        g.tensors[name] = Tensor(name, s)
    g.tensors["y"] = Tensor("y", out_shape)
    n = Node("n", op, ins, ["y"], dict(attrs), {k: f"n.{k}" for k in pshapes})
    for k, s in pshapes.items():
        g.constants[f"n.{k}"] = rng.standard_normal(s)
    g.nodes, g.inputs, g.outputs = [n], ins, ["y"]
    return g, n, [rng.standard_normal(s) for s in in_shapes]


@pytest.mark.parametrize("case", sorted(CASES))
def test_float_backward_matches_finite_differences(case):
    g, n, xs = _node(case)
    op = OPS[n.op]
    assert op.differentiable(n)
    params = float_params(n, g)
    (z,), cache = op.float_forward(n, g, xs, params)
    # the forward is the operator's float kernel (before its fused activation)
    ref = op.eval_float(n, g, [x.astype(np.float32) for x in xs])[0]
    np.testing.assert_allclose(apply_float_activation(n, z), ref, rtol=1e-5, atol=1e-5)
    dz = np.random.default_rng(1).standard_normal(z.shape)
    dxs, dps = op.float_backward(n, cache, [dz])
    assert len(dxs) == len(xs) and set(dps) == set(params)

    def loss() -> float:
        return float((op.float_forward(n, g, xs, params)[0][0] * dz).sum())

    for arr, grad in [*zip(xs, dxs, strict=True), *((params[k], dps[k]) for k in params)]:
        assert grad.shape == arr.shape
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + 1e-6
            lp = loss()
            arr[i] = old - 1e-6
            lm = loss()
            arr[i] = old
            assert abs(grad[i] - (lp - lm) / 2e-6) < 1e-6, (case, i)


def test_differentiable_narrows_by_attribute():
    """Ceil-mode pooling and an add of a constant have no backward; maxpool none at all."""
    _, n, _ = _node("avgpool")
    assert not OPS["avgpool"].differentiable(Node("p", "avgpool", ["x"], ["y"], {**n.attrs, "extra": [1, 0]}))
    assert not OPS["add"].differentiable(Node("a", "add", ["x"], ["y"], {}, {"const": "c"}))
    assert not OPS["maxpool"].differentiable(Node("m", "maxpool", ["x"], ["y"], {}))
