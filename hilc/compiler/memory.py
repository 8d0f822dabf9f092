"""Static memory planning of the integer graph: one arena for every activation (DESIGN.md §3).

The schedule is the node order: node ``i`` runs at step ``i``; step ``len(nodes)`` stands for
"after the last node", when graph outputs are copied to the caller's output buffer.

* Graph inputs stay in the caller's input buffer and are not placed; every other activation
  (node outputs, graph outputs included) gets an arena offset.
* A tensor lives from its producer's step to its last consumer's step (a graph output to the
  end; a dead tensor for its producer's step only).
* In-place: when an op says it can (``Op.inplace_ok``), its first output is written over its
  first input if that input is in the arena, has the same byte size and dies at this node. The
  two then form one block whose lifetime is the union; chains of in-place ops merge further.
* Offsets: greedy packing of blocks, largest first, each at the lowest aligned offset free of
  every placed block with an intersecting lifetime. If that is more than 5 % above the lower
  bound (the peak of the summed sizes of live blocks), other orders and best-fit gaps are tried
  and the smallest arena is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from hilc.compiler.ir import Graph
from hilc.compiler.ops.base import OPS

_DTYPE_BYTES = {"int8": 1, "uint8": 1, "int16": 2, "int32": 4, "float32": 4}
RETRY_RATIO = 1.05


@dataclass
class MemoryPlan:
    offsets: dict[str, int]  # arena byte offset of every activation tensor placed in the arena
    arena_bytes: int  # max(offset + size) over placed tensors, rounded up to the alignment
    lower_bound: int  # max over steps of the summed sizes of simultaneously live blocks
    lifetimes: dict[str, tuple[int, int]]  # arena tensor -> (first step, last step)
    inplace: dict[str, str]  # output tensor -> input tensor whose buffer it reuses
    input_bytes: int  # graph inputs, in the caller's buffer
    output_bytes: int  # graph outputs, copied to the caller's buffer after the last node
    align: int = 4
    strategy: str = field(default="", compare=False)  # which packing order won (for reports)

    @property
    def peak_sram_bytes(self) -> int:
        return self.arena_bytes + self.input_bytes + self.output_bytes


def tensor_bytes(graph: Graph, name: str) -> int:
    """Bytes of one sample of an activation (the batch axis is excluded: the firmware runs batch 1)."""
    t = graph.tensors[name]
    if t.dtype == "int4":  # sub-byte activation packed two to a byte (hilc_arith.h)
        return (int(np.prod(t.shape[1:], dtype=np.int64)) + 1) // 2
    itemsize = _DTYPE_BYTES.get(t.dtype)
    if itemsize is None:
        itemsize = np.dtype(t.dtype).itemsize
    return int(np.prod(t.shape[1:], dtype=np.int64)) * itemsize


@dataclass
class _Block:
    """One arena buffer: a tensor and the tensors written over it in place."""

    tensors: list[str]
    size: int
    start: int
    end: int
    offset: int = -1


def _lifetimes(graph: Graph) -> dict[str, tuple[int, int]]:
    n = len(graph.nodes)
    graph_inputs = set(graph.inputs)
    start: dict[str, int] = {}
    end: dict[str, int] = {}
    for step, node in enumerate(graph.nodes):
        for t in node.inputs:
            if t in graph_inputs:
                continue
            if t not in start:
                raise ValueError(f"memory plan: node {node.name} reads '{t}' before any node produces it")
            end[t] = step
        for t in node.outputs:
            if t in start:
                raise ValueError(f"memory plan: tensor '{t}' is produced twice")
            if t not in graph_inputs:
                start[t] = end[t] = step
    for t in graph.outputs:
        if t in start:
            end[t] = n
    return {t: (start[t], end[t]) for t in start}


def _merge_inplace(graph: Graph, lifetimes: dict[str, tuple[int, int]],
                   sizes: dict[str, int], depthwise: bool = False) -> tuple[list[_Block], dict[str, str]]:
    block_of: dict[str, _Block] = {}
    blocks: list[_Block] = []
    inplace: dict[str, str] = {}
    for step, node in enumerate(graph.nodes):
        op = OPS.get(node.op)
        can = bool(getattr(op, "inplace_ok", False)) and node.inputs and node.outputs
        # in-place depthwise (MCUNetV2): the op says how many bytes of one-channel plane it needs
        plane = op.inplace_plane_bytes(node, graph) if depthwise and hasattr(op, "inplace_plane_bytes") else 0
        can = can or plane > 0
        for i, t in enumerate(node.outputs):
            if t not in lifetimes:
                continue
            src = node.inputs[0] if can and i == 0 else None
            if (src is not None and src in block_of and src != t and sizes[src] == sizes[t]
                    and lifetimes[src][1] == step and block_of[src].end == step):
                b = block_of[src]
                b.tensors.append(t)
                b.end = lifetimes[t][1]
                block_of[t] = b
                inplace[t] = src
                if plane and i == 0:
                    name = f"{t}@plane"
                    lifetimes[name] = (step, step)
                    blocks.append(_Block([name], plane, step, step))
                    block_of[name] = blocks[-1]
            else:
                b = _Block([t], sizes[t], *lifetimes[t])
                blocks.append(b)
                block_of[t] = b
    return blocks, inplace


def _lower_bound(blocks: list[_Block], n_steps: int) -> int:
    live = np.zeros(n_steps + 2, dtype=np.int64)
    for b in blocks:
        live[b.start] += b.size
        live[b.end + 1] -= b.size
    return int(np.cumsum(live).max()) if blocks else 0


def align_up(x: int, align: int) -> int:
    """``x`` rounded up to a multiple of ``align`` (where the planner may place a block)."""
    return -(-x // align) * align


def _pack(blocks: list[_Block], align: int, best_fit: bool) -> tuple[list[int], int]:
    """Place blocks in the given order; returns offsets (in that order) and the arena top."""
    placed: list[tuple[int, int, int, int]] = []  # (offset, end offset, start step, end step)
    offsets: list[int] = []
    top = 0
    for b in blocks:
        busy = sorted((o, e) for o, e, s, t in placed if s <= b.end and b.start <= t)
        choice, choice_gap, cursor = None, None, 0
        for o, e in busy:
            gap = o - cursor
            if gap >= b.size:
                if not best_fit:
                    choice = cursor
                    break
                if choice_gap is None or gap < choice_gap:
                    choice, choice_gap = cursor, gap
            cursor = max(cursor, align_up(e, align))
        if choice is None:
            choice = cursor
        offsets.append(choice)
        placed.append((choice, choice + b.size, b.start, b.end))
        top = max(top, choice + b.size)
    return offsets, top


_ORDERS: list[tuple[str, Callable[[_Block], tuple]]] = [
    ("size", lambda b: (-b.size, b.start, b.end)),
    ("start", lambda b: (b.start, -b.size, b.end)),
    ("area", lambda b: (-b.size * (b.end - b.start + 1), -b.size, b.start)),
    ("duration", lambda b: (-(b.end - b.start), -b.size, b.start)),
    ("end", lambda b: (-b.end, -b.size, b.start)),
]


def plan_memory(graph: Graph, align: int = 4, inplace: bool = True, inplace_depthwise: bool = False) -> MemoryPlan:
    """Plan the activation arena of ``graph`` (node order is the schedule). ``inplace_depthwise``
    also lets same-shape depthwise convs write over their input, through a one-channel plane
    buffer placed in the arena for that step (``OUT@plane``)."""
    if align < 1:
        raise ValueError("memory plan: align must be >= 1")
    lifetimes = _lifetimes(graph)
    sizes = {t: tensor_bytes(graph, t) for t in lifetimes}
    if inplace:
        blocks, inplace_map = _merge_inplace(graph, lifetimes, sizes, inplace_depthwise)
    else:
        blocks, inplace_map = [_Block([t], sizes[t], *lifetimes[t]) for t in lifetimes], {}
    lower = _lower_bound(blocks, len(graph.nodes))

    best: tuple[int, list[_Block], list[int], str] | None = None
    for best_fit in (False, True):
        for name, key in _ORDERS:
            order = sorted(blocks, key=key)
            offsets, top = _pack(order, align, best_fit)
            if best is None or top < best[0]:
                best = (top, order, offsets, f"{name}/{'best' if best_fit else 'first'}-fit")
            if best[0] <= RETRY_RATIO * lower:
                break
        if best is not None and best[0] <= RETRY_RATIO * lower:
            break
    assert best is not None
    top, order, offsets, strategy = best
    tensor_offsets: dict[str, int] = {}
    for b, off in zip(order, offsets, strict=True):
        b.offset = off
        for t in b.tensors:
            tensor_offsets[t] = off
    return MemoryPlan(
        offsets={t: tensor_offsets[t] for t in lifetimes},
        arena_bytes=align_up(top, align),
        lower_bound=lower,
        lifetimes=lifetimes,
        inplace=inplace_map,
        input_bytes=sum(tensor_bytes(graph, t) for t in graph.inputs),
        output_bytes=sum(tensor_bytes(graph, t) for t in graph.outputs),
        align=align,
        strategy=strategy,
    )
