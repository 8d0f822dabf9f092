"""MCU C backend: generated C built for the host under ASan/UBSan must equal the simulator bit for
bit; the Cortex-M build must link no float or division helpers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from conftest import AD01, DIGITS_CNN, RESNET8, host_vs_sim
from opmodels import cases

from hilc.compiler.pipeline import compile_model, write_artifacts
from hilc.errors import HilcError
from hilc.targets.c import build

needs_arm = pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None, reason="arm-none-eabi-gcc not installed")


@pytest.mark.parametrize("case", cases(), ids=lambda c: c.name)
def test_single_operator_models_bit_exact_under_sanitizers(case, tmp_path):
    onnx.save(case.model, str(tmp_path / "m.onnx"))
    _, (portable, dsp), sim = host_vs_sim(tmp_path / "m.onnx", case.inputs(64, 0), case.inputs(32, 1), tmp_path / "out")
    assert np.array_equal(portable, sim)
    assert np.array_equal(dsp, sim)


@pytest.mark.parametrize("name", ["resnet8", "ad01", "digits"])
def test_real_models_bit_exact_under_sanitizers(name, tmp_path, crops32, digits):
    if name == "resnet8":
        model, calib, x = RESNET8, crops32[:64], crops32[128:160]
    elif name == "ad01":
        frames = np.load(AD01.parent / "ad01_toycar_normal_sample.npy").astype(np.float32)
        model, calib, x = AD01, frames, np.concatenate([frames[:32] * 0.9, frames[:8] * 1.1])
    else:
        model, calib, x = DIGITS_CNN, digits["x_train"][:128], digits["x_test"][:48]
    _, (portable, dsp), sim = host_vs_sim(model, calib, x, tmp_path / "out")
    assert len(sim) >= 32
    assert np.array_equal(portable, sim)
    assert np.array_equal(dsp, sim)


def test_compile_target_c_writes_sources_makefile_and_memory_report(tmp_path, crops32):
    np.save(tmp_path / "calib.npy", crops32[:32])
    from hilc.cli import main

    assert main(["compile", str(RESNET8), "--calib", str(tmp_path / "calib.npy"), "-o", str(tmp_path / "o"),
                 "--target", "c", "-q"]) == 0
    o = tmp_path / "o"
    assert {p.name for p in (o / "src").iterdir()} >= {"model.c", "model.h", "hilc_kernels.c", "hilc_kernels.h",
                                                       "hilc_arith.h", "host_main.c"}
    assert (o / "Makefile").exists()
    report = json.loads((o / "report.json").read_text())
    assert report["arena_bytes"] <= 1.05 * report["arena_lower_bound_bytes"]
    assert report["peak_sram_bytes"] == report["arena_bytes"] + report["io_bytes"] + report["scratch_bytes"]
    import subprocess

    made = subprocess.run(["make", "-C", str(o)], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert (o / "model_host").exists()
    header = (o / "src" / "model.h").read_text()
    assert "int model_run(const int8_t *input, int8_t *output);" in header
    assert f"#define MODEL_ARENA_SIZE {report['arena_bytes']}" in header


@needs_arm
@pytest.mark.parametrize("cpu", ["cortex-m4", "cortex-m3"])
def test_cortex_m_soft_float_build_links_no_float_or_division_helpers(cpu, tmp_path, crops32):
    result = compile_model(RESNET8, crops32[:16], target="c", cpu=cpu)
    write_artifacts(tmp_path / "o", result)
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    elf = tmp_path / "o" / "build" / cpu / "firmware.elf"
    assert elf.exists()
    assert build.forbidden_symbols(elf) == []
    assert report["flash_bytes"] > report["constants_flash_bytes"] > 0
    assert 0 < report["code_bytes"] <= 16 * 1024
    assert report["stack_bytes"] > 0


def test_forbidden_symbol_pattern():
    for bad in ("__aeabi_fadd", "__aeabi_dmul", "__aeabi_idiv", "__aeabi_uldivmod", "__divsi3"):
        assert build.FORBIDDEN_SYMBOLS.match(bad)
    for ok in ("__aeabi_memcpy", "__aeabi_lmul", "__aeabi_llsl", "model_run"):
        assert not build.FORBIDDEN_SYMBOLS.match(ok)


def test_unknown_cpu_and_flash_limit_fail_at_compile_time(crops32):
    with pytest.raises(HilcError, match="unknown CPU 'cortex-m0'.*cortex-m4"):
        compile_model(RESNET8, crops32[:8], target="c", cpu="cortex-m0")
    with pytest.raises(HilcError, match=r"constants need \d+ bytes of flash; the target has 32768"):
        compile_model(RESNET8, crops32[:8], target="c", flash_bytes=32768)
