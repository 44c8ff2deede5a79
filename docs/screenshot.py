"""Makes docs/page.png: the browser page on the shipped model, three lines translated and the
attention heatmap of the first (a paragraph of two sentences: its heatmap is block-diagonal).

    python docs/screenshot.py [--model saved_models/en-fr] [--out docs/page.png]

Needs what tests/test_browser.py needs: Debian's `chromium` and `chromium-driver`, and the
`selenium` package (the `dev` extra).
"""

from __future__ import annotations

import argparse
import base64
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

LINES = [
    "Two dogs play in the snow. A man is riding a bicycle.",
    "The museum opened in 1998. It has 250 paintings.",
    "Where is the station?",
]
WIDTH, HEIGHT = 1280, 900


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="saved_models/en-fr")
    parser.add_argument("--out", default="docs/page.png")
    args = parser.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from translator.server.testing import start_server, stop_server, wait_ready

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if chromium is None or not Path(driver_path).exists():
        sys.exit("needs chromium and chromedriver (apt-get install chromium chromium-driver)")
    proc, url = start_server(args.model, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_ready(url, proc, 300):
            sys.exit(f"translator serve on {args.model} did not get ready")
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        with tempfile.TemporaryDirectory() as profile:
            for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                        f"--window-size={WIDTH},{HEIGHT}"):  # fmt: skip
                options.add_argument(arg)
            browser = webdriver.Chrome(service=Service(driver_path), options=options)
            try:
                wait = WebDriverWait(browser, 120, poll_frequency=0.1)
                browser.get(url + "/")
                browser.find_element(By.ID, "source").send_keys("\n".join(LINES))
                browser.find_element(By.ID, "translate").click()
                results = "#results > li.result"
                wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, results)) == len(LINES))
                first = browser.find_elements(By.CSS_SELECTOR, results)[0]
                first.find_element(By.CSS_SELECTOR, "button.show-attention").click()
                wait.until(lambda d: d.find_element(By.ID, "attention").is_displayed())
                browser.execute_cdp_cmd(
                    "Emulation.setDeviceMetricsOverride",
                    {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
                )
                size = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
                clip = {
                    "x": 0,
                    "y": 0,
                    "width": size["width"],
                    "height": size["height"],
                    "scale": 1,
                }
                shot = browser.execute_cdp_cmd(
                    "Page.captureScreenshot",
                    {"format": "png", "captureBeyondViewport": True, "clip": clip},
                )
            finally:
                browser.quit()
        Path(args.out).write_bytes(base64.b64decode(shot["data"]))
        print(f"wrote {args.out}")
    finally:
        stop_server(proc, timeout=15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
