"""Seed inputs for the firmware fuzz harness: well-formed request streams built with the host's own
encoder (hilc/hil/protocol.py), one per command and conversation. The committed corpus
(tests/fuzz/corpus) grew from these under libFuzzer and was minimised with -merge=1. Each seed is
written twice: in the harness's raw mode (first byte 0x00, then the UART's bytes) and in its
structured mode (first byte 0x01, then u16 length + body per frame, framed by the harness).

    PYTHONPATH=. python tests/fuzz/seeds.py DIR
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

from hilc.hil.protocol import INFO, PROFILE, RAW, READ_OUTPUT, RESET, RUN, WRITE_INPUT, encode_frame

INPUT, OUTPUT = 600, 1100  # tests/fuzz/model.h


def seeds() -> dict[str, bytes]:
    f = encode_frame
    write = b"".join(f(WRITE_INPUT, 2 + i, struct.pack("<I", o) + bytes(range(256))[: min(200, INPUT - o)])
                     for i, o in enumerate(range(0, INPUT, 200)))
    full = b"".join(f(WRITE_INPUT, 2 + i, struct.pack("<I", o) + bytes([i + 1]) * min(300, INPUT - o))
                    for i, o in enumerate(range(0, INPUT, 300)))
    read = b"".join(f(READ_OUTPUT, 9 + i, struct.pack("<IH", o, min(1000, OUTPUT - o)))
                    for i, o in enumerate(range(0, OUTPUT, 1000)))
    return {
        "info": f(INFO, 1),
        "write": write,
        "session": f(INFO, 1) + full + f(RUN, 8) + read,
        "profile": full + f(PROFILE, 4, struct.pack("<H", 0)) + f(PROFILE, 5, struct.pack("<H", 100)),
        "reset_midway": full + f(RESET, 6) + f(RUN, 7) + f(READ_OUTPUT, 8, struct.pack("<IH", 0, 16)),
        "gap_after_reset": f(WRITE_INPUT, 1, struct.pack("<I", 300) + b"\x05" * 10),
        "raw": f(RAW, 3, struct.pack("<I", 5)) + b"\x00\x01\x02\x03\x04" + f(INFO, 4),
        "bad_crc": f(INFO, 1)[:-3] + b"\x07\x07\x00",
        "unknown": f(0x55, 1, b"xyz") + f(READ_OUTPUT, 2, b"\x01"),
        "idle": b"\x00\x00\x00" + f(RUN, 1),
    }


def structured(stream: bytes) -> bytes:
    """The same requests in the harness's structured mode: 0x01, then (u16 length, body) per frame."""
    from cobs import cobs

    out = bytearray(b"\x01")
    for raw in stream.split(b"\x00"):
        if raw:
            try:
                body = cobs.decode(raw)[:-4]
            except cobs.DecodeError:
                continue
            out += struct.pack("<H", len(body)) + body
    return bytes(out)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (out / f"raw_{name}").write_bytes(b"\x00" + data)  # raw mode: the UART's bytes
        (out / f"framed_{name}").write_bytes(structured(data))
    print(f"wrote {2 * len(seeds())} seeds to {out}")
