"""A loopback TCP proxy that corrupts or drops a fraction of the bytes in both directions."""

from __future__ import annotations

import random
import socket
import threading


class FaultProxy:
    def __init__(self, target_port: int, rate: float = 0.01, seed: int = 0) -> None:
        self.target_port = target_port
        self.rate = rate
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.stats = {"bytes": 0, "corrupted": 0, "dropped": 0}
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(1)
        self.port = self.server.getsockname()[1]
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _mangle(self, data: bytes) -> bytes:
        out = bytearray()
        with self.lock:
            for b in data:
                self.stats["bytes"] += 1
                r = self.rng.random()
                if r < self.rate / 2:
                    self.stats["dropped"] += 1
                    continue
                if r < self.rate:
                    self.stats["corrupted"] += 1
                    b ^= 1 << self.rng.randrange(8)
                out.append(b)
        return bytes(out)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self.stop.is_set():
                data = src.recv(4096)
                if not data:
                    break
                dst.sendall(self._mangle(data))
        except OSError:
            pass

    def _accept(self) -> None:
        try:
            client, _ = self.server.accept()
        except OSError:
            return
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.server.close()
