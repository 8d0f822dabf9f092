"""QuantMCU patch-branch precision (hilc/compiler/patch_precision.py): the outlier test and both
branches of the patch stage, bit-exact between the simulator and host C (sanitizers) and on
qemu-mps2-an386."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import calibrated  # noqa: E402

from hilc.cli import main
from hilc.compiler import mixed
from hilc.compiler.arith import quantize_host
from hilc.compiler.patch_precision import choose_threshold, hot_flags
from hilc.compiler.pipeline import compile_model, write_artifacts
from hilc.errors import HilcError
from hilc.sim.simulator import run_int_batched, to_physical
from hilc.targets.c import build


def _arch_models():
    """benchmarks/arch_models.py, loaded by path: benchmarks/ on sys.path would shadow packages
    (benchmarks/tvm.py hides Apache TVM from later tests)."""
    spec = importlib.util.spec_from_file_location("arch_models", Path(__file__).parents[1] / "benchmarks" /
                                                  "arch_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def blobs(n: int, seed: int, size: int = 64) -> np.ndarray:
    """Mid-grey noise with a few bright squares: the patches that hold one are the outliers."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.3, 0.6, (n, 3, size, size)).astype(np.float32)
    for i in range(n):
        for _ in range(rng.integers(0, 3)):
            y0, x0 = rng.integers(0, size - 8, 2)
            x[i, :, y0:y0 + 8, x0:x0 + 8] = rng.uniform(0.9, 1.0)
    return x


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("pp")
    onnx.save(_arch_models().mobilenet_v2(0.35, 64, num_classes=10), str(d / "m.onnx"))
    return d / "m.onnx"


def _qx(g, x):
    q = g.tensors[g.inputs[0]].quant
    return quantize_host(to_physical(g, g.inputs[0], x), q.scale, q.zero_point)


def test_threshold_hits_the_outlier_rate_despite_ties():
    peaks = np.array([[255, 100, 120, 255], [90, 255, 100, 110], [100, 100, 100, 100]])
    t = choose_threshold(peaks, 0.25)
    assert t == 254 and (peaks > t).mean() == 0.25
    assert choose_threshold(peaks, 0.0) == 255


def test_patch_branches_bit_exact_host_and_dispatch(small_model, tmp_path):
    x = blobs(24, 0)
    space = mixed.analyse(calibrated(small_model, x))
    # a mixed allocation: sub-byte weights after the stage, 4-bit activations deeper in
    wb = {la.name: 4 for la in space.layers[8:] if la.kind != "dense"}
    result = compile_model(small_model, x, target="c", weight_bits=wb, act_bits={t: 4 for t in space.roots[10:14]},
                           patch="auto", sram_bytes=60000, patch_precision="value")
    g = result.graph
    rep = result.report["patch_precision"]
    assert g.meta["patch"]["grid"][0] > 1 and rep["search"]
    lo = rep["branches"]["low"]
    assert any(lo[n]["in_bits"] < h["in_bits"] for n, h in rep["branches"]["high"].items())
    assert rep["bitops_expected"] < rep["bitops_layerwise"] and rep["reduction_over_layerwise"] > 1
    xt = blobs(8, 1)
    qx = _qx(g, xt)
    hot = hot_flags(g, qx)
    assert 0 < hot.mean() < 1  # both branches run on these inputs
    # the dispatch: all-hot equals the layer-wise stage; mixed inputs differ from it
    plain = g.copy()
    plain.meta.pop("patch_precision")
    ref = run_int_batched(plain, qx)
    sim = run_int_batched(g, qx)
    allhot = g.copy()
    allhot.meta["patch_precision"]["threshold"] = -1
    assert np.array_equal(run_int_batched(allhot, qx), ref)
    assert not np.array_equal(sim, ref)
    out = tmp_path / "out"
    write_artifacts(out, result)
    src = (out / "src" / "model.c").read_text()
    assert "int32_t hot = 0;" in src and f"> {rep['threshold']}" in src
    sim = sim.reshape(len(xt), -1)
    for dsp in (False, True):
        host = build.run_host(build.build_host(out, sanitize=True, dsp=dsp), qx.reshape(len(xt), -1), sim.shape[1])
        assert np.array_equal(host, sim)


def test_patch_precision_errors(small_model, tmp_path, capsys):
    x = blobs(4, 0)
    with pytest.raises(HilcError, match="needs a patch schedule"):
        compile_model(small_model, x, patch_precision="value")
    with pytest.raises(HilcError, match="expected off or value"):
        compile_model(small_model, x, patch="auto", sram_bytes=60000, patch_precision="bits")
    np.save(tmp_path / "c.npy", x)
    assert main(["compile", str(small_model), "--calib", str(tmp_path / "c.npy"), "-o", str(tmp_path / "o"), "-q",
                 "--patch-precision", "value"]) == 2
    assert "needs a patch schedule" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-system-arm") is None or shutil.which("arm-none-eabi-gcc") is None,
                    reason="QEMU / arm-none-eabi-gcc not installed")
def test_patch_precision_run_check_on_qemu(small_model, tmp_path):
    np.save(tmp_path / "calib.npy", blobs(24, 0))
    np.save(tmp_path / "x.npy", blobs(6, 1))
    o = tmp_path / "o"
    assert main(["compile", str(small_model), "--calib", str(tmp_path / "calib.npy"), "-o", str(o), "-q",
                 "--board", "qemu-mps2-an386", "--patch", "auto", "--sram", "60000",
                 "--patch-precision", "value"]) == 0
    rep = json.loads((o / "report.json").read_text())
    assert rep["patch_precision"]["search"]
    assert main(["run", str(o), str(tmp_path / "x.npy"), "--board", "qemu-mps2-an386", "-o",
                 str(tmp_path / "y.npy"), "--check", "-q"]) == 0
