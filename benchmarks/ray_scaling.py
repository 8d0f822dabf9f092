"""Ray scale-out benchmark: accuracy evaluation (bit-accurate simulator) of resnet8 on the 512
natural-image crops, single process vs Ray tasks on 1 and 2 workers (a local Ray instance with
num_cpus=1 or 2), for several shard sizes; also sharded calibration, and the searches whose
candidates run as Ray tasks: the mixed-precision sensitivity measurement of resnet8 (every layer
at 4 and 2 weight bits after its AdaRound fit, every activation at 4 bits) and the patch-schedule
search of MobileNetV2-0.35/144. Every distributed result is checked identical to the
single-process one.

Prints a table and writes benchmarks/results/ray.json. Run from the repository root:

    python benchmarks/ray_scaling.py
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# This file is named ray.py: drop its folder from the path, or `import ray` would import it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
import ray  # noqa: E402
from conftest import DATA, RESNET8  # noqa: E402

import hilc  # noqa: E402
from hilc.compiler import calibrate, mixed, passes  # noqa: E402
from hilc.compiler import patches as P  # noqa: E402
from hilc.compiler.onnx_import import import_onnx  # noqa: E402

SHARDS = (16, 32, 64, 128, 256)
REPEATS = 3
SEARCH_REPEATS = 2  # the searches are seconds long and do a fixed amount of work
SENS_SAMPLES = 64


def best(fn, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    x = np.load(DATA / "natural_crops.npz")["crops32"].astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        m = hilc.compile(RESNET8, Path(tmp) / "r8", calib=DATA / "resnet8_calib.npy")
        ref = m.simulate(x, raw=True)
        rows = []
        t = best(lambda: hilc.evaluate(m, x, raw=True))
        rows.append({"mode": "single process (simulator threads on all cores)", "workers": os.cpu_count(),
                     "shard": None, "seconds": t, "samples_per_s": len(x) / t})
        g = import_onnx(RESNET8)
        for p in passes.FLOAT_PIPELINE:
            g = p(g)
        cal_ref = calibrate.calibrate(g, x).meta["calibration"]
        t_cal1 = best(lambda: calibrate.calibrate(g, x))
        cal = {"single_process_s": t_cal1}
        # the searches: mixed-precision sensitivity (resnet8) and the patch schedule (MobileNetV2)
        gc = calibrate.calibrate(g, x[:128])
        sens_ref = mixed.measure_sensitivity(gc, x, max_samples=SENS_SAMPLES)
        n_cands = sum(len(v) - 1 for v in sens_ref["weights"].values()) + \
            sum(len(v) - 1 for v in sens_ref["acts"].values())
        search = {"sensitivity": {"model": "resnet8", "samples": SENS_SAMPLES, "candidates": n_cands,
                                  "single_process_s": best(lambda: mixed.measure_sensitivity(
                                      gc, x, max_samples=SENS_SAMPLES), SEARCH_REPEATS)}}
        sys.path.append(str(ROOT / "benchmarks"))  # last: its ray_scaling/tvm scripts must not shadow packages
        import onnx
        from arch_models import mobilenet_v2

        onnx.save(mobilenet_v2(0.35, 144, num_classes=10), str(Path(tmp) / "mnv2.onnx"))
        qm = hilc.compile(Path(tmp) / "mnv2.onnx", calib=np.random.default_rng(0).uniform(
            0, 1, (2, 3, 144, 144)).astype(np.float32)).graph
        patch_budget = 120000

        def strip(gr):
            return {k: v for k, v in gr.meta["patch"].items() if k != "planner_seconds"}

        patch_ref = strip(P.plan_patches(qm, "auto", patch_budget))
        search["patch_schedule"] = {"model": "mobilenet_v2 0.35/144", "budget_bytes": patch_budget,
                                    "single_process_s": best(lambda: P.plan_patches(qm, "auto", patch_budget),
                                                             SEARCH_REPEATS)}
        for workers in (1, 2):
            t0 = time.perf_counter()
            ray.init(num_cpus=workers, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                     logging_level="ERROR")
            start = time.perf_counter() - t0
            hilc.evaluate(m, x[:64], cluster="local")  # warm the workers (imports) before timing
            for shard in SHARDS:
                out = hilc.evaluate(m, x, raw=True, cluster="local", shard=shard)
                assert np.array_equal(out.outputs, ref), "distributed outputs differ"
                t = best(lambda shard=shard: hilc.evaluate(m, x, raw=True, cluster="local", shard=shard))
                rows.append({"mode": "ray", "workers": workers, "shard": shard, "seconds": t,
                             "samples_per_s": len(x) / t, "shards": -(-len(x) // shard),
                             "per_shard_s": t * workers / -(-len(x) // shard), "ray_start_s": start})
            assert calibrate.calibrate(g, x, cluster="local").meta["calibration"] == cal_ref
            got = mixed.measure_sensitivity(gc, x, max_samples=SENS_SAMPLES, cluster="local")
            assert got["weights"] == sens_ref["weights"] and got["acts"] == sens_ref["acts"], "sensitivities differ"
            search["sensitivity"][f"ray_{workers}_workers_s"] = best(lambda: mixed.measure_sensitivity(
                gc, x, max_samples=SENS_SAMPLES, cluster="local"), SEARCH_REPEATS)
            assert strip(P.plan_patches(qm, "auto", patch_budget, cluster="local")) == patch_ref, "plans differ"
            search["patch_schedule"][f"ray_{workers}_workers_s"] = best(lambda: P.plan_patches(
                qm, "auto", patch_budget, cluster="local"), SEARCH_REPEATS)
            cal[f"ray_{workers}_workers_s"] = best(lambda: calibrate.calibrate(g, x, cluster="local", shard=128))
            ray.shutdown()
    print(f"{'mode':50s} {'workers':>7s} {'shard':>5s} {'s':>7s} {'inputs/s':>9s} {'s/shard':>8s}")
    for r in rows:
        print(f"{r['mode']:50s} {r['workers']:7d} {r['shard'] or '-':>5} {r['seconds']:7.2f} "
              f"{r['samples_per_s']:9.1f} {r.get('per_shard_s', float('nan')):8.3f}")
    print("calibration (minmax, 512 crops, shard 128):", {k: round(v, 2) for k, v in cal.items()})
    for name, r in search.items():
        print(f"{name} ({r['model']}):", {k: round(v, 2) for k, v in r.items() if k.endswith("_s")})
    res = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__},
           "model": "resnet8", "inputs": len(x), "bit_exact": True, "evaluation": rows, "calibration": cal,
           "search": search}
    out = ROOT / "benchmarks" / "results" / "ray.json"
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
