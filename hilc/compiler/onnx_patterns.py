"""Decomposed transformer blocks in ONNX, recognised as single nodes before the import walk.

Exporters spell GELU and LayerNorm out in elementwise ops: GELU as
``x * 0.5 * (1 + Erf(x / sqrt 2))`` or its tanh approximation (in whatever order and grouping the
exporter chose), LayerNorm as ``ReduceMean / Sub / Pow / ReduceMean / Add eps / Sqrt / Div``
(optionally followed by ``Mul gamma`` and ``Add beta``). The GELU matcher finds the smallest
closed subgraph around an Erf or Tanh that reads one activation and checks numerically that it
computes GELU; the LayerNorm matcher follows the fixed data flow. Each match becomes a standard
``Gelu`` / ``LayerNormalization`` node that the operator modules import (the rest of the model is
left as it is; nothing here changes the file).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Erf", "Tanh"}
_EVAL = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power,
    "Erf": np.vectorize(math.erf, otypes=[np.float64]), "Tanh": np.tanh,
}


def _gelu(x: np.ndarray, approximate: str) -> np.ndarray:
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + _EVAL["Erf"](x / math.sqrt(2.0)))


class _View:
    def __init__(self, model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> None:
        self.nodes = nodes
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        for n in nodes:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        self.producer = {o: n for n in nodes for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in nodes:
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        self.graph_outputs = {o.name for o in model.graph.output}
        self.ranks = {vi.name: len(vi.type.tensor_type.shape.dim)
                      for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}

    def is_const(self, name: str) -> bool:
        return name in self.consts

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        c = self.consumers.get(name, [])
        return c[0] if len(c) == 1 and name not in self.graph_outputs else None


def _ancestors(v: _View, start: onnx.NodeProto, depth: int) -> list[str]:
    """Activation tensors reachable backwards from ``start`` through elementwise ops, nearest first."""
    found, frontier = [], [start]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for i in n.input:
                if not i or v.is_const(i) or i in found:
                    continue
                found.append(i)
                p = v.producer.get(i)
                if p is not None and p.op_type in ELEMENTWISE:
                    nxt.append(p)
        frontier = nxt
    return found


def _descendants(v: _View, start: onnx.NodeProto, depth: int) -> list[str]:
    found, frontier = [start.output[0]], [start]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for c in v.consumers.get(n.output[0], []):
                if c.op_type in ELEMENTWISE and c.output[0] not in found:
                    found.append(c.output[0])
                    nxt.append(c)
        frontier = nxt
    return found


def _closed_subgraph(v: _View, x: str, out: str) -> list[onnx.NodeProto] | None:
    """The elementwise nodes on paths from x to out, if they read nothing else but constants and
    nothing outside reads their intermediate results."""
    members: list[onnx.NodeProto] = []
    seen: set[str] = set()

    def back(t: str) -> bool:
        if t == x:
            return True
        if v.is_const(t):
            return True
        p = v.producer.get(t)
        if p is None or p.op_type not in ELEMENTWISE:
            return False
        if p.output[0] in seen:
            return True
        seen.add(p.output[0])
        members.append(p)
        return all(back(i) for i in p.input if i)

    if not back(out) or not members:
        return None
    outs = {m.output[0] for m in members}
    for m in members:
        if m.output[0] != out and (m.output[0] in v.graph_outputs
                                   or any(c.output[0] not in outs for c in v.consumers.get(m.output[0], []))):
            return None
        if any(i and i != x and i not in outs and not v.is_const(i) for i in m.input):
            return None
        if any(v.is_const(i) and v.consts[i].size != 1 for i in m.input if i):
            return None
    order = {id(n): k for k, n in enumerate(v.nodes)}
    return sorted(members, key=lambda n: order[id(n)])


def _evaluate(v: _View, members: list[onnx.NodeProto], x: str, xs: np.ndarray, out: str) -> np.ndarray | None:
    env = {x: xs}
    try:
        with np.errstate(all="ignore"):
            for m in members:
                args = [env[i] if i in env else v.consts[i].astype(np.float64).reshape(()) for i in m.input]
                env[m.output[0]] = _EVAL[m.op_type](*args)
    except (KeyError, ValueError):
        return None
    return env.get(out)


def _match_gelu(v: _View, anchor: onnx.NodeProto) -> tuple[str, str, list[onnx.NodeProto], str] | None:
    xs = np.linspace(-6.0, 6.0, 97)
    outs = _descendants(v, anchor, 4)
    for out in reversed(outs):  # the largest subgraph that is GELU
        for x in _ancestors(v, anchor, 6):
            members = _closed_subgraph(v, x, out)
            if members is None or anchor not in members:
                continue
            y = _evaluate(v, members, x, xs, out)
            if y is None or y.shape != xs.shape:
                continue
            for approx in ("none", "tanh"):
                if np.abs(y - _gelu(xs, approx)).max() <= 1e-4:
                    return x, out, members, approx
    return None


def _axes_last(v: _View, n: onnx.NodeProto) -> bool:
    axes = None
    for a in n.attribute:
        if a.name == "axes":
            axes = list(a.ints)
        if a.name == "keepdims" and a.i == 0:
            return False
    if axes is None and len(n.input) > 1 and v.is_const(n.input[1]):
        axes = [int(a) for a in v.consts[n.input[1]].reshape(-1)]
    rank = v.ranks.get(n.input[0])
    return axes is not None and len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1))


def _scalar(v: _View, a: str, b: str) -> tuple[str, float] | None:
    """(activation, value) when exactly one of a, b is a scalar constant."""
    for act, c in ((a, b), (b, a)):
        if v.is_const(c) and not v.is_const(act) and v.consts[c].size == 1:
            return act, float(v.consts[c].reshape(-1)[0])
    return None


def _match_layernorm(v: _View, sqrt: onnx.NodeProto):
    add = v.producer.get(sqrt.input[0])
    if add is None or add.op_type != "Add" or (eps := _scalar(v, *add.input[:2])) is None:
        return None
    var = v.producer.get(eps[0])
    if var is None or var.op_type != "ReduceMean" or not _axes_last(v, var):
        return None
    sq = v.producer.get(var.input[0])
    if sq is None or not ((sq.op_type == "Pow" and _scalar(v, *sq.input[:2]) == (sq.input[0], 2.0))
                          or (sq.op_type == "Mul" and sq.input[0] == sq.input[1])):
        return None
    d = sq.input[0]
    sub = v.producer.get(d)
    if sub is None or sub.op_type != "Sub":
        return None
    x, mean_t = sub.input[0], sub.input[1]
    mean = v.producer.get(mean_t)
    if mean is None or mean.op_type != "ReduceMean" or mean.input[0] != x or not _axes_last(v, mean):
        return None
    div = v.only_consumer(sqrt.output[0])
    if div is None or div.op_type != "Div" or list(div.input[:2]) != [d, sqrt.output[0]]:
        return None
    members = [mean, sub, sq, var, add, sqrt, div]
    if {c.output[0] for c in v.consumers.get(d, [])} != {sq.output[0], div.output[0]} or d in v.graph_outputs:
        return None
    for t in (mean_t, sq.output[0], var.output[0], add.output[0]):
        if v.only_consumer(t) is None:
            return None
    out, affine = div.output[0], {}
    nxt = v.only_consumer(out)
    for kind in ("Mul", "Add"):  # the optional gamma, then the optional beta
        if nxt is None or nxt.op_type != kind:
            continue
        c = [i for i in nxt.input if i != out]
        if len(c) == 1 and v.is_const(c[0]):
            affine[kind], out = c[0], nxt.output[0]
            members.append(nxt)
            nxt = v.only_consumer(out)
    return x, out, members, eps[1], affine.get("Mul"), affine.get("Add")


def fuse(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The model's nodes with decomposed GELU and LayerNorm subgraphs replaced by single nodes."""
    nodes = list(model.graph.node)
    if not any(n.op_type in ("Sqrt", "Erf", "Tanh") for n in nodes):
        return nodes
    try:  # ranks for ReduceMean axes given as positive numbers
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:
        pass  # the import's own strict shape inference reports what is wrong
    fused = 0
    for anchor_type in ("Sqrt", "Erf", "Tanh"):
        k = 0
        while k < len(nodes):
            n = nodes[k]
            k += 1
            if n.op_type != anchor_type:
                continue
            v = _View(model, nodes)
            extra: list[onnx.NodeProto] = []
            if anchor_type == "Sqrt":
                m = _match_layernorm(v, n)
                if m is None:
                    continue
                x, out, members, eps, gamma, beta = m
                names = []
                for role, name, default in (("scale", gamma, 1.0), ("bias", beta, 0.0)):
                    if name is None:
                        name = f"hilc_fused_{fused}_{role}"
                        extra.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
                            np.array([default], np.float32), name)))
                    names.append(name)
                new = helper.make_node("LayerNormalization", [x, *names], [out], name=f"{members[0].name}_fused",
                                       axis=-1, epsilon=eps)
            else:
                m = _match_gelu(v, n)
                if m is None:
                    continue
                x, out, members, approx = m
                new = helper.make_node("Gelu", [x], [out], name=f"{members[0].name}_fused", approximate=approx)
            pos = {id(nn): i for i, nn in enumerate(nodes)}
            last = max(pos[id(mm)] for mm in members)
            ids = {id(mm) for mm in members}
            nodes = [nn for nn in nodes[:last] if id(nn) not in ids] + extra + [new] + nodes[last + 1:]
            k = 0
            fused += 1
    return nodes
