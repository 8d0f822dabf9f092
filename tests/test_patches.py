"""Patch-based scheduling (hilc/compiler/patches.py): receptive fields, bit-exact patched
execution in the simulator and in C, the memory plan, the scheduler and its errors."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from hilc.compiler import patches as P
from hilc.compiler.arith import quantize_host
from hilc.compiler.ir import Node
from hilc.compiler.memory import plan_memory
from hilc.compiler.pipeline import compile_model, write_artifacts
from hilc.errors import HilcError
from hilc.sim.simulator import run_int, to_physical
from hilc.targets.c import build

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from arch_models import GraphBuilder, mobilenet_v2  # noqa: E402

needs_arm = pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None, reason="arm-none-eabi-gcc not installed")
needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-arm") is None, reason="qemu-system-arm not installed")


def tiny_net(res: int = 40) -> onnx.ModelProto:
    """A small CNN whose first layers exercise every patchable case: strided stem, max pooling,
    a residual inverted block (expand, depthwise, project, add), a dilated conv with asymmetric
    pads and an odd output size, a LeakyRelu table, a 5x5 stride-2 depthwise block."""
    g = GraphBuilder(3, res, seed=3)
    g.conv("stem", 8, k=3, stride=2, relu6=True)  # 20x20
    g.nodes.append(helper.make_node("MaxPool", [g.x], ["mp"], name="mp", kernel_shape=[3, 3], strides=[1, 1],
                                    pads=[1, 1, 1, 1]))
    g.x = "mp"
    g.inverted_residual("b0", 8, 3, 1, 3)
    w = g.rng.normal(0, 0.3, (8, 8, 3, 3))
    g.nodes.append(helper.make_node("Conv", [g.x, g._param("dil.weight", w), g._param("dil.bias", np.zeros(8))],
                                    ["dil"], name="dil", kernel_shape=[3, 3], dilations=[2, 2], pads=[2, 1, 1, 2]))
    g.nodes.append(helper.make_node("LeakyRelu", ["dil"], ["lrelu"], name="lrelu", alpha=0.1))  # 19x19
    g.x = "lrelu"
    g.inverted_residual("b1", 16, 5, 2, 4)  # 10x10
    g.inverted_residual("b2", 16, 3, 1, 4)  # residual; its depthwise runs in place after a split
    g.conv("last", 32, relu6=True)
    return g.model("tiny_patch_net", 10)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, np.ndarray, object]:
    d = tmp_path_factory.mktemp("tiny")
    onnx.save(tiny_net(), str(d / "tiny.onnx"))
    rng = np.random.default_rng(0)
    calib = rng.uniform(-1, 1, (16, 3, 40, 40)).astype(np.float32)
    q = compile_model(d / "tiny.onnx", calib).graph
    return d / "tiny.onnx", calib, q


def _qx(g, n: int = 3, seed: int = 5) -> np.ndarray:
    x = np.random.default_rng(seed).uniform(-1.2, 1.2, (n, 3, 40, 40)).astype(np.float32)
    q = g.tensors[g.inputs[0]].quant
    return quantize_host(to_physical(g, g.inputs[0], x), q.scale, q.zero_point)


def test_window_need_known_answers():
    node = Node("c", "conv2d", ["x"], ["y"], {"kernel": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                                               "dilations": [1, 1], "group": 1})
    # output rows 0..3 of a 3x3/2 pad-1 conv on 16 rows read rows -1..7: clipped 0..7, 1 row of top pad
    assert P.window_need(node, (0, 4, 4, 8), 16, 16) == ((0, 8, 7, 16), [1, 0, 0, 0])
    node.attrs.update(dilations=[2, 2], pads=[2, 1, 1, 2], strides=[1, 1])
    # dilated: rows 17..18 of a 19-row output read rows 15..20 (row 20 is below the 20-row image)
    assert P.window_need(node, (17, 19, 0, 1), 20, 20) == ((15, 20, 0, 4), [0, 1, 1, 0])


def test_split_points_cover_residual_blocks_and_stop_at_global_ops(tiny):
    _, _, q = tiny
    ks = P.split_points(q)
    ops = [q.nodes[k].op for k in ks]
    assert "add" in ops and "maxpool" in ops and "lut" not in ops  # a table never ends the stage
    # never split inside a residual block: the block input would leave the stage too
    for k in ks:
        later = {t for n in q.nodes[k + 1:] for t in n.inputs}
        produced = {t for n in q.nodes[: k + 1] for t in n.outputs}
        assert later & (produced | set(q.inputs)) == {q.nodes[k].outputs[0]}
    assert all(n.op not in ("avgpool", "dense") for n in q.nodes[: max(ks) + 1])


def test_every_split_and_grid_is_bit_exact_in_the_simulator(tiny):
    _, _, q = tiny
    qx = _qx(q)
    ref = run_int(q, {q.inputs[0]: qx})[q.outputs[0]]
    macs_lw = sum(P._layer_macs(q))
    checked = 0
    for k in P.split_points(q):
        _, h, w, _ = q.tensors[q.nodes[k].outputs[0]].shape
        for n in (1, 2, 3, 4):
            if n > min(h, w):
                continue
            g = P.plan_patches(q, f"{q.nodes[k].name}:{n}")
            p = g.meta["patch"]
            out = run_int(g, {g.inputs[0]: qx})[g.outputs[0]]
            assert np.array_equal(out, ref), (q.nodes[k].name, n)
            assert p["macs_layerwise"] == macs_lw
            assert p["macs"] == macs_lw if n == 1 else p["macs"] >= macs_lw
            tiles = [t["tile"] for t in p["patches"]]
            assert sum((t[1] - t[0]) * (t[3] - t[2]) for t in tiles) == h * w  # the tiles cover the split tensor
            checked += 1
    assert checked > 20


def _check_no_overlap(g, plan) -> None:
    """Independent check: no two entries live at the same step share bytes (unless one is
    written in place over the other)."""
    entries = sorted(plan.offsets)
    size = {t: P.arena_tensor_bytes(g, t) for t in entries}
    for i, a in enumerate(entries):
        for b in entries[i + 1:]:
            (s0, e0), (s1, e1) = plan.lifetimes[a], plan.lifetimes[b]
            if s0 > e1 or s1 > e0 or plan.inplace.get(a) == b or plan.inplace.get(b) == a:
                continue
            oa, ob = plan.offsets[a], plan.offsets[b]
            assert oa + size[a] <= ob or ob + size[b] <= oa, f"{a} and {b} overlap"
            assert max(oa + size[a], ob + size[b]) <= plan.arena_bytes


def test_patched_memory_plan_counts_one_patch_and_the_split_tensor(tiny):
    _, _, q = tiny
    g = P.plan_patches(q, "add_0:4")
    plan = P.plan_patch_memory(g)
    _check_no_overlap(g, plan)
    p = g.meta["patch"]
    assert plan.offsets[p["split"]] is not None and all(P.window_name(t) in plan.offsets for t in p["window_bytes"])
    assert p["peak_sram_bytes"] == plan.peak_sram_bytes + P.scratch_bytes(q)
    assert p["peak_sram_bytes"] < p["peak_sram_bytes_layerwise"]
    # in-place depthwise after the stage: b2's stride-1 depthwise writes over its input
    dw = [n for n in q.nodes[p["split_index"] + 1:] if n.op == "conv2d" and n.attrs["group"] > 1
          and q.tensors[n.inputs[0]].shape == q.tensors[n.outputs[0]].shape]
    assert dw and all(plan.inplace.get(n.outputs[0]) == n.inputs[0] for n in dw)
    lw = plan_memory(q)
    assert not any(n.outputs[0] in lw.inplace for n in dw)  # the layer-by-layer plan is unchanged


@pytest.mark.parametrize("mode", ["add_0:3", "add_1:2", "auto"])
def test_patched_c_is_bit_exact_with_the_simulator_under_sanitizers(tiny, tmp_path, mode):
    model, calib, q = tiny
    r = compile_model(model, calib, target="c", patch=mode)
    assert r.graph.meta["patch"]
    write_artifacts(tmp_path / "o", r)
    g = r.graph
    qx = _qx(g, 4, 7)
    ref = run_int(q, {q.inputs[0]: qx})[q.outputs[0]].reshape(len(qx), -1)
    sim = run_int(g, {g.inputs[0]: qx})[g.outputs[0]].reshape(len(qx), -1)
    assert np.array_equal(sim, ref)
    for dsp in (False, True):
        out = build.run_host(build.build_host(tmp_path / "o", sanitize=True, dsp=dsp), qx.reshape(len(qx), -1),
                             sim.shape[1])
        assert np.array_equal(out, sim), f"dsp={dsp}"
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["peak_sram_bytes"] == rep["arena_bytes"] + rep["io_bytes"] + rep["scratch_bytes"]
    assert rep["peak_sram_bytes"] == g.meta["patch"]["peak_sram_bytes"]
    assert rep["macs"] == g.meta["patch"]["macs"] and rep["macs_layerwise"] == sum(P._layer_macs(q))
    assert rep["patch"]["grid"][0] >= 2 and rep["patch"]["patches"][0]["windows"]


def test_auto_meets_the_budget_with_the_fewest_macs(tiny):
    _, _, q = tiny
    lw = plan_memory(q).peak_sram_bytes + P.scratch_bytes(q)
    assert P.plan_patches(q, "auto", lw) is q  # layer by layer fits: nothing to do
    free = P.plan_patches(q, "auto")  # no budget: the lowest peak
    low = free.meta["patch"]["peak_sram_bytes"]
    assert low < lw
    budget = (low + lw) // 2
    g = P.plan_patches(q, "auto", budget)
    p = g.meta["patch"]
    assert p["peak_sram_bytes"] <= budget and p["headroom_bytes"] == budget - p["peak_sram_bytes"]
    assert p["layerwise_over_budget_bytes"] == lw - budget
    # brute force: no other schedule that fits has fewer MACs
    scratch = P.scratch_bytes(q)
    for k in P.split_points(q):
        _, h, w, _ = q.tensors[q.nodes[k].outputs[0]].shape
        for n in range(2, min(8, h, w) + 1):
            c = P.build_candidate(q, k, n)
            if c.macs < p["macs"]:
                assert P._full_peak(q, c, scratch) > budget
    with pytest.raises(HilcError, match=rf"no schedule fits {low - 1} bytes.*smallest peak hilc can reach is {low} "):
        P.plan_patches(q, "auto", low - 1)


def test_patch_option_errors_are_one_line(tiny, tmp_path):
    model, calib, q = tiny
    with pytest.raises(HilcError, match="expected auto, off or SPLIT:N"):
        compile_model(model, calib, patch="sometimes")
    with pytest.raises(HilcError, match="no node or tensor named 'nope'"):
        P.plan_patches(q, "nope:2")
    inside = next(n.name for i, n in enumerate(q.nodes) if i not in P.split_points(q) and n.op == "conv2d")
    with pytest.raises(HilcError, match=f"cannot split after node {inside}.*valid split nodes: conv2d_0"):
        P.plan_patches(q, f"{inside}:2")
    with pytest.raises(HilcError, match="a 30x30 grid does not fit the 20x20 split tensor"):
        P.plan_patches(q, "conv2d_0:30")
    np.save(tmp_path / "c.npy", calib)
    from hilc.cli import main

    assert main(["compile", str(model), "--calib", str(tmp_path / "c.npy"), "-o", str(tmp_path / "o"),
                 "--patch", "auto", "--sram", "1000", "-q"]) == 2
    assert not (tmp_path / "o").exists()
    assert main(["compile", str(model), "--calib", str(tmp_path / "c.npy"), "-o", str(tmp_path / "o"),
                 "--patch", "add_0:2", "--dump-after", "plan_patches", "-q"]) == 0
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["patch"]["split_node"] == "add_0" and rep["patch"]["grid"] == [2, 2]
    assert len(rep["patch"]["patches"]) == 4 and rep["peak_sram_bytes_layerwise"] > rep["peak_sram_bytes"]
    # hilc simulate follows the schedule stored in graph.json: same bits as the layer-by-layer build
    assert main(["compile", str(model), "--calib", str(tmp_path / "c.npy"), "-o", str(tmp_path / "lw"), "-q"]) == 0
    np.save(tmp_path / "x.npy", calib[:5] * 1.1)
    for o in ("o", "lw"):
        assert main(["simulate", str(tmp_path / o), str(tmp_path / "x.npy"), "-o", str(tmp_path / f"{o}.npy"),
                     "--raw", "-q"]) == 0
    assert np.array_equal(np.load(tmp_path / "o.npy"), np.load(tmp_path / "lw.npy"))


def test_mobilenet_v2_1_0_mcunet_count_and_planner_time(tmp_path):
    """MCUNetV2's count on MobileNetV2 1.0/224: 1372 kB layer by layer; the planner is quick."""
    onnx.save(mobilenet_v2(1.0, 224, num_classes=10), str(tmp_path / "m.onnx"))
    calib = np.random.default_rng(0).uniform(0, 1, (1, 3, 224, 224)).astype(np.float32)
    q = compile_model(tmp_path / "m.onnx", calib).graph
    assert P.mcunet_peak(q) == 112 * 112 * 16 + 112 * 112 * 96  # b1's expand conv: 1372 kB
    g = P.plan_patches(q, "conv2d_11:4")  # split after block 3 (28x28x32), 4x4 patches
    p = g.meta["patch"]
    assert p["mcunet_peak_bytes"] * 6 <= p["mcunet_peak_bytes_layerwise"]
    assert p["mac_overhead"] <= 0.15
    assert p["planner_seconds"] < 30


@pytest.mark.slow
@needs_arm
def test_mobilenet_v2_035_fits_nucleo_f446re_only_with_patches(tmp_path):
    onnx.save(mobilenet_v2(0.35, 144, num_classes=10), str(tmp_path / "m.onnx"))
    calib = np.random.default_rng(0).uniform(0, 1, (2, 3, 144, 144)).astype(np.float32)
    with pytest.raises(HilcError, match=r"needs \d+ bytes of SRAM .*nucleo-f446re has 131072 \(try --patch auto\)"):
        compile_model(tmp_path / "m.onnx", calib, board="nucleo-f446re")
    r = compile_model(tmp_path / "m.onnx", calib, board="nucleo-f446re", patch="auto")
    write_artifacts(tmp_path / "o", r)  # the firmware links in the board's SRAM
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert build.forbidden_symbols(tmp_path / "o" / "build" / "nucleo-f446re" / "firmware.elf") == []
    p = rep["patch"]
    assert p["layerwise_over_budget_bytes"] > 0 and p["headroom_bytes"] >= 0
    assert rep["peak_sram_bytes"] + rep["firmware_ram_reserve_bytes"] <= 131072 < rep["peak_sram_bytes_layerwise"]


@pytest.mark.slow
@needs_arm
@needs_qemu
def test_patched_model_on_qemu_bit_exact_and_profiled(tiny, tmp_path, capsys):
    from hilc.cli import main

    model, calib, _ = tiny
    np.save(tmp_path / "c.npy", calib)
    x = np.random.default_rng(9).uniform(-1.2, 1.2, (4, 3, 40, 40)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    outs = {}
    for mode in ("off", "add_0:3"):
        o = tmp_path / mode.replace(":", "_")
        assert main(["compile", str(model), "--calib", str(tmp_path / "c.npy"), "-o", str(o), "--board",
                     "qemu-mps2-an386", "--patch", mode, "-q"]) == 0
        assert main(["run", str(o), str(tmp_path / "x.npy"), "--board", "qemu-mps2-an386", "-o",
                     str(tmp_path / f"{mode[:3]}.npy"), "--check", "--raw"]) == 0
        assert "4/4 outputs bit-exact" in capsys.readouterr().out
        outs[mode] = np.load(tmp_path / f"{mode[:3]}.npy")
    assert np.array_equal(outs["off"], outs["add_0:3"])  # patched board == its layer-by-layer build
    o = tmp_path / "add_0_3"
    assert main(["profile", str(o), "--board", "qemu-mps2-an386"]) == 0
    text = capsys.readouterr().out
    assert "measured" in text and "MACs predicted" in text
    prof = json.loads((o / "report.json").read_text())["profile"]["patch"]
    assert prof["unit"] == "instructions" and prof["patched"] > 0 and prof["layerwise"] > 0
    assert prof["stage_ticks_patched"] > 0 and prof["stage_ticks_layerwise"] > 0
    assert prof["stage_predicted_mac_overhead"] > 0
    assert prof["predicted_mac_overhead"] == json.loads((o / "report.json").read_text())["patch"]["mac_overhead"]
