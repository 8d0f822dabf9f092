"""Reading a compiled model back (OUT/graph.json + OUT/constants.npz) and checking it first.

graph.json is meant to be read, so people edit it, and files get truncated or mixed up between
builds. Every consumer (simulate, evaluate, export-onnx, flash, run, report) goes through
``load_checked``: a damaged or inconsistent model is one line naming the file and the node,
tensor or constant at fault, instead of a KeyError deep in a kernel or, worse, a run that silently
ignores the edit (graph.json shows small constants inline, but the numbers used are the .npz's).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from hilc.compiler.arith import qrange
from hilc.errors import HilcError


def read_constants(path: Path) -> dict[str, np.ndarray]:
    """Every array of constants.npz, read now (a truncated zip member fails here, not mid-run)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as e:  # BadZipFile, zlib.error, EOFError, ValueError: all mean a damaged file
        raise HilcError(f"{path}: unreadable constants ({type(e).__name__}: {e})") from None


def check_graph(data: Any, constants: dict[str, np.ndarray], where: Path) -> None:
    """Structure, references, order and constants of a graph.json document (``where`` names it)."""

    def bad(msg: str) -> HilcError:
        return HilcError(f"{where}: {msg} (edited by hand or damaged? recompile with hilc compile)")

    if not isinstance(data, dict):
        raise bad(f"expected a JSON object, got {type(data).__name__}")
    for key, kind in (("name", str), ("inputs", list), ("outputs", list), ("tensors", list), ("nodes", list)):
        if not isinstance(data.get(key), kind):
            raise bad(f"'{key}' missing or not a {kind.__name__}")
    tensors: dict[str, dict] = {}
    for i, t in enumerate(data["tensors"]):
        name = t.get("name") if isinstance(t, dict) else None
        if not isinstance(name, str):
            raise bad(f"tensor #{i} has no name")
        _check_tensor(name, t, bad)
        tensors[name] = t
    for role in ("inputs", "outputs"):
        if not data[role]:
            raise bad(f"the graph has no {role}")
        for name in data[role]:
            if name not in tensors:
                raise bad(f"graph {role[:-1]} '{name}' is not a tensor of the graph")
    from hilc.compiler.ops import OPS

    ready = set(data["inputs"])
    for i, n in enumerate(data["nodes"]):
        if not isinstance(n, dict) or not isinstance(n.get("name"), str):
            raise bad(f"node #{i} has no name")
        name, op = n["name"], n.get("op")
        if op not in OPS:
            raise bad(f"node {name}: unknown operator '{op}'")
        for role in ("inputs", "outputs"):
            if not isinstance(n.get(role), list) or not all(isinstance(x, str) for x in n[role]):
                raise bad(f"node {name}: '{role}' missing or not a list of tensor names")
        for x in n["inputs"]:
            if x not in tensors:
                raise bad(f"node {name}: input '{x}' is not a tensor of the graph")
            if x not in ready:
                raise bad(f"node {name}: input '{x}' is not computed before it (nodes must be in run order)")
        for x in n["outputs"]:
            if x not in tensors:
                raise bad(f"node {name}: output '{x}' is not a tensor of the graph")
            if x in ready:
                raise bad(f"node {name}: output '{x}' is already computed by an earlier node or is an input")
            ready.add(x)
        if not isinstance(n.get("attrs", {}), dict) or not isinstance(n.get("params", {}), dict):
            raise bad(f"node {name}: 'attrs' and 'params' must be JSON objects")
        for role, p in n.get("params", {}).items():
            _check_param(name, role, p, constants, bad)
        _check_zero_points(n, tensors, bad)
    for name in data["outputs"]:
        if name not in ready:
            raise bad(f"graph output '{name}' is computed by no node")


def _check_tensor(name: str, t: dict, bad) -> None:
    shape = t.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1
                                              for d in shape):
        raise bad(f"tensor '{name}': shape {shape!r} is not a list of positive sizes")
    try:
        np.dtype(t.get("dtype"))
    except TypeError:
        raise bad(f"tensor '{name}': unknown dtype {t.get('dtype')!r}") from None
    q = t.get("quant")
    if q is None:  # hilc compile quantizes every tensor
        raise bad(f"tensor '{name}': no quant (scale, zero_point, bits)")
    if not isinstance(q, dict) or not {"scale", "zero_point"} <= set(q) <= {"scale", "zero_point", "bits"}:
        raise bad(f"tensor '{name}': quant must hold scale, zero_point and bits, got {q!r}")
    scale, zp, bits = q["scale"], q["zero_point"], q.get("bits", 8)
    if not isinstance(bits, int) or not 1 <= bits <= 32:
        raise bad(f"tensor '{name}': quant bits {bits!r} is not 1..32")
    if not isinstance(scale, int | float) or isinstance(scale, bool) or not (math.isfinite(scale) and scale > 0):
        raise bad(f"tensor '{name}': quant scale {scale!r} is not a positive number")
    lo, hi = qrange(bits)
    if not isinstance(zp, int) or isinstance(zp, bool) or not lo <= zp <= hi:
        raise bad(f"tensor '{name}': quant zero_point {zp!r} is not an integer in [{lo}, {hi}]")


def _check_zero_points(n: dict, tensors: dict[str, dict], bad) -> None:
    """The integer attributes copied from the tensors' quantization (the kernels read these, not the
    tensors'): an edit of one without the other would run silently with the wrong offset or clamp."""
    a = n.get("attrs", {})
    for key, names in (("zp_in", n["inputs"][:1]), ("zp_out", n["outputs"][:1])):
        if key in a and names and not isinstance(a[key], list):
            zp = tensors[names[0]]["quant"]["zero_point"]
            if a[key] != zp:
                raise bad(f"node {n['name']}: {key} {a[key]!r} differs from the zero_point of tensor "
                          f"'{names[0]}' ({zp})")
    if n["outputs"]:
        q = tensors[n["outputs"][0]]["quant"]
        bits = q.get("bits", 8)
        lo, hi = qrange(bits)
        for key in ("lo", "hi"):
            if key in a and not (isinstance(a[key], int) and lo <= a[key] <= hi):
                raise bad(f"node {n['name']}: clamp bound {key} {a[key]!r} is outside the output's {bits}-bit range "
                          f"[{lo}, {hi}]")


def _check_param(node: str, role: str, p: Any, constants: dict[str, np.ndarray], bad) -> None:
    if not isinstance(p, dict) or not isinstance(p.get("constant"), str):
        raise bad(f"node {node}: param '{role}' names no constant")
    cname = p["constant"]
    if cname not in constants:
        raise bad(f"node {node}: constant '{cname}' ({role}) is not in constants.npz")
    arr = constants[cname]
    if "dtype" in p and p["dtype"] != str(arr.dtype):
        raise bad(f"node {node}: constant '{cname}' is {arr.dtype} in constants.npz, graph.json says {p['dtype']}")
    if "shape" in p and list(p["shape"]) != list(arr.shape):
        raise bad(f"node {node}: constant '{cname}' has shape {list(arr.shape)} in constants.npz, graph.json says "
                  f"{p['shape']}")
    if "value" in p:
        try:
            same = np.array_equal(np.asarray(p["value"], dtype=arr.dtype), arr,
                                  equal_nan=arr.dtype.kind in "fc")
        except (TypeError, ValueError, OverflowError):
            same = False
        if not same:
            raise bad(f"node {node}: the value of constant '{cname}' in graph.json differs from constants.npz "
                      "(the .npz is what runs)")


def check_shapes(graph: Any, where: Path) -> Any:
    """Each node's attributes against its shape rule: the rule must run and give the stored output
    shapes (a hand-edited kernel, stride or shape fails here, naming the node)."""
    from hilc.compiler.ops import OPS

    for n in graph.nodes:
        ins = [graph.tensors[x].shape for x in n.inputs]
        try:
            outs = [tuple(s) for s in OPS[n.op].infer_shapes(n, ins, graph)]
        except Exception as e:  # KeyError for a missing attribute, ZeroDivisionError for a zero stride, ...
            raise HilcError(f"{where}: node {n.name} ({n.op}): its attributes do not fit its inputs "
                            f"({type(e).__name__}: {e}) (edited by hand or damaged? recompile with hilc compile)"
                            ) from None
        stored = [graph.tensors[x].shape for x in n.outputs]
        if outs != stored[:len(outs)]:
            raise HilcError(f"{where}: node {n.name} ({n.op}): output shape {[list(s) for s in stored]} does not "
                            f"follow from its inputs and attributes ({[list(s) for s in outs]}) (edited by hand "
                            "or damaged? recompile with hilc compile)")
    return graph
