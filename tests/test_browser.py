"""End to end in a real browser: `translator serve` with the tiny model, driven by headless Chromium.

Needs Debian's `chromium` and `chromium-driver` (CI's `.ci/run` installs them) and the `selenium`
package (the `dev` extra). Without them the test skips locally and fails under CI (`CI` set), so CI
cannot go green without really running it.

Set TRANSLATOR_SCREENSHOTS=DIR to keep the screenshots (desktop.png, phone.png, error.png).
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or (
    "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None
)
try:
    import selenium  # noqa: F401

    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

_missing = [
    name
    for name, ok in (
        ("chromium (apt-get install chromium)", CHROMIUM),
        ("chromedriver (apt-get install chromium-driver)", CHROMEDRIVER),
        ("selenium (pip install -e '.[dev]')", HAVE_SELENIUM),
    )
    if not ok
]
if _missing:
    _reason = "browser test needs " + ", ".join(_missing)
    if os.environ.get("CI"):
        # .ci/run installs them: under CI a missing browser is a broken set-up, not a skip.
        pytest.fail(_reason, pytrace=False)
    pytest.skip(_reason, allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from translator.server.testing import start_server, stop_server, wait_ready  # noqa: E402

SERVER_START_TIMEOUT = 180  # imports TensorFlow and traces the translation graph
WAIT = 90  # one translation request through the page (the first one traces the graph)
SENTENCES = ["one red cat", "two big dogs"]
DESKTOP = (1280, 900)
PHONE = (390, 844)


@pytest.fixture(scope="module")
def server(tiny_export_dir, tmp_path_factory):
    """`translator serve` on a free loopback port; yields its base URL and stops it afterwards."""
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log_path, "wb") as log:
        proc, url = start_server(tiny_export_dir, stdout=log, stderr=subprocess.STDOUT)
    try:
        # /readyz: the model is loaded and warmed up (GET / answers before that)
        if not wait_ready(url, proc, SERVER_START_TIMEOUT):
            if proc.poll() is not None:
                pytest.fail(f"translator serve exited with {proc.returncode}:\n{_tail(log_path)}")
            pytest.fail(
                f"translator serve not up after {SERVER_START_TIMEOUT}s:\n{_tail(log_path)}"
            )
        yield url + "/"
    finally:
        stop_server(proc, timeout=15)


def _tail(path, n=40):
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
    ):
        options.add_argument(arg)
    service = Service(executable_path=CHROMEDRIVER, log_output=subprocess.DEVNULL)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.set_script_timeout(60)
        yield driver
    finally:
        driver.quit()


def _screenshot(driver, name, tmp_path, width):
    """A full-page PNG at a CSS width (a phone width emulates a mobile viewport)."""
    height = PHONE[1] if width == PHONE[0] else DESKTOP[1]
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
    )
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    folder = Path(os.environ.get("TRANSLATOR_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def _readable(token: str) -> str:
    """What the page shows for a SentencePiece piece (see readableToken in app.js)."""
    if token == "▁":
        return "␣"
    if token.startswith("▁"):
        return token[1:]
    if token.startswith("<") and token.endswith(">"):
        return token
    return "·" + token


def test_translation_page(server, browser, tmp_path):
    wait = WebDriverWait(browser, WAIT, poll_frequency=0.1)
    browser.get(server)
    assert "translator" in browser.title

    # Every control has an accessible name: a <label for> or an aria-label / visible text.
    for control in browser.find_elements(By.CSS_SELECTOR, "textarea, input"):
        cid = control.get_attribute("id")
        assert browser.find_elements(By.CSS_SELECTOR, f"label[for='{cid}']"), cid
    for button in browser.find_elements(By.TAG_NAME, "button"):
        assert button.get_attribute("aria-label") or button.get_attribute("textContent").strip()
    # Nothing is loaded from outside the server: the page works offline.
    resources = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert all(url.startswith(server) for url in resources), resources

    # Two sentences, decoding options, Translate; the button shows a busy state meanwhile.
    source = browser.find_element(By.ID, "source")
    source.send_keys("\n".join(SENTENCES))
    for cid, value in (("beam-size", "3"), ("n-best", "2"), ("length-penalty", "0.8")):
        field = browser.find_element(By.ID, cid)
        field.clear()
        field.send_keys(value)
    browser.execute_script(
        "const b = document.getElementById('translate'); window.sawBusy = false;"
        "new MutationObserver(() => { if (b.disabled) window.sawBusy = true; })"
        ".observe(b, {attributes: true, subtree: true, characterData: true});"
    )
    browser.find_element(By.ID, "translate").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results > li.result")) == 2)
    wait.until(lambda d: d.find_element(By.ID, "translate").is_enabled())
    assert browser.execute_script("return window.sawBusy") is True
    assert browser.find_element(By.ID, "error").is_displayed() is False

    # The page shows what the API returns for the same request.
    request = {
        "texts": SENTENCES,
        "beam_size": 3,
        "n_best": 2,
        "length_penalty": 0.8,
        "return_alignment": True,
    }
    api = httpx.post(server + "v1/translate", json=request, timeout=WAIT)
    assert api.status_code == 200, api.text
    expected = api.json()
    model = expected["model"]
    assert model["name"] in browser.find_element(By.ID, "model-name").text
    assert str(model["version"]) in browser.find_element(By.ID, "model-name").text
    items = browser.find_elements(By.CSS_SELECTOR, "#results > li.result")
    for item, sentence, translation in zip(items, SENTENCES, expected["translations"], strict=True):
        assert item.find_element(By.CSS_SELECTOR, ".source").text == sentence
        shown = item.find_element(By.CSS_SELECTOR, ".target").text
        assert shown == (translation["text"] or "(empty translation)")
        score = item.find_element(By.CSS_SELECTOR, ".line .score").text
        assert score.replace("−", "-") == f"score {translation['score']:.3f}"
        nbest = item.find_elements(By.CSS_SELECTOR, ".nbest li")
        assert len(nbest) == len(translation.get("n_best") or [None])

    # The heatmap of the first sentence: one column per source piece, one row per target piece.
    assert not browser.find_element(By.ID, "attention").is_displayed()
    items[0].find_element(By.CSS_SELECTOR, "button.show-attention").click()
    wait.until(lambda d: d.find_element(By.ID, "attention").is_displayed())
    alignment = expected["translations"][0]["alignment"]
    columns = [
        e.get_attribute("textContent") for e in browser.find_elements(By.CSS_SELECTOR, "th.src")
    ]
    rows = [
        e.get_attribute("textContent") for e in browser.find_elements(By.CSS_SELECTOR, "th.tgt")
    ]
    assert columns == [_readable(t) for t in alignment["source_tokens"]]
    assert rows == [_readable(t) for t in alignment["target_tokens"]]
    assert columns[:3] == ["one", "red", "cat"]  # "▁one" shown readably
    assert not any("▁" in label for label in columns + rows)
    cells = browser.find_elements(By.CSS_SELECTOR, "#heatmap td.cell")
    assert len(cells) == len(rows) * len(columns)
    assert "one red cat" in browser.find_element(By.ID, "attention-caption").text
    pressed = items[0].find_element(By.CSS_SELECTOR, "button.show-attention")
    assert pressed.get_attribute("aria-pressed") == "true"
    desktop = _screenshot(browser, "desktop", tmp_path, DESKTOP[0])

    # Phone width: nothing wider than the screen but the heatmap's own scroll box.
    phone = _screenshot(browser, "phone", tmp_path, PHONE[0])
    assert browser.execute_script("return document.documentElement.scrollWidth") <= PHONE[0]
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

    # An API error (a text over the length limit) shows the JSON error's message.
    too_long = " ".join(["one red cat"] * 200)  # 2,399 characters; the limit is 1,000
    api = httpx.post(server + "v1/translate", json={**request, "texts": [too_long]}, timeout=WAIT)
    assert 400 <= api.status_code < 500, api.text
    message = api.json().get("error") or api.json().get("detail")
    assert isinstance(message, str) and message
    browser.execute_script(
        "const s = document.getElementById('source'); s.value = arguments[0];", too_long
    )
    browser.find_element(By.ID, "source").send_keys(Keys.CONTROL, Keys.ENTER)  # the shortcut
    wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
    wait.until(lambda d: d.find_element(By.ID, "translate").is_enabled())
    error = browser.find_element(By.CSS_SELECTOR, "#error .message").text
    assert error == message
    assert "Traceback" not in browser.find_element(By.ID, "error").text
    browser.execute_script("window.scrollTo(0, 0)")
    error_shot = _screenshot(browser, "error", tmp_path, DESKTOP[0])

    for path in (desktop, phone, error_shot):
        assert path.stat().st_size > 10_000, path
