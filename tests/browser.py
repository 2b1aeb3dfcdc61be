"""A real headless Chromium for the page tests: Debian's chromium and chromium-driver, driven by
Selenium with explicit paths, so Selenium Manager never looks for (or downloads) a browser."""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from debian import ensure_packages
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

__all__ = ["CHROMEDRIVER", "CHROMIUM", "chromium", "ensure_chromium", "severe_console_entries"]


CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PACKAGES = ("chromium", "chromium-driver")


def _installed() -> bool:
    return shutil.which("chromedriver") is not None and CHROMIUM.is_file()


def ensure_chromium() -> None:
    """Install Debian's chromium and chromium-driver on first use."""
    ensure_packages(PACKAGES, _installed, "the page tests")


@contextmanager
def chromium(
    *, width: int = 1280, height: int = 800, auth: tuple[str, str] | None = None
) -> Iterator[webdriver.Chrome]:
    """A headless Chromium with a `width`x`height` viewport whose console log `get_log("browser")`
    returns; `auth` adds a basic-auth header to every request the pages make."""
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # tests run as root in containers
        "--disable-dev-shm-usage",
        "--disable-gpu",
        # Nothing the browser does on its own may reach the network (there is none anyway).
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--window-size={width},{height}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(30)
        # The viewport itself, not the window around it, is what a 1280x800 screen shows.
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            driver.execute_cdp_cmd("Network.enable", {})
            driver.execute_cdp_cmd(
                "Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}}
            )
        yield driver
    finally:
        driver.quit()


def severe_console_entries(driver: webdriver.Chrome) -> list[dict]:
    """The console's errors since the last call (script errors, failed loads, CSP refusals)."""
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
