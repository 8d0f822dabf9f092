"""TVM engine: bit for bit the numpy simulator (every single-operator model, resnet8, ad01, the
digits CNN and the digits transformer, with and without the float fast paths), its rounding shift against the contract,
the module cache, the CLI, and the one-line error without the extra."""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import pytest
from conftest import AD01, DATA, DIGITS_CNN, RESNET8
from opmodels import cases

from hilc.compiler import arith
from hilc.compiler.arith import quantize_host
from hilc.compiler.ops import OPS, Op
from hilc.compiler.pipeline import compile_model, write_artifacts
from hilc.errors import HilcError
from hilc.sim.simulator import run_int_batched, simulate, to_physical
from hilc.targets.tvm import engine

# TVM modules built here go to a fresh cache folder (conftest.tvm_cache), not the user's
pytestmark = pytest.mark.usefixtures("tvm_cache")


def quantized_input(graph, x):
    q = graph.tensors[graph.inputs[0]].quant
    return quantize_host(to_physical(graph, graph.inputs[0], x), q.scale, q.zero_point)


def assert_same_as_simulator(graph, x):
    qx = quantized_input(graph, x)
    ref = run_int_batched(graph, qx)
    model = engine.build(graph)
    assert model.schedule_notes == []  # every schedule step applied
    got = model.run({graph.inputs[0]: qx})[graph.outputs[0]]
    assert got.dtype == np.int8 and got.shape == ref.shape
    assert np.array_equal(got, ref), f"{int((got != ref).sum())} of {ref.size} outputs differ"
    return ref


def op_graph(case, tmp_path):
    onnx.save(case.model, str(tmp_path / "m.onnx"))
    return compile_model(tmp_path / "m.onnx", case.inputs(64, 0)).graph


def op_inputs(case):
    # in range, and beyond the calibrated range so every clamp is reached
    return np.concatenate([case.inputs(24, 1), 1.7 * case.inputs(8, 2)])


@pytest.mark.parametrize("case", cases(), ids=lambda c: c.name)
def test_single_operator_models_bit_exact(case, tmp_path):
    assert_same_as_simulator(op_graph(case, tmp_path), op_inputs(case))


@pytest.mark.slow
@pytest.mark.parametrize("case", cases(), ids=lambda c: c.name)
def test_single_operator_models_bit_exact_in_plain_integer_arithmetic(case, tmp_path, plain_int64):
    assert_same_as_simulator(op_graph(case, tmp_path), op_inputs(case))


def extra_cases():
    """Operator forms the float single-operator models do not reach: Pad edge and constant (not
    folded into a conv), and QDQ imports, which add requant and transpose nodes."""
    from onnx import helper, numpy_helper
    from opmodels import OpCase, _model

    out = []
    for mode, value in (("edge", None), ("constant", 0.5)):
        inits = [numpy_helper.from_array(np.array([0, 0, 2, 1, 0, 0, 1, 3], np.int64), "p")]
        if value is not None:
            inits.append(numpy_helper.from_array(np.array(value, np.float32), "v"))
        nodes = [helper.make_node("Pad", ["x", "p"] + (["v"] if value is not None else []), ["pd"], mode=mode),
                 helper.make_node("Sigmoid", ["pd"], ["y"])]
        out.append(OpCase(f"pad_{mode}", _model(nodes, (1, 3, 4, 5), None, inits), (1, 3, 4, 5)))
    return out


@pytest.mark.parametrize("case", extra_cases(), ids=lambda c: c.name)
def test_pad_modes_bit_exact(case, tmp_path):
    graph = op_graph(case, tmp_path)
    assert [n.op for n in graph.nodes] == ["pad", "lut"]
    assert_same_as_simulator(graph, op_inputs(case))


@pytest.mark.parametrize("name,ops", [("concat_channels", {"requant", "concat"}), ("flatten_gemm", {"transpose"})])
def test_qdq_imported_models_bit_exact(name, ops, tmp_path):
    from conftest import ort_quantize_qdq

    case = next(c for c in cases() if c.name == name)
    onnx.save(case.model, str(tmp_path / "f.onnx"))
    graph = compile_model(ort_quantize_qdq(tmp_path / "f.onnx", tmp_path / "q.onnx", case.inputs(64, 0))).graph
    assert ops <= {n.op for n in graph.nodes}
    assert_same_as_simulator(graph, op_inputs(case))


def test_every_operator_has_a_tvm_lowering():
    spine_ops = {"conv2d", "dense", "add", "mul", "clamp", "requant", "lut", "softmax", "maxpool", "avgpool",
                 "reshape", "transpose", "concat", "pad", "embedding", "gather", "layernorm", "matmul", "reduce_mean"}
    assert spine_ops <= set(OPS)
    assert all(callable(getattr(OPS[op], "lower_tvm", None)) for op in spine_ops)


@pytest.fixture(scope="module")
def real_models(crops32, digits):
    frames = np.load(AD01.parent / "ad01_toycar_normal_sample.npy").astype(np.float32)
    return {
        "resnet8": (compile_model(RESNET8, crops32[:64]).graph, crops32[128:256]),
        "ad01": (compile_model(AD01, frames).graph, np.concatenate([frames, frames[:16] * 1.3])),
        "digits": (compile_model(DIGITS_CNN, digits["x_train"][:128]).graph, digits["x_test"]),
        "digits_transformer": (compile_model(DATA / "digits_transformer.onnx", digits["x_train"][:256]).graph,
                               digits["x_test"]),
    }


@pytest.mark.parametrize("name", ["resnet8", "ad01", "digits", "digits_transformer"])
def test_real_models_bit_exact(name, real_models):
    graph, x = real_models[name]
    ref = assert_same_as_simulator(graph, x)
    assert len(np.unique(ref)) > 8  # a real, varied output, not a constant
    # the user-level API gives the same dequantized floats
    assert np.array_equal(simulate(graph, x[:40], engine="tvm"), simulate(graph, x[:40]))


@pytest.mark.slow
def test_resnet8_bit_exact_in_plain_integer_arithmetic(real_models, plain_int64):
    graph, x = real_models["resnet8"]
    assert_same_as_simulator(graph, x[:64])


def test_graph_with_two_outputs_returns_both_bit_exact(tmp_path):
    from onnx import TensorProto, helper
    from opmodels import _w

    from hilc.sim.simulator import run_int

    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y1"]), helper.make_node("Sigmoid", ["c"], ["s"]),
             helper.make_node("GlobalAveragePool", ["s"], ["y2"])]
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                          [helper.make_tensor_value_info("y1", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)],
                          initializer=[_w("W", (8, 3, 3, 3), 1)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(onnx.shape_inference.infer_shapes(m), str(tmp_path / "m.onnx"))
    x = np.random.default_rng(0).uniform(-2, 2, (16, 3, 6, 6)).astype(np.float32)
    graph = compile_model(tmp_path / "m.onnx", x).graph
    qx = quantized_input(graph, x * 1.5)
    ref, got = run_int(graph, {graph.inputs[0]: qx}), engine.run_int(graph, {graph.inputs[0]: qx})
    assert list(got) == graph.outputs and len(got) == 2
    for name in graph.outputs:
        assert np.array_equal(got[name], ref[name])


def test_graph_whose_output_is_its_input(tmp_path):
    from onnx import helper
    from opmodels import OpCase, _model

    case = OpCase("identity", _model([helper.make_node("Identity", ["x"], ["y"])], (1, 7), (1, 7)), (1, 7))
    graph = op_graph(case, tmp_path)
    assert graph.nodes == [] and graph.outputs == graph.inputs
    assert_same_as_simulator(graph, op_inputs(case))


def test_rounding_shift_matches_the_contract_on_ties_and_extremes():
    import tvm
    from tvm import te, tirx

    rng = np.random.default_rng(0)
    cs = np.repeat(np.arange(1, 63, dtype=np.int64), 16)
    # exact halves (odd and even quotients), one either side of them, and random values
    k = rng.integers(-2**20, 2**20, cs.size)
    half = np.left_shift(np.int64(1), cs - 1)
    p = np.concatenate([(2 * k + 1) * half % 2**62, (2 * k + 1) * half % 2**62 + 1,
                        (2 * k + 1) * half % 2**62 - 1, rng.integers(-2**62, 2**62, cs.size),
                        -((2 * k + 1) * half % 2**62)])
    c = np.tile(cs, 5)
    ph = te.placeholder((p.size,), "int64", "p")
    ch = te.placeholder((p.size,), "int64", "c")
    out = te.compute((p.size,), lambda i: engine.rounding_shift(tirx, ph[i], ch[i]), name="y")
    f = tvm.compile(te.create_prim_func([ph, ch, out]), target=tvm.target.Target(engine.target_spec()))
    y = tvm.runtime.empty((p.size,), "int64", tvm.cpu())
    f["main"](tvm.runtime.tensor(p), tvm.runtime.tensor(c), y)
    assert np.array_equal(y.numpy(), arith.rounding_shift(p, c))
    assert arith.rounding_shift(np.array([5, 7, -5, -7]), 1).tolist() == [2, 4, -2, -4]


def relu_graph(tmp_path):
    return op_graph(next(c for c in cases() if c.name == "relu"), tmp_path)


def test_built_module_is_cached_on_disk_and_reloaded(tmp_path):
    graph = relu_graph(tmp_path)
    cache = tmp_path / "cache"
    engine._LOADED.pop(engine.module_key(graph), None)
    first = engine.build(graph, cache_dir=cache)
    assert not first.from_cache and len(list(cache.glob("*.so"))) == len(list(cache.glob("*.sha256"))) == 1
    assert engine.build(graph, cache_dir=cache) is first  # same process: no reload
    engine._LOADED.clear()
    again = engine.build(graph, cache_dir=cache)
    assert again.from_cache
    x = quantized_input(graph, op_inputs(next(c for c in cases() if c.name == "relu")))
    assert np.array_equal(again.run({graph.inputs[0]: x})[graph.outputs[0]], run_int_batched(graph, x))
    # a damaged cache file is rebuilt, not trusted
    damaged = cache / f"{again.key}.so"
    damaged.unlink()  # a new file: the loaded library's pages must stay intact
    damaged.write_bytes(b"not a library")
    engine._LOADED.clear()
    rebuilt = engine.build(graph, cache_dir=cache)
    assert not rebuilt.from_cache
    assert np.array_equal(rebuilt.run({graph.inputs[0]: x})[graph.outputs[0]], run_int_batched(graph, x))
    # another graph (other constants) gets another module
    other = graph.copy()
    other.nodes[0].attrs["lo"] = other.nodes[0].attrs["lo"] + 1
    assert engine.module_key(other) != engine.module_key(graph)
    # the exact-paths mode is part of the key
    assert engine.module_key(graph, fast=False) != engine.module_key(graph, fast=True)


def test_empty_batch_and_wrong_dtype(tmp_path):
    graph = relu_graph(tmp_path)
    m = engine.build(graph)
    shape = graph.tensors[graph.inputs[0]].shape[1:]
    assert m.run({graph.inputs[0]: np.zeros((0, *shape), np.int8)})[graph.outputs[0]].shape == (0, *shape)
    with pytest.raises(HilcError, match="takes int8 data"):
        m.run({graph.inputs[0]: np.zeros((2, *shape), np.float32)})


def test_operator_without_tvm_lowering_is_a_one_line_error(tmp_path, monkeypatch):
    class NoTVM(Op):
        name = "no_tvm"

    monkeypatch.setitem(OPS, "no_tvm", NoTVM())
    graph = relu_graph(tmp_path)
    graph.nodes[0].op = "no_tvm"
    with pytest.raises(HilcError, match=r"clamp_0: operator 'no_tvm' has no TVM lowering"):
        engine.lower(graph, True)


def test_cli_simulate_engine_tvm_writes_the_simulators_output(tmp_path, digits, capsys):
    from hilc.cli import main

    write_artifacts(tmp_path / "out", compile_model(DIGITS_CNN, digits["x_train"][:128]))
    np.save(tmp_path / "x.npy", digits["x_test"][:50])
    for eng in ("numpy", "tvm"):
        assert main(["simulate", str(tmp_path / "out"), str(tmp_path / "x.npy"), "-o", str(tmp_path / f"{eng}.npy"),
                     "--engine", eng, "--raw", "-q"]) == 0
    a, b = np.load(tmp_path / "numpy.npy"), np.load(tmp_path / "tvm.npy")
    assert a.dtype == np.int8 and a.shape == (50, 10)
    assert np.array_equal(a, b)
    # the Python API mirrors it
    import hilc

    m = hilc.load(tmp_path / "out")
    assert np.array_equal(m.simulate(digits["x_test"][:50], raw=True, engine="tvm"), a)
    assert np.array_equal(hilc.simulate(m, digits["x_test"][:50], engine="tvm"), m.simulate(digits["x_test"][:50]))


def test_without_tvm_installed_the_engine_says_how_to_install_it(tmp_path, digits, capsys, monkeypatch):
    from hilc.cli import main

    write_artifacts(tmp_path / "out", compile_model(DIGITS_CNN, digits["x_train"][:32]))
    np.save(tmp_path / "x.npy", digits["x_test"][:4])
    for mod in [m for m in sys.modules if m == "tvm" or m.startswith("tvm.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "tvm", None)  # `import tvm` now raises ImportError
    code = main(["simulate", str(tmp_path / "out"), str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"),
                 "--engine", "tvm"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "pip install 'hilc[tvm]'" in err and "Traceback" not in err
    assert not (tmp_path / "y.npy").exists()
    graph = compile_model(DIGITS_CNN, digits["x_train"][:32]).graph
    with pytest.raises(HilcError, match=r"pip install 'hilc\[tvm\]'"):
        simulate(graph, digits["x_test"][:4], engine="tvm")


def test_unknown_engine_is_rejected(tmp_path):
    graph = relu_graph(tmp_path)
    with pytest.raises(HilcError, match="unknown engine 'gpu'"):
        simulate(graph, np.zeros((1, 5, 6, 7), np.float32), engine="gpu")


def test_tvm_uses_every_cpu_it_is_given():
    """TVM alone would take half the CPUs (it assumes two hardware threads per core)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    code = ("import tvm, sys; from hilc.targets.tvm import require_tvm; require_tvm(); "
            "print(tvm.get_global_func('runtime.NumThreads')())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) == len(os.sched_getaffinity(0))
