"""Validation of fine-tuning choices for resnet8 mixed precision, without the held-out crops.

Validation set: 32x32 tiles cut from ``crops96`` of tests/data/natural_crops.npz, never the 384
held-out crops ``crops32[128:]`` that benchmarks/mixed.py reports on. ``--split`` (the runs with
separate fine-tuning data): crops96 is split by image, ``crops96[:96]`` gives the fine-tuning
tiles (``train_tiles``: random offsets and 96->32 downscales) and ``crops96[96:]`` the 288
non-overlapping validation tiles; without it, the 1152 tiles of all 128 images (older rows).
The allocation and its PTQ are computed once per width set at 2x fewer BitOps (calibrated on
``crops32[:128]``, as the compiler does); then each fine-tuning variant runs from that graph with
each seed, and its top-1 agreement with float on the tiles is measured (``quantize`` + the
simulator). The spread over seeds is the noise a choice has to beat.

Prints a table and writes benchmarks/results/qat_validation.json. From the repository root:
    python benchmarks/qat_validation.py [--sets extended subbyte] [--seeds 0 1 2] [--variants ...] [--split]
"""

from __future__ import annotations

import argparse
import json
import pickle
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
from hilc.sim.simulator import simulate, to_physical  # noqa: E402

# "data": "tiles" fine-tunes on ``train_tiles``, "calib+tiles" on both (else: the 128 calibration crops)
VARIANTS: dict[str, dict | None] = {
    "no-finetune": None,
    "default": {},
    "cutmix": {"aug": qat.CUTMIX},
    "strong-aug": {"aug": {}},
    "lr-x4": {"lr": 0.02},
    "lr-x10": {"lr": 0.05},
    "lr-x10-features-0.1": {"lr": 0.05, "features": 0.1},
    "tiles-300": {"data": "tiles", "steps": 300},
    "tiles-600": {"data": "tiles", "steps": 600},
    "tiles-600-lr-x4": {"data": "tiles", "steps": 600, "lr": 0.02},
    "tiles-600-lr-x10": {"data": "tiles", "steps": 600, "lr": 0.05},
    "tiles-600-features-0.3": {"data": "tiles", "steps": 600, "features": 0.3},
    "tiles-600-features-3": {"data": "tiles", "steps": 600, "features": 3.0},
    "tiles-1000-lr-x4": {"data": "tiles", "steps": 1000, "lr": 0.02},
    "wscale": {"weight_scale_lr": 0.01},
    "calib+tiles-600": {"data": "calib+tiles", "steps": 600},
    "tiles-600-wscale": {"data": "tiles", "steps": 600, "weight_scale_lr": 0.01},
    "tiles-600-wscale-lr-x4": {"data": "tiles", "steps": 600, "weight_scale_lr": 0.01, "lr": 0.02},
    # losses on the decision (top-1) rather than the whole distribution (qat.output_loss)
    "kl+margin": {"loss": "kl+margin"},
    "hard": {"loss": "hard"},
    "kl+hard": {"loss": "kl+hard"},
    "kl+margin-features-0.3": {"loss": "kl+margin", "features": 0.3},
    "margin": {"loss": "margin"},
    "kl+margin-1.0": {"loss": "kl+margin", "margin_scale": 1.0},
}


def train_tiles(c96: np.ndarray, per_image: int = 12, seed: int = 0) -> np.ndarray:
    """Fine-tuning inputs from 96x96 crops (NCHW): per image, ``per_image`` 32x32 tiles at random
    offsets and the whole crop downscaled 3x (3x3 block means)."""
    rng = np.random.default_rng(seed)
    n, c, h, w = c96.shape
    out = []
    for i in range(n):
        for y, x in zip(rng.integers(0, h - 31, per_image), rng.integers(0, w - 31, per_image), strict=True):
            out.append(c96[i, :, y:y + 32, x:x + 32])
        out.append(c96[i].reshape(c, h // 3, 3, w // 3, 3).mean(axis=(2, 4)))
    return np.stack(out).astype(np.float32)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    """Mean KL(p || q) of two batches of softmax outputs."""
    return float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)))


def grid_tiles(c96: np.ndarray) -> np.ndarray:
    """The nine non-overlapping 32x32 tiles of each 96x96 crop."""
    return np.concatenate([c96[:, :, i * 32:(i + 1) * 32, j * 32:(j + 1) * 32] for i in range(3) for j in range(3)])


def captured(label: str, calib: np.ndarray, d: Path, keep: Path | None = None):
    """(float reference, PTQ'd mixed graph, physical fine-tuning inputs, steps) at 2x; ``keep``:
    a pickle of them, reused when it exists (parallel runs of other variants)."""
    if keep is not None and keep.exists():
        return pickle.loads(keep.read_bytes())
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
    out = got["ref"], got["g"], got["x"], got["steps"]
    if keep is not None:
        keep.write_bytes(pickle.dumps(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", nargs="+", default=["extended", "subbyte"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=["no-finetune", "default", "cutmix"])
    ap.add_argument("--keep", type=Path, help="a folder where the captured PTQ graphs are kept between runs")
    ap.add_argument("--split", action="store_true",
                    help="fine-tuning tiles from crops96[:96], validation on the 288 tiles of crops96[96:]")
    args = ap.parse_args()
    crops = np.load(DATA / "natural_crops.npz")
    c96 = crops["crops96"].astype(np.float32)
    tiles = grid_tiles(c96[96:] if args.split else c96)
    ft_tiles = train_tiles(c96[:96])
    ref_out = ort_run(RESNET8, tiles)
    ref_top = ref_out.argmax(1)
    calib = crops["crops32"].astype(np.float32)[:128]
    int8 = simulate(compile_model(RESNET8, calib).graph, tiles)
    res: dict = {"validation": "1152 32x32 tiles of crops96", "bitops_ratio": 2.0,
                 "int8": float((int8.argmax(1) == ref_top).mean())}
    if args.split:
        res = {"validation": "288 32x32 tiles of crops96[96:]; fine-tuning tiles from crops96[:96] "
                             f"({len(ft_tiles)}: 12 random offsets + a 3x downscale per image); resnet8 at 2x, "
                             "PTQ'd allocation calibrated on crops32[:128]",
               "bitops_ratio": 2.0, "int8": res["int8"], "int8_kl": round(_kl(ref_out, int8), 5)}
    key = "split" if args.split else None
    rows = [("int8", "", f"{res['int8']:.2%}")]
    with tempfile.TemporaryDirectory() as d:
        for label in args.sets:
            ref, g, x, steps = captured(label, calib, Path(d), args.keep / f"{label}.pkl" if args.keep else None)
            x_tiles = to_physical(ref, ref.inputs[0], ft_tiles)
            for v in args.variants:
                kw = None if VARIANTS[v] is None else dict(VARIANTS[v])
                data = kw.pop("data", None) if kw is not None else None
                x_v = {"tiles": x_tiles, "calib+tiles": np.concatenate([x, x_tiles])}.get(data, x)
                n_steps = kw.pop("steps", steps) if kw is not None else 0
                for seed in [0] if kw is None else args.seeds:
                    t = time.perf_counter()
                    out = g if kw is None else qat.finetune(ref, g, x_v, n_steps, seed=seed, **kw)[0]
                    sec = time.perf_counter() - t
                    got = simulate(quantize(out), tiles)
                    agree = float((got.argmax(1) == ref_top).mean())
                    kl = _kl(ref_out, got)
                    dest = res.setdefault(key or label, {}).setdefault(label, {}) if key else res.setdefault(label, {})
                    dest.setdefault(v, {})[str(seed)] = agree
                    if key:
                        dest[v][f"kl_{seed}"] = round(kl, 5)
                        dest[v][f"seconds_{seed}"] = round(sec, 1)
                    rows.append((f"{label} 2x {v}", str(seed), f"{agree:.2%} kl {kl:.4f} ({sec:.0f} s)"))
                    print(*rows[-1], sep=" | ", flush=True)
                runs = [a for s_, a in dest[v].items() if s_.isdigit()]
                dest[v]["mean"] = float(np.mean(runs))
                dest[v]["spread"] = float(np.max(runs) - np.min(runs))
    print("\n| variant | seed | tile agreement |\n|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    out = ROOT / "benchmarks" / "results" / "qat_validation.json"
    old = json.loads(out.read_text()) if out.exists() else {}  # other sets' and variants' runs are kept
    if key:  # the split runs live under "split", one level deeper (per width set)
        old_split = old.get("split", {})
        for k, v in res.items():
            if k == "split":  # merged per seed: runs of other seeds in parallel keep theirs
                for lab, vs in v.items():
                    for var, runs in vs.items():
                        merged = old_split.setdefault(lab, {}).get(var, {}) | runs
                        accs = [a for s_, a in merged.items() if s_.isdigit()]
                        kls = [a for s_, a in merged.items() if s_.startswith("kl_") and s_[3:].isdigit()]
                        merged.update(mean=float(np.mean(accs)), spread=float(np.max(accs) - np.min(accs)),
                                      kl_mean=float(np.mean(kls)))
                        old_split[lab][var] = merged
            else:
                old_split[k] = v
        old["split"] = old_split
        res = {}
    for k, v in res.items():
        old[k] = old.get(k, {}) | v if isinstance(v, dict) else v
    out.write_text(json.dumps(old, indent=1) + "\n")


if __name__ == "__main__":
    main()
