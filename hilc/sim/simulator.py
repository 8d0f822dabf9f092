"""Graph execution: the bit-accurate integer simulator (the golden reference every backend is
compared with) and the float interpreter (importer checks and calibration).

Both run a batch at once: axis 0 of every activation is the batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from hilc.compiler.arith import dequantize_host, quantize_host
from hilc.compiler.ir import Graph
from hilc.compiler.ops import OPS
from hilc.errors import HilcError


def _last_uses(graph: Graph) -> dict[str, int]:
    last: dict[str, int] = {}
    for i, n in enumerate(graph.nodes):
        for t in n.inputs:
            last[t] = i
    return last


def _execute(graph: Graph, feeds: dict[str, np.ndarray], integer: bool,
             observe: Callable[[str, np.ndarray], None] | None = None) -> dict[str, np.ndarray]:
    env = dict(feeds)
    last = _last_uses(graph)
    keep = set(graph.outputs)
    if observe is not None:
        for name, v in feeds.items():
            observe(name, v)
    start = 0
    if integer and graph.meta.get("patch"):  # the patch stage first (hilc/compiler/patches.py)
        from hilc.compiler.patches import run_patch_stage

        start = run_patch_stage(graph, env)
    for i, node in enumerate(graph.nodes):
        if i < start:
            continue
        op = OPS[node.op]
        xs = [env[t] for t in node.inputs]
        ys = op.eval_int(node, graph, xs) if integer else op.eval_float(node, graph, xs)
        for name, y in zip(node.outputs, ys, strict=True):
            env[name] = y
            if observe is not None:
                observe(name, y)
        for t in node.inputs:
            if last.get(t) == i and t not in keep:
                env.pop(t, None)
    return {name: env[name] for name in graph.outputs}


def run_float(graph: Graph, feeds: dict[str, np.ndarray],
              observe: Callable[[str, np.ndarray], None] | None = None) -> dict[str, np.ndarray]:
    """Float interpretation of a float graph (physical layouts in and out)."""
    return _execute(graph, {k: v.astype(np.float32) for k, v in feeds.items()}, False, observe)


def run_int(graph: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Bit-accurate integer execution of a quantized graph (physical layouts in and out)."""
    for k, v in feeds.items():
        if v.dtype != np.int8:
            raise HilcError(f"input '{k}': the integer simulator takes int8 data, got {v.dtype}")
    return _execute(graph, feeds, True)


# --- the user's view: ONNX layout and real values ----------------------------------------

def to_physical(graph: Graph, name: str, x: np.ndarray) -> np.ndarray:
    """Check a user array against input ``name`` (ONNX layout, any batch) and move it to physical."""
    check_shape(graph, name, x.shape)
    t = graph.tensors[name]
    return np.ascontiguousarray(x.transpose(t.layout or tuple(range(len(t.shape)))))


def check_shape(graph: Graph, name: str, shape: tuple[int, ...]) -> None:
    t = graph.tensors[name]
    lay = t.layout or tuple(range(len(t.shape)))
    logical = [0] * len(t.shape)
    for i, ax in enumerate(lay):
        logical[ax] = t.shape[i]
    want = ["N", *logical[1:]]
    if len(shape) != len(logical) or list(shape[1:]) != logical[1:]:
        raise HilcError(f"input '{t.onnx_name or name}' must have shape {want} (first axis = batch), "
                        f"got {list(shape)}")


def check_inputs(graph: Graph, x: np.ndarray) -> np.ndarray:
    """A user's float input batch, checked against the model's first input (dtype and shape)."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise HilcError(f"input dtype {x.dtype}, expected float32 in the model's input range")
    check_shape(graph, graph.inputs[0], x.shape)
    if len(x) == 0:
        raise HilcError("input array holds no samples")
    finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)
    if not finite.all():  # NaN would quantize to some integer and run as if it were a value
        raise HilcError(f"input array holds NaN or Inf values (sample {int(np.argmin(finite))})")
    return x


def to_logical(graph: Graph, name: str, y: np.ndarray) -> np.ndarray:
    t = graph.tensors[name]
    lay = t.layout or tuple(range(y.ndim))
    inv = [lay.index(i) for i in range(len(lay))]
    return np.ascontiguousarray(y.transpose(inv))


def run_int_batched(graph: Graph, qx: np.ndarray, batch_size: int = 32, workers: int | None = None,
                    engine: str = "numpy") -> np.ndarray:
    """The first output of the integer graph for int8 physical inputs, in batches run on all
    cores: one thread per core with single-threaded BLAS beats one multi-threaded BLAS call on
    these small matrices (measured in benchmarks/spine.py). ``engine="tvm"`` runs the same
    arithmetic as a TVM-built module (hilc[tvm]; bit for bit the same result)."""
    from concurrent.futures import ThreadPoolExecutor

    from hilc.targets.tvm import check_engine

    if check_engine(engine) == "tvm" and graph.meta.get("patch_precision"):
        raise HilcError("--engine tvm runs the layers one by one; a model with --patch-precision value dispatches "
                        "per patch (use --engine numpy)")
    if engine == "tvm":
        from hilc.targets.tvm.engine import run_int as tvm_run_int

        return tvm_run_int(graph, {graph.inputs[0]: qx})[graph.outputs[0]]

    from threadpoolctl import threadpool_limits

    name, out = graph.inputs[0], graph.outputs[0]
    starts = list(range(0, len(qx), batch_size))
    workers = min(workers or os.cpu_count() or 1, max(1, len(starts)))

    def one(start: int) -> np.ndarray:
        return run_int(graph, {name: qx[start:start + batch_size]})[out]

    with threadpool_limits(limits=1, user_api="blas"):
        if workers == 1:
            parts = [one(s) for s in starts]
        else:
            with ThreadPoolExecutor(workers) as ex:
                parts = list(ex.map(one, starts))
    return np.concatenate(parts, axis=0)


def simulate(graph: Graph, x: np.ndarray, raw: bool = False, batch_size: int = 32, engine: str = "numpy",
             workers: int | None = None) -> np.ndarray:
    """Run the integer graph on real inputs in the model's own layout; returns the first output,
    dequantized to float32 (or the raw integer tensor with ``raw``). ``engine``: "numpy" (the
    golden simulator) or "tvm" (the same integers from a TVM-built module, much faster)."""
    if len(graph.inputs) != 1:
        raise HilcError(f"simulate takes one input array; the model has {len(graph.inputs)} inputs")
    name = graph.inputs[0]
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise HilcError(f"input array has dtype {x.dtype}; expected float32")
    if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
        raise HilcError("input array holds NaN or Inf values")
    q = graph.tensors[name].quant
    xp = to_physical(graph, name, x)
    qx = quantize_host(xp, q.scale, q.zero_point, q.bits)
    if len(qx) == 0:
        raise HilcError("input array holds no samples")
    out_name = graph.outputs[0]
    y = to_logical(graph, out_name, run_int_batched(graph, qx, batch_size, workers=workers, engine=engine))
    if raw:
        return y
    qo = graph.tensors[out_name].quant
    return dequantize_host(y, qo.scale, qo.zero_point)


def interpret(graph: Graph, x: np.ndarray) -> np.ndarray:
    """Float interpretation on an input in the model's own layout; returns the first output."""
    name = graph.inputs[0]
    y = run_float(graph, {name: to_physical(graph, name, x.astype(np.float32))})[graph.outputs[0]]
    return to_logical(graph, graph.outputs[0], y)
