"""The generated C's host harness under valgrind (memcheck): no invalid access, no use of
uninitialised values, no leak, and still bit-exact with the simulator. Complements the ASan/UBSan
builds of test_c_backend.py (valgrind runs the plain -O2 build, as shipped)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import onnx
import pytest
from conftest import RESNET8
from opmodels import cases

from hilc.compiler.arith import quantize_host
from hilc.compiler.pipeline import compile_model, write_artifacts
from hilc.sim.simulator import run_int_batched, to_physical
from hilc.targets.c import build

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind (installed by .ci/run)")]
VALGRIND = ["valgrind", "--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=all", "-q"]
OP_CASES = {c.name: c for c in cases()}


def under_valgrind(binary, qx: np.ndarray, out_size: int) -> np.ndarray:
    work = binary.parent
    (work / "vg_in.bin").write_bytes(np.ascontiguousarray(qx, np.int8).tobytes())
    r = subprocess.run([*VALGRIND, str(binary), "vg_in.bin", "vg_out.bin"], cwd=work, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ERROR SUMMARY" not in r.stderr or "ERROR SUMMARY: 0 errors" in r.stderr
    return np.frombuffer((work / "vg_out.bin").read_bytes(), np.int8).reshape(len(qx), out_size)


@pytest.mark.parametrize("name", ["resnet8", "conv_group3", "depthwise_mult2_stride2", "avgpool_pad_include",
                                  "softmax_channels_4d"])
def test_host_harness_clean_under_valgrind(name, tmp_path, crops32):
    if name == "resnet8":
        model, calib, x = RESNET8, crops32[:32], crops32[128:130]
    else:
        case = OP_CASES[name]
        model = tmp_path / "m.onnx"
        onnx.save(case.model, str(model))
        calib, x = case.inputs(64, 0), case.inputs(8, 1)
    result = compile_model(model, calib, target="c")
    out = tmp_path / "o"
    write_artifacts(out, result)
    g = result.graph
    q = g.tensors[g.inputs[0]].quant
    qx = quantize_host(to_physical(g, g.inputs[0], x), q.scale, q.zero_point)
    sim = run_int_batched(g, qx).reshape(len(x), -1)
    for dsp in (False, True) if name == "resnet8" else (False,):
        got = under_valgrind(build.build_host(out, dsp=dsp), qx.reshape(len(x), -1), sim.shape[1])
        assert np.array_equal(got, sim)


def test_firmware_fuzz_corpus_clean_under_valgrind(tmp_path):
    """The firmware's parser and dispatcher (plain build, no sanitizers) replaying the fuzz corpus."""
    from test_fuzz_protocol import CORPUS, FUZZ, FW

    exe = tmp_path / "replay"
    r = subprocess.run(["cc", "-std=c99", "-O2", "-g", f"-I{FW}", f"-I{FUZZ}", str(FUZZ / "fw_fuzz.c"),
                        str(FUZZ / "fw_replay.c"), "-o", str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    files = sorted(str(p) for p in CORPUS.iterdir())
    r = subprocess.run([*VALGRIND, str(exe), *files], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"replayed {len(files)} inputs" in r.stdout
