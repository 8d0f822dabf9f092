"""Portable sub-byte kernels with an im2col column (the Cortex-M3 path): bit-exact on odd channel
counts, odd nibble offsets and word tails, and the column is allocated (and counted) only where
a portable build needs it."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import onnx
import pytest
from conftest import calibrated, float_onnx_model, host_vs_sim
from onnx import helper, numpy_helper

from hilc.compiler import mixed
from hilc.compiler.pipeline import compile_model, write_artifacts
from hilc.targets.c import build


def odd_model() -> onnx.ModelProto:
    """conv 3x3 (3 -> 5) -> relu -> conv 3x3 (5 -> 7, stride 2) -> relu -> gemm: a 5-channel map
    whose pixels start on odd nibbles when packed, reduction lengths 27, 45 and 63 (whole packed
    words plus a tail at 4 and 2 bits)."""
    rng = np.random.default_rng(7)

    def w(name, shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.4).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["f"]),
        helper.make_node("Gemm", ["f", "W3", "B3"], ["y"], transB=1),
    ]
    inits = [w("W1", (5, 3, 3, 3)), w("B1", (5,)), w("W2", (7, 5, 3, 3)), w("B2", (7,)), w("W3", (4, 63)),
             w("B3", (4,))]
    return float_onnx_model(nodes, inits, "odd", ["N", 3, 5, 5], ["N", 4])


@pytest.mark.parametrize("bits", [(4, 2, 4), (2, 4, 8), (8, 8, 2)])
def test_column_kernels_bit_exact_on_odd_shapes(bits, tmp_path):
    onnx.save(odd_model(), str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(2)
    calib = rng.uniform(-2, 2, (48, 3, 5, 5)).astype(np.float32)
    x = rng.uniform(-2.5, 2.5, (24, 3, 5, 5)).astype(np.float32)
    space = mixed.analyse(calibrated(tmp_path / "m.onnx", calib))
    wb = dict(zip([la.name for la in space.layers], bits, strict=True))
    ab = {r: 4 for r in space.roots}
    result, (portable, dsp), sim = host_vs_sim(tmp_path / "m.onnx", calib, x, tmp_path / "out", weight_bits=wb,
                                               act_bits=ab)
    assert any(t.dtype == "int4" and t.shape[-1] == 5 for t in result.graph.tensors.values())
    assert np.array_equal(portable, sim)
    assert np.array_equal(dsp, sim)


@pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None, reason="arm-none-eabi-gcc not installed")
def test_cortex_m3_allocates_the_column_the_planner_counts(tmp_path):
    onnx.save(odd_model(), str(tmp_path / "m.onnx"))
    calib = np.random.default_rng(3).uniform(-2, 2, (32, 3, 5, 5)).astype(np.float32)
    space = mixed.analyse(calibrated(tmp_path / "m.onnx", calib))
    sizes = {}
    for label, kw in (("int8", {}), ("sub", {"weight_bits": {space.layers[1].name: 4}})):
        r = compile_model(tmp_path / "m.onnx", calib, target="c", cpu="cortex-m3", **kw)
        write_artifacts(tmp_path / label, r)
        elf = tmp_path / label / "build" / "cortex-m3" / "firmware.elf"
        nm = subprocess.run(["arm-none-eabi-nm", "-S", str(elf)], capture_output=True, text=True, check=True).stdout
        sizes[label] = {ln.split()[-1]: int(ln.split()[1], 16) for ln in nm.splitlines() if len(ln.split()) == 4}
        # the planner counts the column (2 bytes per element of the longest reduction) in every build
        assert r.report["scratch_bytes"] == 2 * 63
        assert r.report["peak_sram_bytes"] >= r.report["arena_bytes"] + r.report["scratch_bytes"]
        assert build.forbidden_symbols(elf) == []
    # int8 conv/dense run the column kernels on the M3 too: every build really holds the counted column
    for label in ("int8", "sub"):
        assert sizes[label]["hilc_scratch"] == 2 * 63 and "hilc_conv2d_s8_col" in sizes[label]
