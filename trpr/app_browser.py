"""Driving the photo-search app (trpr/app.py) as a user does: served on 127.0.0.1, then used from a real
headless Chromium through selenium. Used by tests/test_app_served.py and scripts/app_screenshot.py.

The browser is the operating system's: Debian's `chromium` and `chromium-driver` (a matched pair from one
source package; `make browser` installs them when missing and running as root). Nothing is downloaded:
selenium is given the driver's path, so its own driver manager never runs.
"""
from __future__ import annotations

import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_NAMES = ("chromedriver", "chromium-driver")
# CI sets this: a missing browser is then a failure, not a skip
REQUIRE_BROWSER_ENV = "TRPR_REQUIRE_BROWSER"


def find_browser() -> tuple[str, str] | str:
    """(browser path, driver path), or a one-line reason why the browser test cannot run here."""
    browser = next((shutil.which(name) for name in BROWSER_NAMES if shutil.which(name)), None)
    driver = next((shutil.which(name) for name in DRIVER_NAMES if shutil.which(name)), None)
    if browser is None or driver is None:
        missing = " and ".join(what for what, path in (("chromium", browser), ("chromedriver", driver)) if path is None)
        return (f"no {missing} on PATH: install Debian's chromium + chromium-driver (`make browser` as root, or "
                "`sudo apt-get install chromium chromium-driver`)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (it is in the `test` extra: pip install -e '.[test]')"
    return browser, driver


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@contextmanager
def serve(session, *, host: str = "127.0.0.1", port: int | None = None, default_top: int = 10):
    """Serve the app for `session` in this process (a background thread) and yield its URL; closed on
    exit. Only the gallery folder is served (as `3rtpr-app` does)."""
    from trpr.app import build_app

    app = build_app(session, default_top)
    port = port or free_port(host)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, show_error=True,
               allowed_paths=[str(session.folder)])
    try:
        yield f"http://{host}:{port}/"
    finally:
        app.close()


@contextmanager
def chrome(browser: str, driver: str, *, width: int = 1280, height: int = 900):
    """A headless Chromium session (selenium WebDriver) at `width`×`height` CSS pixels; quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    os.environ.setdefault("SE_AVOID_STATS", "true")  # selenium: no usage statistics
    session = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    try:
        yield session
    finally:
        session.quit()


def search_in_browser(driver, url: str, query: str, *, timeout_s: float = 60.0) -> dict:
    """Open the app at `url`, type `query` in the description box, press Enter and wait until the result
    gallery shows images and the message reports the search. Returns {"message", "images" (the result
    thumbnails' count), "seconds"}; TimeoutError naming what never appeared otherwise."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, timeout_s)
    box = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#query textarea") or None)[0]
    started = time.perf_counter()
    box.click()
    box.send_keys(query)
    box.send_keys(Keys.ENTER)

    def results_shown(d):
        message = d.find_element(By.ID, "message").text
        images = d.find_elements(By.CSS_SELECTOR, "#results img")
        return (message, len(images)) if images and " images for " in message else None

    try:
        message, images = wait.until(results_shown)
    except Exception as error:  # selenium's TimeoutException: say what was on the page
        raise TimeoutError(f"no results within {timeout_s:.0f} s for {query!r} at {url}; message: "
                           f"{driver.find_element(By.ID, 'message').text!r}") from error
    return {"message": message, "images": images, "seconds": time.perf_counter() - started}


def explain_in_browser(driver, result: int = 0, *, timeout_s: float = 30.0) -> str:
    """Click result thumbnail `result` (0-based) and wait for its explanation; returns the explanation's
    text (caption of the patch overlay + highlighted words)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    thumbnails = driver.find_elements(By.CSS_SELECTOR, "#results img")
    thumbnails[result].click()
    wait = WebDriverWait(driver, timeout_s)

    def explained(d):
        text = d.find_element(By.ID, "explain-text").text
        return text if "pooled" in text or "no fused heads" in text else None

    try:
        text = wait.until(explained)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#explain-image img") or "no fused heads" in text)
    except Exception as error:
        raise TimeoutError(f"no explanation within {timeout_s:.0f} s; shown: "
                           f"{driver.find_element(By.ID, 'explain-text').text!r}") from error
    return text


def save_screenshot(driver, path: str | Path) -> Path:
    """The whole page as a PNG at `path` (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(str(path)):
        raise OSError(f"{path}: the browser could not write the screenshot")
    return path
