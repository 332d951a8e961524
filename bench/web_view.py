"""The web view's costs, against a real `trio-bridge serve --web-port` process:

- **memory per open page**: ``--pages`` live feeds of one session (20 variables, one with 50 changes
  of history), each read to ``synced`` and then left open, idle; the server's RSS before and after;
- **latency**, with ``--browser`` (the system's headless Chromium, as the browser tests use it): one
  open session page, ``--writes`` SetVariable calls 20 ms apart, and for each the time from the call
  to the page's DOM showing the new version (a MutationObserver notes it; both clocks are this
  machine's).

    .nox/tests/bin/python -m bench.web_view --pages 1000 --browser
"""

from __future__ import annotations

import argparse
import re
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import trio

from tests.browser import browser_paths, open_browser
from tests.web_client import WebClient
from trio_bridge.client import SyncBridgeClient

SESSION = "bench"


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        found = re.search(r"VmRSS:\s+(\d+)", status.read())
    assert found
    return int(found.group(1))


def _start(pages: int) -> tuple[subprocess.Popen[str], int, int]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trio_bridge",
            "serve",
            "--port",
            "0",
            "--web-port",
            "0",
            "--max-watch-streams-per-connection",
            str(pages + 100),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    port = re.search(r":(\d+)$", process.stdout.readline().strip())
    web_port = re.search(r":(\d+)/$", process.stdout.readline().strip())
    assert port
    assert web_port
    return process, int(port.group(1)), int(web_port.group(1))


def _fill(client: SyncBridgeClient) -> None:
    client.create_session(session_id=SESSION)
    for index in range(20):
        client.register_variable(SESSION, f"v{index}", "float", float(index))
    for value in range(50):
        client.set(SESSION, "v0", float(value))


def memory_per_page(process: subprocess.Popen[str], web_port: int, pages: int) -> dict[str, float]:
    async def main() -> dict[str, float]:
        web = WebClient(web_port)
        await web.get("/api/sessions")
        await trio.sleep(0.5)
        before = _rss_kb(process.pid)
        ready = trio.Semaphore(0)
        done = trio.Event()

        async def page() -> None:
            async with web.feed(SESSION) as feed:
                await feed.updates_until_synced()
                ready.release()
                await done.wait()

        async with trio.open_nursery() as nursery:
            for _ in range(pages):
                nursery.start_soon(page)
            for _ in range(pages):
                await ready.acquire()
            await trio.sleep(1)
            after = _rss_kb(process.pid)
            done.set()
        return {
            "pages": pages,
            "rss_before_kb": before,
            "rss_after_kb": after,
            "kb_per_page": (after - before) / pages,
        }

    return trio.run(main)


def latency(web_port: int, client: SyncBridgeClient, writes: int) -> dict[str, Any]:
    paths = browser_paths()
    if paths is None:
        return {"skipped": "no Chromium and chromedriver (apt-get install chromium chromium-driver)"}
    from selenium.webdriver.support.ui import WebDriverWait

    client.register_variable(SESSION, "t", "float", 0.0)
    driver = open_browser(paths)
    try:
        driver.get(f"http://127.0.0.1:{web_port}/sessions/{SESSION}")
        WebDriverWait(driver, 30).until(lambda d: d.find_elements("css selector", "#feed-status.live"))
        driver.execute_script(
            """window.seen = {};
            new MutationObserver(() => {
              const shown = document.querySelector('.variable[data-name="t"] .version');
              const version = shown ? Number(shown.textContent.split(' ')[1]) : 0;
              if (version && !(version in window.seen)) window.seen[version] = Date.now();
            }).observe(document.getElementById('variables'),
                       {subtree: true, childList: true, characterData: true});"""
        )
        sent = {}
        for index in range(1, writes + 1):
            began = time.time() * 1000
            sent[client.set(SESSION, "t", float(index)).version] = began
            time.sleep(0.02)
        time.sleep(1)
        seen = driver.execute_script("return window.seen")
    finally:
        driver.quit()
    delays = sorted(seen[str(version)] - began for version, began in sent.items() if str(version) in seen)
    return {
        "writes": writes,
        "shown": len(delays),
        "p50_ms": statistics.median(delays),
        "p99_ms": delays[max(0, int(len(delays) * 0.99) - 1)],
        "max_ms": delays[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=1000, help="open pages for the memory figure")
    parser.add_argument("--browser", action="store_true", help="also the latency to a page in Chromium")
    parser.add_argument("--writes", type=int, default=200, help="writes for the latency figure")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a socket per page, on both ends
    process, port, web_port = _start(args.pages)
    try:
        with SyncBridgeClient("127.0.0.1", port) as client:
            _fill(client)
            print("memory:", memory_per_page(process, web_port, args.pages), flush=True)
            if args.browser:
                print("latency:", latency(web_port, client, args.writes), flush=True)
    finally:
        process.terminate()
        process.wait()


if __name__ == "__main__":
    main()
