"""The web view in a real browser (headless Chromium, tests/browser.py), against real server processes,
changed through gRPC by the blocking client: what a person looking at the page sees."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser import WebServer, open_browser, require_browser, run_web_server
from tests.doc_blocks import ROOT
from trio_bridge import Constraints
from trio_bridge.client import SyncBridgeClient

#: How long a change may take to show on an open page (the issue's promise: within a second).
LIVE_WITHIN = 1.0
#: How long a page may take to load (a safety bound on a loaded machine, not a timing).
LOAD_LIMIT = 30.0

TOKENS = "alice alice-token-0123456789 own\nbob bob-token-0123456789abc own\n"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver = open_browser(require_browser())
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """The browser, with no cookies left from another test; fails the test if a page logged an error
    (a script's fault, or a Content-Security-Policy violation)."""
    browser.delete_all_cookies()
    browser.get_log("browser")  # what earlier tests left
    yield browser
    # Scripts' faults and policy violations; not the refusals a test asks for (source "network").
    problems = [
        entry
        for entry in browser.get_log("browser")
        if entry["level"] == "SEVERE" and entry.get("source") != "network"
    ]
    assert not problems, problems


@pytest.fixture(scope="module")
def server() -> Iterator[WebServer]:
    yield from run_web_server(["--web-writable"])


@pytest.fixture(scope="module")
def client(server: WebServer) -> Iterator[SyncBridgeClient]:
    with SyncBridgeClient("127.0.0.1", server.port) as connected:
        yield connected


def wait(driver: Any, condition: Any, timeout: float = LOAD_LIMIT) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(condition)


def css(driver: Any, selector: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def row_of(driver: Any, name: str) -> Any:
    rows = css(driver, f'.variable[data-name="{name}"]')
    return rows[0] if rows else None


def text_in(driver: Any, name: str, part: str) -> str | None:
    """The text of ``part`` in variable ``name``'s row, read in one step (a row is redrawn when its
    variable changes: an element found first and read later may be gone)."""
    text = driver.execute_script(
        "const found = document.querySelector(arguments[0]); return found ? found.textContent : null;",
        f'.variable[data-name="{name}"] {part}'.strip(),
    )
    return None if text is None else str(text)


def attribute_in(driver: Any, name: str, part: str, attribute: str) -> str | None:
    """As :func:`text_in`, an attribute."""
    value = driver.execute_script(
        "const found = document.querySelector(arguments[0]); "
        "return found ? found.getAttribute(arguments[1]) : null;",
        f'.variable[data-name="{name}"] {part}'.strip(),
        attribute,
    )
    return None if value is None else str(value)


def open_session(driver: Any, server: WebServer, session: str) -> None:
    driver.get(f"{server.web_url}/sessions/{session}")
    wait(driver, lambda d: css(d, "#feed-status.live"))


def new_session(client: SyncBridgeClient, name: str) -> str:
    return client.create_session(session_id=name).session_id


# ---- the sessions page --------------------------------------------------------------------------


def test_the_sessions_page_lists_a_session_created_through_grpc(
    page: Any, server: WebServer, client: SyncBridgeClient
) -> None:
    session = new_session(client, "listed")
    client.register_variable(session, "x", "integer", 1)
    page.get(server.web_url + "/")
    row = wait(page, lambda d: css(d, 'tr[data-session="listed"]'))[0]
    cells = [c.text for c in row.find_elements("css selector", "td")]
    assert cells[0] == "listed" and cells[1] == "1" and cells[3] == "0"
    assert "min" in cells[2]  # the TTL left
    # The creation time, in the browser's time zone.
    shown = row.find_element("css selector", "time")
    assert shown.get_attribute("datetime").endswith("Z") and shown.text
    # Created later, it appears without a reload.
    page.execute_script("window.notReloaded = true")
    new_session(client, "later")
    wait(page, lambda d: css(d, 'tr[data-session="later"]'))
    assert page.execute_script("return window.notReloaded") is True
    css(page, 'tr[data-session="listed"] a')[0].click()
    wait(page, lambda d: css(d, "#feed-status.live"))
    assert row_of(page, "x") is not None


def test_the_sessions_page_filters_by_id(page: Any, server: WebServer, client: SyncBridgeClient) -> None:
    new_session(client, "filter-apple")
    new_session(client, "filter-pear")
    page.get(server.web_url + "/")
    wait(page, lambda d: css(d, 'tr[data-session="filter-pear"]'))
    page.find_element("css selector", "#filter").send_keys("apple")
    wait(page, lambda d: not css(d, 'tr[data-session="filter-pear"]'))
    assert [r.get_attribute("data-session") for r in css(page, "tr[data-session]")] == ["filter-apple"]


# ---- one session, live --------------------------------------------------------------------------


def test_a_change_through_grpc_shows_within_a_second_in_order_with_its_sparkline_point(
    page: Any, server: WebServer, client: SyncBridgeClient
) -> None:
    session = new_session(client, "live")
    client.register_variable(session, "temperature", "float", 20.0)
    for value in (20.5, 21.0):
        client.set(session, "temperature", value)
    open_session(page, server, session)
    assert text_in(page, "temperature", ".version") == "version 3"
    assert attribute_in(page, "temperature", ".sparkline", "data-points") == "3"  # its history
    page.execute_script("window.notReloaded = true")

    client.set(session, "temperature", 22.5, source="thermostat")
    wait(page, lambda d: text_in(d, "temperature", ".version") == "version 4", timeout=LIVE_WITHIN)
    assert text_in(page, "temperature", ".value") == "22.5"
    assert text_in(page, "temperature", ".source") == "by thermostat"
    assert attribute_in(page, "temperature", ".sparkline", "data-points") == "4"
    assert json.loads(attribute_in(page, "temperature", ".sparkline", "data-versions") or "") == [1, 2, 3, 4]

    # A burst: every version, in order, and the last value shown.
    for value in range(23, 33):
        client.set(session, "temperature", float(value))
    wait(page, lambda d: text_in(d, "temperature", ".version") == "version 14")
    assert json.loads(attribute_in(page, "temperature", ".sparkline", "data-versions") or "") == list(
        range(1, 15)
    )
    assert page.execute_script("return window.notReloaded") is True


def test_a_deleted_variable_and_an_ended_session_show_as_such(
    page: Any, server: WebServer, client: SyncBridgeClient
) -> None:
    session = new_session(client, "ending")
    client.register_variable(session, "keep", "boolean", True)
    client.register_variable(
        session, "drop", "choice", "a", constraints=Constraints(allowed_values=("a", "b"))
    )
    open_session(page, server, session)
    states = [s.text for s in row_of(page, "drop").find_elements("css selector", ".state.on")]
    assert states == ["a"]
    client.delete_variable(session, "drop")
    wait(page, lambda d: "deleted" in (attribute_in(d, "drop", "", "class") or ""))
    client.cleanup_session(session)
    banner = wait(page, lambda d: [b for b in css(d, "#banner") if b.is_displayed()])[0]
    assert banner.text == "Session ended: session 'ending' was cleaned up; the watch has ended"
    assert css(page, "#feed-status")[0].text == "ended"


def test_a_value_holding_markup_renders_as_text(
    page: Any, server: WebServer, client: SyncBridgeClient
) -> None:
    session = new_session(client, "markup")
    hostile = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'
    client.register_variable(session, "note", "string", hostile)
    open_session(page, server, session)
    assert text_in(page, "note", ".value") == hostile
    client.set(session, "note", hostile + "<b>again</b>")
    wait(page, lambda d: text_in(d, "note", ".value") == hostile + "<b>again</b>")
    assert page.execute_script("return window.pwned") is None
    assert not css(page, "#app script, #app img, #app b")


def test_a_stale_compare_and_set_from_the_page_shows_aborted_s_message(
    page: Any, server: WebServer, client: SyncBridgeClient
) -> None:
    session = new_session(client, "cas")
    client.register_variable(session, "mode", "string", "idle")
    open_session(page, server, session)
    form = row_of(page, "mode").find_element("css selector", "form.write")
    value = form.find_element("css selector", "input.new-value")
    value.clear()
    value.send_keys("run")
    # Meanwhile someone else writes: the version the form holds (1) is stale now.
    client.set(session, "mode", "stopped")
    wait(page, lambda d: text_in(d, "mode", ".version") == "version 2")
    assert form.find_element("css selector", "input.expected").get_attribute("value") == "1"
    form.find_element("css selector", "button").click()
    result = wait(page, lambda d: css(d, '.variable[data-name="mode"] .write-result.error'))[0]
    assert result.text == (
        "ABORTED: variable 'mode': expected version 1, but the current version is 2; nothing was changed"
    )
    assert client.get(session, "mode").value == "stopped"
    # With the current version, it goes through, and shows as the next version.
    form = row_of(page, "mode").find_element("css selector", "form.write")
    expected = form.find_element("css selector", "input.expected")
    expected.clear()
    expected.send_keys("2")
    form.find_element("css selector", "button").click()
    wait(page, lambda d: text_in(d, "mode", ".version") == "version 3")
    assert client.get(session, "mode").value == "run"
    assert text_in(page, "mode", ".source") == "by web"


def test_pictures_of_embeddings_tensors_and_states(
    page: Any, server: WebServer, client: SyncBridgeClient
) -> None:
    from trio_bridge import Tensor

    session = new_session(client, "pictures")
    client.register_variable(session, "weights", "embedding", (0.5, -0.25, 1.0))
    grid = Tensor.from_numpy(__import__("numpy").arange(12, dtype="float32").reshape(3, 4))
    client.register_variable(session, "grid", "tensor", grid)
    client.register_variable(session, "on", "boolean", False)
    open_session(page, server, session)
    assert len(row_of(page, "weights").find_elements("css selector", ".bars rect")) == 3
    heatmap = row_of(page, "grid").find_element("css selector", "canvas.heatmap")
    assert (heatmap.get_attribute("width"), heatmap.get_attribute("height")) == ("4", "3")
    assert [s.text for s in row_of(page, "on").find_elements("css selector", ".state.on")] == ["false"]


# ---- tokens -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebServer]:
    tokens: Path = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(TOKENS)
    yield from run_web_server(["--token-file", str(tokens)])


def test_with_tokens_nothing_shows_without_one_and_only_in_scope_sessions_with_one(
    page: Any, token_server: WebServer
) -> None:
    for name in ("alice", "bob"):
        token = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789abc"}[name]
        with SyncBridgeClient("127.0.0.1", token_server.port, token=token) as client:
            session = client.create_session(session_id=f"{name}-secret").session_id
            client.register_variable(session, "x", "integer", 7)
    for path in ("/", "/sessions/alice-secret"):
        page.get(token_server.web_url + path)
        wait(page, lambda d: css(d, "#token"))  # sent to sign in
        assert "secret" not in page.find_element("tag name", "body").text
    page.find_element("css selector", "#token").send_keys("not-the-right-token")
    page.find_element("css selector", "form.login button").click()
    problem = wait(page, lambda d: [e for e in css(d, "#login-error") if e.text])[0]
    assert problem.text == "the token is not valid"
    token = page.find_element("css selector", "#token")
    token.clear()
    token.send_keys("alice-token-0123456789")
    page.find_element("css selector", "form.login button").click()
    wait(page, lambda d: css(d, "#feed-status.live"))  # back where it was sent from, signed in
    assert text_in(page, "x", ".value") == "7"
    assert "signed in as alice" in page.find_element("css selector", "#who").text
    page.get(token_server.web_url + "/")
    wait(page, lambda d: css(d, 'tr[data-session="alice-secret"]'))
    assert not css(page, 'tr[data-session="bob-secret"]')
    page.get(token_server.web_url + "/sessions/bob-secret")
    banner = wait(page, lambda d: [b for b in css(d, "#banner") if b.is_displayed()])[0]
    assert banner.text == "Session ended: session 'bob-secret' not found (it may have expired)"
    assert not css(page, ".variable")


# ---- the README's picture -----------------------------------------------------------------------


def test_the_readme_screenshot_is_made_from_the_real_page_by_its_command(tmp_path: Path) -> None:
    require_browser()
    import struct

    from tests import screenshot

    made = tmp_path / "web-view.png"
    screenshot.make(made)
    png = made.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 1000 and height >= 800
    # The command the README's picture comes from, and the picture the README shows.
    noxfile = (ROOT / "noxfile.py").read_text()
    session = noxfile.split("def screenshot(", 1)[1].split("\n@nox.session", 1)[0]
    assert '"python", "-m", "tests.screenshot", "docs/web-view.png"' in session
    readme = (ROOT / "README.md").read_text()
    assert "![A session in the web view](docs/web-view.png)" in readme
    assert (ROOT / "docs" / "web-view.png").read_bytes().startswith(b"\x89PNG")


def test_signing_in_never_leads_to_another_site(page: Any, token_server: WebServer) -> None:
    for trick in ("/%5Cevil.example/", "//evil.example/", "/%09/evil.example/", "https://evil.example/"):
        page.delete_all_cookies()
        page.get(f"{token_server.web_url}/login?next={trick}")
        wait(page, lambda d: css(d, "#token"))
        page.find_element("css selector", "#token").send_keys("alice-token-0123456789")
        page.find_element("css selector", "form.login button").click()
        wait(page, lambda d: css(d, "#sessions"))  # the sessions page, here
        assert page.current_url.startswith(token_server.web_url + "/"), (trick, page.current_url)


def test_without_a_browser_the_tests_skip_saying_how_to_install_one_except_in_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests import browser as browser_module

    monkeypatch.setattr(browser_module.shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("TRIO_BRIDGE_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium chromium-driver"):
        require_browser()
    monkeypatch.setenv("TRIO_BRIDGE_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match=r"no browser in CI: .*apt-get install chromium"):
        require_browser()
    assert "export TRIO_BRIDGE_REQUIRE_BROWSER=1" in (ROOT / ".ci" / "run").read_text()
