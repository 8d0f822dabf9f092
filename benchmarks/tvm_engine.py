"""TVM engine benchmark: TVM-built module vs the numpy simulator vs onnxruntime float on resnet8,
512 natural-image crops, all in one run; also the module's build time and a bit-exactness check.
Second section: the mixed-precision search on resnet8 (sensitivity measurement and the whole
search) with the numpy and the TVM engine in the same run, the one-off build of the parametric
module (constants as arguments) the TVM search uses, and its throughput against the module
with the constants baked in.

Prints a table and writes benchmarks/results/tvm.json. Run from the repository root:

    python benchmarks/tvm_engine.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
# This file is named tvm.py: drop its folder from the path, or `import tvm` would import it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import DATA, RESNET8  # noqa: E402

_spec = importlib.util.spec_from_file_location("spine", ROOT / "benchmarks" / "spine.py")
spine = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(spine)
batched_resnet8 = spine.batched_resnet8

from hilc.compiler.arith import quantize_host  # noqa: E402
from hilc.compiler.pipeline import compile_model  # noqa: E402
from hilc.sim.simulator import run_int_batched, simulate, to_physical  # noqa: E402
from hilc.targets.tvm import engine  # noqa: E402


def main() -> None:
    import tvm
    from threadpoolctl import threadpool_info

    crops = np.load(DATA / "natural_crops.npz")["crops32"].astype(np.float32)
    graph = compile_model(RESNET8, crops[:128]).graph
    res: dict = {"machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                             "tvm": tvm.__version__, "onnxruntime": ort.__version__, "numpy": np.__version__,
                             "llvm_target": engine.target_spec(), "load_average": os.getloadavg(),
                             "blas": [{k: i.get(k) for k in ("internal_api", "version", "architecture",
                                                             "num_threads")} for i in threadpool_info()],
                             "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")},
                 "model": "resnet8 (MLPerf Tiny), int8, calibrated on 128 crops", "batch": len(crops)}

    # build from an empty cache: the real cost of a first run
    with tempfile.TemporaryDirectory() as cache:
        t, c = time.perf_counter(), time.process_time()
        model = engine.build(graph, cache_dir=cache)
        build_s, build_cpu = time.perf_counter() - t, time.process_time() - c
        t = time.perf_counter()
        engine._LOADED.clear()
        engine.build(graph, cache_dir=cache)
        load_s = time.perf_counter() - t

    q = graph.tensors[graph.inputs[0]].quant
    qx = quantize_host(to_physical(graph, graph.inputs[0], crops), q.scale, q.zero_point)
    exact = bool(np.array_equal(model.run({graph.inputs[0]: qx})[graph.outputs[0]], run_int_batched(graph, qx)))
    same_floats = bool(np.array_equal(simulate(graph, crops, engine="tvm"), simulate(graph, crops)))

    sess = ort.InferenceSession(batched_resnet8(), providers=["CPUExecutionProvider"])
    # Interleaved rounds, best of each: the machine is shared, so all three see the same load.
    # Wall time is the target's measure; CPU time (all threads) is also kept because under
    # load it is the steadier one.
    runs = {"ort": lambda: sess.run(None, {"input_1": crops}), "sim": lambda: simulate(graph, crops),
            "tvm": lambda: simulate(graph, crops, engine="tvm")}
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(5):
        for k, fn in runs.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    n = len(crops)
    ort_ips, sim_ips, tvm_ips = (n / min(wall[k]) for k in ("ort", "sim", "tvm"))
    ort_cpu, sim_cpu, tvm_cpu = (n / min(cpu[k]) for k in ("ort", "sim", "tvm"))
    res.update(tvm_inferences_per_cpu_s=round(tvm_cpu, 1), sim_inferences_per_cpu_s=round(sim_cpu, 1),
               ort_float_inferences_per_cpu_s=round(ort_cpu, 1), tvm_over_sim_cpu=round(tvm_cpu / sim_cpu, 2),
               tvm_over_ort_float_cpu=round(tvm_cpu / ort_cpu, 3), load_average_after=os.getloadavg(),
               tvm_build_cpu_seconds=round(build_cpu, 2))
    res.update(tvm_build_seconds=round(build_s, 2), tvm_cached_load_seconds=round(load_s, 3),
               tvm_inferences_per_s=round(tvm_ips, 1), sim_inferences_per_s=round(sim_ips, 1),
               ort_float_inferences_per_s=round(ort_ips, 1), tvm_over_sim=round(tvm_ips / sim_ips, 2),
               tvm_over_ort_float=round(tvm_ips / ort_ips, 3), tvm_bit_exact_with_sim=exact,
               tvm_simulate_equals_numpy_simulate=same_floats)
    rows = [
        ("TVM module build (empty cache), wall / CPU", f"{build_s:.1f} / {build_cpu:.1f} s", ""),
        ("TVM module load (disk cache)", f"{load_s:.2f} s", ""),
        ("TVM engine throughput (512 crops)", f"{tvm_ips:.0f} inf/s", ""),
        ("numpy simulator throughput", f"{sim_ips:.0f} inf/s", ""),
        ("onnxruntime float throughput (batch 512)", f"{ort_ips:.0f} inf/s", ""),
        ("TVM / numpy simulator", f"{tvm_ips / sim_ips:.2f}x", ">= 2x"),
        ("TVM / onnxruntime float", f"{tvm_ips / ort_ips:.2f}x", ">= 0.5x"),
        ("  the same per CPU second (all threads)", f"{tvm_cpu / sim_cpu:.2f}x / {tvm_cpu / ort_cpu:.2f}x", ""),
        ("TVM bit-exact with the simulator (512 crops)", str(exact and same_floats), "True"),
        ("load average (1 min) before / after", f"{res['machine']['load_average'][0]:.1f} / "
                                                f"{os.getloadavg()[0]:.1f}", ""),
    ]
    search, search_rows = search_section(crops, graph, qx)
    res["search"] = search
    rows += search_rows
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>14}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>14}  {target}")
    out = ROOT / "benchmarks" / "results" / "tvm.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")


def search_section(crops: np.ndarray, graph, qx: np.ndarray) -> tuple[dict, list[tuple[str, str, str]]]:
    """Mixed-precision search on resnet8 (128 calibration crops) with each engine, from a cold
    TVM cache; the integer-model evaluations timed on their own (the rest of the search,
    AdaRound of every layer at 4 and 2 bits and the ILP, is float work either engine shares)."""
    from hilc.compiler import calibrate, mixed, passes
    from hilc.compiler.onnx_import import import_onnx

    g = import_onnx(RESNET8)
    for p in passes.FLOAT_PIPELINE:
        g = p(g)
    g = calibrate.calibrate(g, crops[:128])
    calib = crops[:128]
    evals = {"calls": 0, "seconds": 0.0}
    plain_outputs = mixed._outputs

    def timed_outputs(*a, **k):  # the integer-model runs of the search, counted and timed
        t = time.perf_counter()
        try:
            return plain_outputs(*a, **k)
        finally:
            evals["calls"] += 1
            evals["seconds"] += time.perf_counter() - t

    builds: list[float] = []  # fresh parametric builds (one per graph structure met)
    plain_compile = engine._compile_or_load

    def timed_compile(*a, **k):
        t = time.perf_counter()
        mod, from_cache = plain_compile(*a, **k)
        if not from_cache:
            builds.append(time.perf_counter() - t)
        return mod, from_cache

    mixed._outputs, engine._compile_or_load = timed_outputs, timed_compile
    out: dict = {"model": "resnet8, calibrated on 128 crops; sensitivity on 128 samples",
                 "budget": "bitops_ratio 2.5"}
    old_env = os.environ.get("HILC_TVM_CACHE")

    def run(label: str, fn) -> dict:
        evals.update(calls=0, seconds=0.0)
        n_builds = len(builds)
        t = time.perf_counter()
        result = fn()
        out[label] = {"seconds": round(time.perf_counter() - t, 2), "integer_evals": evals["calls"],
                      "integer_eval_seconds": round(evals["seconds"], 2), "builds": len(builds) - n_builds,
                      "build_seconds": round(sum(builds[n_builds:]), 2)}
        return result

    try:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["HILC_TVM_CACHE"] = cache
            engine._LOADED.clear()
            # cold: the TVM run builds a module for each structure the candidates have
            sens = {"numpy": run("sensitivity_numpy", lambda: mixed.measure_sensitivity(g, calib)),
                    "tvm": run("sensitivity_tvm_cold", lambda: mixed.measure_sensitivity(g, calib, engine="tvm"))}
            # warm: the modules are built (a search on the same model: another budget, more data)
            run("sensitivity_numpy_again", lambda: mixed.measure_sensitivity(g, calib))
            run("sensitivity_tvm_warm", lambda: mixed.measure_sensitivity(g, calib, engine="tvm"))
            out["parametric_builds"] = [round(b, 2) for b in builds]
            out["sensitivities_identical"] = (sens["numpy"]["weights"] == sens["tvm"]["weights"]
                                              and sens["numpy"]["acts"] == sens["tvm"]["acts"])
            budgets = mixed.Budgets(bitops_ratio=2.5)
            alloc = {"numpy": run("search_numpy", lambda: mixed.apply_precision(g, calib, "mixed", budgets)[1]),
                     "tvm": run("search_tvm", lambda: mixed.apply_precision(g, calib, "mixed", budgets,
                                                                            engine="tvm")[1])}
            out["allocations_identical"] = all(alloc["numpy"][k] == alloc["tvm"][k] for k in (
                "weight_bits", "act_bits", "predicted_perturbation", "measured_perturbation"))
            out["parametric_structures_built"] = sum(1 for k in engine._LOADED if k.startswith("p"))
    finally:
        mixed._outputs, engine._compile_or_load = plain_outputs, plain_compile
        if old_env is None:
            os.environ.pop("HILC_TVM_CACHE", None)
        else:
            os.environ["HILC_TVM_CACHE"] = old_env

    # throughput of the parametric module against the baked one, same graph, 512 crops
    baked, param = engine.build(graph), engine.build_parametric(graph)
    feeds = {graph.inputs[0]: qx}
    exact = bool(np.array_equal(param.run(feeds)[graph.outputs[0]], baked.run(feeds)[graph.outputs[0]]))
    best = {"baked": np.inf, "param": np.inf}
    for _ in range(9):  # interleaved, best of each
        for k, m in (("baked", baked), ("param", param)):
            t = time.perf_counter()
            m.run(feeds)
            best[k] = min(best[k], time.perf_counter() - t)
    n = len(qx)
    out.update(baked_inferences_per_s=round(n / best["baked"], 1),
               parametric_inferences_per_s=round(n / best["param"], 1),
               parametric_over_baked=round(best["baked"] / best["param"], 3), parametric_bit_exact_with_baked=exact)
    sn = min(out["sensitivity_numpy"], out["sensitivity_numpy_again"], key=lambda r: r["seconds"])
    sc, sw = out["sensitivity_tvm_cold"], out["sensitivity_tvm_warm"]
    rn, rt = out["search_numpy"], out["search_tvm"]
    ev = "integer_eval_seconds"
    rows = [
        ("search: parametric module builds (empty cache)", f"{len(builds)} x {np.mean(builds):.1f} s",
         f"one per structure ({out['parametric_structures_built']} met)"),
        ("search: sensitivity, numpy / tvm cold / tvm warm",
         f"{sn['seconds']:.1f} / {sc['seconds']:.1f} / {sw['seconds']:.1f} s",
         f"{sn['seconds'] / sc['seconds']:.2f}x / {sn['seconds'] / sw['seconds']:.2f}x"),
        ("  integer-model runs in it (numpy / tvm warm)", f"{sn[ev]:.1f} / {sw[ev]:.1f} s",
         f"{sn[ev] / sw[ev]:.2f}x ({sn['integer_evals']} runs)"),
        ("search: whole mixed search, numpy / tvm (warm)", f"{rn['seconds']:.1f} / {rt['seconds']:.1f} s",
         f"{rn['seconds'] / rt['seconds']:.2f}x ({rt['builds']} builds in it)"),
        ("  integer-model runs in it (numpy / tvm)", f"{rn[ev]:.1f} / {rt[ev]:.1f} s",
         f"{rn[ev] / rt[ev]:.2f}x ({rn['integer_evals']} runs)"),
        ("search: sensitivities / allocation identical", f"{out['sensitivities_identical']} / "
                                                         f"{out['allocations_identical']}", "True / True"),
        ("parametric / baked module throughput (512)", f"{out['parametric_over_baked']:.2f}x",
         f"{out['parametric_inferences_per_s']:.0f} vs {out['baked_inferences_per_s']:.0f} inf/s"),
    ]
    return out, rows


if __name__ == "__main__":
    main()
