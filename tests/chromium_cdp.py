"""Load a page in headless Chromium over the DevTools protocol (``--remote-debugging-pipe``: fds
3 and 4, NUL-terminated JSON, so no websocket library is needed), collect console errors,
exceptions, failed and off-machine requests, evaluate an expression, take a screenshot."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe"]


class _Pipe:
    def __init__(self, proc: subprocess.Popen, to_chrome: int, from_chrome: int) -> None:
        self.proc, self.w, self.r = proc, to_chrome, from_chrome
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self.buf:
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self.r, 65536)
            if not chunk:
                raise RuntimeError(f"chromium closed the pipe (exit {self.proc.poll()})")
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._read_message(deadline)
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        for m in self.events:
            if m.get("method") == method:
                return m
        while True:
            m = self._read_message(deadline)
            self.events.append(m)
            if m.get("method") == method:
                return m


def load_page(url: str, expression: str, screenshot: Path, width: int = 1280) -> dict[str, Any]:
    """Open ``url``; return ``{"value": <expression's JSON value>, "errors": [...], "requests": [...]}``
    and write a full-page PNG to ``screenshot``."""
    if CHROMIUM is None:
        raise RuntimeError("chromium is not installed")
    profile = tempfile.mkdtemp(prefix="hilc-chromium-")
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()

    def fds() -> None:  # in the child: its fd 3 reads our commands, fd 4 writes its answers
        a, b = os.dup(to_r), os.dup(from_w)  # first out of the way, in case either is 3 or 4
        os.dup2(a, 3)
        os.dup2(b, 4)

    proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=fds, close_fds=False)
    os.close(to_r)
    os.close(from_w)
    cdp = _Pipe(proc, to_w, from_r)
    try:
        target = cdp.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            cdp.call(f"{domain}.enable", session=sid)
        cdp.call("Emulation.setDeviceMetricsOverride",
                 {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=sid)
        cdp.call("Page.navigate", {"url": url}, session=sid)
        cdp.wait_event("Page.loadEventFired")
        value = cdp.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                         session=sid)["result"].get("value")
        height = cdp.call("Runtime.evaluate", {"expression": "document.documentElement.scrollHeight",
                                               "returnByValue": True}, session=sid)["result"]["value"]
        cdp.call("Emulation.setDeviceMetricsOverride",
                 {"width": width, "height": int(height), "deviceScaleFactor": 1, "mobile": False}, session=sid)
        shot = cdp.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=sid)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        errors, requests = [], []
        for ev in cdp.events:
            m, p = ev.get("method"), ev.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append(f"console.{p['type']}: {p.get('args')}")
            elif m == "Runtime.exceptionThrown":
                errors.append(f"exception: {p.get('exceptionDetails', {}).get('text')}")
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                errors.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
            elif m == "Network.loadingFailed":
                errors.append(f"load failed: {p.get('errorText')}")
            elif m == "Network.requestWillBeSent":
                requests.append(p.get("request", {}).get("url", ""))
        try:
            cdp.call("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError):
            pass
        return {"value": value, "errors": errors, "requests": requests}
    finally:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(to_w)
        os.close(from_r)
        shutil.rmtree(profile, ignore_errors=True)
