"""A loopback TCP proxy that damages the serial link between host and board: it corrupts or drops
a fraction of the bytes in both directions and, optionally, truncates whole frames (drops a
frame's tail, keeping its delimiter) and resets the board (injects a RESET request between the
host's frames, as a watchdog or brown-out would reboot it without the host asking)."""

from __future__ import annotations

import random
import socket
import threading

import numpy as np

from hilc.hil.protocol import RESET, LinkError, encode_frame


class FaultProxy:
    def __init__(self, target_port: int, rate: float = 0.01, seed: int = 0, truncate: float = 0.0,
                 resets: float = 0.0) -> None:
        self.target_port = target_port
        self.rate = rate
        self.truncate = truncate  # fraction of frames cut short, each direction
        self.resets = resets  # per host frame
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.stats = {"bytes": 0, "corrupted": 0, "dropped": 0, "truncated": 0, "resets": 0}
        # per direction: bytes of the current frame still let through before its tail is dropped
        self._cut_in: dict[bool, int | None] = {True: None, False: None}
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(1)
        self.port = self.server.getsockname()[1]
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _mangle(self, data: bytes, upstream: bool) -> bytes:
        out = bytearray()
        with self.lock:
            for b in data:
                self.stats["bytes"] += 1
                if b == 0:  # a delimiter: the next frame starts
                    self._cut_in[upstream] = None
                    out.append(0)
                    if self.truncate and self.rng.random() < self.truncate:
                        self._cut_in[upstream] = self.rng.randrange(1, 48)  # keep 1..47 bytes of it
                    if upstream and self.resets and self.rng.random() < self.resets:
                        self.stats["resets"] += 1
                        out += encode_frame(RESET, 0xA5)
                    continue
                cut = self._cut_in[upstream]
                if cut is not None:
                    if cut == 0:
                        continue  # dropping the frame's tail
                    self._cut_in[upstream] = cut - 1
                    if cut == 1:
                        self.stats["truncated"] += 1
                r = self.rng.random()
                if r < self.rate / 2:
                    self.stats["dropped"] += 1
                    continue
                if r < self.rate:
                    self.stats["corrupted"] += 1
                    b ^= 1 << self.rng.randrange(8)
                out.append(b)
        return bytes(out)

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while not self.stop.is_set():
                data = src.recv(4096)
                if not data:
                    break
                dst.sendall(self._mangle(data, upstream))
        except OSError:
            pass

    def _accept(self) -> None:
        try:
            client, _ = self.server.accept()
        except OSError:
            return
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.server.close()


def run_samples(link, samples: np.ndarray, expected: np.ndarray, **run_kw) -> tuple[int, int]:
    """Every sample through ``link``: (bit-exact answers, clear LinkErrors). A wrong answer fails
    the calling test at once: through a faulty link the host may give up, never be wrong."""
    from hilc.hil.runner import _run_one

    correct = errors = 0
    for i, sample in enumerate(samples):
        try:
            got = _run_one(link, sample, expected.shape[1], **run_kw)
        except LinkError:
            errors += 1
            continue
        assert np.array_equal(got, expected[i]), f"wrong result for sample {i}"
        correct += 1
    return correct, errors
