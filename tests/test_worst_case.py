"""Arithmetic safety: every layer driven with worst-case inputs (the values at the extremes that
maximise, or minimise, each accumulator) stays within the static overflow bound the compiler proved
(hilc/compiler/arith.py, the ops' ``acc_bound``), in the simulator and in the generated C under
ASan/UBSan (UBSan traps a signed int32 overflow); models built to sit exactly at the int32 limit run
bit-exact, one step past it they are refused at compile time with one line naming the node. Every
supported weight width: 8-bit, and 4- and 2-bit weights in int8 containers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import AD01, DIGITS_CNN, RESNET8, hilc_cli, plain_int64_arithmetic
from onnx import TensorProto, helper, numpy_helper
from opmodels import cases

from hilc.compiler import arith, passes
from hilc.compiler import calibrate as calib_mod
from hilc.compiler.ir import Graph, Node
from hilc.compiler.onnx_import import import_model, import_onnx
from hilc.compiler.ops import OPS
from hilc.compiler.quantize import quantize
from hilc.errors import UnsupportedModelError
from hilc.targets.c import build
from hilc.targets.c.codegen import generate_c, write_c_project

CASES = {c.name: c for c in cases()}
LINEAR = [n for n, c in CASES.items() if any(x.op_type in ("Conv", "Gemm", "MatMul", "BatchNormalization")
                                             for x in c.model.graph.node)]
# the cases with weights (where 4- and 2-bit weights make a difference)
WEIGHTED = [n for n, c in CASES.items()
            if any(x.op_type in ("Conv", "Gemm", "BatchNormalization")
                   or (x.op_type == "MatMul" and x.input[1] in {i.name for i in c.model.graph.initializer})
                   for x in c.model.graph.node)]
TERM = 127 * 255  # largest |w * (x - zp)| with 8-bit weights and int8 activations


def quantized(model, calib: np.ndarray, weight_bits: int = 8) -> Graph:
    """The compile pipeline up to the integer graph, with conv/dense weights of ``weight_bits``."""
    if isinstance(model, onnx.ModelProto):
        g = import_model(model, model.graph.name)
    else:
        g = import_onnx(model)
    for p in passes.FLOAT_PIPELINE:
        g = p(g)
    g = calib_mod.calibrate(g, calib)
    for n in g.nodes:
        if n.op in ("conv2d", "dense"):
            n.attrs["weight_bits"] = weight_bits
    return quantize(g)


def int64_eval(node: Node, g: Graph, xs: list[np.ndarray]) -> np.ndarray:
    """The node's integer kernel with the float shortcuts off (plain int64 arithmetic)."""
    with plain_int64_arithmetic():
        return OPS[node.op].eval_int(node, g, xs)[0]


# --- worst-case inputs of one conv / dense output ----------------------------------------------

def _taps(node: Node, g: Graph, oy: int, ox: int):
    """(ky, kx, iy, ix) of the in-bounds taps of conv output pixel (oy, ox)."""
    a = node.attrs
    _, h, w, _ = g.tensors[node.inputs[0]].shape
    for ky in range(a["kernel"][0]):
        iy = oy * a["strides"][0] - a["pads"][0] + ky * a["dilations"][0]
        for kx in range(a["kernel"][1]):
            ix = ox * a["strides"][1] - a["pads"][1] + kx * a["dilations"][1]
            if 0 <= iy < h and 0 <= ix < w:
                yield ky, kx, iy, ix


def matmul_worst_cases(node: Node, g: Graph, rng):
    """Activation x activation matmul: row i of A and row j of B^T at the corner of the box of
    int8 values whose product (x_a - zp_a)(x_b - zp_b) is largest (or most negative), every k."""
    ta, tb = (g.tensors[i] for i in node.inputs)
    qa, qb = ta.quant, tb.quant
    m, n = ta.shape[-2], tb.shape[-2]
    corners = [(va, vb) for va in (qa.qmin, qa.qmax) for vb in (qb.qmin, qb.qmax)]
    prods = [(va - qa.zero_point) * (vb - qb.zero_point) for va, vb in corners]
    for i, j in {(0, 0), (m - 1, n - 1), (m // 2, 0)}:
        for pick in (int(np.argmax(prods)), int(np.argmin(prods))):
            xa = rng.choice([qa.qmin, qa.qmax], size=ta.shape).astype(np.int8)
            xb = rng.choice([qb.qmin, qb.qmax], size=tb.shape).astype(np.int8)
            lead = (0,) * (len(ta.shape) - 2)
            xa[(*lead, i)] = corners[pick][0]
            xb[(*lead, j)] = corners[pick][1]
            row_a = xa[(*lead, i)].astype(np.int64) - qa.zero_point
            acc = int(row_a @ (xb[(*lead, j)].astype(np.int64) - qb.zero_point))
            assert acc == ta.shape[-1] * prods[pick]
            yield [xa, xb], (*lead, i, j), acc


def worst_cases(node: Node, g: Graph, rng, max_channels: int = 6):
    """Inputs that drive single accumulators to their extremes, one per (channel, pixel, sign):
    every input value the accumulator sees is qmax where its weight's sign helps and qmin where
    it hurts (the maximum of a linear function over the box of int8 inputs), the rest random
    extremes. Yields (x, index of the output element, the accumulator's exact value)."""
    q = g.tensors[node.inputs[0]].quant
    shape = g.tensors[node.inputs[0]].shape
    w = g.param(node, "weight").astype(np.int64)
    bias = g.param(node, "bias").astype(np.int64)
    channels = sorted({0, w.shape[0] // 2, w.shape[0] - 1} | set(range(min(max_channels - 3, w.shape[0]))))
    out_shape = g.tensors[node.outputs[0]].shape
    pixels = [(0, 0), (out_shape[1] // 2, out_shape[2] // 2)] if node.op == "conv2d" else [None]
    for o in channels:
        for pix in pixels:
            for sign in (1, -1):
                x = rng.choice([q.qmin, q.qmax], size=shape).astype(np.int64)
                best_hi, best_lo = (q.qmax, q.qmin) if sign > 0 else (q.qmin, q.qmax)
                acc = int(bias[o])
                if node.op == "dense":
                    row = x.reshape(-1, shape[-1])[0]
                    row[:] = np.where(w[o] > 0, best_hi, best_lo)
                    acc += int(w[o] @ (row - q.zero_point))
                    idx = (0,) * (len(out_shape) - 1) + (o,)
                else:
                    g_size = node.attrs["group"]
                    cg, og = shape[3] // g_size, w.shape[0] // g_size
                    c0 = (o // og) * cg
                    for ky, kx, iy, ix in _taps(node, g, *pix):
                        wk = w[o, ky, kx]
                        x[0, iy, ix, c0:c0 + cg] = np.where(wk > 0, best_hi, best_lo)
                        acc += int(wk @ (x[0, iy, ix, c0:c0 + cg] - q.zero_point))
                    idx = (0, *pix, o)
                yield x.astype(np.int8), idx, acc


def extreme_inputs(shape, q, rng) -> list[np.ndarray]:
    return [np.full(shape, q.qmin, np.int8), np.full(shape, q.qmax, np.int8),
            rng.choice([q.qmin, q.qmax], size=shape).astype(np.int8),
            np.full(shape, int(np.clip(q.zero_point, q.qmin, q.qmax)), np.int8)]


def check_every_layer(g: Graph, seed: int = 0) -> int:
    """Drive every node of g alone with worst-case inputs; returns how many accumulators reached
    their exact extreme. Asserts the static bound holds and the simulator's fast and int64 paths
    agree with the exact accumulator's requantization."""
    rng = np.random.default_rng(seed)
    reached = 0
    for node in g.nodes:
        if node.op in ("conv2d", "dense", "matmul"):
            bound = node.attrs["acc_bound"]
            assert bound <= arith.INT32_MAX
            cases_ = (matmul_worst_cases(node, g, rng) if node.op == "matmul"
                      else (([x], idx, acc) for x, idx, acc in worst_cases(node, g, rng)))
            for xs, idx, acc in cases_:
                assert abs(acc) <= bound, f"{node.name}: accumulator {acc} beyond its static bound {bound}"
                y = OPS[node.op].eval_int(node, g, xs)[0]
                assert np.array_equal(y, int64_eval(node, g, xs)), node.name
                o = idx[-1]
                if node.op == "matmul":
                    mult, shift = np.array([node.attrs["mult"]]), np.array([node.attrs["shift"]])
                else:
                    mult, shift = g.param(node, "mult")[o:o + 1], g.param(node, "shift")[o:o + 1]
                want = arith.requantize(np.array([acc]), mult, shift, node.attrs["zp_out"], node.attrs["lo"],
                                        node.attrs["hi"])[0]
                assert y[idx] == want, f"{node.name}: output {y[idx]} for accumulator {acc}, expected {want}"
                reached += 1
            continue
        ins = [g.tensors[i] for i in node.inputs]
        per_input = [extreme_inputs(t.shape, t.quant, rng) for t in ins]
        for k in range(4):
            xs = [p[(k + j) % 4] for j, p in enumerate(per_input)]  # mixed extremes across inputs
            y = OPS[node.op].eval_int(node, g, xs)[0]
            assert y.dtype == np.int8
            assert np.array_equal(y, int64_eval(node, g, xs)), node.name
    return reached


def _bits_params():
    return [(n, b) for n in CASES for b in (8, 4, 2) if b == 8 or n in WEIGHTED]


@pytest.mark.parametrize("name,bits", _bits_params(), ids=lambda v: str(v))
def test_every_operator_worst_case_in_the_simulator(name, bits):
    case = CASES[name]
    g = quantized(case.model, case.inputs(64, 0), bits)
    for n in g.nodes:
        if n.op in ("conv2d", "dense"):
            w = g.param(n, "weight")
            assert w.dtype == np.int8 and np.abs(w).max() <= 2 ** (bits - 1) - 1
    reached = check_every_layer(g)
    assert (reached > 0) == (name in LINEAR)


@pytest.mark.parametrize("model", ["resnet8", "ad01", "digits"])
def test_real_models_every_layer_worst_case_in_the_simulator(model, crops32, digits):
    if model == "resnet8":
        path, calib = RESNET8, crops32[:32]
    elif model == "ad01":
        path, calib = AD01, np.load(AD01.parent / "ad01_toycar_normal_sample.npy").astype(np.float32)
    else:
        path, calib = DIGITS_CNN, digits["x_train"][:64]
    for bits in (8, 4) if model == "digits" else (8,):
        g = quantized(str(path), calib, bits)
        assert check_every_layer(g) > 0


# --- the generated C on worst-case inputs, under ASan/UBSan ----------------------------------------

# One case per kernel family (grouped, depthwise, dilated conv; dense; average pool; add; mul; concat)
# and the sub-byte weight widths; the rest of the operators are checked in the simulator above and
# at their limits below.
C_CASES = [("conv_group3", 8), ("depthwise_mult2_stride2", 8), ("conv_dilation2", 8), ("gemm_transB", 8),
           ("avgpool_pad_include", 8), ("add_two_branches", 8), ("sub_and_mul", 8), ("concat_channels", 8),
           ("conv3x3_c5_to_7", 4), ("flatten_gemm", 2)]


def graph_inputs(g: Graph, seed: int = 0) -> np.ndarray:
    """Worst-case graph inputs: every extreme pattern, and when the first layer is a conv/dense,
    the inputs that drive its accumulators to their extremes."""
    rng = np.random.default_rng(seed)
    t = g.tensors[g.inputs[0]]
    xs = extreme_inputs(t.shape, t.quant, rng)
    first = g.consumers(g.inputs[0])
    for node in first:
        if node.op in ("conv2d", "dense"):
            xs += [x for x, _, _ in worst_cases(node, g, rng)]
    return np.concatenate(xs)


def c_vs_sim(g: Graph, qx: np.ndarray, out_dir) -> None:
    from hilc.sim.simulator import run_int_batched

    write_c_project(out_dir, generate_c(g))
    qx = qx.reshape(len(qx), *g.tensors[g.inputs[0]].shape[1:])
    sim = run_int_batched(g, qx).reshape(len(qx), -1)
    for dsp in (False, True):
        got = build.run_host(build.build_host(out_dir, sanitize=True, dsp=dsp), qx.reshape(len(qx), -1), sim.shape[1])
        assert np.array_equal(got, sim), f"{'DSP' if dsp else 'portable'} C differs from the simulator"


@pytest.mark.slow
@pytest.mark.parametrize("name,bits", C_CASES, ids=lambda v: str(v))
def test_generated_c_on_worst_case_inputs_under_sanitizers(name, bits, tmp_path):
    case = CASES[name]
    g = quantized(case.model, case.inputs(64, 0), bits)
    c_vs_sim(g, graph_inputs(g), tmp_path / "c")


# --- models at the int32 limit, and one step past it --------------------------------------------

def _save(tmp_path, nodes, x_shape, y_shape, inits, name="m"):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))
    m = helper.make_model(helper.make_graph(nodes, name, [x], [y], initializer=inits),
                          opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    path = tmp_path / f"{name}.onnx"
    onnx.save(m, str(path))
    return path


def limit_dense(tmp_path, k: int, name="dense"):
    """y = x @ W with W [k, 2]: column 0 all +0.01, column 1 all -0.01, so with every input at its
    maximum the two accumulators are +k*qmax_w*255 and -k*qmax_w*255."""
    w = np.empty((k, 2), np.float32)
    w[:, 0], w[:, 1] = 0.01, -0.01
    return _save(tmp_path, [helper.make_node("MatMul", ["x", "W"], ["y"], name="limit_matmul")], (1, k), (1, 2),
                 [numpy_helper.from_array(w, "W")], name)


def limit_conv(tmp_path, cin: int, group: int = 1, kernel=(3, 3), name="conv"):
    """A conv whose single output pixel sums every input value with weight +0.01."""
    w = np.full((group, cin // group, *kernel), 0.01, np.float32)
    return _save(tmp_path, [helper.make_node("Conv", ["x", "W"], ["y"], kernel_shape=list(kernel), group=group,
                                             name="limit_conv")], (1, cin, *kernel), (1, group, 1, 1),
                 [numpy_helper.from_array(w, "W")], name)


def calib_01(shape, n: int = 3) -> np.ndarray:
    """Calibration inputs spanning exactly [0, 1]: scale 1/255, zero point -128, so x = 1.0 is
    q = 127 and x - zp = 255, the largest int8 magnitude."""
    rng = np.random.default_rng(0)
    c = rng.uniform(0, 1, (n, *shape[1:])).astype(np.float32)
    c[0], c[1] = 0.0, 1.0
    return c


def _at_limit_checks(g: Graph, taps: int, out_dir=None) -> None:
    node = next(n for n in g.nodes if n.op in ("conv2d", "dense"))
    wmax = 2 ** (node.attrs["weight_bits"] - 1) - 1
    bound = taps * wmax * 255
    assert node.attrs["acc_bound"] == bound <= arith.INT32_MAX
    t = g.tensors[g.inputs[0]]
    qx = np.stack([np.full(t.shape[1:], t.quant.qmax, np.int8), np.full(t.shape[1:], t.quant.qmin, np.int8)])
    # the accumulators hit +bound (and -bound for a negative-weight channel) exactly
    y = OPS[node.op].eval_int(node, g, [qx])[0]
    assert np.array_equal(y, int64_eval(node, g, [qx]))
    chans = y.shape[-1]
    accs = np.array([bound, -bound][:chans] if node.op == "dense" else [bound] * chans)
    want = arith.requantize(accs, g.param(node, "mult"), g.param(node, "shift"), node.attrs["zp_out"],
                            node.attrs["lo"], node.attrs["hi"])
    assert np.array_equal(y[0].reshape(-1), want)
    if out_dir is not None:
        c_vs_sim(g, qx, out_dir)


def _refused(path, calib, bits, bound) -> None:
    with pytest.raises(UnsupportedModelError, match=rf"^\w+ \(limit_\w+\): int32 accumulator could overflow "
                                                    rf"\(static bound {bound} > 2\^31-1\)"):
        quantized(str(path), calib, bits)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense", "conv", "grouped", "depthwise"])
def test_8bit_layers_at_the_int32_limit_run_exact_and_one_more_term_is_refused(kind, tmp_path):
    k = arith.INT32_MAX // TERM  # 66311 products of 127 * 255
    if kind == "dense":
        make = lambda n, name: limit_dense(tmp_path, n, name)  # noqa: E731
        shape = lambda n: (1, n)  # noqa: E731
    elif kind == "conv":
        make = lambda n, name: limit_conv(tmp_path, n // 9, name=name)  # noqa: E731
        shape = lambda n: (1, n // 9, 3, 3)  # noqa: E731
        k = k // 9 * 9
    elif kind == "grouped":
        make = lambda n, name: limit_conv(tmp_path, 2 * (n // 9), group=2, name=name)  # noqa: E731
        shape = lambda n: (1, 2 * (n // 9), 3, 3)  # noqa: E731
        k = k // 9 * 9
    else:
        make = lambda n, name: limit_conv(tmp_path, 2, group=2, kernel=(257, n // 257), name=name)  # noqa: E731
        shape = lambda n: (1, 2, 257, n // 257)  # noqa: E731
        k = k // 257 * 257
    at = make(k, "at")
    g = quantized(str(at), calib_01(shape(k)))
    _at_limit_checks(g, k, tmp_path / "c")
    step = {"dense": 1, "conv": 9, "grouped": 9, "depthwise": 257}[kind]
    _refused(make(k + step, "over"), calib_01(shape(k + step)), 8, (k + step) * TERM)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 2])
def test_sub_byte_weights_at_the_int32_limit_and_past_it(bits, tmp_path):
    # The DSP kernels sum w * 2**(8-bits) (weights unpacked into the high bits of SIMD lanes), so a
    # packed layer's int32 limit is 2**(8-bits) times lower than its plain accumulator's.
    term = ((2 ** (bits - 1) - 1) * 255) << (8 - bits)
    k = arith.INT32_MAX // term
    g = quantized(str(limit_dense(tmp_path, k, "at")), calib_01((1, k), 2), bits)
    _at_limit_checks(g, k)
    with pytest.raises(UnsupportedModelError, match=rf"^\w+ \(limit_\w+\): the {bits}-bit SIMD kernel's scaled "
                                                    rf"int32 sum could overflow \(bound {(k + 1) * term} > 2\^31-1\)"):
        quantized(str(limit_dense(tmp_path, k + 1, "over")), calib_01((1, k + 1), 2), bits)


def test_overflowing_model_is_refused_by_the_cli_in_one_line(tmp_path):
    k = arith.INT32_MAX // TERM + 1
    path = limit_dense(tmp_path, k, "over")
    np.save(tmp_path / "calib.npy", calib_01((1, k)))
    r = hilc_cli("compile", path, "--calib", tmp_path / "calib.npy", "-o", tmp_path / "out")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "limit_matmul" in lines[0] and f"static bound {k * TERM} > 2^31-1" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_softmax_at_its_int32_limit_and_past_it(tmp_path):
    n = 2 ** 15 - 1  # the exp sum of n equal inputs is n * 2^16 < 2^31
    path = _save(tmp_path, [helper.make_node("Softmax", ["x"], ["y"], axis=-1)], (1, n), (1, n), [], "softmax_at")
    g = quantized(str(path), np.random.default_rng(0).uniform(-4, 4, (2, n)).astype(np.float32))
    t = g.tensors[g.inputs[0]]
    qx = np.stack([np.full(n, t.quant.qmax, np.int8), np.full(n, t.quant.qmin, np.int8)])
    c_vs_sim(g, qx, tmp_path / "c")
    over = _save(tmp_path, [helper.make_node("Softmax", ["x"], ["y"], axis=-1)], (1, n + 1), (1, n + 1), [], "sm_over")
    with pytest.raises(UnsupportedModelError, match=f"softmax over {n + 1} elements overflows the int32 sum"):
        quantized(str(over), np.zeros((1, n + 1), np.float32))


@pytest.mark.slow
def test_average_pool_at_its_int32_limit_and_past_it(tmp_path):
    side = 2902  # 2902 * 2901 * 255 < 2^31 <= 2902 * 2902 * 255 (the window's sum of x - zp)
    at = _save(tmp_path, [helper.make_node("GlobalAveragePool", ["x"], ["y"])], (1, 1, side, side - 1), (1, 1, 1, 1),
               [], "gap_at")
    g = quantized(str(at), calib_01((1, 1, side, side - 1), 2))
    node = g.nodes[0]
    assert node.op == "avgpool" and node.attrs["acc_bound"] == side * (side - 1) * 255 <= arith.INT32_MAX
    t = g.tensors[g.inputs[0]]
    qx = np.full((1, side * (side - 1)), t.quant.qmax, np.int8)
    c_vs_sim(g, qx, tmp_path / "c")
    over = _save(tmp_path, [helper.make_node("GlobalAveragePool", ["x"], ["y"], name="big_gap")],
                 (1, 1, side, side), (1, 1, 1, 1), [], "gap_over")
    with pytest.raises(UnsupportedModelError, match=rf"big_gap\): int32 accumulator could overflow .* static bound "
                                                    rf"{side * side * 255} > 2\^31-1"):
        quantized(str(over), calib_01((1, 1, side, side), 2))
