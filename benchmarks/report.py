"""Reports, QDQ export and inspect: exactness and timings. Prints a table and writes
benchmarks/results/report.json. Run from the repository root:  python benchmarks/report.py

* export-onnx: onnxruntime (graph optimizations off, as the tests run it) on the exported QDQ
  model vs the bit-accurate simulator, in output LSBs, on every held-out sample;
* inspect: wall time per bundled model, through the CLI as a user runs it (process start included);
* report: time to render report.html for resnet8 (three plots) and its size.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from arch_models import mobilenet_v2  # noqa: E402
from common import print_table, write_results  # noqa: E402
from conftest import DATA, DIGITS_CNN, RESNET8, ort_run  # noqa: E402

import hilc  # noqa: E402


def _export_exactness(model: Path, calib: np.ndarray, x: np.ndarray, d: Path) -> dict:
    m = hilc.compile(model, d / model.stem, calib=calib)
    t0 = time.perf_counter()
    path = hilc.export_onnx(m, d / f"{model.stem}_qdq.onnx")
    t_export = time.perf_counter() - t0
    y = ort_run(str(path), x)
    sim = m.simulate(x, raw=True)
    qo = m.graph.tensors[m.graph.outputs[0]].quant
    diff = np.abs(np.rint(y.astype(np.float64) / qo.scale) + qo.zero_point - sim.astype(np.int64))
    return {"samples": len(x), "max_lsb": int(diff.max()), "exact_fraction": float((diff == 0).mean()),
            "samples_bit_exact": int(np.all(diff.reshape(len(x), -1) == 0, axis=1).sum()),
            "export_seconds": round(t_export, 3), "file_bytes": path.stat().st_size}


def main() -> None:
    res: dict = {"export_onnx": {}, "inspect_seconds": {}}
    crops = np.load(DATA / "natural_crops.npz")["crops32"].astype(np.float32)
    dg = np.load(DATA / "digits.npz")
    split = np.load(DATA / "digits_split.npz")
    xd = dg["images"].astype(np.float32)[:, None]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for name, model, calib, x in (("resnet8", RESNET8, crops[:128], crops[128:]),
                                      ("digits_cnn", DIGITS_CNN, xd[split["train_idx"]][:256],
                                       xd[split["test_idx"]])):
            r = _export_exactness(model, calib, x, d)
            res["export_onnx"][name] = r
            rows.append((f"export-onnx {name}: onnxruntime vs simulator, {r['samples']} samples",
                         f"max {r['max_lsb']} LSB, {r['samples_bit_exact']}/{r['samples']} samples bit-exact",
                         "<= 1 LSB"))
        # a bigger synthetic network (depthwise, ReLU6, residual adds), random weights and inputs
        import onnx

        onnx.save(mobilenet_v2(0.35, 144, num_classes=10), str(d / "mobilenetv2_035_144.onnx"))
        xm = np.random.default_rng(0).uniform(0, 1, (40, 3, 144, 144)).astype(np.float32)
        r = _export_exactness(d / "mobilenetv2_035_144.onnx", xm[:8], xm[8:], d)
        res["export_onnx"]["mobilenetv2_035_144"] = r
        rows.append((f"export-onnx MobileNetV2-0.35/144 (random weights), {r['samples']} samples",
                     f"max {r['max_lsb']} LSB, {r['samples_bit_exact']}/{r['samples']} samples bit-exact", "<= 1 LSB"))
        for model in [*sorted(DATA.glob("*.onnx")), d / "mobilenetv2_035_144.onnx"]:
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "hilc.cli", "inspect", str(model), "--json"],
                               capture_output=True, text=True, cwd=ROOT)
            dt = time.perf_counter() - t0
            assert p.returncode == 0, p.stderr
            res["inspect_seconds"][model.name] = round(dt, 2)
            rows.append((f"hilc inspect {model.name} (CLI, wall)", f"{dt:.2f} s", "< 5 s"))
        m = hilc.compile(RESNET8, d / "r8c", calib=crops[:64], target="c")
        t0 = time.perf_counter()
        page = hilc.report(m)
        dt = time.perf_counter() - t0
        res["report_resnet8"] = {"seconds": round(dt, 2), "html_bytes": page.stat().st_size}
        rows.append(("hilc report resnet8 (no profile: 2 plots)", f"{dt:.2f} s, {page.stat().st_size:,} B", ""))
    print_table(rows, 48)
    write_results("report.json", res)


if __name__ == "__main__":
    main()
