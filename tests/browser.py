"""A real headless Chromium for the page tests: Debian's chromium and chromium-driver, driven by
Selenium with explicit paths, so Selenium Manager never looks for (or downloads) a browser."""

from __future__ import annotations

import base64
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

__all__ = ["CHROMEDRIVER", "CHROMIUM", "chromium", "ensure_chromium", "severe_console_entries"]

log = logging.getLogger(__name__)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PACKAGES = ("chromium", "chromium-driver")
INSTALL_TIMEOUT_S = 900


def _installed() -> bool:
    return shutil.which("chromedriver") is not None and CHROMIUM.is_file()


def ensure_chromium() -> None:
    """Install Debian's chromium and chromium-driver on first use (as the suite installs Label
    Studio); raise RuntimeError saying what to do when apt-get cannot."""
    if _installed():
        return
    apt = shutil.which("apt-get")
    if apt is None:
        raise RuntimeError(
            "the page tests need Chromium and its driver at /usr/bin/chromium and "
            "/usr/bin/chromedriver, and there is no apt-get here to install them: install "
            f"{' and '.join(PACKAGES)} (Debian packages) or their equivalents there"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Wait for a dpkg lock another install holds rather than fail at once.
    install = [apt, "-o", "DPkg::Lock::Timeout=600", "install", "-y", *PACKAGES]
    log.info("installing %s with apt-get (about a minute)", " and ".join(PACKAGES))
    done = subprocess.run(
        install, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S
    )
    if done.returncode != 0:
        # A fresh container has no package lists yet.
        subprocess.run(
            [apt, "-o", "DPkg::Lock::Timeout=600", "update"],
            env=env,
            capture_output=True,
            timeout=INSTALL_TIMEOUT_S,
        )
        done = subprocess.run(
            install, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S
        )
    if done.returncode != 0 or not _installed():
        raise RuntimeError(
            f"`apt-get install -y {' '.join(PACKAGES)}` failed (exit {done.returncode}; as root? "
            f"with network?):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )


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
