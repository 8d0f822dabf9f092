"""The command line as users and other tools call it: artifacts, outputs and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import RESNET8
from conftest import hilc_cli as hilc
from onnx import TensorProto, helper

from hilc.compiler.pipeline import compile_model
from hilc.sim.simulator import simulate


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, crops32):
    d = tmp_path_factory.mktemp("cli")
    np.save(d / "calib.npy", crops32[:128])
    np.save(d / "x.npy", crops32[128:160])
    r = hilc("compile", RESNET8, "--calib", d / "calib.npy", "-o", d / "out", "-q")
    assert r.returncode == 0, r.stderr
    return d


def test_compile_writes_readable_artifacts(compiled):
    out = compiled / "out"
    assert sorted(p.name for p in out.iterdir()) == ["constants.npz", "graph.json", "report.json"]
    report = json.loads((out / "report.json").read_text())
    for key in ("model", "target", "precision", "macs", "bitops", "weights_bytes", "layers"):
        assert key in report
    assert report["target"] == "sim" and report["precision"] == "int8"
    assert report["macs"] == sum(layer["macs"] for layer in report["layers"]) == 12_505_728
    for layer in report["layers"]:
        assert {"name", "op", "macs", "weight_bits", "act_bits", "out_shape"} <= set(layer)
    graph = json.loads((out / "graph.json").read_text())
    assert {n["op"] for n in graph["nodes"]} >= {"conv2d", "add", "avgpool", "dense", "softmax"}
    assert all(t["dtype"] == "int8" for t in graph["tensors"])


def test_simulate_matches_the_python_api(compiled, crops32):
    r = hilc("simulate", compiled / "out", compiled / "x.npy", "-o", compiled / "y.npy")
    assert r.returncode == 0, r.stderr
    y = np.load(compiled / "y.npy")
    assert y.dtype == np.float32 and y.shape == (32, 10)
    expected = simulate(compile_model(RESNET8, crops32[:128]).graph, crops32[128:160])
    assert np.array_equal(y, expected)
    r = hilc("simulate", compiled / "out", compiled / "x.npy", "-o", compiled / "raw.npy", "--raw", "-q")
    assert r.returncode == 0 and np.load(compiled / "raw.npy").dtype == np.int8


def test_dump_after_prints_the_ir(compiled):
    r = hilc("compile", RESNET8, "--calib", compiled / "calib.npy", "-o", compiled / "dump", "-q",
             "--dump-after", "fuse_activation")
    assert r.returncode == 0
    assert "--- after fuse_activation ---" in r.stdout and "conv2d(input_1)" in r.stdout


def _assert_one_line_error(r, *fragments):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_missing_model(tmp_path):
    _assert_one_line_error(hilc("compile", tmp_path / "nope.onnx", "-o", tmp_path / "o"), "nope.onnx", "no such file")


def test_truncated_and_non_onnx_models(tmp_path, compiled):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(RESNET8.read_bytes()[:5000])
    _assert_one_line_error(hilc("compile", cut, "--calib", compiled / "calib.npy", "-o", tmp_path / "o"), "cut.onnx")
    txt = tmp_path / "notes.onnx"
    txt.write_text("just some text\n")
    _assert_one_line_error(hilc("compile", txt, "-o", tmp_path / "o"), "notes.onnx", "not a valid ONNX model")
    assert not (tmp_path / "o").exists()


def test_unsupported_ops_listed(tmp_path):
    g = helper.make_graph([helper.make_node("Cos", ["x"], ["e"], name="my_cos"),
                           helper.make_node("Sin", ["e"], ["y"], name="my_sin")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(m, str(tmp_path / "u.onnx"))
    _assert_one_line_error(hilc("compile", tmp_path / "u.onnx", "-o", tmp_path / "o"),
                           "'my_cos' (Cos)", "'my_sin' (Sin)")


def test_calibration_data_of_wrong_shape_or_dtype(tmp_path):
    np.save(tmp_path / "shape.npy", np.zeros((4, 3, 16, 16), np.float32))
    _assert_one_line_error(hilc("compile", RESNET8, "--calib", tmp_path / "shape.npy", "-o", tmp_path / "o"),
                           "input_1", "[4, 3, 16, 16]")
    np.save(tmp_path / "dtype.npy", np.zeros((4, 3, 32, 32), np.uint8))
    _assert_one_line_error(hilc("compile", RESNET8, "--calib", tmp_path / "dtype.npy", "-o", tmp_path / "o"),
                           "dtype uint8")
    np.savez(tmp_path / "two.npz", a=np.zeros(1), b=np.zeros(1))
    _assert_one_line_error(hilc("compile", RESNET8, "--calib", tmp_path / "two.npz", "-o", tmp_path / "o"),
                           "exactly one array")
    # (no --calib at all is no error: data-free calibration, tests/test_ptq.py)
    assert not (tmp_path / "o").exists()


def test_simulate_input_of_wrong_shape(compiled, tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((2, 32, 32, 3), np.float32))
    _assert_one_line_error(hilc("simulate", compiled / "out", tmp_path / "bad.npy", "-o", tmp_path / "y.npy"),
                           "bad.npy", "[2, 32, 32, 3]", "['N', 3, 32, 32]")
    assert not (tmp_path / "y.npy").exists()


def test_out_that_is_a_file(compiled, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    _assert_one_line_error(hilc("compile", RESNET8, "--calib", compiled / "calib.npy", "-o", f), "not a directory")
    assert f.read_text() == "x"


def test_failed_compile_leaves_earlier_artifacts_intact(compiled, tmp_path):
    out = compiled / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    np.save(tmp_path / "bad.npy", np.zeros((4, 5), np.float32))
    _assert_one_line_error(hilc("compile", RESNET8, "--calib", tmp_path / "bad.npy", "-o", out), "input_1")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]  # no temporary left behind


def test_simulate_on_a_directory_that_is_not_compiled(tmp_path, compiled):
    _assert_one_line_error(hilc("simulate", tmp_path, compiled / "x.npy", "-o", tmp_path / "y.npy"),
                           "not a compiled model")


def test_usage_error_exit_code(tmp_path):
    r = hilc("compile")
    assert r.returncode == 2 and "Traceback" not in r.stderr
