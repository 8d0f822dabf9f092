"""Static memory planner: arena packing near the lower bound, no overlap of live buffers, in-place reuse."""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
from conftest import AD01, DATA, RESNET8
from onnx import TensorProto, helper, numpy_helper

from hilc.compiler.ir import Graph, Node, QParams, Tensor
from hilc.compiler.memory import MemoryPlan, plan_memory, tensor_bytes
from hilc.compiler.ops.base import OPS
from hilc.compiler.pipeline import compile_model

# --- an independent verifier ---------------------------------------------------------------


def _lifetimes(graph: Graph) -> dict[str, tuple[int, int]]:
    """Producer step .. last consumer step (graph outputs: len(nodes)), computed from scratch."""
    life = {}
    for i, node in enumerate(graph.nodes):
        for t in node.outputs:
            uses = [j for j, n in enumerate(graph.nodes) if t in n.inputs]
            last = len(graph.nodes) if t in graph.outputs else max(uses, default=i)
            life[t] = (i, last)
    return life


def verify_plan(graph: Graph, plan: MemoryPlan, align: int = 4) -> None:
    life = _lifetimes(graph)
    assert plan.lifetimes == life
    # Every non-input tensor is placed, aligned, inside the arena; graph inputs are not placed.
    arena_tensors = {t for n in graph.nodes for t in n.outputs}
    assert set(plan.offsets) == arena_tensors
    assert not set(graph.inputs) & set(plan.offsets)
    assert plan.arena_bytes % align == 0
    size = {t: tensor_bytes(graph, t) for t in arena_tensors}
    for t, off in plan.offsets.items():
        assert off >= 0 and off % align == 0, (t, off)
        assert off + size[t] <= plan.arena_bytes, t
    # In-place pairs are legal: the op allows it, the buffer is the first input's, same size,
    # and the input dies at the very node that writes the output.
    producer = {t: (i, n) for i, n in enumerate(graph.nodes) for t in n.outputs}
    for out, src in plan.inplace.items():
        step, node = producer[out]
        assert OPS[node.op].inplace_ok and node.inputs[0] == src and node.outputs[0] == out
        assert src not in graph.inputs and size[src] == size[out]
        assert life[src][1] == step and plan.offsets[out] == plan.offsets[src]
    # No two tensors alive at the same step share bytes, except an in-place handoff.
    names = sorted(arena_tensors)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if life[a][1] < life[b][0] or life[b][1] < life[a][0]:
                continue
            if plan.offsets[a] + size[a] <= plan.offsets[b] or plan.offsets[b] + size[b] <= plan.offsets[a]:
                continue
            assert plan.inplace.get(b) == a or plan.inplace.get(a) == b, f"{a} and {b} overlap while both live"
    # The lower bound: peak live bytes, an in-place handoff counted once.
    steps = len(graph.nodes) + 1
    live = [sum(size[t] for t in arena_tensors if life[t][0] <= s <= life[t][1])
            - sum(size[o] for o, src in plan.inplace.items() if life[o][0] == s) for s in range(steps)]
    assert plan.lower_bound == max(live, default=0)
    assert plan.lower_bound <= plan.arena_bytes
    assert plan.input_bytes == sum(tensor_bytes(graph, t) for t in graph.inputs)
    assert plan.output_bytes == sum(tensor_bytes(graph, t) for t in graph.outputs)
    assert plan.peak_sram_bytes == plan.arena_bytes + plan.input_bytes + plan.output_bytes


# --- models --------------------------------------------------------------------------------


def mobilenetv2_like(seed: int = 0, hw: int = 64, stem: int = 16,
                     blocks: tuple[tuple[int, int], ...] = ((16, 1), (24, 2), (24, 1), (32, 2))) -> onnx.ModelProto:
    """A small MobileNetV2: stem conv s2 + ReLU6, inverted residual blocks (expand x6 + ReLU6, depthwise
    3x3 + ReLU6, linear projection, residual Add where the shape allows), GAP, Flatten, Gemm to 10."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def weight(name: str, shape: tuple[int, ...]) -> str:
        fan_in = int(np.prod(shape[1:]))
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name))
        return name

    inits += [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
              numpy_helper.from_array(np.array(6.0, np.float32), "six")]

    def conv(x: str, name: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1,
             relu6: bool = True) -> str:
        w = weight(f"{name}.w", (cout, cin // group, k, k))
        b = weight(f"{name}.b", (cout,))
        y = f"{name}.conv" if relu6 else name
        nodes.append(helper.make_node("Conv", [x, w, b], [y], kernel_shape=[k, k], strides=[stride, stride],
                                      pads=[k // 2] * 4, group=group))
        if relu6:
            nodes.append(helper.make_node("Clip", [y, "zero", "six"], [name]))
        return name

    x = conv("x", "stem", 3, stem, 3, stride=2)
    c = stem
    for i, (cout, stride) in enumerate(blocks):
        h = conv(x, f"b{i}.expand", c, 6 * c, 1)
        h = conv(h, f"b{i}.dw", 6 * c, 6 * c, 3, stride=stride, group=6 * c)
        h = conv(h, f"b{i}.project", 6 * c, cout, 1, relu6=False)
        if stride == 1 and cout == c:
            nodes.append(helper.make_node("Add", [x, h], [f"b{i}.add"]))
            h = f"b{i}.add"
        x, c = h, cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], axis=1))
    nodes.append(helper.make_node("Gemm", ["flat", weight("fc.w", (10, c)), weight("fc.b", (10,))], ["y"],
                                  transB=1))
    g = helper.make_graph(nodes, "mobilenetv2_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                    [1, 3, hw, hw])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def maxpool_relu() -> onnx.ModelProto:
    """Conv -> MaxPool -> Relu -> Conv: the Relu after a pool stays a standalone clamp."""
    rng = np.random.default_rng(1)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32) * 0.3, "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c1"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Relu", ["p"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], kernel_shape=[1, 1])]
    g = helper.make_graph(nodes, "maxpool_relu", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
                          initializer=[w1, w2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, Graph]:
    rng = np.random.default_rng(0)
    mnv2 = tmp_path_factory.mktemp("mem") / "mobilenetv2_like.onnx"
    onnx.save(mobilenetv2_like(), str(mnv2))
    return {
        "resnet8": compile_model(RESNET8, np.load(DATA / "natural_crops.npz")["crops32"][:16]
                                 .astype(np.float32)).graph,
        "ad01": compile_model(AD01, np.load(DATA / "ad01_toycar_normal_sample.npy")).graph,
        "mobilenetv2": compile_model(mnv2, rng.uniform(0, 1, (8, 3, 64, 64)).astype(np.float32)).graph,
    }


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["resnet8", "ad01", "mobilenetv2"])
def test_plan_is_valid_and_near_lower_bound(compiled, model):
    g = compiled[model]
    t0 = time.perf_counter()
    plan = plan_memory(g)
    assert time.perf_counter() - t0 < 0.5
    verify_plan(g, plan)
    assert plan.arena_bytes <= 1.05 * plan.lower_bound, (plan.arena_bytes, plan.lower_bound)


@pytest.mark.parametrize("model", ["resnet8", "mobilenetv2"])
@pytest.mark.parametrize("align", [1, 16])
def test_plan_without_inplace_and_other_alignments(compiled, model, align):
    g = compiled[model]
    plan = plan_memory(g, align=align, inplace=False)
    assert plan.inplace == {}
    verify_plan(g, plan, align)
    assert plan.arena_bytes >= plan_memory(g, align=align).lower_bound


def test_mobilenetv2_residual_adds_reuse_a_buffer(compiled):
    g = compiled["mobilenetv2"]
    plan = plan_memory(g)
    adds = [n for n in g.nodes if n.op == "add"]
    assert len(adds) == 2
    # The block's input is the add's first input and lives on until the add: it is reused.
    for n in adds:
        assert plan.inplace.get(n.outputs[0]) == n.inputs[0]
        assert plan.offsets[n.outputs[0]] == plan.offsets[n.inputs[0]]


def _chain(sizes: list[int], name: str = "chain") -> Graph:
    """x -> t0 -> t1 -> ... through non-in-place ops (dense), with 1-D int8 tensors of the given sizes."""
    g = Graph(name, inputs=["x"], outputs=[f"t{len(sizes) - 1}"])
    q = QParams(0.1, 0)
    g.tensors["x"] = Tensor("x", (1, 8), "int8", q)
    prev = "x"
    for i, s in enumerate(sizes):
        t = f"t{i}"
        g.tensors[t] = Tensor(t, (1, s), "int8", q)
        g.nodes.append(Node(f"n{i}", "dense", [prev], [t]))
        prev = t
    return g


def test_hand_made_chain_exact():
    # x -> a(100) -> b(50) -> c(100): a and b live together, then b and c; a and c share bytes.
    g = _chain([100, 50, 100])
    plan = plan_memory(g)
    verify_plan(g, plan)
    assert plan.lifetimes == {"t0": (0, 1), "t1": (1, 2), "t2": (2, 3)}
    assert plan.lower_bound == 150 and plan.arena_bytes == 152  # 150 rounded up to align 4
    assert plan.offsets == {"t0": 0, "t2": 0, "t1": 100}
    assert plan.input_bytes == 8 and plan.output_bytes == 100 and plan.peak_sram_bytes == 260
    plan1 = plan_memory(g, align=1)
    assert plan1.lower_bound == 150 and plan1.arena_bytes == 150


def test_hand_made_branches_and_dead_tensor():
    # x -> a(64); a -> b(32) (dead: never read, not an output); a -> c(16); add(c, c) -> d output.
    q = QParams(0.1, 0)
    g = Graph("branches", inputs=["x"], outputs=["d"])
    for t, s in [("x", 8), ("a", 64), ("b", 32), ("c", 16), ("d", 16)]:
        g.tensors[t] = Tensor(t, (1, s), "int8", q)
    g.nodes = [Node("n0", "dense", ["x"], ["a"]), Node("n1", "dense", ["a"], ["b"]),
               Node("n2", "dense", ["a"], ["c"]), Node("n3", "add", ["c", "c"], ["d"])]
    plan = plan_memory(g)
    verify_plan(g, plan)
    assert plan.lifetimes == {"a": (0, 2), "b": (1, 1), "c": (2, 3), "d": (3, 4)}
    assert plan.inplace == {"d": "c"}
    assert plan.lower_bound == 96 and plan.arena_bytes == 96
    assert plan.offsets["d"] == plan.offsets["c"]


def test_tensor_bytes_excludes_batch_and_counts_dtype():
    g = Graph("t")
    g.tensors["a"] = Tensor("a", (1, 4, 5, 3), "int8")
    g.tensors["b"] = Tensor("b", (7, 10), "int32")
    g.tensors["c"] = Tensor("c", (1, 6), "float32")
    assert [tensor_bytes(g, t) for t in "abc"] == [60, 40, 24]


def test_inplace_requires_arena_input_that_dies_here_with_the_same_size():
    q = QParams(0.1, 0)
    g = Graph("g", inputs=["x"], outputs=["r", "s"])
    for t, s in [("x", 8), ("x2", 8), ("a", 40), ("r", 40), ("b", 40), ("s", 10)]:
        g.tensors[t] = Tensor(t, (1, s), "int8", q)
    g.nodes = [Node("n0", "dense", ["x"], ["a"]),
               Node("n1", "clamp", ["x"], ["x2"]),  # a graph input: never reused
               Node("n2", "clamp", ["a"], ["r"]),  # a is still read by n3: no reuse
               Node("n3", "dense", ["a"], ["b"]),  # not an in-place op
               Node("n4", "reshape", ["b"], ["s"])]  # b dies here but the sizes differ
    plan = plan_memory(g)
    verify_plan(g, plan)
    assert plan.inplace == {}
    assert "x" not in plan.offsets and plan.lifetimes["x2"] == (1, 1)
    g.tensors["s"] = Tensor("s", (1, 4, 10), "int8", q)  # same bytes: now reused
    plan = plan_memory(g)
    verify_plan(g, plan)
    assert plan.inplace == {"s": "b"}


def test_standalone_relu_after_maxpool_is_in_place(tmp_path):
    path = tmp_path / "maxpool_relu.onnx"
    onnx.save(maxpool_relu(), str(path))
    g = compile_model(path, np.random.default_rng(0).uniform(-1, 1, (4, 3, 8, 8)).astype(np.float32)).graph
    clamps = [n for n in g.nodes if n.op == "clamp"]
    assert len(clamps) == 1 and g.producer(clamps[0].inputs[0]).op == "maxpool"
    plan = plan_memory(g)
    verify_plan(g, plan)
    out, src = clamps[0].outputs[0], clamps[0].inputs[0]
    assert plan.inplace == {out: src}
    assert plan.offsets[out] == plan.offsets[src]
    no_inplace = plan_memory(g, inplace=False)
    verify_plan(g, no_inplace)
    assert no_inplace.offsets[out] != no_inplace.offsets[src]


def _random_graph(seed: int, n_nodes: int = 40) -> Graph:
    """A random DAG in topological order: dense (1 input), concat (2-3 inputs), clamp/add (in-place ops)."""
    rng = np.random.default_rng(seed)
    q = QParams(0.1, 0)
    g = Graph(f"random{seed}", inputs=["x"])
    g.tensors["x"] = Tensor("x", (1, 16), "int8", q)
    avail = ["x"]
    for i in range(n_nodes):
        op = rng.choice(["dense", "dense", "concat", "clamp", "add"])
        k = {"dense": 1, "clamp": 1, "concat": int(rng.integers(2, 4)), "add": 2}[op]
        recent = avail[-6:]
        ins = [str(rng.choice(recent)) for _ in range(k)]
        if op in ("clamp", "add"):
            size = tensor_bytes(g, ins[0])
            if op == "add":
                ins[1] = ins[0] if rng.random() < 0.2 else ins[1]
        else:
            size = int(rng.integers(1, 65)) * int(rng.choice([1, 1, 1, 7, 16]))
        t = f"t{i}"
        g.tensors[t] = Tensor(t, (1, size), "int8", q)
        g.nodes.append(Node(f"n{i}", str(op), ins, [t]))
        avail.append(t)
    g.outputs = [avail[-1]] + ([avail[len(avail) // 2]] if seed % 2 else [])
    return g


@pytest.mark.parametrize("seed", range(40))
def test_random_graphs(seed):
    g = _random_graph(seed)
    for align, inplace in [(4, True), (1, True), (8, False)]:
        plan = plan_memory(g, align=align, inplace=inplace)
        verify_plan(g, plan, align)
        assert plan.arena_bytes <= 1.5 * plan.lower_bound + align
