"""Re-ranking the ILP's best allocations: which calibration metric predicts agreement?

For resnet8 at a BitOps ratio, the K best allocations of the HAWQ-V3 ILP (``mixed.allocate_top``)
are each PTQ'd as the compiler does (``ptq_lowered``, fine-tuning off) and scored on the 128
calibration crops (``crops32[:128]``) by several whole-model metrics; each is also measured on the
validation set: the 1152 32x32 tiles of ``crops96`` (as benchmarks/qat_validation.py; never the
384 held-out crops ``crops32[128:]``). The table gives, per metric, its Spearman rank correlation
with validation disagreement and the validation agreement of the candidate it would pick.

Prints a table and writes benchmarks/results/mixed_rerank.json. From the repository root:
    python benchmarks/mixed_rerank.py [--sets subbyte extended] [--ratios 2.0] [--k 12]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from conftest import DATA, RESNET8, ort_run  # noqa: E402
from mixed import float_graph  # noqa: E402

from hilc.compiler import mixed, rerank  # noqa: E402
from hilc.compiler.costmodel import load_cost_model  # noqa: E402
from hilc.compiler.mixed import Budgets  # noqa: E402
from hilc.compiler.quantize import quantize  # noqa: E402
from hilc.sim.simulator import simulate  # noqa: E402

CACHE = Path("/tmp") / "hilc-mixed-rerank"


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", nargs="+", default=["subbyte", "extended"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[2.0])
    ap.add_argument("--k", type=int, default=12)
    ap.add_argument("--cheap-iterations", type=int, default=300)
    args = ap.parse_args()
    crops = np.load(DATA / "natural_crops.npz")
    c96 = crops["crops96"].astype(np.float32)
    tiles = np.concatenate([c96[:, :, i * 32:(i + 1) * 32, j * 32:(j + 1) * 32] for i in range(3) for j in range(3)])
    ref_top = ort_run(RESNET8, tiles).argmax(1)
    calib = crops["crops32"].astype(np.float32)[:128]
    g = float_graph(RESNET8, calib)
    int8_val = float((simulate(quantize(g), tiles).argmax(1) == ref_top).mean())
    res: dict = {"validation": "1152 32x32 tiles of crops96", "calibration": "crops32[:128]",
                 "int8_validation_agreement": int8_val, "runs": {}}
    rows = []
    CACHE.mkdir(exist_ok=True)
    for label in args.sets:
        ext = label == "extended"
        sens = mixed.measure_sensitivity(g, calib, cache=CACHE / f"sens_{label}.json", extended=ext)
        gp = mixed.with_prepared(g, sens["prepared"])
        space = mixed.analyse(gp, ext)
        space.sram = mixed.sram_model(quantize(gp), space)
        scorer = rerank.Scorer(gp, calib, augment=True)
        for ratio in args.ratios:
            t = time.perf_counter()
            cands = mixed.allocate_top(space, sens, Budgets(bitops_ratio=ratio), args.k, load_cost_model())
            topk_s = time.perf_counter() - t
            out = []
            for i, a in enumerate(cands):
                t = time.perf_counter()
                cheap = scorer.graph_for(a, args.cheap_iterations)
                cheap_s = time.perf_counter() - t
                full = scorer.graph_for(a, mixed.ADAROUND_ITERATIONS)
                m_cheap = scorer.metrics(cheap)
                m_full = scorer.metrics(full)
                val = float((simulate(quantize(full), tiles).argmax(1) == ref_top).mean())
                entry = {"rank": i, "predicted": a.objective, "bitops_reduction": a.bitops_int8 / a.bitops,
                         "weight_bits": a.weight_bits, "act_bits": a.act_bits, "cheap_seconds": round(cheap_s, 2),
                         "cheap": m_cheap, "full": m_full, "validation_agreement": val}
                out.append(entry)
                print(f"{label} {ratio}x #{i}: pred {a.objective:.5f} cheap {m_cheap} full {m_full} val {val:.4f} "
                      f"({cheap_s:.1f} s)", flush=True)
            dis = np.array([1 - e["validation_agreement"] for e in out])
            summary = {"topk_seconds": round(topk_s, 3), "ilp_pick_validation": out[0]["validation_agreement"],
                       "best_validation": float(1 - dis.min())}
            metrics = [("predicted", [e["predicted"] for e in out])]
            for kind in ("cheap", "full"):
                for m in out[0][kind]:
                    metrics.append((f"{kind}:{m}", [e[kind][m] for e in out]))
            for name, v in metrics:
                v = np.asarray(v, float)
                pick = int(np.argmin(v))  # ties: the ILP's order
                summary[name] = {"spearman_vs_validation_disagreement": spearman(v, dis),
                                 "pick": pick, "pick_validation": out[pick]["validation_agreement"]}
                rows.append((f"{label} {ratio}x", name, f"{spearman(v, dis):+.2f}",
                             f"#{pick}: {out[pick]['validation_agreement']:.2%}"))
            res["runs"][f"{label}_{ratio}"] = {"candidates": out, "summary": summary}
    print(f"\nint8 validation agreement {int8_val:.2%}")
    print("| set | metric | Spearman vs validation disagreement | pick: validation agreement |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    (ROOT / "benchmarks" / "results" / "mixed_rerank.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
