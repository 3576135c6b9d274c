"""Headless Chromium for the status page's browser tests, over WebDriver (plain HTTP).

Debian's ``chromium`` and ``chromium-driver`` packages are all it needs (``.ci/run``
installs them): no browser download, no Python dependency. Without them the tests
skip locally, with the reason, and fail in CI (``CI`` set), never pass unseen.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> tuple[str, str]:
    """The chromium and chromedriver binaries; skips (or, in CI, fails) without them."""
    browser = next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    why = "headless Chromium is not installed (apt-get install chromium chromium-driver)"
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI must run the browser tests")
    pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Browser:
    """One chromedriver process and one headless Chromium session."""

    def __init__(self, log_path: Path) -> None:
        browser, driver = find_browser()
        self.port = _free_port()
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in quit()
        self.proc = subprocess.Popen(
            [driver, f"--port={self.port}"], stdout=self._log, stderr=self._log
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if self._call("GET", "/status")["ready"]:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.quit()
                raise TimeoutError("chromedriver did not start")
            time.sleep(0.1)  # chromedriver is starting: ask again
        options = {
            "binary": browser,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,800"],
        }
        caps = {"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"webdriver {path}: {exc.read()[:500]!r}") from None

    def _session(self, method: str, path: str, body: Any = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    def open(self, url: str) -> None:
        self._session("POST", "/url", {"url": url})

    def js(self, script: str, *args: Any) -> Any:
        """Run ``script`` (a function body; ``arguments`` holds ``args``) in the page."""
        return self._session("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait_for(self, script: str, *args: Any, timeout: float = 30.0) -> Any:
        """Until ``script`` returns something truthy; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(script, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never satisfied: {script}")
            time.sleep(0.1)  # the page has not changed yet: look again

    def resize(self, width: int, height: int) -> None:
        self._session("POST", "/window/rect", {"width": width, "height": height})

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self._session("GET", "/screenshot")))
        return path

    def quit(self) -> None:
        try:
            if getattr(self, "session", None):
                self._session("DELETE", "")
        except (OSError, AssertionError):
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
