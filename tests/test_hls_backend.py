"""FPGA backend: the generated Vitis-HLS design, C-simulated with g++ against the hls4ml wheel's ap_int /
hls_stream headers, must equal the simulator bit for bit; the design builds with -Wall -Wextra -Werror;
the Tcl script names the board's part and clock; bad input fails at compile time with the numbers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import AD01, DIGITS_CNN, RESNET8
from conftest import hilc_cli as hilc
from onnx import TensorProto, helper
from opmodels import OpCase, cases

from hilc.compiler import calibrate as calib_mod
from hilc.compiler import passes
from hilc.compiler.arith import quantize_host
from hilc.compiler.onnx_import import import_onnx
from hilc.compiler.pipeline import compile_model
from hilc.compiler.quantize import quantize
from hilc.errors import HilcError
from hilc.sim.simulator import run_int_batched, to_physical
from hilc.targets.hls import build, estimate
from hilc.targets.hls.codegen import generate_hls, write_hls_project


def quantized_graph(model, calib, weight_bits: int | None = None):
    """import -> float passes -> calibrate -> (weight_bits on conv/dense) -> quantize."""
    g = import_onnx(model)
    for p in passes.FLOAT_PIPELINE:
        g = p(g)
    g = calib_mod.calibrate(g, calib)
    if weight_bits is not None:
        for n in g.nodes:
            if n.op in ("conv2d", "dense"):
                n.attrs["weight_bits"] = weight_bits
    return quantize(g)


def int_inputs(g, x):
    q = g.tensors[g.inputs[0]].quant
    return quantize_host(to_physical(g, g.inputs[0], x), q.scale, q.zero_point, q.bits)


# --- every single-operator model, in one g++ build -------------------------------------------------

BUNDLE_MAIN = r"""
#include <cstdio>
#include <vector>
template <void (*TOP)(hls::stream<hilc_axis_t> &, hls::stream<hilc_axis_t> &)>
static int run(const char *in_path, const char *out_path, int in_size, int out_size) {
    std::vector<signed char> x;
    FILE *f = std::fopen(in_path, "rb");
    if (!f) return 2;
    signed char c;
    while (std::fread(&c, 1, 1, f) == 1) x.push_back(c);
    std::fclose(f);
    std::vector<signed char> y;
    for (size_t s = 0; s < x.size() / in_size; s++) {
        hls::stream<hilc_axis_t> in, out;
        for (int i = 0; i < in_size; i++) {
            hilc_axis_t b;
            b.data = x[s * in_size + i];
            b.keep = -1;
            b.strb = -1;
            b.last = i == in_size - 1;
            in.write(b);
        }
        TOP(in, out);
        for (int i = 0; i < out_size; i++) y.push_back((signed char)out.read().data.to_int());
        if (!out.empty()) return 3;
    }
    f = std::fopen(out_path, "wb");
    std::fwrite(y.data(), 1, y.size(), f);
    std::fclose(f);
    return 0;
}
int main() {
    int rc = 0;
%s
    return rc;
}
"""


def build_bundle(designs: dict[str, Path], work: Path) -> Path:
    """One executable holding several generated designs (each in its own namespace): the Xilinx
    headers are compiled once instead of once per design."""
    parts = ['#include "hilc_hls.h"']
    calls = []
    for i, (name, hls_dir) in enumerate(designs.items()):
        parts += ["#undef MODEL_INPUT_SIZE", "#undef MODEL_OUTPUT_SIZE", "#undef MODEL_HASH",
                  f"namespace d{i} {{", f'#include "{hls_dir / "model.cpp"}"',
                  "const int in_size = MODEL_INPUT_SIZE, out_size = MODEL_OUTPUT_SIZE;", "}"]
        calls.append(f'    rc |= run<d{i}::hilc_top>("{name}.in", "{name}.out", d{i}::in_size, d{i}::out_size);')
    (work / "bundle.cpp").write_text("\n".join(parts) + BUNDLE_MAIN % "\n".join(calls))
    (work / "hilc_hls.h").write_text((next(iter(designs.values())) / "hilc_hls.h").read_text())
    cmd = build.compile_command(work, "bundle")
    cmd[cmd.index("build/csim.cpp")] = "bundle.cpp"
    r = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[:3000]
    return work / "bundle"


def broadcast_cases() -> list[OpCase]:
    """A streamed operand broadcast against the other (buffered whole): squeeze-excitation and mean-centring."""
    shape = (1, 4, 5, 6)

    def model(nodes):
        g = helper.make_graph(nodes, "bc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape[1:]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *shape[1:]])])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
        m.ir_version = 8
        return m

    se = [helper.make_node("GlobalAveragePool", ["x"], ["m"]), helper.make_node("Sigmoid", ["m"], ["s"]),
          helper.make_node("Mul", ["x", "s"], ["y"])]
    centre = [helper.make_node("GlobalAveragePool", ["x"], ["m"]), helper.make_node("Sub", ["m", "x"], ["y"])]
    return [OpCase("se_mul_broadcast", model(se), shape), OpCase("sub_broadcast_first", model(centre), shape)]


@pytest.fixture(scope="module")
def op_bundle(tmp_path_factory):
    """Every single-operator model (plus 4-bit-weight variants of the conv/dense ones), its int8 inputs,
    the simulator's outputs and the C-simulated design's outputs."""
    work = tmp_path_factory.mktemp("hls_ops")
    designs, expect = {}, {}
    four_bit = {"conv3x3_c5_to_7", "depthwise_mult2_stride2", "conv_group3", "gemm_transB", "matmul_3d"}
    runs = [(c, None) for c in cases() + broadcast_cases()] + [(c, 4) for c in cases() if c.name in four_bit]
    for case, wbits in runs:
        name = f"{case.name}_w{wbits}" if wbits else case.name
        onnx.save(case.model, str(work / f"{name}.onnx"))
        g = quantized_graph(work / f"{name}.onnx", case.inputs(64, 0), wbits)
        qx = int_inputs(g, case.inputs(16, 1))
        write_hls_project(work / name, generate_hls(g, "pynq-z2"))
        designs[name] = work / name / "hls"
        (work / f"{name}.in").write_bytes(qx.tobytes())
        expect[name] = (len(qx), run_int_batched(g, qx).reshape(len(qx), -1), g)
    binary = build_bundle(designs, work)
    r = subprocess.run([str(binary)], cwd=work, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = {name: np.frombuffer((work / f"{name}.out").read_bytes(), np.int8).reshape(n, -1)
           for name, (n, _, _) in expect.items()}
    return expect, got


@pytest.mark.parametrize("case", [c.name for c in cases() + broadcast_cases()])
def test_single_operator_models_csim_bit_exact(case, op_bundle):
    expect, got = op_bundle
    n, sim, _ = expect[case]
    assert n >= 16
    assert np.array_equal(got[case], sim)


@pytest.mark.parametrize("case", ["conv3x3_c5_to_7_w4", "depthwise_mult2_stride2_w4", "conv_group3_w4",
                                  "gemm_transB_w4", "matmul_3d_w4"])
def test_four_bit_weights_csim_bit_exact_with_ap_int4_roms(case, op_bundle, tmp_path):
    expect, got = op_bundle
    n, sim, g = expect[case]
    assert np.array_equal(got[case], sim)
    w = [g.param(nd, "weight") for nd in g.nodes if nd.op in ("conv2d", "dense")]
    assert w and all(np.abs(x).max() <= 7 for x in w)  # really 4-bit values
    cpp = generate_hls(g, "pynq-z2").files["model.cpp"]
    assert "HILC_ROM(signed char, ap_int<4>)" in cpp and "const ap_int<4> wv" in cpp


# --- whole models: one build each, all inputs in one run --------------------------------------------

def csim_vs_sim(model, calib, x, out: Path, weight_bits=None, board="pynq-z2"):
    g = quantized_graph(model, calib, weight_bits)
    qx = int_inputs(g, x)
    design = generate_hls(g, board, tb_input=qx[:2])
    write_hls_project(out, design)
    sim = run_int_batched(g, qx).reshape(len(x), -1)
    return build.run_csim(out / "hls", qx.reshape(len(x), -1), sim.shape[1]), sim, design


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet8", "ad01", "digits", "resnet8_w4", "digits_transformer"])
def test_real_models_csim_bit_exact(name, tmp_path, crops32, digits):
    wbits = 4 if name.endswith("_w4") else None
    if name.startswith("resnet8"):
        model, calib, x = RESNET8, crops32[:64], crops32[128:148]
    elif name == "ad01":
        frames = np.load(AD01.parent / "ad01_toycar_normal_sample.npy").astype(np.float32)
        model, calib, x = AD01, frames, np.concatenate([frames[:16] * 0.9, frames[:4] * 1.1])
    elif name == "digits_transformer":
        model, calib, x = DIGITS_CNN.parent / "digits_transformer.onnx", digits["x_train"][:128], digits["x_test"][:16]
    else:
        model, calib, x = DIGITS_CNN, digits["x_train"][:128], digits["x_test"][:24]
    got, sim, design = csim_vs_sim(model, calib, x, tmp_path, wbits)
    assert len(sim) >= 16
    assert np.array_equal(got, sim)
    # The Vitis testbench, run as csim_design runs it (no arguments), checks itself against the simulator.
    r = subprocess.run([str(tmp_path / "hls" / "build" / "csim")], cwd=tmp_path / "hls", capture_output=True,
                       text=True)
    assert r.returncode == 0 and "0 output bytes differ" in r.stdout, r.stdout + r.stderr
    if name == "digits":  # the Makefile builds the same check without hilc
        r = subprocess.run(["make", "-C", str(tmp_path / "hls")], capture_output=True, text=True)
        assert r.returncode == 0 and "0 output bytes differ" in r.stdout, r.stdout + r.stderr


# --- the command line, boards, Tcl and the estimate --------------------------------------------------

@pytest.fixture(scope="module")
def cli_compiled(tmp_path_factory):
    """A conv + pool + dense model compiled with hilc compile --target hls --board kv260."""
    d = tmp_path_factory.mktemp("hls_cli")
    case = next(c for c in cases() if c.name == "conv_stride2_asym_pad")
    onnx.save(case.model, str(d / "m.onnx"))
    np.save(d / "calib.npy", case.inputs(64, 0))
    np.save(d / "x.npy", case.inputs(16, 1))
    r = hilc("compile", d / "m.onnx", "--calib", d / "calib.npy", "-o", d / "out", "--target", "hls",
             "--board", "kv260", "-q")
    assert r.returncode == 0, r.stderr
    return d


def test_compile_target_hls_writes_design_testbench_and_tcl_for_the_board(cli_compiled):
    hls = cli_compiled / "out" / "hls"
    assert {p.name for p in hls.iterdir()} >= {"model.cpp", "model.h", "hilc_hls.h", "testbench.cpp", "build.tcl",
                                               "tb_input.bin", "tb_expected.bin", "Makefile"}
    tcl = (hls / "build.tcl").read_text()
    assert "set_part {xck26-sfvc784-2LV-c}" in tcl
    assert "create_clock -period 5.0 " in tcl  # 200 MHz
    for step in ("csim_design", "csynth_design", "cosim_design", "export_design -format ip_catalog"):
        assert step in tcl
    cpp = (hls / "model.cpp").read_text()
    for pragma in ("HLS DATAFLOW", "HLS PIPELINE II=1", "HLS ARRAY_PARTITION", "HLS INTERFACE axis port=in",
                   "HLS INTERFACE axis port=out"):
        assert pragma in cpp
    assert "static " in cpp and "line[" in cpp  # the conv's line buffer
    code = "\n".join(ln.split("//")[0] for ln in cpp.splitlines() if not ln.lstrip().startswith(("/*", "*")))
    assert " / " not in code and " % " not in code  # no division on the inference path
    assert (hls / "tb_input.bin").stat().st_size == 4 * 3 * 10 * 9  # 4 calibration samples


def test_simulate_engine_hls_csim_equals_simulator_and_reuses_its_build(cli_compiled):
    d = cli_compiled
    r = hilc("simulate", d / "out", d / "x.npy", "--engine", "hls-csim", "--raw", "-o", d / "csim.npy")
    assert r.returncode == 0, r.stderr
    r = hilc("simulate", d / "out", d / "x.npy", "--raw", "-o", d / "sim.npy")
    assert r.returncode == 0, r.stderr
    a, b = np.load(d / "csim.npy"), np.load(d / "sim.npy")
    assert a.shape == b.shape and len(a) == 16 and np.array_equal(a, b)
    binary = d / "out" / "hls" / "build" / "csim"
    stamp = binary.stat().st_mtime_ns
    r = hilc("simulate", d / "out", d / "x.npy", "--engine", "hls-csim", "-o", d / "csim_f.npy")
    assert r.returncode == 0, r.stderr
    assert binary.stat().st_mtime_ns == stamp  # cached
    r = hilc("simulate", d / "out", d / "x.npy", "-o", d / "sim_f.npy")
    assert np.array_equal(np.load(d / "csim_f.npy"), np.load(d / "sim_f.npy"))
    from hilc import api

    x = np.load(d / "x.npy")
    assert np.array_equal(api.simulate(d / "out", x, raw=True, engine="hls-csim"), np.load(d / "csim.npy"))
    # the Vitis testbench's own check (csim_design runs it without arguments)
    r = subprocess.run([str(binary)], cwd=d / "out" / "hls", capture_output=True, text=True)
    assert r.returncode == 0 and "4 samples, 0 output bytes differ" in r.stdout, r.stdout + r.stderr


def test_report_has_a_per_layer_fpga_estimate_within_the_board(cli_compiled):
    report = json.loads((cli_compiled / "out" / "report.json").read_text())
    f = report["fpga"]
    assert f["estimate"] is True and "not a synthesis result" in f["note"]
    assert (f["board"], f["part"], f["clock_mhz"]) == ("kv260", "xck26-sfvc784-2LV-c", 200)
    conv = next(layer for layer in f["layers"] if layer["op"] == "conv2d")
    assert {"dsp", "bram18", "lut", "cycles", "pe", "simd"} <= set(conv)
    assert conv["simd"] in (1, 3) and conv["pe"] in (1, 2, 3, 6)
    assert f["interval_cycles"] == max(layer["cycles"] for layer in f["layers"])
    assert f["latency_cycles_upper_bound"] == sum(layer["cycles"] for layer in f["layers"])
    for k in ("dsp", "bram18", "lut"):
        assert f["total"][k] <= f["available"][k]


def test_default_parallelism_grows_the_bottleneck_within_the_budget(crops32):
    r = compile_model(RESNET8, crops32[:16], target="hls", board="pynq-z2")
    f = r.report["fpga"]
    assert f["total"]["dsp"] <= 0.8 * 220 and f["total"]["bram18"] <= 280
    tcl = r.hls_design.files["build.tcl"]
    assert "set_part {xc7z020clg400-1}" in tcl and "create_clock -period 10.0 " in tcl  # pynq-z2, 100 MHz
    assert max(layer.get("pe", 1) * layer.get("simd", 1) for layer in f["layers"]) >= 16
    big = compile_model(RESNET8, crops32[:16], target="hls", board="kv260").report["fpga"]
    assert big["interval_cycles"] < f["interval_cycles"]  # more DSPs, a faster design
    fixed = compile_model(RESNET8, crops32[:16], target="hls", board="pynq-z2", parallel={"conv2d_1": (4, 8)})
    row = next(layer for layer in fixed.report["fpga"]["layers"] if layer["name"] == "conv2d_1")
    assert (row["pe"], row["simd"]) == (4, 8)


def test_bram18_known_answers():
    assert estimate.bram18(1024, 18) == 1
    assert estimate.bram18(2048, 18) == 2
    assert estimate.bram18(4096, 4) == 1
    assert estimate.bram18(4096, 8) == 2
    assert estimate.bram18(100, 8) == 0  # 800 bits: LUTRAM
    assert estimate.bram18(16384, 8, partitions=4) == 8


def test_design_over_the_board_budget_is_refused_before_files_are_written(tmp_path, crops32):
    np.save(tmp_path / "calib.npy", crops32[:16])
    r = hilc("compile", RESNET8, "--calib", tmp_path / "calib.npy", "-o", tmp_path / "out", "--target", "hls",
             "--board", "pynq-z2", "--parallel", "conv2d_7=64x64")
    assert r.returncode == 2
    msg = r.stderr.strip()
    assert len(msg.splitlines()) == 1
    assert "does not fit pynq-z2" in msg and "220 DSP" in msg and "280 BRAM18" in msg
    assert "estimated" in msg and any(ch.isdigit() for ch in msg.split("estimated")[1].split("DSP")[0])
    assert not (tmp_path / "out").exists()
    r = hilc("compile", RESNET8, "--calib", tmp_path / "calib.npy", "-o", tmp_path / "out", "--target", "hls",
             "--parallel", "conv2d_7=5x1")
    assert r.returncode == 2 and "PE must divide" in r.stderr and "conv2d_7" in r.stderr
    r = hilc("compile", RESNET8, "--calib", tmp_path / "calib.npy", "-o", tmp_path / "out", "--target", "hls",
             "--parallel", "nosuch=1x1")
    assert r.returncode == 2 and "no conv2d/dense layer" in r.stderr
    assert not (tmp_path / "out").exists()


def test_operator_without_hls_lowering_is_named_at_compile_time(tmp_path, monkeypatch):
    from hilc.compiler.ops import OPS

    case = next(c for c in cases() if c.name == "softmax_last")
    onnx.save(case.model, str(tmp_path / "m.onnx"))
    monkeypatch.delattr(type(OPS["softmax"]), "lower_hls")  # falls back to Op.lower_hls
    msg = r"node '.*' \(softmax\): the HLS backend cannot lower it: no HLS lowering for operator 'softmax'"
    with pytest.raises(HilcError, match=msg) as e:
        compile_model(tmp_path / "m.onnx", case.inputs(8), target="hls")
    lowered = str(e.value).split("(lowered: ")[1].rstrip(")").split(", ")
    assert "\n" not in str(e.value) and "conv2d" in lowered and "layernorm" in lowered and "softmax" not in lowered


def test_both_operands_broadcast_is_refused_naming_the_node(tmp_path):
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["m"]),
             helper.make_node("Conv", ["x", "W"], ["c"], kernel_shape=[1, 1]),
             helper.make_node("Add", ["m", "c"], ["y"], name="add_outer")]
    g = helper.make_graph(nodes, "b", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])],
                          initializer=[onnx.numpy_helper.from_array(np.full((1, 3, 1, 1), 0.3, np.float32), "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "b.onnx"))
    np.save(tmp_path / "c.npy", np.random.default_rng(0).uniform(-1, 1, (8, 3, 4, 4)).astype(np.float32))
    r = hilc("compile", tmp_path / "b.onnx", "--calib", tmp_path / "c.npy", "-o", tmp_path / "o", "--target", "hls")
    assert r.returncode == 2
    assert "add_outer" in r.stderr and "both inputs" in r.stderr and "HLS backend cannot lower" in r.stderr
    assert not (tmp_path / "o").exists()


def test_boards_lists_fpga_boards_and_mcu_loader_still_works():
    from hilc.hil.boards import list_boards, load_board
    from hilc.targets.hls.boards import list_fpga_boards, load_fpga_board

    assert "qemu-mps2-an386" in {b.name for b in list_boards()}
    assert load_board("qemu-mps2-an386").cpu == "cortex-m4"
    fpga = {b.name: b for b in list_fpga_boards()}
    assert fpga["pynq-z2"].part == "xc7z020clg400-1" and fpga["pynq-z2"].dsp == 220
    assert fpga["kv260"].part == "xck26-sfvc784-2LV-c"
    with pytest.raises(HilcError, match="FPGA board"):
        load_board("pynq-z2")
    with pytest.raises(HilcError, match="MCU board"):
        load_fpga_board("qemu-mps2-an386")
    r = hilc("boards")
    assert r.returncode == 0 and "qemu-mps2-an386" in r.stdout
    assert "pynq-z2" in r.stdout and "xc7z020clg400-1" in r.stdout


def test_hls_csim_without_a_design_is_a_clean_error(tmp_path, crops32):
    np.save(tmp_path / "calib.npy", crops32[:8])
    np.save(tmp_path / "x.npy", crops32[8:10])
    assert hilc("compile", RESNET8, "--calib", tmp_path / "calib.npy", "-o", tmp_path / "o", "-q").returncode == 0
    r = hilc("simulate", tmp_path / "o", tmp_path / "x.npy", "--engine", "hls-csim", "-o", tmp_path / "y.npy")
    assert r.returncode == 2 and "no HLS design" in r.stderr and "--target hls" in r.stderr



@pytest.mark.slow
def test_qdq_model_csim_bit_exact(tmp_path, digits):
    from conftest import ort_quantize_qdq

    qdq = ort_quantize_qdq(DIGITS_CNN, tmp_path / "digits_qdq.onnx", digits["x_train"][:64])
    r = compile_model(qdq, None, target="hls")  # no calibration: the QDQ scales; testbench gets one zero-point sample
    write_hls_project(tmp_path, r.hls_design)
    x = digits["x_test"][:16]
    from hilc.sim.simulator import simulate

    assert np.array_equal(build.csim(tmp_path, r.graph, x, raw=True), simulate(r.graph, x, raw=True))


def test_target_hls_rejects_mcu_boards_and_cpu(tmp_path):
    case = next(c for c in cases() if c.name == "relu")
    onnx.save(case.model, str(tmp_path / "m.onnx"))
    with pytest.raises(HilcError, match="'qemu-mps2-an386' is an MCU board; --target hls needs an FPGA board"):
        compile_model(tmp_path / "m.onnx", case.inputs(8), target="hls", board="qemu-mps2-an386")
    with pytest.raises(HilcError, match="--cpu needs --target c"):
        compile_model(tmp_path / "m.onnx", case.inputs(8), target="hls", cpu="cortex-m4")
    with pytest.raises(HilcError, match="--patch schedules MCU memory"):
        compile_model(tmp_path / "m.onnx", case.inputs(8), target="hls", patch="auto")
    with pytest.raises(HilcError, match="unknown FPGA board 'zcu104'.*kv260, pynq-z2"):
        compile_model(tmp_path / "m.onnx", case.inputs(8), target="hls", board="zcu104")
