"""Hardware in the loop: the protocol, and the same host code driving QEMU-emulated Cortex-M boards."""

from __future__ import annotations

import json
import shutil
import socket
import threading

import numpy as np
import pytest
from conftest import AD01, DIGITS_CNN, RESNET8
from conftest import hilc_cli as hilc
from hypothesis import given, settings
from hypothesis import strategies as st

from hilc.compiler.arith import quantize_host
from hilc.compiler.pipeline import compile_model, write_artifacts
from hilc.errors import HilcError
from hilc.hil import protocol
from hilc.hil.boards import list_boards, load_board
from hilc.sim.simulator import run_int_batched, to_physical

needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-arm") is None or shutil.which("arm-none-eabi-gcc") is None,
                                reason="needs qemu-system-arm and arm-none-eabi-gcc (installed by .ci/run)")


# --- protocol ---------------------------------------------------------------------------------

@pytest.mark.parametrize("payload", [b"", b"\x00", b"\x00" * 300, bytes(range(256)) * 3, b"\x01" * 254])
def test_frame_round_trip(payload):
    raw = protocol.encode_frame(protocol.RUN, 7, payload)
    assert raw.endswith(b"\x00") and b"\x00" not in raw[:-1]
    assert protocol.decode_frame(raw[:-1]) == (protocol.RUN, 7, payload)


def test_corrupted_frames_are_refused():
    raw = bytearray(protocol.encode_frame(protocol.INFO, 1, b"hello")[:-1])
    for i in range(len(raw)):
        for bit in range(8):
            bad = bytearray(raw)
            bad[i] ^= 1 << bit
            with pytest.raises(ValueError):
                protocol.decode_frame(bytes(bad))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decoder_never_accepts_or_crashes_on_garbage(data):
    try:
        ftype, seq, payload = protocol.decode_frame(data)
    except ValueError:
        return
    # the only acceptable garbage is a well-formed frame
    assert protocol.encode_frame(ftype, seq, payload)[:-1] == data


def test_boards_are_listed_and_unknown_board_names_them():
    names = {b.name for b in list_boards()}
    assert {"qemu-mps2-an386", "qemu-mps2-an385", "qemu-mps2-an500", "nucleo-f446re", "stm32f746g-disco",
            "nrf52840dk"} <= names
    with pytest.raises(HilcError, match="unknown board 'esp32'.*qemu-mps2-an386"):
        load_board("esp32")
    r = hilc("boards")
    assert r.returncode == 0 and "nucleo-f446re" in r.stdout


@pytest.mark.parametrize("board", ["nucleo-f446re", "stm32f746g-disco", "nrf52840dk", "qemu-mps2-an500"])
@needs_qemu
def test_every_board_firmware_builds_within_its_flash(board, tmp_path, digits):
    result = compile_model(DIGITS_CNN, digits["x_train"][:64], board=board)
    write_artifacts(tmp_path / "o", result)
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert (tmp_path / "o" / "build" / board / "firmware.elf").exists()
    assert report["board"] == board and 0 < report["flash_bytes"] <= load_board(board).flash_bytes


def test_model_too_big_for_the_board_is_refused_before_building(crops32):
    with pytest.raises(HilcError, match=r"needs \d+ bytes of SRAM .* nucleo-f446re has 131072"):
        import sys as _s
        _s.path.insert(0, str(RESNET8.parents[2] / "benchmarks"))
        import tempfile

        import onnx
        from arch_models import mobilenet_v2

        with tempfile.TemporaryDirectory() as d:
            onnx.save(mobilenet_v2(0.35, 144, num_classes=10), f"{d}/m.onnx")
            x = np.random.default_rng(0).uniform(0, 1, (2, 3, 144, 144)).astype(np.float32)
            compile_model(f"{d}/m.onnx", x, board="nucleo-f446re")


def test_serial_port_that_does_not_exist(tmp_path, digits):
    result = compile_model(DIGITS_CNN, digits["x_train"][:32], target="c")
    write_artifacts(tmp_path / "o", result)
    np.save(tmp_path / "x.npy", digits["x_test"][:2])
    if shutil.which("arm-none-eabi-gcc") is None:
        pytest.skip("needs arm-none-eabi-gcc")
    r = hilc("run", tmp_path / "o", tmp_path / "x.npy", "--board", "nucleo-f446re", "-o", tmp_path / "y.npy",
             "--port", "/dev/ttyNOPE0")
    assert r.returncode == 2 and "serial port /dev/ttyNOPE0" in r.stderr and "Traceback" not in r.stderr


@needs_qemu
def test_board_that_does_not_answer(tmp_path, digits):
    result = compile_model(DIGITS_CNN, digits["x_train"][:32], target="c")
    write_artifacts(tmp_path / "o", result)
    np.save(tmp_path / "x.npy", digits["x_test"][:2])
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    accepted = []  # keep the accepted connection open: the board is there but says nothing
    threading.Thread(target=lambda: accepted.append(silent.accept()), daemon=True).start()
    from hilc.hil import runner

    with pytest.raises(HilcError, match="does not answer"):
        with runner.connect(tmp_path / "o", load_board("nucleo-f446re"), result.graph,
                            port=f"socket://127.0.0.1:{silent.getsockname()[1]}", timeout=0.3):
            pass
    silent.close()


# --- QEMU boards -------------------------------------------------------------------------------

def _built(tmp_path, model, calib, board):
    """The model compiled for BOARD and its artifacts written to TMP_PATH/BOARD: (folder, result)."""
    out = tmp_path / f"{board}"
    result = compile_model(model, calib, board=board)
    write_artifacts(out, result)
    return out, result


def _compiled(tmp_path, model, calib, board):
    return _built(tmp_path, model, calib, board)[0]


@pytest.mark.slow
@needs_qemu
@pytest.mark.parametrize("name,board", [("resnet8", "qemu-mps2-an386"), ("ad01", "qemu-mps2-an386"),
                                        ("digits", "qemu-mps2-an386"), ("resnet8", "qemu-mps2-an385")])
def test_run_check_bit_exact_on_qemu(name, board, tmp_path, crops32, digits):
    if name == "resnet8":
        model, calib, x = RESNET8, crops32[:64], crops32[128:144]
    elif name == "ad01":
        frames = np.load(AD01.parent / "ad01_toycar_normal_sample.npy").astype(np.float32)
        model, calib, x = AD01, frames, frames[:16]
    else:
        model, calib, x = DIGITS_CNN, digits["x_train"][:128], digits["x_test"][:16]
    out = _compiled(tmp_path, model, calib, board)
    np.save(tmp_path / "x.npy", x)
    r = hilc("run", out, tmp_path / "x.npy", "--board", board, "-o", tmp_path / "y.npy", "--check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "16/16 outputs bit-exact" in r.stdout
    r2 = hilc("simulate", out, tmp_path / "x.npy", "-o", tmp_path / "s.npy")
    assert r2.returncode == 0 and np.array_equal(np.load(tmp_path / "y.npy"), np.load(tmp_path / "s.npy"))


@pytest.mark.slow
@needs_qemu
def test_profile_layers_sum_to_total_and_repeat_exactly(tmp_path, crops32):
    out = _compiled(tmp_path, RESNET8, crops32[:32], "qemu-mps2-an386")
    first = hilc("profile", out, "--board", "qemu-mps2-an386")
    assert first.returncode == 0, first.stderr
    p1 = json.loads((out / "report.json").read_text())["profile"]
    assert hilc("profile", out, "--board", "qemu-mps2-an386").returncode == 0
    p2 = json.loads((out / "report.json").read_text())["profile"]
    assert p1["layers"] == p2["layers"] and p1["total_ticks"] == p2["total_ticks"]
    assert abs(p1["sum_of_layers"] - p1["total_ticks"]) <= 0.02 * p1["total_ticks"]
    assert len(p1["layers"]) == len(json.loads((out / "report.json").read_text())["layers"])


@pytest.mark.slow
@needs_qemu
def test_two_boards_side_by_side(tmp_path, digits):
    from concurrent.futures import ThreadPoolExecutor

    from hilc.hil.runner import run_command

    results = {}
    outs = {b: _compiled(tmp_path, DIGITS_CNN, digits["x_train"][:64], b)
            for b in ("qemu-mps2-an386", "qemu-mps2-an385")}
    graphs = {b: compile_model(DIGITS_CNN, digits["x_train"][:64], board=b).graph for b in outs}
    with ThreadPoolExecutor(2) as ex:
        futs = {b: ex.submit(run_command, outs[b], load_board(b), graphs[b], digits["x_test"][:8], True)
                for b in outs}
        for b, f in futs.items():
            results[b] = f.result()
    assert all(bad == 0 for _, bad in results.values())


@pytest.mark.slow
@needs_qemu
def test_fault_injection_never_yields_a_wrong_result(tmp_path, digits):
    """1% of the bytes in both directions corrupted or dropped: every sample ends in the right
    output or a clear LinkError, never in a wrong output."""
    from faultproxy import FaultProxy, run_samples

    from hilc.hil.protocol import Link
    from hilc.hil.qemu import QemuBoard
    from hilc.hil.runner import ensure_firmware

    board = load_board("qemu-mps2-an386")
    out, result = _built(tmp_path, DIGITS_CNN, digits["x_train"][:64], board.name)
    g = result.graph
    x = digits["x_test"][:24]
    q = g.tensors[g.inputs[0]].quant
    qx = quantize_host(to_physical(g, g.inputs[0], x), q.scale, q.zero_point)
    expected = run_int_batched(g, qx).reshape(len(x), -1)
    import serial

    qemu = QemuBoard(board.run["machine"], ensure_firmware(out, board))
    qemu.start().close()  # QEMU keeps listening; the proxy becomes its client
    proxy = FaultProxy(qemu.tcp_port, rate=0.01, seed=1)
    try:
        link = Link(serial.serial_for_url(f"socket://127.0.0.1:{proxy.port}", timeout=0.2), timeout=0.4,
                    retries=8)
        correct, errors = run_samples(link, qx.reshape(len(x), -1), expected)
    finally:
        proxy.close()
        qemu.stop()
    print(f"fault injection: {correct} correct, {errors} clear errors, proxy {proxy.stats}, link {link.stats}")
    assert proxy.stats["corrupted"] > 0 and proxy.stats["dropped"] > 0
    assert correct >= len(x) // 2


@pytest.mark.slow
@needs_qemu
def test_reset_command_reboots_the_board_and_it_answers_again(tmp_path, digits):
    from hilc.hil.runner import connect

    board = load_board("qemu-mps2-an386")
    out, result = _built(tmp_path, DIGITS_CNN, digits["x_train"][:32], board.name)
    with connect(out, board, result.graph) as link:
        link.write_input(bytes(range(64)))
        link.reset()
        info = link.info()  # the firmware booted again and answers
        assert info.model_hash == result.graph.content_hash()
        link.write_input(bytes(64))
        assert link.run() > 0


@pytest.mark.slow
@needs_qemu
def test_hung_emulator_is_restarted_and_the_answer_still_exact(tmp_path, digits):
    import os
    import signal

    from hilc.hil.runner import _run_one, connect

    board = load_board("qemu-mps2-an386")
    out, result = _built(tmp_path, DIGITS_CNN, digits["x_train"][:32], board.name)
    g = result.graph
    q = g.tensors[g.inputs[0]].quant
    qx = quantize_host(to_physical(g, g.inputs[0], digits["x_test"][:1]), q.scale, q.zero_point)
    expected = run_int_batched(g, qx).reshape(-1)
    with connect(out, board, g, timeout=0.3) as link:
        os.kill(link.qemu.proc.pid, signal.SIGSTOP)  # the board hangs
        got = _run_one(link, qx.reshape(-1), expected.size)
    assert np.array_equal(got, expected)
