"""HLS backend benchmark: C-simulation agreement with the simulator, build and run times, and the
design's resource/latency estimate per model and FPGA board.

The estimate is analytical (hilc/targets/hls/estimate.py), not a synthesis result: Vitis HLS is not
installed here. Prints a table and writes benchmarks/results/hls.json. Run from the repository root:
    python benchmarks/hls.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import AD01, DATA, DIGITS_CNN, RESNET8  # noqa: E402

from hilc.compiler import calibrate as calib_mod  # noqa: E402
from hilc.compiler import passes  # noqa: E402
from hilc.compiler.arith import quantize_host  # noqa: E402
from hilc.compiler.onnx_import import import_onnx  # noqa: E402
from hilc.compiler.quantize import quantize  # noqa: E402
from hilc.sim.simulator import run_int_batched, to_physical  # noqa: E402
from hilc.targets.hls import build  # noqa: E402
from hilc.targets.hls.codegen import generate_hls, write_hls_project  # noqa: E402


def graph(model, calib, weight_bits=None):
    g = import_onnx(model)
    for p in passes.FLOAT_PIPELINE:
        g = p(g)
    g = calib_mod.calibrate(g, calib)
    if weight_bits:
        for n in g.nodes:
            if n.op in ("conv2d", "dense"):
                n.attrs["weight_bits"] = weight_bits
    return quantize(g)


def main() -> None:
    crops = np.load(DATA / "natural_crops.npz")["crops32"].astype(np.float32)
    frames = np.load(DATA / "ad01_toycar_normal_sample.npy").astype(np.float32)
    d = np.load(DATA / "digits.npz")
    digits = d["images"].astype(np.float32)[:, None, :, :]
    models = [("resnet8", RESNET8, crops[:128], crops[128:160], None),
              ("resnet8 w4", RESNET8, crops[:128], crops[128:160], 4),
              ("ad01", AD01, frames, np.concatenate([frames[:28] * 0.9, frames[:4] * 1.1]), None),
              ("digits", DIGITS_CNN, digits[:128], digits[-32:], None),
              ("digits transformer", DATA / "digits_transformer.onnx", digits[:128], digits[-32:], None)]
    res: dict = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, calib, x, wbits in models:
            g = graph(model, calib, wbits)
            q = g.tensors[g.inputs[0]].quant
            qx = quantize_host(to_physical(g, g.inputs[0], x), q.scale, q.zero_point, q.bits).reshape(len(x), -1)
            sim = run_int_batched(g, qx.reshape(len(x), *g.tensors[g.inputs[0]].shape[1:])).reshape(len(x), -1)
            for board in ("pynq-z2", "kv260"):
                out = Path(tmp) / f"{name.replace(' ', '_')}_{board}"
                t0 = time.perf_counter()
                design = generate_hls(g, board)
                gen_s = time.perf_counter() - t0
                write_hls_project(out, design)
                f = design.estimate
                entry = {"board": board, "generate_seconds": round(gen_s, 3), "estimate": {
                    k: f[k] for k in ("total", "utilisation", "interval_cycles", "latency_cycles_upper_bound",
                                      "latency_us_upper_bound", "throughput_per_s")}}
                if board == "pynq-z2":  # the C-simulation does not depend on the board's parallelism
                    t0 = time.perf_counter()
                    build.build_csim(out / "hls")
                    build_s = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    y = build.run_csim(out / "hls", qx, sim.shape[1])
                    run_s = time.perf_counter() - t0
                    exact = int(np.sum(np.all(y == sim, axis=1)))
                    entry.update(csim_build_seconds=round(build_s, 1), samples=len(x), bit_exact_samples=exact,
                                 csim_ms_per_inference=round(1e3 * run_s / len(x), 1))
                    rows.append((name, board, f"{exact}/{len(x)}", f"{build_s:.1f} s", f"{1e3 * run_s / len(x):.0f} ms",
                                 f["total"]["dsp"], f["total"]["bram18"], f["total"]["lut"], f["interval_cycles"],
                                 f["latency_us_upper_bound"]))
                else:
                    rows.append((name, board, "", "", "", f["total"]["dsp"], f["total"]["bram18"], f["total"]["lut"],
                                 f["interval_cycles"], f["latency_us_upper_bound"]))
                res[f"{name} / {board}"] = entry
    head = ("model", "board", "csim == sim", "g++ build", "csim/inf", "DSP*", "BRAM18*", "LUT*", "interval*",
            "latency us*")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(v).rjust(w) for v, w in zip(r, widths, strict=True)))
    print("* analytical estimate (hilc/targets/hls/estimate.py), not a synthesis result")
    (ROOT / "benchmarks" / "results").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "results" / "hls.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
