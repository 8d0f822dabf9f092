"""Calibration: activation ranges from sample inputs (min/max, percentile or MSE-optimal clip).

Ranges are recorded in ``graph.meta['calibration']`` ({tensor: [lo, hi]}), where the
quantizer reads them and ``graph.json`` shows them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hilc.compiler import arith
from hilc.compiler.ir import Graph
from hilc.errors import HilcError
from hilc.sim.simulator import check_shape, run_float, to_physical

METHODS = ("minmax", "percentile", "mse")
SAMPLES_PER_TENSOR = 1 << 18  # values kept per tensor for percentile / MSE searches


def load_samples(path: str | Path) -> np.ndarray:
    """A .npy array, or an .npz holding exactly one array; first axis = samples."""
    path = Path(path)
    if not path.exists():
        raise HilcError(f"{path}: no such file")
    if path.is_dir():
        raise HilcError(f"{path}: is a directory, expected an .npy/.npz file")
    with open(path, "rb") as f:
        head = f.read(6)
    if not head:
        raise HilcError(f"{path}: empty file, expected an .npy/.npz array")
    if not head.startswith((b"\x93NUMPY", b"PK")):  # numpy would call anything else "pickled data"
        raise HilcError(f"{path}: not an .npy/.npz file (it starts with {head!r}; save arrays with numpy.save)")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:
        raise HilcError(f"{path}: not a readable .npy/.npz file ({e})") from None
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            if len(data.files) != 1:
                raise HilcError(f"{path}: an .npz calibration file must hold exactly one array, "
                                f"found {len(data.files)} ({', '.join(data.files)})")
            try:
                data = data[data.files[0]]
            except Exception as e:  # a damaged member (bad CRC, cut short) shows only when it is read
                raise HilcError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    return data


def check_samples(graph: Graph, x: np.ndarray, source: str) -> np.ndarray:
    if not np.issubdtype(x.dtype, np.floating):
        raise HilcError(f"{source}: dtype {x.dtype}, expected float32 values in the model's input range")
    if x.shape[:1] == (0,):
        raise HilcError(f"{source}: holds no samples")
    if not np.all(np.isfinite(x)):
        raise HilcError(f"{source}: holds NaN or Inf values")
    try:
        check_shape(graph, graph.inputs[0], x.shape)
    except HilcError as e:
        raise HilcError(f"{source}: {e}") from None
    return x.astype(np.float32)


class _Stats:
    def __init__(self, rng: np.random.Generator | None) -> None:
        self.lo, self.hi = np.inf, -np.inf
        self.samples: list[np.ndarray] = []
        self.kept = 0
        self.rng = rng

    def add(self, v: np.ndarray, keep_fraction: float) -> None:
        flat = v.reshape(-1)
        self.lo, self.hi = min(self.lo, float(flat.min())), max(self.hi, float(flat.max()))
        k = max(1, int(round(flat.size * keep_fraction)))
        if k < flat.size:
            flat = flat[self.rng.integers(0, flat.size, k)]
        self.samples.append(flat.astype(np.float32))

    def range(self, method: str, percentile: float) -> tuple[float, float]:
        if method == "minmax":
            return self.lo, self.hi
        vals = np.concatenate(self.samples)
        if method == "percentile":
            return float(np.percentile(vals, 100 - percentile)), float(np.percentile(vals, percentile))
        return _mse_range(vals, self.lo, self.hi)


def _mse_range(vals: np.ndarray, lo: float, hi: float, bits: int = 8,
               alphas: np.ndarray | None = None) -> tuple[float, float]:
    """The clipped range among shrinkings of [lo, hi] (by ``alphas``, default 0.2..1 in steps
    of 0.01) with the least quantization MSE at ``bits`` bits (``mixed`` searches its sub-byte
    ranges with it too)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo < 1e-12:
        return lo, hi
    v = vals.astype(np.float64)
    best, best_err = (lo, hi), np.inf
    qmin, qmax = arith.qrange(bits)
    for alpha in np.linspace(0.2, 1.0, 81) if alphas is None else alphas:
        a, b = lo * alpha, hi * alpha
        scale, zp = arith.choose_qparams(a, b, bits)
        q = np.clip(np.rint(v / scale) + zp, qmin, qmax)
        err = float(np.mean(((q - zp) * scale - v) ** 2))
        if err < best_err:
            best, best_err = (a, b), err
    return best


def _observe(graph: Graph, x: np.ndarray, first_batch: int, n_total: int, method: str,
             batch_size: int, progress=None, offset: int = 0) -> dict[str, _Stats]:
    """Statistics of ``x`` (whole batches of the full loop, starting at batch ``first_batch``).

    Each batch draws its subsamples from its own generator seeded by the batch index, so the
    statistics of a shard do not depend on which shards ran before it: merged in batch order
    (``_merge``) they equal those of one pass over all samples, whichever machine ran each shard."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        # one BLAS thread: a multi-threaded GEMM may sum in another order and move the float ranges
        # by an ulp, so the result would depend on the machine's (or the Ray worker's) thread count
        stats = _observe_batches(graph, x, first_batch, n_total, method, batch_size, progress, offset)
    if method == "minmax":  # only lo/hi are used: do not ship the (tiny) samples around
        for s in stats.values():
            s.samples = []
    return stats


def _observe_batches(graph: Graph, x: np.ndarray, first_batch: int, n_total: int, method: str,
                     batch_size: int, progress, offset: int) -> dict[str, _Stats]:
    stats: dict[str, _Stats] = {}
    name = graph.inputs[0]
    n = len(x)
    for i, start in enumerate(range(0, n, batch_size)):
        rng = np.random.default_rng([0, first_batch + i])

        def observe(tname: str, v: np.ndarray, rng=rng) -> None:
            per_sample = max(1, v.size // max(1, v.shape[0]))
            frac = min(1.0, SAMPLES_PER_TENSOR / (per_sample * n_total))
            s = stats.setdefault(tname, _Stats(rng))
            s.rng = rng
            s.add(v, frac if method != "minmax" else 0.0)

        run_float(graph, {name: to_physical(graph, name, x[start:start + batch_size])}, observe=observe)
        if progress is not None:
            progress(offset + min(n, start + batch_size), n_total)
    return stats


def _merge(parts: list[dict[str, _Stats]]) -> dict[str, _Stats]:
    """Shard statistics merged in shard order: min of mins, max of maxes, samples concatenated."""
    out: dict[str, _Stats] = {}
    for part in parts:
        for t, s in part.items():
            m = out.setdefault(t, _Stats(None))
            m.lo, m.hi = min(m.lo, s.lo), max(m.hi, s.hi)
            m.samples.extend(s.samples)
    return out


def _observe_shard(graph: Graph, x: np.ndarray, start: int, batch_size: int, n_total: int,
                   method: str) -> dict[str, _Stats]:
    stats = _observe(graph, x, start // batch_size, n_total, method, batch_size)
    for s in stats.values():
        s.rng = None  # a Generator need not travel back
    return stats


def calibrate(graph: Graph, samples: np.ndarray, method: str = "minmax", percentile: float = 99.99,
              batch_size: int = 64, progress=None, source: str = "calibration data",
              cluster: str | None = None, shard: int | None = None) -> Graph:
    """Run the float graph on ``samples`` (model layout) and record every tensor's range.

    ``cluster`` (``hilc[ray]``): run shards of ``shard`` samples (a multiple of ``batch_size``) as
    Ray tasks; the ranges are identical to a single-process run."""
    if method not in METHODS:
        raise HilcError(f"unknown calibration method '{method}' (choose from {', '.join(METHODS)})")
    x = check_samples(graph, samples, source)
    g = graph.copy()
    n = len(x)
    if cluster is None:
        stats = _observe(g, x, 0, n, method, batch_size, progress)
    else:
        from hilc.distributed import map_shards, shard_bounds

        # whole batches per shard: the float run of a batch is then the same computation everywhere
        shard = max(1, (shard or 2 * batch_size) // batch_size) * batch_size
        parts = map_shards(_observe_shard, g, x, shard_bounds(n, shard), cluster, progress,
                           extra=(batch_size, n, method))
        stats = _merge(parts)
    g.meta["calibration"] = {t: [float(v) for v in s.range(method, percentile)] for t, s in stats.items()}
    g.meta["calibration_method"] = {"method": method, "samples": int(n),
                                    **({"percentile": percentile} if method == "percentile" else {})}
    return g
