"""Extra inputs for the PTQ of a mixed-precision allocation (``compile_model(ptq_data=...)``):
plumbed to AdaRound / bias correction only (same allocation), deterministic, reported, and a bad
array is a one-line error."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from test_mixed import chain_model

from hilc.compiler.mixed import Budgets
from hilc.compiler.pipeline import compile_model
from hilc.errors import HilcError


def _constants(g) -> list[np.ndarray]:
    return [g.constants[k] for k in sorted(g.constants)]


def test_ptq_data_refits_the_same_allocation_deterministically(tmp_path):
    onnx.save(chain_model(), str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(2)
    calib = rng.uniform(-2, 2, (48, 3, 7, 9)).astype(np.float32)
    extra = rng.uniform(-2, 2, (64, 3, 7, 9)).astype(np.float32)
    kw = dict(precision="mixed", budgets=Budgets(bitops_ratio=2.0), finetune_steps=0,
              sensitivity_cache=tmp_path / "sens.json")
    base = compile_model(tmp_path / "m.onnx", calib, **kw)
    a = compile_model(tmp_path / "m.onnx", calib, ptq_data=extra, **kw)
    b = compile_model(tmp_path / "m.onnx", calib, ptq_data=extra.copy(), **kw)
    ma, mbase = a.report["mixed_precision"], base.report["mixed_precision"]
    assert (ma["weight_bits"], ma["act_bits"]) == (mbase["weight_bits"], mbase["act_bits"])  # search untouched
    assert any(w < 8 for w in ma["weight_bits"].values())
    assert ma["ptq"]["samples"] == 48 + 64 and "samples" not in mbase["ptq"]
    ca, cb, cbase = _constants(a.graph), _constants(b.graph), _constants(base.graph)
    assert all(np.array_equal(x, y) for x, y in zip(ca, cb, strict=True))  # deterministic
    assert not all(np.array_equal(x, y) for x, y in zip(ca, cbase, strict=True))  # the extra inputs were used
    with pytest.raises(HilcError) as e:
        compile_model(tmp_path / "m.onnx", calib, ptq_data=extra[:, :2], **kw)
    assert "--ptq-data" in str(e.value) and "must have shape ['N', 3, 7, 9]" in str(e.value), e.value
    assert "\n" not in str(e.value)


def test_cli_ptq_data_needs_mixed_and_is_reported(tmp_path, capsys):
    from hilc.cli import main

    onnx.save(chain_model(), str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(3)
    np.save(tmp_path / "calib.npy", rng.uniform(-2, 2, (32, 3, 7, 9)).astype(np.float32))
    np.save(tmp_path / "extra.npy", rng.uniform(-2, 2, (40, 3, 7, 9)).astype(np.float32))
    base = ["compile", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "calib.npy"), "-q",
            "--ptq-data", str(tmp_path / "extra.npy")]
    assert main(base + ["-o", str(tmp_path / "int8")]) == 2
    assert "--ptq-data needs --precision mixed" in capsys.readouterr().err
    assert main(base + ["-o", str(tmp_path / "mx"), "--precision", "mixed", "--bitops-ratio", "2",
                        "--finetune-steps", "0"]) == 0
    assert json.loads((tmp_path / "mx" / "report.json").read_text())["mixed_precision"]["ptq"]["samples"] == 72
