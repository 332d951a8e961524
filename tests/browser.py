"""A real browser for the web view's tests: the system's Chromium (Debian's ``chromium`` and
``chromium-driver``), headless, driven by Selenium through its own chromedriver: nothing is downloaded
at test time. Without them the browser tests skip, saying how to install them, except in CI
(``$CI`` or ``$TRIO_BRIDGE_REQUIRE_BROWSER`` set: ``.ci/run`` installs them), where they fail.

Also: a `trio-bridge serve` process with the web view on, for the browser to look at.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

INSTALL_HINT = (
    "the web view's browser tests need Chromium and its driver: on Debian or Ubuntu, "
    "`sudo apt-get install chromium chromium-driver` (.ci/run installs them)"
)
#: Chromium's flags for a machine with no network beyond loopback (no background connections).
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    "--window-size=1200,1000",
)


def browser_paths() -> tuple[str, str] | None:
    """The system's Chromium and chromedriver, if both are installed."""
    browser = next((p for name in ("chromium", "chromium-browser") if (p := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def require_browser() -> tuple[str, str]:
    """The paths of Chromium and its driver; skips the test without them (fails it in CI)."""
    import pytest  # (the screenshot's command runs without pytest)

    paths = browser_paths()
    if paths is None:
        if os.environ.get("CI") or os.environ.get("TRIO_BRIDGE_REQUIRE_BROWSER"):
            pytest.fail(f"no browser in CI: {INSTALL_HINT}")
        pytest.skip(INSTALL_HINT)
    return paths


def open_browser(paths: tuple[str, str]) -> Any:
    """A headless Chromium session (a fresh profile), with the page's console kept for the tests."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser, driver = paths
    options = Options()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='trio-bridge-chromium-')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


@dataclass
class WebServer:
    """A `trio-bridge serve` process: its gRPC port and its web view's address."""

    process: subprocess.Popen[str]
    port: int
    web_url: str


def run_web_server(args: Sequence[str] = ()) -> Iterator[WebServer]:
    """A server process with the web view on (free ports), until the generator is closed."""
    process = subprocess.Popen(
        [sys.executable, "-m", "trio_bridge", "serve", "--port", "0", "--web-port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        serving = process.stdout.readline()
        web = process.stdout.readline()
        port = re.search(r"serving on [\d.]+:(\d+)", serving)
        url = re.search(r"web view on (\S+)", web)
        assert port and url, (serving, web)
        yield WebServer(process, int(port.group(1)), url.group(1).rstrip("/"))
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
