"""Calibration methods and the passes before quantization."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import RESNET8

from hilc.compiler import calibrate
from hilc.compiler.pipeline import compile_model
from hilc.sim.simulator import simulate


def test_minmax_ranges_cover_every_calibration_value(float_graph, crops32):
    g = calibrate.calibrate(float_graph, crops32[:32], "minmax")
    lo, hi = g.meta["calibration"]["input_1"]
    assert lo == crops32[:32].min() and hi == crops32[:32].max()


@pytest.mark.parametrize("method", ["percentile", "mse"])
def test_clipping_methods_narrow_the_range_and_still_work(method, float_graph, crops32):
    mm = calibrate.calibrate(float_graph, crops32[:64], "minmax").meta["calibration"]
    cl = calibrate.calibrate(float_graph, crops32[:64], method, percentile=99.9).meta["calibration"]
    assert set(mm) == set(cl)
    narrower = sum(cl[t][1] - cl[t][0] < mm[t][1] - mm[t][0] - 1e-9 for t in mm)
    assert narrower >= len(mm) // 2
    assert all(cl[t][0] >= mm[t][0] - 1e-6 and cl[t][1] <= mm[t][1] + 1e-6 for t in mm)
    y = simulate(compile_model(RESNET8, crops32[:64], method=method, percentile=99.9).graph, crops32[128:192])
    assert np.allclose(y.sum(axis=1), 1.0, atol=0.1)


def test_npz_with_one_array_is_accepted(tmp_path, crops32):
    np.savez(tmp_path / "c.npz", data=crops32[:8])
    assert calibrate.load_samples(tmp_path / "c.npz").shape == (8, 3, 32, 32)


def test_unknown_method(float_graph, crops32):
    from hilc.errors import HilcError

    with pytest.raises(HilcError, match="unknown calibration method"):
        calibrate.calibrate(float_graph, crops32[:4], "kl")


def test_fusion_leaves_no_clamp_in_resnet8(float_graph):
    assert not [n for n in float_graph.nodes if n.op == "clamp"]
    fused = [n.op for n in float_graph.nodes if n.attrs.get("act_lo") == 0.0]
    assert fused.count("conv2d") == 4 and fused.count("add") == 3  # every ReLU of the model


def test_graph_json_round_trip(tmp_path, crops32):
    from hilc.compiler.ir import Graph

    g = compile_model(RESNET8, crops32[:16]).graph
    g.save(tmp_path)
    g2 = Graph.load(tmp_path)
    x = crops32[200:210]
    assert np.array_equal(simulate(g, x, raw=True), simulate(g2, x, raw=True))
