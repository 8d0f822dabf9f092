"""Board faults on the QEMU boards: a board reset midway is detected and reported, never answered
with zeroed memory; fault injection with resets and truncated frames never gives a wrong result;
two boards run in parallel."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from conftest import DIGITS_CNN

from hilc.compiler.arith import quantize_host
from hilc.compiler.pipeline import compile_model, write_artifacts
from hilc.hil import protocol
from hilc.hil.boards import load_board
from hilc.hil.protocol import BoardResetError
from hilc.sim.simulator import run_int_batched, to_physical

needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-arm") is None or shutil.which("arm-none-eabi-gcc") is None,
                                reason="needs qemu-system-arm and arm-none-eabi-gcc (installed by .ci/run)")
pytestmark = [pytest.mark.slow, needs_qemu]
BOARD = "qemu-mps2-an386"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("faults") / "o"
    result = compile_model(DIGITS_CNN, digits["x_train"][:64], board=BOARD)
    write_artifacts(out, result)
    g = result.graph
    x = digits["x_test"][:24]
    q = g.tensors[g.inputs[0]].quant
    qx = quantize_host(to_physical(g, g.inputs[0], x), q.scale, q.zero_point).reshape(len(x), -1)
    return out, g, x, qx, run_int_batched(g, qx.reshape(len(x), *g.tensors[g.inputs[0]].shape[1:])).reshape(len(x), -1)


def _reset(link) -> None:
    """Reboot the board behind the host's back (as a watchdog would) and wait until it answers."""
    link.request(protocol.RESET)
    link.info()


def test_board_reset_midway_is_detected_at_every_step(compiled):
    from hilc.hil.runner import _run_one, connect

    out, g, _, qx, expected = compiled
    sample = qx[3].tobytes()
    with connect(out, load_board(BOARD), g, timeout=1.0) as link:
        # after the input was written, before RUN: the board no longer holds the input
        link.write_input(sample)
        _reset(link)
        with pytest.raises(BoardResetError, match="RUN: board reset detected"):
            link.run()
        # after RUN, before READ_OUTPUT: the result is gone; zeros are never returned
        link.write_input(sample)
        link.run()
        _reset(link)
        with pytest.raises(BoardResetError, match="READ_OUTPUT: board reset detected"):
            link.read_output(expected.shape[1])
        # between two input chunks: the board would hold the second chunk after a gap
        inner = link.link
        plain_request = inner.request

        def request_then_reset(ftype, payload=b"", **kw):
            answer = plain_request(ftype, payload, **kw)
            if ftype == protocol.WRITE_INPUT and struct.unpack_from("<I", payload)[0] == 0:
                plain_request(protocol.RESET)
                plain_request(protocol.INFO)
            return answer

        inner.request = request_then_reset
        inner.chunk = 32
        try:
            with pytest.raises(BoardResetError, match="holds 0 bytes of the input, 32 were written"):
                link.write_input(sample)
        finally:
            del inner.request
        # during the inference: the RUN answer is lost with the reset, the resent RUN finds no input
        link.write_input(sample)
        link.port.write(b"\x00" + protocol.encode_frame(protocol.RUN, 0x77)
                        + protocol.encode_frame(protocol.RESET, 0x78))
        link.info()  # skips the stale answers (other seqs) and waits for the rebooted board
        with pytest.raises(BoardResetError):
            link.run()
        assert link.stats["resets"] == 4
        # the runner resends a sample the board lost (reset after its first RUN): the answer is exact
        resets_left = [1]

        def reset_after_run(ftype, payload=b"", **kw):
            answer = plain_request(ftype, payload, **kw)
            if ftype == protocol.RUN and resets_left[0]:
                resets_left[0] -= 1
                plain_request(protocol.RESET)
                plain_request(protocol.INFO)
            return answer

        inner.request = reset_after_run
        try:
            np.testing.assert_array_equal(_run_one(link, qx[3], expected.shape[1]), expected[3])
        finally:
            del inner.request
        assert link.stats["resets"] == 5 and resets_left == [0]


def test_profile_after_reset_is_refused(compiled):
    from hilc.hil.runner import connect

    out, g, _, qx, _ = compiled
    with connect(out, load_board(BOARD), g, timeout=1.0) as link:
        link.write_input(qx[0].tobytes())
        total, ticks = link.profile()
        assert total > 0 and len(ticks) == len(g.nodes)
        _reset(link)
        with pytest.raises(BoardResetError):
            link.request(protocol.PROFILE, struct.pack("<H", 1))
        with pytest.raises(BoardResetError):
            link.profile()


def test_fault_injection_with_resets_and_truncated_frames_never_yields_a_wrong_result(compiled):
    """Bytes corrupted or dropped (0.5%), 3% of frames truncated in each direction, and the board
    reset behind the host's back after 4% of its frames: every sample ends in the exact output or
    a clear error, never a wrong output."""
    import serial
    from faultproxy import FaultProxy, run_samples

    from hilc.hil.protocol import Link
    from hilc.hil.qemu import QemuBoard
    from hilc.hil.runner import ensure_firmware

    out, g, x, qx, expected = compiled
    board = load_board(BOARD)
    qemu = QemuBoard(board.run["machine"], ensure_firmware(out, board))
    qemu.start().close()  # QEMU keeps listening; the proxy becomes its client
    proxy = FaultProxy(qemu.tcp_port, rate=0.005, seed=3, truncate=0.03, resets=0.04)
    try:
        link = Link(serial.serial_for_url(f"socket://127.0.0.1:{proxy.port}", timeout=0.2), timeout=0.4,
                    retries=8)
        link.chunk = 32  # two input chunks per sample, so resets land between chunks too
        correct, errors = run_samples(link, qx, expected, resets=6)
    finally:
        proxy.close()
        qemu.stop()
    print(f"faults: {correct} correct, {errors} clear errors, proxy {proxy.stats}, link {link.stats}")
    assert proxy.stats["resets"] > 0 and proxy.stats["truncated"] > 0 and proxy.stats["corrupted"] > 0
    assert link.stats["resets"] > 0  # resets were detected, and the samples resent
    assert correct >= len(qx) // 2


def test_two_cli_runs_on_two_emulated_boards_in_parallel(compiled, tmp_path):
    out, _, x, _, _ = compiled
    np.save(tmp_path / "x.npy", x[:8])
    procs = [subprocess.Popen([sys.executable, "-m", "hilc.cli", "run", str(out), str(tmp_path / "x.npy"), "--board",
                               BOARD, "-o", str(tmp_path / f"y{i}.npy"), "--check"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL) for i in range(2)]
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        assert "8/8 outputs bit-exact" in stdout
    assert np.array_equal(np.load(tmp_path / "y0.npy"), np.load(tmp_path / "y1.npy"))
