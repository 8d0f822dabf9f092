"""Host side of the hilc serial protocol (the firmware side is runtime_c/firmware/hilc_fw.c).

A frame is COBS(body) + 0x00 with body = type, seq, payload, CRC-32 (IEEE, little-endian) of
type..payload. Requests are idempotent: on a CRC error, an error frame, a timeout or a frame for
another seq the host resends, a bounded number of times, and never returns data it could not
verify.
"""

from __future__ import annotations

import struct
import time
import zlib
from dataclasses import dataclass

import serial
from cobs import cobs

from hilc.errors import HilcError

VERSION = 1
MAX_PAYLOAD = 1024
INFO, WRITE_INPUT, RUN, READ_OUTPUT, PROFILE, RESET, RAW, ERR = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0xEE
ERRORS = {1: "CRC error", 2: "unknown command", 3: "bad length", 4: "out of range", 5: "frame too long",
          6: "model mismatch", 7: "input incomplete since boot", 8: "no result since boot"}
# Error codes that mean the board lost its state (it was reset): resending the request cannot help.
STATE_LOST = (7, 8)
COMMAND_NAMES = {INFO: "INFO", WRITE_INPUT: "WRITE_INPUT", RUN: "RUN", READ_OUTPUT: "READ_OUTPUT",
                 PROFILE: "PROFILE", RESET: "RESET", RAW: "RAW"}


class LinkError(HilcError):
    """The board did not give a verified answer in time (after retries)."""

    exit_code = 1


class BoardResetError(LinkError):
    """The board was reset and lost the input or the result the request needed: the sample must
    be sent again (a reset board is never allowed to answer with zeroed memory)."""


def encode_frame(ftype: int, seq: int, payload: bytes = b"") -> bytes:
    body = bytes([ftype & 0xFF, seq & 0xFF]) + payload
    return cobs.encode(body + struct.pack("<I", zlib.crc32(body))) + b"\x00"


def decode_frame(raw: bytes) -> tuple[int, int, bytes]:
    """(type, seq, payload) of one frame without its 0x00 delimiter; ValueError if it is not intact."""
    try:
        body = cobs.decode(raw)
    except cobs.DecodeError as e:
        raise ValueError(f"COBS: {e}") from None
    if len(body) < 6:
        raise ValueError(f"frame of {len(body)} bytes is too short")
    if zlib.crc32(body[:-4]) != struct.unpack("<I", body[-4:])[0]:
        raise ValueError("CRC mismatch")
    return body[0], body[1], body[2:-4]


@dataclass
class BoardInfo:
    version: int
    model_hash: int
    input_size: int
    output_size: int
    arena_size: int
    num_layers: int
    tick_hz: int
    timer: str
    board: str


class Link:
    """One request/response conversation over a pyserial port (real UART or QEMU's socket)."""

    MIN_CHUNK = 32

    def __init__(self, port, timeout: float = 5.0, retries: int = 5) -> None:
        self.port = port
        self.timeout = timeout
        self.retries = retries
        # Bulk transfers start with full frames and halve them after a failed frame: on a noisy
        # line short frames get through where long ones almost never would.
        self.chunk = MAX_PAYLOAD - 4
        # RUN waits for a whole inference: 60 s until one has been timed, then 3x that (a lost
        # request byte then costs seconds, not a minute).
        self.run_seconds: float | None = None
        self.seq = 0
        self._buf = bytearray()
        self.stats = {"sent": 0, "retries": 0, "bad_frames": 0, "resets": 0}

    def reconnect(self, port) -> None:
        """Continue on a new port (a restarted emulator), dropping any half-read frame."""
        self.port = port
        self._buf.clear()

    def _read_frame(self, deadline: float) -> bytes | None:
        while True:
            i = self._buf.find(b"\x00")
            if i >= 0:
                raw = bytes(self._buf[:i])
                del self._buf[: i + 1]
                if raw:
                    return raw
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.port.timeout = min(remaining, 0.2)
            chunk = self.port.read(max(1, self.port.in_waiting or 1))
            if chunk:
                self._buf += chunk

    def request(self, ftype: int, payload: bytes = b"", timeout: float | None = None,
                retries: int | None = None) -> bytes:
        try:
            return self._request(ftype, payload, timeout, retries)
        except (OSError, serial.SerialException) as e:
            raise LinkError(f"{COMMAND_NAMES.get(ftype, hex(ftype))}: connection lost ({e})") from None

    def _request(self, ftype: int, payload: bytes, timeout: float | None, retries: int | None) -> bytes:
        retries = self.retries if retries is None else retries
        self.seq = (self.seq + 1) & 0xFF
        frame = encode_frame(ftype, self.seq, payload)
        last = "no answer"
        for attempt in range(retries + 1):
            if attempt:
                self.stats["retries"] += 1
                self._buf.clear()
                self.port.reset_input_buffer()
            # a leading delimiter ends any half-received frame on the board side
            self.port.write(b"\x00" + frame)
            self.stats["sent"] += 1
            deadline = time.monotonic() + (timeout or self.timeout)
            while True:
                raw = self._read_frame(deadline)
                if raw is None:
                    last = f"no answer within {timeout or self.timeout:.1f} s"
                    break
                try:
                    rtype, rseq, data = decode_frame(raw)
                except ValueError as e:
                    self.stats["bad_frames"] += 1
                    last = f"corrupt answer ({e})"
                    break
                if rseq != self.seq:
                    continue  # a late answer to an earlier attempt: keep listening
                if rtype == ERR:
                    code = data[0] if data else 0
                    if code in STATE_LOST:
                        self.stats["resets"] += 1
                        raise BoardResetError(f"{COMMAND_NAMES.get(ftype, hex(ftype))}: board reset detected "
                                              f"({ERRORS[code]})")
                    last = f"board answered error: {ERRORS.get(code, 'unknown')}"
                    break
                if rtype != (ftype | 0x80):
                    last = f"unexpected answer type 0x{rtype:02x}"
                    break
                return data
        raise LinkError(f"{COMMAND_NAMES.get(ftype, hex(ftype))}: {last} after {retries + 1} attempts")

    def _chunked(self, ftype: int, make_payload, offset: int) -> tuple[bytes, int]:
        """One bulk frame at ``offset``, shrinking the chunk while frames fail."""
        while True:
            small = self.chunk <= self.MIN_CHUNK
            try:
                payload, n = make_payload(offset, self.chunk)
                return self.request(ftype, payload, retries=None if small else 1), n
            except BoardResetError:
                raise  # not a noisy line: smaller frames cannot help
            except LinkError:
                if small:
                    raise
                self.chunk = max(self.MIN_CHUNK, self.chunk // 2)

    # --- commands ------------------------------------------------------------------------
    def info(self) -> BoardInfo:
        d = self.request(INFO)
        if len(d) < 33:
            raise LinkError("INFO: short answer")
        version, mhash, insz, outsz, arena, layers, hz = struct.unpack_from("<IQIIIII", d)
        return BoardInfo(version, mhash, insz, outsz, arena, layers, hz, ("systick", "dwt")[d[32] & 1],
                         d[33:].decode(errors="replace"))

    def write_input(self, data: bytes) -> None:
        off = 0
        while off < len(data):
            def payload(o: int, size: int) -> tuple[bytes, int]:
                part = data[o:o + size]
                return struct.pack("<I", o) + part, len(part)

            answer, n = self._chunked(WRITE_INPUT, payload, off)
            got = struct.unpack("<I", answer)[0]
            if got < off:  # the board no longer holds the bytes before this chunk
                self.stats["resets"] += 1
                raise BoardResetError(f"WRITE_INPUT: board reset detected (it holds {got} bytes of the input, "
                                      f"{off} were written)")
            if got != off + n:
                raise LinkError(f"WRITE_INPUT: board stored up to byte {got}, expected {off + n}")
            off += n

    def _run_timeout(self) -> float:
        return 60.0 if self.run_seconds is None else max(self.timeout, 3 * self.run_seconds + 0.5)

    def run(self) -> int:
        t0 = time.monotonic()
        status, ticks = struct.unpack("<IQ", self.request(RUN, timeout=self._run_timeout()))
        if self.stats["retries"] == 0 or self.run_seconds is None:
            self.run_seconds = max(self.run_seconds or 0.0, time.monotonic() - t0)
        if status != 0:
            raise LinkError(f"RUN: model_run returned {status}")
        return ticks

    def read_output(self, size: int) -> bytes:
        out = bytearray()
        while len(out) < size:
            def payload(o: int, chunk: int) -> tuple[bytes, int]:
                n = min(chunk, size - o)
                return struct.pack("<IH", o, n), n

            data, n = self._chunked(READ_OUTPUT, payload, len(out))
            if len(data) != n:
                raise LinkError(f"READ_OUTPUT: {len(data)} bytes instead of {n}")
            out += data
        return bytes(out)

    def profile(self) -> tuple[int, list[int]]:
        ticks: list[int] = []
        total, n = 0, 1
        while len(ticks) < n:
            d = self.request(PROFILE, struct.pack("<H", len(ticks)), timeout=self._run_timeout())
            total, n, count = struct.unpack_from("<QHH", d)
            ticks += list(struct.unpack_from(f"<{count}Q", d, 12))
            if count == 0:
                break
        return total, ticks

    def reset(self) -> None:
        self.request(RESET)

    def raw_transfer(self, data: bytes, timeout: float = 60.0) -> None:
        """Send bytes unframed (after a RAW request) and check the board's CRC of them: the bare
        link's speed, against which the protocol's payload throughput is measured."""
        self.request(RAW, struct.pack("<I", len(data)))
        self.port.write(data)
        raw = self._read_frame(time.monotonic() + timeout)
        if raw is None:
            raise LinkError("RAW: no answer")
        rtype, rseq, d = decode_frame(raw)
        if rtype != RAW | 0x80 or rseq != self.seq or struct.unpack("<I", d)[0] != zlib.crc32(data):
            raise LinkError("RAW: the board received other bytes")
