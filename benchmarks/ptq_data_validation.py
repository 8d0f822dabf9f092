"""Validation of more PTQ inputs for resnet8 mixed precision (``compile_model(ptq_data=...)``),
without the held-out crops.

The allocation at 2x fewer BitOps is searched on the 128 calibration crops ``crops32[:128]`` as
the compiler does; its PTQ (AdaRound + bias correction, ``mixed.ptq_lowered``) is fitted on those
128 crops alone, or on them plus the 1248 unlabeled tiles of ``crops96[:96]``
(``qat_validation.train_tiles``). Top-1 agreement with float and KL are measured on the 288 tiles
of ``crops96[96:]`` (``qat_validation.grid_tiles``). PTQ has no seed (deterministic).

Prints a table and writes benchmarks/results/ptq_data_validation.json. From the repository root:
    python benchmarks/ptq_data_validation.py [--sets extended subbyte] [--finetune-steps 0|-1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from conftest import DATA, RESNET8, ort_run  # noqa: E402
from qat_validation import _kl, grid_tiles, train_tiles  # noqa: E402

from hilc.compiler.mixed import Budgets  # noqa: E402
from hilc.compiler.pipeline import compile_model  # noqa: E402
from hilc.sim.simulator import simulate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", nargs="+", default=["extended"])
    ap.add_argument("--finetune-steps", type=int, default=0, help="0: off (default); -1: the compiler's default")
    args = ap.parse_args()
    crops = np.load(DATA / "natural_crops.npz")
    c96 = crops["crops96"].astype(np.float32)
    tiles = grid_tiles(c96[96:])
    extra = train_tiles(c96[:96])
    calib = crops["crops32"].astype(np.float32)[:128]
    ref = ort_run(RESNET8, tiles)
    top = ref.argmax(1)
    int8 = simulate(compile_model(RESNET8, calib).graph, tiles)
    res: dict = {"validation": "288 32x32 tiles of crops96[96:]", "bitops_ratio": 2.0,
                 "extra_ptq_inputs": f"{len(extra)} tiles of crops96[:96]",
                 "int8": float((int8.argmax(1) == top).mean()), "int8_kl": round(_kl(ref, int8), 5)}
    rows = [("int8", "", f"{res['int8']:.2%}", f"{res['int8_kl']:.4f}", "")]
    with tempfile.TemporaryDirectory() as d:
        for label in args.sets:
            for name, data in (("calib-128", None), ("calib-128+tiles-1248", extra)):
                t = time.perf_counter()
                r = compile_model(RESNET8, calib, precision="mixed", budgets=Budgets(bitops_ratio=2.0),
                                  sensitivity_cache=Path(d) / f"sens_{label}.json", extended_bits=label == "extended",
                                  finetune_steps=None if args.finetune_steps < 0 else args.finetune_steps,
                                  ptq_data=data)
                sec = time.perf_counter() - t
                got = simulate(r.graph, tiles)
                agree, kl = float((got.argmax(1) == top).mean()), _kl(ref, got)
                ptq_s = r.report.get("mixed_precision", {}).get("ptq", {}).get("seconds")
                res.setdefault(f"{label}_ft{args.finetune_steps}", {})[name] = {
                    "agreement": agree, "kl": round(kl, 5), "seconds": round(sec, 1), "ptq_seconds": ptq_s}
                rows.append((f"{label} ft={args.finetune_steps}", name, f"{agree:.2%}", f"{kl:.4f}", f"{sec:.0f}"))
                print(" | ".join(rows[-1]), flush=True)
    print("\n| set | PTQ inputs | tile agreement | KL | s |\n|---|---|---|---|---|")
    for r_ in rows:
        print("| " + " | ".join(r_) + " |")
    out = ROOT / "benchmarks" / "results" / "ptq_data_validation.json"
    old = json.loads(out.read_text()) if out.exists() else {}
    for k, v in res.items():
        old[k] = old.get(k, {}) | v if isinstance(v, dict) else v
    out.write_text(json.dumps(old, indent=1) + "\n")


if __name__ == "__main__":
    main()
