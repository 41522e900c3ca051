"""stream-serve's page in a real browser: Debian's chromium, headless, driven by Selenium through
the system chromedriver (no browser download). With --api-key set the page asks for the key;
it loads SmolLM2 streaming its layers under a small memory budget, sends a message, shows the
streamed text arriving, and its unit strip changes state during the run. A screenshot is kept
in the test's tmp dir (printed path).

Skipped when selenium, chromium or chromedriver is missing (selenium is not a test extra:
`pip install selenium`, `apt-get install chromium chromium-driver`)."""

import asyncio
import shutil
import time

import pytest

from stream_run.engine import Engine, EngineConfig
from stream_run.server.app import ServerConfig
from tests.server.harness import ServerThread

webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian's chromium and chromium-driver")
KEY = "browser-key"


@pytest.fixture(scope="module")
def server(smollm2_gguf):
    probe = asyncio.run(Engine.open(smollm2_gguf, EngineConfig(backend="numpy")))
    budget = max(probe.model_bytes // 3, 2 * probe.min_budget_bytes)  # most layers stream
    probe.close()
    srv = ServerThread.for_model(smollm2_gguf, ServerConfig("smollm2", api_key=KEY,
                                                            max_tokens_cap=256),
                                 memory_budget_bytes=budget, max_context=1024)
    srv.wait_loaded()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,860", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(DRIVER))
    yield driver
    driver.quit()


def _until(pred, timeout_s=60, what="condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_chat_and_layer_stream_in_chromium(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    find = browser.find_element
    browser.get(server.base_url + "/")
    # the page's calls get 401 without the key: it asks for one
    _until(lambda: find(By.ID, "key-dialog").get_attribute("open") is not None,
           what="the key dialog")
    find(By.ID, "key-input").send_keys(KEY)
    find(By.ID, "key-ok").click()
    _until(lambda: find(By.ID, "conn").text == "live", what="the stats stream")
    strip = find(By.ID, "strip")
    n_units = len(server.engine.monitor.keys)
    _until(lambda: len(strip.find_elements(By.CLASS_NAME, "cell")) == n_units, what="the strip")
    idle_seen = strip.get_attribute("data-seen")
    assert not set(idle_seen) & set("rc")  # nothing reads or computes before the message

    find(By.CSS_SELECTOR, "#settings summary").click()  # system prompt, temperature, ...
    find(By.ID, "system").send_keys("You are brief.")
    max_tokens = find(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("48")
    find(By.ID, "input").send_keys("Write a haiku about disks.")
    find(By.ID, "send").click()

    # streamed text arrives while the generation still runs; the strip moves meanwhile
    states = set()

    def partial():
        states.add(strip.get_attribute("data-states"))
        els = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant.streaming")
        return els and els[0].text.strip()

    first = _until(partial, what="streamed text")
    assert find(By.ID, "stop").is_enabled()
    _until(lambda: (states.add(strip.get_attribute("data-states")),
                    not browser.find_elements(By.CSS_SELECTOR, ".msg.streaming"))[1],
           timeout_s=240, what="the end of the answer")
    answer = find(By.CSS_SELECTOR, ".msg.assistant")
    assert len(answer.text) > len(first)
    assert "error" not in answer.get_attribute("class")
    # units were seen being read or computed, and the strip took several states
    assert set(strip.get_attribute("data-seen")) & set("rc")
    assert len(states - {None}) >= 2
    assert find(By.ID, "m-tps").text and find(By.ID, "m-total").text != "–"
    assert find(By.ID, "regen").is_enabled()

    # take the screenshot during a second (regenerated) run, so the strip is live in it
    find(By.ID, "regen").click()
    _until(partial, what="regenerated text")
    _until(lambda: set(strip.get_attribute("data-states") or "") & set("rc") or
           not browser.find_elements(By.CSS_SELECTOR, ".msg.streaming"), what="a live strip")
    shot = tmp_path / "stream-serve-page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
    find(By.ID, "stop").click()
    _until(lambda: not browser.find_elements(By.CSS_SELECTOR, ".msg.streaming"),
           what="the stop")
    meta = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta")[-1].text
    assert meta.split(" · ")[0] in ("stopped", "length", "stop")  # it may end before the click
    server.wait_idle()

    # a phone-sized screen: one column, nothing wider than the screen
    browser.set_window_size(390, 844)
    time.sleep(0.3)
    assert browser.execute_script(
        "return document.documentElement.scrollWidth <= window.innerWidth")
    chat, stream = find(By.ID, "chat").rect, find(By.ID, "stream").rect
    assert stream["y"] >= chat["y"] + chat["height"] - 1  # the stream view below the chat
    assert browser.save_screenshot(str(tmp_path / "stream-serve-page-phone.png"))
