"""Scale-out on Ray (``hilc[ray]``): bulk work split into shards that run as Ray tasks.

The integer (or float) graph and its constants go to Ray's object store once (``ray.put``); each
shard gets a reference to it plus its own slice of the inputs. Shards are whole batches of the
single-process loop and their results are merged in shard order, so every answer is identical to
a run without ``--cluster`` (min/max merge by min/max, sampled values concatenate in batch order,
bit-exact outputs concatenate in order).

``cluster``: ``"local"`` starts a private Ray instance on this machine (loopback only, no
dashboard); ``"auto"`` joins the cluster this machine belongs to (``ray start`` / RAY_ADDRESS);
anything else is a cluster address (``HOST:PORT`` or ``ray://HOST:PORT``). When Ray is already
initialised in this process (a test fixture, a notebook) that instance is used as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hilc.errors import HilcError

INSTALL = "pip install 'hilc[ray]'"
SHARD_SAMPLES = 64  # default shard size: see benchmarks/ray_scaling.py for how it was chosen


def require_ray() -> Any:
    """The ray module, or a one-line error with the install command."""
    try:
        import ray
    except ImportError:
        raise HilcError(f"--cluster needs Ray, which is not installed: {INSTALL}") from None
    return ray


def connect(cluster: str) -> Any:
    """Join (or start) the Ray cluster named by ``cluster``; returns the ray module."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                                  configure_logging=False)
    if cluster == "local":
        kwargs.update(address="local", _node_ip_address="127.0.0.1")
    elif cluster == "auto":
        kwargs.update(address="auto")
    else:
        _check_reachable(cluster)
        kwargs.update(address=cluster)
    try:
        ray.init(**kwargs)
    except Exception as e:  # ConnectionError, RuntimeError, ValueError, grpc errors: all mean "not reachable"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "this machine (no running cluster found; start one with 'ray start --head')" \
            if cluster == "auto" else cluster
        raise HilcError(f"cannot reach the Ray cluster at {where}: {first}") from None
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A TCP connect first: Ray itself retries an unreachable GCS for minutes before failing."""
    import socket

    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise HilcError(f"--cluster {address!r}: expected auto, local or HOST:PORT (or ray://HOST:PORT)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise HilcError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def shard_bounds(n: int, shard: int) -> list[tuple[int, int]]:
    if shard < 1:
        raise HilcError(f"shard size {shard}: must be at least 1")
    return [(s, min(n, s + shard)) for s in range(0, n, shard)]


def map_shards(fn: Callable[..., Any], shared: Any, x: np.ndarray, bounds: Sequence[tuple[int, int]],
               cluster: str, progress: Callable[[int, int], None] | None = None,
               extra: tuple = (), num_cpus: float = 1) -> list[Any]:
    """``[fn(shared, x[a:b], a, *extra) for a, b in bounds]`` as Ray tasks, results in shard order.

    ``shared`` is put in the object store once; ``progress(done_samples, total)`` is called as
    shards finish (in whatever order they finish)."""
    ray = connect(cluster)
    shared_ref = shared if isinstance(shared, ray.ObjectRef) else ray.put(shared)  # a ref: put once by the caller
    task = ray.remote(num_cpus=num_cpus, max_retries=2)(fn)
    refs = [task.remote(shared_ref, x[a:b], a, *extra) for a, b in bounds]
    size = {r: b - a for r, (a, b) in zip(refs, bounds, strict=True)}
    total, done = int(sum(size.values())), 0
    pending = list(refs)
    part = getattr(progress, "part", None)  # a hilc.progress.PartsProgress also shows the shard count
    if part is not None:
        part("shards", 0, len(refs))
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        done += size[ready[0]]
        if progress is not None:
            progress(done, total)
        if part is not None:
            part("shards", len(refs) - len(pending), len(refs), f"({len(pending)} running or queued)")
    try:
        return ray.get(refs)
    except ray.exceptions.RayError as e:
        raise HilcError(f"a shard failed on the Ray cluster: {str(e).strip().splitlines()[-1]}") from None


# --- accuracy evaluation of a compiled model -------------------------------------------------------

def _sim_shard(graph, x: np.ndarray, start: int, raw: bool, engine: str = "numpy") -> np.ndarray:
    from hilc.sim.simulator import simulate

    # one thread per task: Ray runs one task per CPU it was given, so more threads would oversubscribe
    return simulate(graph, x, raw=raw, workers=1, engine=engine)


def simulate_sharded(graph, x: np.ndarray, raw: bool = False, cluster: str | None = None,
                     shard: int = SHARD_SAMPLES, progress: Callable[[int, int], None] | None = None,
                     engine: str = "numpy") -> np.ndarray:
    """The simulator's outputs for ``x`` (``engine`` numpy or tvm: the same integers); with
    ``cluster`` run as Ray tasks of ``shard`` samples."""
    from hilc.sim.simulator import simulate

    if cluster is None:
        return simulate(graph, x, raw=raw, engine=engine)
    parts = map_shards(_sim_shard, graph, x, shard_bounds(len(x), shard), cluster, progress, extra=(raw, engine))
    return np.concatenate(parts)


def accuracy(y: np.ndarray, labels: np.ndarray | None = None, reference: np.ndarray | None = None) -> dict[str, Any]:
    """Top-1 against labels and/or agreement with reference outputs (e.g. the float model's)."""
    out: dict[str, Any] = {"samples": int(len(y))}
    pred = y.reshape(len(y), -1).argmax(axis=1)
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(y):
            raise HilcError(f"labels: {len(labels)} labels for {len(y)} inputs")
        classes = y.reshape(len(y), -1).shape[1]
        # a fractional, NaN or out-of-range label would only ever count as wrong: a silent 0% top-1
        if labels.dtype.kind not in "iuf":
            raise HilcError(f"labels: expected integer class indices, got dtype {labels.dtype}")
        if labels.dtype.kind == "f":
            odd = ~np.isfinite(labels) | (labels != np.round(labels))
            if odd.any():
                i = int(np.argmax(odd))
                raise HilcError(f"labels: expected integer class indices, got {labels[i]} at index {i}")
        bad = (labels < 0) | (labels >= classes)
        if bad.any():
            i = int(np.argmax(bad))
            raise HilcError(f"labels: label {labels[i]:g} at index {i} is not a class of the model's {classes} "
                            f"outputs (0..{classes - 1})")
        out["top1"] = float(np.mean(pred == labels))
    if reference is not None:
        reference = np.asarray(reference)
        if reference.shape != y.shape:
            raise HilcError(f"reference: shape {list(reference.shape)}, the outputs have {list(y.shape)}")
        if reference.dtype.kind not in "iuf" or not np.all(np.isfinite(reference)):
            raise HilcError(f"reference: expected finite numbers, got {reference.dtype} values with NaN or Inf"
                            if reference.dtype.kind == "f" else f"reference: expected numbers, got {reference.dtype}")
        out["top1_agreement"] = float(np.mean(pred == reference.reshape(len(y), -1).argmax(axis=1)))
        out["max_abs_diff"] = float(np.max(np.abs(y.astype(np.float64) - reference)))
    return out


# --- searches: one Ray task per candidate ----------------------------------------------------------

def map_candidates(fn: Callable[..., list[Any]], shared: Any, cands: Sequence[Any], cluster: str, label: str,
                   extra: tuple = ()) -> list[Any]:
    """``fn(shared, cands[i:i+1], i, *extra)[0]`` for every candidate, one Ray task each, in
    candidate order (the order they were given, whatever order they finish in). ``shared`` (the
    graph, the inputs) goes to the object store once. Progress: candidates done, total and the
    task count, on a terminal."""
    from hilc.progress import parts_progress

    if not cands:
        return []
    with parts_progress(f"{label} on Ray ({cluster})") as update:
        parts = map_shards(fn, shared, list(cands), shard_bounds(len(cands), 1), cluster, update, extra)
    return [v for part in parts for v in part]


def sensitivity_candidates(shared: tuple, cands: Sequence[tuple[str, str, int]], cluster: str) -> dict[tuple, float]:
    """Mixed precision: the output perturbation of every (kind, layer or activation, width)
    candidate (``hilc.compiler.mixed._sensitivity_shard``), one Ray task each; ``shared`` is
    ``(graph, inputs, reference outputs, scale[, engine])``. Weight candidates ("wptq") fit one layer's
    learned rounding each, which is the same fit as the single process's walk over all layers."""
    from hilc.compiler.mixed import _sensitivity_shard

    values = map_candidates(_sensitivity_shard, shared, cands, cluster, "sensitivity")
    return dict(zip(cands, values, strict=True))


def cluster_cpus(cluster: str) -> int:
    """The CPUs of the cluster (at least 1): how many candidates a search packs ahead at a time."""
    ray = connect(cluster)
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _patch_candidates_task(graph, ks: list[int], start: int, layer_macs: list[int]) -> list[list[tuple]]:
    from hilc.compiler.patches import _grids, build_candidate

    out = []
    for k in ks:
        cs = [build_candidate(graph, k, n, layer_macs) for n in _grids(graph, k)]
        out.append([(c.k, c.n, c.macs, c.lower_bound) for c in cs])  # the plans stay here: big, rebuilt on demand
    return out


def patch_candidates(graph, valid: Sequence[int], layer_macs: list[int], cluster: str) -> list[Any]:
    """The patch search's candidates (every split point x grid, ``patches.build_candidate``),
    one Ray task per split point, in the single process's order. Their plans (thousands of
    windows) are not sent back: the scan needs MACs and bounds only; ``full_peaks`` rebuilds a
    plan where it packs it and the search rebuilds the chosen one (``patches._with_plan``)."""
    from hilc.compiler.patches import Candidate

    per_k = map_candidates(_patch_candidates_task, graph, list(valid), cluster, "patch candidates",
                           extra=(layer_macs,))
    return [Candidate(k, n, None, macs, bound) for cs in per_k for k, n, macs, bound in cs]


def put(obj: Any, cluster: str) -> Any:
    """``obj`` in the object store once, for several ``map_candidates`` calls."""
    return connect(cluster).put(obj)


def _full_peak_task(graph, cands: list, start: int, scratch: int, reorder: bool,
                    layer_macs: list[int]) -> list[tuple]:
    from hilc.compiler.patches import _full_peak, build_candidate

    out = []
    for k, n in cands:
        c = build_candidate(graph, k, n, layer_macs)
        peak = _full_peak(graph, c, scratch, reorder)
        out.append((peak, c.order, c.peak_given_order))
    return out


def full_peaks(graph, cands: list, scratch: int, reorder: bool, cluster: str, layer_macs: list[int]) -> list:
    """Pack each candidate's full plan (``patches._full_peak``), one Ray task each; sets the
    candidates' ``peak``, ``order`` and ``peak_given_order`` as the single process would.
    ``graph`` may be an object-store reference (``put``)."""
    got = map_candidates(_full_peak_task, graph, [(c.k, c.n) for c in cands], cluster, "patch plans",
                         extra=(scratch, reorder, layer_macs))
    for c, (peak, order, given) in zip(cands, got, strict=True):
        c.peak, c.order, c.peak_given_order = peak, order, given
    return cands


def _clip_task(shared: tuple, items: list, start: int) -> list[dict[str, list[float]]]:
    from hilc.compiler.mixed import _mse_clip

    widths = shared
    return [{str(b): list(_mse_clip(v.astype(np.float64), lo, hi, b)) for b in widths} for v, lo, hi in items]


def clip_ranges(items: Sequence[tuple[np.ndarray, float, float]], widths: Sequence[int],
                cluster: str) -> list[dict[str, list[float]]]:
    """Sub-byte widths: each activation's MSE-optimal clipped range at every width in ``widths``
    (``mixed._mse_clip`` on its sampled values ``(values, lo, hi)``), a Ray task per activation."""
    return map_candidates(_clip_task, tuple(widths), list(items), cluster, "clipped ranges")


def _entropy_task(shared: Any, items: list, start: int) -> list[dict[int, float]]:
    from hilc.compiler.patch_precision import _codes, _entropy

    return [{b: _entropy(_codes(v.astype(np.float64), lo, hi, b)) for b, lo, hi in widths} for v, widths in items]


def code_entropies(items: Sequence[tuple[np.ndarray, list[tuple[int, float, float]]]],
                   cluster: str) -> list[dict[int, float]]:
    """Patch precision's value-driven search: the entropy of each feature map's codes at each
    candidate width ``(bits, lo, hi)`` (``patch_precision._entropy``), a Ray task per feature map."""
    return map_candidates(_entropy_task, None, list(items), cluster, "patch-precision candidates")
