"""A new user's mistakes on every subcommand: each is one line on stderr naming the file, option,
node or tensor at fault, exit code 2, no traceback, and no earlier artifact damaged.

(tests/test_cli.py covers missing/truncated/non-ONNX models, unsupported ops, calibration data of
the wrong shape or dtype, OUT that is a file and a failed compile over a good OUT.)"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import DIGITS_CNN

from hilc.cli import main


def run(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def one_line_error(capsys, *args, fragments=()) -> str:
    rc, _, err = run(capsys, *args)
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("hilc: error: "), err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def digits_out(tmp_path_factory, digits):
    d = tmp_path_factory.mktemp("ux")
    np.save(d / "calib.npy", digits["x_train"][:64])
    np.save(d / "x.npy", digits["x_test"][:16])
    np.save(d / "labels.npy", digits["y_test"][:16])
    assert main(["compile", str(DIGITS_CNN), "--calib", str(d / "calib.npy"), "-o", str(d / "out"), "-q"]) == 0
    return d


def _snapshot(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.mark.parametrize("args, fragment", [
    (["--calib-method", "percentile", "--percentile", "200"],
     "--percentile: expected a number in (50, 100] (values between the (100-P)-th and P-th percentiles are kept), "
     "got 200.0"),  # was a numpy ValueError (exit 3)
    (["--calib-method", "percentile", "--percentile", "10"],
     "--percentile: expected a number in (50, 100] (values between the (100-P)-th and P-th percentiles are kept), "
     "got 10.0"),  # an upside-down range
    (["--percentile", "99.9"], "--percentile 99.9 needs --calib-method percentile"),  # silently minmax
    (["--ptq", "adaround", "--ptq-budget", "nan"], "--ptq-budget: expected a finite number of seconds >= 0, got nan"),
    (["--ptq", "all", "--ptq-budget", "-5"], "--ptq-budget: expected a finite number of seconds >= 0, got -5.0"),
    (["--precision", "auto-fpga", "--fpga-error-ratio", "-1"],
     "--fpga-error-ratio: expected a finite number above 0, got -1.0"),
    (["--fpga-error-ratio", "2"], "--fpga-error-ratio needs --precision auto-fpga"),
    (["--finetune-steps", "10"], "--finetune-steps needs --precision mixed"),
    (["--precision", "mixed", "--bitops-ratio", "2", "--finetune-steps", "-3"],
     "--finetune-steps: expected a number of steps >= 0, got -3"),
    (["--target", "c", "--flash", "-1"], "--flash: expected a positive number"),
    (["--flash", "100"], "--flash needs --target c"),  # target sim has no flash: was ignored
    (["--sram", "10"], "--sram needs --target c"),  # target sim alone: was ignored
    (["--input-range", "0,1"], "--input-range sets the synthesised inputs"),  # with --calib: was ignored
    (["--engine", "tvm"], "--engine tvm needs --precision mixed"),  # was ignored
    (["--cpu", "cortex-m3", "--board", "qemu-mps2-an386"], "--cpu cortex-m3 contradicts --board"),  # built for M4
])
def test_bad_or_ignored_compile_options(capsys, digits_out, tmp_path, args, fragment):
    one_line_error(capsys, "compile", DIGITS_CNN, "--calib", digits_out / "calib.npy", "-o", tmp_path / "o", "-q",
                   *args, fragments=[fragment])
    assert not (tmp_path / "o").exists()


def test_non_finite_input_range(capsys, tmp_path):
    one_line_error(capsys, "compile", DIGITS_CNN, "-o", tmp_path / "o", "--input-range", "0,inf",
                   fragments=["--input-range", "finite"])


def test_unwritable_outputs_are_one_line_errors(capsys, digits_out, tmp_path):
    out = digits_out / "out"
    # /proc takes no new files: the stand-in for a read-only or full disk (was an OSError, exit 3)
    one_line_error(capsys, "compile", DIGITS_CNN, "--calib", digits_out / "calib.npy", "-o", "/proc/hilc_ux_out",
                   "-q", fragments=["/proc/hilc_ux_out", "cannot write"])
    for cmd in (["simulate", out, digits_out / "x.npy", "-o", "/proc/hilc_ux.npy"],
                ["evaluate", out, digits_out / "x.npy", "-o", "/proc/hilc_ux.npy"],
                ["report", out, "-o", "/proc/hilc_ux.html"],
                ["export-onnx", out, "-o", "/proc/hilc_ux.onnx"]):
        one_line_error(capsys, *cmd, fragments=["/proc/hilc_ux", "cannot write"])
    one_line_error(capsys, "report", out, "-o", tmp_path, fragments=[str(tmp_path), "is a directory"])
    # a missing folder for an output file is created, like compile's -o (was FileNotFoundError, exit 3)
    assert main(["simulate", str(out), str(digits_out / "x.npy"), "-o", str(tmp_path / "new" / "y.npy"), "-q"]) == 0
    assert main(["report", str(out), "-o", str(tmp_path / "new2" / "r.html"), "-q"]) == 0
    assert np.load(tmp_path / "new" / "y.npy").shape == (16, 10)
    assert not [p for p in tmp_path.rglob(".*tmp*")]


def test_truncated_report_json(capsys, digits_out, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(digits_out / "out", d)
    text = (d / "report.json").read_text()
    (d / "report.json").write_text(text[: len(text) // 2])
    for cmd in (["export-onnx", d, "-o", tmp_path / "m.onnx"], ["evaluate", d, digits_out / "x.npy"]):
        one_line_error(capsys, *cmd, fragments=["report.json", "unreadable report"])


@pytest.mark.parametrize("labels, fragment", [
    (np.full(16, 0.5, np.float32), "expected integer class indices, got 0.5 at index 0"),
    (np.full(16, np.nan, np.float32), "got nan at index 0"),
    (np.full(16, -1), "label -1 at index 0 is not a class of the model's 10 outputs"),
    (np.arange(16), "label 10 at index 10"),
])
def test_evaluate_labels_that_are_not_classes(capsys, digits_out, tmp_path, labels, fragment):
    """They were counted as misses: a silent top-1 of 0%."""
    np.save(tmp_path / "lab.npy", labels)
    one_line_error(capsys, "evaluate", digits_out / "out", digits_out / "x.npy", "--labels", tmp_path / "lab.npy",
                   fragments=["lab.npy: ", fragment])


def test_evaluate_errors_name_the_users_files(capsys, digits_out, tmp_path):
    rc, out, _ = run(capsys, "evaluate", digits_out / "out", digits_out / "x.npy", "--labels",
                     digits_out / "labels.npy", "--json")
    assert rc == 0 and json.loads(out)["top1"] >= 0.9
    np.save(tmp_path / "ref.npy", np.full((16, 10), np.inf, np.float32))
    one_line_error(capsys, "evaluate", digits_out / "out", digits_out / "x.npy", "--reference", tmp_path / "ref.npy",
                   fragments=["ref.npy: ", "NaN or Inf"])
    np.save(tmp_path / "u8.npy", np.zeros((4, 1, 8, 8), np.uint8))
    one_line_error(capsys, "evaluate", digits_out / "out", tmp_path / "u8.npy", fragments=["u8.npy: ", "uint8"])
    one_line_error(capsys, "evaluate", digits_out / "out", digits_out / "x.npy", "--shard", "4",
                   fragments=["--shard 4: needs --cluster"])


def test_farm_chunk_below_one(capsys, digits_out, tmp_path):
    """range(0, n, 0) raised ValueError (exit 3); a negative chunk ran no input at all."""
    for cmd in (["regress", digits_out / "out", digits_out / "x.npy"],
                ["run", digits_out / "out", digits_out / "x.npy", "-o", tmp_path / "y.npy"]):
        one_line_error(capsys, *cmd, "--farm", tmp_path / "farm.toml", "--chunk", "0", fragments=["--chunk 0"])


def _edit_json(d, fn):
    g = json.loads((d / "graph.json").read_text())
    fn(g)
    (d / "graph.json").write_text(json.dumps(g))


def _edit_npz(d, fn):
    with np.load(d / "constants.npz") as z:
        c = dict(z)
    fn(c)
    np.savez(d / "constants.npz", **c)


def _cut(name):
    def fn(d):
        raw = (d / name).read_bytes()
        (d / name).write_bytes(raw[: len(raw) // 2])
    return fn


def _node(i, key, value):
    return lambda d: _edit_json(d, lambda g: g["nodes"][i].update({key: value}))


def _attr(i, key, value):
    return lambda d: _edit_json(d, lambda g: g["nodes"][i]["attrs"].update({key: value}))


def _bias_value(g):
    g["nodes"][0]["params"]["bias"]["value"][0] += 1000


# each was an internal error (exit 3) or, for the last four, ran quietly with the edit ignored or misread
DAMAGE = {
    "truncated constants.npz": (_cut("constants.npz"), "constants.npz: unreadable constants"),
    "constant dropped": (lambda d: _edit_npz(d, lambda c: c.pop("conv2d_1.weight")),
                         "node conv2d_1: constant 'conv2d_1.weight' (weight) is not in constants.npz"),
    "constant of another shape": (lambda d: _edit_npz(d, lambda c: c.update({"conv2d_1.bias": c["conv2d_1.bias"][:5]})),
                                  "'conv2d_1.bias' has shape [5] in constants.npz, graph.json says [32]"),
    "unknown operator": (_node(1, "op", "frobnicate"), "node conv2d_1: unknown operator 'frobnicate'"),
    "input renamed": (_node(1, "inputs", ["nowhere"]), "node conv2d_1: input 'nowhere' is not a tensor"),
    "nodes swapped": (lambda d: _edit_json(d, lambda g: g["nodes"].insert(0, g["nodes"].pop(1))),
                      "node conv2d_1: input 'conv2d_0' is not computed before it"),
    "attribute deleted": (lambda d: _edit_json(d, lambda g: g["nodes"][1]["attrs"].pop("kernel")),
                          "node conv2d_1 (conv2d): its attributes do not fit its inputs (KeyError: 'kernel')"),
    "zero stride": (_attr(1, "strides", [0, 0]), "node conv2d_1 (conv2d): its attributes do not fit"),
    "graph output renamed": (lambda d: _edit_json(d, lambda g: g.update(outputs=["nope"])), "graph output 'nope'"),
    "quant removed": (lambda d: _edit_json(d, lambda g: g["tensors"][0].pop("quant")), "tensor 'input': no quant"),
    "negative scale": (lambda d: _edit_json(d, lambda g: g["tensors"][0]["quant"].update(scale=-1.0)),
                       "tensor 'input': quant scale -1.0 is not a positive number"),
    "zero point out of sync": (_attr(1, "zp_out", 5), "node conv2d_1: zp_out 5 differs from the zero_point"),
    "inline value edited": (lambda d: _edit_json(d, _bias_value),
                            "the value of constant 'conv2d_0.bias' in graph.json differs from constants.npz"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_or_hand_edited_compiled_model(capsys, digits_out, tmp_path, damage):
    edit, fragment = DAMAGE[damage]
    d = tmp_path / "m"
    shutil.copytree(digits_out / "out", d)
    edit(d)
    for cmd in (["simulate", d, digits_out / "x.npy", "-o", tmp_path / "y.npy"], ["export-onnx", d, "-o",
                                                                                     tmp_path / "m.onnx"]):
        one_line_error(capsys, *cmd, fragments=[str(d), fragment])
    assert not (tmp_path / "y.npy").exists() and not (tmp_path / "m.onnx").exists()


def test_models_hilc_cannot_take_are_refused_by_compile_and_inspect(capsys, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    vi = helper.make_tensor_value_info
    two = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "g",
                            [vi("a", TensorProto.FLOAT, [1, 4]), vi("b", TensorProto.FLOAT, [1, 4])],
                            [vi("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(two, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "two.onnx"))
    # was KeyError 'b' from the simulator during calibration (exit 3)
    one_line_error(capsys, "compile", tmp_path / "two.onnx", "-o", tmp_path / "o",
                   fragments=["graph inputs 'a', 'b'", "one input tensor"])
    m = onnx.load(str(DIGITS_CNN))
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    onnx.save(m, str(tmp_path / "dyn.onnx"))
    # inspect counted the dynamic sizes as 1: MACs and memory 64x too small, and boards said "fits"
    one_line_error(capsys, "inspect", tmp_path / "dyn.onnx",
                   fragments=["dyn.onnx: graph input 'input' has shape [-1, 1, -1, -1]", "only the first (batch) axis"])
    one_line_error(capsys, "compile", tmp_path / "dyn.onnx", "-o", tmp_path / "o",
                   fragments=["graph input 'input' has shape [-1, 1, -1, -1]"])
    assert not (tmp_path / "o").exists()


def test_board_commands_check_inputs_and_port_first(capsys, digits_out, tmp_path):
    out, x = digits_out / "out", np.load(digits_out / "x.npy")
    x[3, 0, 2, 2] = np.nan
    np.save(tmp_path / "nan.npy", x)
    # run quantized the NaN and ran it as a value (exit 0, a meaningless output, "bit-exact" with --check)
    one_line_error(capsys, "run", out, tmp_path / "nan.npy", "--board", "qemu-mps2-an386", "-o", tmp_path / "y.npy",
                   fragments=["nan.npy: ", "NaN or Inf", "sample 3"])
    # profile --input took any dtype and NaN, and its shape error named no file
    one_line_error(capsys, "profile", out, "--board", "qemu-mps2-an386", "--input", tmp_path / "nan.npy",
                   fragments=["nan.npy: ", "NaN or Inf"])
    np.save(tmp_path / "flat.npy", x.reshape(len(x), -1))
    one_line_error(capsys, "profile", out, "--board", "qemu-mps2-an386", "--input", tmp_path / "flat.npy",
                   fragments=["flat.npy: ", "must have shape"])
    one_line_error(capsys, "run", out, digits_out / "x.npy", "--board", "qemu-mps2-an386", "-o", tmp_path,
                   fragments=[f"{tmp_path}: is a directory"])  # was found only after the board had run every input
    # --port was silently ignored on an emulated board
    for cmd in (["run", out, digits_out / "x.npy", "-o", tmp_path / "y.npy"], ["profile", out]):
        one_line_error(capsys, *cmd, "--board", "qemu-mps2-an386", "--port", "/dev/ttyUSB7",
                       fragments=["--port /dev/ttyUSB7: qemu-mps2-an386 is emulated"])
    assert not (tmp_path / "y.npy").exists()


def test_calibration_files_that_are_not_arrays(capsys, digits_out, tmp_path):
    np.savez(tmp_path / "c.npz", x=np.load(digits_out / "calib.npy"))
    raw = bytearray((tmp_path / "c.npz").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "flip.npz").write_bytes(bytes(raw))
    (tmp_path / "notes.npy").write_text("1 2 3\n")
    (tmp_path / "empty.npy").write_bytes(b"")
    for name, fragment in (("flip.npz", "Bad CRC-32"),  # was BadZipFile, exit 3
                           ("notes.npy", "not an .npy/.npz file"),  # numpy said "pickled (object) data"
                           ("empty.npy", "empty file")):
        one_line_error(capsys, "compile", DIGITS_CNN, "--calib", tmp_path / name, "-o", tmp_path / "o",
                       fragments=[f"{name}: ", fragment])
    assert not (tmp_path / "o").exists()


def test_empty_paths_are_refused(capsys, digits_out, tmp_path, monkeypatch):
    """Path('') is the current folder: `-o "$OUT"` with OUT unset wrote the model's files into it."""
    monkeypatch.chdir(tmp_path)
    one_line_error(capsys, "compile", DIGITS_CNN, "--calib", digits_out / "calib.npy", "-o", "", "-q",
                   fragments=["-o/--output: empty path"])
    one_line_error(capsys, "report", "", fragments=["COMPILED: empty path"])
    one_line_error(capsys, "simulate", digits_out / "out", "", "-o", "y.npy", fragments=["INPUT: empty path"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("report, fragment", [
    ({"layers": [{}]}, "layers #0: 'name' missing"),
    ({"layers": 5}, "'layers' is not a list"),
    ({"layers": [{"name": "c", "op": "conv2d", "macs": "many", "act_bits": 8, "out_shape": [1]}],
     "profile": {"layers": []}}, "layers #0: 'macs' missing or not a number"),
])
def test_report_of_a_hand_edited_report_json(capsys, digits_out, tmp_path, report, fragment):
    """Each was a KeyError or TypeError from the page builder (exit 3)."""
    d = tmp_path / "m"
    shutil.copytree(digits_out / "out", d)
    (d / "report.json").write_text(json.dumps(report))
    one_line_error(capsys, "report", d, fragments=["report.json: unreadable report", fragment])
    assert not (d / "report.html").exists()


def test_run_farm_options_that_would_be_ignored(capsys, digits_out, tmp_path):
    run_ = ["run", digits_out / "out", digits_out / "x.npy", "-o", tmp_path / "y.npy"]
    one_line_error(capsys, *run_, "--farm", tmp_path / "f.toml", "--board", "qemu-mps2-an386",
                   fragments=["--farm and --board"])
    one_line_error(capsys, *run_, "--board", "qemu-mps2-an386", "--kind", "qemu-mps2-an386",
                   fragments=["--kind only apply with --farm"])
