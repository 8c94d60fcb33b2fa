"""End to end in a real headless browser: the chat app on the bundled model, served on a free loopback port,
driven by Debian's chromium through selenium (both installed by .ci/run). It asks a question and waits for
the Thinking block, the answer and the expert heatmap, saves a screenshot, and checks that neither the
server nor the page reached anything but loopback."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import tempfile
import time

import mlx.core as mx
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
selenium = pytest.importorskip("selenium", reason="the browser test needs selenium (pip install -e '.[test]')")
MISSING = "the browser test needs Debian's chromium and chromium-driver (.ci/run installs them)"
if not (CHROMIUM and CHROMEDRIVER) and os.environ.get("CI"):
    pytest.fail(MISSING + ": not found in CI", pytrace=False)  # CI installs them: a skip there would hide a broken setup
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason=MISSING)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

QUESTION = "What is 347 + 285?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_loopback(address) -> bool:
    if not isinstance(address, tuple):  # a unix socket path
        return True
    host = address[0]
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture
def outside_connections(monkeypatch):
    """Every connection attempt of this process to a non-loopback address (refused and recorded)."""
    attempts: list = []
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guarded(real):
        def inner(self, address):
            if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
                attempts.append(address)
                raise ConnectionRefusedError(f"test: no network beyond loopback ({address})")
            return real(self, address)
        return inner

    monkeypatch.setattr(socket.socket, "connect", guarded(connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guarded(connect_ex))
    return attempts


@pytest.fixture
def app_url(outside_connections):
    from app.chat_app import serve
    from app.engine import Engine

    demo, url = serve(Engine(None), host="127.0.0.1", port=_free_port(), open_browser=False, block=False)
    try:
        yield url
    finally:
        demo.close()


@pytest.fixture
def browser(tmp_path):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-default-apps", "--disable-extensions", f"--user-data-dir={profile}", "--window-size=1440,1900",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # names never resolve: loopback only
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)  # no Selenium Manager: paths given
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _requested_urls(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def test_chat_in_a_real_browser(app_url, browser, outside_connections, tmp_path):
    browser.get(app_url)
    wait = WebDriverWait(browser, 60, poll_frequency=0.2)
    box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#mlxds-input textarea"))
    mtp = browser.find_element(By.CSS_SELECTOR, "#mlxds-mtp input[type=checkbox]")
    assert mtp.is_selected() == (mx.default_device() != mx.cpu)  # MTP starts on where it pays: on a GPU
    if not mtp.is_selected():
        mtp.click()
    box.send_keys(QUESTION)
    browser.find_element(By.CSS_SELECTOR, "#mlxds-send").click()

    chat = browser.find_element(By.CSS_SELECTOR, "#mlxds-chat")
    wait.until(lambda d: QUESTION in chat.text)
    wait.until(lambda d: "Thinking" in chat.text)
    wait.until(lambda d: "The answer is" in chat.text)  # nano-r1 ends with "The answer is \boxed{...}."
    stats = wait.until(lambda d: "generation" in d.find_element(By.CSS_SELECTOR, "#mlxds-stats").text
                       and d.find_element(By.CSS_SELECTOR, "#mlxds-stats").text)
    cells = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#mlxds-heatmap td.c"))
    assert len(cells) == 5 * 16  # nano-r1: 5 MoE layers x 16 routed experts
    assert browser.find_elements(By.CSS_SELECTOR, "#mlxds-heatmap td.s")  # the shared expert, apart
    assert "tok/s" in stats and "MTP acceptance" in stats
    # the Thinking block collapses once done; opened, it shows the reasoning
    reasoning = "Add the digits column by column"
    time.sleep(0.5)
    if reasoning not in chat.text:
        browser.find_element(By.XPATH, "//*[@id='mlxds-chat']//*[contains(text(), 'Thinking')]").click()
    wait.until(lambda d: reasoning in chat.text)
    time.sleep(0.3)  # let the last layout settle for the picture

    shot = tmp_path / "chat_app.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    try:
        shutil.copy(shot, "/tmp/app_screenshot.png")
    except OSError:
        pass

    urls = _requested_urls(browser)
    assert urls, "the performance log recorded no requests"
    network = [u for u in urls if u.split(":", 1)[0] in ("http", "https", "ws", "wss")]  # not chrome://, data:, blob:
    assert any(u.startswith(app_url.rstrip("/")) for u in network)
    outside = [u for u in network if not u.startswith(("http://127.0.0.1:", "ws://127.0.0.1:"))]
    assert not outside, f"the page requested non-loopback URLs: {outside[:5]}"
    assert not outside_connections, f"the server tried to reach: {outside_connections}"
