"""Compiler-spine benchmark: compile time, simulator throughput vs onnxruntime, and accuracy.

Prints a table and writes benchmarks/results/spine.json. Run from the repository root:

    python benchmarks/spine.py
"""

from __future__ import annotations

import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from common import print_table, write_results  # noqa: E402
from conftest import AD01, DATA, DIGITS_CNN, RESNET8, load_digits, ort_quantize_qdq, ort_run  # noqa: E402

from hilc.compiler import arith  # noqa: E402
from hilc.compiler.pipeline import compile_model  # noqa: E402
from hilc.sim.simulator import simulate  # noqa: E402


def best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def batched_resnet8() -> bytes:
    """resnet8 with a dynamic batch axis (its Flatten shape constant says 1): onnxruntime's best case."""
    m = onnx.load(str(RESNET8))
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    for init in m.graph.initializer:
        if init.name == "model/flatten/Const":
            init.CopyFrom(onnx.numpy_helper.from_array(np.array([-1, 64], np.int64), init.name))
    return m.SerializeToString()


def main() -> None:
    crops = np.load(DATA / "natural_crops.npz")["crops32"].astype(np.float32)
    calib, held_out = crops[:128], crops[128:]
    rows: list[tuple[str, str, str]] = []
    res: dict = {"machine": {"cpu_count": __import__("os").cpu_count(), "python": platform.python_version(),
                             "onnxruntime": ort.__version__, "numpy": np.__version__}}

    # compile time, calibration on 128 inputs included
    compile_s = best_of(lambda: compile_model(RESNET8, calib))
    res["resnet8_compile_seconds"] = round(compile_s, 3)
    rows.append(("resnet8 compile incl. calibration (128)", f"{compile_s:.2f} s", "<= 10 s"))

    # simulator vs onnxruntime float throughput on 512 crops, same run
    graph = compile_model(RESNET8, calib).graph
    sess = ort.InferenceSession(batched_resnet8(), providers=["CPUExecutionProvider"])
    ort_s = best_of(lambda: sess.run(None, {"input_1": crops}))
    sim_s = best_of(lambda: simulate(graph, crops))
    ort_ips, sim_ips = len(crops) / ort_s, len(crops) / sim_s
    fast = simulate(graph, crops, raw=True)
    arith.FAST_EXACT_PATHS = False
    t = time.perf_counter()
    slow = simulate(graph, crops, raw=True)
    int64_ips = len(crops) / (time.perf_counter() - t)
    arith.FAST_EXACT_PATHS = True
    exact = bool(np.array_equal(fast, slow))
    res.update(sim_inferences_per_s=round(sim_ips, 1), ort_float_inferences_per_s=round(ort_ips, 1),
               sim_over_ort=round(sim_ips / ort_ips, 3), plain_int64_sim_inferences_per_s=round(int64_ips, 1),
               sim_bit_exact_with_plain_int64=exact)
    rows.append(("simulator throughput (512 crops, batch 32)", f"{sim_ips:.0f} inf/s", ""))
    rows.append(("onnxruntime float throughput (batch 512)", f"{ort_ips:.0f} inf/s", ""))
    rows.append(("simulator / onnxruntime", f"{sim_ips / ort_ips:.2f}x", ">= 0.25x"))
    rows.append(("simulator bit-exact with plain int64 arithmetic", str(exact), "True"))

    # accuracy: resnet8 own calibration vs onnxruntime quantize_static, QDQ import
    ref = ort_run(RESNET8, held_out)
    y = simulate(graph, held_out)
    ours = float((y.argmax(1) == ref.argmax(1)).mean())
    with tempfile.TemporaryDirectory() as d:
        qdq = ort_quantize_qdq(RESNET8, Path(d) / "r8_qdq.onnx", calib)
        ort_q = ort_run(qdq, held_out)
        qgraph = compile_model(qdq).graph
    theirs = float((ort_q.argmax(1) == ref.argmax(1)).mean())
    yq = simulate(qgraph, held_out)
    qo = qgraph.tensors[qgraph.outputs[0]].quant
    qdq_agree = float((yq.argmax(1) == ort_q.argmax(1)).mean())
    qdq_lsb = float(np.abs(yq - ort_q).mean() / qo.scale)
    res.update(resnet8_top1_agreement_hilc=ours, resnet8_top1_agreement_ort_quantize_static=theirs,
               resnet8_mean_abs_prob_diff=float(np.abs(y - ref).mean()),
               resnet8_qdq_top1_agreement_with_ort=qdq_agree, resnet8_qdq_mean_abs_lsb=qdq_lsb)
    rows.append(("resnet8 int8 top-1 agreement with float (384)", f"{ours:.2%}", ">= 95%, >= ORT"))
    rows.append(("  onnxruntime quantize_static, same data", f"{theirs:.2%}", ""))
    rows.append(("  mean |probability difference|", f"{np.abs(y - ref).mean():.4f}", ""))
    rows.append(("resnet8 QDQ import: top-1 agreement with ORT", f"{qdq_agree:.2%}", ">= 99%"))
    rows.append(("resnet8 QDQ import: mean |diff| last tensor", f"{qdq_lsb:.3f} LSB", "<= 1 LSB"))

    # digits CNN accuracy
    dg = load_digits()
    xtr, xte, yte = dg["x_train"], dg["x_test"], dg["y_test"]
    f_acc = float((ort_run(DIGITS_CNN, xte).argmax(1) == yte).mean())
    i_acc = float((simulate(compile_model(DIGITS_CNN, xtr[:256]).graph, xte).argmax(1) == yte).mean())
    res.update(digits_float_accuracy=f_acc, digits_int8_accuracy=i_acc)
    rows.append(("digits CNN accuracy float / int8 (359 test)", f"{f_acc:.2%} / {i_acc:.2%}", "within 1 point"))

    # ad01 reconstruction error
    frames = np.load(DATA / "ad01_toycar_normal_sample.npy").astype(np.float32)
    mse_f = float(((ort_run(AD01, frames) - frames) ** 2).mean())
    mse_i = float(((simulate(compile_model(AD01, frames).graph, frames) - frames) ** 2).mean())
    res.update(ad01_mse_float=mse_f, ad01_mse_int8=mse_i, ad01_mse_rel_change=mse_i / mse_f - 1)
    rows.append(("ad01 reconstruction MSE float / int8", f"{mse_f:.3f} / {mse_i:.3f} ({mse_i / mse_f - 1:+.2%})",
                 "within 5%"))

    print_table(rows, 24, header=("measure", "value", "target"))
    write_results("spine.json", res)


if __name__ == "__main__":
    main()
