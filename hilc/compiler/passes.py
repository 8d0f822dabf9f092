"""Graph -> Graph rewrites on the float graph. Each returns a new graph and leaves its input as is."""

from __future__ import annotations

from hilc.compiler.ir import Graph, Node

# Ops whose output is requantized, so a following ReLU/Clip folds into their clamp bounds.
REQUANTIZING_OPS = ("conv2d", "dense", "add", "mul", "avgpool")


def _rewire(graph: Graph, old: str, new: str) -> None:
    for n in graph.nodes:
        n.inputs = [new if i == old else i for i in n.inputs]
    graph.outputs = [new if o == old else o for o in graph.outputs]


def cleanup(graph: Graph) -> Graph:
    """Drop reshapes that keep the shape and merge chains of reshapes (the importer's relabels)."""
    g = graph.copy()
    changed = True
    while changed:
        changed = False
        for node in list(g.nodes):
            if node.op != "reshape":
                continue
            src, dst = node.inputs[0], node.outputs[0]
            prod = g.producer(src)
            if g.tensors[src].shape == g.tensors[dst].shape and src not in g.inputs:
                # the data are identical: readers of dst read src (an output keeps dst's layout)
                if dst in g.outputs:
                    if src in g.outputs:
                        continue
                    g.tensors[src].layout = g.tensors[dst].layout
                    g.tensors[src].onnx_name = g.tensors[dst].onnx_name
                _move_hint(g, dst, src)
                _rewire(g, dst, src)
                g.nodes.remove(node)
                del g.tensors[dst]
                changed = True
            elif prod is not None and prod.op == "reshape" and len(g.consumers(src)) == 1 and src not in g.outputs:
                node.inputs = list(prod.inputs)
                g.nodes.remove(prod)
                del g.tensors[src]
                changed = True
    return g


def _move_hint(g: Graph, old: str, new: str) -> None:
    hints = g.meta.get("quant_hints", {})
    if old in hints and new not in hints:
        hints[new] = hints.pop(old)


def fuse_activation(graph: Graph) -> Graph:
    """Fold ReLU / ReLU6 / Clip into the clamp of the op that produces their input."""
    g = graph.copy()
    for node in list(g.nodes):
        if node.op != "clamp":
            continue
        src = node.inputs[0]
        prod = g.producer(src)
        if (prod is None or prod.op not in REQUANTIZING_OPS or len(g.consumers(src)) != 1
                or src in g.outputs):
            continue
        _merge_bounds(prod, node)
        prod.attrs.setdefault("fused", []).append(node.op if not node.onnx_name else node.onnx_name)
        # The fused result keeps the producer's tensor name; readers of the clamp read it.
        dst = node.outputs[0]
        if dst in g.outputs:
            g.tensors[src].layout = g.tensors[dst].layout
            g.tensors[src].onnx_name = g.tensors[dst].onnx_name
        hints = g.meta.get("quant_hints", {})
        hints.pop(src, None)
        _move_hint(g, dst, src)
        g.nodes.remove(node)
        del g.tensors[dst]
        _rewire(g, dst, src)
    return g


def _merge_bounds(into: Node, clamp: Node) -> None:
    lo, hi = clamp.attrs.get("act_lo"), clamp.attrs.get("act_hi")
    if lo is not None:
        into.attrs["act_lo"] = max(lo, into.attrs.get("act_lo", lo))
    if hi is not None:
        into.attrs["act_hi"] = min(hi, into.attrs.get("act_hi", hi))


def fold_pad(graph: Graph) -> Graph:
    """Merge a zero constant Pad over H and W into the convolution that reads it."""
    g = graph.copy()
    for node in list(g.nodes):
        if node.op != "pad" or node.attrs["mode"] != "constant" or node.attrs["value"] != 0.0:
            continue
        pads = node.attrs["pads"]
        if len(pads) != 4 or pads[0] != [0, 0] or pads[3] != [0, 0]:
            continue
        readers = g.consumers(node.outputs[0])
        if len(readers) != 1 or readers[0].op != "conv2d" or node.outputs[0] in g.outputs:
            continue
        conv = readers[0]
        t, l, b, r = conv.attrs["pads"]
        conv.attrs["pads"] = [t + pads[1][0], l + pads[2][0], b + pads[1][1], r + pads[2][1]]
        conv.inputs = [node.inputs[0]]
        g.nodes.remove(node)
        del g.tensors[node.outputs[0]]
    return g


def fold_scalars(graph: Graph) -> Graph:
    """Fold a multiply / add by a scalar constant into the op next to it, saving a rounding:
    * into a ``matmul`` that produces it (attention's 1/sqrt(d)): its dyadic multiplier absorbs c > 0;
    * into a lookup table that reads it, when the intermediate has no scale of its own (a QDQ
      model that leaves ``Div -> Erf`` in float between its Q/DQ pairs): the table then computes
      exactly what onnxruntime does, DQ -> ops -> Q."""
    g = graph.copy()
    hints = g.meta.get("quant_hints", {})
    for node in list(g.nodes):
        if node.op != "mul" or len(node.inputs) != 1 or "const" not in node.params:
            continue
        c = g.constants[node.params["const"]]
        t = node.inputs[0]
        prod = g.producer(t)
        if (c.size != 1 or float(c.reshape(-1)[0]) <= 0 or prod is None or prod.op != "matmul" or t in hints
                or len(g.consumers(t)) != 1 or t in g.outputs or any(k in a for a in (prod.attrs, node.attrs)
                                                                      for k in ("act_lo", "act_hi"))):
            continue
        prod.attrs["alpha"] = prod.attrs.get("alpha", 1.0) * float(c.reshape(-1)[0])
        prod.outputs = list(node.outputs)
        g.nodes.remove(node)
        del g.tensors[t]
    if not hints:
        return g  # float models are calibrated: every tensor has a range
    for node in list(g.nodes):
        if node.op != "lut" or node.inputs[0] in hints:
            continue
        while True:
            prod = g.producer(node.inputs[0])
            t = node.inputs[0]
            if (prod is None or prod.op not in ("mul", "add") or len(prod.inputs) != 1 or "const" not in prod.params
                    or g.constants[prod.params["const"]].size != 1 or t in hints or len(g.consumers(t)) != 1
                    or t in g.outputs or "act_lo" in prod.attrs or "act_hi" in prod.attrs):
                break
            c = float(g.constants[prod.params["const"]].reshape(-1)[0])
            signs = prod.attrs.get("signs", [1, 1])
            if prod.op == "mul":
                step = [["mul", c]]
            else:  # s0 * x + s1 * c
                step = [["mul", float(signs[0])], ["add", signs[1] * c]] if signs[0] != 1 else [["add", signs[1] * c]]
            node.attrs["pre"] = step + node.attrs.get("pre", [])
            node.inputs = list(prod.inputs)
            g.nodes.remove(prod)
            del g.tensors[t]
    return g


FLOAT_PIPELINE = (cleanup, fold_pad, fuse_activation, fold_scalars)
