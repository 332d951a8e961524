"""The README's picture of the web view, made from the real page: ``nox -s screenshot`` runs
``python -m tests.screenshot docs/web-view.png``.

It starts a server with the web view on (free ports), fills a session through gRPC as a program
would (a greenhouse: numbers with some history, a choice, a switch, an embedding, a 2-D tensor), opens
the session's page in headless Chromium (tests/browser.py) and saves it as a PNG.
"""

from __future__ import annotations

import math
import struct
import sys
from pathlib import Path

from tests.browser import INSTALL_HINT, browser_paths, open_browser, run_web_server
from trio_bridge import Constraints, Tensor
from trio_bridge.client import SyncBridgeClient

SESSION = "greenhouse"


def fill(client: SyncBridgeClient) -> None:
    """The session the picture shows."""
    client.create_session(session_id=SESSION, metadata={"site": "north wing"})
    client.register_variable(
        SESSION, "temperature", "float", 21.0, constraints=Constraints(minimum=-40, maximum=60)
    )
    client.register_variable(SESSION, "humidity", "float", 0.55)
    client.register_variable(
        SESSION, "mode", "choice", "idle", constraints=Constraints(allowed_values=("idle", "heat", "vent"))
    )
    client.register_variable(SESSION, "pump", "boolean", False)
    for step in range(1, 40):
        client.set(
            SESSION, "temperature", round(21 + 2.5 * math.sin(step / 5) + step / 20, 2), source="sensor-3"
        )
        client.set(SESSION, "humidity", round(0.55 + 0.1 * math.cos(step / 4), 3), source="sensor-3")
    client.set(SESSION, "mode", "heat", source="controller")
    client.set(SESSION, "pump", True, source="controller")
    client.register_variable(
        SESSION, "leaf_embedding", "embedding", tuple(math.sin(i / 3) * (1 - i / 64) for i in range(48))
    )
    heat = [math.exp(-((r - 7) ** 2 + (c - 9) ** 2) / 30) for r in range(16) for c in range(24)]
    client.register_variable(
        SESSION, "canopy_heat", "tensor", Tensor((16, 24), "float32", struct.pack(f"<{len(heat)}f", *heat))
    )


def make(path: Path) -> None:
    paths = browser_paths()
    if paths is None:
        raise SystemExit(INSTALL_HINT)
    server = run_web_server()
    running = next(server)
    try:
        with SyncBridgeClient("127.0.0.1", running.port) as client:
            fill(client)
        driver = open_browser(paths)
        try:
            from selenium.webdriver.support.ui import WebDriverWait

            driver.set_window_size(1200, 1000)
            driver.get(f"{running.web_url}/sessions/{SESSION}")
            WebDriverWait(driver, 30).until(
                lambda d: (
                    d.find_elements("css selector", "#feed-status.live")
                    and len(d.find_elements("css selector", ".variable")) == 6
                )
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(path))
        finally:
            driver.quit()
    finally:
        server.close()


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/web-view.png")
    make(target)
    print(f"wrote {target}")
