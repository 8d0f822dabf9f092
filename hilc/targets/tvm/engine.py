"""Build and run the integer graph with TVM.

Lowering: every node's ``Op.lower_tvm`` turns its inputs (TE tensors, batch axis symbolic) into
TE computations through a ``TVMBuilder``; the whole graph becomes one TIR function taking the
int8 inputs, the constants and the int8 outputs. Arithmetic is the simulator's, from
``hilc.compiler.arith``: exact integer accumulators, the dyadic requantization with the same
ties-to-even rounding shift, clamps and lookup tables. Like the simulator, a layer may
accumulate in float32 (or requantize in float64) only where its static bound proves every
value an exact integer in that type (``arith.FAST_EXACT_PATHS``); otherwise int32/int64.

Schedule: the batch loop of the last output is the one parallel loop and every other block
is computed inside it, so each thread runs whole samples with their intermediates in cache.
Convolutions are register-tiled (a few output columns x a vector of output channels, the
reduction outside) so LLVM keeps the accumulators in vector registers.

Cache: a built module is exported as a shared library named by the hash of the graph, the
lowering code, TVM's version and the LLVM target, with a checksum beside it, under
``cache_dir`` (default ``$HILC_TVM_CACHE`` or ``~/.cache/hilc/tvm``), and kept loaded per
process.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from hilc.compiler import arith
from hilc.compiler.ir import Graph, Node
from hilc.compiler.ops import OPS
from hilc.errors import HilcError
from hilc.targets.tvm import require_tvm

# The cache key also hashes this file and the ops modules' sources; bump this for changes
# elsewhere that alter what a cached module computes.
LOWERING_VERSION = 1
_LOADED: dict[str, TVMModel] = {}  # key -> model built or loaded by this process
_LOCK = threading.Lock()


class TVMBuilder:
    """What ``Op.lower_tvm`` uses: TE, the graph's tensors, constants and shared helpers."""

    def __init__(self, graph: Graph, fast: bool, parametric: bool = False) -> None:
        tvm = require_tvm()
        from tvm import te, tirx

        self.tvm, self.te, self.tirx = tvm, te, tirx
        self.graph = graph
        self.fast = fast  # arith.FAST_EXACT_PATHS when the module was built
        # parametric: the quantization scalars (zero points, clamp bounds, scalar multipliers and
        # shifts) become arguments too, so one build serves every graph of the same structure
        self.parametric = parametric
        self.n = te.var("n")  # the batch
        self.tensors: dict[str, Any] = {}
        self.constants: list[tuple[Any, np.ndarray]] = []  # (placeholder, value) in argument order
        self.scalars: list[tuple[Any, int | float]] = []  # (TIR var, value), after the constants (parametric)
        self.conv_tiles: list[tuple[str, str]] = []  # (accumulator block, output block) to register-tile
        self.notes: list[str] = []  # schedule steps that did not apply (correct, only slower)
        self._names: set[str] = set()

    # --- names, inputs, constants -------------------------------------------------------
    def name(self, node: Node, suffix: str = "") -> str:
        base = "".join(ch if ch.isalnum() else "_" for ch in node.name + (f"_{suffix}" if suffix else ""))
        name, k = base, 1
        while name in self._names:
            name, k = f"{base}_{k}", k + 1
        self._names.add(name)
        return name

    def input(self, node: Node, i: int = 0):
        return self.tensors[node.inputs[i]]

    def shape(self, tensor: str) -> tuple[int, ...]:
        """Physical shape of an activation, batch axis symbolic."""
        return (self.n, *self.graph.tensors[tensor].shape[1:])

    def const(self, node: Node, label: str, value: np.ndarray):
        """A constant array, passed to the built function as an argument."""
        value = np.ascontiguousarray(value)
        ph = self.te.placeholder(value.shape, str(value.dtype), self.name(node, label))
        self.constants.append((ph, value))
        return ph

    def scalar(self, node: Node, label: str, value: int | float, dtype: str):
        """A quantization scalar in ``dtype``: an immediate, or with ``parametric`` a function
        argument (int64 or float64, the types a call passes, cast to ``dtype`` where it is used)."""
        tx = self.tirx
        if not self.parametric:
            return tx.const(value, dtype)
        wide = "float64" if dtype.startswith("float") else "int64"
        v = self.tirx.Var(self.name(node, label), wide)
        self.scalars.append((v, float(value) if wide == "float64" else int(value)))
        return v if wide == dtype else v.astype(dtype)

    def acc_dtype(self, raw_bound: int) -> str:
        """float32 where every partial sum is an integer below 2**24 (float32 arithmetic is then
        exact in any order, FMA included), else int32 (the contract's accumulator)."""
        return "float32" if self.fast and raw_bound < 2**24 else "int32"

    # --- arithmetic -----------------------------------------------------------------------
    def requantizer(self, node: Node, mult, shift, zp_out: int, lo: int, hi: int, bound: int | None,
                    offset: np.ndarray | None = None, label: str = "rq") -> Callable:
        """``rq(acc, idx)``: ``clamp(rounding_shift((acc + offset[idx]) * b[idx], c[idx]) + zp, lo, hi)``
        as int8, per channel ``idx`` when ``mult``/``shift`` are arrays (scalars otherwise).

        ``acc`` is an exact integer (an int, or a float holding one). With ``bound`` (a proven bound
        on |acc + offset|) and ``bound * max(b) < 2**53`` the product is an exact float64 integer
        and scaling by the power of two 2**-c is exact, so float64 ``nearbyint`` (ties to even)
        is bit for bit the integer rounding shift, as in ``arith.requantize``.
        """
        tx = self.tirx
        b = np.atleast_1d(np.asarray(mult, np.int64))
        c = np.atleast_1d(np.asarray(shift, np.int64))
        per_channel = np.ndim(mult) > 0
        use_float = self.fast and bound is not None and bound * int(b.max(initial=0)) < 2**53
        off = None
        if use_float:
            m = np.ldexp(b.astype(np.float64), -c.astype(np.int32))  # b / 2**c, exact
            m_t = self.const(node, f"{label}_m", m) if per_channel else None
            if offset is not None:
                off = self.const(node, f"{label}_off", offset.astype(np.float64))
        else:
            b_t = self.const(node, f"{label}_b", b) if per_channel else None
            c_t = self.const(node, f"{label}_c", c) if per_channel else None
            if offset is not None:
                off = self.const(node, f"{label}_off", offset.astype(np.int64))
        if use_float:
            m_s = None if per_channel else self.scalar(node, f"{label}_m", float(m[0]), "float64")
            zp_f, lo_f, hi_f = (self.scalar(node, f"{label}_{k}", float(v), "float64")
                                for k, v in (("zp", zp_out), ("lo", lo), ("hi", hi)))
        else:
            b_s = None if per_channel else self.scalar(node, f"{label}_b", int(b[0]), "int64")
            c_s = None if per_channel else self.scalar(node, f"{label}_c", int(c[0]), "int64")
            zp_i, lo_i, hi_i = (self.scalar(node, f"{label}_{k}", int(v), "int64")
                                for k, v in (("zp", zp_out), ("lo", lo), ("hi", hi)))

        def rq(acc, idx=None):
            if use_float:
                v = acc.astype("float64")
                if off is not None:
                    v = v + off[idx]
                mm = m_t[idx] if per_channel else m_s
                y = tx.nearbyint(v * mm) + zp_f
                y = tx.max(tx.min(y, hi_f), lo_f)
                return y.astype("int32").astype("int8")
            v = acc.astype("int64")
            if off is not None:
                v = v + off[idx]
            bb = b_t[idx] if per_channel else b_s
            cc = c_t[idx] if per_channel else c_s
            y = rounding_shift(tx, v * bb, cc) + zp_i
            y = tx.max(tx.min(y, hi_i), lo_i)
            return y.astype("int8")

        return rq

    def pad_cast(self, node: Node, x, pads: list[int], value: int, dtype: str):
        """[n, H+t+b, W+l+r, C] copy of an NHWC tensor in ``dtype``, borders holding ``value``."""
        te, tx = self.te, self.tirx
        fill = self.scalar(node, "pad", value, dtype)
        t, left, bot, r = pads
        _, h, w, c = x.shape
        h, w = int(h), int(w)

        def f(b, i, j, ch):
            inside = tx.all(i >= t, i < t + h, j >= left, j < left + w)
            return tx.if_then_else(inside, x[b, i - t, j - left, ch].astype(dtype), fill)

        return te.compute((self.n, h + t + bot, w + left + r, c), f, name=self.name(node, "pad"))

    def tile_conv(self, acc, y) -> None:
        self.conv_tiles.append((acc.op.name, y.op.name))


def rounding_shift(tx, p, c):
    """``arith.rounding_shift`` on int64 TIR expressions: floor shift, ties to even."""
    one = tx.const(1, "int64")
    return (p + ((one << (c - one)) - one) + ((p >> c) & one)) >> c


# --- build --------------------------------------------------------------------------------

@dataclass
class TVMModel:
    """A built (or loaded) module and the constants it takes, ready to run batches."""

    key: str
    func: Any
    constants: list[Any]  # tvm tensors, in argument order
    inputs: list[str]
    outputs: list[str]
    out_shapes: list[tuple[int, ...]]
    build_seconds: float = 0.0
    from_cache: bool = False
    schedule_notes: list[str] = field(default_factory=list)  # of a fresh build
    scalars: list[int | float] = field(default_factory=list)  # after the constants (a parametric module)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """int8 physical inputs (any batch) -> int8 physical outputs, like ``sim.run_int``."""
        import tvm

        for k in self.inputs:
            v = feeds[k]
            if v.dtype != np.int8:
                raise HilcError(f"input '{k}': the integer engine takes int8 data, got {v.dtype}")
        n = len(feeds[self.inputs[0]])
        if any(len(feeds[k]) != n for k in self.inputs):
            raise HilcError("all inputs must have the same batch size")
        if n == 0:
            return {o: np.zeros((0, *s), np.int8) for o, s in zip(self.outputs, self.out_shapes, strict=True)}
        dev = tvm.cpu()
        ins = [tvm.runtime.tensor(np.ascontiguousarray(feeds[k]), dev) for k in self.inputs]
        outs = [tvm.runtime.empty((n, *s), "int8", dev) for s in self.out_shapes]
        with self._lock:  # one call at a time: the function already uses every core
            self.func(*ins, *self.constants, *self.scalars, *outs)
        return {name: o.numpy() for name, o in zip(self.outputs, outs, strict=True)}


def target_spec() -> dict[str, Any]:
    require_tvm()
    from tvm.target import codegen

    return {"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu()), "num-cores": os.cpu_count() or 1}


def default_cache_dir() -> Path:
    env = os.environ.get("HILC_TVM_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hilc" / "tvm"


def module_key(graph: Graph, fast: bool | None = None) -> str:
    """The cache key: the graph, the code that lowers it (so an edited lowering never reuses a
    stale module), the exact-paths mode, TVM's version and the LLVM target."""
    tvm = require_tvm()
    fast = arith.FAST_EXACT_PATHS if fast is None else fast
    h = hashlib.sha256(f"{graph.content_hash():016x}|v{LOWERING_VERSION}|fast={fast}|tvm={tvm.__version__}|"
                       f"{sorted(target_spec().items())}".encode())
    h.update(Path(__file__).read_bytes())
    for src in sorted({inspect.getsourcefile(type(OPS[n.op])) for n in graph.nodes}):
        h.update(Path(src).read_bytes())
    return h.hexdigest()[:24]


def lower(graph: Graph, fast: bool, parametric: bool = False):
    """The TE program of the whole graph: (builder, input placeholders, output tensors)."""
    if not graph.is_quantized:
        raise HilcError("the TVM engine runs quantized graphs only (compile the model first)")
    tb = TVMBuilder(graph, fast, parametric)
    ins = []
    for name in graph.inputs:
        ph = tb.te.placeholder(tb.shape(name), "int8", "in_" + "".join(ch if ch.isalnum() else "_" for ch in name))
        tb.tensors[name] = ph
        ins.append(ph)
    for node in graph.nodes:
        op = OPS[node.op]
        fn = getattr(op, "lower_tvm", None)
        if fn is None:
            raise HilcError(f"{node.name}: operator '{node.op}' has no TVM lowering yet; "
                            "use the numpy engine (--engine numpy)")
        outs = fn(node, graph, tb)
        for name, t in zip(node.outputs, outs, strict=True):
            tb.tensors[name] = t
    outs = []
    for name in graph.outputs:
        t = tb.tensors[name]
        # a function output must be a buffer of its own: copy graph inputs and repeated outputs
        if isinstance(t.op, tb.tvm.te.PlaceholderOp) or any(t.same_as(o) for o in outs):
            t = _copy(tb, t, "out_" + "".join(ch if ch.isalnum() else "_" for ch in name))
        outs.append(t)
    return tb, ins, outs


def _copy(tb: TVMBuilder, src, name: str):
    return tb.te.compute(src.shape, lambda *i: src(*i), name=name)


def schedule(tb: TVMBuilder, func):
    """Per-sample fusion under one parallel batch loop, and register-tiled convolutions."""
    from tvm.s_tir import Schedule

    sch = Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root") if _has_root(sch) else None)
    names = [sch.get(b).name_hint for b in blocks]
    anchor = blocks[-1]
    batch_loop = sch.get_loops(anchor)[0]
    at_root = []
    for blk, name in zip(reversed(blocks[:-1]), reversed(names[:-1]), strict=True):
        try:
            sch.compute_at(blk, batch_loop)
        except Exception:
            at_root.append(name)  # e.g. a second graph output: runs as its own batch loop
    tb.notes += [f"{n}: own batch loop" for n in at_root]
    # parallel loops first: after decompose_reduction the blocks no longer qualify
    sch.parallel(batch_loop)
    for name in at_root:
        try:
            sch.parallel(sch.get_loops(sch.get_sblock(name))[0])
        except Exception:
            pass
    tiled = {n for pair in tb.conv_tiles for n in pair}
    for acc_name, y_name in tb.conv_tiles:
        try:  # schedule primitives fail without changing the schedule: only this tiling is lost
            _tile_conv(sch, acc_name, y_name)
        except Exception as e:
            if os.environ.get("HILC_DEBUG"):
                raise
            tb.notes.append(f"{y_name}: not tiled ({type(e).__name__})")
    for name in names:
        if name not in tiled and name not in at_root and name != names[-1]:
            _vectorize_inner(sch, name)
    return sch.mod


def _vectorize_inner(sch, name: str) -> None:
    """The innermost loop of an elementwise block (channels, in NHWC) as vectors of 8 and more."""
    blk = sch.get_sblock(name)
    if any(int(iv.iter_type) != 0 for iv in sch.get(blk).iter_vars):
        return  # a reduction: its innermost loop is not independent
    loops = sch.get_loops(blk)
    if len(loops) < 2:
        return
    ext = sch.get(loops[-1]).extent
    if isinstance(ext, int) or hasattr(ext, "value"):
        ext = int(ext)
        if ext % 8 == 0 and ext <= 512:
            sch.vectorize(loops[-1])


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:
        return False


def _divisor(n: int, choices: tuple[int, ...]) -> int:
    return next((d for d in choices if n % d == 0), 1)


def _tile_conv(sch, acc_name: str, y_name: str) -> None:
    """Output block loops (.., i, j, o): j split by J and o by T; the accumulator block is
    computed per (j-tile, o-tile) with the reduction outside and (J x T) innermost, T vectorized:
    J * T/8 accumulators live in AVX registers across the whole reduction."""
    yb, ab = sch.get_sblock(y_name), sch.get_sblock(acc_name)
    loops = sch.get_loops(yb)
    if len(loops) < 3:
        return
    j, o = loops[-2], loops[-1]
    ow, oc = int(sch.get(j).extent), int(sch.get(o).extent)
    # measured on resnet8's layers (AVX2, 16 registers): 8 columns x 8 channels for 16 channels,
    # 4 columns x 16 channels from 32 channels on; 8 accumulator registers either way
    if oc % 16 == 0 and oc >= 32:
        tile_o, tile_j = 16, _divisor(ow, (4, 2))
    else:
        tile_o = 8 if oc % 8 == 0 else oc
        tile_j = _divisor(ow, (8, 4, 2))
    jo, ji = sch.split(j, [None, tile_j])
    oo, oi = sch.split(o, [None, tile_o])
    sch.reorder(jo, oo, ji, oi)
    sch.compute_at(ab, oo)
    aloops = sch.get_loops(ab)
    # under oo: the tile's spatial loops (J, T; unit ones are dropped), then the reduction loops
    n_red = sum(1 for iv in sch.get(ab).iter_vars if int(iv.iter_type) == 2 and int(iv.dom.extent) > 1)
    n_sp = (tile_j > 1) + (tile_o > 1)
    red = list(aloops[len(aloops) - n_red:]) if n_red else []
    sp = list(aloops[len(aloops) - n_red - n_sp:len(aloops) - n_red])
    if red:
        sch.reorder(*red, *sp)
    if tile_o % 8 == 0:
        sch.vectorize(sp[-1])
        sch.vectorize(oi)
    if tile_j > 1:
        sch.unroll(sp[0])
    if red:  # the zeroing of the accumulators moves out of the reduction (last: it splits the block)
        sch.decompose_reduction(ab, red[0])


def build(graph: Graph, cache_dir: str | Path | None = None, fast: bool | None = None) -> TVMModel:
    """The built module of ``graph``: from this process, from the disk cache, or compiled now."""
    require_tvm()
    fast = arith.FAST_EXACT_PATHS if fast is None else fast
    key = module_key(graph, fast)
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
        t0 = time.perf_counter()
        tb, ins, outs = lower(graph, fast)
        mod, from_cache = _compile_or_load(tb, ins, outs, key, cache_dir)
        model = _model(tb, graph, key, mod, from_cache, t0)
        _LOADED[key] = model
        return model


def build_parametric(graph: Graph, cache_dir: str | Path | None = None, fast: bool | None = None) -> TVMModel:
    """A module whose constants are all arguments (weights, biases, lookup tables, per-channel and
    scalar multipliers and shifts, zero points, clamp bounds), built once per *structure* and
    reused with each graph's values: what a search that evaluates many variants of one graph
    (other bit-widths, other scales) needs, where a build per variant would cost more than it saves.

    The structure key hashes the lowered TIR function itself (its text and TVM's structural hash)
    with every such value a parameter, so whatever is still fixed at build time -- shapes, the
    operators, which accumulator and requantization paths a layer's bounds allow, table offsets --
    is part of the key: two graphs share a module only where the same code computes both. Sub-byte
    weights are int8 values in the IR already (packing is the MCU backend's), so a layer's weight
    width changes argument values, not the structure."""
    t0 = time.perf_counter()
    key, tb, ins, outs, func = _lower_parametric(graph, fast)
    with _LOCK:
        if key in _LOADED:  # the same structure: this graph's values, the built function
            base = _LOADED[key]
            return replace(base, constants=_tensors(tb), scalars=[v for _, v in tb.scalars],
                           inputs=list(graph.inputs), outputs=list(graph.outputs),
                           build_seconds=time.perf_counter() - t0, from_cache=True, schedule_notes=[])
        mod, from_cache = _compile_or_load(tb, ins, outs, key, cache_dir, func)
        model = _model(tb, graph, key, mod, from_cache, t0)
        _LOADED[key] = model
        return model


def parametric_key(graph: Graph, fast: bool | None = None) -> str:
    """The structure key ``build_parametric`` files the graph's module under."""
    return _lower_parametric(graph, fast)[0]


def _lower_parametric(graph: Graph, fast: bool | None):
    tvm = require_tvm()
    import tvm_ffi

    fast = arith.FAST_EXACT_PATHS if fast is None else fast
    tb, ins, outs = lower(graph, fast, parametric=True)
    func = _prim_func(tb, ins, outs)
    h = hashlib.sha256(f"param|v{LOWERING_VERSION}|fast={fast}|tvm={tvm.__version__}|{sorted(target_spec().items())}|"
                       f"{tvm_ffi.structural_hash(func)}|{tb.conv_tiles}|".encode())
    h.update(Path(__file__).read_bytes())  # the schedule
    h.update(func.script().encode())
    return "p" + h.hexdigest()[:23], tb, ins, outs, func


def _prim_func(tb: TVMBuilder, ins, outs):
    return tb.te.create_prim_func([*ins, *(c for c, _ in tb.constants), *(v for v, _ in tb.scalars), *outs])


def _tensors(tb: TVMBuilder) -> list[Any]:
    import tvm

    dev = tvm.cpu()
    return [tvm.runtime.tensor(v, dev) for _, v in tb.constants]


def _model(tb: TVMBuilder, graph: Graph, key: str, mod, from_cache: bool, t0: float) -> TVMModel:
    return TVMModel(key=key, func=mod["main"], constants=_tensors(tb), scalars=[v for _, v in tb.scalars],
                    inputs=list(graph.inputs), outputs=list(graph.outputs),
                    out_shapes=[tuple(graph.tensors[o].shape[1:]) for o in graph.outputs],
                    build_seconds=time.perf_counter() - t0, from_cache=from_cache,
                    schedule_notes=[] if from_cache else tb.notes)


def _compile_or_load(tb: TVMBuilder, ins, outs, key: str, cache_dir: str | Path | None, func=None):
    """(runtime module, whether it came from the disk cache) of the lowered program ``key``."""
    tvm = tb.tvm
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    lib_path, sum_path = cache / f"{key}.so", cache / f"{key}.sha256"
    if lib_path.exists() and sum_path.exists():
        # checked before loading: a truncated or foreign file is rebuilt, never run
        if hashlib.sha256(lib_path.read_bytes()).hexdigest() == sum_path.read_text().strip():
            try:
                return tvm.runtime.load_module(str(lib_path)), True
            except Exception:
                pass
    func = _prim_func(tb, ins, outs) if func is None else func
    try:
        scheduled = schedule(tb, func)
    except Exception as e:  # a schedule that does not apply must never cost correctness
        if os.environ.get("HILC_DEBUG"):
            raise
        scheduled = tvm.IRModule({"main": func}) if not isinstance(func, tvm.IRModule) else func
        tb.notes.append(f"unscheduled ({type(e).__name__})")
    mod = tvm.compile(scheduled, target=tvm.target.Target(target_spec()))
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{key}.{os.getpid()}.so"
        mod.export_library(str(tmp))
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        # a new inode: a library another process has loaded is never written over
        os.replace(tmp, lib_path)
        tmp_sum = cache / f".{key}.{os.getpid()}.sha256"
        tmp_sum.write_text(digest + "\n")
        os.replace(tmp_sum, sum_path)
    except Exception:  # an unwritable cache or no linker: the next run only rebuilds
        pass
    return mod, False


def run_int_parametric(graph: Graph, feeds: dict[str, np.ndarray],
                       cache_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """``run_int`` through the module of the graph's structure (``build_parametric``)."""
    return build_parametric(graph, cache_dir).run(feeds)


def run_int(graph: Graph, feeds: dict[str, np.ndarray], cache_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """``sim.run_int`` on the TVM engine: int8 physical inputs -> every output, bit for bit."""
    return build(graph, cache_dir).run(feeds)
