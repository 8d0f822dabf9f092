"""Reports, QDQ ONNX export, inspect, the Python API and progress display."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import AD01, DATA, DIGITS_CNN, RESNET8, hilc_cli, ort_run
from onnx import TensorProto, helper, numpy_helper

import hilc
from hilc.compiler.pipeline import compile_model, write_artifacts
from hilc.errors import HilcError

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("HILC_TEST_ARTIFACTS", REPO / "test-artifacts"))

needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-arm") is None or shutil.which("arm-none-eabi-gcc") is None,
                                reason="needs qemu-system-arm and arm-none-eabi-gcc (installed by .ci/run)")


def _lsb_diff(graph, y_float: np.ndarray, sim_raw: np.ndarray) -> np.ndarray:
    qo = graph.tensors[graph.outputs[0]].quant
    return np.abs(np.rint(y_float.astype(np.float64) / qo.scale) + qo.zero_point - sim_raw.astype(np.int64))


# --- export-onnx ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet8", "digits"])
def test_export_onnx_round_trip_within_one_lsb(name, tmp_path, crops32, digits):
    if name == "resnet8":
        model, calib, x = RESNET8, crops32[:64], crops32[64:128]
    else:
        model, calib, x = DIGITS_CNN, digits["x_train"][:128], digits["x_test"][:100]
    np.save(tmp_path / "calib.npy", calib)
    assert hilc_cli("compile", model, "--calib", tmp_path / "calib.npy", "-o", tmp_path / "o", "-q").returncode == 0
    r = hilc_cli("export-onnx", tmp_path / "o", "-o", tmp_path / "qdq.onnx")
    assert r.returncode == 0, r.stderr
    m = onnx.load(str(tmp_path / "qdq.onnx"))
    onnx.checker.check_model(m, full_check=True)
    ops = {n.op_type for n in m.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert ("Gather" in ops) == (name == "resnet8")  # resnet8 ends in hilc's integer softmax
    # weights stay int8 in the file (what Netron shows), biases int32
    dtypes = {numpy_helper.to_array(i).dtype for i in m.graph.initializer if i.name.endswith(".weight")}
    assert dtypes == {np.dtype(np.int8)}
    graph = hilc.load(tmp_path / "o").graph
    y = ort_run(m, x)
    sim = hilc.simulate(tmp_path / "o", x, raw=True)
    d = _lsb_diff(graph, y, sim)
    # the acceptance is 1 LSB; the export keeps the integer arithmetic, so it is bit for bit
    assert y.shape == sim.shape and d.max() == 0, f"max {d.max()} LSB, {(d > 0).mean():.2%} differ"


def test_export_onnx_every_single_operator_model(tmp_path):
    from opmodels import cases

    from hilc.targets.onnx_qdq import export_qdq

    for case in cases():
        path = tmp_path / f"{case.name}.onnx"
        onnx.save(case.model, str(path))
        x = case.inputs(48)
        g = compile_model(path, x[:32]).graph
        y = ort_run(export_qdq(g), x[32:])
        from hilc.sim.simulator import simulate

        d = _lsb_diff(g, y, simulate(g, x[32:], raw=True))
        assert d.max() == 0, f"{case.name}: {d.max()} LSB"


def test_export_onnx_splits_layers_whose_float32_sums_could_be_inexact(tmp_path):
    """A 3x3 conv over 256 channels and a 9216-input dense layer can reach 2^24 (float32's
    exact-integer range): the conv is split over input channels, the dense runs in float64."""
    from hilc.sim.simulator import simulate
    from hilc.targets.onnx_qdq import F32_EXACT, export_qdq

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 256, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((64 * 12 * 12, 10)).astype(np.float32), "d")]
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Flatten", ["c"], ["f"]),
         helper.make_node("MatMul", ["f", "d"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 256, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    path = _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "big.onnx")
    x = rng.uniform(0, 1, (24, 256, 12, 12)).astype(np.float32)
    graph = compile_model(path, x[:16]).graph
    assert all(n.attrs["acc_bound"] >= F32_EXACT for n in graph.nodes if n.op in ("conv2d", "dense"))
    m = export_qdq(graph)
    assert sum(n.op_type == "Conv" for n in m.graph.node) > 1
    matmul = next(n for n in m.graph.node if n.op_type == "MatMul")
    assert all(any(c.op_type == "Cast" and c.output[0] == i for c in m.graph.node) for i in matmul.input)
    assert _lsb_diff(graph, ort_run(m, x), simulate(graph, x, raw=True)).max() == 0


def test_export_onnx_errors_are_one_line(tmp_path):
    r = hilc_cli("export-onnx", tmp_path / "missing", "-o", tmp_path / "m.onnx")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such compiled model" in r.stderr


# --- inspect ----------------------------------------------------------------------------------

def _onnx_models() -> list[Path]:
    shared = REPO.parent / "shared" / "models"
    found = sorted(DATA.glob("*.onnx"))
    names = {p.name for p in found}
    # ../shared/models is copied into tests/data; any model there that is not is inspected too
    found += [p for p in sorted(shared.glob("*.onnx")) if p.name not in names] if shared.is_dir() else []
    return found


@pytest.mark.parametrize("model", _onnx_models(), ids=lambda p: p.name)
def test_inspect_every_bundled_model_under_5s(model):
    t0 = time.perf_counter()
    r = hilc_cli("inspect", model, "--json")
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    assert elapsed < 5.0, f"{model.name}: {elapsed:.1f} s"
    ins = json.loads(r.stdout)
    assert ins["supported"] and not ins["unsupported"] and ins["params"] > 0 and ins["macs"] > 0
    assert "qemu-mps2-an386" in [n for n, b in ins["boards"].items() if b["fits"]]


def test_inspect_figures_agree_with_the_compiler(crops32):
    ins = hilc.inspect(RESNET8)
    rep = compile_model(RESNET8, crops32[:16], target="c").report
    # MACs of conv and dense layers (the compiler also counts pooling additions)
    assert ins.macs == sum(lay["macs"] for lay in rep["layers"] if lay["op"] in ("conv2d", "dense"))
    # the weights the compiler keeps (BatchNorm folded away) are no more than inspect counts
    n_w = sum(lay["weights_bytes"] for lay in rep["layers"])
    assert n_w <= ins.params
    # layer by layer, no in-place reuse: at least the planner's lower bound
    assert ins.peak_activation_bytes >= rep["arena_lower_bound_bytes"]


def _save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_inspect_flags_unsupported_operator(tmp_path):
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Sin", ["c"], ["e"], name="the_sin"),
         helper.make_node("Relu", ["e"], ["y"], name="relu")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    path = _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "erf.onnx")
    r = hilc_cli("inspect", path)
    assert r.returncode == 0, r.stderr
    assert "unsupported: the_sin (Sin)" in r.stdout and "✗ unsupported" in r.stdout
    assert "fits as is: no board" in r.stdout
    ins = hilc.inspect(path)
    assert not ins.supported and ins.unsupported == ["the_sin (Sin)"]
    assert [lay.supported for lay in ins.layers] == [True, False, True]
    assert ins.macs == 8 * 8 * 4 * 27 and ins.params == 4 * 27
    # and compiling it fails naming the same node
    c = hilc_cli("compile", path, "-o", tmp_path / "o")
    assert c.returncode == 2 and "'the_sin' (Sin)" in c.stderr


def test_inspect_board_fit_follows_sram(tmp_path):
    """1x3x128x128 in, 1x8x128x128 out: 180,224 int8 bytes live at once; nucleo-f446re has 128 KiB."""
    w = numpy_helper.from_array(np.ones((8, 3, 1, 1), np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 128, 128])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 128, 128])], [w])
    ins = hilc.inspect(_save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "b.onnx"))
    assert ins.peak_activation_bytes == 3 * 128 * 128 + 8 * 128 * 128
    nucleo = ins.boards["nucleo-f446re"]
    assert not nucleo["fits"] and "SRAM 180,224 > 131,072" in nucleo["why_not"]
    assert ins.boards["nrf52840dk"]["fits"]


# --- report.html --------------------------------------------------------------------------------

def _page_checks(html_path: Path, screenshot: Path) -> dict:
    from chromium_cdp import load_page

    expr = """JSON.stringify({
      plots: Array.from(document.querySelectorAll('img.plot')).map(
        i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 100, src: i.src.slice(0, 22)})),
      rows: Array.from(document.querySelectorAll('#layers tr')).slice(1).map(
        r => Array.from(r.cells).map(c => c.textContent)),
      head: Array.from(document.querySelectorAll('#layers th')).map(c => c.textContent),
      scripts: document.scripts.length, links: document.querySelectorAll('link[href]').length})"""
    r = load_page(html_path.resolve().as_uri(), expr, screenshot)
    r["value"] = json.loads(r["value"])
    return r


needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (installed by .ci/run)")


@pytest.mark.slow
@needs_qemu
@needs_chromium
def test_report_html_resnet8_profiled_on_qemu_in_headless_chromium(tmp_path, crops32):
    out = tmp_path / "r8"
    np.save(tmp_path / "calib.npy", crops32[:32])
    c = hilc_cli("compile", RESNET8, "--calib", tmp_path / "calib.npy", "--board", "qemu-mps2-an386", "-o", out)
    assert c.returncode == 0, c.stderr
    assert c.stdout.strip().splitlines()[-1].startswith("summary: resnet8_cifar10_fp32.onnx -> ")
    p = hilc_cli("profile", out, "--board", "qemu-mps2-an386")
    assert p.returncode == 0, p.stderr
    r = hilc_cli("report", out, "--accuracy", "int8 top-1 agreement=96.09%")
    assert r.returncode == 0 and (out / "report.html").exists(), r.stderr
    report = json.loads((out / "report.json").read_text())

    shot = tmp_path / "report_resnet8.png"
    page = _page_checks(out / "report.html", shot)
    assert page["errors"] == []
    # self-contained: nothing fetched but the page itself and its data: images
    assert all(u.startswith(("file:", "data:")) for u in page["requests"]), page["requests"][:3]
    v = page["value"]
    assert v["scripts"] == 0 and v["links"] == 0
    assert [p["alt"] for p in v["plots"]] == ["Memory timeline", "Per-layer latency", "Bit-width map"]
    assert all(p["ok"] and p["src"] == "data:image/png;base64," for p in v["plots"])
    # one row per layer; measured ticks and the arena offsets are the ones in report.json
    assert [row[0] for row in v["rows"]] == [lay["name"] for lay in report["layers"]]
    col = {h: i for i, h in enumerate(v["head"])}
    ticks = {lay["name"]: lay["ticks"] for lay in report["profile"]["layers"]}
    assert all(int(row[col["ticks"]].replace(",", "")) == ticks[row[0]] for row in v["rows"])
    offsets = {m["tensor"]: m["offset"] for m in report["memory"]}
    graph = hilc.load(out).graph
    for row, node in zip(v["rows"], graph.nodes, strict=True):
        assert row[col["arena offset"]].replace(",", "") == str(offsets[node.outputs[0]])
    shares = [float(row[col["share of time"]].strip().rstrip("%") or 0) for row in v["rows"]]
    assert abs(sum(shares) - 100.0) < 0.5
    assert shot.stat().st_size > 50_000
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / shot.name)
    shutil.copy(out / "report.html", ARTIFACTS / "report_resnet8.html")
    print(f"\nreport screenshot: {ARTIFACTS / shot.name}")


def test_report_renders_patch_fields_and_no_profile(tmp_path, digits):
    """Without a profile there is no latency plot; with a `patch` entry the memory plot and a
    table show the patch-based peak next to the layer-by-layer one."""
    from hilc.report_html.render import build_context

    out = tmp_path / "o"
    write_artifacts(out, compile_model(DIGITS_CNN, digits["x_train"][:64], target="c"))
    plain = build_context(out)
    assert [p[0] for p in plain["plots"]] == ["memory", "bits"] and plain["patch"] == []
    report = json.loads((out / "report.json").read_text())
    # the fields hilc.compiler.patches writes (a summary; per-patch windows are left out of the page)
    report["patch"] = {"split": "t3", "split_node": "conv2d_1", "split_index": 1, "grid": [2, 2],
                       "patches": [{"tile": [0, 7, 0, 7], "windows": {}}] * 4, "window_bytes": {"t3": 100},
                       "macs": 12345, "mac_overhead": 0.0425, "peak_sram_bytes_layerwise": report["peak_sram_bytes"],
                       "peak_sram_bytes": report["peak_sram_bytes"] // 3, "budget_bytes": None}
    report["accuracy"] = {"float": 0.9916, "int8": 0.9889}  # figures another step measured
    (out / "report.json").write_text(json.dumps(report))
    ctx = build_context(out)
    assert ("accuracy (int8)", "98.89%") in ctx["summary"]
    assert dict(ctx["patch"])["peak sram bytes layerwise"] == f"{report['peak_sram_bytes']:,}"
    assert dict(ctx["patch"])["macs"] == "12,345" and dict(ctx["patch"])["MAC overhead"] == "+4.2%"
    assert dict(ctx["patch"])["grid"] == "2×2" and "patches" not in dict(ctx["patch"])
    assert dict(ctx["plots"] and [(p[0], p[2]) for p in ctx["plots"]])["memory"] != dict(
        [(p[0], p[2]) for p in plain["plots"]])["memory"]
    path = hilc.report(out, accuracy={"digits accuracy": 0.9916})
    page = path.read_text()
    assert "Patch-based schedule" in page and "99.16%" in page and "<script" not in page
    assert page.count('<img class="plot"') == 2


def test_report_errors_are_one_line(tmp_path):
    r = hilc_cli("report", tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no report.json" in r.stderr
    (tmp_path / "report.json").write_text("{not json")
    r = hilc_cli("report", tmp_path)
    assert r.returncode == 2 and "unreadable report" in r.stderr


# --- Python API -------------------------------------------------------------------------------

def test_python_api_mirrors_the_cli(tmp_path, digits):
    x = digits["x_test"][:20]
    m = hilc.compile(DIGITS_CNN, tmp_path / "o", calib=digits["x_train"][:64], target="c")
    assert isinstance(m, hilc.Compiled) and m.report["target"] == "c" and "arena_bytes" in m.report
    assert json.loads((tmp_path / "o" / "report.json").read_text())["model_hash"] == m.report["model_hash"]
    np.save(tmp_path / "x.npy", x)
    assert hilc_cli("simulate", tmp_path / "o", tmp_path / "x.npy", "-o", tmp_path / "y.npy").returncode == 0
    assert np.array_equal(m.simulate(x), np.load(tmp_path / "y.npy"))
    assert np.array_equal(hilc.simulate(tmp_path / "o", x, raw=True), hilc.load(tmp_path / "o").simulate(x, raw=True))
    # options the API does not name go to compile_model unchanged; unknown ones are refused by it
    assert hilc.compile(DIGITS_CNN, calib=digits["x_train"][:64], flash_bytes=10**6, target="c").path is None
    with pytest.raises(TypeError):
        hilc.compile(DIGITS_CNN, calib=digits["x_train"][:64], no_such_option=1)
    with pytest.raises(HilcError, match="needs the compiled model on disk"):
        hilc.report(hilc.compile(DIGITS_CNN, calib=digits["x_train"][:64]))
    assert hilc.export_onnx(m, tmp_path / "m.onnx").exists()
    assert hilc.report(m).name == "report.html"
    assert hilc.inspect(AD01).macs == 264_192


@pytest.mark.slow
@needs_qemu
def test_python_api_run_and_profile_on_qemu(tmp_path, digits):
    m = hilc.compile(DIGITS_CNN, tmp_path / "o", calib=digits["x_train"][:64], board="qemu-mps2-an386")
    r = hilc.run(m, digits["x_test"][:4], board="qemu-mps2-an386", check=True)
    assert r.mismatches == 0 and np.array_equal(r.outputs, m.simulate(digits["x_test"][:4]))
    prof = hilc.profile(m, board="qemu-mps2-an386")
    assert m.report["profile"]["total_ticks"] == prof["total_ticks"] > 0


# --- progress -----------------------------------------------------------------------------------

def _run_in_pty(args: list[str]) -> str:
    """Run the CLI with its stdout and stderr on a pseudo-terminal; returns everything it wrote."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # child
        os.execvpe(sys.executable, [sys.executable, "-m", "hilc.cli", *args],
                   {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120", "TERM": "xterm"})
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode(errors="replace")


@needs_qemu
def test_progress_on_a_terminal_only_and_quiet_with_flag(tmp_path, digits):
    np.save(tmp_path / "calib.npy", digits["x_train"][:256])
    base = ["compile", str(DIGITS_CNN), "--calib", str(tmp_path / "calib.npy"), "--board", "qemu-mps2-an386"]
    tty = _run_in_pty([*base, "-o", str(tmp_path / "a")])
    assert "building firmware for qemu-mps2-an386" in tty and "summary:" in tty
    quiet = _run_in_pty([*base, "-o", str(tmp_path / "b"), "--quiet"])
    assert "building firmware" not in quiet and "calibrating" not in quiet and "summary:" not in quiet
    piped = hilc_cli(*base, "-o", tmp_path / "c")
    assert piped.returncode == 0 and "building firmware" not in piped.stderr + piped.stdout
    assert "\x1b[" not in piped.stderr
