"""QuantMCU patch-branch precision benchmark: the BitOps that value-driven patch precision removes
on top of layer-wise allocation, on a patch-scheduled MobileNetV2-0.35/144.

MobileNetV2-0.35/144 (10 classes, as benchmarks/patch.py) with random weights
(benchmarks/arch_models.py: computation figures only, no accuracy), scheduled by ``--patch auto``
for nucleo-f446re's SRAM.
Inputs: the 128 natural 96x96 crops of tests/data upsampled to 144x144 (nearest); calibration on
the first 64, the run-time dispatch measured on the other 64. Two layer-wise allocations: all
int8, and HAWQ-V3's ILP at 2x fewer BitOps (``--precision mixed --bitops-ratio 2``). For each,
``--patch-precision value`` (outlier rate 0.2, entropy budget 1.0): BitOps per inference
(patched schedule) layer-wise, expected from calibration, and measured on the held-out inputs
with each patch's outlier test.

Run from the repository root: python benchmarks/quantmcu.py  (writes benchmarks/results/quantmcu.json)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from arch_models import mobilenet_v2  # noqa: E402

from hilc.compiler.arith import quantize_host  # noqa: E402
from hilc.compiler.mixed import Budgets  # noqa: E402
from hilc.compiler.patch_precision import expected_bitops  # noqa: E402
from hilc.compiler.pipeline import compile_model  # noqa: E402
from hilc.sim.simulator import to_physical  # noqa: E402

BOARD = "nucleo-f446re"


def crops144() -> np.ndarray:
    c = np.load(ROOT / "tests" / "data" / "natural_crops.npz")["crops96"].astype(np.float32) / 255.0
    idx = np.arange(144) * 96 // 144
    return np.ascontiguousarray(c[:, :, idx][:, :, :, idx])


def main() -> None:
    x = crops144()
    calib, held = x[:64], x[64:]
    res: dict = {"model": "mobilenet_v2_w0.35_r144 (random weights)", "board": BOARD, "calib": len(calib),
                 "held_out": len(held), "runs": {}}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.onnx"
        onnx.save(mobilenet_v2(0.35, 144, num_classes=10), str(path))
        for name, kw in (("int8", {}),
                         ("hawq-v3 2x", {"precision": "mixed", "budgets": Budgets(bitops_ratio=2.0),
                                         "sensitivity_cache": Path(d) / "sens.json"})):
            t0 = time.perf_counter()
            r = compile_model(path, calib, board=BOARD, patch="auto", patch_precision="value", **kw)
            secs = time.perf_counter() - t0
            g = r.graph
            pp = r.report["patch_precision"]
            qi = g.tensors[g.inputs[0]].quant
            qx = quantize_host(to_physical(g, g.inputs[0], held), qi.scale, qi.zero_point)
            meas = expected_bitops(g, pp, qx)
            p = r.report["patch"]
            run = {"grid": p["grid"], "split": p["split_node"], "threshold": pp["threshold"],
                   "search": pp["search"], "branches": pp["branches"], "entropy_drop": pp["entropy_drop"],
                   "bitops_int8": pp["bitops_int8"], "bitops_layerwise": pp["bitops_layerwise"],
                   "bitops_all_low": pp["bitops_all_low"], "bitops_expected_calib": pp["bitops_expected"],
                   "calib_hot_fraction": pp["calibration_hot_fraction"],
                   "held_out_hot_fraction": meas["hot_fraction"], "bitops_held_out": meas["bitops_mean"],
                   "reduction_over_layerwise_held_out": meas["reduction_over_layerwise"],
                   "reduction_over_int8_held_out": round(pp["bitops_int8"] / meas["bitops_mean"], 4),
                   "patch_search_seconds": pp["search_seconds"], "compile_seconds": round(secs, 1)}
            res["runs"][name] = run
            rows.append((name, f"{p['grid'][0]}x{p['grid'][1]} after {p['split_node']}", pp["bitops_layerwise"],
                         meas["bitops_mean"], meas["hot_fraction"], meas["reduction_over_layerwise"],
                         run["reduction_over_int8_held_out"]))
    print(f"{'layer-wise':<12} {'schedule':<22} {'BitOps layer-wise':>18} {'+ patch precision':>18} "
          f"{'hot patches':>11} {'x vs layer-wise':>15} {'x vs int8':>9}")
    for n, s, lw, pm, hot, red, r8 in rows:
        print(f"{n:<12} {s:<22} {lw / 1e6:>16.1f} M {pm / 1e6:>16.1f} M {hot:>11.1%} {red:>15.3f} {r8:>9.3f}")
    out = ROOT / "benchmarks" / "results" / "quantmcu.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
