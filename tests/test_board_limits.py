"""Board limits at compile time: a model whose constants exceed the board's flash, whose memory
exceeds its SRAM, or whose firmware (code + constants) exceeds its flash is refused before
anything is flashed, with the exact bytes needed and the bytes the board has."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hilc.compiler.pipeline import compile_model, write_artifacts
from hilc.errors import HilcError
from hilc.hil.boards import load_board

BOARD = "nucleo-f446re"  # 512 KiB flash, 128 KiB SRAM


def _save(path, nodes, x_shape, y_shape, inits):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))
    m = helper.make_model(helper.make_graph(nodes, "m", [x], [y], initializer=inits),
                          opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def dense_model(path, k: int, o: int):
    w = np.random.default_rng(0).standard_normal((k, o)).astype(np.float32)
    return _save(path, [helper.make_node("MatMul", ["x", "W"], ["y"])], (1, k), (1, o),
                 [numpy_helper.from_array(w, "W")])


def test_constants_beyond_the_boards_flash_are_refused_with_bytes_needed_and_available(tmp_path):
    board = load_board(BOARD)
    path = dense_model(tmp_path / "big.onnx", 1000, 600)  # 600,000 int8 weights
    calib = np.random.default_rng(1).standard_normal((4, 1000)).astype(np.float32)
    need = compile_model(path, calib, target="c").report["constants_flash_bytes"]
    assert need == 600_000 + 600 * (4 + 4 + 1)  # weights, int32 bias, int32 multiplier, int8 shift
    with pytest.raises(HilcError, match=rf"^the model's constants need {need} bytes of flash; {BOARD} has "
                                        rf"{board.flash_bytes}$"):
        compile_model(path, calib, board=BOARD)


def test_memory_beyond_the_boards_sram_is_refused_with_bytes_needed_and_available(tmp_path):
    board = load_board(BOARD)
    w = np.random.default_rng(0).standard_normal((8, 8, 3, 3)).astype(np.float32)
    path = _save(tmp_path / "wide.onnx", [helper.make_node("Conv", ["x", "W"], ["y"], kernel_shape=[3, 3],
                                                          pads=[1, 1, 1, 1])],
                 (1, 8, 96, 96), (1, 8, 96, 96), [numpy_helper.from_array(w, "W")])  # 72 KiB in, 72 KiB out
    calib = np.random.default_rng(1).standard_normal((2, 8, 96, 96)).astype(np.float32)
    need = compile_model(path, calib, target="c").report["peak_sram_bytes"]
    assert need > board.ram_bytes
    with pytest.raises(HilcError, match=rf"^the model needs {need} bytes of SRAM .*; {BOARD} has {board.ram_bytes}\b"):
        compile_model(path, calib, board=BOARD)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None, reason="needs arm-none-eabi-gcc (installed by .ci/run)")
def test_firmware_beyond_the_boards_flash_is_refused_with_bytes_needed_and_available(tmp_path):
    """Constants that fit the flash, but not together with the protocol firmware's code."""
    board = load_board(BOARD)
    k = 1000
    o = (board.flash_bytes - 1000) // (k + 9)  # constants ~1 KB short of the flash
    path = dense_model(tmp_path / "edge.onnx", k, o)
    calib = np.random.default_rng(1).standard_normal((4, k)).astype(np.float32)
    result = compile_model(path, calib, board=BOARD)  # the constants alone fit
    assert result.report["constants_flash_bytes"] <= board.flash_bytes
    with pytest.raises(HilcError, match=rf"^firmware needs \d+ bytes of flash; {BOARD} has {board.flash_bytes}$") as e:
        write_artifacts(tmp_path / "out", result)
    assert int(e.value.args[0].split()[2]) > board.flash_bytes
    assert not (tmp_path / "out").exists()
