"""End to end in headless Chromium: open the live page, start a stream, change the negative prompt while it
plays, see new frames arrive and the change marked, save a screenshot.

Needs Debian's chromium and chromium-driver (scripts/test.sh installs them where it can, as root with apt);
without them the test skips with that reason.
"""
import os
import shutil
import socket
import threading
import time

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="headless browser test needs Debian's chromium and chromium-driver (apt-get install chromium "
           "chromium-driver; scripts/test.sh does it when run as root)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_server(tiny_generator, tmp_path):
    uvicorn = pytest.importorskip("uvicorn")
    from nasa_video.server import Limits, VideoServer, create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(VideoServer(tiny_generator, tmp_path / "clips", Limits())),
                                           host="127.0.0.1", port=port, log_level="warning", ws="websockets-sansio"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1100,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(condition, timeout=60.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_page_streams_and_takes_a_negative_change(live_server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(live_server)
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#method option"), what="methods from /api/info")
    blocks = browser.find_element(By.ID, "blocks")
    blocks.clear()
    blocks.send_keys("0")  # until stopped
    browser.find_element(By.ID, "start").click()
    def cells():
        return browser.find_elements(By.CSS_SELECTOR, "#timeline div")

    wait_for(lambda: len(cells()) >= 2, what="the first blocks")
    assert "noise" not in browser.find_element(By.ID, "active").text
    negative = browser.find_element(By.ID, "negative")
    negative.clear()
    negative.send_keys("blurry noise")
    browser.find_element(By.ID, "apply").click()
    changed = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#timeline div.changed"),
                       what="a block marked as changed")
    marked_at = int(changed[0].get_attribute("data-block"))
    wait_for(lambda: len(cells()) >= marked_at + 2, what="frames after the change")
    assert "blurry noise" in browser.find_element(By.ID, "active").text
    assert f"from block {marked_at}" in browser.find_element(By.ID, "changes").text
    # the canvas has drawn a frame (not the empty black one)
    drawn = browser.execute_script(
        "const c = document.getElementById('screen'); const d = c.getContext('2d')"
        ".getImageData(0, 0, c.width, c.height).data; let s = 0; for (const v of d) s += v; return s;")
    assert drawn > 0
    # the canvas keeps up: it shows a block within about one of the newest received (blocks are made far faster
    # than they play; stale frames are dropped rather than queued for minutes)
    wait_for(lambda: len(cells()) >= marked_at + 6, what="more blocks")
    shown = int(browser.find_element(By.ID, "screen").get_attribute("data-block"))
    newest = int(cells()[-1].get_attribute("data-block"))
    assert newest - shown <= 2, f"the canvas shows block {shown} while block {newest} has arrived"
    width = browser.execute_script("return document.getElementById('view').getBoundingClientRect().width")
    top = browser.execute_script("return document.getElementById('view').getBoundingClientRect().top")
    assert width <= 560 and top < 100, "the video panel wrapped under the controls"
    browser.find_element(By.ID, "stop").click()
    wait_for(lambda: "stopped" in browser.find_element(By.ID, "state").text, what="the stream to stop")
    browser.find_element(By.ID, "save").click()
    link = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#saved a"), what="the saved clip link")
    assert link[0].text.endswith(".mp4")
    shot = os.environ.get("NASA_VIDEO_SCREENSHOT") or str(tmp_path / "live-page.png")
    browser.save_screenshot(shot)
    assert os.path.getsize(shot) > 1000
