"""Validation of fine-tuning choices for resnet8 mixed precision, without the held-out crops.

Validation set: the 1152 32x32 tiles cut from ``crops96`` of tests/data/natural_crops.npz (nine
per image; not the 384 held-out crops ``crops32[128:]`` that benchmarks/mixed.py reports on).
The allocation and its PTQ are computed once per width set at 2x fewer BitOps (calibrated on
``crops32[:128]``, as the compiler does); then each fine-tuning variant runs from that graph with
each seed, and its top-1 agreement with float on the tiles is measured (``quantize`` + the
simulator). The spread over seeds is the noise a choice has to beat.

Prints a table and writes benchmarks/results/qat_validation.json. From the repository root:
    python benchmarks/qat_validation.py [--sets extended subbyte] [--seeds 0 1 2] [--variants ...]
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
from conftest import DATA, RESNET8, ort_run  # noqa: E402

from hilc.compiler import qat  # noqa: E402
from hilc.compiler.mixed import Budgets  # noqa: E402
from hilc.compiler.pipeline import compile_model  # noqa: E402
from hilc.compiler.quantize import quantize  # noqa: E402
from hilc.sim.simulator import simulate  # noqa: E402

VARIANTS: dict[str, dict | None] = {
    "no-finetune": None,
    "default": {},
    "cutmix": {"aug": qat.CUTMIX},
    "strong-aug": {"aug": {}},
    "lr-x4": {"lr": 0.02},
    "lr-x10": {"lr": 0.05},
    "lr-x10-features-0.1": {"lr": 0.05, "features": 0.1},
}


def captured(label: str, calib: np.ndarray, d: Path):
    """(float reference, PTQ'd mixed graph, physical fine-tuning inputs, steps) at 2x."""
    got = {}
    real = qat.finetune

    def grab(ref, g, x, steps, **kw):
        got.update(ref=ref, g=g, x=x, steps=steps)
        return g, {"steps": 0}

    qat.finetune = grab
    try:
        compile_model(RESNET8, calib, precision="mixed", budgets=Budgets(bitops_ratio=2.0),
                      sensitivity_cache=d / f"sens_{label}.json", extended_bits=label == "extended")
    finally:
        qat.finetune = real
    return got["ref"], got["g"], got["x"], got["steps"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", nargs="+", default=["extended", "subbyte"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=["no-finetune", "default", "cutmix"])
    args = ap.parse_args()
    crops = np.load(DATA / "natural_crops.npz")
    c96 = crops["crops96"].astype(np.float32)
    tiles = np.concatenate([c96[:, :, i * 32:(i + 1) * 32, j * 32:(j + 1) * 32] for i in range(3) for j in range(3)])
    ref_top = ort_run(RESNET8, tiles).argmax(1)
    calib = crops["crops32"].astype(np.float32)[:128]
    res: dict = {"validation": "1152 32x32 tiles of crops96", "bitops_ratio": 2.0,
                 "int8": float((simulate(compile_model(RESNET8, calib).graph, tiles).argmax(1) == ref_top).mean())}
    rows = [("int8", "", f"{res['int8']:.2%}")]
    with tempfile.TemporaryDirectory() as d:
        for label in args.sets:
            ref, g, x, steps = captured(label, calib, Path(d))
            for v in args.variants:
                kw = VARIANTS[v]
                for seed in [0] if kw is None else args.seeds:
                    t = time.perf_counter()
                    out = g if kw is None else qat.finetune(ref, g, x, steps, seed=seed, **kw)[0]
                    agree = float((simulate(quantize(out), tiles).argmax(1) == ref_top).mean())
                    res.setdefault(label, {}).setdefault(v, {})[str(seed)] = agree
                    rows.append((f"{label} 2x {v}", str(seed), f"{agree:.2%} ({time.perf_counter() - t:.0f} s)"))
                    print(*rows[-1], sep=" | ", flush=True)
                runs = list(res[label][v].values())
                res[label][v]["mean"] = float(np.mean(runs))
    print("\n| variant | seed | tile agreement |\n|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    out = ROOT / "benchmarks" / "results" / "qat_validation.json"
    old = json.loads(out.read_text()) if out.exists() else {}  # other sets' and variants' runs are kept
    for k, v in res.items():
        old[k] = old.get(k, {}) | v if isinstance(v, dict) else v
    out.write_text(json.dumps(old, indent=1) + "\n")


if __name__ == "__main__":
    main()
