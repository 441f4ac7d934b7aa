"""Headless Chromium for the browser tests (Selenium over Debian's ``chromium`` + ``chromium-driver``).

Locally the tests skip when Chromium, its driver or Selenium is missing; under CI (``CI`` set, as
``.ci/run`` sets it, which also installs them) they fail instead, so they never silently skip there.
Screenshots: ``save_screenshot`` writes to the test's tmp dir and, when ``VANS_SCREENSHOTS`` names a
directory, a copy there (a stable place to look at them)."""
import os
import shutil

import pytest

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = ("chromedriver",)


def _which(names):
    return next((p for p in map(shutil.which, names) if p), None)


def chrome():
    """A headless Chromium WebDriver (1280x1000), or a skip (a failure under CI) naming what is missing."""
    browser, driver = _which(CHROMIUM), _which(DRIVER)
    missing = [what for what, p in (("chromium", browser), ("chromium-driver", driver)) if p is None]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if missing:
        msg = f"browser tests need {', '.join(missing)} (apt-get install -y chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(msg + ": CI must provide them (.ci/run installs them)")
        pytest.skip(msg)
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1000",
              "--autoplay-policy=no-user-gesture-required", "--mute-audio"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def save_screenshot(driver, tmp_path, name: str, full_page: bool = True) -> str:
    """PNG of the page (the whole page's height when ``full_page``) under ``tmp_path`` (+ ``VANS_SCREENSHOTS``)."""
    path = os.path.join(str(tmp_path), name)
    if full_page:                  # the whole page, past the window's height (Chromium's DevTools protocol)
        import base64
        h = driver.execute_script("return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)")
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": 1280, "height": min(int(h), 6000), "scale": 1}})
        with open(path, "wb") as f:
            f.write(base64.b64decode(shot["data"]))
    else:
        driver.save_screenshot(path)
    stable = os.environ.get("VANS_SCREENSHOTS")
    if stable:
        os.makedirs(stable, exist_ok=True)
        shutil.copy(path, os.path.join(stable, name))
    return path
