"""A mixed-precision build (2-, 4- and 8-bit weights, 4-bit activations packed in the arena)
through the other engines: the TVM module and the HLS C-simulation give the simulator's bits."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import calibrated
from test_mixed import chain_model

from hilc.compiler import mixed
from hilc.compiler.pipeline import compile_model, write_artifacts
from hilc.sim.simulator import simulate
from hilc.targets.hls.build import csim


def test_mixed_build_bit_exact_in_tvm_and_hls_csim(tmp_path):
    onnx.save(chain_model(), str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(1)
    calib = rng.uniform(-2, 2, (64, 3, 7, 9)).astype(np.float32)
    x = rng.uniform(-2.5, 2.5, (40, 3, 7, 9)).astype(np.float32)  # past the calibrated range: clamps hit
    space = mixed.analyse(calibrated(tmp_path / "m.onnx", calib))
    weight_bits = dict(zip([la.name for la in space.layers], (2, 4, 8, 4), strict=True))
    act_bits = {r: 4 for r in space.roots}
    result = compile_model(tmp_path / "m.onnx", calib, target="hls", weight_bits=weight_bits, act_bits=act_bits)
    g = result.graph
    assert sorted({g.tensors[r].quant.bits for r in space.roots}) == [4]
    assert sorted(n.attrs["weight_bits"] for n in g.nodes if "weight_bits" in n.attrs) == [2, 4, 4, 8]
    write_artifacts(tmp_path / "out", result)
    sim = simulate(g, x, raw=True)
    assert np.array_equal(simulate(g, x, raw=True, engine="tvm"), sim)
    assert np.array_equal(csim(tmp_path / "out", g, x, raw=True), sim)
