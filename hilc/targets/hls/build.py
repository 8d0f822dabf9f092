"""C-simulation of a generated HLS design: g++ against the ap_int / hls_stream headers shipped in the
hls4ml wheel (``pip install hilc[hls]``), built once per design (cached by the sources' hash) and
run on all samples in one process."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np

from hilc.errors import HilcError

SOURCES = ("model.cpp", "testbench.cpp", "model.h", "hilc_hls.h")
FLAGS = ("-std=c++14", "-Wall", "-Wextra", "-Werror", "-O2")


def ap_types_dir() -> Path:
    """hls4ml/templates/vivado/ap_types, found without importing hls4ml (which pulls in heavy deps)."""
    spec = importlib.util.find_spec("hls4ml")
    if spec is None or not spec.submodule_search_locations:
        raise HilcError("HLS C-simulation needs the ap_types headers of hls4ml: pip install 'hilc[hls]' "
                        "(or pip install hls4ml)")
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "templates" / "vivado" / "ap_types"
        if (d / "ap_int.h").exists() and (d / "hls_stream.h").exists():
            return d
    raise HilcError("the installed hls4ml has no templates/vivado/ap_types/ap_int.h")


def compile_command(hls_dir: Path, output: str = "build/csim") -> list[str]:
    # The Xilinx headers are system headers (-isystem): their own warnings are not the design's.
    cxx = shutil.which("g++") or "g++"
    # One translation unit (build/csim.cpp includes the design and the testbench): the Xilinx
    # headers are parsed once, which is most of the build time.
    return [cxx, *FLAGS, "-isystem", str(ap_types_dir()), "-I.", "build/csim.cpp", "-o", output]


def build_csim(hls_dir: str | Path) -> Path:
    """Build (or reuse) OUT/hls/build/csim; warnings are errors."""
    d = Path(hls_dir)
    missing = [f for f in SOURCES if not (d / f).exists()]
    if missing:
        raise HilcError(f"{d}: no HLS design ({', '.join(missing)} missing); compile with --target hls")
    cmd = compile_command(d)
    h = hashlib.sha256(" ".join(cmd).encode())
    for f in SOURCES:
        h.update((d / f).read_bytes())
    key = h.hexdigest()
    binary, stamp = d / "build" / "csim", d / "build" / "csim.key"
    if binary.exists() and stamp.exists() and stamp.read_text() == key:
        return binary
    (d / "build").mkdir(exist_ok=True)
    (d / "build" / "csim.cpp").write_text('#include "model.cpp"\n#include "testbench.cpp"\n')
    try:
        r = subprocess.run(cmd, cwd=d, capture_output=True, text=True)
    except FileNotFoundError:
        raise HilcError("HLS C-simulation needs g++ (apt-get install g++)") from None
    if r.returncode != 0:
        first = next((ln for ln in r.stderr.splitlines() if "error" in ln), r.stderr.strip()[:400])
        raise HilcError(f"g++ build of the HLS C-simulation failed: {first.strip()[:400]}")
    stamp.write_text(key)
    return binary


def run_csim(hls_dir: str | Path, qx: np.ndarray, output_size: int) -> np.ndarray:
    """Run the C-simulation on int8 samples [N, ...] (physical layout); returns [N, output_size] int8."""
    d = Path(hls_dir)
    binary = build_csim(d)
    work = d / "build"
    (work / "csim_in.bin").write_bytes(np.ascontiguousarray(qx, dtype=np.int8).tobytes())
    r = subprocess.run([str(binary), "csim_in.bin", "csim_out.bin"], cwd=work, capture_output=True, text=True)
    if r.returncode != 0:
        raise HilcError(f"HLS C-simulation failed (exit {r.returncode}): {r.stderr.strip()[:2000]}", exit_code=1)
    return np.frombuffer((work / "csim_out.bin").read_bytes(), np.int8).reshape(len(qx), output_size)


def csim(out_dir: str | Path, graph, x: np.ndarray, raw: bool = False) -> np.ndarray:
    """``hilc simulate --engine hls-csim``: real inputs in the model's own layout in, the first output
    out (dequantized float32, or the raw integers), computed by the C-simulated HLS design."""
    from hilc.compiler.arith import dequantize_host, quantize_host
    from hilc.sim.simulator import check_shape, to_logical, to_physical

    name, out = graph.inputs[0], graph.outputs[0]
    if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
        raise HilcError("input array holds NaN or Inf values")
    check_shape(graph, name, x.shape)
    if len(x) == 0:
        raise HilcError("input array holds no samples")
    q = graph.tensors[name].quant
    qx = quantize_host(to_physical(graph, name, x), q.scale, q.zero_point, q.bits)
    out_shape = graph.tensors[out].shape
    y = run_csim(Path(out_dir) / "hls", qx.reshape(len(qx), -1), int(np.prod(out_shape[1:])))
    y = to_logical(graph, out, y.reshape(len(qx), *out_shape[1:]))
    if raw:
        return y
    qo = graph.tensors[out].quant
    return dequantize_host(y, qo.scale, qo.zero_point)
