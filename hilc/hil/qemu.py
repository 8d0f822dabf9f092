"""Emulated boards: QEMU with the board's UART on a loopback TCP socket, opened through pyserial's
``socket://`` URL so the same host code drives QEMU and a real serial port.

The emulator always stops with the context (error, Ctrl-C or normal exit), and every instance
gets its own free port, so boards can run side by side.
"""

from __future__ import annotations

import atexit
import shutil
import socket
import subprocess
import time
from pathlib import Path

import serial

from hilc.errors import HilcError

_running: set[subprocess.Popen] = set()


def _stop_all() -> None:
    for p in list(_running):
        _kill(p)


atexit.register(_stop_all)


def _kill(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=3)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    _running.discard(p)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class QemuBoard:
    """``with QemuBoard("mps2-an386", elf) as port:`` -> a pyserial port wired to the board's UART."""

    def __init__(self, machine: str, elf: Path, icount: bool = True, boot_timeout: float = 10.0) -> None:
        self.machine = machine
        self.elf = Path(elf)
        self.icount = icount
        self.boot_timeout = boot_timeout
        self.proc: subprocess.Popen | None = None
        self.port: serial.SerialBase | None = None
        self.tcp_port = 0

    def start(self) -> serial.SerialBase:
        exe = shutil.which("qemu-system-arm")
        if exe is None:
            raise HilcError("qemu-system-arm is not installed "
                            "(apt-get install --no-install-recommends qemu-system-arm)")
        if not self.elf.exists():
            raise HilcError(f"{self.elf}: no firmware (run hilc flash first)")
        for _attempt in range(3):  # the free port can be taken between choosing and binding it
            self.tcp_port = free_port()
            cmd = [exe, "-M", self.machine, "-nographic", "-monitor", "none", "-kernel", str(self.elf),
                   "-serial", f"tcp:127.0.0.1:{self.tcp_port},server=on,wait=off,nodelay=on"]
            if self.icount:
                cmd[1:1] = ["-icount", "shift=0"]
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE)
            _running.add(self.proc)
            deadline = time.monotonic() + self.boot_timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    self.port = serial.serial_for_url(f"socket://127.0.0.1:{self.tcp_port}", timeout=1.0)
                    # small frames must not wait for Nagle's algorithm (a 40 ms stall per answer)
                    self.port._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    return self.port
                except (serial.SerialException, OSError):
                    time.sleep(0.02)
            err = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.poll() is not None else ""
            self.stop()
            if err and "Address already in use" not in err:
                raise HilcError(f"qemu-system-arm -M {self.machine} failed: {err.splitlines()[0]}")
        raise HilcError(f"QEMU board {self.machine} did not open its UART socket within {self.boot_timeout} s")

    def stop(self) -> None:
        if self.port is not None:
            try:
                self.port.close()
            except Exception:
                pass
            self.port = None
        if self.proc is not None:
            _kill(self.proc)
            self.proc = None

    def restart(self) -> serial.SerialBase:
        self.stop()
        return self.start()

    def __enter__(self) -> serial.SerialBase:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
