"""The Gradio app in a real browser: headless Chromium (Debian's ``chromium``, installed by
``make test`` when missing) loads the page, sends a chat message, waits for the reply and takes
a screenshot that must not be blank. Chromium is driven through the Chrome DevTools
protocol over ``--remote-debugging-pipe`` (JSON messages separated by NUL bytes on file
descriptors 3 and 4), so no websocket client or browser download is needed.
Under CI (``CI=true``) this test runs, never skips."""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from tessera.apps.app import AppLimits, TesseraApp, serve
from test_app import doubles_bundle

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         "--remote-debugging-pipe")

if CHROMIUM is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("CI=true but chromium is not installed; `make test` installs it (apt-get install -y chromium)")
    pytest.skip("chromium is not installed (apt-get install -y chromium, or run `make test` as root)",
                allow_module_level=True)


class DevTools:
    """A minimal Chrome DevTools protocol client over the browser's debugging pipe."""

    def __init__(self, user_data_dir: Path) -> None:
        child_reads, self._to_child = os.pipe()
        self._from_child, child_writes = os.pipe()
        # copies numbered 10 and up, so that placing them on 3 and 4 cannot overwrite each other
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (child_reads, child_writes)]
        os.close(child_reads)
        os.close(child_writes)

        def wire() -> None:  # in the child: the browser reads fd 3 and writes fd 4
            os.dup2(ends[0], 3)
            os.dup2(ends[1], 4)

        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
                                     preexec_fn=wire, pass_fds=(3, 4), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        for fd in ends:
            os.close(fd)
        self._next_id = 0
        self._buffer = b""
        self.session: str | None = None

    def send(self, method: str, params: dict[str, Any] | None = None, *, timeout: float = 30.0) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if self.session is not None and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
        raise TimeoutError(f"no answer to {method} in {timeout} s")

    def _read(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_child, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed its debugging pipe (it exited)")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def evaluate(self, expression: str) -> Any:
        return self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})["result"].get("value")

    def wait_for(self, expression: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._holds(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never satisfied {expression!r} in {timeout} s")
            time.sleep(0.25)

    def _holds(self, expression: str) -> bool:
        try:
            return bool(self.evaluate(expression))
        except RuntimeError as e:  # the page is still navigating: its context is not there yet
            if "context" not in str(e).lower():
                raise
            return False

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._to_child)
        os.close(self._from_child)


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[DevTools]:
    tools = DevTools(tmp_path / "chromium-profile")
    yield tools
    tools.close()


@pytest.fixture(scope="module")
def app_url() -> Iterator[str]:
    demo, url = serve(TesseraApp(doubles_bundle(), limits=AppLimits.debug()))
    yield url
    demo.close()


def test_page_loads_takes_a_chat_message_and_renders(browser: DevTools, app_url: str, tmp_path: Path) -> None:
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    browser.session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    browser.send("Emulation.setDeviceMetricsOverride", {"width": 1100, "height": 900, "deviceScaleFactor": 1,
                                                        "mobile": False})
    browser.send("Page.navigate", {"url": app_url})
    browser.wait_for("!!document.querySelector('#chat-input textarea')", timeout=60)
    assert "Tessera" in browser.evaluate("document.title")

    browser.evaluate("document.querySelector('#chat-input textarea').focus()")
    browser.send("Input.insertText", {"text": "hello tessera"})
    for kind in ("keyDown", "keyUp"):
        browser.send("Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter",
                                                "windowsVirtualKeyCode": 13, "text": "\r" if kind == "keyDown" else ""})
    browser.wait_for("document.querySelector('#chatbot').innerText.includes('hello tessera')", timeout=60)
    browser.wait_for("document.querySelectorAll('#chatbot [data-testid=\"bot\"]').length > 0", timeout=60)
    assert not browser.evaluate("document.body.innerText.includes('Error')")

    shot = base64.b64decode(browser.send("Page.captureScreenshot", {"format": "png"})["data"])
    (tmp_path / "app.png").write_bytes(shot)
    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("L"), dtype=np.float32)
    assert pixels.shape == (900, 1100)
    assert pixels.std() > 10, f"the screenshot is blank (pixel std {pixels.std():.1f})"
    assert len(np.unique(pixels)) > 20  # text, widgets and the chat, not one flat colour
