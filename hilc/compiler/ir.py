"""The one IR: a small dataclass graph in topological order.

Conventions
* Activation shapes are *physical* and start with the batch axis (size 1 in the graph; the
  simulator runs any batch). 4-D feature maps are channels-last (NHWC); the importer records,
  for each graph input and output, the permutation from the physical to the ONNX (logical)
  layout so users keep feeding and reading the model's own layout.
* Constants (weights, biases, multipliers, tables) live in ``Graph.constants`` and are named
  from nodes through ``Node.params``; ``Node.inputs`` holds activations only, which keeps
  scheduling and memory planning about activations.
* A float graph and an integer graph are the same structure: quantization replaces a node's
  float params with integer ones and gives every activation tensor a ``QParams``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class QParams:
    """Per-tensor affine quantization of an activation: real = scale * (q - zero_point)."""

    scale: float
    zero_point: int
    bits: int = 8

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"  # float32 before quantization, int8 after
    quant: QParams | None = None
    layout: tuple[int, ...] | None = None  # graph I/O only: physical axis i is ONNX axis layout[i]
    onnx_name: str = ""

    @property
    def size(self) -> int:
        return int(np.prod(self.shape[1:])) if len(self.shape) > 1 else 1


@dataclass
class Node:
    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)  # role -> constant name
    onnx_name: str = ""


@dataclass
class Graph:
    name: str
    nodes: list[Node] = field(default_factory=list)
    tensors: dict[str, Tensor] = field(default_factory=dict)
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    # Derived arrays a kernel prepares once per node (never serialised; a copy starts empty).
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # --- queries -----------------------------------------------------------------------
    def param(self, node: Node, role: str) -> np.ndarray:
        return self.constants[node.params[role]]

    def producer(self, tensor: str) -> Node | None:
        for n in self.nodes:
            if tensor in n.outputs:
                return n
        return None

    def consumers(self, tensor: str) -> list[Node]:
        return [n for n in self.nodes if tensor in n.inputs]

    @property
    def is_quantized(self) -> bool:
        return all(t.quant is not None for t in self.tensors.values())

    def copy(self) -> Graph:
        """A deep copy of structure; constant arrays are shared (passes replace, never mutate)."""
        return Graph(
            name=self.name,
            nodes=[Node(n.name, n.op, list(n.inputs), list(n.outputs), _deepcopy(n.attrs),
                        dict(n.params), n.onnx_name) for n in self.nodes],
            tensors={k: Tensor(t.name, tuple(t.shape), t.dtype,
                               None if t.quant is None else QParams(**asdict(t.quant)),
                               t.layout, t.onnx_name) for k, t in self.tensors.items()},
            constants=dict(self.constants),
            inputs=list(self.inputs),
            outputs=list(self.outputs),
            meta=_deepcopy(self.meta),
        )

    def add_constant(self, name: str, value: np.ndarray) -> str:
        self.constants[name] = np.ascontiguousarray(value)
        return name

    def remove_unused_constants(self) -> None:
        used = {c for n in self.nodes for c in n.params.values()}
        self.constants = {k: v for k, v in self.constants.items() if k in used}

    # --- serialisation -----------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "meta": self.meta,
            "tensors": [_tensor_json(t) for t in self.tensors.values()],
            "nodes": [_node_json(n, self.constants) for n in self.nodes],
        }

    def save(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        (out_dir / "graph.json").write_text(json.dumps(self.to_json(), indent=1, default=_json_default))
        np.savez(out_dir / "constants.npz", **self.constants)

    @staticmethod
    def load(out_dir: Path) -> Graph:
        out_dir = Path(out_dir)
        with np.load(out_dir / "constants.npz", allow_pickle=False) as npz:
            constants = {k: npz[k] for k in npz.files}
        return Graph.from_json(json.loads((out_dir / "graph.json").read_text()), constants)

    @staticmethod
    def from_json(data: dict[str, Any], constants: dict[str, np.ndarray]) -> Graph:
        """The graph ``to_json`` wrote, with its constants."""
        tensors = {}
        for t in data["tensors"]:
            q = t.get("quant")
            tensors[t["name"]] = Tensor(
                name=t["name"], shape=tuple(t["shape"]), dtype=t["dtype"],
                quant=None if q is None else QParams(**q),
                layout=None if t.get("layout") is None else tuple(t["layout"]),
                onnx_name=t.get("onnx_name", ""),
            )
        nodes = [Node(n["name"], n["op"], n["inputs"], n["outputs"], n.get("attrs", {}),
                      {k: v["constant"] for k, v in n.get("params", {}).items()},
                      n.get("onnx_name", "")) for n in data["nodes"]]
        return Graph(data["name"], nodes, tensors, constants, data["inputs"], data["outputs"],
                     data.get("meta", {}))

    def content_hash(self) -> int:
        """64-bit hash of the graph and its constants: firmware reports it, the host checks it."""
        import hashlib

        h = hashlib.sha256(json.dumps(self.to_json(), sort_keys=True, default=_json_default).encode())
        for name in sorted(self.constants):
            h.update(name.encode())
            h.update(np.ascontiguousarray(self.constants[name]).tobytes())
        return int.from_bytes(h.digest()[:8], "little")

    def summary(self) -> str:
        """A printable IR, one line per node (``hilc compile --dump-after``)."""
        lines = [f"graph {self.name}: inputs {self.inputs} -> outputs {self.outputs}"]
        for n in self.nodes:
            outs = ", ".join(_tensor_str(self.tensors[o]) for o in n.outputs)
            attrs = ", ".join(f"{k}={v}" for k, v in n.attrs.items() if not isinstance(v, list) or len(v) < 9)
            params = ", ".join(f"{k}:{self.constants[v].dtype}{list(self.constants[v].shape)}"
                               for k, v in n.params.items())
            lines.append(f"  {outs} = {n.op}({', '.join(n.inputs)}) [{attrs}] {{{params}}}")
        return "\n".join(lines)


def _tensor_str(t: Tensor) -> str:
    q = "" if t.quant is None else f" s={t.quant.scale:.4g} zp={t.quant.zero_point}"
    return f"{t.name}:{t.dtype}{list(t.shape)}{q}"


def _tensor_json(t: Tensor) -> dict[str, Any]:
    d: dict[str, Any] = {"name": t.name, "shape": list(t.shape), "dtype": t.dtype}
    if t.quant is not None:
        d["quant"] = asdict(t.quant)
    if t.layout is not None:
        d["layout"] = list(t.layout)
    if t.onnx_name:
        d["onnx_name"] = t.onnx_name
    return d


def _node_json(n: Node, constants: dict[str, np.ndarray]) -> dict[str, Any]:
    d: dict[str, Any] = {"name": n.name, "op": n.op, "inputs": n.inputs, "outputs": n.outputs}
    if n.attrs:
        d["attrs"] = n.attrs
    if n.params:
        # Small constants are shown inline so the JSON alone explains the arithmetic.
        d["params"] = {}
        for role, cname in n.params.items():
            arr = constants[cname]
            entry: dict[str, Any] = {"constant": cname, "dtype": str(arr.dtype), "shape": list(arr.shape)}
            if arr.size <= 16:
                entry["value"] = arr.tolist()
            d["params"][role] = entry
    if n.onnx_name:
        d["onnx_name"] = n.onnx_name
    return d


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _deepcopy(o: Any) -> Any:
    return json.loads(json.dumps(o, default=_json_default))
