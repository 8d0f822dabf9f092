"""Operator order for memory (issue 5): the pass ``reorder_for_memory``.

The node order is the schedule (hilc/compiler/memory.py: node ``i`` runs at step ``i``), and in a
branchy graph it decides which tensors are alive together. An inception block that runs its
large branch while the small branch's output waits holds both; run the small branch to its end
first and only its small output waits. Any topological order computes the same values (every
op is a pure function of its inputs), so reordering changes only when tensors live, never a bit
of the results.

Search (as in SERENITY, Ahn et al. 2020, "Ordering Chaos"): a dynamic program over the sets of
nodes already run. The live bytes after a set ran depend only on the set, so each level (``i``
nodes run) keeps, per set, the order reaching it with the lowest peak of live bytes, where a
node's step holds the live tensors plus its own outputs (its inputs die after it). A chain has one
set per level; a branchy region has as many sets as it has partial cuts. The search is exact
while no level has more than ``beam`` sets; past that it keeps the ``beam`` best (lowest peak,
then fewest live bytes) and becomes a beam search, a good greedy. Ties keep the import order.

The live-byte model ignores in-place reuse and packing; the pass therefore compares the found
order with the import order on the real memory plan (its live-bytes lower bound, then the packed
arena) and keeps the import order unless the new one is strictly better.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hilc.compiler.ir import Graph
from hilc.compiler.memory import MemoryPlan, plan_memory, tensor_bytes

DEFAULT_BEAM = 256
MAX_TRANSITIONS = 4_000_000  # the default beam shrinks on large graphs to keep the search ~seconds


@dataclass
class OrderSearch:
    order: list[int]  # node indices of the graph, in the order found
    peak: int  # peak live bytes of that order (the search's model: no in-place, no packing)
    import_peak: int  # the same for the import order
    exact: bool  # no level was cut to the beam: the order is optimal for the live-byte model
    max_states: int  # the largest level the search held


def live_peak(graph: Graph, order: list[int] | None = None, start: int = 0) -> int:
    """Peak live arena bytes of running ``graph.nodes`` in ``order`` (default: as they are) from
    position ``start`` on: at each node's step its outputs plus every tensor produced earlier and
    still needed (graph inputs are in the caller's buffer; graph outputs live to the end)."""
    order = list(range(len(graph.nodes))) if order is None else order
    nodes = graph.nodes
    inputs = set(graph.inputs)
    last: dict[str, int] = {}
    for pos, i in enumerate(order):
        for t in nodes[i].inputs:
            last[t] = pos
    for t in graph.outputs:
        last[t] = len(order)
    live = 0
    peak = 0
    dying: dict[int, int] = {}
    for pos, i in enumerate(order):
        out = sum(tensor_bytes(graph, t) for t in nodes[i].outputs if t not in inputs)
        if pos >= start:
            peak = max(peak, live + out)
        for t in nodes[i].outputs:
            if t in inputs:
                continue
            end = last.get(t, pos)
            if end > pos:
                live += tensor_bytes(graph, t)
                dying[end] = dying.get(end, 0) + tensor_bytes(graph, t)
        live -= dying.pop(pos, 0)
    return peak


def search_order(graph: Graph, start: int = 0, beam: int | None = None) -> OrderSearch:
    """The order of ``graph.nodes[start:]`` (``nodes[:start]`` stay first, as they are) with the
    lowest peak of live bytes: exact while no level exceeds ``beam`` sets (see the module doc;
    default: 256, fewer when levels x sets x nodes would pass MAX_TRANSITIONS)."""
    nodes = graph.nodes
    region = list(range(start, len(nodes)))
    m = len(region)
    if beam is None:
        beam = max(8, min(DEFAULT_BEAM, MAX_TRANSITIONS // max(1, m * m)))
    inputs = set(graph.inputs)
    producer: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for t in n.outputs:
            producer[t] = i
    local = {g: j for j, g in enumerate(region)}
    consumers: dict[str, int] = {}  # tensor -> bitmask of region nodes reading it
    preds = [0] * m
    for j, g in enumerate(region):
        for t in nodes[g].inputs:
            consumers[t] = consumers.get(t, 0) | (1 << j)
            p = producer.get(t)
            if p is not None and p in local:
                preds[j] |= 1 << local[p]
    outputs = set(graph.outputs)
    size = {t: tensor_bytes(graph, t) for t in producer if t not in inputs}
    out_bytes = [sum(size.get(t, 0) for t in nodes[g].outputs) for g in region]
    # what stays live after a node ran: outputs someone later reads (or graph outputs)
    kept = [sum(size.get(t, 0) for t in nodes[g].outputs if t in outputs or consumers.get(t, 0))
            for g in region]
    # tensors a node may free: arena tensors it reads that are not graph outputs
    frees = [[(t, consumers[t], size[t]) for t in dict.fromkeys(nodes[g].inputs) if t in size and t not in outputs]
             for g in region]
    # tensors from the fixed prefix that are still needed when the region starts
    live0 = sum(size[t] for t in size if producer[t] < start and (t in outputs or consumers.get(t, 0)))

    # level: mask -> (peak, live, parent mask, node index)
    level: dict[int, tuple[int, int, int, int]] = {0: (0, live0, -1, -1)}
    history: list[dict[int, tuple[int, int, int, int]]] = [level]
    exact = True
    max_states = 1
    for _ in range(m):
        nxt: dict[int, tuple[int, int, int, int]] = {}
        for mask, (peak, live, _, _) in level.items():
            for j in range(m):
                bit = 1 << j
                if mask & bit or preds[j] & ~mask:
                    continue
                new = mask | bit
                step = max(peak, live + out_bytes[j])
                after = live + kept[j]
                for _t, cons, b in frees[j]:
                    if cons & ~new == 0:
                        after -= b
                old = nxt.get(new)
                if old is None or (step, after) < (old[0], old[1]):
                    nxt[new] = (step, after, mask, j)
        max_states = max(max_states, len(nxt))
        if len(nxt) > beam:
            exact = False
            keep = sorted(nxt.items(), key=lambda kv: (kv[1][0], kv[1][1]))[:beam]
            nxt = dict(keep)
        history.append(nxt)
        level = nxt
    full = (1 << m) - 1
    peak = level[full][0] if m else 0
    seq: list[int] = []
    mask = full
    for lv in range(m, 0, -1):
        _, _, parent, j = history[lv][mask]
        seq.append(region[j])
        mask = parent
    order = list(range(start)) + seq[::-1]
    return OrderSearch(order, max(peak, 0), live_peak(graph, None, start), exact, max_states)


def apply_order(graph: Graph, order: list[int]) -> Graph:
    """A copy of ``graph`` whose nodes run in ``order`` (a permutation of the node indices)."""
    g = graph.copy()
    g.nodes = [g.nodes[i] for i in order]
    return g


def _key(plan: MemoryPlan) -> tuple[int, int]:
    return plan.lower_bound, plan.arena_bytes


def reorder_for_memory(graph: Graph, start: int = 0, beam: int | None = None,
                       plan_fn: Callable[[Graph], MemoryPlan] = plan_memory) -> Graph:
    """The pass: ``graph`` with ``nodes[start:]`` in the order that lowers the memory plan's peak
    (live-bytes lower bound, then arena); the graph itself when the import order is as good.
    ``meta["schedule"]`` records what was tried (``order``: "memory" or "import", the arena of
    both, whether the search was exact)."""
    found = search_order(graph, start, beam)
    info: dict[str, Any] = {"live_peak_import_order": found.import_peak, "live_peak": found.peak,
                            "exact": found.exact, "max_states": found.max_states}
    base = plan_fn(graph)
    info.update(arena_bytes_import_order=base.arena_bytes, arena_lower_bound_import_order=base.lower_bound)
    if found.order == list(range(len(graph.nodes))):
        g, plan = graph, base
    else:
        cand = apply_order(graph, found.order)
        plan = plan_fn(cand)
        g, plan = (cand, plan) if _key(plan) < _key(base) else (graph, base)
    info.update(order="memory" if g is not graph else "import", arena_bytes=plan.arena_bytes,
                arena_lower_bound=plan.lower_bound, moved_nodes=sum(a.name != b.name for a, b in zip(
                    g.nodes, graph.nodes, strict=True)))
    if g is graph:
        g = graph.copy()
    # the node names in import order, so later passes (the patch planner) can price that order too
    info["import_order"] = graph.meta.get("schedule", {}).get("import_order") or [n.name for n in graph.nodes]
    g.meta["schedule"] = info
    return g


def import_order_peak(graph: Graph, plan: MemoryPlan, scratch: int) -> int:
    """Peak SRAM (arena + I/O + scratch) the import order would have needed, for report.json's
    ``peak_sram_bytes_import_order`` beside ``peak_sram_bytes``."""
    patch = graph.meta.get("patch")
    if patch and "peak_sram_bytes_import_order" in patch:
        return patch["peak_sram_bytes_import_order"]
    return graph.meta["schedule"]["arena_bytes_import_order"] + plan.input_bytes + plan.output_bytes + scratch
