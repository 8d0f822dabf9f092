"""Operator order for memory (hilc/compiler/schedule.py): the order search finds the known best
order of a branchy block, never changes a bit of the results (simulator, host C under
sanitizers), and the pipeline and the patch planner use it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hilc.compiler.arith import quantize_host
from hilc.compiler.memory import plan_memory
from hilc.compiler.pipeline import compile_model, write_artifacts
from hilc.compiler.schedule import apply_order, live_peak, reorder_for_memory, search_order
from hilc.errors import HilcError
from hilc.sim.simulator import run_int, to_physical
from hilc.targets.c import build

H = W = 16


def two_branch_net() -> onnx.ModelProto:
    """stem (8 ch) -> two branches, each expand to 32 ch then project to 8 ch -> add. The file lists
    both expansions before both projections, so the import order holds two 32-channel tensors at
    once; running one branch to its end first holds one."""
    rng = np.random.default_rng(1)
    inits, nodes = [], []

    def conv(name: str, x: str, cin: int, cout: int, k: int = 1) -> str:
        w = rng.normal(0, 0.4, (cout, cin, k, k)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"{name}.w"))
        inits.append(numpy_helper.from_array(np.zeros(cout, np.float32), f"{name}.b"))
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], name=name,
                                      kernel_shape=[k, k], pads=[k // 2] * 4))
        return name

    conv("stem", "x", 4, 8, 3)
    conv("p1", "stem", 8, 32)
    conv("p2", "stem", 8, 32)
    conv("q1", "p1", 32, 8)
    conv("q2", "p2", 32, 8)
    nodes.append(helper.make_node("Add", ["q1", "q2"], ["y"], name="add"))
    graph = helper.make_graph(nodes, "two_branch", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                  [1, 4, H, W])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, H, W])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.fixture(scope="module")
def branchy(tmp_path_factory):
    d = tmp_path_factory.mktemp("branchy")
    onnx.save(two_branch_net(), str(d / "m.onnx"))
    calib = np.random.default_rng(0).uniform(-1, 1, (8, 4, H, W)).astype(np.float32)
    return d / "m.onnx", calib


def _qx(g, n: int = 4) -> np.ndarray:
    x = np.random.default_rng(3).uniform(-1.2, 1.2, (n, 4, H, W)).astype(np.float32)
    q = g.tensors[g.inputs[0]].quant
    return quantize_host(to_physical(g, g.inputs[0], x), q.scale, q.zero_point)


def test_search_finds_the_known_best_order(branchy):
    model, calib = branchy
    q = compile_model(model, calib, order="import").graph
    assert [n.op for n in q.nodes] == ["conv2d"] * 5 + ["add"]
    plane = H * W  # bytes of one int8 channel plane
    # import order: at p2's step stem + p1 + p2 are live (8 + 32 + 32 planes); at q1's p1 + p2 + q1
    assert live_peak(q) == 72 * plane == plan_memory(q).lower_bound
    found = search_order(q)
    assert found.exact and found.import_peak == 72 * plane
    # the best order runs one branch to its end: at q1's step stem + p1 + q1 = 48 planes, and at
    # p2's step stem + q1 + p2 = 48 planes; no order can go below (p1 needs stem + p1 + q1 at q1)
    assert found.peak == 48 * plane
    names = [q.nodes[i].onnx_name for i in found.order]
    assert names.index("q1") < names.index("p2") or names.index("q2") < names.index("p1")
    r = reorder_for_memory(q)
    assert r.meta["schedule"]["order"] == "memory" and r.meta["schedule"]["exact"]
    assert plan_memory(r).lower_bound == 48 * plane < plan_memory(q).lower_bound
    assert plan_memory(r).arena_bytes < plan_memory(q).arena_bytes
    # bit-exact: reordering moves only when tensors live
    qx = _qx(q)
    a = run_int(q, {q.inputs[0]: qx})[q.outputs[0]]
    b = run_int(r, {r.inputs[0]: qx})[r.outputs[0]]
    assert np.array_equal(a, b)


def test_a_chain_keeps_its_order_and_the_beam_still_gives_a_topological_order(branchy):
    model, calib = branchy
    q = compile_model(model, calib, order="import").graph
    chain = apply_order(q, [0, 1, 3, 2, 4, 5])  # already the best order
    r = reorder_for_memory(chain)
    assert r.meta["schedule"]["order"] == "import" and [n.name for n in r.nodes] == [n.name for n in chain.nodes]
    # a beam of one set per level is a greedy: still a valid order, possibly not the best
    found = search_order(q, beam=1)
    assert not found.exact and sorted(found.order) == list(range(len(q.nodes)))
    seen = set(q.inputs)
    for i in found.order:
        assert all(t in seen for t in q.nodes[i].inputs)
        seen |= set(q.nodes[i].outputs)
    # keeping a prefix fixed: the region after it is searched alone
    fixed = search_order(q, start=2)
    assert fixed.order[:2] == [0, 1] and fixed.peak == 48 * H * W


def test_reordered_c_is_bit_exact_and_report_shows_the_saving(branchy, tmp_path):
    model, calib = branchy
    ref = compile_model(model, calib, target="c", order="import")
    r = compile_model(model, calib, target="c")
    assert [n.name for n in r.graph.nodes] != [n.name for n in ref.graph.nodes]
    write_artifacts(tmp_path / "o", r)
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["schedule"]["order"] == "memory"
    assert rep["peak_sram_bytes_import_order"] == ref.report["peak_sram_bytes"] > rep["peak_sram_bytes"]
    # the generated code follows the chosen order: outputs bit-identical to the simulator's
    qx = _qx(r.graph)
    sim = run_int(ref.graph, {ref.graph.inputs[0]: qx})[ref.graph.outputs[0]].reshape(len(qx), -1)
    out = build.run_host(build.build_host(tmp_path / "o", sanitize=True), qx.reshape(len(qx), -1), sim.shape[1])
    assert np.array_equal(out, sim)
    # the generated code calls the kernels in the chosen order
    src = (tmp_path / "o" / "src" / "model.c").read_text()
    pos = [src.find(f"/* {n.name} */") for n in r.graph.nodes]
    assert min(pos) >= 0 and pos == sorted(pos)


def test_order_option_errors_are_one_line(branchy):
    model, calib = branchy
    with pytest.raises(HilcError, match="--order"):
        compile_model(model, calib, order="random")


def test_patch_planner_reorders_the_rest_after_the_split(branchy):
    from hilc.compiler import patches as P

    model, calib = branchy
    q = compile_model(model, calib, order="import").graph
    plain = P.plan_patches(q, "conv2d_0:2", reorder=False)
    better = P.plan_patches(q, "conv2d_0:2")
    pa, pb = plain.meta["patch"], better.meta["patch"]
    assert pa["split_index"] == pb["split_index"] == 0 and pb["stage"] == ["conv2d_0"]
    # the rest after the split holds stem + p1 + p2 in the import order, stem + p1 + q1 in the
    # memory order: 24 channel planes less
    la, lb = P.plan_patch_memory(plain).lower_bound, P.plan_patch_memory(better).lower_bound
    assert la - lb == 24 * H * W
    assert pb["peak_sram_bytes"] < pa["peak_sram_bytes"] == pb["peak_sram_bytes_import_order"]
    qx = _qx(q)
    ref = run_int(q, {q.inputs[0]: qx})[q.outputs[0]]
    assert np.array_equal(run_int(better, {better.inputs[0]: qx})[better.outputs[0]], ref)


def test_patched_and_reordered_c_is_bit_exact(branchy, tmp_path):
    model, calib = branchy
    ref = compile_model(model, calib, order="import").graph
    r = compile_model(model, calib, target="c", patch="conv2d_0:2")
    assert r.graph.meta["patch"] and r.graph.meta["schedule"]["order"] == "memory"
    write_artifacts(tmp_path / "o", r)
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["peak_sram_bytes"] < rep["peak_sram_bytes_import_order"]
    qx = _qx(ref)
    sim = run_int(ref, {ref.inputs[0]: qx})[ref.outputs[0]].reshape(len(qx), -1)
    for dsp in (False, True):
        out = build.run_host(build.build_host(tmp_path / "o", sanitize=True, dsp=dsp), qx.reshape(len(qx), -1),
                             sim.shape[1])
        assert np.array_equal(out, sim), f"dsp={dsp}"
